"""Benchmark of one PPO iteration on a fixed workload: `deepspeed --num_gpus 2 launch/bench.py
--json bench.json` (`--smoke` for a tiny check run, `--help`). `--workload large
--memory_budget_gb G` runs ~4x the default's parameters per model (bench_lib.LARGE) with the
memory plan's per-rank budget fixed at G GiB (ppo.memory_budget_gb; 0: measured); the report
records the workload, the budget and the plan's choices (placements, critic scoring, rows per
scoring forward).

All compared figures come from one run. The real figures go through the real stage (`PPOTrainer`
built from model folders written here); each "floor" is the same work in plain PyTorch (no
DeepSpeed), the faster of two runs: one process on rank 0 with the threads of all local ranks
(the other ranks wait at a barrier), and every rank on its share with its own threads, gradients
averaged over ranks (data parallel); both are reported. The real iteration and the two floors'
are taken in turn (real, one process, data parallel, real, ...), so that a drift of the machine's
speed falls on all three alike. Timings are medians over `repeats` calls after `warmup` calls;
where every rank works, each call counts as long as its slowest rank. Rank 0 prints a markdown
table and writes `--json`.

Here: the workload as folders, the real stage's measurement, the report and the command line. The
pure parts (workload shape, FLOPs, targets, table, JSON) are in bench_lib.py; the measuring
helpers and the plain-PyTorch floors in bench_floor.py. Like a user script, it uses only the
pipeline's modules.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import os
import platform
import random
import resource
import shutil
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from pipeline import data
from pipeline.cli import parse_config
from pipeline.distributed import collectives, engines
from pipeline.errors import UserError
from pipeline.generation import naive_generate
from pipeline.monitoring import setup_logging
from pipeline.stages.common import StageContext
from pipeline.stages.ppo import PPOTrainer

from bench_floor import (
    combined_floor,
    data_parallel_floor,
    floor_figures,
    full_length,
    held_bytes,
    interleaved,
    materialised_bytes,
    matmul_flops,
    on_rank0,
    one_process_floor,
    optimizer_state_bytes,
    per_rank,
    placement_of,
    slowest,
    timed,
)
from bench_lib import (
    SMOKE,
    WORKLOADS,
    Workload,
    check,
    format_table,
    iteration_flops,
    model_shape,
    write_json,
)


# ------------------------------------------------ the workload as folders, the real stage
def write_fixtures(folder: Path, w: Workload) -> dict[str, str]:
    """Rank 0: a word-level tokenizer (<pad> <s> </s> <unk> w0 w1 ...: `vocab` entries), a policy
    and a scalar (reward/critic) model folder built with seed 0, and `prompts` rows of prompt_len
    tokens (prompt_len - 1 words + BOS) as JSONL. Returns the paths."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        LlamaForSequenceClassification,
        PreTrainedTokenizerFast,
    )

    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(w.vocab - 4)]
    tok = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )
    shape = dict(
        model_shape(w),
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        max_position_embeddings=w.prompt_len + w.new_tokens,
    )
    paths = {
        "policy": folder / "policy",
        "reward": folder / "reward",
        "prompts": folder / "prompts.jsonl",
    }
    torch.manual_seed(0)
    with engines.plain_construction():
        for cls, name, extra in (
            (LlamaForCausalLM, "policy", {}),
            (LlamaForSequenceClassification, "reward", {"num_labels": 1}),
        ):
            cls(LlamaConfig(**shape, **extra)).save_pretrained(paths[name])
            fast.save_pretrained(paths[name])
    rng = random.Random(0)
    rows = [
        {"prompt": " ".join(rng.choices(words[4:], k=w.prompt_len - 1))} for _ in range(w.prompts)
    ]
    paths["prompts"].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {k: str(v) for k, v in paths.items()}


def build_trainer(
    folder: Path,
    paths: dict[str, str],
    w: Workload,
    d,
    placement: str = "auto",
    critic_scoring: str = "auto",
    memory_budget_gb: float = 0.0,
) -> Any:
    """The real PPO stage's trainer on this workload, configured through `parse_config`;
    `placement` of the reference and reward model (ppo.ref_placement, ppo.reward_placement),
    `critic_scoring` the critic's (ppo.critic_scoring), `memory_budget_gb` the memory plan's
    per-rank budget (ppo.memory_budget_gb; 0: measured)."""
    flags = {
        "output_dir": folder / "run",
        "seed": 0,
        "ppo.rollout_batch_size": w.prompts,
        "ppo.mini_batch_size": w.mini_batch,
        "ppo.num_ppo_epochs": 1,
        "ppo.micro_batch_size_per_gpu": max(1, min(w.micro_batch, w.mini_batch // d.world_size)),
        "ppo.num_iterations": 2 * w.warmup + w.repeats,
        "ppo.min_new_tokens": w.new_tokens,
        "ppo.max_new_tokens": w.new_tokens,
        "data.max_prompt_len": w.prompt_len,
        "ppo.actor_model_path": paths["policy"],
        "ppo.reward_model_path": paths["reward"],
        "data.prompt_data_path": paths["prompts"],
        "data.eval_prompt_data_path": paths["prompts"],
        "ppo.ref_placement": placement,
        "ppo.reward_placement": placement,
        "ppo.critic_scoring": critic_scoring,
        "ppo.memory_budget_gb": memory_budget_gb,
    }
    cfg = parse_config([s for k, v in flags.items() for s in (f"--{k}", str(v))])
    inputs = {
        "tokenizer": paths["policy"],
        "actor": paths["policy"],
        "reward_model": paths["reward"],
        "prompt_data": paths["prompts"],
        "eval_prompt_data": paths["prompts"],
    }
    return PPOTrainer(StageContext(cfg, d, folder / "run" / "ppo", inputs))


def real_iteration(trainer, w: Workload, d):
    """One real PPO iteration on this rank's prompts, as a call, and the metrics it appends to."""
    n = trainer.sizes.rollout_per_rank
    batch, metrics = trainer.prompts[d.rank * n : (d.rank + 1) * n], []

    def call() -> None:
        metrics.append(trainer.iteration(len(metrics) + 1, batch))
        if metrics[-1]["rollout/response_length_mean"] != w.new_tokens:
            raise RuntimeError(
                f"responses ended early: {metrics[-1]['rollout/response_length_mean']} tokens"
            )

    return call, metrics


def generation_and_memory(trainer, w: Workload, d) -> dict[str, Any]:
    """Naive and hybrid generation of this rank's prompts; per-rank memory (after the real
    stage's warm-up iterations, before any floor model exists)."""
    n, tok, gen, params = (
        trainer.sizes.rollout_per_rank,
        trainer.tokenizer,
        trainer.generator,
        trainer.sampling,
    )
    batch, held = trainer.prompts[d.rank * n : (d.rank + 1) * n], {}

    def hybrid() -> None:  # the materialised copy's bytes inside the phase, and left after it
        with gen.generation_mode():
            full_length(gen.generate(ids, mask, params), ids.shape[1], w, tok.eos_token_id)
            held["inside"] = materialised_bytes(gen.model)
        held["after"] = materialised_bytes(gen.model)

    out: dict[str, Any] = {}
    prompts = data.collate_prompts(batch, tok.pad_token_id)
    ids, mask = (
        prompts["input_ids"].to(collectives.device()),
        prompts["attention_mask"].to(collectives.device()),
    )
    naive = timed(
        lambda: full_length(
            naive_generate(trainer.actor, tok, ids, mask, params), ids.shape[1], w, tok.eos_token_id
        ),
        w.warmup,
        w.repeats,
    )
    out["naive_s"], out["hybrid_s"] = (
        slowest(naive, d),
        slowest(timed(hybrid, w.warmup, w.repeats), d),
    )
    shares = [
        (
            held_bytes(e),  # the ZeRO-3 partition
            sum(p.ds_numel * p.element_size() for p in e.module.parameters()),
            optimizer_state_bytes(e),
        )
        for e in (trainer.actor, trainer.critic)
    ]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    frozen = [("ref", trainer.ref), *(("reward", r) for r in trainer.rewards)]
    keys = (
        "peak",
        "materialised_inside_generation",
        "materialised_after_generation",
        "actor_partition",
        "actor_whole",
        "actor_optimizer_state",
        "critic_partition",
        "critic_whole",
        "critic_optimizer_state",
        *(f"{name}_held" for name, _ in frozen),
    )
    mine = [peak, held["inside"], held["after"], *shares[0], *shares[1]]
    mine += [held_bytes(m) for _, m in frozen]
    out["memory_bytes"] = [dict(zip(keys, map(int, r))) for r in per_rank(mine, d)]
    out["placements"] = {name: placement_of(m) for name, m in frozen}
    out["critic_scoring"] = "zero3" if trainer.critic_copy is None else "materialise"
    out["forward_rows"] = trainer.forward_rows
    return out


def measure(paths: dict[str, str], trainer, w: Workload, d, threads: int) -> tuple[dict, dict]:
    """(real, floor): the real stage's warm-up iterations, its generation and memory figures,
    then real iterations, one-process floor iterations (rank 0 with `threads`) and data-parallel
    floor iterations taken in turn (`interleaved`)."""
    real_call, metrics = real_iteration(trainer, w, d)
    for _ in range(w.warmup):
        real_call()
    real = generation_and_memory(trainer, w, d)
    flops = collectives.broadcast_object(on_rank0(lambda: matmul_flops(w), d, threads))
    one_call, one_phases = one_process_floor(paths, trainer, w, d, threads)
    dp_call, dp_phases = data_parallel_floor(paths, trainer, w, d)
    walls = interleaved(
        {"real": real_call, "one process": one_call, "data parallel": dp_call},
        w.warmup,
        w.repeats,
    )
    runs = metrics[2 * w.warmup :]  # the warm-ups before the memory figures and in the turns
    real["iteration_s"] = slowest(walls["real"], d)
    real["phases_s"] = {
        k[5:]: slowest([r[k] for r in runs], d) for k in runs[0] if k.startswith("time/")
    }
    one = floor_figures(walls["one process"], one_phases, w.warmup, d, one=True)
    dp = floor_figures(walls["data parallel"], dp_phases, w.warmup, d, one=False)
    return real, combined_floor(one, dp, flops)


# ---------------------------------------------------------------- report and entry point
def report(
    real: dict,
    floor: dict,
    w: Workload,
    epochs: int,
    d,
    threads: int,
    smoke: bool,
    workload: str = "default",
    memory_budget_gb: float = 0.0,
) -> dict[str, Any]:
    """All results: the compared figures (`checks`), the rest (`figures`) and the run's context,
    with the `workload` name (--workload) and the memory plan's budget given
    (`memory_budget_gb`, 0: measured) and choices."""
    import transformers

    flops, tokens, mib, mem = (
        iteration_flops(w, epochs),
        w.prompts * w.new_tokens,
        2**20,
        real["memory_bytes"],
    )
    cpu = [
        x.split(":", 1)[1].strip()
        for x in Path("/proc/cpuinfo").read_text().splitlines()
        if x.startswith("model name")
    ]
    one, dp = floor["one_process"], floor["data_parallel"]
    total = threads * d.local_world_size
    figures = {
        f"generation naive s ({w.prompts // d.world_size} prompts a rank, ZeRO-3 generate)": real[
            "naive_s"
        ],
        "generation hybrid s (incl. materialise + free)": real["hybrid_s"],
        "generation floor s (the faster below)": floor["phases_s"]["sampling"],
        f"generation floor s ({w.prompts} prompts, 1 process x {total} threads)": one["phases_s"][
            "sampling"
        ],
        f"generation floor s ({w.prompts // d.world_size} prompts a rank, {d.world_size} processes"
        f" x {threads} threads)": dp["phases_s"]["sampling"],
        "iteration s": real["iteration_s"],
        **{f"iteration {k} s": v for k, v in real["phases_s"].items()},
        "iteration floor s": floor["iteration_s"],
        **{f"iteration floor {k} s": v for k, v in floor["phases_s"].items()},
        f"iteration floor s, 1 process x {total} threads": one["iteration_s"],
        **{f"iteration floor {k} s, 1 process": v for k, v in one["phases_s"].items()},
        f"iteration floor s, {d.world_size} processes x {threads} threads": dp["iteration_s"],
        **{
            f"iteration floor {k} s, {d.world_size} processes": v for k, v in dp["phases_s"].items()
        },
        "response tokens/s": tokens / real["iteration_s"],
        "floor response tokens/s": tokens / floor["iteration_s"],
        "FLOPs per iteration": float(flops["total"]),
        "achieved FLOP/s": flops["total"] / real["iteration_s"],
        "floor achieved FLOP/s": flops["total"] / floor["iteration_s"],
        f"matmul FLOP/s (fp32 torch.mm {w.matmul_n}^2, {total} threads)": floor["matmul_flops"],
        "achieved / matmul": flops["total"] / real["iteration_s"] / floor["matmul_flops"],
        "floor achieved / matmul": flops["total"] / floor["iteration_s"] / floor["matmul_flops"],
        "peak RSS MiB per rank": [r["peak"] / mib for r in mem],
        "materialised actor MiB inside generation per rank": [
            r["materialised_inside_generation"] / mib for r in mem
        ],
        **{
            f"{name} ({how}) param MiB held per rank": [r[f"{name}_held"] / mib for r in mem]
            for name, how in real["placements"].items()
        },
        **{
            f"{e} param MiB per rank, whole": [r[f"{e}_partition"] / mib for r in mem]
            + [mem[0][f"{e}_whole"] / mib]
            for e in ("actor", "critic")
        },
        **{
            f"{e} optimizer state MiB per rank (fp32 master + Adam moments)": [
                r[f"{e}_optimizer_state"] / mib for r in mem
            ]
            for e in ("actor", "critic")
        },
        "memory plan budget GiB per rank (0: measured)": float(memory_budget_gb),
        **{f"placement {name}": how for name, how in real["placements"].items()},
        "critic scoring": real["critic_scoring"],
        "scoring forward rows per rank": real["forward_rows"],
    }
    checks = [
        check("hybrid/floor generation", real["hybrid_s"] / floor["phases_s"]["sampling"]),
        check("naive/hybrid generation", real["naive_s"] / real["hybrid_s"]),
        check("iteration/floor", real["iteration_s"] / floor["iteration_s"]),
        *(
            check(name, real["phases_s"][phase] / floor["phases_s"][phase])
            for name, phase in (
                ("generation incl. pi_old/floor", "generation"),
                ("scoring/floor", "scoring"),
                ("training/floor", "training"),
            )
        ),
        check(
            "materialised bytes after generation",
            max(r["materialised_after_generation"] for r in mem),
        ),
    ]
    machine = {
        "platform": platform.platform(),
        "cpu": cpu[0] if cpu else platform.processor(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "deepspeed": importlib.metadata.version("deepspeed"),
        "transformers": transformers.__version__,
    }
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine,
        "smoke": smoke,
        "workload_name": "smoke" if smoke else workload,
        "memory_budget_gb": memory_budget_gb,
        "world_size": d.world_size,
        "threads_per_rank": threads,
        "floor_threads": total,
        "workload": dataclasses.asdict(w),
        "flops_per_iteration": flops,
        "checks": checks,
        "figures": figures,
        "real": real,
        "floor": floor,
        "placements": real["placements"],
        "critic_scoring": real["critic_scoring"],
        "forward_rows": real["forward_rows"],
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line; `--local_rank` (added by the deepspeed launcher) is accepted and ignored."""
    parser = argparse.ArgumentParser(
        description="Benchmark one PPO iteration (generation, scoring, training) of the real stage "
        "against plain-PyTorch floors (one process, and data parallel): "
        "`deepspeed --num_gpus 2 launch/bench.py --json bench.json`."
    )
    parser.add_argument(
        "--json", metavar="PATH", help="also write every figure to this JSON file (rank 0)"
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny models (2 layers, width 64, vocab 512) and workload (4 prompts of 8 "
        "tokens, 8 new tokens, 3 repeats): checks in seconds that the benchmark runs; "
        "its figures mean nothing",
    )
    parser.add_argument(
        "--workload",
        choices=tuple(WORKLOADS),
        default="default",
        help="default: Llama 6 layers, width 384, MLP 1024, 6 heads, vocab 8000 (~16.8M parameters "
        "a model); large: 8 layers, width 768, MLP 2048, 12 heads, vocab 8000 (~68.9M, ~4x), the "
        "same batch, 3 repeats. --smoke keeps its tiny workload whatever this says",
    )
    parser.add_argument(
        "--memory_budget_gb",
        type=float,
        default=0.0,
        help="ppo.memory_budget_gb of the real stage: the memory plan's per-rank budget in GiB "
        "(default: 0, measured)",
    )
    parser.add_argument(
        "--repeats", type=int, help="measured calls per figure (default: 5, large and smoke: 3)"
    )
    parser.add_argument("--warmup", type=int, help="unmeasured calls before them (default: 1)")
    parser.add_argument(
        "--placement",
        choices=("auto", "resident", "offload"),
        default="auto",
        help="ppo.ref_placement and ppo.reward_placement of the real stage (default: auto)",
    )
    parser.add_argument(
        "--critic_scoring",
        choices=("auto", "materialise", "zero3"),
        default="auto",
        help="ppo.critic_scoring of the real stage (default: auto)",
    )
    parser.add_argument(
        "--local_rank", type=int, help=argparse.SUPPRESS
    )  # set by the deepspeed launcher
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict | None:
    """Run the benchmark; rank 0 prints the table, writes `--json` and returns the results."""
    args = parse_args(argv)
    w = SMOKE if args.smoke else WORKLOADS[args.workload]
    w = dataclasses.replace(
        w, **{k: v for k in ("repeats", "warmup") if (v := getattr(args, k)) is not None}
    )
    d = collectives.init_distributed()
    setup_logging(d.is_main)
    threads = torch.get_num_threads()
    folder = Path(
        collectives.broadcast_object(tempfile.mkdtemp(prefix="bench-") if d.is_main else None)
    )
    try:
        paths = collectives.broadcast_object(write_fixtures(folder, w) if d.is_main else None)
        trainer = build_trainer(
            folder, paths, w, d, args.placement, args.critic_scoring, args.memory_budget_gb
        )
        real, floor = measure(paths, trainer, w, d, threads * d.local_world_size)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    finally:
        if d.is_main:
            shutil.rmtree(folder, ignore_errors=True)
    if not d.is_main:
        return None
    results = report(
        real,
        floor,
        w,
        trainer.p.num_ppo_epochs,
        d,
        threads,
        args.smoke,
        args.workload,
        args.memory_budget_gb,
    )
    print(format_table(results), flush=True)
    if args.json:
        write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
