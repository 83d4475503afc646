"""Run under `deepspeed --num_gpus 2`: the frozen models resident and offloaded score one rollout
alike. The real trainer (`PPOTrainer(ctx)`, reference and reward model offloaded: ZeRO-3
inference engines) samples a rollout on each rank and scores it (`score`); then the same frozen
models are built resident (ppo_frozen.build_frozen) and swapped in, and the same rollout is scored
again. An ensemble of two members (the reward folder twice) is built both ways as well and its
members' scores compared. Rank r writes <out>.rank<r> (torch.save). Used by
test_placement_two_ranks.py."""

import dataclasses
import sys
import types
from pathlib import Path

import deepspeed
import torch

from pipeline.cli import parse_config
from pipeline.distributed import collectives
from pipeline.inputs import stage_inputs
from pipeline.monitoring import setup_logging
from pipeline.stages import ppo_frozen, ppo_reward
from pipeline.stages.common import StageContext
from pipeline.stages.ppo import PPOTrainer


def options(work: Path) -> list[str]:
    flags = {
        "output_dir": work / "run",
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
        "ppo.ref_placement": "offload",
        "ppo.reward_placement": "offload",
        "save_steps": 0,
        "cache_dir": work / "cache",
    }
    return [s for k, v in flags.items() for s in (f"--{k}", str(v))]


def kind(model) -> str:
    return "engine" if isinstance(model, deepspeed.DeepSpeedEngine) else "plain"


def frozen_facts(model) -> dict:
    params = list((model.module if kind(model) == "engine" else model).parameters())
    return {
        "kind": kind(model),
        "zero_partitioned": any(hasattr(p, "ds_id") for p in params),
        "requires_grad": any(p.requires_grad for p in params),
        "training": model.training,
        "device": str(params[0].device) if kind(model) == "plain" else None,
    }


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # added by the launcher
    out, work = Path(args[0]), Path(args[1])
    cfg = parse_config(options(work))
    d = collectives.init_distributed()
    setup_logging(d.is_main)
    run = Path(cfg.output_dir)
    ctx = StageContext(cfg, d, run / "ppo", stage_inputs(cfg, run, run / "task")["ppo"])
    t = PPOTrainer(ctx)
    per = t.sizes.prompts_per_rank
    batch = t.prompts[d.rank * per : (d.rank + 1) * per]
    exp = t.generate(batch, seed=11 + d.rank, params=t.rollout_sampling)
    offloaded = t.score(exp)
    facts = {"offload": [frozen_facts(m) for m in (t.ref, *t.rewards)]}

    dtype = t.ref.get_data_types()[0]
    inputs = types.SimpleNamespace(
        reward_paths=[ctx.inputs["reward_model"]] * 2, reward_tokenizer=t.reward_tokenizer
    )
    specs = ppo_frozen.frozen_specs(ctx, inputs)  # ref, reward 0, reward 1
    built = {
        how: ppo_frozen.build_frozen(
            ctx, [dataclasses.replace(s, requested=how) for s in specs], ds_of(cfg, d), dtype
        )
        for how in ("offload", "resident")
    }
    t.ref, t.rewards = built["resident"][0], built["resident"][1:2]
    resident = t.score(exp)
    facts["resident"] = [frozen_facts(m) for m in built["resident"]]
    facts["ensemble_offload"] = [frozen_facts(m) for m in built["offload"]]
    members = {}
    t.reward_pad_ids = [s.pad_id for s in specs[1:]]
    for how, models in built.items():
        t.rewards = models[1:]
        members[how] = ppo_reward.reward_model_scores(t, exp).cpu()  # (2, B)
    torch.save(
        {
            "rows": len(exp.sequences),
            **{
                key: {
                    "offload": getattr(offloaded, key).cpu(),
                    "resident": getattr(resident, key).cpu(),
                }
                for key in ("ref_logprobs", "rm_scores", "scores")
            },
            "members": members,
            "facts": facts,
            "device": str(collectives.device()),
        },
        f"{out}.rank{d.rank}",
    )
    collectives.barrier()


def ds_of(cfg, d) -> dict:
    from pipeline.distributed.ds_config import ds_configs

    return ds_configs(cfg, "ppo", d.world_size)


if __name__ == "__main__":
    main()
