"""The DeepSpeed JSON of every engine, assembled in one place from the run config.

`load_ds_config` reads a file of `ds_configs/` (engine concerns: ZeRO stage, offload) and fills in
what the run config owns (batch sizes, gradient clipping, precision), refusing a file that says
otherwise; `ds_configs` gives a stage's "train" (and for PPO "inference") configs; `engine_config`
adds what one trained engine needs on top (DeepSpeed's TensorBoard monitor, universal-checkpoint
loading). "auto" choices (model.dtype, ds_config, ds_inference_config) are made here for the
accelerator (`resolve_auto`). The typed options themselves live in pipeline/config.py, which also
computes the per-rank PPO sizes (`ppo_sizes`) used here.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from deepspeed.accelerator import get_accelerator

from pipeline.config import AUTO, Config, TrainConfig, ppo_sizes, resolve_path
from pipeline.errors import UserError

log = logging.getLogger(__name__)


def load_ds_config(path: Path, dtype: str = "fp32", **fill) -> dict:
    """Read a DeepSpeed JSON and fill in batch sizes and precision (`model.dtype`) from the run
    config.

    Batch sizes and precision live in the run config; a DS file that sets them differently is
    refused rather than silently winning or losing.
    """
    if not path.is_file():
        raise UserError(f"DeepSpeed config {path} does not exist.")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"DeepSpeed config {path} is not valid JSON: {e}") from None
    except UnicodeDecodeError as e:
        raise UserError(
            f"DeepSpeed config {path} is not UTF-8 text (byte {e.object[e.start]:#04x} "
            f"at offset {e.start})."
        ) from None
    if not isinstance(cfg, dict):
        raise UserError(f"DeepSpeed config {path}: the top level must be an object.")
    zero = cfg.get("zero_optimization", {})
    stage = zero.get("stage") if isinstance(zero, dict) else None
    if stage != 3:
        raise UserError(
            f"DeepSpeed config {path}: zero_optimization.stage must be 3 (got {stage!r})."
        )
    for key, owner in (
        ("optimizer", "the run config's learning_rate and weight_decay"),
        ("scheduler", "the run config's lr_scheduler and warmup"),
    ):
        if key in cfg:  # DeepSpeed would silently ignore it in favour of ours
            raise UserError(
                f"DeepSpeed config {path} sets {key!r}, which would be ignored: training "
                f"uses AdamW with {owner}; remove {key!r} from the DeepSpeed file."
            )
    _refuse_hybrid_engine(cfg, path)
    for key, value in fill.items():
        if key in cfg and cfg[key] not in ("auto", value):
            raise UserError(
                f"DeepSpeed config {path} sets {key}={cfg[key]!r} but the run config "
                f"gives {value!r}; remove it from the DeepSpeed file (the run config owns it)."
            )
        cfg[key] = value
    if "train_batch_size" in cfg and cfg["train_batch_size"] != "auto":
        raise UserError(
            f"DeepSpeed config {path} sets train_batch_size; remove it (it is derived "
            f"from micro batch x accumulation x ranks)."
        )
    cfg.pop("train_batch_size", None)
    cfg.setdefault("steps_per_print", 10**9)  # we log ourselves
    _fill_precision(cfg, path, dtype)
    return cfg


def _refuse_hybrid_engine(cfg: dict, path: Path) -> None:
    """DeepSpeed's hybrid engine cannot run with DeepSpeed 0.19 and transformers 5 (issue #14)."""
    section = cfg.get("hybrid_engine", {})
    if isinstance(section, dict) and section.get("enabled", False) in (False, "auto"):
        return
    raise UserError(
        f"DeepSpeed config {path} enables hybrid_engine, which this pipeline refuses: with "
        f"DeepSpeed 0.19 and transformers 5 DeepSpeed's hybrid engine does not run (its OPT "
        f"policy skips cache-based layers so generate raises, Llama-3 rope_type=llama3 raises at "
        f"initialisation, num_key_value_heads (GQA) is not sized, inference_tp_size > 1 does not "
        f"gather the attention mask). Generation already materialises the actor's weights "
        f"for fast decoding on every accelerator (pipeline/generation.py); remove the "
        f'hybrid_engine section from the DeepSpeed file or set "enabled": false.'
    )


# DeepSpeed's precision sections; "bfloat16" is its older name for "bf16" ("bf16" wins if both).
_PRECISION_SECTIONS = {"bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16"}


def _fill_precision(cfg: dict, path: Path, dtype: str) -> None:
    """Enable exactly the precision section `dtype` names; refuse a file that enables another."""
    for key, precision in _PRECISION_SECTIONS.items():
        section = cfg.get(key, {})
        if not isinstance(section, dict):
            raise UserError(
                f"DeepSpeed config {path}: {key!r} must be an object (got {section!r})."
            )
        if section.get("enabled", False) not in (False, "auto") and precision != dtype:
            raise UserError(
                f"DeepSpeed config {path} enables {key} but the run config has "
                f"model.dtype={dtype!r}; set the precision with --model.dtype (the run config "
                f'owns it) and remove "enabled" from the file\'s {key!r} section.'
            )
    cfg.pop("bfloat16", None)
    cfg["bf16"] = {**cfg.get("bf16", {}), "enabled": dtype == "bf16"}
    cfg["fp16"] = {**cfg.get("fp16", {}), "enabled": dtype == "fp16"}
    if dtype == "fp16":
        cfg["fp16"].setdefault("loss_scale", 0)  # 0: DeepSpeed's dynamic loss scaling


# ds_config / ds_inference_config "auto": one pair tuned for DeepSpeed's CPU accelerator (gloo: no
# overlap, small buckets, unpinned offload), one for GPUs (overlap, larger buckets, pinned offload).
AUTO_DS_CONFIGS = {
    "cpu": ("ds_configs/zero3_train.json", "ds_configs/zero3_offload_inference.json"),
    "gpu": ("ds_configs/zero3_train_gpu.json", "ds_configs/zero3_offload_inference_gpu.json"),
}


def auto_dtype(accelerator=None) -> str:
    """model.dtype "auto": bf16 on an accelerator other than the CPU that supports it, else fp32
    (DeepSpeed's CPU accelerator answers bf16 support, but the CPU results must stay fp32)."""
    acc = accelerator or get_accelerator()
    return "bf16" if acc.device_name() != "cpu" and acc.is_bf16_supported() else "fp32"


def resolve_auto(cfg: Config, accelerator=None) -> Config:
    """`cfg` with every "auto" (model.dtype, ds_config, ds_inference_config) replaced by the choice
    for `accelerator` (DeepSpeed's, or a stand-in answering device_name / is_bf16_supported);
    `cfg` itself when nothing is auto. A DS file the user names is used as given."""
    m = cfg.model
    if AUTO not in (m.dtype, cfg.ds_config, cfg.ds_inference_config):
        return cfg
    acc = accelerator or get_accelerator()
    train, inference = AUTO_DS_CONFIGS["cpu" if acc.device_name() == "cpu" else "gpu"]
    return dataclasses.replace(
        cfg,
        model=dataclasses.replace(m, dtype=auto_dtype(acc) if m.dtype == AUTO else m.dtype),
        ds_config=train if cfg.ds_config == AUTO else cfg.ds_config,
        ds_inference_config=inference
        if cfg.ds_inference_config == AUTO
        else cfg.ds_inference_config,
    )


def check_precision(dtype: str, accelerator=None) -> None:
    """Refuse a precision this accelerator cannot train in (`accelerator`: DeepSpeed's, or a
    stand-in answering is_bf16_supported / is_fp16_supported)."""
    acc = accelerator or get_accelerator()
    supported = {
        "fp32": True,
        "bf16": bool(acc.is_bf16_supported()),
        "fp16": bool(acc.is_fp16_supported()),
    }
    if supported[dtype]:
        return
    others = " or ".join(d for d in ("bf16", "fp16", "fp32") if supported[d] and d != dtype)
    raise UserError(
        f"option model.dtype={dtype}: the {acc.device_name()} accelerator does not support "
        f"{dtype} (DeepSpeed's is_{dtype}_supported() is false); use --model.dtype {others}."
    )


def ds_configs(cfg: Config, stage: str, world_size: int) -> dict[str, dict]:
    """The DeepSpeed configs of a stage, batch sizes filled in from the run config.

    "train" for the trained engines; PPO also has "inference" for the frozen reference and reward
    model. Every engine runs in `model.dtype`. Raises UserError for a missing or contradicting DS
    file, or PPO sizes that do not divide.
    """
    cfg = resolve_auto(cfg)
    dtype = cfg.model.dtype
    if stage in ("sft", "reward"):
        t: TrainConfig = getattr(cfg, stage)
        return {
            "train": load_ds_config(
                resolve_path(cfg.ds_config),
                dtype,
                train_micro_batch_size_per_gpu=t.micro_batch_size_per_gpu,
                gradient_accumulation_steps=t.gradient_accumulation_steps,
                gradient_clipping=t.gradient_clipping,
            )
        }
    p = cfg.ppo
    sizes = ppo_sizes(p, world_size)
    micro = sizes.micro_batch_size_per_gpu
    if sizes.micro_clamped:
        log.info(
            "ppo.micro_batch_size_per_gpu=%d is more than a rank's share of a mini-batch "
            "(ppo.mini_batch_size %d / %d ranks): micro-batches of %d",
            p.micro_batch_size_per_gpu,
            p.mini_batch_size,
            world_size,
            micro,
        )
    return {
        "train": load_ds_config(
            resolve_path(cfg.ds_config),
            dtype,
            train_micro_batch_size_per_gpu=micro,
            gradient_accumulation_steps=sizes.gradient_accumulation_steps,
            gradient_clipping=p.gradient_clipping,
        ),
        "inference": load_ds_config(
            resolve_path(cfg.ds_inference_config),
            dtype,
            train_micro_batch_size_per_gpu=micro,
            gradient_accumulation_steps=1,
        ),
    }


def universal_loading(ds_config: dict) -> dict:
    """The DS config with universal-checkpoint loading on (resuming on a different rank count)."""
    return {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}


def engine_config(ds_config: dict, job: str, *, universal: bool, tensorboard: Path | None) -> dict:
    """The DS config of one trained engine: universal-checkpoint loading when resuming on another
    rank count; with `tensorboard`, DeepSpeed's own monitor writing job `job` there."""
    if universal:
        ds_config = universal_loading(ds_config)
    if tensorboard is None:
        return ds_config
    return {
        **ds_config,
        "tensorboard": {"enabled": True, "job_name": job, "output_path": str(tensorboard)},
    }
