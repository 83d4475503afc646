"""The whole pipeline, SFT -> reward model -> PPO, skipping stages already done:
`deepspeed launch/ppo.py [--config FILE] [--option value ...]`."""

from pipeline.inputs import STAGES
from pipeline.orchestrator import main

if __name__ == "__main__":
    main(
        STAGES,
        "RLHF pipeline: SFT -> reward model -> PPO. Stages whose outputs are up to date "
        "(same inputs and config) are skipped; --force reruns them.",
    )
