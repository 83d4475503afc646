"""The PPO stage's frozen models: the reference (a copy of the initial policy) and the reward
models (one, or every ensemble member), each placed by the memory plan.

`frozen_specs` reads what the plan and the checks need without building any weights (each model's
config and its parameter bytes, from a meta-device copy) and checks the vocabularies, before the
stage folder is rewritten; `build_frozen`, called once the training engines exist, takes the
per-rank budget (for `auto`: ppo.memory_budget_gb, or measured), chooses each model's placement
(pipeline/distributed/placement.py: `plan`), logs it once per model, and builds the model: resident
(a plain module on the device) or offload (a ZeRO-3 inference engine with parameter offload).
`critic_scoring` puts the trained critic's scoring through the same plan (what the resident models
leave of the budget). Frozen models are not checkpointed: they are rebuilt from their folders. Not
here: the trained models and engines (ppo_setup.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from pipeline.config import max_new_tokens
from pipeline.distributed import engines, placement
from pipeline.models import (
    TORCH_DTYPES,
    check_vocab,
    load_causal_lm,
    load_scalar_model,
    pooling_pad_id,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FrozenSpec:
    """One frozen model, before it is built."""

    name: str  # "ref", "reward", or "reward 0", "reward 1", ... of an ensemble
    path: str
    scalar: bool  # a reward model (scalar head); else the reference causal LM
    option: str  # the option that chooses its placement
    requested: str  # that option's value: auto, resident or offload
    num_params: int
    pad_id: int | None  # reward models: the pad id HF's sequence classifier pools by


def frozen_specs(ctx, inputs) -> list[FrozenSpec]:
    """The reference and reward models' specs, vocabularies checked (no weights are read)."""
    m, p = ctx.cfg.model, ctx.cfg.ppo
    k = len(inputs.reward_paths)
    out = [_spec("ref", ctx.inputs["actor"], False, "ppo.ref_placement", p.ref_placement, m)[0]]
    for i, path in enumerate(inputs.reward_paths):
        name = "reward" if k == 1 else f"reward {i}"
        spec, meta = _spec(name, path, True, "ppo.reward_placement", p.reward_placement, m)
        check_vocab(meta, inputs.reward_tokenizer, f"reward model {path}")
        out.append(spec)
    return out


def _spec(name, path, scalar, option, requested, m) -> tuple[FrozenSpec, torch.nn.Module]:
    """The spec of one frozen model and a copy of it on the meta device (no memory, no weights)."""
    with engines.plain_construction(), torch.device("meta"):
        meta = _load(path, scalar, m, meta=True)
    n = sum(x.numel() for x in meta.parameters())
    return FrozenSpec(
        name, path, scalar, option, requested, n, pooling_pad_id(meta) if scalar else None
    ), meta


def _load(path: str, scalar: bool, m, meta: bool = False):
    if meta:  # the architecture alone, from config.json
        from transformers import (
            AutoConfig,
            AutoModelForCausalLM,
            AutoModelForSequenceClassification,
        )

        extra = {"num_labels": 1} if scalar else {}
        config = AutoConfig.from_pretrained(path, trust_remote_code=m.trust_remote_code, **extra)
        cls = AutoModelForSequenceClassification if scalar else AutoModelForCausalLM
        return cls.from_config(
            config, trust_remote_code=m.trust_remote_code, dtype=TORCH_DTYPES[m.dtype]
        )
    loader = load_scalar_model if scalar else load_causal_lm
    return loader(path, m.trust_remote_code, m.dtype)


def placement_budget(ctx) -> int:
    """The per-rank budget of the memory plan, logged: ppo.memory_budget_gb GiB when given (the
    same config on every rank, so no collective), else measured (placement.memory_budget,
    collective)."""
    gb = ctx.cfg.ppo.memory_budget_gb
    if gb > 0:
        budget, what = int(gb * 2**30), f"ppo.memory_budget_gb={gb:g}"
    else:
        budget, what = placement.memory_budget(ctx.dist.local_world_size)
    log.info("placement budget: %s per rank (%s)", placement.human_bytes(budget), what)
    return budget


def build_frozen(
    ctx, specs: list[FrozenSpec], ds: dict, dtype: torch.dtype, budget: int | None = None
) -> list:
    """Every frozen model placed and built (the reference first, then the reward models), in
    `dtype` (the training engines'); each placement logged once. `budget`: the plan's per-rank
    bytes (None: measured here when a model asks for auto). Collective (the budget, and
    building an offloaded engine)."""
    m = ctx.cfg.model
    sized = [(s.name, s.num_params * dtype.itemsize, s.requested) for s in specs]
    if budget is None:
        auto = any(s.requested == placement.AUTO for s in specs)
        budget = placement_budget(ctx) if auto else 0
    choices = placement.plan(sized, budget, {s.name: s.option for s in specs})
    models = []
    for spec, choice in zip(specs, choices):
        log.info("%s", choice.line())
        if choice.placement == placement.RESIDENT:
            with engines.plain_construction():
                model = _load(spec.path, spec.scalar, m)
            model = placement.make_resident(model, dtype)
            log.info("engine %s", placement.describe(model, spec.name))
        else:
            with engines.zero3_construction(ds["inference"]):
                model = _load(spec.path, spec.scalar, m)
            model = engines.inference_engine(model, ds["inference"])
            log.info("engine %s", engines.describe(model, spec.name))
        models.append(model)
    return models


def critic_scoring(requested: str, critic, frozen: list, budget: int) -> placement.Choice:
    """How the critic engine computes the rollout's values (ppo.critic_scoring: placement's
    `critic_scoring`, the resident `frozen` models taking from `budget` first), logged once."""
    resident = placement.resident_bytes(frozen)
    size = placement.model_bytes(critic.module, engines.model_dtype(critic))
    choice = placement.critic_scoring(size, budget, resident, requested)
    log.info("critic scoring: %s (%s)", choice.placement, choice.reason)
    return choice


def scoring_rows(ctx, sizes, actor, left: int) -> int:
    """Rows per scoring forward of the rollout (placement.forward_rows for
    ppo.forward_micro_batch_size; `left`: what the resident models leave of the budget), logged
    once."""
    cfg = ctx.cfg
    tokens = cfg.data.max_prompt_len + max_new_tokens(cfg)
    row_bytes = placement.forward_row_bytes(tokens, actor.module.config.vocab_size)
    rows, reason = placement.forward_rows(
        cfg.ppo.forward_micro_batch_size,
        sizes.rollout_per_rank,
        sizes.micro_batch_size_per_gpu,
        row_bytes,
        left,
    )
    log.info("scoring forward: %d rows (%s)", rows, reason)
    return rows
