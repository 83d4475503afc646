"""Run under `deepspeed --num_gpus 2`: build the PPO engines and write, per rank, how much of each
parameter this rank holds and where the frozen engines keep theirs. Used by test_two_ranks.py."""

import json
import sys
from pathlib import Path

from pipeline.cli import parse_config
from pipeline.distributed import collectives
from pipeline.inputs import stage_inputs
from pipeline.stages.common import StageContext
from pipeline.stages.ppo import PPOTrainer


def shares(engine) -> dict:
    return {
        n: [p.ds_tensor.numel(), p.ds_numel, p.ds_tensor.device.type]
        for n, p in engine.module.named_parameters()
    }


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # added by the launcher
    out_file = Path(args[0])
    cfg = parse_config(args[1:])
    d = collectives.init_distributed()
    out = Path(cfg.output_dir)
    ctx = StageContext(cfg, d, out / "probe", stage_inputs(cfg, out, out / "task")["ppo"])
    trainer = PPOTrainer(ctx)
    report = {
        "world_size": d.world_size,
        "rank": d.rank,
        "actor": shares(trainer.actor),
        "critic": shares(trainer.critic),
        "ref": shares(trainer.ref),
        "reward": shares(trainer.rewards[0]),
        "ref_offload": str(trainer.ref.zero_offload_param().device)
        if trainer.ref.zero_offload_param()
        else None,
        "reward_offload": str(trainer.rewards[0].zero_offload_param().device)
        if trainer.rewards[0].zero_offload_param()
        else None,
    }
    Path(f"{out_file}.rank{d.rank}").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
