"""Tier 3: every kind of bad input against one finished run, through the real launchers.

The session's finished tiny pipeline is copied once (module fixture); each case then runs a
launcher's command line on the same output folder as a plain process (one rank) would, and checks:
exit code 2, one
`error:` line naming the file, row, field or option, no traceback, and not one byte of the finished
run changed. The one-stage launchers get `--force`, so their stage would otherwise rerun; `ppo.py`
runs all three stages and does not (a forced run may retrain SFT and the reward model): the bad
input changes the PPO stage's fingerprint, so PPO would rerun.

Every case's inputs are made first (the `_case` builders, next to their tests) and the command
lines then run one after the other in one process (commands_probe.py: the launchers' own entry
point, one Python start-up instead of one per command); each test checks its own commands' exit
code and output, and the digest of the finished run right after each of them.
"""

import json
import pathlib
import shutil
from typing import NamedTuple

import pytest
import torch
import yaml
from commands_probe import digest as _digest
from commands_probe import run_commands
from launch_util import TINY


class Refusal(NamedTuple):
    """One command line that must be refused: `launch/<script> --config <file> [--force] args`,
    its error line naming every needle (config_file: instead of the run's own config file)."""

    script: str
    args: tuple
    needles: tuple
    config_file: pathlib.Path | None = None


CASES = {}  # name -> builder(run, folder) -> [Refusal, ...] (inputs made under folder)


def _case(name):
    def register(build):
        CASES[name] = build
        return build

    return register


@pytest.fixture(scope="module")
def run(pristine_run, tmp_path_factory):
    """(output_dir, config file) of one finished tiny pipeline: a copy of the session's finished
    run (tests/e2e/conftest.py), with a config file that points at the copy."""
    root = tmp_path_factory.mktemp("bad_input")
    shutil.copytree(pristine_run[0], root / "run")
    config = yaml.safe_load(TINY.read_text())
    config["output_dir"] = str(root / "run")
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return root / "run", path


@pytest.fixture(scope="module")
def ran(run, tmp_path_factory):
    """Every case's commands, run in one process: (digest of the run before them, {name: Ran},
    {name: the case's Refusals}, the folder holding each case's inputs in <name>/)."""
    out, config = run
    root = tmp_path_factory.mktemp("cases")
    before = _digest(out)
    commands, refusals = {}, {}
    for name, build in CASES.items():
        folder = root / name
        folder.mkdir()
        refusals[name] = build(run, folder)
        for i, r in enumerate(refusals[name]):
            force = [] if r.script == "ppo.py" else ["--force"]
            argv = ["--config", str(r.config_file or config), *force, *r.args]
            commands[f"{name}.{i}"] = (r.script, argv)
    commands["pad_token"] = ("sft.py", _pad_token_argv(run, root / "pad_token"))
    return before, run_commands(root, commands, out), refusals, root


def _refused(ran, name):
    """Each of case `name`'s commands stopped with one error line naming every needle, and the
    finished run is byte for byte what it was after it."""
    before, results, refusals, _ = ran
    assert refusals[name]
    for i, r in enumerate(refusals[name]):
        proc = results[f"{name}.{i}"]
        assert proc.returncode == 2, (r, proc.returncode, proc.stderr[-3000:])
        assert "Traceback" not in proc.stderr + proc.stdout
        errors = [x for x in proc.stderr.splitlines() if x.startswith("error: ")]
        assert len(errors) == 1, proc.stderr[-3000:]
        for needle in r.needles:
            assert needle in errors[0], (needle, errors[0])
        assert proc.digest == before, f"a refused run changed the finished outputs: {r}"


def _edited_config(run, folder, section: str, key: str, value) -> pathlib.Path:
    config = yaml.safe_load(run[1].read_text())
    config[section][key] = value
    path = folder / "edited.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _jsonl(path: pathlib.Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


# ---------------------------------------------------------------- config files and overrides
@_case("unknown_key")
def _unknown_key(run, folder):
    bad = _edited_config(run, folder, "sft", "learnig_rate", 0.1)
    return [
        Refusal(
            "sft.py",
            (),
            (f"config file {bad}", "unknown option 'sft.learnig_rate'"),
            config_file=bad,
        )
    ]


def test_unknown_key_in_the_config_file(ran):
    _refused(ran, "unknown_key")


@_case("wrong_type")
def _wrong_type(run, folder):
    bad = _edited_config(run, folder, "reward", "micro_batch_size_per_gpu", "16x")
    return [
        Refusal(
            "reward.py",
            (),
            (
                f"config file {bad}",
                "option reward.micro_batch_size_per_gpu: expected int, got '16x'",
            ),
            config_file=bad,
        ),
        Refusal(
            "ppo.py",
            ("--ppo.kl_coef", "big"),
            ("command line", "option ppo.kl_coef: expected float"),
        ),
    ]


def test_wrong_type_in_the_config_file_and_on_the_command_line(ran):
    _refused(ran, "wrong_type")


SIZES = [
    (
        "--reward.micro_batch_size_per_gpu",
        "0",
        "option reward.micro_batch_size_per_gpu=0 must be > 0",
    ),
    ("--sft.epochs", "-1", "option sft.epochs=-1 must be > 0"),
    ("--ppo.top_k", "-5", "option ppo.top_k=-5 must be >= 0"),
]
for _option, _value, _needle in SIZES:
    CASES[f"size{_option}"] = lambda run, folder, o=_option, v=_value, n=_needle: [
        Refusal("ppo.py", (o, v), (n,))
    ]


@pytest.mark.parametrize("option, value, needle", SIZES)
def test_zero_or_negative_size(ran, option, value, needle):
    assert ran[2][f"size{option}"][0].needles == (needle,)
    _refused(ran, f"size{option}")


@_case("batch_sizes")
def _batch_sizes(run, folder):
    return [
        Refusal(
            "ppo.py",
            ("--ppo.mini_batch_size", "6"),
            ("ppo.rollout_batch_size=16 must be a multiple of ppo.mini_batch_size=6",),
        ),
        # a global batch larger than the data: nothing to train on
        Refusal(
            "sft.py",
            ("--sft.micro_batch_size_per_gpu", "2048"),
            ("stage sft: 1200 training rows are fewer than one global batch of 2048",),
        ),
    ]


def test_batch_sizes_that_do_not_divide(ran):
    _refused(ran, "batch_sizes")


# ---------------------------------------------------------------- DeepSpeed JSON
@_case("ds_config")
def _ds_config(run, folder):
    from launch_util import REPO

    ds = json.loads((REPO / "ds_configs" / "zero3_train.json").read_text())
    ds["train_micro_batch_size_per_gpu"] = 4
    path = folder / "ds.json"
    path.write_text(json.dumps(ds))
    ds.pop("train_micro_batch_size_per_gpu")
    ds["optimizer"] = {"type": "AdamW", "params": {"lr": 1e-5}}
    path2 = folder / "ds_optimizer.json"
    path2.write_text(json.dumps(ds))
    return [
        Refusal(
            "sft.py",
            ("--ds_config", str(path)),
            (
                f"DeepSpeed config {path} sets train_micro_batch_size_per_gpu=4 but the run "
                f"config gives 16",
            ),
        ),
        Refusal(
            "ppo.py", ("--ds_config", str(path2)), (f"DeepSpeed config {path2} sets 'optimizer'",)
        ),
    ]


def test_ds_config_that_contradicts_the_run_config(ran):
    _refused(ran, "ds_config")


# ---------------------------------------------------------------- files and rows
@_case("missing_files")
def _missing_files(run, folder):
    missing = folder / "nope.jsonl"
    return [
        Refusal(
            "ppo.py",
            ("--data.reward_data_path", str(missing)),
            (f"option data.reward_data_path: {missing} does not exist",),
        ),
        Refusal(
            "ppo.py",
            ("--ds_inference_config", str(folder / "nope.json")),
            (f"option ds_inference_config: {folder / 'nope.json'} does not exist",),
        ),
        # a path no stage that runs reads is checked too (PPO from two given models ignores the
        # tokenizer)
        Refusal(
            "ppo.py",
            (
                "--ppo.actor_model_path",
                str(run[0] / "sft" / "model"),
                "--ppo.reward_model_path",
                str(run[0] / "reward" / "model"),
                "--data.tokenizer_path",
                "/nonexistent",
            ),
            ("option data.tokenizer_path: /nonexistent does not exist",),
        ),
    ]


def test_missing_files(ran):
    _refused(ran, "missing_files")


@_case("missing_field")
def _missing_field(run, folder):
    path = _jsonl(
        folder / "pairs.jsonl",
        [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "a"}],
    )
    return [
        Refusal(
            "reward.py",
            ("--data.reward_data_path", path),
            (f"dataset {path}, row 1", "'rejected'"),
        )
    ]


def test_row_with_a_missing_field(ran):
    _refused(ran, "missing_field")


@_case("empty_field")
def _empty_field(run, folder):
    path = _jsonl(
        folder / "sft.jsonl",
        [{"prompt": "p", "response": "r"}, {"prompt": "p", "response": "  "}],
    )
    return [
        Refusal(
            "sft.py",
            ("--data.sft_eval_data_path", path),
            (f"dataset {path}, row 1: field 'response' is empty or not text",),
        )
    ]


def test_row_with_an_empty_field(ran):
    _refused(ran, "empty_field")


@_case("chosen_is_rejected")
def _chosen_is_rejected(run, folder):
    path = _jsonl(
        folder / "pairs.jsonl",
        [
            {"prompt": "p", "chosen": "a", "rejected": "b"},
            {"prompt": "p", "chosen": "same", "rejected": "same"},
        ],
    )
    return [
        Refusal(
            "reward.py",
            ("--data.reward_data_path", path),
            (f"dataset {path}, row 1: 'chosen' and 'rejected' are identical",),
        )
    ]


def test_chosen_equal_to_rejected(ran):
    _refused(ran, "chosen_is_rejected")


@_case("non_utf8")
def _non_utf8(run, folder):
    path = folder / "prompts.jsonl"
    path.write_bytes(b'{"prompt": "hello"}\n{"prompt": "caf\xe9"}\n')
    return [
        Refusal(
            "ppo.py",
            ("--data.prompt_data_path", str(path)),
            (f"dataset {path}, line 2: not UTF-8 text (byte 0xe9",),
        )
    ]


def test_non_utf8_text(ran):
    _refused(ran, "non_utf8")


@_case("hh_no_assistant")
def _hh_no_assistant(run, folder):
    good = {"chosen": "\n\nHuman: p\n\nAssistant: a", "rejected": "\n\nHuman: p\n\nAssistant: b"}
    path = _jsonl(folder / "hh.jsonl", [good] * 20 + [{**good, "chosen": "\n\nHuman: no answer"}])
    return [
        Refusal(
            "ppo.py",
            ("--data.data_path", path),
            (
                f"dataset {path}, row 20: field 'chosen' is not an HH dialogue: "
                "it has no 'Assistant:' turn",
            ),
        )
    ]


def test_hh_dialogue_without_an_assistant_turn(ran):
    _refused(ran, "hh_no_assistant")


@_case("chat_template")
def _chat_template(run, folder):
    chat = {"messages": [{"role": "user", "content": "p"}, {"role": "assistant", "content": "r"}]}
    path = _jsonl(folder / "chat.jsonl", [chat] * 20)
    return [
        Refusal(
            "sft.py",
            ("--data.sft_data_path", path),
            (
                f"dataset {path} (without its held-out eval slice) holds chat messages",
                "has none",
                "--data.tokenizer_path",
            ),
        )
    ]


def test_chat_messages_need_a_chat_template(ran):
    _refused(ran, "chat_template")


# ---------------------------------------------------------------- model and tokenizer folders
def _pad_token_argv(run, folder) -> list[str]:
    """SFT for one step with the run's tokenizer minus its pad token, into folder/fresh."""
    out, config = run
    tok = folder / "tok"
    shutil.copytree(out / "task" / "tokenizer", tok)
    tok_config = json.loads((tok / "tokenizer_config.json").read_text())
    del tok_config["pad_token"]
    (tok / "tokenizer_config.json").write_text(json.dumps(tok_config))
    fresh = folder / "fresh"
    return [
        "--config",
        str(config),
        "--output_dir",
        str(fresh),
        "--data.tokenizer_path",
        str(tok),
        "--sft.max_steps",
        "1",
    ]


def test_tokenizer_without_pad_token_uses_eos_with_a_warning(ran):
    """Not an error: the run goes on with EOS as padding, says so, and writes only its own
    folder."""
    before, results, _, root = ran
    proc = results["pad_token"]
    tok, fresh = root / "pad_token" / "tok", root / "pad_token" / "fresh"
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"tokenizer {tok} has no pad token; using EOS ('</s>') for padding." in proc.stdout
    saved = json.loads((fresh / "sft" / "model" / "tokenizer_config.json").read_text())
    assert saved["pad_token"] == saved["eos_token"] == "</s>"
    assert proc.digest == before


@_case("small_vocabulary")
def _small_vocabulary(run, folder):
    out, _ = run
    model = folder / "model"
    model.mkdir()
    config = json.loads((out / "task" / "model" / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "vocab_size": 10}))
    tokens = len(
        json.loads((out / "task" / "tokenizer" / "tokenizer.json").read_text())["model"]["vocab"]
    )
    return [
        Refusal(
            "sft.py",
            (
                "--model.model_name_or_path",
                str(model),
                "--data.tokenizer_path",
                str(out / "task" / "tokenizer"),
            ),
            (
                f"model {model}: the tokenizer has {tokens} tokens but the model's vocabulary "
                "has 10",
            ),
        )
    ]


def test_model_vocabulary_smaller_than_the_tokenizer(ran):
    _refused(ran, "small_vocabulary")


@_case("no_config")
def _no_config(run, folder):
    folder = folder / "rm"
    shutil.copytree(run[0] / "reward" / "model", folder)
    (folder / "config.json").unlink()
    return [
        Refusal(
            "ppo.py",
            ("--ppo.reward_model_path", str(folder)),
            (f"model {folder} is not a Hugging Face model folder (no config.json there)",),
        )
    ]


def test_model_folder_without_config(ran):
    _refused(ran, "no_config")


class _RunsOnUnpickle:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


@_case("pickled_objects")
def _pickled_objects(run, folder):
    from safetensors.torch import load_file

    marker = folder / "code_ran"
    folder = folder / "rm"
    shutil.copytree(run[0] / "reward" / "model", folder)
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save({**state, "extra": _RunsOnUnpickle(marker)}, folder / "pytorch_model.bin")
    return [
        Refusal(
            "ppo.py",
            ("--ppo.reward_model_path", str(folder)),
            (f"model {folder}: its PyTorch weights file holds pickled objects other than tensors",),
        )
    ]


def test_weights_holding_pickled_objects_are_refused_unopened(ran):
    _refused(ran, "pickled_objects")
    assert (ran[3] / "pickled_objects" / "rm" / "pytorch_model.bin").is_file()
    assert not (ran[3] / "pickled_objects" / "code_ran").exists()


@_case("custom_code")
def _custom_code(run, folder):
    marker = folder / "code_ran"
    folder = folder / "actor"
    shutil.copytree(run[0] / "sft" / "model", folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(
        model_type="custom_llama",
        auto_map={
            "AutoConfig": "configuration_custom.CustomConfig",
            "AutoModelForCausalLM": "modeling_custom.CustomLM",
        },
    )
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "configuration_custom.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
        "from transformers import LlamaConfig\n\n\nclass CustomConfig(LlamaConfig):\n"
        "    model_type = 'custom_llama'\n"
    )
    return [
        Refusal(
            "ppo.py",
            ("--ppo.actor_model_path", str(folder)),
            (str(folder), "needs custom code", "--model.trust_remote_code true"),
        )
    ]


def test_custom_model_code_needs_trust_remote_code(ran):
    _refused(ran, "custom_code")
    assert (ran[3] / "custom_code" / "actor" / "configuration_custom.py").is_file()
    assert not (ran[3] / "custom_code" / "code_ran").exists()
