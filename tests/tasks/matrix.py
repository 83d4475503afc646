"""Run the pipeline on several preference tasks and seeds, with the over-optimisation defences
and with the defaults, and print what a user would see side by side.

    python tests/tasks/matrix.py --out /work/runs/m --tasks default sort distinct --seeds 1 2 3

Per (task, seed): the task's data are generated (the default task generates its own), then
`deepspeed launch/ppo.py` runs with only the data and model flags plus each variant's (VARIANTS);
the first variant trains the SFT and reward stages, the others reuse them (copied, so those stages
are skipped as up to date) and rerun PPO. A cell with a finished summary is not rerun. Rows:
reward-model held-out accuracy, gold SFT -> PPO, win rate against the SFT policy, KL to the
reference, ensemble disagreement, alarms, wall time. `--jobs 2` runs two (task, seed) cells at once
(one thread each).
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
TASKS = {"sort": HERE / "sort_task.py", "distinct": HERE / "distinct_task.py"}
# Each variant's flags on top of the task's data and model flags. `defaults` is what a user gets;
# the others add defences against over-optimisation: `adaptive_sft` the adaptive KL controller
# (target 3 nats, horizon 128) with scores in units of the SFT policy's; `ptx` PPO-ptx on the SFT
# rows (InstructGPT); `ensemble` three reward models with reward = mean - std of their normalised
# scores (Coste et al. 2023); `form_reward` (sort only) a rule-based format check added to the
# reward-model score, what a user who knows the reward model's blind spot would add.
VARIANTS = {
    "defaults": [],
    "adaptive_sft": ["--ppo.adaptive_kl", "true", "--ppo.score_norm", "sft"],
    "ptx": ["--ppo.ptx_coef", "1"],
    "ptx0.3": ["--ppo.ptx_coef", "0.3"],
    "form_reward": ["--ppo.reward_fn", str(HERE / "sort_task.py") + ":form"],
    "ensemble": ["--reward.ensemble_size", "3", "--ppo.ensemble_penalty", "1"],
}
# `ref_nllX`: the samples' per-token NLL under the reference held to X times its first value
# (ppo.ref_nll_limit, a dual-ascent penalty on -log ref; 1.1 is the default); `no_ref_nll`: off,
# the defaults without any defence.
VARIANTS.update({f"ref_nll{x}": ["--ppo.ref_nll_limit", x] for x in ("1.1", "1.2", "1.3")})
VARIANTS["no_ref_nll"] = ["--ppo.ref_nll_limit", "0"]
# The estimator recipes of launch/configs/ (`defaults` is the PPO-GAE recipe): compared with
# `--iterations VARIANT=N` giving each the iterations of one wall-time budget.
RECIPES = ("grpo", "dr_grpo", "rloo", "reinforce_pp")
VARIANTS.update({r: ["--config", str(REPO / "launch" / "configs" / f"{r}.yaml")] for r in RECIPES})


def task_flags(task: str, seed: int, data: Path) -> list[str]:
    """Data and model flags of a test task (written once per seed), or none for the default task."""
    if task == "default":
        return []
    folder = data / f"{task}_s{seed}"
    if not (folder / "prompts_eval.jsonl").is_file():
        subprocess.run(
            [sys.executable, str(TASKS[task]), str(folder), "--seed", str(seed)],
            check=True,
            capture_output=True,
        )
    sys.path.insert(0, str(HERE))
    module = __import__(f"{task}_task")
    return [*module.flags(folder), "--ppo.eval_reward_fn", f"{TASKS[task]}:gold"]


CORES: queue.Queue = queue.Queue()  # with --jobs N, each running cell is pinned to its own cores


def launch(out: Path, flags: list[str], seed: int, cores: str) -> float:
    """The pipeline on `cores` (taskset: the ranks size their thread pools to them)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with open(f"{out}.log", "w") as log:
        proc = subprocess.run(
            [
                "taskset",
                "-c",
                cores,
                "deepspeed",
                "--master_port",
                str(20000 + abs(hash(str(out))) % 20000),
                str(REPO / "launch" / "ppo.py"),
                *flags,
                "--seed",
                str(seed),
                "--output_dir",
                str(out),
            ],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    if proc.returncode != 0:
        raise RuntimeError(f"{out}: exit {proc.returncode}, see {out}.log")
    return time.time() - start


def row(task: str, seed: int, variant: str, out: Path, wall: float) -> dict:
    s = json.loads((out / "summary.json").read_text())
    ppo = s["ppo"]
    members = [v["eval_accuracy"] for k, v in s.items() if k.startswith("reward")]
    return {
        "task": task,
        "seed": seed,
        "variant": variant,
        "rm_accuracy": members[0] if members else None,
        "rm_members": len(members),
        "gold_sft": ppo.get("gold_score_sft"),
        "gold_ppo": ppo.get("gold_score_final"),
        "win_rate": ppo.get("gold_win_rate_vs_sft"),
        "kl": ppo.get("kl_to_ref"),
        "reward_sft": ppo.get("reward_score_sft"),
        "reward_ppo": ppo.get("reward_score_final"),
        "ensemble_std_sft": ppo.get("ensemble_std_sft"),
        "ensemble_std_ppo": ppo.get("ensemble_std_final"),
        "alarm_kl": ppo.get("alarm_kl_iterations"),
        "alarm_ensemble": ppo.get("alarm_ensemble_evaluations"),
        "alarm_ref_nll": ppo.get("alarm_ref_nll_iterations"),
        "best_iteration": ppo.get("best_iteration"),
        "ppo_s_per_iter": ppo["seconds_per_iteration"],
        "iterations": ppo["iterations"],
        "peak_rss_gb": _peak_rss(out / "ppo" / "metrics.jsonl"),
        "stage_wall_s": {k: round(v["wall_s"]) for k, v in s.items() if not v.get("skipped")},
        "wall_s": round(wall),
    }


def _peak_rss(metrics: Path) -> float | None:
    """The PPO process's peak resident memory (GB, per rank: every rank logs its own; rank 0's
    here)."""
    peaks = [json.loads(x).get("memory/peak_rss_gb") for x in metrics.read_text().splitlines()]
    return max((p for p in peaks if p is not None), default=None)


def cell(task: str, seed: int, args) -> list[dict]:
    cores = CORES.get()
    try:
        return _cell(task, seed, args, cores)
    finally:
        CORES.put(cores)


def _cell(task: str, seed: int, args, cores: str) -> list[dict]:
    flags = task_flags(task, seed, args.out / "data")
    rows, first = [], args.out / args.variants[0] / f"{task}_s{seed}"
    for variant in args.variants:
        out = args.out / variant / f"{task}_s{seed}"
        for stage in (
            "task",
            "sft",
            "reward",
        ):  # same SFT and first reward model: skipped as up to date
            if out != first and (first / stage).is_dir() and not (out / stage).exists():
                shutil.copytree(
                    first / stage, out / stage, ignore=shutil.ignore_patterns("checkpoints")
                )
        if not (out / "summary.json").is_file() or "ppo" not in json.loads(
            (out / "summary.json").read_text()
        ):
            iters = (
                ["--ppo.num_iterations", str(args.iterations[variant])]
                if variant in args.iterations
                else []
            )
            wall = launch(out, [*flags, *VARIANTS[variant], *iters, *args.extra], seed, cores)
        else:
            wall = json.loads((out / "wall.json").read_text())["wall_s"]
        (out / "wall.json").write_text(json.dumps({"wall_s": wall}))
        rows.append(row(task, seed, variant, out, wall))
    return rows


def table(rows: list[dict]) -> str:
    def f(x, nd=3):
        return "-" if x is None else f"{x:.{nd}f}" if isinstance(x, float) else str(x)

    lines = [
        "| task | seed | variant | RM acc | gold SFT -> PPO | win rate | KL | ens. std SFT -> PPO "
        "| alarms (KL it., ens. evals, ref-NLL it.) | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['task']} | {r['seed']} | {r['variant']} | {f(r['rm_accuracy'])} | "
            f"{f(r['gold_sft'])} -> {f(r['gold_ppo'])} | {f(r['win_rate'])} | {f(r['kl'], 2)} | "
            f"{f(r['ensemble_std_sft'])} -> {f(r['ensemble_std_ppo'])} | "
            f"{f(r['alarm_kl'])}, {f(r['alarm_ensemble'])}, {f(r.get('alarm_ref_nll'))} | "
            f"{r['wall_s']} |"
        )
    lines += [
        "",
        "| task | variant | seeds | gold gain mean (min) | runs with gold >= SFT "
        "| win rate mean (min) | KL mean (max) |",
        "|---|---|---|---|---|---|---|",
    ]
    for key in dict.fromkeys((r["task"], r["variant"]) for r in rows):
        rs = [r for r in rows if (r["task"], r["variant"]) == key and r["gold_ppo"] is not None]
        if not rs:
            continue
        gains, wins, kls = (
            [r["gold_ppo"] - r["gold_sft"] for r in rs],
            [r["win_rate"] for r in rs],
            [r["kl"] for r in rs],
        )
        lines.append(
            f"| {key[0]} | {key[1]} | {len(rs)} | "
            f"{sum(gains) / len(rs):+.3f} ({min(gains):+.3f}) | "
            f"{sum(g >= 0 for g in gains)}/{len(rs)} | "
            f"{sum(wins) / len(rs):.3f} ({min(wins):.3f}) | "
            f"{sum(kls) / len(rs):.2f} ({max(kls):.2f}) |"
        )
    lines += [
        "",
        "| task | variant | seeds | iterations | gold PPO mean (min) | win rate mean (min) "
        "| KL mean (max) | "
        "PPO s/iteration | PPO wall s | peak RSS GB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key in dict.fromkeys((r["task"], r["variant"]) for r in rows):
        rs = [r for r in rows if (r["task"], r["variant"]) == key and r["gold_ppo"] is not None]
        if not rs:
            continue
        mean = lambda k, rs=rs: sum(r[k] for r in rs) / len(rs)  # noqa: E731
        lines.append(
            f"| {key[0]} | {key[1]} | {len(rs)} | {rs[0]['iterations']} | {mean('gold_ppo'):.3f} "
            f"({min(r['gold_ppo'] for r in rs):.3f}) | "
            f"{mean('win_rate'):.3f} ({min(r['win_rate'] for r in rs):.3f}) | "
            f"{mean('kl'):.2f} ({max(r['kl'] for r in rs):.2f}) | {mean('ppo_s_per_iter'):.2f} | "
            f"{sum(r['stage_wall_s'].get('ppo', 0) for r in rs) / len(rs):.0f} | "
            f"{f(max((r['peak_rss_gb'] or 0) for r in rs), 2)} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tasks", nargs="+", default=["default", "sort", "distinct"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    ap.add_argument(
        "--variants",
        nargs="+",
        default=["defaults", "adaptive_sft"],
        choices=list(VARIANTS),
        help="the first trains the SFT and reward stages the others reuse",
    )
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument(
        "--report",
        action="store_true",
        help="only print the table of the finished cells (runs nothing)",
    )
    ap.add_argument(
        "--iterations",
        nargs="+",
        default=[],
        metavar="VARIANT=N",
        help="PPO iterations of a variant "
        "(e.g. the same wall-time budget for each estimator recipe)",
    )
    ap.add_argument(
        "--extra", nargs=argparse.REMAINDER, default=[], help="flags added to every run"
    )
    args = ap.parse_args()
    args.iterations = {k: int(v) for k, v in (x.split("=", 1) for x in args.iterations)}
    cpus = sorted(os.sched_getaffinity(0))
    share = max(1, len(cpus) // args.jobs)
    for j in range(args.jobs):
        CORES.put(",".join(map(str, cpus[j * share : (j + 1) * share] or cpus)))
    if args.report:
        rows = []
        for t in args.tasks:
            for seed in args.seeds:
                for v in args.variants:
                    out = args.out / v / f"{t}_s{seed}"
                    if (out / "wall.json").is_file():
                        rows.append(
                            row(
                                t,
                                seed,
                                v,
                                out,
                                json.loads((out / "wall.json").read_text())["wall_s"],
                            )
                        )
        print(table(rows))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    cells = [(t, s) for s in args.seeds for t in args.tasks]
    with ThreadPoolExecutor(args.jobs) as pool:
        results = [r for rows in pool.map(lambda c: cell(*c, args), cells) for r in rows]
    (args.out / "matrix.json").write_text(json.dumps(results, indent=2))
    print(table(results))


if __name__ == "__main__":
    main()
