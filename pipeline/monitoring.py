"""Metrics to TensorBoard and metrics.jsonl (rank 0 only), logging setup, phase timers."""

from __future__ import annotations

import json
import logging
import math
import resource
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch


def setup_logging(is_main: bool) -> None:
    """Rank 0 logs at INFO; other ranks only errors, so nothing is repeated per rank."""
    logging.basicConfig(
        level=logging.INFO if is_main else logging.ERROR,
        stream=sys.stdout,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
    import warnings

    # torch.distributed's deprecation notices fire inside DeepSpeed on every rank: not ours to fix.
    warnings.filterwarnings(
        "ignore", category=FutureWarning, message=r".*torch\.distributed\..* is deprecated"
    )
    if not is_main:
        warnings.filterwarnings("ignore")
    for noisy in ("DeepSpeed", "torch.distributed", "transformers", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING if is_main else logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except ImportError:
        pass


def _row_step(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return 1 << 62  # a torn last line from a killed run: dropped


class MetricLogger:
    """Scalars to `<stage_dir>/tensorboard` and `<stage_dir>/metrics.jsonl`, on rank 0 only.

    Each metrics.jsonl row is `{"step", "time", "elapsed_s", <tag>: value, ...}`: `time` is the
    wall clock (UNIX seconds) when the row was written, `elapsed_s` the seconds since the stage
    started logging, carried over a resume (the time between the interrupted attempt and its
    resume is not counted). TensorBoard keeps its own wall time for every scalar.
    """

    def __init__(
        self, stage_dir: Path, enabled: bool, resume_step: int | None = None, clock=time.time
    ):
        """`resume_step`: continuing a run from a checkpoint of that step. What the interrupted
        attempt logged after it is dropped: from metrics.jsonl here, and in TensorBoard through
        its own purge_step mechanism, so the step axis stays monotonic. `clock`: UNIX seconds."""
        self.enabled = enabled
        self._writer = None
        self._jsonl = None
        self._clock = clock
        self._start, self._elapsed_before = clock(), 0.0
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            stage_dir.mkdir(parents=True, exist_ok=True)
            path = stage_dir / "metrics.jsonl"
            if resume_step is not None and path.is_file():
                kept = [
                    line
                    for line in path.read_text(encoding="utf-8").splitlines()
                    if line.strip() and _row_step(line) <= resume_step
                ]
                if kept:
                    self._elapsed_before = float(json.loads(kept[-1]).get("elapsed_s", 0.0))
                tmp = path.with_name(path.name + ".tmp")
                tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
                tmp.replace(path)
            self._writer = SummaryWriter(
                str(stage_dir / "tensorboard"),
                purge_step=None if resume_step is None else resume_step + 1,
            )
            self._jsonl = path.open("a", encoding="utf-8")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in metrics.items()}
        for tag, value in clean.items():
            self._writer.add_scalar(tag, value, step)
        now = self._clock()
        row = {
            "step": step,
            "time": round(now, 3),
            "elapsed_s": round(now - self._start + self._elapsed_before, 3),
            **{k: (v if math.isfinite(v) else str(v)) for k, v in clean.items()},
        }
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()

    def text(self, tag: str, text: str, step: int) -> None:
        if self.enabled:
            self._writer.add_text(tag, text, step)

    def close(self) -> None:
        if self.enabled:
            self._writer.close()
            self._jsonl.close()


def device_accelerator():
    """torch's accelerator (CUDA, XPU, ...) when one is in use, else None (CPU only).

    `torch.accelerator` is what DeepSpeed's accelerator wraps on GPUs; it answers synchronize()
    and the memory counters (memory_allocated, memory_reserved, max_memory_allocated, in bytes).
    """
    acc = getattr(torch, "accelerator", None)
    return acc if acc is not None and acc.is_available() else None


class PhaseTimer:
    """Seconds per named phase: `with timer("generation"): ...`, then `timer.seconds`.

    On an accelerator kernels run asynchronously, so the device is synchronised when a phase starts
    and ends: its time is the time of its own kernels, not of the previous phase's still in flight.
    Each phase's end also records the accelerator memory (`memory_metrics()`).
    `accelerator`: anything answering synchronize() and the memory counters; None (the default):
    `device_accelerator()`, which is None on CPU (no synchronisation, no memory figures).
    """

    def __init__(self, accelerator=None):
        self.acc = accelerator if accelerator is not None else device_accelerator()
        self.seconds: dict[str, float] = {}
        self.memory: dict[
            str, tuple[float, float]
        ] = {}  # phase -> (allocated, reserved) GiB at its end

    @contextmanager
    def __call__(self, name: str):
        if self.acc is not None:
            self.acc.synchronize()
        start = time.perf_counter()
        yield
        if self.acc is not None:
            self.acc.synchronize()
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
        if self.acc is not None:
            self.memory[name] = (
                self.acc.memory_allocated() / 2**30,
                self.acc.memory_reserved() / 2**30,
            )

    def memory_metrics(self) -> dict[str, float]:
        """`memory/accelerator_peak_gb` (peak allocated since the process started) and
        `memory/<phase>_allocated_gb` / `_reserved_gb` at each phase's end; {} without an
        accelerator."""
        if self.acc is None:
            return {}
        out = {"memory/accelerator_peak_gb": self.acc.max_memory_allocated() / 2**30}
        for name, (allocated, reserved) in self.memory.items():
            out[f"memory/{name}_allocated_gb"] = allocated
            out[f"memory/{name}_reserved_gb"] = reserved
        return out


def peak_rss_gb() -> float:
    """Peak resident memory of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def progress(total: int, desc: str, enabled: bool, initial: int = 0):
    """A tqdm bar on rank 0; a silent stand-in elsewhere."""
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        desc=desc,
        disable=not enabled,
        dynamic_ncols=True,
        mininterval=2.0,
        initial=initial,
    )


def overoptimisation_plot(rows: list[dict], path: Path) -> bool:
    """Gold and reward-model score against KL to the reference over a PPO run, as a PNG.

    The curve of Gao et al. 2022 ("Scaling Laws for Reward Model Overoptimization"): the
    learned reward keeps rising with KL while the gold score peaks and turns down. Both are
    shown as the change since step 0 (the SFT policy). Needs matplotlib (the `plot` extra);
    returns False when it is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logging.getLogger(__name__).info(
            "matplotlib not installed: no over-optimisation plot (pip install -e '.[plot]')."
        )
        return False
    evals = [r for r in rows if "eval/kl_to_ref" in r and "eval/reward_score" in r]
    if len(evals) < 2:
        return False
    kl = [max(float(r["eval/kl_to_ref"]), 0.0) for r in evals]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for key, label in (
        ("eval/reward_score", "reward model"),
        ("eval/gold_score", "gold (true preference)"),
    ):
        if key in evals[0]:
            ax.plot(
                kl, [float(r[key]) - float(evals[0][key]) for r in evals], marker="o", label=label
            )
    for r, x in zip(evals, kl):
        ax.annotate(
            str(r["step"]),
            (x, float(r["eval/reward_score"]) - float(evals[0]["eval/reward_score"])),
            fontsize=6,
            alpha=0.6,
        )
    ax.set_xlabel("KL(policy || reference), nats per response")
    ax.set_ylabel("score change since SFT (step 0)")
    ax.set_title("Reward over-optimisation (labels: PPO step)")
    ax.axhline(0.0, color="grey", lw=0.5)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True
