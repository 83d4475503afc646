"""Stage 2 alone, reward model:
`deepspeed launch/reward.py [--config FILE] [--option value ...]`."""

from pipeline.orchestrator import main

if __name__ == "__main__":
    main(
        ("reward",),
        "Stage 2 alone: reward model on preference pairs (starts from the SFT model "
        "in --output_dir when there is one).",
    )
