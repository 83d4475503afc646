"""RLHF on DeepSpeed: SFT -> reward model -> PPO.

Only `pipeline.engines` (and modules that need engines: stages, generation) import DeepSpeed;
config, data, the default task, the PPO math and monitoring import without it.
"""

__version__ = "0.1.0"
