"""Tier 3: every kind of bad input against one finished run, through the real launchers.

The session's finished tiny pipeline is copied once (module fixture); each case then runs a
launcher as a plain process (one rank) on the same output folder and checks: exit code 2, one
`error:` line naming the file, row, field or option, no traceback, and not one byte of the finished
run changed. The one-stage launchers get `--force`, so their stage would otherwise rerun; `ppo.py`
runs all three stages and does not (a forced run may retrain SFT and the reward model): the bad
input changes the PPO stage's fingerprint, so PPO would rerun.
"""

import hashlib
import json
import pathlib
import shutil

import pytest
import torch
import yaml
from launch_util import TINY, launch


def _digest(folder: pathlib.Path) -> str:
    """Names and bytes of every file under `folder` (the whole run: task, stages, summary)."""
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            h.update(str(f.relative_to(folder)).encode() + f.read_bytes())
    return h.hexdigest()


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


@pytest.fixture
def refused(run):
    """refused(script, *args, needles=[...]): the launcher stops with one error line naming
    every needle, and the finished run is byte for byte what it was."""
    out, config = run

    def check(script: str, *args: str, needles: list[str], config_file=None):
        before = _digest(out)
        force = [] if script == "ppo.py" else ["--force"]
        proc = launch(script, "--config", str(config_file or config), *force, *args, launcher=False)
        assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
        assert "Traceback" not in proc.stderr + proc.stdout
        errors = [x for x in proc.stderr.splitlines() if x.startswith("error: ")]
        assert len(errors) == 1, proc.stderr[-3000:]
        for needle in needles:
            assert needle in errors[0], (needle, errors[0])
        assert _digest(out) == before, "a refused run changed the finished outputs"
        return proc

    return check


def _edited_config(run, tmp_path, section: str, key: str, value) -> pathlib.Path:
    config = yaml.safe_load(run[1].read_text())
    config[section][key] = value
    path = tmp_path / "edited.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _jsonl(path: pathlib.Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


# ---------------------------------------------------------------- config files and overrides
def test_unknown_key_in_the_config_file(run, refused, tmp_path):
    bad = _edited_config(run, tmp_path, "sft", "learnig_rate", 0.1)
    refused(
        "sft.py",
        config_file=bad,
        needles=[f"config file {bad}", "unknown option 'sft.learnig_rate'"],
    )


def test_wrong_type_in_the_config_file_and_on_the_command_line(run, refused, tmp_path):
    bad = _edited_config(run, tmp_path, "reward", "micro_batch_size_per_gpu", "16x")
    refused(
        "reward.py",
        config_file=bad,
        needles=[
            f"config file {bad}",
            "option reward.micro_batch_size_per_gpu: expected int, got '16x'",
        ],
    )
    refused(
        "ppo.py",
        "--ppo.kl_coef",
        "big",
        needles=["command line", "option ppo.kl_coef: expected float"],
    )


@pytest.mark.parametrize(
    "option, value, needle",
    [
        (
            "--reward.micro_batch_size_per_gpu",
            "0",
            "option reward.micro_batch_size_per_gpu=0 must be > 0",
        ),
        ("--sft.epochs", "-1", "option sft.epochs=-1 must be > 0"),
        ("--ppo.top_k", "-5", "option ppo.top_k=-5 must be >= 0"),
    ],
)
def test_zero_or_negative_size(refused, option, value, needle):
    refused("ppo.py", option, value, needles=[needle])


def test_batch_sizes_that_do_not_divide(refused):
    refused(
        "ppo.py",
        "--ppo.mini_batch_size",
        "6",
        needles=["ppo.rollout_batch_size=16 must be a multiple of ppo.mini_batch_size=6"],
    )
    # a global batch larger than the data: nothing to train on
    refused(
        "sft.py",
        "--sft.micro_batch_size_per_gpu",
        "2048",
        needles=["stage sft: 1200 training rows are fewer than one global batch of 2048"],
    )


# ---------------------------------------------------------------- DeepSpeed JSON
def test_ds_config_that_contradicts_the_run_config(refused, tmp_path):
    from launch_util import REPO

    ds = json.loads((REPO / "ds_configs" / "zero3_train.json").read_text())
    ds["train_micro_batch_size_per_gpu"] = 4
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    refused(
        "sft.py",
        "--ds_config",
        str(path),
        needles=[
            f"DeepSpeed config {path} sets train_micro_batch_size_per_gpu=4 but the run config "
            f"gives 16"
        ],
    )
    ds.pop("train_micro_batch_size_per_gpu")
    ds["optimizer"] = {"type": "AdamW", "params": {"lr": 1e-5}}
    path.write_text(json.dumps(ds))
    refused(
        "ppo.py", "--ds_config", str(path), needles=[f"DeepSpeed config {path} sets 'optimizer'"]
    )


# ---------------------------------------------------------------- files and rows
def test_missing_files(run, refused, tmp_path):
    missing = tmp_path / "nope.jsonl"
    refused(
        "ppo.py",
        "--data.reward_data_path",
        str(missing),
        needles=[f"option data.reward_data_path: {missing} does not exist"],
    )
    refused(
        "ppo.py",
        "--ds_inference_config",
        str(tmp_path / "nope.json"),
        needles=[f"option ds_inference_config: {tmp_path / 'nope.json'} does not exist"],
    )
    # a path no stage that runs reads is checked too (PPO from two given models ignores the
    # tokenizer)
    refused(
        "ppo.py",
        "--ppo.actor_model_path",
        str(run[0] / "sft" / "model"),
        "--ppo.reward_model_path",
        str(run[0] / "reward" / "model"),
        "--data.tokenizer_path",
        "/nonexistent",
        needles=["option data.tokenizer_path: /nonexistent does not exist"],
    )


def test_row_with_a_missing_field(refused, tmp_path):
    path = _jsonl(
        tmp_path / "pairs.jsonl",
        [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "a"}],
    )
    refused(
        "reward.py",
        "--data.reward_data_path",
        path,
        needles=[f"dataset {path}, row 1", "'rejected'"],
    )


def test_row_with_an_empty_field(refused, tmp_path):
    path = _jsonl(
        tmp_path / "sft.jsonl",
        [{"prompt": "p", "response": "r"}, {"prompt": "p", "response": "  "}],
    )
    refused(
        "sft.py",
        "--data.sft_eval_data_path",
        path,
        needles=[f"dataset {path}, row 1: field 'response' is empty or not text"],
    )


def test_chosen_equal_to_rejected(refused, tmp_path):
    path = _jsonl(
        tmp_path / "pairs.jsonl",
        [
            {"prompt": "p", "chosen": "a", "rejected": "b"},
            {"prompt": "p", "chosen": "same", "rejected": "same"},
        ],
    )
    refused(
        "reward.py",
        "--data.reward_data_path",
        path,
        needles=[f"dataset {path}, row 1: 'chosen' and 'rejected' are identical"],
    )


def test_non_utf8_text(refused, tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_bytes(b'{"prompt": "hello"}\n{"prompt": "caf\xe9"}\n')
    refused(
        "ppo.py",
        "--data.prompt_data_path",
        str(path),
        needles=[f"dataset {path}, line 2: not UTF-8 text (byte 0xe9"],
    )


def test_hh_dialogue_without_an_assistant_turn(refused, tmp_path):
    good = {"chosen": "\n\nHuman: p\n\nAssistant: a", "rejected": "\n\nHuman: p\n\nAssistant: b"}
    path = _jsonl(tmp_path / "hh.jsonl", [good] * 20 + [{**good, "chosen": "\n\nHuman: no answer"}])
    refused(
        "ppo.py",
        "--data.data_path",
        path,
        needles=[
            f"dataset {path}, row 20: field 'chosen' is not an HH dialogue: "
            "it has no 'Assistant:' turn"
        ],
    )


def test_chat_messages_need_a_chat_template(refused, tmp_path):
    chat = {"messages": [{"role": "user", "content": "p"}, {"role": "assistant", "content": "r"}]}
    path = _jsonl(tmp_path / "chat.jsonl", [chat] * 20)
    refused(
        "sft.py",
        "--data.sft_data_path",
        path,
        needles=[
            f"dataset {path} (without its held-out eval slice) holds chat messages",
            "has none",
            "--data.tokenizer_path",
        ],
    )


# ---------------------------------------------------------------- model and tokenizer folders
def test_tokenizer_without_pad_token_uses_eos_with_a_warning(run, tmp_path):
    """Not an error: the run goes on with EOS as padding, says so, and writes only its own
    folder."""
    out, config = run
    before = _digest(out)
    tok = tmp_path / "tok"
    shutil.copytree(out / "task" / "tokenizer", tok)
    tok_config = json.loads((tok / "tokenizer_config.json").read_text())
    del tok_config["pad_token"]
    (tok / "tokenizer_config.json").write_text(json.dumps(tok_config))
    fresh = tmp_path / "fresh"
    proc = launch(
        "sft.py",
        "--config",
        str(config),
        "--output_dir",
        str(fresh),
        "--data.tokenizer_path",
        str(tok),
        "--sft.max_steps",
        "1",
        launcher=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"tokenizer {tok} has no pad token; using EOS ('</s>') for padding." in proc.stdout
    saved = json.loads((fresh / "sft" / "model" / "tokenizer_config.json").read_text())
    assert saved["pad_token"] == saved["eos_token"] == "</s>"
    assert _digest(out) == before


def test_model_vocabulary_smaller_than_the_tokenizer(run, refused, tmp_path):
    out, _ = run
    model = tmp_path / "model"
    model.mkdir()
    config = json.loads((out / "task" / "model" / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "vocab_size": 10}))
    tokens = len(
        json.loads((out / "task" / "tokenizer" / "tokenizer.json").read_text())["model"]["vocab"]
    )
    refused(
        "sft.py",
        "--model.model_name_or_path",
        str(model),
        "--data.tokenizer_path",
        str(out / "task" / "tokenizer"),
        needles=[
            f"model {model}: the tokenizer has {tokens} tokens but the model's vocabulary has 10"
        ],
    )


def test_model_folder_without_config(run, refused, tmp_path):
    folder = tmp_path / "rm"
    shutil.copytree(run[0] / "reward" / "model", folder)
    (folder / "config.json").unlink()
    refused(
        "ppo.py",
        "--ppo.reward_model_path",
        str(folder),
        needles=[f"model {folder} is not a Hugging Face model folder (no config.json there)"],
    )


class _RunsOnUnpickle:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_weights_holding_pickled_objects_are_refused_unopened(run, refused, tmp_path):
    from safetensors.torch import load_file

    folder = tmp_path / "rm"
    shutil.copytree(run[0] / "reward" / "model", folder)
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "code_ran"
    torch.save({**state, "extra": _RunsOnUnpickle(marker)}, folder / "pytorch_model.bin")
    refused(
        "ppo.py",
        "--ppo.reward_model_path",
        str(folder),
        needles=[
            f"model {folder}: its PyTorch weights file holds pickled objects other than tensors"
        ],
    )
    assert not marker.exists()


def test_custom_model_code_needs_trust_remote_code(run, refused, tmp_path):
    folder = tmp_path / "actor"
    shutil.copytree(run[0] / "sft" / "model", folder)
    marker = tmp_path / "code_ran"
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
    refused(
        "ppo.py",
        "--ppo.actor_model_path",
        str(folder),
        needles=[str(folder), "needs custom code", "--model.trust_remote_code true"],
    )
    assert not marker.exists()
