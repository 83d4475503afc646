"""RLHF on DeepSpeed: SFT -> reward model -> PPO.

Where each concern lives:
- orchestrator.py   runs the stages in order, skipping those up to date; inputs.py says what each
                    stage reads, fingerprint.py when it is up to date (identity, fingerprint);
                    checkpoint.py: checkpoints and exact resume; stop_signals.py: SIGTERM/SIGUSR1
- config.py         the options (typed dataclasses, one home); config_checks.py validates them;
                    cli.py: the command line (--config files, flags, --help, did-you-mean)
- data/             datasets: sources, formats, tokenisation, the tokenised cache, collation
- default_task/     the embedded task (data, tokenizer, from-scratch model, gold scorer)
- models.py         loading models and tokenizers, LoRA, the forward helpers (log-probs, values)
- stages/           sft.py, reward.py, and PPO: ppo.py the algorithm; ppo_setup, ppo_reward,
                    ppo_eval, ppo_types, ppo_checkpoint (resumable state, checkpoint, resume,
                    final save)
- ppo_math.py       losses, KL estimators, controllers (pure torch); estimators.py: the registry of
                    advantage estimators (gae, grpo, rloo, ...)
- generation.py     the hybrid engine (materialised weights for decoding) and its backends
- distributed/      DeepSpeed and torch.distributed: collectives, DS JSON, engines, ZeRO-3
                    gathers and export, engine checkpoints
- reward_fns.py     user functions as rewards or gold metrics; monitoring.py: TensorBoard,
                    metrics.jsonl, logging, timers; errors.py: the user-error type
The benchmark is launch/bench.py (not part of the package).

Only `pipeline.distributed` imports DeepSpeed (modules that need engines or collectives reach it
through that package: stages, generation, checkpoint, orchestrator); config, data, the default task,
the PPO math and monitoring import without it (tests/unit/test_layout.py and test_imports.py check).
"""

__version__ = "0.1.0"
