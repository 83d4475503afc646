"""What each stage reads: input resolution.

Here: the stages and the reward ensemble's member runs, the role -> path / data `Source` map of
every stage (the user's paths, else `data.data_path`'s share, else the embedded default task, which
`prepare_task` writes), which requested stages must run, and the checks that every given path
exists. Not here: when a stage is up to date, its identity and fingerprint
(pipeline/fingerprint.py), running the stages and the checks before the first one
(pipeline/orchestrator.py).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from pipeline import default_task, reward_fns
from pipeline.config import AUTO, Config, max_new_tokens, resolve_path
from pipeline.config_checks import parse_split
from pipeline.data import Source, is_hub_name
from pipeline.distributed import collectives
from pipeline.errors import UserError

log = logging.getLogger("pipeline")
STAGES = ("sft", "reward", "ppo")


def base_stage(stage: str) -> str:
    """The stage a run belongs to: `reward_2`, the third member of a reward ensemble, is
    `reward`."""
    return stage.partition("_")[0]


def reward_members(cfg: Config) -> tuple[str, ...]:
    """The reward stage's runs: `reward`, then `reward_1` ... for the other ensemble members, each a
    stage of its own (own folder, fingerprint, checkpoints and resume), seeded `seed + i`."""
    return ("reward",) + tuple(f"reward_{i}" for i in range(1, cfg.reward.ensemble_size))


def stage_config(cfg: Config, stage: str) -> Config:
    """The config a run sees: an ensemble member's seed differs (initialisation and data order)."""
    i = int(stage.rpartition("_")[2]) if "_" in stage else 0
    return dataclasses.replace(cfg, seed=cfg.seed + i) if i else cfg


def _uses_reward_model(cfg: Config) -> bool:
    return cfg.ppo.reward_model_coef > 0


SCRATCH_SHAPE = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")


def prepare_task(cfg: Config, d: collectives.Dist, out: Path) -> Path:
    """Generate the embedded default task under `<output_dir>/task` (rank 0, once per config)."""
    folder = out / "task"
    spec = {
        "version": default_task.VERSION,
        "seed": cfg.seed,
        "task": dataclasses.asdict(cfg.task),
        "model": {k: getattr(cfg.model, k) for k in SCRATCH_SHAPE},
        "max_positions": cfg.data.max_prompt_len
        + max(cfg.data.max_response_len, max_new_tokens(cfg)),
    }
    marker = folder / "task.json"
    if d.is_main and not (marker.is_file() and json.loads(marker.read_text()) == spec):
        t = cfg.task
        default_task.generate(
            folder, cfg.seed, t.num_sft, t.num_pairs, t.num_prompts, t.num_eval, t.label_noise
        )
        default_task.build_tokenizer(folder / "tokenizer")
        m = cfg.model
        (folder / "model").mkdir(exist_ok=True)
        config = default_task.model_config(
            len(default_task.vocabulary()),
            m.hidden_size,
            m.num_hidden_layers,
            m.num_attention_heads,
            m.intermediate_size,
            spec["max_positions"],
        )
        (folder / "model" / "config.json").write_text(json.dumps(config, indent=2))
        marker.write_text(json.dumps(spec))
        log.info("default task written to %s", folder)
    collectives.barrier()
    return folder


DATA_ROLES = {
    "sft": ("sft_data", "sft_eval_data"),
    "reward": ("reward_data", "reward_eval_data"),
    "ppo": ("prompt_data", "eval_prompt_data"),
}
_DEFAULT_FILES = {
    "sft_data": "sft.jsonl",
    "sft_eval_data": "sft_eval.jsonl",
    "reward_data": "pairs.jsonl",
    "reward_eval_data": "pairs_eval.jsonl",
    "prompt_data": "prompts.jsonl",
    "eval_prompt_data": "prompts_eval.jsonl",
}


def data_sources(cfg: Config, stage: str, task: Path) -> dict[str, Source | str]:
    """Training and eval rows of a stage: its own paths where given, else its share of
    `data.data_path`, else the default task's files. User training rows without an eval path of
    their own lose a seeded `data.eval_fraction` slice to evaluation."""
    dc = cfg.data
    train_role, eval_role = DATA_ROLES[stage]
    own_train, own_eval = getattr(dc, f"{train_role}_path"), getattr(dc, f"{eval_role}_path")
    common = {"format": dc.data_format, "seed": cfg.seed, "eval_fraction": dc.eval_fraction}
    if own_train:
        train = Source((own_train,), **common)
    elif dc.data_path:
        train = Source(
            tuple(dc.data_path),
            weights=tuple(dc.data_weights),
            split=parse_split(dc.data_split),
            part=STAGES.index(stage),
            **common,
        )
    else:
        train = str(task / _DEFAULT_FILES[train_role])
    if own_eval:
        held_out = Source((own_eval,), **common)
    elif isinstance(train, Source):
        held_out = dataclasses.replace(train, holdout="eval")
        train = dataclasses.replace(train, holdout="train")
    else:
        held_out = str(task / _DEFAULT_FILES[eval_role])
    return {train_role: train, eval_role: held_out}


def ptx_source(cfg: Config, task: Path) -> dict[str, Source | str]:
    """PPO-ptx rows (`ptx_data`): `ppo.ptx_data_path`, else the SFT stage's training rows; none when
    PTX is off and no path is given (a given path is always checked and fingerprinted)."""
    p = cfg.ppo
    if p.ptx_data_path:  # every row of it (no split, no held-out slice)
        return {"ptx_data": Source((p.ptx_data_path,), format=cfg.data.data_format)}
    if p.ptx_coef == 0:
        return {}
    sft_rows = data_sources(cfg, "sft", task)["sft_data"]
    if isinstance(sft_rows, str) and isinstance(
        data_sources(cfg, "ppo", task)["prompt_data"], Source
    ):
        raise UserError(
            f"option ppo.ptx_coef={p.ptx_coef}: PTX needs supervised rows, and this run gives no "
            "SFT data (it would fall back to the embedded default task's reviews while PPO reads "
            "your prompts). Give --ppo.ptx_data_path, or --data.sft_data_path / --data.data_path."
        )
    return {"ptx_data": sft_rows}


def stage_inputs(cfg: Config, out: Path, task: Path) -> dict[str, dict]:
    """Role -> path (models, tokenizers) or data `Source` for every stage: the user's where given,
    else the default task's."""
    dc = cfg.data
    base_model = cfg.model.model_name_or_path or str(task / "model")
    tokenizer = dc.tokenizer_path or cfg.model.model_name_or_path or str(task / "tokenizer")
    sft_model = out / "sft" / "model"
    actor = cfg.ppo.actor_model_path or str(sft_model)
    from_sft = _reward_from_sft(cfg)
    reward_base = cfg.model.reward_model_name_or_path  # a base model of the reward model's own
    reward = {
        "tokenizer": reward_base or (str(sft_model) if sft_model.is_dir() else tokenizer),
        "model": reward_base or (str(sft_model) if from_sft and sft_model.is_dir() else base_model),
        **data_sources(cfg, "reward", task),
    }
    return {
        "sft": {"tokenizer": tokenizer, "model": base_model, **data_sources(cfg, "sft", task)},
        **{member: reward for member in reward_members(cfg)},
        "ppo": {
            "tokenizer": actor,
            "actor": actor,
            **_ppo_reward_inputs(cfg, out),
            **data_sources(cfg, "ppo", task),
            **ptx_source(cfg, task),
        },
    }


def _ppo_reward_inputs(cfg: Config, out: Path) -> dict[str, str]:
    """PPO's reward models (`reward_model`, `reward_model_1`, ... for an ensemble; none when the
    reward is ppo.reward_fn alone) and the files of its reward and evaluation functions."""
    p = cfg.ppo
    roles = {}
    if _uses_reward_model(cfg):
        roles = (
            {"reward_model": p.reward_model_path}
            if p.reward_model_path
            else {
                ("reward_model" if m == "reward" else f"reward_model_{m.rpartition('_')[2]}"): str(
                    out / m / "model"
                )
                for m in reward_members(cfg)
            }
        )
    for option in ("reward_fn", "eval_reward_fn"):
        if getattr(p, option):
            roles[option] = str(reward_fns.source_file(getattr(p, option), f"ppo.{option}"))
    return roles


def _reward_from_sft(cfg: Config) -> bool:
    """Does the reward model start from the SFT output? The default task's from-scratch model: a
    reward model fine-tuned from the SFT policy learned sentiment but, on some seeds, never "is it
    about the asked item" (item-swap pairs at chance); from the SFT's own starting point it learns
    both. A pretrained model keeps the SFT start."""
    if cfg.model.reward_model_name_or_path:  # a base model of its own
        return False
    from pipeline.models import has_weights

    m = cfg.model.model_name_or_path
    pretrained = bool(m) and not (
        Path(m).is_dir() and not has_weights(m)
    )  # a config-only folder: from scratch
    return cfg.reward_init == "sft" or (cfg.reward_init == "auto" and pretrained)


def needed_stages(cfg: Config, stages: tuple[str, ...]) -> tuple[tuple[str, ...], dict[str, str]]:
    """The requested stages that must run, and why each other one does not.

    A stage whose model PPO takes from a path instead (`ppo.actor_model_path` for SFT,
    `ppo.reward_model_path` for the reward model) runs only when the last requested stage or
    another running stage still reads its model: PPO started from existing models goes straight
    to PPO (DeepSpeed-Chat's step 3 alone)."""
    superseded = {
        "sft": "PPO starts from ppo.actor_model_path" if cfg.ppo.actor_model_path else "",
        "reward": (
            "PPO scores with ppo.reward_model_path"
            if cfg.ppo.reward_model_path
            else "PPO's reward is ppo.reward_fn alone (ppo.reward_model_coef 0)"
            if not _uses_reward_model(cfg)
            else ""
        ),
    }
    reads = {
        "ppo": {
            "sft": not cfg.ppo.actor_model_path,
            "reward": not cfg.ppo.reward_model_path and _uses_reward_model(cfg),
        },
        "reward": {"sft": _reward_from_sft(cfg)},
    }
    keep = [stages[-1]]
    for stage in reversed(stages[:-1]):
        if not superseded[stage] or any(reads.get(later, {}).get(stage, False) for later in keep):
            keep.insert(0, stage)
    not_run = {
        s: f"{superseded[s]} and no other stage reads its model" for s in stages if s not in keep
    }
    return tuple(keep), not_run


def in_task(spec, task: Path) -> bool:
    """Is this input the default task's (a file, its tokenizer or its from-scratch model)?"""
    return isinstance(spec, str) and (Path(spec) == task or task in Path(spec).parents)


def needs_task(cfg: Config, stages: tuple[str, ...] = STAGES) -> bool:
    """The default task is generated only when a stage that runs reads from it: its data, its
    tokenizer or its from-scratch model. PPO from two given models on prompts of one's own does
    not."""
    out = Path(cfg.output_dir)
    inputs = stage_inputs(cfg, out, out / "task")
    return any(
        in_task(spec, out / "task")
        for stage in stages
        for spec in inputs[base_stage(stage)].values()
    )


# Every option that names a file or folder, and what it should name.
_MODEL = "a local model folder or a hub model name"
_DATASETS = "local json/jsonl/parquet/csv files or folders, or hub dataset names"
PATH_OPTIONS = {
    "model.model_name_or_path": _MODEL,
    "model.reward_model_name_or_path": _MODEL,
    "data.tokenizer_path": "a local tokenizer folder or a hub name",
    "ppo.actor_model_path": "a policy model folder, e.g. <output_dir>/sft/model of an earlier run",
    "ppo.reward_model_path": (
        "a reward model folder, e.g. <output_dir>/reward/model of an earlier run"
    ),
    **{f"data.{role}_path": _DATASETS for roles in DATA_ROLES.values() for role in roles},
    "data.data_path": _DATASETS,
    "ppo.ptx_data_path": _DATASETS,
}


def check_given_paths(cfg: Config) -> None:
    """Every path the user gave exists (or is a hub name, checked when it is loaded), whether or
    not the stages that run read it: a mistyped path is a mistake even where it is not needed."""
    for option, kind in PATH_OPTIONS.items():
        section, _, name = option.partition(".")
        value = getattr(getattr(cfg, section), name)
        for path in value if isinstance(value, list) else [value] if value else []:
            if not (Path(path).exists() or is_hub_name(path)):
                raise UserError(f"option {option}: {path} does not exist (expected {kind}).")
    for option in ("reward_fn", "eval_reward_fn"):
        if getattr(cfg.ppo, option):
            reward_fns.source_file(getattr(cfg.ppo, option), f"ppo.{option}")
    for option in ("ds_config", "ds_inference_config"):
        value = getattr(cfg, option)
        if value != AUTO and not resolve_path(value).is_file():
            raise UserError(
                f"option {option}: {value} does not exist (expected a DeepSpeed JSON file, or "
                "auto)."
            )


def check_exists(stage: str, inputs: dict, out: Path) -> None:
    """Local paths must exist; hub names (`org/name`) are checked when they are loaded."""
    for role, spec in inputs.items():
        for path in spec.paths if isinstance(spec, Source) else (spec,):
            if Path(path).exists() or out in Path(path).parents or is_hub_name(path):
                continue
            kinds = (
                "local json/jsonl/parquet/csv files or folders, or hub dataset names"
                if isinstance(spec, Source)
                else "local folders or hub names"
            )
            raise UserError(
                f"stage {stage}: {role} path {path} does not exist ({role.split('_')[0]} "
                f"inputs are {kinds})."
            )
