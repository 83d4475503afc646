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


def setup_logging(is_main: bool) -> None:
    """Rank 0 logs at INFO; other ranks only errors, so nothing is repeated per rank."""
    logging.basicConfig(level=logging.INFO if is_main else logging.ERROR, stream=sys.stdout,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        force=True)
    import warnings

    if not is_main:
        warnings.filterwarnings("ignore")
    for noisy in ("DeepSpeed", "torch.distributed", "transformers", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING if is_main else logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except ImportError:
        pass


class MetricLogger:
    """Scalars to `<stage_dir>/tensorboard` and `<stage_dir>/metrics.jsonl`, on rank 0 only."""

    def __init__(self, stage_dir: Path, enabled: bool):
        self.enabled = enabled
        self._writer = None
        self._jsonl = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            stage_dir.mkdir(parents=True, exist_ok=True)
            self._writer = SummaryWriter(str(stage_dir / "tensorboard"))
            self._jsonl = (stage_dir / "metrics.jsonl").open("a", encoding="utf-8")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in metrics.items()}
        for tag, value in clean.items():
            self._writer.add_scalar(tag, value, step)
        row = {"step": step, **{k: (v if math.isfinite(v) else str(v)) for k, v in clean.items()}}
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()

    def text(self, tag: str, text: str, step: int) -> None:
        if self.enabled:
            self._writer.add_text(tag, text, step)

    def close(self) -> None:
        if self.enabled:
            self._writer.close()
            self._jsonl.close()


class PhaseTimer:
    """Seconds per named phase: `with timer("generation"): ...`, then `timer.seconds`."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        yield
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def peak_rss_gb() -> float:
    """Peak resident memory of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def progress(total: int, desc: str, enabled: bool):
    """A tqdm bar on rank 0; a silent stand-in elsewhere."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, dynamic_ncols=True, mininterval=2.0)
