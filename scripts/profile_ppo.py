"""Where one PPO iteration's time goes, by phase and part, under torch.profiler.

    taskset -c 1 deepspeed --num_gpus 2 scripts/profile_ppo.py --workload bench   # bench.py's
    taskset -c 1 deepspeed --num_gpus 2 scripts/profile_ppo.py --workload tiny --run RUN_DIR

`bench`: the benchmark's workload (launch/bench.py's fixtures and trainer); `tiny`: the PPO stage
of a finished tiny run (its SFT and reward models, the tiny preset). After `--warmup` iterations,
one iteration runs under the profiler with `record_function` ranges around each part of each phase
(materialise, decode, pi_old; ref, reward, critic; actor and critic forward, backward, step) and
around DeepSpeed's ZeRO-3 parameter fetch (all-gather, offload copies) and release (re-partition).
Rank 0 prints, per part: wall ms, share of the iteration, and how much of it was inside ZeRO-3
fetch / release, in communication ops, and in matmul-like compute ops. Extra `--set key=value`
pairs are passed to the trainer's config (e.g. `--set ppo.ref_placement=offload`).
"""

from __future__ import annotations

import argparse
import bisect
import functools
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

from torch.profiler import ProfilerActivity, profile, record_function

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "launch"))

COMM = ("allgather", "all_gather", "reduce_scatter", "allreduce", "all_reduce", "broadcast",
        "gloo", "c10d::", "record_param_comms", "barrier")  # fmt: skip
MATMUL = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "scaled_dot_product",
          "aten::_softmax", "aten::mul", "aten::add", "aten::silu", "aten::embedding")  # fmt: skip
OPS = ("aten::", "c10d::", "gloo", "record_param")
COPY = ("aten::copy_", "aten::_to_copy", "aten::cat", "aten::narrow_copy", "aten::index")
DS_PARTS = ("zero3.fetch", "zero3.release", "zero3.grad_reduce", "zero3.optimizer_step")

state = {"phase": ""}


def wrap(obj, name: str, label) -> None:
    """Wrap `obj.name` in record_function(label(*args) or label)."""
    fn = getattr(obj, name)

    @functools.wraps(fn)
    def inner(*a, **k):
        with record_function(label(*a, **k) if callable(label) else label):
            return fn(*a, **k)

    setattr(obj, name, inner)


def phase(obj, name: str, tag: str) -> None:
    """Wrap `obj.name` in a range and remember the phase it is (for parts shared by phases)."""
    fn = getattr(obj, name)

    @functools.wraps(fn)
    def inner(*a, **k):
        state["phase"] = tag
        with record_function(tag):
            return fn(*a, **k)

    setattr(obj, name, inner)


def instrument_deepspeed() -> None:
    from deepspeed.runtime.zero import partitioned_param_coordinator as ppc
    from deepspeed.runtime.zero import stage3

    c = ppc.PartitionedParameterCoordinator
    wrap(c, "fetch_sub_module", "zero3.fetch")
    wrap(c, "release_sub_module", "zero3.release")
    s = stage3.DeepSpeedZeroOptimizer_Stage3
    wrap(s, "step", "zero3.optimizer_step")
    for n in dir(s):
        if n.endswith("reduce_and_partition_ipg_grads"):
            wrap(s, n, "zero3.grad_reduce")


def instrument_trainer(t) -> None:
    from pipeline.distributed import zero3
    from pipeline.stages import ppo_reward

    phase(t, "generate", "generation")
    phase(t, "score", "scoring")
    phase(t, "advantages", "advantages")
    phase(t, "update", "training")
    wrap(zero3, "copy_gathered", "gen.materialise")  # generation.py calls zero3.copy_gathered
    wrap(t.generator, "generate", "gen.decode")

    def lp_label(model, *a, **k):
        if model is t.ref:
            return "score.ref"
        return "train.actor_fwd" if state["phase"] == "training" else "gen.pi_old"

    fn = t._logits_logprobs
    t._logits_logprobs = lambda model, *a, **k: _ranged(lp_label(model), fn, model, *a, **k)
    vfn = t._values
    t._values = lambda *a, **k: _ranged(
        "train.critic_fwd" if state["phase"] == "training" else "score.critic", vfn, *a, **k
    )
    wrap(ppo_reward, "_rm_scores", "score.reward")
    for eng, who in ((t.actor, "actor"), (t.critic, "critic")):
        if eng is not None:
            wrap(eng, "backward", f"train.{who}_bwd")
            wrap(eng, "step", f"train.{who}_step")


def _ranged(label, fn, *a, **k):
    with record_function(label):
        return fn(*a, **k)


def build(args, d):
    from pipeline.cli import parse_config
    from pipeline.distributed import collectives
    from pipeline.stages.common import StageContext
    from pipeline.stages.ppo import PPOTrainer

    extra = [s for kv in args.set for s in ("--" + kv.split("=", 1)[0], kv.split("=", 1)[1])]
    if args.workload == "bench":
        import bench
        from bench_lib import Workload

        w = Workload()
        folder = Path(
            collectives.broadcast_object(tempfile.mkdtemp(prefix="prof-") if d.is_main else None)
        )
        paths = collectives.broadcast_object(bench.write_fixtures(folder, w) if d.is_main else None)
        if extra:  # bench.build_trainer parses fixed flags: add ours through parse_config
            orig = bench.parse_config
            bench.parse_config = lambda argv: orig(argv + extra)
        t = bench.build_trainer(folder, paths, w, d)
        n = t.sizes.rollout_per_rank
        return t, t.prompts[d.rank * n : (d.rank + 1) * n]
    run = Path(args.run)
    out = Path(tempfile.mkdtemp(prefix="prof-tiny-")) if d.is_main else None
    out = Path(collectives.broadcast_object(str(out) if out else None))
    cfg = parse_config(
        ["--config", str(ROOT / "launch/configs/tiny.yaml"), "--output_dir", str(out), *extra]
    )
    inputs = {
        "tokenizer": str(run / "sft/model"),
        "actor": str(run / "sft/model"),
        "reward_model": str(run / "reward/model"),
        "prompt_data": str(run / "task/prompts.jsonl"),
        "eval_prompt_data": str(run / "task/prompts_eval.jsonl"),
    }
    t = PPOTrainer(StageContext(cfg, d, out / "ppo", inputs))
    per = t.sizes.prompts_per_rank
    return t, t.prompts[d.rank * per : (d.rank + 1) * per]


def summarise(prof, iteration_ms: float) -> tuple[list[tuple], list]:
    """Per part: (name, wall ms, share, ZeRO-3 fetch / release / grad reduce / optimizer step ms,
    comm-op, matmul-like-op and copy-op self ms, calls); and the top ops inside ZeRO-3 ranges."""
    events = [e for e in prof.events() if e.device_type.name == "CPU"]
    parts = ("generation", "scoring", "advantages", "training")
    ranges = [
        e for e in events if e.name in parts or e.name.split(".")[0] in ("gen", "score", "train")
    ]
    by_thread: dict = defaultdict(lambda: {"ds": [], "ops": []})
    for e in events:
        kind = "ds" if e.name in DS_PARTS else "ops" if e.name.startswith(OPS) else None
        if kind:
            by_thread[e.thread][kind].append(e)
    sorted_ev = {k: {} for k in ("ds", "ops")}
    starts = {k: {} for k in ("ds", "ops")}
    for tid, kinds in by_thread.items():
        for k, evs in kinds.items():
            evs.sort(key=lambda e: e.time_range.start)
            sorted_ev[k][tid] = evs
            starts[k][tid] = [e.time_range.start for e in evs]

    def within(kind, a, b, tid):
        lo = bisect.bisect_left(starts[kind].get(tid, []), a)
        hi = bisect.bisect_right(starts[kind].get(tid, []), b)
        return [e for e in sorted_ev[kind].get(tid, [])[lo:hi] if e.time_range.end <= b]

    rows = defaultdict(lambda: defaultdict(float))
    for r in ranges:
        a, b, tid = r.time_range.start, r.time_range.end, r.thread
        row = rows[r.name]
        row["wall"] += (b - a) / 1e3
        row["calls"] += 1
        for e in within("ds", a, b, tid):
            row[e.name] += (e.time_range.end - e.time_range.start) / 1e3
        for e in within("ops", a, b, tid):
            ms = e.self_cpu_time_total / 1e3
            if any(x in e.name for x in COMM):
                row["comm"] += ms
            elif e.name.startswith(MATMUL):
                row["compute"] += ms
            elif e.name.startswith(COPY):
                row["copy"] += ms
    inside = defaultdict(float)  # ops inside ZeRO-3 ranges, by name
    for tid, evs in sorted_ev["ds"].items():
        for f in evs:
            for e in within("ops", f.time_range.start, f.time_range.end, tid):
                inside[f"{f.name}: {e.name}"] += e.self_cpu_time_total / 1e3
    order = ["generation", "gen.materialise", "gen.decode", "gen.pi_old", "scoring", "score.ref",
             "score.reward", "score.critic", "advantages", "training", "train.actor_fwd",
             "train.actor_bwd", "train.actor_step", "train.critic_fwd", "train.critic_bwd",
             "train.critic_step"]  # fmt: skip
    out = []
    for name in order:
        if name in rows:
            r = rows[name]
            out.append((name, r["wall"], r["wall"] / iteration_ms, r["zero3.fetch"],
                        r["zero3.release"], r["zero3.grad_reduce"], r["zero3.optimizer_step"],
                        r["comm"], r["compute"], r["copy"], int(r["calls"])))  # fmt: skip
    return out, sorted(inside.items(), key=lambda kv: -kv[1])[:12]


def main() -> None:
    import time

    from pipeline.distributed import collectives
    from pipeline.monitoring import setup_logging

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", choices=("bench", "tiny"), default="bench")
    ap.add_argument("--run", default="/work/runs/tiny_base", help="tiny: a finished tiny run")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=1, help="profiled iterations (summed)")
    ap.add_argument("--set", action="append", default=[], help="config key=value (repeatable)")
    ap.add_argument("--trace", help="also write a Chrome trace of rank 0 here")
    ap.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    d = collectives.init_distributed()
    setup_logging(d.is_main)
    instrument_deepspeed()
    t, batch = build(args, d)
    instrument_trainer(t)
    for i in range(args.warmup):
        t.iteration(i + 1, batch)
    collectives.barrier()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for i in range(args.repeats):
            with record_function("iteration"):
                t.iteration(args.warmup + i + 1, batch)
        wall = (time.perf_counter() - start) * 1e3
    if args.trace and d.is_main:
        prof.export_chrome_trace(args.trace)
    rows, inside = summarise(prof, wall)
    if d.is_main:
        print(f"\nprofile ({args.workload}, rank 0 of {d.world_size}, {args.repeats} iteration(s)):"
              f" {wall:.0f} ms under the profiler")  # fmt: skip
        print("| part | calls | wall ms | share | ZeRO-3 fetch | release | grad reduce | "
              "optimizer step | comm ops | matmul-like ops | copy ops |")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for name, w, share, f, r, g, s, c, comp, cp, n in rows:
            print(f"| {name} | {n} | {w:.0f} | {share:.0%} | {f:.0f} | {r:.0f} | {g:.0f} | {s:.0f}"
                  f" | {c:.0f} | {comp:.0f} | {cp:.0f} |")  # fmt: skip
        print("\ntop ops (self ms) inside the ZeRO-3 ranges:")
        for name, ms in inside:
            print(f"  {ms:8.0f}  {name}")
    collectives.barrier()


if __name__ == "__main__":
    main()
