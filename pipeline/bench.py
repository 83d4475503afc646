"""Benchmark of one PPO iteration on a fixed workload: `deepspeed --num_gpus 2 launch/bench.py`.

All compared figures come from one run. The real figures go through the real stage (`PPOTrainer`
built from model folders written here); each "floor" is the same work done by one plain process
(no DeepSpeed) on rank 0 with the threads of all local ranks, while the other ranks wait at a
barrier. Timings are medians over `repeats` calls after `warmup` calls; where every rank works,
each call counts as long as its slowest rank. Rank 0 prints a markdown table and writes `--json`.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import math
import os
import platform
import random
import resource
import shutil
import sys
import tempfile
from statistics import median  # raises StatisticsError (a ValueError) when empty
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from pipeline import data, estimators, ppo_math
from pipeline.cli import parse_config
from pipeline.distributed import collectives, engines
from pipeline.errors import UserError
from pipeline.generation import hf_generate, naive_generate, position_ids, response_mask
from pipeline.models import load_causal_lm, load_scalar_model, pooling_pad_id, score_index, token_values
from pipeline.monitoring import PhaseTimer, setup_logging
from pipeline.stages.common import StageContext
from pipeline.stages.ppo import PPOTrainer


@dataclass(frozen=True)
class Workload:
    """Shape of all four models (Llama, untied embeddings) and the PPO batch."""

    layers: int = 6
    hidden: int = 384
    intermediate: int = 1024
    heads: int = 6
    vocab: int = 8000
    prompts: int = 16  # per iteration, over all ranks
    prompt_len: int = 32  # tokens, BOS included
    new_tokens: int = 64  # exactly: min_new_tokens = max_new_tokens
    mini_batch: int = 8  # rows per optimizer step, over all ranks
    micro_batch: int = 4  # rows per rank per forward (lowered when a rank's mini-batch is smaller)
    warmup: int = 1
    repeats: int = 5
    matmul_n: int = 2048  # side of the fp32 matrices timed for the machine's matmul FLOP/s


SMOKE = Workload(layers=2, hidden=64, intermediate=128, heads=2, vocab=512, prompts=4, prompt_len=8,
                 new_tokens=8, mini_batch=2, micro_batch=1, warmup=1, repeats=3, matmul_n=256)
TARGETS = {"hybrid/floor generation": ("<=", 1.3), "naive/hybrid generation": (">=", 5.0),
           "iteration/floor": ("<=", 1.5), "RSS after/before generation": ("within", 0.1)}


# ---------------------------------------------------------------- pure parts (tests/unit/test_bench.py)
def body_params(w: Workload) -> int:
    """Weights of the transformer blocks, each used once per position: q, k, v, o (h x h each, as
    many KV heads as heads) and the gated MLP (3 x h x I). Embedding lookups cost no FLOPs."""
    return w.layers * (4 * w.hidden ** 2 + 3 * w.hidden * w.intermediate)


def forward_flops(w: Workload, positions: int, pairs: int, head_positions: int, head_width: int) -> int:
    """FLOPs of one forward of one sequence:

        2 * body_params * positions                  one multiply-add per weight and position
      + 4 * layers * hidden * pairs                  attention QK^T and A.V: a multiply-add each per
                                                     attended (query, key) pair and hidden unit
      + 2 * hidden * head_width * head_positions     output head, vocab wide (LM) or 1 (scalar)
    Norms, softmax, rotary embeddings and optimizer updates are elementwise and not counted.
    """
    return (2 * body_params(w) * positions + 4 * w.layers * w.hidden * pairs
            + 2 * w.hidden * head_width * head_positions)


def iteration_flops(w: Workload, epochs: int = 1) -> dict[str, int]:
    """FLOPs of one PPO iteration on the whole batch, per phase and in total.

    T = prompt_len + new_tokens; a causal pass over n positions attends n(n+1)/2 pairs. Generation
    decodes with a KV cache (T - 1 positions, logits for the new_tokens sampled) and re-reads the
    rollout for pi_old (actor over T); scoring is the reference (LM head) plus critic and reward
    model (scalar heads) over T; training is, per epoch, actor and critic forward + backward over T,
    counted as 3 x the forward.
    """
    T, pairs = w.prompt_len + w.new_tokens, lambda n: n * (n + 1) // 2
    lm = forward_flops(w, T, pairs(T), T, w.vocab)
    scalar = forward_flops(w, T, pairs(T), T, 1)
    decode = forward_flops(w, T - 1, pairs(T - 1), w.new_tokens, w.vocab)
    row = {"generation": decode + lm, "scoring": lm + 2 * scalar, "training": epochs * 3 * (lm + scalar)}
    out = {k: v * w.prompts for k, v in row.items()}
    return {**out, "total": sum(out.values())}


def check(name: str, value: float) -> dict:
    """A compared figure, its target (TARGETS: <=, >= or "within" x of 1) and whether it is met."""
    op, bound = TARGETS[name]
    met = math.isfinite(value) and {"<=": value <= bound, ">=": value >= bound,
                                    "within": abs(value - 1) <= bound}[op]
    target = f"within {bound:.0%} of 1" if op == "within" else f"{op} {bound:g}"
    return {"figure": name, "value": value, "target": target, "met": met}


def _fmt(v: Any) -> str:
    """A table cell: 3 significant digits (exponent from 1e4), lists comma-separated, yes/**no**."""
    if isinstance(v, list):
        return ", ".join(_fmt(x) for x in v)
    if isinstance(v, bool):
        return "yes" if v else "**no**"
    return (f"{v:.3g}" if abs(v) < 1e4 else f"{v:.3e}") if isinstance(v, float) else str(v)


def format_table(results: dict) -> str:
    """Markdown: a line of context (date, machine, versions, ranks), then figure | value | target | met."""
    m = results["machine"]
    lines = [f"Benchmark {results['date']}{' (SMOKE workload)' if results['smoke'] else ''}: {m['platform']}, "
             f"{m['cores']} cores ({m['cpu']}), torch {m['torch']}, deepspeed {m['deepspeed']}, transformers "
             f"{m['transformers']}; {results['world_size']} rank(s) x {results['threads_per_rank']} thread(s)",
             "", "| figure | value | target | met |", "|---|---|---|---|"]
    lines += [f"| {c['figure']} | {_fmt(c['value'])} | {c['target']} | {_fmt(c['met'])} |"
              for c in results["checks"]]
    lines += [f"| {name} | {_fmt(value)} | | |" for name, value in results["figures"].items()]
    return "\n".join(lines)


def write_json(path: str | Path, results: dict) -> None:
    """The results as strict JSON (non-finite numbers become null)."""
    def clean(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return None if isinstance(x, float) and not math.isfinite(x) else x

    Path(path).write_text(json.dumps(clean(results), indent=2, allow_nan=False) + "\n")


# ---------------------------------------------------------------- measuring helpers
def current_rss() -> int:
    """Resident bytes now (not the peak), from /proc/self/statm."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def timed(fn: Callable[[], Any], warmup: int, repeats: int, sync: bool = True) -> list[float]:
    """Wall seconds of `repeats` calls of `fn` after `warmup` calls; `sync`: ranks start each together."""
    out = []
    for i in range(warmup + repeats):
        if sync:
            collectives.barrier()
        start = time.perf_counter()
        fn()
        if i >= warmup:
            out.append(time.perf_counter() - start)
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
    """`fn()` on rank 0 with `threads` threads (restored after); the other ranks wait at a barrier."""
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
    if seq.shape[1] != width + w.new_tokens or response_mask(seq[:, width:], eos).sum() != rows * w.new_tokens:
        raise RuntimeError(f"generation ended early: {tuple(seq.shape)}, wanted {w.new_tokens} new tokens a row")
    return seq


# ---------------------------------------------------------------- the workload as folders, the real stage
def write_fixtures(folder: Path, w: Workload) -> dict[str, str]:
    """Rank 0: a word-level tokenizer (<pad> <s> </s> <unk> w0 w1 ...: `vocab` entries), a policy
    and a scalar (reward/critic) model folder built with seed 0, and `prompts` rows of prompt_len
    tokens (prompt_len - 1 words + BOS) as JSONL. Returns the paths."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(w.vocab - 4)]
    tok = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")
    shape = dict(vocab_size=w.vocab, hidden_size=w.hidden, num_hidden_layers=w.layers, num_attention_heads=w.heads,
                 num_key_value_heads=w.heads, intermediate_size=w.intermediate, pad_token_id=0, bos_token_id=1,
                 eos_token_id=2, max_position_embeddings=w.prompt_len + w.new_tokens, tie_word_embeddings=False)
    paths = {"policy": folder / "policy", "reward": folder / "reward", "prompts": folder / "prompts.jsonl"}
    torch.manual_seed(0)
    with engines.plain_construction():
        for cls, name, extra in ((LlamaForCausalLM, "policy", {}), (LlamaForSequenceClassification, "reward",
                                                                     {"num_labels": 1})):
            cls(LlamaConfig(**shape, **extra)).save_pretrained(paths[name])
            fast.save_pretrained(paths[name])
    rng = random.Random(0)
    rows = [{"prompt": " ".join(rng.choices(words[4:], k=w.prompt_len - 1))} for _ in range(w.prompts)]
    paths["prompts"].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {k: str(v) for k, v in paths.items()}


def build_trainer(folder: Path, paths: dict[str, str], w: Workload, d) -> Any:
    """The real PPO stage's trainer on this workload, configured through `parse_config`."""
    flags = {"output_dir": folder / "run", "seed": 0, "ppo.rollout_batch_size": w.prompts,
             "ppo.mini_batch_size": w.mini_batch, "ppo.num_ppo_epochs": 1,
             "ppo.micro_batch_size_per_gpu": max(1, min(w.micro_batch, w.mini_batch // d.world_size)),
             "ppo.num_iterations": w.warmup + w.repeats, "ppo.min_new_tokens": w.new_tokens,
             "ppo.max_new_tokens": w.new_tokens, "data.max_prompt_len": w.prompt_len,
             "ppo.actor_model_path": paths["policy"], "ppo.reward_model_path": paths["reward"],
             "data.prompt_data_path": paths["prompts"], "data.eval_prompt_data_path": paths["prompts"]}
    cfg = parse_config([s for k, v in flags.items() for s in (f"--{k}", str(v))])
    inputs = {"tokenizer": paths["policy"], "actor": paths["policy"], "reward_model": paths["reward"],
              "prompt_data": paths["prompts"], "eval_prompt_data": paths["prompts"]}
    return PPOTrainer(StageContext(cfg, d, folder / "run" / "ppo", inputs))


def measure(trainer, w: Workload, d) -> dict[str, Any]:
    """Real iterations, then naive and hybrid generation of this rank's prompts; per-rank memory."""
    n, tok, gen, params = trainer.sizes.rollout_per_rank, trainer.tokenizer, trainer.generator, trainer.sampling
    batch, metrics, rss = trainer.prompts[d.rank * n:(d.rank + 1) * n], [], {}

    def iteration() -> None:
        metrics.append(trainer.iteration(len(metrics) + 1, batch))
        if metrics[-1]["rollout/response_length_mean"] != w.new_tokens:
            raise RuntimeError(f"responses ended early: {metrics[-1]['rollout/response_length_mean']} tokens")

    def hybrid() -> None:
        rss["before"] = current_rss()
        with gen.generation_mode():
            full_length(gen.generate(ids, mask, params), ids.shape[1], w, tok.eos_token_id)
            rss["inside"] = current_rss()
        rss["after"] = current_rss()

    walls = timed(iteration, w.warmup, w.repeats)
    runs = metrics[w.warmup:]
    out = {"iteration_s": slowest(walls, d),
           "phases_s": {k[5:]: slowest([r[k] for r in runs], d) for k in runs[0] if k.startswith("time/")}}
    prompts = data.collate_prompts(batch, tok.pad_token_id)
    ids, mask = prompts["input_ids"].to(collectives.device()), prompts["attention_mask"].to(collectives.device())
    naive = timed(lambda: full_length(naive_generate(trainer.actor, tok, ids, mask, params), ids.shape[1], w,
                                      tok.eos_token_id), w.warmup, w.repeats)
    out["naive_s"], out["hybrid_s"] = slowest(naive, d), slowest(timed(hybrid, w.warmup, w.repeats), d)
    shares = [(sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in e.module.parameters()),
               sum(p.ds_numel * p.element_size() for p in e.module.parameters()))
              for e in (trainer.actor, trainer.critic)]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    keys = ("peak", "before_generation", "inside_generation", "after_generation", "actor_partition", "actor_whole",
            "critic_partition", "critic_whole")
    mine = [peak, rss["before"], rss["inside"], rss["after"], *shares[0], *shares[1]]
    out["memory_bytes"] = [dict(zip(keys, map(int, r))) for r in per_rank(mine, d)]
    return out


# ---------------------------------------------------------------- the floor: plain PyTorch, one process
def _logprobs(model, seq: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, width: int, params, eos: int):
    """(response logits, response log-probs) as the stage computes them (of the sampling distribution)."""
    logits = model(input_ids=seq, attention_mask=mask, position_ids=pos).logits[:, width - 1:-1]
    logits = ppo_math.sampling_logits(logits, params.temperature, eos, params.min_new_tokens)
    return logits, ppo_math.logprobs_from_logits(logits, seq[:, width:])


def plain_iteration(m: dict[str, Any], tok, batch: list[dict], p, params, w: Workload,
                    seed: int) -> dict[str, float]:
    """One PPO iteration without DeepSpeed on the whole batch, with the stage's math (`ppo_math`, `estimators`):
    generate, score, KL-shaped rewards, GAE, whitening, `num_ppo_epochs` passes of mini-batches
    with AdamW on actor and critic. Returns seconds per phase."""
    timer, prompts = PhaseTimer(), data.collate_prompts(batch, tok.pad_token_id)
    ids, mask, P = prompts["input_ids"], prompts["attention_mask"], prompts["input_ids"].shape[1]
    with timer("generation"), torch.no_grad():
        torch.manual_seed(seed)
        with timer("sampling"):  # synced_gpus=False: transformers turns it on whenever ZeRO-3 is configured
            seq = full_length(hf_generate(m["actor"], tok, ids, mask, params, synced_gpus=False), P, w,
                              tok.eos_token_id)
        rmask = response_mask(seq[:, P:], tok.eos_token_id)
        full = torch.cat([mask, rmask], dim=1)
        pos = position_ids(full)
        old_lp = _logprobs(m["actor"], seq, full, pos, P, params, tok.eos_token_id)[1] * rmask
    with timer("scoring"), torch.no_grad():
        ref_lp = _logprobs(m["ref"], seq, full, pos, P, params, tok.eos_token_id)[1] * rmask
        old_v = token_values(m["critic"], seq, full, pos)[:, P - 1:-1] * rmask
        index = score_index(seq, full, pooling_pad_id(m["reward"]))
        score = token_values(m["reward"], seq, full, pos).gather(1, index[:, None]).squeeze(1)
    with timer("advantages"):
        kl = ppo_math.kl_estimate(old_lp, ref_lp, p.kl_estimator) * rmask
        rewards = ppo_math.shape_rewards(score, kl, rmask, p.kl_coef, p.score_clip or None)
        adv, ret = estimators.gae_advantages(rewards, old_v, rmask, p.gamma, p.lam)
        adv = ppo_math.masked_whiten(adv, rmask)
    with timer("training"):
        g = torch.Generator().manual_seed(seed)
        for _ in range(p.num_ppo_epochs):
            for i in torch.randperm(len(seq), generator=g).split(p.mini_batch_size):
                s, fm, rm, ps, n = seq[i], full[i], rmask[i], pos[i], rmask[i].sum()
                logits, lp = _logprobs(m["actor"], s, fm, ps, P, params, tok.eos_token_id)
                pg, _ = ppo_math.policy_loss(lp, old_lp[i], adv[i], rm, p.clip_eps, n)
                ent = ppo_math.masked_token_mean_global(ppo_math.entropy_from_logits(logits), rm, n)
                values = token_values(m["critic"], s, fm, ps)[:, P - 1:-1]
                vl, _ = ppo_math.value_loss(values, old_v[i], ret[i], rm, n, p.value_clip or None)
                for name, loss in (("actor", pg - p.entropy_coef * ent), ("critic", p.vf_coef * vl)):
                    m[name + "_opt"].zero_grad(set_to_none=True)
                    loss.backward()
                    if p.gradient_clipping:
                        torch.nn.utils.clip_grad_norm_(m[name].parameters(), p.gradient_clipping)
                    m[name + "_opt"].step()
    return timer.seconds


def floors(paths: dict[str, str], trainer, w: Workload) -> dict[str, Any]:
    """Rank 0 (under `on_rank0`): matmul FLOP/s, and plain iterations of the whole batch (their
    sampling is the generation floor) on unpartitioned models from the same folders, in eval mode
    as in the stage, AdamW configured as the stage's."""
    a, b = torch.randn(w.matmul_n, w.matmul_n), torch.randn(w.matmul_n, w.matmul_n)
    matmul_s = median(timed(lambda: torch.mm(a, b), 1, w.repeats, sync=False))
    p, tok, batch = trainer.p, trainer.tokenizer, trainer.prompts[:w.prompts]
    with engines.plain_construction():
        m = {"actor": load_causal_lm(paths["policy"]), "ref": load_causal_lm(paths["policy"]),
             "critic": load_scalar_model(paths["reward"]), "reward": load_scalar_model(paths["reward"])}
    for name, model in m.items():
        model.eval().requires_grad_(name in ("actor", "critic"))
    for name, lr in (("actor", p.actor_learning_rate), ("critic", p.critic_learning_rate)):
        m[name + "_opt"] = torch.optim.AdamW(m[name].parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    phases: list[dict] = []
    walls = timed(lambda: phases.append(plain_iteration(m, tok, batch, p, trainer.sampling, w, len(phases))),
                  w.warmup, w.repeats, sync=False)
    runs = phases[w.warmup:]
    return {"matmul_flops": 2 * w.matmul_n ** 3 / matmul_s, "iteration_s": median(walls),
            "phases_s": {k: median([r[k] for r in runs]) for k in runs[0]}}


# ---------------------------------------------------------------- report and entry point
def report(real: dict, floor: dict, w: Workload, epochs: int, d, threads: int, smoke: bool) -> dict[str, Any]:
    """All results: the compared figures (`checks`), the rest (`figures`) and the run's context."""
    import transformers

    flops, tokens, mib, mem = iteration_flops(w, epochs), w.prompts * w.new_tokens, 2 ** 20, real["memory_bytes"]
    cpu = [x.split(":", 1)[1].strip() for x in Path("/proc/cpuinfo").read_text().splitlines()
           if x.startswith("model name")]
    after = [r["after_generation"] / r["before_generation"] for r in mem]
    total = threads * d.local_world_size
    figures = {
        f"generation naive s ({w.prompts // d.world_size} prompts a rank, ZeRO-3 generate)": real["naive_s"],
        "generation hybrid s (incl. materialise + free)": real["hybrid_s"],
        f"generation floor s ({w.prompts} prompts, 1 process, {total} threads)": floor["phases_s"]["sampling"],
        "iteration s": real["iteration_s"], **{f"iteration {k} s": v for k, v in real["phases_s"].items()},
        "iteration floor s": floor["iteration_s"],
        **{f"iteration floor {k} s": v for k, v in floor["phases_s"].items()},
        "response tokens/s": tokens / real["iteration_s"],
        "floor response tokens/s": tokens / floor["iteration_s"],
        "FLOPs per iteration": float(flops["total"]), "achieved FLOP/s": flops["total"] / real["iteration_s"],
        "floor achieved FLOP/s": flops["total"] / floor["iteration_s"],
        f"matmul FLOP/s (fp32 torch.mm {w.matmul_n}^2, {total} threads)": floor["matmul_flops"],
        "achieved / matmul": flops["total"] / real["iteration_s"] / floor["matmul_flops"],
        "floor achieved / matmul": flops["total"] / floor["iteration_s"] / floor["matmul_flops"],
        "peak RSS MiB per rank": [r["peak"] / mib for r in mem],
        **{f"RSS MiB before / inside / after generation, rank {i}": [r[k] / mib for k in (
            "before_generation", "inside_generation", "after_generation")] for i, r in enumerate(mem)},
        **{f"{e} param MiB per rank, whole": [r[f"{e}_partition"] / mib for r in mem] + [mem[0][f"{e}_whole"] / mib]
           for e in ("actor", "critic")},
    }
    checks = [check("hybrid/floor generation", real["hybrid_s"] / floor["phases_s"]["sampling"]),
              check("naive/hybrid generation", real["naive_s"] / real["hybrid_s"]),
              check("iteration/floor", real["iteration_s"] / floor["iteration_s"]),
              check("RSS after/before generation", max(after, key=lambda x: abs(x - 1)))]
    machine = {"platform": platform.platform(), "cpu": cpu[0] if cpu else platform.processor(),
               "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
               "deepspeed": importlib.metadata.version("deepspeed"), "transformers": transformers.__version__}
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine, "smoke": smoke,
            "world_size": d.world_size, "threads_per_rank": threads, "floor_threads": total,
            "workload": dataclasses.asdict(w), "flops_per_iteration": flops, "checks": checks, "figures": figures,
            "real": real, "floor": floor}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line; `--local_rank` (added by the deepspeed launcher) is accepted and ignored."""
    parser = argparse.ArgumentParser(
        description="Benchmark one PPO iteration (generation, scoring, training) of the real stage against "
                    "plain single-process floors: `deepspeed --num_gpus 2 launch/bench.py --json bench.json`.")
    parser.add_argument("--json", metavar="PATH", help="also write every figure to this JSON file (rank 0)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny models (2 layers, width 64, vocab 512) and workload (4 prompts of 8 "
                             "tokens, 8 new tokens, 3 repeats): checks in seconds that the benchmark runs; "
                             "its figures mean nothing")
    parser.add_argument("--repeats", type=int, help="measured calls per figure (default: 5, smoke: 3)")
    parser.add_argument("--warmup", type=int, help="unmeasured calls before them (default: 1)")
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict | None:
    """Run the benchmark; rank 0 prints the table, writes `--json` and returns the results."""
    args = parse_args(argv)
    w = SMOKE if args.smoke else Workload()
    w = dataclasses.replace(w, **{k: v for k in ("repeats", "warmup") if (v := getattr(args, k)) is not None})
    d = collectives.init_distributed()
    setup_logging(d.is_main)
    threads = torch.get_num_threads()
    folder = Path(collectives.broadcast_object(tempfile.mkdtemp(prefix="bench-") if d.is_main else None))
    try:
        paths = collectives.broadcast_object(write_fixtures(folder, w) if d.is_main else None)
        trainer = build_trainer(folder, paths, w, d)
        real = measure(trainer, w, d)
        floor = on_rank0(lambda: floors(paths, trainer, w), d, threads * d.local_world_size)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    finally:
        if d.is_main:
            shutil.rmtree(folder, ignore_errors=True)
    if not d.is_main:
        return None
    results = report(real, floor, w, trainer.p.num_ppo_epochs, d, threads, args.smoke)
    print(format_table(results), flush=True)
    if args.json:
        write_json(args.json, results)
    return results
