"""The benchmark's measuring helpers (timing, per-rank figures, materialised and held bytes) and
its floors: one PPO iteration in plain PyTorch (no DeepSpeed) with the stage's math, either in one
process (rank 0 with every thread: `floors`) or data-parallel on every rank
(`data_parallel_floor`); `combined_floor`, the faster of the two.

The pure parts (workload, FLOPs, targets, table) are in bench_lib.py; the real stage, the report
and the command line in bench.py.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import torch

from pipeline import data, ppo_math
from pipeline.distributed import collectives, engines
from pipeline.generation import hf_generate, position_ids, response_mask
from pipeline.models import (
    load_causal_lm,
    load_scalar_model,
    pooling_pad_id,
    score_index,
    token_values,
)
from pipeline.monitoring import PhaseTimer
from pipeline.stages import ppo_core
from pipeline.stages.ppo_types import Experience

from bench_lib import Workload, median


# ---------------------------------------------------------------- measuring helpers
def materialised_bytes(model: torch.nn.Module) -> int:
    """Bytes of `model`'s parameters and buffers that hold memory (not on the meta device)."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors if t.device.type != "meta")


def optimizer_state_bytes(engine) -> int:
    """Bytes of a trained ZeRO-3 engine's optimizer state on this rank: its fp32 master partition
    and the optimizer's per-parameter state (Adam's two moments), each ~1/world of the model's."""
    zero = engine.optimizer
    tensors = [*getattr(zero, "fp32_partitioned_groups_flat", [])]
    tensors += [
        t for state in zero.optimizer.state.values() for t in state.values() if torch.is_tensor(t)
    ]
    return sum(t.numel() * t.element_size() for t in tensors)


def placement_of(model) -> str:
    return "offload" if hasattr(model, "module") else "resident"


def held_bytes(model) -> int:
    """Parameter bytes a frozen model holds on this rank: its ZeRO-3 partition (offloaded), or the
    whole model (resident)."""
    if hasattr(model, "module"):
        return sum(
            p.ds_tensor.numel() * p.ds_tensor.element_size() for p in model.module.parameters()
        )
    return sum(p.numel() * p.element_size() for p in model.parameters())


def timed(fn: Callable[[], Any], warmup: int, repeats: int, sync: bool = True) -> list[float]:
    """Wall seconds of `repeats` calls of `fn` after `warmup` calls; `sync`: ranks start each
    together."""
    out = []
    for i in range(warmup + repeats):
        if sync:
            collectives.barrier()
        start = time.perf_counter()
        fn()
        if i >= warmup:
            out.append(time.perf_counter() - start)
    return out


def interleaved(
    calls: dict[str, Callable[[], Any]], warmup: int, repeats: int
) -> dict[str, list[float]]:
    """Wall seconds of each of `calls`, taken in turn (a, b, c, a, b, c, ...) `warmup` unmeasured
    then `repeats` measured times, ranks starting each call together: a drift of the machine's
    speed (this project's host moves by a third within minutes) falls on all of them alike instead
    of on whichever ran last."""
    out: dict[str, list[float]] = {name: [] for name in calls}
    for i in range(warmup + repeats):
        for name, fn in calls.items():
            collectives.barrier()
            start = time.perf_counter()
            fn()
            if i >= warmup:
                out[name].append(time.perf_counter() - start)
    return out


def per_rank(values: Sequence[float], d) -> list[list[float]]:
    """Every rank's `values` (same length everywhere), indexed [rank][i]."""
    box = torch.zeros(d.world_size, len(values), dtype=torch.float64)
    box[d.rank] = torch.tensor([float(v) for v in values], dtype=torch.float64)
    return collectives.all_reduce_sum(box).cpu().tolist()


def slowest(values: Sequence[float], d) -> float:
    """Median over calls of the slowest rank's seconds."""
    return median([max(call) for call in zip(*per_rank(values, d))])


def on_rank0(fn: Callable[[], Any], d, threads: int) -> Any:
    """`fn()` on rank 0 with `threads` threads (restored after); the other ranks wait at a
    barrier."""
    before, result = torch.get_num_threads(), None
    try:
        if d.is_main:
            torch.set_num_threads(threads)
            result = fn()
    finally:
        torch.set_num_threads(before)
        collectives.barrier()
    return result


def full_length(seq: torch.Tensor, width: int, w: Workload, eos: int) -> torch.Tensor:
    """`seq`; raises unless every row has exactly `new_tokens` response tokens (no early end)."""
    rows = seq.shape[0]
    if (
        seq.shape[1] != width + w.new_tokens
        or response_mask(seq[:, width:], eos).sum() != rows * w.new_tokens
    ):
        raise RuntimeError(
            f"generation ended early: {tuple(seq.shape)}, wanted {w.new_tokens} new tokens a row"
        )
    return seq


# ------------------------------------------------ the floor: plain PyTorch, one process
def _logprobs(
    model, seq: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, width: int, params, eos: int
):
    """(response logits, response log-probs) as the stage computes them (of the sampling
    distribution)."""
    logits = model(input_ids=seq, attention_mask=mask, position_ids=pos).logits[:, width - 1 : -1]
    logits = ppo_math.sampling_logits(logits, params.temperature, eos, params.min_new_tokens)
    return logits, ppo_math.logprobs_from_logits(logits, seq[:, width:])


def plain_iteration(
    m: dict[str, Any],
    tok,
    batch: list[dict],
    cfg,
    params,
    w: Workload,
    seed: int,
    mini: int = 0,
    data_parallel: bool = False,
    micro: int = 0,
) -> dict[str, float]:
    """One PPO iteration without DeepSpeed, with the stage's own pure parts (`ppo_core`: rewards,
    advantages of ppo.advantage_mode, the actor loss with ppo.loss_agg; `ppo_math`'s value loss):
    generate, score, KL-shaped rewards, advantages, whitening, `num_ppo_epochs` passes of
    mini-batches (`mini` rows a process, default ppo.mini_batch_size) with AdamW on actor and
    critic, each forward and backward on `micro` rows with the gradients accumulated as the stage
    does (0: the whole mini-batch at once). `data_parallel`: this process holds its share of the
    batch, and token counts, whitening and gradients are summed over every rank as the stage's
    are (collectives). PyTorch's own linear layers throughout (a plain process has no zero.Init to
    replace them). Returns seconds per phase."""
    with engines.native_linear():
        return _plain_iteration(m, tok, batch, cfg, params, w, seed, mini, data_parallel, micro)


def _plain_iteration(m, tok, batch, cfg, params, w, seed, mini, dp, micro) -> dict[str, float]:
    p, timer = cfg.ppo, PhaseTimer()
    prompts = data.collate_prompts(batch, tok.pad_token_id)
    ids, mask, P = prompts["input_ids"], prompts["attention_mask"], prompts["input_ids"].shape[1]
    total = collectives.all_reduce_sum if dp else (lambda x: x)
    with timer("generation"), torch.no_grad():
        torch.manual_seed(seed)
        with timer(
            "sampling"
        ):  # synced_gpus=False: transformers turns it on whenever ZeRO-3 is configured
            seq = full_length(
                hf_generate(m["actor"], tok, ids, mask, params, synced_gpus=False),
                P,
                w,
                tok.eos_token_id,
            )
        rmask = response_mask(seq[:, P:], tok.eos_token_id)
        full = torch.cat([mask, rmask], dim=1)
        pos = position_ids(full)
        old_lp = _logprobs(m["actor"], seq, full, pos, P, params, tok.eos_token_id)[1] * rmask
    with timer("scoring"), torch.no_grad():
        ref_lp = _logprobs(m["ref"], seq, full, pos, P, params, tok.eos_token_id)[1] * rmask
        values = token_values(m["critic"], seq, full, pos)
        old_v, prompt_v = values[:, P - 1 : -1] * rmask, values[:, P - 1]
        index = score_index(seq, full, pooling_pad_id(m["reward"]))
        score = token_values(m["reward"], seq, full, pos).gather(1, index[:, None]).squeeze(1)
    with timer("advantages"):
        exp = Experience(
            seq, full, rmask, old_lp, P, [], ref_logprobs=ref_lp, old_values=old_v,
            prompt_values=prompt_v, group_ids=torch.arange(len(seq), device=seq.device),
        )  # fmt: skip
        whiten = collectives.global_whiten if dp else ppo_math.masked_whiten
        _, adv, ret = ppo_core.rewards_and_advantages(p, exp, score, p.kl_coef, 0.0, whiten)
    with timer("training"):
        g = torch.Generator().manual_seed(seed)
        for _ in range(p.num_ppo_epochs):
            for i in torch.randperm(len(seq), generator=g).split(mini or p.mini_batch_size):
                n = total(rmask[i].sum().float()).clamp(min=1)  # the mini-batch's tokens
                agg = ppo_core.loss_aggregation(p, n, cfg.data.max_response_len)
                for name in ("actor", "critic"):
                    m[name + "_opt"].zero_grad(set_to_none=True)
                for j in i.split(micro or len(i)):  # the stage's micro-batches (accumulated)
                    s, fm, rm, ps = seq[j], full[j], rmask[j], pos[j]
                    logits, lp = _logprobs(m["actor"], s, fm, ps, P, params, tok.eos_token_id)
                    loss, _ = ppo_core.actor_loss(
                        p, logits, lp, old_lp[j], adv[j], rm, agg, ref_lp[j], p.kl_coef
                    )
                    values = token_values(m["critic"], s, fm, ps)[:, P - 1 : -1]
                    vl, _ = ppo_math.value_loss(
                        values, old_v[j], ret[j], rm, n, p.value_clip or None
                    )
                    loss.backward()
                    (p.vf_coef * vl).backward()
                for name in ("actor", "critic"):
                    if dp:
                        sum_gradients(m[name])
                    if p.gradient_clipping:
                        torch.nn.utils.clip_grad_norm_(m[name].parameters(), p.gradient_clipping)
                    m[name + "_opt"].step()
    return timer.seconds


def micro_rows(trainer) -> int:
    """Rows per forward and backward: the real stage's micro-batch (the workload's memory bound,
    which a plain process of one rank's threads must keep too)."""
    return trainer.sizes.micro_batch_size_per_gpu


def plain_models(paths: dict[str, str], p) -> dict[str, Any]:
    """Unpartitioned models from the benchmark's folders, in eval mode as in the stage, actor and
    critic with AdamW configured as the stage's."""
    with engines.plain_construction():
        m = {
            "actor": load_causal_lm(paths["policy"]),
            "ref": load_causal_lm(paths["policy"]),
            "critic": load_scalar_model(paths["reward"]),
            "reward": load_scalar_model(paths["reward"]),
        }
    for name, model in m.items():
        model.eval().requires_grad_(name in ("actor", "critic"))
    for name, lr in (("actor", p.actor_learning_rate), ("critic", p.critic_learning_rate)):
        m[name + "_opt"] = torch.optim.AdamW(
            m[name].parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0
        )
    return m


def matmul_flops(w: Workload) -> float:
    """The machine's fp32 matmul FLOP/s with this process's threads (median of `repeats`)."""
    a, b = torch.randn(w.matmul_n, w.matmul_n), torch.randn(w.matmul_n, w.matmul_n)
    return 2 * w.matmul_n**3 / median(timed(lambda: torch.mm(a, b), 1, w.repeats, sync=False))


def one_process_floor(paths: dict[str, str], trainer, w: Workload, d, threads: int):
    """Plain iterations of the whole batch in one process: rank 0 with `threads` threads (the
    other ranks wait at a barrier), on unpartitioned models. Returns the call (one iteration;
    its sampling is this floor's generation) and the per-call phase seconds it appends to (rank
    0's; empty elsewhere)."""
    p, tok, batch = trainer.p, trainer.tokenizer, trainer.prompts[: w.prompts]
    m = on_rank0(lambda: plain_models(paths, p), d, threads)
    phases: list[dict] = []

    def call() -> None:
        step = len(phases)
        on_rank0(
            lambda: phases.append(
                plain_iteration(
                    m, tok, batch, trainer.cfg, trainer.sampling, w, step, micro=micro_rows(trainer)
                )
            ),
            d,
            threads,
        )

    return call, phases


def sum_gradients(model: torch.nn.Module) -> None:
    """Data parallelism by hand: every gradient summed over the ranks in one all-reduce (the
    losses are over the global mini-batch's counts, so the sum is the mini-batch's gradient)."""
    grads = [q.grad for q in model.parameters() if q.grad is not None]
    flat = collectives.all_reduce_sum(torch.cat([g.flatten() for g in grads]))
    for g, part in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(part.view_as(g))


def data_parallel_floor(paths: dict[str, str], trainer, w: Workload, d):
    """Every rank (its own threads): plain iterations of its share of the batch on unpartitioned
    models, each optimizer step on its share of the mini-batch with gradients summed over ranks
    (DDP's work, without DDP's overlap). Returns the call and the per-call phase seconds it
    appends to (this rank's)."""
    p, tok, n = trainer.p, trainer.tokenizer, w.prompts // d.world_size
    batch = trainer.prompts[d.rank * n : (d.rank + 1) * n]
    m = plain_models(paths, p)
    phases: list[dict] = []
    mini = p.mini_batch_size // d.world_size

    def call() -> None:
        phases.append(
            plain_iteration(
                m,
                tok,
                batch,
                trainer.cfg,
                trainer.sampling,
                w,
                len(phases),
                mini,
                True,
                micro_rows(trainer),
            )
        )

    return call, phases


def floor_figures(walls: list[float], phases: list[dict], warmup: int, d, one: bool) -> dict:
    """A floor's median iteration and phase seconds from its interleaved calls: rank 0's for the
    one-process floor (`one`), else each call's slowest rank."""
    runs = phases[warmup:]
    if one:
        return collectives.broadcast_object(
            {
                "iteration_s": median(walls),
                "phases_s": {k: median([r[k] for r in runs]) for k in runs[0]},
            }
            if d.is_main
            else None
        )
    return {
        "iteration_s": slowest(walls, d),
        "phases_s": {k: slowest([r[k] for r in runs], d) for k in runs[0]},
    }


def combined_floor(one: dict, dp: dict, flops: float) -> dict[str, Any]:
    """The floor: per figure, the faster of the one-process and the data-parallel plain runs;
    `flops` the machine's matmul FLOP/s."""
    return {
        "iteration_s": min(one["iteration_s"], dp["iteration_s"]),
        "phases_s": {k: min(v, dp["phases_s"][k]) for k, v in one["phases_s"].items()},
        "matmul_flops": flops,
        "one_process": one,
        "data_parallel": dp,
    }
