"""What the stages share: the stage context (all three: config, ranks, folder, logger, engine
configs), and for SFT and the reward model the sharded loaders and the supervised loop."""

from __future__ import annotations

import logging
import math
import shutil
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import DataLoader, Sampler

from pipeline import data
from pipeline.checkpoint import Checkpointer, Resume
from pipeline.config import Config, TrainConfig, global_batch
from pipeline.distributed import collectives, ds_config, engines
from pipeline.errors import Preempted, SharedUserError, UserError
from pipeline.monitoring import MetricLogger, progress
from pipeline.stop_signals import StopRequest

log = logging.getLogger(__name__)


@dataclass
class StageContext:
    """What the orchestrator hands a stage: the config, the process group, where to read and
    write."""

    cfg: Config
    dist: collectives.Dist
    stage_dir: Path
    inputs: dict = field(
        default_factory=dict
    )  # role -> resolved path, or data.Source of a dataset role
    checkpointer: Checkpointer | None = None  # None: this stage never checkpoints (tests)
    resume: Resume | None = None  # the checkpoint this attempt resumes from
    stop: StopRequest = field(default_factory=StopRequest)
    identity: dict | None = (
        None  # fingerprint.identity of the stage; None: tokenised examples are not cached
    )

    def __post_init__(self):
        self.cfg = ds_config.resolve_auto(
            self.cfg
        )  # model.dtype and DS configs for this accelerator

    def examples(self, role: str, build: Callable[[], list[dict]]) -> list[dict]:
        """The tokenised examples of data role `role`, built by `build()` once per node (local rank
        0) and cached under <output_dir>/cache, keyed by the content hash of the data, the tokenizer
        and the data options: a resumed or rerun stage, and every other rank, reads them back."""
        if self.identity is None:
            return build()
        path = data.examples_cache_file(
            self.cfg.cache_dir, self.stage_dir.name, role, self.identity
        )
        built = self.dist.local_rank == 0 and not path.is_file()
        error = data.build_cached(path, build) if built else None
        errors = [
            e for e in collectives.all_gather_object(error) if e
        ]  # also the barrier before reading
        if errors:
            raise SharedUserError(errors[0])
        log.info(
            "stage %s: %s examples %s %s",
            self.stage_dir.name,
            role,
            "tokenised and cached in" if built else "read from the cache",
            path,
        )
        return data.read_cached(path)

    def engine_config(self, ds: dict, job: str) -> dict:
        """The DS config of a trained engine: DeepSpeed's own TensorBoard monitor on when the run
        asks for it; universal-checkpoint loading when resuming on another rank count."""
        return ds_config.engine_config(
            ds,
            job,
            universal=self.resume is not None and self.resume.universal,
            tensorboard=self.stage_dir / "tensorboard" if self.cfg.deepspeed_monitor else None,
        )

    def start(self) -> MetricLogger:
        """Called once inputs are validated. Starting over: clear the previous attempt's logs and
        checkpoints. Resuming: keep the logs up to the checkpoint's step, drop what came after."""
        if self.dist.is_main:
            (self.stage_dir / "stage.json").unlink(missing_ok=True)
            if self.resume is None:
                (self.stage_dir / "metrics.jsonl").unlink(missing_ok=True)
                shutil.rmtree(self.stage_dir / "tensorboard", ignore_errors=True)
        if self.resume is None and self.checkpointer is not None:
            self.checkpointer.clear()
        collectives.barrier()
        return MetricLogger(
            self.stage_dir,
            enabled=self.dist.is_main,
            resume_step=self.resume.step if self.resume else None,
        )

    def end_of_step(
        self, step: int, last: bool, models: dict, snapshot: Callable[[], tuple[dict, dict]]
    ):
        """Checkpoint every `save_steps` and when a stop signal arrived; after a signalled
        checkpoint raise Preempted. `snapshot()` returns (state for every rank, this rank's
        state)."""
        stop = self.stop.requested()
        every = self.cfg.save_steps
        if self.checkpointer is not None and (
            stop or (every > 0 and step % every == 0 and not last)
        ):
            state, local = snapshot()
            self.checkpointer.save(step, models, state, local)
        if stop:
            where = self.checkpointer.root if self.checkpointer else "nowhere (checkpoints off)"
            raise Preempted(
                f"stage {self.stage_dir.name}: stop signal received; checkpoint of step {step} "
                f"saved in {where}. Rerun the same command to resume."
            )


class EpochSampler(Sampler):
    """DistributedSampler's order (per epoch, a global permutation seeded with seed + epoch, strided
    over ranks, remainder dropped), able to start mid-epoch after `skip` global samples.

    Because ranks take the permutation in stride, the first k global batches are exactly its first
    k x global-batch entries whatever the rank count: a resumed run, on any number of ranks, skips
    precisely the samples already trained on.
    """

    def __init__(self, n: int, seed: int, d: collectives.Dist):
        self.n, self.seed, self.d = n, seed, d
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def _mine(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        usable = self.n - self.n % self.d.world_size
        perm = torch.randperm(self.n, generator=g)[:usable].tolist()
        return perm[self.skip :][self.d.rank :: self.d.world_size]

    def __iter__(self):
        return iter(self._mine())

    def __len__(self) -> int:
        return len(self._mine())


def train_loader(
    examples: list, collate: Callable, pad_id: int, micro_batch: int, seed: int, d: collectives.Dist
) -> DataLoader:
    """Shuffled, sharded over ranks, equal batches on every rank (the remainder is dropped)."""
    return DataLoader(
        examples,
        batch_size=micro_batch,
        sampler=EpochSampler(len(examples), seed, d),
        drop_last=True,
        collate_fn=partial(collate, pad_id=pad_id),
    )


def eval_batches(
    examples: list, collate: Callable, pad_id: int, micro_batch: int, d: collectives.Dist
):
    """This rank's strided share of the evaluation set as (batch, real) pairs.

    Every rank yields the same number of batches (ZeRO-3 forwards are collective); a rank whose
    share ran out gets a filler batch with real=False, to run but not to count.
    """
    mine = examples[d.rank :: d.world_size]
    n_batches = math.ceil(math.ceil(len(examples) / d.world_size) / micro_batch)
    for b in range(n_batches):
        chunk = mine[b * micro_batch : (b + 1) * micro_batch]
        yield to_device(collate(chunk or examples[:1], pad_id=pad_id)), bool(chunk)


def to_device(batch: dict) -> dict:
    dev = collectives.device()
    return {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def schedule(
    t: TrainConfig, loader: DataLoader, stage: str, rows: int, d: collectives.Dist
) -> tuple[int, int]:
    """(total optimizer steps, warmup steps) of a supervised stage."""
    per_epoch = len(loader) // t.gradient_accumulation_steps
    if per_epoch == 0:
        need = global_batch(t.micro_batch_size_per_gpu, t.gradient_accumulation_steps, d.world_size)
        raise UserError(
            f"stage {stage}: {rows} training rows are fewer than one global batch of {need} "
            f"({stage}.micro_batch_size_per_gpu x {stage}.gradient_accumulation_steps x "
            f"{d.world_size} ranks)."
        )
    total = per_epoch * t.epochs if t.max_steps < 0 else min(t.max_steps, per_epoch * t.epochs)
    return total, math.ceil(total * t.warmup_ratio)


def supervised_loop(
    ctx: StageContext,
    engine,
    loader: DataLoader,
    t: TrainConfig,
    total_steps: int,
    loss_fn: Callable[[dict], tuple[torch.Tensor, dict]],
    evaluate: Callable[[], dict],
    logger: MetricLogger,
) -> dict:
    """Micro-steps with accumulation, train logs every `logging_steps`, eval every `eval_steps`,
    checkpoints every `save_steps` (resuming from `ctx.resume`).

    `loss_fn(batch)` returns the loss to backpropagate and detached per-batch stats to average.
    Returns the final evaluation.
    """
    d, stage = ctx.dist, ctx.stage_dir.name
    global_rows = loader.batch_size * t.gradient_accumulation_steps * d.world_size
    per_epoch = len(loader) // t.gradient_accumulation_steps  # optimizer steps in a whole epoch
    step, epoch, consumed, window, final_eval = 0, 0, 0, {}, {}
    if ctx.resume is not None:
        local = ctx.checkpointer.load(ctx.resume, {"model": engine})
        s = ctx.resume.state
        epoch, consumed, final_eval = s["epoch"], s["consumed"], s["final_eval"]
        step = epoch * per_epoch + consumed // global_rows  # == s["step"] on the same rank count
        if local is None:  # another rank count: same samples skipped, schedule re-positioned
            collectives.seed_everything(ctx.cfg.seed + step)
            engines.set_schedule_step(engine, step)
        else:
            window = local["window"]
        log.info(
            "stage %s: resuming from step %d of %d (checkpoint %s, written by %d rank(s))",
            stage,
            step,
            total_steps,
            ctx.resume.path,
            ctx.resume.world_size,
        )
    bar = progress(total_steps, stage, d.is_main, initial=step)

    def snapshot():
        state = {"step": step, "epoch": epoch, "consumed": consumed, "final_eval": final_eval}
        return state, {"window": window}

    while step < total_steps and epoch < t.epochs:
        loader.sampler.set_epoch(epoch, skip=consumed)
        engine.train()
        micro = 0
        for batch in loader:
            loss, stats = loss_fn(to_device(batch))
            engine.backward(loss)
            engine.step()
            for k, v in stats.items():
                window.setdefault(k, []).append(float(v))
            micro += 1
            if micro % t.gradient_accumulation_steps:
                continue
            step += 1
            consumed += global_rows
            epoch_done = (
                consumed >= per_epoch * global_rows
            )  # a last partial accumulation is dropped
            if epoch_done:
                epoch, consumed = epoch + 1, 0
            bar.update(1)
            if step % t.logging_steps == 0 or step == total_steps:
                means = {k: sum(v) / len(v) for k, v in window.items()}
                summed = collectives.all_reduce_sum(
                    torch.tensor(list(means.values()), dtype=torch.float64)
                )
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
            ctx.end_of_step(step, step == total_steps, {"model": engine}, snapshot)
            if epoch_done or step == total_steps:
                break
        else:  # this rank count's share ran out before the epoch's steps (after a resume)
            epoch, consumed = epoch + 1, 0
    bar.close()
    return {**final_eval, "steps": step}
