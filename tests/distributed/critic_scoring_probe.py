"""Run under `deepspeed --num_gpus 2`: the critic's rollout values from its materialised plain copy
equal those of its ZeRO-3 training engine. The real trainer (`PPOTrainer(ctx)`, critic_scoring auto:
the stage chooses the copy) samples a rollout on each rank and scores it (`score`) with the stage's
copy, with copies gathering 1 and 2 submodules at a time, and through the engine (no copy: a
gather of every layer per micro-batch). The ZeRO-3 config partitions every tensor (persistence
threshold 0), so each path really gathers. With `lora`, the critic has LoRA adapters, moved away
from B = 0 first (the plain copy keeps them as adapters). Rank r writes <out>.rank<r>
(torch.save). Used by test_critic_scoring_two_ranks.py."""

import json
import sys
from pathlib import Path

import deepspeed
import torch

from pipeline.cli import parse_config
from pipeline.config import REPO_ROOT
from pipeline.distributed import collectives
from pipeline.distributed.materialise import PlainCopy
from pipeline.inputs import stage_inputs
from pipeline.monitoring import setup_logging
from pipeline.stages.common import StageContext
from pipeline.stages.ppo import PPOTrainer


def options(work: Path, lora: bool) -> list[str]:
    ds = json.loads((REPO_ROOT / "ds_configs" / "zero3_train.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition even tiny norms
    (work / "ds_train.json").write_text(json.dumps(ds))
    flags = {
        "output_dir": work / ("run_lora" if lora else "run"),
        "ppo.actor_model_path": work / "policy",
        "ppo.reward_model_path": work / "reward",
        "data.prompt_data_path": work / "prompts.jsonl",
        "data.eval_prompt_data_path": work / "prompts.jsonl",
        "data.max_response_len": 6,
        "ppo.rollout_batch_size": 6,
        "ppo.mini_batch_size": 6,
        "ppo.micro_batch_size_per_gpu": 1,  # scoring in 3 micro-batches (3 rows a rank)
        "ppo.num_iterations": 1,
        "ppo.eval_steps": 0,
        "ppo.critic_scoring": "auto",
        "ds_config": work / "ds_train.json",
        "save_steps": 0,
        "cache_dir": work / "cache",
        **({"ppo.critic_lora_rank": 4} if lora else {}),
    }
    return [s for k, v in flags.items() for s in (f"--{k}", str(v))]


def move_adapters(engine) -> None:
    """LoRA B away from 0 (rank 0 draws, ZeRO-3 re-partitions), so the adapters change values."""
    params = [p for n, p in engine.module.named_parameters() if "lora_B" in n]
    g = torch.Generator().manual_seed(5)
    with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
        if torch.distributed.get_rank() == 0:
            for p in params:
                p.data.copy_(torch.randn(p.shape, generator=g).to(p.device, p.dtype) * 0.5)


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # added by the launcher
    out, work, lora = Path(args[0]), Path(args[1]), args[2] == "lora"
    cfg = parse_config(options(work, lora))
    d = collectives.init_distributed()
    setup_logging(d.is_main)
    run = Path(cfg.output_dir)
    ctx = StageContext(cfg, d, run / "ppo", stage_inputs(cfg, run, run / "task")["ppo"])
    t = PPOTrainer(ctx)
    if lora:
        move_adapters(t.critic)
    per = t.sizes.prompts_per_rank
    batch = t.prompts[d.rank * per : (d.rank + 1) * per]
    exp = t.generate(batch, seed=11 + d.rank, params=t.rollout_sampling)
    stage_copy = t.critic_copy
    scored = {"stage": t.score(exp)}
    for group in (1, 2):
        t.critic_copy = PlainCopy(t.critic, group, merge_lora=False)
        scored[f"gather_{group}"] = t.score(exp)
    t.critic_copy = None
    scored["zero3"] = t.score(exp)
    names = sorted(n for n, _ in t.critic.module.named_parameters())
    torch.save(
        {
            "rows": len(exp.sequences),
            "stage_chose_copy": stage_copy is not None,
            "copy_freed": stage_copy is not None
            and all(p.device.type == "meta" for p in stage_copy.model.parameters()),
            "copy_names_are_the_engines": stage_copy is not None
            and sorted(n for n, _ in stage_copy.model.named_parameters()) == names,
            "adapters": sum(".lora_" in n for n in names),
            "partitioned": all(
                p.ds_tensor.numel() < p.ds_numel for p in t.critic.module.parameters()
            ),
            **{
                key: {how: getattr(e, key).cpu() for how, e in scored.items()}
                for key in ("old_values", "prompt_values", "ref_logprobs", "scores")
            },
            "device": str(collectives.device()),
        },
        f"{out}.rank{d.rank}",
    )
    collectives.barrier()


if __name__ == "__main__":
    main()
