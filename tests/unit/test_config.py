"""Unit tests for pipeline/config.py, config_checks.py and cli.py: defaults, files, command-line
overrides, checks, sizes, help."""

import dataclasses
import json
import re

import pytest

from pipeline.cli import build_parser, load_file, parse_config
from pipeline.config import Config, PPOConfig, PPOSizes, TrainConfig, global_batch, ppo_sizes
from pipeline.config_checks import validate
from pipeline.errors import UserError


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


# ---------------------------------------------------------------- defaults
def test_no_arguments_give_the_defaults():
    cfg = parse_config([])
    assert cfg == Config()
    # the stage sections carry their own defaults, not TrainConfig's class defaults
    assert cfg.sft.learning_rate == pytest.approx(2e-3)
    assert cfg.reward.learning_rate == pytest.approx(5e-4) and cfg.reward.epochs == 3
    assert TrainConfig().learning_rate != cfg.sft.learning_rate
    assert cfg.ppo == PPOConfig()
    assert cfg.force is False and cfg.seed == 42
    validate(cfg)  # the defaults pass their own checks


def test_parse_config_none_reads_sys_argv(monkeypatch):
    monkeypatch.setattr("sys.argv", ["prog", "--seed", "7"])
    assert parse_config().seed == 7


# ---------------------------------------------------------------- files
def test_yaml_file(tmp_path):
    path = _write(
        tmp_path / "run.yaml",
        "seed: 3\n"
        "output_dir: out/here\n"
        "sft:\n  epochs: 1\n  learning_rate: 1e-4\n"  # PyYAML reads 1e-4 as a string
        "ppo:\n  kl_coef: 0.2\n  adaptive_kl: true\n"
        "data:\n  max_prompt_len: 10\n",
    )
    cfg = parse_config(["--config", path])
    assert cfg.seed == 3
    assert cfg.output_dir == "out/here"
    assert cfg.sft.epochs == 1
    assert isinstance(cfg.sft.learning_rate, float) and cfg.sft.learning_rate == pytest.approx(1e-4)
    assert cfg.ppo.kl_coef == pytest.approx(0.2) and cfg.ppo.adaptive_kl is True
    assert cfg.data.max_prompt_len == 10
    # untouched options keep their defaults
    assert cfg.reward == Config().reward
    assert cfg.ppo.clip_eps == PPOConfig().clip_eps


def test_json_file(tmp_path):
    path = _write(
        tmp_path / "run.json",
        json.dumps(
            {
                "seed": 5,
                "force": True,
                "reward": {"micro_batch_size_per_gpu": 4},
                "task": {"num_sft": 10, "label_noise": 0.0},
            }
        ),
    )
    cfg = parse_config(["--config", path])
    assert cfg.seed == 5 and cfg.force is True
    assert cfg.reward.micro_batch_size_per_gpu == 4
    assert cfg.reward.epochs == Config().reward.epochs
    assert cfg.task.num_sft == 10 and cfg.task.label_noise == 0.0
    assert cfg.task.num_pairs == Config().task.num_pairs


def test_int_given_for_float_option_becomes_float(tmp_path):
    path = _write(tmp_path / "run.json", json.dumps({"ppo": {"kl_coef": 1}}))
    cfg = parse_config(["--config", path])
    assert isinstance(cfg.ppo.kl_coef, float) and cfg.ppo.kl_coef == 1.0


def test_empty_yaml_file_gives_defaults(tmp_path):
    path = _write(tmp_path / "empty.yaml", "")
    assert parse_config(["--config", path]) == Config()


def test_command_line_beats_the_file(tmp_path):
    path = _write(tmp_path / "run.yaml", "seed: 3\nsft:\n  learning_rate: 0.5\n  epochs: 1\n")
    cfg = parse_config(["--config", path, "--sft.learning_rate", "0.1", "--seed", "9"])
    assert cfg.sft.learning_rate == pytest.approx(0.1)
    assert cfg.seed == 9
    assert cfg.sft.epochs == 1  # from the file, not overridden
    # order on the command line does not matter
    cfg2 = parse_config(["--sft.learning_rate", "0.1", "--config", path])
    assert cfg2.sft.learning_rate == pytest.approx(0.1)


def test_partial_section_keeps_the_config_defaults_of_that_section(tmp_path):
    path = _write(tmp_path / "run.yaml", "sft:\n  epochs: 1\n")
    cfg = parse_config(["--config", path])
    assert cfg.sft.epochs == 1
    # Config's sft default (2e-3), not TrainConfig's class default (1e-3)
    assert cfg.sft.learning_rate == pytest.approx(2e-3)
    assert cfg.sft.learning_rate != TrainConfig().learning_rate
    expected = dataclasses.replace(Config().sft, epochs=1)
    assert cfg.sft == expected


def test_partial_section_on_the_command_line_keeps_the_other_defaults():
    cfg = parse_config(["--reward.epochs", "5"])
    assert cfg.reward == dataclasses.replace(Config().reward, epochs=5)
    assert cfg.sft == Config().sft


def test_command_line_types_are_converted():
    cfg = parse_config(
        [
            "--ppo.min_new_tokens",
            "5",
            "--ppo.kl_coef",
            "0.3",
            "--ppo.advantage_mode",
            "sequence",
            "--data.sft_data_path",
            "x.jsonl",
        ]
    )
    assert cfg.ppo.min_new_tokens == 5 and isinstance(cfg.ppo.min_new_tokens, int)
    assert cfg.ppo.kl_coef == pytest.approx(0.3) and isinstance(cfg.ppo.kl_coef, float)
    assert cfg.ppo.advantage_mode == "sequence"
    assert cfg.data.sft_data_path == "x.jsonl"


# ---------------------------------------------------------------- bool flags
@pytest.mark.parametrize(
    "argv, expected",
    [
        ([], False),
        (["--force"], True),
        (["--force", "true"], True),
        (["--force", "false"], False),
        (["--force", "False"], False),
        (["--force", "0"], False),
        (["--force", "yes"], True),
        (["--force", "--seed", "1"], True),  # a bare flag followed by another option
    ],
)
def test_bool_flag(argv, expected):
    assert parse_config(argv).force is expected


def test_bool_flag_on_the_command_line_beats_the_file(tmp_path):
    path = _write(tmp_path / "run.yaml", "force: true\nppo:\n  whiten_advantages: false\n")
    cfg = parse_config(["--config", path, "--force", "false", "--ppo.whiten_advantages"])
    assert cfg.force is False
    assert cfg.ppo.whiten_advantages is True


def test_bool_flag_rejects_other_words():
    with pytest.raises(UserError, match="force"):
        parse_config(["--force", "maybe"])


# ---------------------------------------------------------------- errors
def test_unknown_key_in_file_names_the_key(tmp_path):
    path = _write(tmp_path / "run.yaml", "sft:\n  epoch: 1\n")
    with pytest.raises(UserError, match=r"sft\.epoch\b"):
        parse_config(["--config", path])


def test_unknown_top_level_key_in_file_names_the_key(tmp_path):
    path = _write(tmp_path / "run.json", json.dumps({"sed": 1}))
    with pytest.raises(UserError, match="sed"):
        parse_config(["--config", path])


def test_unknown_command_line_flag():
    with pytest.raises(UserError, match="--no_such_option"):
        parse_config(["--no_such_option", "1"])
    with pytest.raises(UserError, match=r"--sft\.epochz"):
        parse_config(["--sft.epochz", "1"])
    with pytest.raises(UserError, match="--help"):  # the message points at the option list
        parse_config(["--bogus"])


@pytest.mark.parametrize(
    "argv, suggested",
    [
        (
            ["--model_name_or_path", "gpt2"],
            "--model.model_name_or_path",
        ),  # HF / TRL / DeepSpeed-Chat spelling
        (["--ppo.kl_coeff", "0.1"], "--ppo.kl_coef"),
        (["--kl_coef", "0.1"], "--ppo.kl_coef"),
        (["--model-name-or-path", "gpt2"], "--model.model_name_or_path"),
        (["--sft.epoch", "1"], "--sft.epochs"),
        (["--ppo.tokenizer_path", "t"], "--data.tokenizer_path"),  # another section's option
        (["--confg", "run.yaml"], "--config"),
        (["--ppo.kl_coeff=0.1"], "--ppo.kl_coef"),
    ],
)
def test_unknown_flag_gets_did_you_mean(argv, suggested):
    with pytest.raises(UserError) as e:
        parse_config(argv)
    message = str(e.value)
    flag = argv[0].split("=")[0]
    assert message == (
        f"command line: unknown option {flag} (did you mean {suggested}?). "
        f"Run with --help to list the options."
    )


def test_did_you_mean_lists_every_section_that_has_the_option_and_nothing_far_off():
    from pipeline.cli import _flat_fields, did_you_mean

    known = [name for name, *_ in _flat_fields(Config)]
    assert did_you_mean("--learning_rate", known) == ["sft.learning_rate", "reward.learning_rate"]
    assert did_you_mean("--ppo.learning_rate", known) == [
        "ppo.actor_learning_rate",
        "ppo.critic_learning_rate",
    ]
    assert did_you_mean("--no_such_option", known) == []
    assert did_you_mean("--max_new_tokens", known) == ["ppo.max_new_tokens"]


def test_several_unknown_flags_are_reported_in_one_paragraph():
    with pytest.raises(UserError) as e:
        parse_config(["--seed", "1", "--kl_coeff", "0.1", "--bogus", "--output_dir", "x"])
    assert str(e.value) == (
        "command line: unknown options --kl_coeff (did you mean --ppo.kl_coef?), --bogus. "
        "Run with --help to list the options."
    )
    with pytest.raises(UserError, match=r"unexpected value\(s\) 2 "):
        parse_config(["--seed", "1", "2"])


def test_unknown_key_in_the_file_gets_did_you_mean(tmp_path):
    path = _write(tmp_path / "run.yaml", "ppo:\n  kl_coeff: 0.1\n")
    with pytest.raises(
        UserError, match=r"unknown option 'ppo\.kl_coeff' \(did you mean ppo\.kl_coef\?\)"
    ):
        parse_config(["--config", path])


def test_max_new_tokens_defaults_to_the_dataset_response_length():
    from pipeline.config import max_new_tokens

    assert Config().ppo.max_new_tokens == 0
    assert (
        max_new_tokens(Config()) == Config().data.max_response_len == 24
    )  # the default task's numbers
    assert max_new_tokens(parse_config(["--data.max_response_len", "40"])) == 40
    assert (
        max_new_tokens(
            parse_config(["--data.max_response_len", "40", "--ppo.max_new_tokens", "64"])
        )
        == 64
    )
    with pytest.raises(UserError, match=r"option ppo\.max_new_tokens=-1 must be >= 0"):
        parse_config(["--ppo.max_new_tokens", "-1"])


def test_evaluation_can_be_turned_off_but_then_select_best_is_refused():
    assert parse_config(["--ppo.eval_steps", "0"]).ppo.eval_steps == 0
    with pytest.raises(UserError, match=r"option ppo\.eval_steps=-1 must be >= 0"):
        parse_config(["--ppo.eval_steps", "-1"])
    with pytest.raises(UserError) as e:
        parse_config(["--ppo.eval_steps", "0", "--ppo.select_best", "eval/gold_score"])
    assert "ppo.select_best='eval/gold_score'" in str(e.value) and "ppo.eval_steps=0" in str(
        e.value
    )
    parse_config(["--ppo.eval_steps", "5", "--ppo.select_best", "eval/gold_score"])


def test_misspelt_flag_that_is_a_prefix_of_an_option_is_rejected_like_in_the_file(tmp_path):
    # The file rejects `sft: {epoch: 1}` as unknown (test above); the command line must not
    # silently take `--sft.epoch` (or `--ppo.target`) as an abbreviation of another option.
    with pytest.raises(UserError, match=r"--sft\.epoch"):
        parse_config(["--sft.epoch", "1"])
    with pytest.raises(UserError, match=r"--ppo\.target"):
        parse_config(["--ppo.target", "2.0"])


def test_wrong_type_in_file_names_the_option(tmp_path):
    path = _write(tmp_path / "run.yaml", "sft:\n  epochs: many\n")
    with pytest.raises(UserError, match=r"sft\.epochs") as e:
        parse_config(["--config", path])
    assert "many" in str(e.value)


@pytest.mark.parametrize(
    "text, option",
    [
        ('{"sft": {"epochs": "many"}}', "sft.epochs"),
        ('{"sft": {"epochs": 1.5}}', "sft.epochs"),
        ('{"force": "sometimes"}', "force"),
        ('{"ppo": {"kl_coef": "big"}}', "ppo.kl_coef"),
        ('{"ppo": {"kl_coef": true}}', "ppo.kl_coef"),
        ('{"output_dir": ["a", "b"]}', "output_dir"),
    ],
)
def test_wrong_types_in_json_name_the_option(tmp_path, text, option):
    path = _write(tmp_path / "run.json", text)
    with pytest.raises(UserError, match=re.escape(option)):
        parse_config(["--config", path])


def test_wrong_type_on_the_command_line_names_the_option():
    with pytest.raises(
        UserError, match=r"^command line: option sft\.epochs: expected int, got 'many'"
    ):
        parse_config(["--sft.epochs", "many"])


def test_mistakes_in_the_file_name_the_file(tmp_path):
    for text, needle in (
        ("sft:\n  epoch: 1\n", "unknown option 'sft.epoch'"),
        (
            "reward:\n  micro_batch_size_per_gpu: 16x\n",
            "option reward.micro_batch_size_per_gpu: expected int, got '16x'",
        ),
    ):
        path = _write(tmp_path / "run.yaml", text)
        with pytest.raises(UserError) as e:
            parse_config(["--config", path])
        assert str(e.value).startswith(f"config file {path}: ") and needle in str(e.value)


def test_section_given_as_a_scalar(tmp_path):
    path = _write(tmp_path / "run.yaml", "sft: 3\n")
    with pytest.raises(UserError, match="sft"):
        parse_config(["--config", path])


def test_empty_section_in_file_with_command_line_override_is_a_user_error(tmp_path):
    # `sft:` with nothing under it is YAML null. Alone it is a UserError ("expected a mapping");
    # with an override of one of its options it must still be a UserError, not a crash.
    path = _write(tmp_path / "run.yaml", "sft:\n")
    with pytest.raises(UserError, match="sft"):
        parse_config(["--config", path])
    with pytest.raises(UserError, match="sft"):
        parse_config(["--config", path, "--sft.epochs", "2"])


def test_malformed_yaml_names_the_file(tmp_path):
    path = _write(tmp_path / "bad.yaml", "sft:\n  epochs: [1, 2\n  lr: 3\n")
    with pytest.raises(UserError, match=re.escape(path)) as e:
        parse_config(["--config", path])
    assert "YAML" in str(e.value)


def test_malformed_json_names_the_file(tmp_path):
    path = _write(tmp_path / "bad.json", '{"seed": 1,}')
    with pytest.raises(UserError, match=re.escape(path)) as e:
        load_file(path)
    assert "JSON" in str(e.value)


def test_non_utf8_config_file_names_the_file(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"output_dir: caf\xe9\n")
    with pytest.raises(UserError, match=re.escape(str(path))):
        parse_config(["--config", str(path)])


def test_top_level_must_be_a_mapping(tmp_path):
    path = _write(tmp_path / "list.yaml", "- 1\n- 2\n")
    with pytest.raises(UserError, match=re.escape(path)):
        load_file(path)


def test_missing_config_file(tmp_path):
    path = str(tmp_path / "nope.yaml")
    with pytest.raises(UserError, match=re.escape(path)):
        parse_config(["--config", path])


def test_config_folder_is_not_a_file(tmp_path):
    with pytest.raises(UserError, match=re.escape(str(tmp_path))):
        load_file(str(tmp_path))


def test_load_file_returns_the_mapping(tmp_path):
    path = _write(tmp_path / "run.yaml", "seed: 3\nsft:\n  epochs: 1\n")
    assert load_file(path) == {"seed": 3, "sft": {"epochs": 1}}


def _with(cfg, dotted, value):
    """A copy of `cfg` with one (dotted) option changed."""
    head, _, rest = dotted.partition(".")
    if not rest:
        return dataclasses.replace(cfg, **{head: value})
    return dataclasses.replace(cfg, **{head: _with(getattr(cfg, head), rest, value)})


def test_non_positive_size_on_the_command_line_names_the_option():
    with pytest.raises(UserError, match=r"sft\.micro_batch_size_per_gpu") as e:
        parse_config(["--sft.micro_batch_size_per_gpu", "0"])
    assert "> 0" in str(e.value)


def test_invalid_value_from_the_file_is_checked_too(tmp_path):
    path = _write(tmp_path / "run.yaml", "ppo:\n  top_p: 1.5\n")
    with pytest.raises(UserError, match=r"ppo\.top_p"):
        parse_config(["--config", path])


@pytest.mark.parametrize(
    "option, value",
    [
        ("sft.micro_batch_size_per_gpu", 0),
        ("sft.micro_batch_size_per_gpu", -1),
        ("reward.micro_batch_size_per_gpu", 0),
        ("reward.epochs", 0),
        ("sft.learning_rate", -1e-3),
        ("reward.gradient_accumulation_steps", 0),
        ("sft.logging_steps", 0),
        ("reward.eval_steps", 0),
        ("ppo.num_iterations", 0),
        ("ppo.rollout_batch_size", 0),
        ("ppo.mini_batch_size", -4),
        ("ppo.micro_batch_size_per_gpu", 0),
        ("ppo.num_ppo_epochs", 0),
        ("ppo.temperature", 0.0),
        ("ppo.kl_horizon", 0),
        ("data.max_prompt_len", 0),
        ("data.max_response_len", 0),
        ("task.num_sft", 0),
        ("task.num_eval", 0),
        ("task.label_noise", 0.5),
        ("task.label_noise", -0.1),
        ("sft.warmup_ratio", 1.0),
        ("reward.warmup_ratio", -0.1),
        ("ppo.top_p", 0.0),
        ("ppo.top_p", 1.5),
        ("ppo.advantage_mode", "td"),
        ("ppo.kl_estimator", "k4"),
        ("sft.max_steps", 0),
        ("reward.max_steps", -2),
        ("sft.weight_decay", -0.1),
        ("reward.gradient_clipping", -1.0),
        ("sft.lr_scheduler", "cosin"),
        ("ppo.top_k", -1),
        ("ppo.min_new_tokens", -1),
        ("ppo.gather_modules", -1),
        ("ppo.warmup_iterations", -1),
        ("ppo.max_nonfinite_skips", 0),
        ("ppo.kl_coef", -0.1),
        ("ppo.vf_coef", float("nan")),
        ("ppo.gamma", 1.5),
        ("ppo.lam", -0.1),
        ("ppo.gradient_clipping", -1.0),
        ("model.hidden_size", 0),
        ("model.num_attention_heads", -2),
        ("model.hidden_size", 65),  # not a multiple of the 4 heads
        ("model.dtype", "fp8"),
        ("model.dtype", "float16"),  # the names are fp32, bf16, fp16
        ("seed", -1),
    ],
)
def test_validate_names_the_invalid_option(option, value):
    cfg = _with(Config(), option, value)
    with pytest.raises(UserError, match=re.escape(option)):
        validate(cfg)


@pytest.mark.parametrize("option, value", [("ppo.top_k", 5), ("ppo.top_p", 0.9)])
def test_truncated_sampling_is_refused_naming_the_option(option, value):
    # PPO's log-probs and KL are of the full distribution logits / temperature: a truncated sampler
    # would disagree with them (and its KL to an untruncated reference is infinite).
    with pytest.raises(UserError, match=re.escape(f"option {option}={value}")) as e:
        parse_config([f"--{option}", str(value)])
    assert "not supported" in str(e.value) and "ppo.temperature" in str(e.value)


def test_nan_is_not_a_positive_value():
    # validate() promises "must be > 0"; NaN is not > 0 (every comparison with NaN is False)
    with pytest.raises(UserError, match=r"sft\.learning_rate"):
        parse_config(["--sft.learning_rate", "nan"])


@pytest.mark.parametrize(
    "option, value",
    [
        ("ppo.top_p", 1.0),
        ("task.label_noise", 0.0),
        ("sft.warmup_ratio", 0.0),
        ("ppo.advantage_mode", "sequence"),
        ("ppo.kl_estimator", "k3"),
        ("ppo.kl_estimator", "k2"),
        ("ppo.top_k", 0),
        ("ppo.entropy_coef", 0.0),
        ("ppo.value_clip", 0.0),
        ("sft.max_steps", -1),
        ("sft.max_steps", 1),
        ("ppo.gamma", 1.0),
        ("ppo.lam", 0.0),
        ("sft.lr_scheduler", "linear"),
        ("seed", 0),
        ("model.dtype", "bf16"),
        ("model.dtype", "fp16"),
    ],
)
def test_boundary_values_are_accepted(option, value):
    validate(_with(Config(), option, value))


def test_local_rank_from_the_launcher_is_accepted_and_dropped():
    assert parse_config(["--local_rank", "1"]) == Config()


# ---------------------------------------------------------------- derived sizes
def test_ppo_sizes_divisible():
    p = PPOConfig(rollout_batch_size=32, mini_batch_size=16, micro_batch_size_per_gpu=8)
    same = {"micro_batch_size_per_gpu": 8, "micro_clamped": False}
    assert ppo_sizes(p, 2) == PPOSizes(
        prompts_per_rank=16,
        rollout_per_rank=16,
        mini_per_rank=8,
        gradient_accumulation_steps=1,
        mini_batches_per_epoch=2,
        **same,
    )
    assert ppo_sizes(p, 1) == PPOSizes(
        prompts_per_rank=32,
        rollout_per_rank=32,
        mini_per_rank=16,
        gradient_accumulation_steps=2,
        mini_batches_per_epoch=2,
        **same,
    )
    p = PPOConfig(rollout_batch_size=64, mini_batch_size=32, micro_batch_size_per_gpu=2)
    assert ppo_sizes(p, 4) == PPOSizes(
        prompts_per_rank=16,
        rollout_per_rank=16,
        mini_per_rank=8,
        micro_batch_size_per_gpu=2,
        micro_clamped=False,
        gradient_accumulation_steps=4,
        mini_batches_per_epoch=2,
    )


def test_default_ppo_sizes_divide_on_1_2_4_and_8_ranks_and_keep_1_and_2_as_they_were():
    p = Config().ppo
    got = {w: ppo_sizes(p, w) for w in (1, 2, 4, 8)}
    # 1 and 2 ranks: the configured micro-batch of 8 (the stored reference numbers depend on it)
    assert [
        (got[w].micro_batch_size_per_gpu, got[w].gradient_accumulation_steps, got[w].micro_clamped)
        for w in (1, 2)
    ] == [(8, 2, False), (8, 1, False)]
    # 4 and 8 ranks: a rank's share of the mini-batch (4, 2) is smaller than 8: micro clamped to it
    assert [
        (got[w].micro_batch_size_per_gpu, got[w].gradient_accumulation_steps, got[w].micro_clamped)
        for w in (4, 8)
    ] == [(4, 1, True), (2, 1, True)]
    for w, s in got.items():
        assert s.micro_batch_size_per_gpu * s.gradient_accumulation_steps * w == p.mini_batch_size
        assert s.rollout_per_rank * w == p.rollout_batch_size


def test_a_clamped_micro_batch_reaches_the_deepspeed_config_with_a_log_line(caplog):
    import logging

    from pipeline.distributed.ds_config import ds_configs

    with caplog.at_level(logging.INFO, logger="pipeline.distributed.ds_config"):
        ds = ds_configs(Config(), "ppo", 8)
    assert (
        ds["train"]["train_micro_batch_size_per_gpu"] == 2
        and ds["train"]["gradient_accumulation_steps"] == 1
    )
    assert ds["inference"]["train_micro_batch_size_per_gpu"] == 2
    assert (
        "ppo.micro_batch_size_per_gpu=8 is more than a rank's share of a mini-batch" in caplog.text
    )
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pipeline.distributed.ds_config"):
        assert ds_configs(Config(), "ppo", 2)["train"]["train_micro_batch_size_per_gpu"] == 8
    assert "more than a rank's share" not in caplog.text


def test_ppo_sizes_defaults_work_on_one_and_two_ranks():
    for world in (1, 2):
        s = ppo_sizes(Config().ppo, world)
        p = Config().ppo
        # the sizes multiply back to the configured global sizes
        assert s.mini_per_rank * world == p.mini_batch_size
        assert s.gradient_accumulation_steps * p.micro_batch_size_per_gpu == s.mini_per_rank
        assert s.mini_batches_per_epoch * p.mini_batch_size == p.rollout_batch_size
        assert s.rollout_per_rank * world == p.rollout_batch_size


@pytest.mark.parametrize(
    "rollout, mini, micro, world, option",
    [
        (30, 16, 8, 2, "ppo.rollout_batch_size"),  # rollout not a multiple of mini
        (32, 16, 8, 3, "ppo.mini_batch_size"),  # mini not a multiple of the ranks
        (32, 16, 3, 2, "ppo.micro_batch_size_per_gpu"),  # mini / ranks not a multiple of micro
        (
            48,
            24,
            5,
            1,
            "ppo.micro_batch_size_per_gpu",
        ),  # 24 is not a multiple of 5 (a bigger micro clamps)
    ],
)
def test_ppo_sizes_not_divisible(rollout, mini, micro, world, option):
    p = PPOConfig(rollout_batch_size=rollout, mini_batch_size=mini, micro_batch_size_per_gpu=micro)
    with pytest.raises(UserError, match=re.escape(option)):
        ppo_sizes(p, world)


def test_global_batch():
    assert global_batch(16, 1, 1) == 16
    assert global_batch(4, 2, 2) == 16
    assert global_batch(3, 5, 7) == 105


# ---------------------------------------------------------------- help
def _leaves(obj, prefix=""):
    """(dotted name, default) of every leaf option, from a Config instance (independently of config.py)."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _leaves(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", value


def _help_entries(text):
    """Option name -> its help text (wrapped lines joined), from argparse's options section."""
    entries, current = {}, None
    for line in text.splitlines():
        m = re.match(r"^  (--[\w.]+)( [A-Z_.]+| \[BOOL\])?", line)  # the option and its metavar
        if m:
            current = m.group(1)
            entries[current] = line[len(m.group(0)) :]
        elif current and line.startswith("   "):
            entries[current] += " " + line
        else:
            current = None
    return {k: " ".join(v.split()) for k, v in entries.items()}


def test_help_lists_every_leaf_option_with_its_default():
    text = build_parser("RLHF pipeline").format_help()
    entries = _help_entries(text)
    leaves = dict(_leaves(Config()))
    assert len(leaves) > 60
    for name, default in leaves.items():
        assert f"--{name}" in entries, f"--{name} missing from --help"
        assert f"(default: {default!r})" in entries[f"--{name}"], (name, entries[f"--{name}"])
    # spot checks, including a section default that differs from the class default
    assert "(default: 0.002)" in entries["--sft.learning_rate"]
    assert f"(default: {Config().reward.learning_rate!r})" in entries["--reward.learning_rate"]
    assert f"(default: {Config().ppo.kl_coef!r})" in entries["--ppo.kl_coef"]
    assert f"(default: {Config().task.num_sft!r})" in entries["--task.num_sft"]
    assert "--config" in entries
    # a comment with "%" is printed as written (argparse would read it as a format code)
    assert " ".join(entries["--ppo.kl_horizon"].split()).endswith(
        "(5% at 32 rollouts) (default: 128)"
    ), entries["--ppo.kl_horizon"]
    assert "argparse" not in text
    # every option has a description besides its default
    for name in leaves:
        assert len(entries[f"--{name}"].split("(default:")[0].strip()) > 3, name


@dataclasses.dataclass
class _Documented:
    plain: int = 1  # a trailing comment
    wrapped: float = (
        0.5  # the formatter puts a long line's comment inside parentheses, as it did to this one
    )
    # a comment-only line above the field
    # and a second one
    above: str = "x"  # then its trailing part

    undocumented: int = 0


def test_help_text_is_read_from_every_comment_form_the_formatter_leaves():
    from pipeline.cli import _field_comments

    assert _field_comments(_Documented) == {
        "plain": "a trailing comment",
        "wrapped": "the formatter puts a long line's comment inside parentheses, as it did to this one",
        "above": "a comment-only line above the field and a second one then its trailing part",
    }


def test_help_flag_prints_and_exits(capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(["--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "--ppo.kl_coef" in out and "--task.num_sft" in out


# ---------------------------------------------------------------- reward model initialisation
def test_reward_init_auto_starts_a_from_scratch_model_from_the_base(tmp_path):
    from pipeline.inputs import stage_inputs

    out, task = tmp_path / "run", tmp_path / "run" / "task"
    (out / "sft" / "model").mkdir(parents=True)
    scratch = stage_inputs(parse_config([]), out, task)["reward"]
    assert scratch["model"] == str(task / "model")
    assert scratch["tokenizer"] == str(out / "sft" / "model")
    forced = stage_inputs(parse_config(["--reward_init", "sft"]), out, task)["reward"]
    assert forced["model"] == str(out / "sft" / "model")
    pretrained = stage_inputs(parse_config(["--model.model_name_or_path", "some/lm"]), out, task)[
        "reward"
    ]
    assert pretrained["model"] == str(out / "sft" / "model")
    base = stage_inputs(
        parse_config(["--model.model_name_or_path", "some/lm", "--reward_init", "base"]), out, task
    )["reward"]
    assert base["model"] == "some/lm"


def test_reward_init_rejects_unknown_values():
    with pytest.raises(UserError, match=r"reward_init"):
        parse_config(["--reward_init", "policy"])


# ---------------------------------------------------------------- which stages run
@pytest.mark.parametrize(
    "flags, stages, expected",
    [
        ([], ("sft", "reward", "ppo"), ("sft", "reward", "ppo")),
        (
            ["--ppo.actor_model_path", "a", "--ppo.reward_model_path", "r"],
            ("sft", "reward", "ppo"),
            ("ppo",),
        ),
        # the from-scratch reward model starts from the base model: SFT is read only by PPO
        (["--ppo.actor_model_path", "a"], ("sft", "reward", "ppo"), ("reward", "ppo")),
        # ... but a reward model fine-tuned from the SFT output still needs SFT
        (
            ["--ppo.actor_model_path", "a", "--reward_init", "sft"],
            ("sft", "reward", "ppo"),
            ("sft", "reward", "ppo"),
        ),
        (["--ppo.reward_model_path", "r"], ("sft", "reward", "ppo"), ("sft", "ppo")),
        (
            ["--ppo.actor_model_path", "a", "--ppo.reward_model_path", "r"],
            ("sft",),
            ("sft",),
        ),  # asked for alone
        (["--ppo.reward_model_path", "r"], ("sft", "reward"), ("sft", "reward")),
    ],
)
def test_stages_whose_model_nothing_reads_are_not_run(flags, stages, expected):
    from pipeline.inputs import needed_stages

    run, not_run = needed_stages(parse_config(flags), stages)
    assert run == expected
    assert set(not_run) == set(stages) - set(expected)
    assert all("no other stage reads its model" in why for why in not_run.values())


def test_a_reward_model_with_a_base_model_of_its_own(tmp_path):
    from pipeline.inputs import needed_stages, stage_inputs

    out, task = tmp_path / "run", tmp_path / "run" / "task"
    (out / "sft" / "model").mkdir(parents=True)
    cfg = parse_config(
        [
            "--model.model_name_or_path",
            "org/lm-1b",
            "--model.reward_model_name_or_path",
            "org/lm-350m",
        ]
    )
    reward = stage_inputs(cfg, out, task)["reward"]
    assert reward["model"] == reward["tokenizer"] == "org/lm-350m"  # its own weights and vocabulary
    assert stage_inputs(cfg, out, task)["ppo"]["actor"] == str(out / "sft" / "model")
    # it does not read the SFT policy, so PPO from an existing actor skips SFT
    assert needed_stages(
        parse_config(["--ppo.actor_model_path", "a", "--model.reward_model_name_or_path", "r"]),
        ("sft", "reward", "ppo"),
    )[0] == ("reward", "ppo")
    with pytest.raises(UserError, match=r"reward_init=sft .* model.reward_model_name_or_path"):
        parse_config(["--model.reward_model_name_or_path", "r", "--reward_init", "sft"])


# ---------------------------------------------------------------- estimators, groups, loss variants
@pytest.mark.parametrize(
    "flags, needles",
    [
        (
            ["--ppo.advantage_mode", "ppo2"],
            ["option ppo.advantage_mode='ppo2'", "gae, sequence, grpo, dr_grpo, rloo"],
        ),
        (
            ["--ppo.advantage_mode", "grpo"],
            ["option ppo.num_samples_per_prompt=1", "advantage_mode=grpo", ">= 2"],
        ),
        (
            ["--ppo.advantage_mode", "rloo", "--ppo.num_samples_per_prompt", "1"],
            ["ppo.num_samples_per_prompt=1"],
        ),
        (
            ["--ppo.num_samples_per_prompt", "0"],
            ["option ppo.num_samples_per_prompt=0 must be >= 1"],
        ),
        (
            ["--ppo.advantage_mode", "reinforce_pp", "--ppo.whiten_advantages", "false"],
            ["option ppo.whiten_advantages=false", "reinforce_pp", "by definition"],
        ),
        (
            ["--ppo.advantage_mode", "reinforce_pp", "--ppo.critic_lora_rank", "8"],
            ["option ppo.critic_lora_rank=8", "uses no critic"],
        ),
        (["--ppo.kl_penalty", "advantage"], ["option ppo.kl_penalty='advantage'"]),
        (
            ["--ppo.kl_penalty", "loss"],
            ["option ppo.kl_estimator=k1 with ppo.kl_penalty=loss", "k3"],
        ),
        (
            ["--ppo.loss_agg", "seq_mean"],
            ["option ppo.loss_agg='seq_mean'", "seq_mean_token_sum_norm"],
        ),
        (["--ppo.clip_eps_low", "1.0"], ["option ppo.clip_eps_low=1.0 must be in (0, 1)"]),
        (["--ppo.clip_eps_high", "0"], ["option ppo.clip_eps_high=0.0 must be > 0"]),
        (["--ppo.dual_clip", "0.5"], ["option ppo.dual_clip=0.5 must be 0 (off) or > 1"]),
    ],
)
def test_estimator_and_loss_options_are_checked_naming_the_option(flags, needles):
    with pytest.raises(UserError) as e:
        parse_config(flags)
    assert all(n in str(e.value) for n in needles), str(e.value)
    assert "\n" not in str(e.value)  # one paragraph


def test_estimator_and_loss_options_that_are_accepted():
    cfg = parse_config(
        [
            "--ppo.advantage_mode",
            "dr_grpo",
            "--ppo.num_samples_per_prompt",
            "4",
            "--ppo.kl_penalty",
            "loss",
            "--ppo.kl_estimator",
            "k3",
            "--ppo.loss_agg",
            "seq_mean_token_sum_norm",
            "--ppo.clip_eps_low",
            "0.2",
            "--ppo.clip_eps_high",
            "0.28",
            "--ppo.dual_clip",
            "3",
        ]
    )
    p = cfg.ppo
    assert (p.advantage_mode, p.num_samples_per_prompt, p.clip_eps_high, p.dual_clip) == (
        "dr_grpo",
        4,
        0.28,
        3.0,
    )
    assert parse_config(["--ppo.clip_eps_high", "none"]).ppo.clip_eps_high is None


def test_group_sizes_count_rows_and_keep_each_group_on_one_rank():
    p = PPOConfig(
        rollout_batch_size=8,
        num_samples_per_prompt=4,
        mini_batch_size=16,
        micro_batch_size_per_gpu=4,
    )
    s = ppo_sizes(p, 2)
    assert (s.prompts_per_rank, s.rollout_per_rank, s.mini_per_rank, s.mini_batches_per_epoch) == (
        4,
        16,
        8,
        2,
    )
    with pytest.raises(
        UserError, match=r"8 x 4 = 32 rollout rows must be a multiple of ppo.mini_batch_size=12"
    ):
        ppo_sizes(dataclasses.replace(p, mini_batch_size=12), 1)
    # 2 prompts x 4 samples = 8 rows would divide over 4 ranks, but a group would then span two ranks
    with pytest.raises(
        UserError,
        match=r"ppo.rollout_batch_size=2 \(prompts\) must be a multiple of the number "
        r"of ranks.*a group lives on one rank",
    ):
        ppo_sizes(PPOConfig(rollout_batch_size=2, num_samples_per_prompt=4, mini_batch_size=8), 4)


def test_config_files_layer_in_order(tmp_path):
    a = _write(tmp_path / "a.yaml", "seed: 3\nppo:\n  num_iterations: 7\n  kl_coef: 0.5\n")
    b = _write(tmp_path / "b.yaml", "ppo:\n  kl_coef: 0.2\n")
    cfg = parse_config(["--config", a, "--config", b, "--ppo.num_iterations", "9"])
    assert (cfg.seed, cfg.ppo.num_iterations, cfg.ppo.kl_coef) == (3, 9, 0.2)
    bad = _write(tmp_path / "bad.yaml", "ppo:\n  advantage_mod: grpo\n")
    with pytest.raises(
        UserError, match=re.escape(f"config file {bad}: ") + r".*ppo\.advantage_mod"
    ):
        parse_config(["--config", a, "--config", bad])
