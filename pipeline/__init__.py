"""RLHF on DeepSpeed: SFT -> reward model -> PPO.

Only `pipeline.distributed` imports DeepSpeed (modules that need engines or collectives reach it
through that package: stages, generation, checkpoint, orchestrator); config, data, the default task,
the PPO math and monitoring import without it (tests/unit/test_layout.py and test_imports.py check).
"""

__version__ = "0.1.0"
