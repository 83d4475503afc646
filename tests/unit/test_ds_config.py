"""DeepSpeed JSON files: the run config owns batch sizes, clipping, optimizer and schedule."""

import json
import re

import pytest

from pipeline.config import REPO_ROOT, Config, PPOConfig
from pipeline.distributed import collectives
from pipeline.distributed.ds_config import check_precision, ds_configs, load_ds_config
from pipeline.errors import UserError

ZERO3 = {"zero_optimization": {"stage": 3}}
FILL = {
    "train_micro_batch_size_per_gpu": 16,
    "gradient_accumulation_steps": 1,
    "gradient_clipping": 1.0,
}


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


@pytest.mark.parametrize(
    "key, value",
    [
        ("train_micro_batch_size_per_gpu", 4),
        ("gradient_accumulation_steps", 8),
        ("gradient_clipping", 0.5),
    ],
)
def test_contradicting_batch_key_is_refused_naming_file_key_and_both_values(tmp_path, key, value):
    path = _ds(tmp_path, {**ZERO3, key: value})
    with pytest.raises(UserError) as e:
        load_ds_config(path, **FILL)
    assert (
        f"DeepSpeed config {path} sets {key}={value!r} but the run config gives {FILL[key]!r}"
        in str(e.value)
    )


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


@pytest.mark.parametrize(
    "content, needle",
    [
        ({"zero_optimization": {"stage": 2}}, "zero_optimization.stage must be 3 (got 2)"),
        ({"zero_optimization": 3}, "zero_optimization.stage must be 3 (got None)"),
        ([1, 2], "the top level must be an object"),
        ('{"zero_optimization": {"stage": 3},}', "is not valid JSON"),
    ],
)
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
    assert (
        ds_configs(cfg, "ppo", 2)["train"]["gradient_accumulation_steps"] == 2
    )  # 16 / 2 ranks / 4
    cfg.ppo = PPOConfig(rollout_batch_size=32, mini_batch_size=12, micro_batch_size_per_gpu=4)
    with pytest.raises(
        UserError, match=r"ppo\.rollout_batch_size=32 must be a multiple of ppo\.mini_batch_size=12"
    ):
        ds_configs(cfg, "ppo", 2)


# ---------------------------------------------------------------- precision (model.dtype)
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_precision_sections_come_from_model_dtype(tmp_path, dtype):
    # the shipped files: both sections present and off
    for name in ("zero3_train.json", "zero3_offload_inference.json"):
        cfg = load_ds_config(REPO_ROOT / "ds_configs" / name, dtype, **FILL)
        assert (cfg["bf16"]["enabled"], cfg["fp16"]["enabled"]) == (
            dtype == "bf16",
            dtype == "fp16",
        )
    cfg = load_ds_config(_ds(tmp_path, ZERO3), dtype, **FILL)  # a file without the sections
    assert (cfg["bf16"]["enabled"], cfg["fp16"]["enabled"]) == (dtype == "bf16", dtype == "fp16")
    assert ("loss_scale" in cfg["fp16"]) == (dtype == "fp16")


def test_fp16_uses_dynamic_loss_scaling_unless_the_file_tunes_it(tmp_path):
    assert load_ds_config(_ds(tmp_path, ZERO3), "fp16", **FILL)["fp16"] == {
        "enabled": True,
        "loss_scale": 0,
    }
    tuned = {**ZERO3, "fp16": {"loss_scale_window": 500, "initial_scale_power": 12}}
    fp16 = load_ds_config(_ds(tmp_path, tuned), "fp16", **FILL)["fp16"]
    assert fp16 == {
        "enabled": True,
        "loss_scale": 0,
        "loss_scale_window": 500,
        "initial_scale_power": 12,
    }


@pytest.mark.parametrize(
    "section, dtype",
    [("bf16", "fp32"), ("fp16", "fp32"), ("bf16", "fp16"), ("fp16", "bf16"), ("bfloat16", "fp32")],
)
def test_precision_enabled_in_the_file_against_model_dtype_is_refused(tmp_path, section, dtype):
    path = _ds(tmp_path, {**ZERO3, section: {"enabled": True}})
    with pytest.raises(UserError) as e:
        load_ds_config(path, dtype, **FILL)
    assert (
        f"DeepSpeed config {path} enables {section} but the run config has model.dtype={dtype!r}"
        in str(e.value)
    ) and "--model.dtype" in str(e.value)


@pytest.mark.parametrize("enabled", [True, "auto"])
def test_precision_enabled_in_the_file_that_agrees_is_accepted(tmp_path, enabled):
    cfg = load_ds_config(_ds(tmp_path, {**ZERO3, "bfloat16": {"enabled": enabled}}), "bf16", **FILL)
    assert (
        cfg["bf16"] == {"enabled": True} and "bfloat16" not in cfg
    )  # one section, DeepSpeed's name
    cfg = load_ds_config(_ds(tmp_path, {**ZERO3, "bf16": {"enabled": "auto"}}), "fp32", **FILL)
    assert cfg["bf16"] == {"enabled": False}


def test_stage_ds_configs_carry_model_dtype_to_every_engine(tmp_path):
    cfg = Config()
    cfg.model.dtype = "bf16"
    for stage in ("sft", "reward", "ppo"):
        for role, ds in ds_configs(cfg, stage, 2).items():
            assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"], (stage, role)


class FakeAccelerator:
    def __init__(self, name: str, bf16: bool, fp16):
        self.name, self.bf16, self.fp16 = name, bf16, fp16

    def device_name(self):
        return self.name

    def is_bf16_supported(self):
        return self.bf16

    def is_fp16_supported(self):
        return self.fp16


GPU = FakeAccelerator("cuda", True, True)
CPU = FakeAccelerator("cpu", True, None)  # DeepSpeed's CPU accelerator answers None when it cannot
OLD_GPU = FakeAccelerator("cuda", False, True)  # e.g. a V100: no bf16


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_every_precision_is_accepted_where_supported(dtype):
    check_precision(dtype, GPU)


def test_fp16_on_an_accelerator_without_it_is_refused_naming_the_option_and_the_choices():
    check_precision("bf16", CPU)
    check_precision("fp32", CPU)
    with pytest.raises(UserError) as e:
        check_precision("fp16", CPU)
    assert str(e.value) == (
        "option model.dtype=fp16: the cpu accelerator does not support fp16 (DeepSpeed's "
        "is_fp16_supported() is false); use --model.dtype bf16 or fp32."
    )
    with pytest.raises(
        UserError,
        match=re.escape(
            "does not support bf16 (DeepSpeed's is_bf16_supported() is "
            "false); use --model.dtype fp16 or fp32."
        ),
    ):
        check_precision("bf16", OLD_GPU)


def test_unsupported_precision_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    from pipeline import orchestrator
    from pipeline.distributed import ds_config

    monkeypatch.setattr(ds_config, "get_accelerator", lambda: CPU)
    cfg = Config(output_dir=str(tmp_path / "run"))
    cfg.model.dtype = "fp16"
    with pytest.raises(UserError, match=re.escape("option model.dtype=fp16")):
        orchestrator.run(cfg, collectives.Dist(0, 1, 0, 1))
    assert not (tmp_path / "run").exists()


def test_fingerprint_follows_dtype_but_not_gradient_checkpointing(tmp_path):
    from pipeline.fingerprint import fingerprint, identity
    from pipeline.inputs import stage_inputs

    def fps(**model):
        cfg = Config(output_dir=str(tmp_path / "run"))
        for k, v in model.items():
            setattr(cfg.model, k, v)
        inputs = stage_inputs(cfg, tmp_path / "run", tmp_path / "task")
        return [
            fingerprint(identity(s, cfg, inputs[s], tmp_path / "run"))
            for s in ("sft", "reward", "ppo")
        ]

    base = fps()
    # memory and time only: switching it on to fit in memory keeps finished stages and checkpoints
    assert fps(gradient_checkpointing=True) == base
    assert all(a != b for a, b in zip(fps(dtype="bf16"), base))
    ident = identity("sft", Config(), {}, tmp_path)
    assert not {"dtype", "gradient_checkpointing"} & set(
        ident["model"]
    )  # fp32 runs keep their identity


# ---------------------------------------------------------------- per-accelerator defaults ("auto")
CPU_FILES = {
    "ds_config": "ds_configs/zero3_train.json",
    "ds_inference_config": "ds_configs/zero3_offload_inference.json",
}


def _explicit_cpu() -> Config:
    cfg = Config(**CPU_FILES)
    cfg.model.dtype = "fp32"
    return cfg


@pytest.mark.parametrize(
    "acc, dtype, kind", [(CPU, "fp32", "cpu"), (GPU, "bf16", "gpu"), (OLD_GPU, "fp32", "gpu")]
)
def test_auto_resolves_dtype_and_ds_files_for_the_accelerator(acc, dtype, kind):
    from pipeline.distributed.ds_config import AUTO_DS_CONFIGS, resolve_auto

    cfg = resolve_auto(Config(), acc)
    assert (
        cfg.model.dtype == dtype
    )  # bf16 only off the CPU and where supported; fp16-only GPUs: fp32
    assert (cfg.ds_config, cfg.ds_inference_config) == AUTO_DS_CONFIGS[kind]
    assert Config().model.dtype == "auto"  # the input is not changed


def test_explicit_choices_win_over_auto():
    from pipeline.distributed.ds_config import resolve_auto

    cfg = Config(ds_config="mine.json")
    cfg.model.dtype = "fp16"
    got = resolve_auto(cfg, GPU)
    assert (got.model.dtype, got.ds_config, got.ds_inference_config) == (
        "fp16",
        "mine.json",
        "ds_configs/zero3_offload_inference_gpu.json",
    )
    assert resolve_auto(_explicit_cpu(), GPU) == _explicit_cpu()


@pytest.mark.parametrize("world", [1, 2])
def test_cpu_deepspeed_configs_are_byte_identical_to_the_explicit_ones(world):
    from pipeline.distributed.ds_config import resolve_auto

    for stage in ("sft", "reward", "ppo"):
        auto = ds_configs(resolve_auto(Config(), CPU), stage, world)
        assert json.dumps(auto, sort_keys=False) == json.dumps(
            ds_configs(_explicit_cpu(), stage, world)
        )
        # on this (CPU) machine the real accelerator resolves the same way
        assert json.dumps(ds_configs(Config(), stage, world)) == json.dumps(auto)


def test_cpu_identity_is_the_one_of_the_explicit_cpu_settings(tmp_path):
    from pipeline.fingerprint import identity

    for stage in ("sft", "reward", "ppo"):
        assert identity(stage, Config(), {}, tmp_path) == identity(
            stage, _explicit_cpu(), {}, tmp_path
        )


def test_the_cpu_and_gpu_files_say_what_they_are_for():
    cpu = json.loads((REPO_ROOT / "ds_configs" / "zero3_train.json").read_text())[
        "zero_optimization"
    ]
    gpu = json.loads((REPO_ROOT / "ds_configs" / "zero3_train_gpu.json").read_text())[
        "zero_optimization"
    ]
    assert (cpu["overlap_comm"], cpu["reduce_bucket_size"]) == (
        False,
        5e7,
    )  # gloo: the CPU numbers rely on it
    assert (
        gpu["overlap_comm"]
        and gpu["reduce_bucket_size"] >= 2e8
        and gpu["stage3_prefetch_bucket_size"] >= 2e8
    )
    inference = json.loads(
        (REPO_ROOT / "ds_configs" / "zero3_offload_inference_gpu.json").read_text()
    )
    assert inference["zero_optimization"]["offload_param"] == {"device": "cpu", "pin_memory": True}
    for name in ("zero3_train_gpu.json", "zero3_offload_inference_gpu.json"):
        load_ds_config(REPO_ROOT / "ds_configs" / name, "bf16", **FILL)  # accepted as shipped


def test_a_stage_context_sees_the_resolved_config(tmp_path):
    from pipeline.stages.common import StageContext

    ctx = StageContext(Config(), collectives.Dist(0, 1, 0, 1), tmp_path)
    assert (ctx.cfg.model.dtype, ctx.cfg.ds_config) == ("fp32", "ds_configs/zero3_train.json")
