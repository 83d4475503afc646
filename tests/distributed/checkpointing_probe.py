"""Run under `deepspeed --num_gpus 2`: the PPO stage twice, in one process group, on the same random
actor and reward model whose configs ask for attention dropout: model.gradient_checkpointing off,
then on. Writes <work>/report.json (rank 0): each run's PPO metrics and how often a decoder layer's
MLP ran with gradients on (the update's forwards, plus the recomputes under checkpointing).

`checkpointing_probe.py WORK [PLAN.json]`: with a plan, its pipelines run afterwards in the same
launch, as pipelines_probe.py runs them (to save a launcher and rank start-up)."""

import json
import sys
from pathlib import Path

import pipelines_probe  # next to this script
import torch

from pipeline import default_task, orchestrator
from pipeline.cli import parse_config
from pipeline.config import REPO_ROOT
from pipeline.distributed import collectives
from pipeline.monitoring import setup_logging

SIZES = [
    "--task.num_sft",
    "16",
    "--task.num_pairs",
    "16",
    "--task.num_prompts",
    "32",
    "--task.num_eval",
    "8",
    "--ppo.num_iterations",
    "2",
    "--ppo.rollout_batch_size",
    "16",
    "--ppo.mini_batch_size",
    "16",
    "--ppo.micro_batch_size_per_gpu",
    "4",
    "--ppo.warmup_iterations",
    "0",
    "--ppo.eval_steps",
    "100",
    "--save_steps",
    "0",
]


def model_folder(folder: Path) -> None:
    default_task.build_tokenizer(folder)
    config = default_task.model_config(len(default_task.vocabulary()), 32, 2, 2, 64, 64)
    config["attention_dropout"] = 0.2  # the PPO stage must switch it off
    (folder / "config.json").write_text(json.dumps(config))


def main() -> None:
    work, *plan = [
        Path(a) for a in sys.argv[1:] if not a.startswith("--local_rank")
    ]  # launcher adds --local_rank
    d = collectives.init_distributed()
    setup_logging(d.is_main)
    if d.is_main:
        for name in ("actor", "reward"):
            model_folder(work / name)
    collectives.barrier()
    calls = []

    def count(module, _args):
        if type(module).__name__ == "LlamaMLP" and torch.is_grad_enabled():
            calls.append(1)

    hook = torch.nn.modules.module.register_module_forward_pre_hook(count)
    report = {}
    for gc in ("false", "true"):
        out = work / f"gc_{gc}"
        cfg = parse_config(
            [
                "--config",
                str(REPO_ROOT / "launch" / "configs" / "tiny.yaml"),
                "--output_dir",
                str(out),
                "--ppo.actor_model_path",
                str(work / "actor"),
                "--ppo.reward_model_path",
                str(work / "reward"),
                *SIZES,
                "--model.gradient_checkpointing",
                gc,
            ]
        )
        calls.clear()
        orchestrator.run(cfg, d, ("ppo",))
        rows = [
            json.loads(line) for line in (out / "ppo" / "metrics.jsonl").read_text().splitlines()
        ]
        report[gc] = {
            "iterations": [r for r in rows if "ppo/policy_loss" in r],
            "mlp_calls": len(calls),
        }
    hook.remove()
    if d.is_main:
        (work / "report.json").write_text(json.dumps(report))
    if plan:
        pipelines_probe.run_plan(plan[0], d.rank)


if __name__ == "__main__":
    main()
