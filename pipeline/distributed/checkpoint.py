"""DeepSpeed's own checkpoints of an engine: save, load, conversion to the universal form.

What DeepSpeed writes per engine (this rank's partition of the weights, the optimizer and the
scheduler) and the types it pickles (`safe_globals`). The checkpoint folder around the engines
(manifest, checksums, `latest`, random states, fall-back to an older checkpoint) is
pipeline/checkpoint.py; the DS config that loads a universal checkpoint is
ds_config.universal_loading.
"""

from __future__ import annotations

from pathlib import Path


def save_engine(engine, folder: Path, tag: str) -> list[str]:
    """DeepSpeed's ZeRO-3 checkpoint of `engine` (this rank's partition of weights, optimizer and
    scheduler) into `folder/tag`. Collective.

    Write errors (a full disk) are returned, not raised, so that every rank still reaches
    DeepSpeed's closing barrier and the caller can decide together; the rest of this rank's
    writes are skipped after the first error.
    """
    errors: list[str] = []
    inner = engine.checkpoint_engine.save

    def save(state_dict, path):
        if errors:
            return
        try:
            inner(state_dict, path)
        except (
            OSError,
            RuntimeError,
        ) as e:  # torch.save's zip writer reports a failed write as RuntimeError
            errors.append(f"{path}: {getattr(e, 'strerror', None) or e}")

    engine.checkpoint_engine.save = save
    try:
        engine.save_checkpoint(str(folder), tag=tag, save_latest=False)
    finally:
        engine.checkpoint_engine.save = inner
    return errors


def load_engine(engine, folder: Path, tag: str) -> None:
    """Load weights, optimizer and scheduler saved by `save_engine` (or its universal form, when
    the engine was built with `universal_loading`). Collective."""
    path, _ = engine.load_checkpoint(
        str(folder), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if path is None:
        raise RuntimeError(f"DeepSpeed found no checkpoint {tag} in {folder}")


def to_universal(src: Path, dst: Path, workers: int = 1) -> None:
    """Convert one engine's ZeRO checkpoint to DeepSpeed's rank-count-independent universal form,
    with `workers` processes extracting the shards (and half as many merging them)."""
    import subprocess
    import sys

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "deepspeed.checkpoint.ds_to_universal",
            "--input_folder",
            str(src),
            "--output_folder",
            str(dst),
            "--num_extract_workers",
            str(max(1, workers)),
            "--num_merge_workers",
            str(max(1, workers // 2)),
            "--inject_missing_state",
        ],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"converting {src} to a universal checkpoint failed:\n{proc.stderr[-2000:]}"
        )


def safe_globals() -> list:
    """The non-tensor types DeepSpeed pickles into its checkpoints: the only ones we unpickle."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    return [ZeroStageEnum, LossScaler, DynamicLossScaler]
