"""When a stage is up to date: its identity and fingerprint.

Here: a stage's identity (what its result depends on, except the rank count: its config section,
the seed, the data and model options, the DeepSpeed configs and the content of its inputs), which
checkpoints record and a resume must match; its fingerprint (the identity hashed) that `stage.json`
records; and `up_to_date`, the check of a finished stage against it. Not here: what each stage
reads (pipeline/inputs.py), running the stages (pipeline/orchestrator.py), the comparison of a
checkpoint's identity with the run's (pipeline/checkpoint.py: `identity_diff`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from pipeline.config import Config, ModelConfig, resolve_path
from pipeline.data import Source, file_digest, is_hub_name
from pipeline.distributed import ds_config
from pipeline.inputs import base_stage

# The data options that shape a stage's rows: fingerprinted through the stage's Sources (so a new
# split reruns only the stages that read data_path), not through the data section of every stage.
SOURCE_OPTIONS = ("data_path", "data_split", "data_weights", "data_format", "eval_fraction")


def _digest(spec, out: Path) -> str | dict:
    if isinstance(spec, Source):  # the datasets' content and how they are cut, converted and mixed
        return {
            "files": [file_digest(p) if is_hub_name(p) else _digest(p, out) for p in spec.paths],
            **spec.describe(),
        }
    path = spec
    p = Path(path)
    stage_json = p.parent / "stage.json"
    if p.name == "model" and stage_json.is_file():  # a model one of our stages produced
        return json.loads(stage_json.read_text())["fingerprint"]
    if not p.exists():
        return f"missing:{path}"
    if p.is_dir() and sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) > 2**28:
        return json.dumps(
            sorted(
                (str(f), f.stat().st_size, f.stat().st_mtime_ns)
                for f in p.rglob("*")
                if f.is_file()
            )
        )
    return file_digest(path)


def identity(stage: str, cfg: Config, inputs: dict[str, str], out: Path) -> dict:
    """What a stage's result depends on, except the rank count: its config section, the seed,
    the data and model options, the DeepSpeed configs and the content of its inputs. A checkpoint
    records it; resuming needs the same."""
    cfg = ds_config.resolve_auto(cfg)  # what "auto" means here is what the stage depends on
    section = dataclasses.asdict(
        {"sft": cfg.sft, "reward": cfg.reward, "ppo": cfg.ppo}[base_stage(stage)]
    )
    section.pop("ensemble_size", None)  # each member is a run of its own (stage reward_i, seed + i)
    # Where the frozen models live, how the critic scores (bit-identical values) and how many rows
    # a scoring forward takes (and the budget they are planned by) change memory and time, not
    # results (beyond fp32 rounding): switching them keeps finished stages and checkpoints
    for key in (
        "ref_placement",
        "reward_placement",
        "critic_scoring",
        "forward_micro_batch_size",
        "memory_budget_gb",
    ):
        section.pop(key, None)
    return {
        "stage": stage,
        "section": section,
        "seed": cfg.seed,
        "data": {
            k: v
            for k, v in dataclasses.asdict(cfg.data).items()
            if not k.endswith("_path") and k not in SOURCE_OPTIONS
        },
        "model": _model_identity(cfg.model),
        "ds": {
            "train": _file_text(cfg.ds_config),
            "inference": _file_text(cfg.ds_inference_config),
        },
        "inputs": {role: _digest(path, out) for role, path in sorted(inputs.items())},
    }


def _model_identity(m: ModelConfig) -> dict:
    """The model options a stage's result depends on. Gradient checkpointing changes memory and
    time, not results, so switching it on to fit in memory keeps finished stages and checkpoints;
    options added later are left out at their defaults so that earlier runs stay up to date."""
    out = dataclasses.asdict(m)
    del out["gradient_checkpointing"]
    for key, default in (("dtype", "fp32"), ("reward_model_name_or_path", "")):
        if out[key] == default:
            del out[key]
    return out


def _file_text(path: str) -> str:
    p = resolve_path(path)
    return p.read_text() if p.is_file() else path


def fingerprint(stage_identity: dict) -> str:
    """The stage's identity, hashed: a finished stage is up to date while it is unchanged. The rank
    count is left out: a stage trained on 8 GPUs stays done when the next run has 4."""
    return hashlib.sha256(json.dumps(stage_identity, sort_keys=True).encode()).hexdigest()


def up_to_date(stage_dir: Path, fp: str) -> dict | None:
    marker = stage_dir / "stage.json"
    if marker.is_file() and (stage_dir / "model").is_dir():
        record = json.loads(marker.read_text())
        if record.get("fingerprint") == fp:
            return record
    return None
