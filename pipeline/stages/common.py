"""What the SFT and reward-model stages share: the stage context, sharded loaders, the loop."""
from __future__ import annotations

import logging
import math
import shutil
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import DataLoader, DistributedSampler

from pipeline import engines
from pipeline.config import Config, TrainConfig, global_batch, ppo_sizes, resolve_path
from pipeline.errors import UserError
from pipeline.monitoring import MetricLogger, progress

log = logging.getLogger(__name__)


@dataclass
class StageContext:
    """What the orchestrator hands a stage: the config, the process group, where to read and write."""

    cfg: Config
    dist: engines.Dist
    stage_dir: Path
    inputs: dict[str, str] = field(default_factory=dict)  # role -> resolved path

    def monitored(self, ds_config: dict, job: str) -> dict:
        """The DS config with DeepSpeed's own TensorBoard monitor on, when the run asks for it."""
        if not self.cfg.deepspeed_monitor:
            return ds_config
        return {**ds_config, "tensorboard": {"enabled": True, "job_name": job,
                                             "output_path": str(self.stage_dir / "tensorboard")}}

    def start(self) -> MetricLogger:
        """Called once inputs are validated: clear the previous attempt's logs, open new ones."""
        if self.dist.is_main:
            for stale in ("metrics.jsonl", "stage.json"):
                (self.stage_dir / stale).unlink(missing_ok=True)
            shutil.rmtree(self.stage_dir / "tensorboard", ignore_errors=True)
        engines.barrier()
        return MetricLogger(self.stage_dir, enabled=self.dist.is_main)


def ds_configs(cfg: Config, stage: str, world_size: int) -> dict[str, dict]:
    """The DeepSpeed configs of a stage, batch sizes filled in from the run config.

    "train" for the trained engines; PPO also has "inference" for the frozen reference and reward
    model. Raises UserError for a missing or contradicting DS file, or PPO sizes that do not divide.
    """
    if stage in ("sft", "reward"):
        t: TrainConfig = getattr(cfg, stage)
        return {"train": engines.load_ds_config(
            resolve_path(cfg.ds_config), train_micro_batch_size_per_gpu=t.micro_batch_size_per_gpu,
            gradient_accumulation_steps=t.gradient_accumulation_steps, gradient_clipping=t.gradient_clipping)}
    p = cfg.ppo
    sizes = ppo_sizes(p, world_size)
    return {"train": engines.load_ds_config(
                resolve_path(cfg.ds_config), train_micro_batch_size_per_gpu=p.micro_batch_size_per_gpu,
                gradient_accumulation_steps=sizes["gradient_accumulation_steps"],
                gradient_clipping=p.gradient_clipping),
            "inference": engines.load_ds_config(
                resolve_path(cfg.ds_inference_config),
                train_micro_batch_size_per_gpu=p.micro_batch_size_per_gpu, gradient_accumulation_steps=1)}


def train_loader(examples: list, collate: Callable, pad_id: int, micro_batch: int, seed: int,
                 d: engines.Dist) -> DataLoader:
    """Shuffled, sharded over ranks, equal batches on every rank (the remainder is dropped)."""
    sampler = DistributedSampler(examples, num_replicas=d.world_size, rank=d.rank, shuffle=True,
                                 seed=seed, drop_last=True)
    return DataLoader(examples, batch_size=micro_batch, sampler=sampler, drop_last=True,
                      collate_fn=partial(collate, pad_id=pad_id))


def eval_batches(examples: list, collate: Callable, pad_id: int, micro_batch: int, d: engines.Dist):
    """This rank's strided share of the evaluation set as (batch, real) pairs.

    Every rank yields the same number of batches (ZeRO-3 forwards are collective); a rank whose
    share ran out gets a filler batch with real=False, to run but not to count.
    """
    mine = examples[d.rank::d.world_size]
    n_batches = math.ceil(math.ceil(len(examples) / d.world_size) / micro_batch)
    for b in range(n_batches):
        chunk = mine[b * micro_batch:(b + 1) * micro_batch]
        yield to_device(collate(chunk or examples[:1], pad_id=pad_id)), bool(chunk)


def to_device(batch: dict) -> dict:
    dev = engines.device()
    return {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def schedule(t: TrainConfig, loader: DataLoader, stage: str, rows: int,
             d: engines.Dist) -> tuple[int, int]:
    """(total optimizer steps, warmup steps) of a supervised stage."""
    per_epoch = len(loader) // t.gradient_accumulation_steps
    if per_epoch == 0:
        need = global_batch(t.micro_batch_size_per_gpu, t.gradient_accumulation_steps, d.world_size)
        raise UserError(f"stage {stage}: {rows} training rows are fewer than one global batch of {need} "
                        f"({stage}.micro_batch_size_per_gpu x {stage}.gradient_accumulation_steps x "
                        f"{d.world_size} ranks).")
    total = per_epoch * t.epochs if t.max_steps < 0 else min(t.max_steps, per_epoch * t.epochs)
    return total, math.ceil(total * t.warmup_ratio)


def supervised_loop(engine, loader: DataLoader, t: TrainConfig, total_steps: int,
                    loss_fn: Callable[[dict], tuple[torch.Tensor, dict]],
                    evaluate: Callable[[], dict], logger: MetricLogger, d: engines.Dist,
                    desc: str) -> dict:
    """Micro-steps with accumulation, train logs every `logging_steps`, eval every `eval_steps`.

    `loss_fn(batch)` returns the loss to backpropagate and detached per-batch stats to average.
    Returns the final evaluation.
    """
    step, window = 0, {}
    bar = progress(total_steps, desc, d.is_main)
    per_epoch = len(loader) // t.gradient_accumulation_steps * t.gradient_accumulation_steps
    final_eval: dict = {}
    for epoch in range(t.epochs):
        loader.sampler.set_epoch(epoch)
        engine.train()
        for i, batch in enumerate(loader):
            if i >= per_epoch or step >= total_steps:
                break
            loss, stats = loss_fn(to_device(batch))
            engine.backward(loss)
            engine.step()
            for k, v in stats.items():
                window.setdefault(k, []).append(float(v))
            if (i + 1) % t.gradient_accumulation_steps:
                continue
            step += 1
            bar.update(1)
            if step % t.logging_steps == 0 or step == total_steps:
                means = {k: sum(v) / len(v) for k, v in window.items()}
                summed = engines.all_reduce_sum(torch.tensor(list(means.values()), dtype=torch.float64))
                metrics = {f"train/{k}": float(v) / d.world_size for k, v in zip(means, summed)}
                metrics["train/lr"] = engine.get_lr()[0]
                norm = engine.get_global_grad_norm()
                if norm is not None:
                    metrics["train/grad_norm"] = float(norm)
                logger.log(step, metrics)
                bar.set_postfix(loss=f"{metrics.get('train/loss', float('nan')):.4f}")
                window = {}
            if step % t.eval_steps == 0 or step == total_steps:
                final_eval = evaluate()
                logger.log(step, {f"eval/{k}": v for k, v in final_eval.items()})
                engine.train()
    bar.close()
    return {**final_eval, "steps": step}
