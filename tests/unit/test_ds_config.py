"""DeepSpeed JSON files: the run config owns batch sizes, clipping, optimizer and schedule."""
import json
import re

import pytest

from pipeline.config import Config, PPOConfig
from pipeline.engines import load_ds_config
from pipeline.errors import UserError
from pipeline.stages.common import ds_configs

ZERO3 = {"zero_optimization": {"stage": 3}}
FILL = {"train_micro_batch_size_per_gpu": 16, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0}


def _ds(tmp_path, content, name="ds.json"):
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    return path


def test_batch_sizes_come_from_the_run_config(tmp_path):
    cfg = load_ds_config(_ds(tmp_path, ZERO3), **FILL)
    assert {k: cfg[k] for k in FILL} == FILL
    # "auto" or the same value are not contradictions
    same = {**ZERO3, "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": 1}
    assert load_ds_config(_ds(tmp_path, same), **FILL)["train_micro_batch_size_per_gpu"] == 16


@pytest.mark.parametrize("key, value", [
    ("train_micro_batch_size_per_gpu", 4), ("gradient_accumulation_steps", 8), ("gradient_clipping", 0.5)])
def test_contradicting_batch_key_is_refused_naming_file_key_and_both_values(tmp_path, key, value):
    path = _ds(tmp_path, {**ZERO3, key: value})
    with pytest.raises(UserError) as e:
        load_ds_config(path, **FILL)
    assert f"DeepSpeed config {path} sets {key}={value!r} but the run config gives {FILL[key]!r}" in str(e.value)


def test_train_batch_size_is_refused(tmp_path):
    path = _ds(tmp_path, {**ZERO3, "train_batch_size": 64})
    with pytest.raises(UserError, match=re.escape(f"{path} sets train_batch_size")):
        load_ds_config(path, **FILL)


@pytest.mark.parametrize("key", ["optimizer", "scheduler"])
def test_optimizer_or_scheduler_section_is_refused(tmp_path, key):
    # DeepSpeed silently prefers the optimizer/schedule we pass, so the file's would never apply.
    section = {"type": "AdamW", "params": {"lr": 1e-5}}
    path = _ds(tmp_path, {**ZERO3, key: section})
    with pytest.raises(UserError, match=re.escape(f"{path} sets {key!r}, which would be ignored")):
        load_ds_config(path, **FILL)


@pytest.mark.parametrize("content, needle", [
    ({"zero_optimization": {"stage": 2}}, "zero_optimization.stage must be 3 (got 2)"),
    ({"zero_optimization": 3}, "zero_optimization.stage must be 3 (got None)"),
    ([1, 2], "the top level must be an object"),
    ('{"zero_optimization": {"stage": 3},}', "is not valid JSON"),
])
def test_malformed_ds_config_names_the_file(tmp_path, content, needle):
    path = _ds(tmp_path, content)
    with pytest.raises(UserError) as e:
        load_ds_config(path, **FILL)
    assert str(path) in str(e.value) and needle in str(e.value)


def test_missing_and_non_utf8_ds_config(tmp_path):
    with pytest.raises(UserError, match=re.escape(f"{tmp_path / 'nope.json'} does not exist")):
        load_ds_config(tmp_path / "nope.json", **FILL)
    path = tmp_path / "latin1.json"
    path.write_bytes(b'{"zero_optimization": {"stage": 3}, "note": "caf\xe9"}')
    with pytest.raises(UserError, match=re.escape(f"{path} is not UTF-8 text (byte 0xe9")):
        load_ds_config(path, **FILL)


def test_stage_ds_configs_fill_each_stage_from_its_section(tmp_path):
    train = _ds(tmp_path, ZERO3, "train.json")
    infer = _ds(tmp_path, {**ZERO3, "gradient_accumulation_steps": 2}, "infer.json")
    cfg = Config(ds_config=str(train), ds_inference_config=str(infer))
    sft = ds_configs(cfg, "sft", 1)["train"]
    assert (sft["train_micro_batch_size_per_gpu"], sft["gradient_accumulation_steps"]) == (16, 1)
    cfg.ppo = PPOConfig(rollout_batch_size=32, mini_batch_size=16, micro_batch_size_per_gpu=4)
    # the inference engines run one micro-step per step: a file asking for 2 contradicts that
    with pytest.raises(UserError, match=re.escape(f"{infer} sets gradient_accumulation_steps=2")):
        ds_configs(cfg, "ppo", 2)
    cfg.ds_inference_config = str(train)
    assert ds_configs(cfg, "ppo", 2)["train"]["gradient_accumulation_steps"] == 2  # 16 / 2 ranks / 4
    cfg.ppo = PPOConfig(rollout_batch_size=32, mini_batch_size=12, micro_batch_size_per_gpu=4)
    with pytest.raises(UserError, match=r"ppo\.rollout_batch_size=32 must be a multiple of ppo\.mini_batch_size=12"):
        ds_configs(cfg, "ppo", 2)
