"""Where a frozen model (PPO's reference and reward models) lives: the memory plan and its budget.

resident: a plain module (no DeepSpeed engine, no ZeRO-3 partitioning) on this rank's device,
built once, eval mode, no gradients: a scoring forward costs its compute alone. offload: a ZeRO-3
inference engine with its parameters offloaded (engines.inference_engine): each forward gathers
every layer, but a rank holds 1/world of the weights. auto: the memory plan `plan` (a pure
function of the models' sizes and the budget) puts each model resident while it fits what is left
of the per-rank budget (`memory_budget`), in order, and offloads the rest. Building the models and
logging the plan is the PPO stage's (pipeline/stages/ppo_frozen.py). The same rule decides whether
the critic scores the rollout from a materialised plain copy (`critic_scoring`, ppo.critic_scoring;
pipeline/distributed/materialise.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator

from pipeline.distributed import collectives

RESIDENT, OFFLOAD, AUTO = "resident", "offload", "auto"
BUDGET_FRACTION = 0.5  # share of the free memory (per rank) that resident frozen models may take


@dataclass(frozen=True)
class Choice:
    """One frozen model's placement and why."""

    name: str  # "ref", "reward", "reward 0", ...
    placement: str  # RESIDENT or OFFLOAD
    reason: str

    def line(self) -> str:
        return f"placement {self.name}: {self.placement} ({self.reason})"


def human_bytes(n: float) -> str:
    """Decimal units, 3 significant digits: 12.3 MB, 5.1 GB."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.3g} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    raise AssertionError  # unreachable


def plan(models: Sequence[tuple[str, int, str]], budget: int, option: dict | None = None) -> list:
    """The placement of each frozen model: `models` are (name, bytes, requested) in order, requested
    one of auto, resident, offload; `budget` the bytes per rank resident models may take; `option`
    maps a name to the option that asked (for the reason). Resident models (asked or chosen) take
    from the budget in order; an auto model is resident when it fits what is left."""
    out, left = [], budget
    for name, size, requested in models:
        asked = f"asked by {option[name]}" if option and name in option else "asked"
        if requested == OFFLOAD:
            out.append(Choice(name, OFFLOAD, f"{asked}; {human_bytes(size)}"))
            continue
        if requested == RESIDENT:
            reason = f"{asked}; {human_bytes(size)}"
            if size > left:
                reason += f", over the {human_bytes(max(left, 0))} left of the budget"
        elif size <= left:
            reason = f"{human_bytes(size)} of a {human_bytes(left)} budget"
        else:
            why = "no budget" if budget <= 0 else f"does not fit the {human_bytes(left)} left"
            out.append(
                Choice(
                    name, OFFLOAD, f"{human_bytes(size)} {why} of a {human_bytes(budget)} budget"
                )
            )
            continue
        out.append(Choice(name, RESIDENT, reason))
        left -= size
    return out


MATERIALISE, ZERO3 = "materialise", "zero3"  # ppo.critic_scoring, besides AUTO
_AS_PLACEMENT = {AUTO: AUTO, MATERIALISE: RESIDENT, ZERO3: OFFLOAD}


def critic_scoring(size: int, budget: int, resident: int, requested: str) -> Choice:
    """How the critic computes the rollout's values, by `plan`'s rule: materialise (its `size`
    bytes of full weights in a plain copy for the scoring phase) when asked or, for auto, when
    they fit what the resident frozen models (`resident` bytes) leave of the per-rank `budget`;
    else zero3 (the training engine's forward, gathering every layer per micro-batch)."""
    frozen = [("resident frozen models", resident, RESIDENT)] if resident else []
    models = frozen + [("critic", size, _AS_PLACEMENT[requested])]
    choice = plan(models, budget, {"critic": "ppo.critic_scoring"})[-1]
    how = MATERIALISE if choice.placement == RESIDENT else ZERO3
    return Choice("critic scoring", how, choice.reason)


LOGIT_COPIES = 4  # fp32 (B, T, vocab) tensors alive at once in a scoring forward: the logits,
# the sampling distribution's (temperature, EOS mask), its log-softmax, one spare


def forward_row_bytes(tokens: int, vocab: int) -> int:
    """Bytes one row of a scoring forward holds at its peak: the vocabulary-wide fp32 tensors
    over its `tokens` (prompt + response); the per-layer activations of a no-grad forward are
    freed layer by layer and are far smaller for a language model's vocabulary."""
    return tokens * vocab * 4 * LOGIT_COPIES


def forward_rows(
    requested: int, rows: int, micro: int, row_bytes: int, left: int
) -> tuple[int, str]:
    """Rows per scoring forward of the rollout (ppo.forward_micro_batch_size): as `requested`
    when > 0; for 0 (auto), as many of a rank's `rows` rollout rows as the `left` bytes of the
    per-rank budget hold at `row_bytes` each, never fewer than the training micro-batch `micro`
    (which training holds anyway, with gradients). The same on every rank (the budget is the
    smallest over ranks): an offloaded engine gathers per forward, collectively. Returns the
    rows and the reason."""
    if requested > 0:
        return requested, "asked by ppo.forward_micro_batch_size"
    fit = max(left, 0) // max(row_bytes, 1)  # an over-full budget fits none
    n = max(micro, min(rows, fit))
    if n == rows:
        why = f"all {rows} rollout rows of a rank"
    elif n == micro:
        why = f"the training micro-batch; {fit} rows fit"
    else:
        why = f"{n} of {rows} rollout rows fit"
    left_s = human_bytes(max(left, 0))
    return n, f"auto: {why}; {human_bytes(n * row_bytes)} a forward, {left_s} left of the budget"


def available_ram() -> int:
    """Bytes of RAM available to new allocations: MemAvailable of /proc/meminfo, else free pages."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def memory_budget(local_world_size: int, fraction: float = BUDGET_FRACTION) -> tuple[int, str]:
    """Bytes per rank for resident frozen models, and what they are a share of. On the CPU: a
    `fraction` of the available RAM, shared by the node's ranks; on an accelerator: of this rank's
    free device memory. The smallest over all ranks (every rank must choose alike: an offloaded
    engine is built collectively). Collective."""
    acc = get_accelerator()
    if acc.device_name() == "cpu":
        mine, what = available_ram() * fraction / max(local_world_size, 1), "RAM"
    else:
        mine, what = acc.available_memory() * fraction, f"{acc.device_name()} memory"
    budget = int(min(collectives.all_gather_object(int(mine))))
    return budget, f"{fraction:.0%} of the free {what}"


def model_bytes(module: torch.nn.Module, dtype: torch.dtype | None = None) -> int:
    """Bytes of the parameters (ZeRO-3 partitioned ones at full size), in `dtype` if given."""
    return sum(
        getattr(p, "ds_numel", p.numel()) * (dtype.itemsize if dtype else p.element_size())
        for p in module.parameters()
    )


def resident_bytes(models: Sequence) -> int:
    """Bytes of the parameters of the resident models (plain modules, not engines) in `models`."""
    return sum(model_bytes(m) for m in models if not isinstance(m, deepspeed.DeepSpeedEngine))


def make_resident(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A plain frozen module on this rank's device, its parameters in `dtype`, eval mode, no
    gradients. Buffers keep their dtype: module.to(dtype) would also cast the rotary embedding's
    float32 inv_freq, and a bf16 reference then differed from the policy it copies (iteration-1
    KL 6e-6 nats instead of < 1e-8; the engines and the generation copy keep it in float32)."""
    model = model.to(device=collectives.device())
    for param in model.parameters():
        if param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
    model.requires_grad_(False)
    return model.eval()


def describe(model: torch.nn.Module, name: str) -> str:
    """The banner line of a resident model (engines.describe is an engine's)."""
    n = sum(p.numel() for p in model.parameters())
    first = next(model.parameters())
    return (
        f"{name}: resident plain module (no ZeRO), {first.dtype}, {n / 1e6:.2f}M parameters "
        f"(0 trained), {human_bytes(model_bytes(model))} on {first.device}"
    )
