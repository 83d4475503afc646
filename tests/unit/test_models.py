"""Tokenizer/model-folder checks (pad, EOS, vocabulary, safe weights, remote code); scores read at
the last real token."""

import logging
import pathlib
import re

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from pipeline.errors import UserError
from pipeline.models import (
    check_vocab,
    load_causal_lm,
    load_scalar_model,
    load_tokenizer,
    sequence_scores,
)


def _tiny(vocab: int, **kw):
    torch.manual_seed(0)
    return LlamaForSequenceClassification(
        LlamaConfig(
            vocab_size=vocab,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            num_labels=1,
            **kw,
        )
    )


def test_vocab_mismatch_is_refused(task_tokenizer):
    check_vocab(_tiny(len(task_tokenizer)), task_tokenizer, "model m")  # fits
    with pytest.raises(
        UserError, match=r"model m: the tokenizer has \d+ tokens but the model's vocabulary has 10"
    ):
        check_vocab(_tiny(10), task_tokenizer, "model m")


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(UserError, match="not a Hugging Face model folder"):
        load_causal_lm(str(tmp_path))


def test_score_is_read_at_the_last_real_token_for_left_and_right_padding():
    model = _tiny(50).eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    alone = sequence_scores(model, ids, torch.ones_like(ids), 0)
    right = sequence_scores(
        model, torch.tensor([[5, 6, 7, 8, 0, 0]]), torch.tensor([[1, 1, 1, 1, 0, 0]]), 0
    )
    assert torch.allclose(alone, right, atol=1e-5)
    left_mask = torch.tensor([[0, 0, 1, 1, 1, 1]])
    positions = (left_mask.cumsum(1) - 1).clamp(min=0)
    hidden = model.base_model(
        input_ids=torch.tensor([[0, 0, 5, 6, 7, 8]]),
        attention_mask=left_mask,
        position_ids=positions,
    ).last_hidden_state
    assert torch.allclose(model.score(hidden)[:, -1, 0], alone, atol=1e-5)


# ---------------------------------------------------------------- tokenizer and model folders
def _tokenizer_folder(tmp_path, task_tokenizer, **changes):
    """The task tokenizer saved to a folder, with tokenizer_config.json entries changed or
    removed."""
    import json

    folder = tmp_path / "tok"
    task_tokenizer.save_pretrained(folder)
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    cfg_path.write_text(json.dumps(cfg))
    return folder


def test_tokenizer_without_pad_token_pads_with_eos_and_warns(tmp_path, task_tokenizer, caplog):
    folder = _tokenizer_folder(tmp_path, task_tokenizer, pad_token=None)
    with caplog.at_level(logging.WARNING, logger="pipeline.models"):
        tok = load_tokenizer(str(folder))
    assert tok.pad_token == tok.eos_token == "</s>" and tok.pad_token_id == tok.eos_token_id
    assert f"tokenizer {folder} has no pad token; using EOS ('</s>') for padding." in caplog.text
    caplog.clear()
    load_tokenizer(str(_tokenizer_folder(tmp_path, task_tokenizer)))  # has one: no warning
    assert "no pad token" not in caplog.text


def test_tokenizer_without_eos_is_refused(tmp_path, task_tokenizer):
    folder = _tokenizer_folder(tmp_path, task_tokenizer, eos_token=None)
    with pytest.raises(UserError, match=re.escape(f"tokenizer {folder} has no EOS token")):
        load_tokenizer(str(folder))


@pytest.mark.parametrize("content", ["{not json", '{"version": "1.0"}'])
def test_malformed_tokenizer_file_names_the_folder(tmp_path, task_tokenizer, content):
    folder = _tokenizer_folder(tmp_path, task_tokenizer)
    (folder / "tokenizer.json").write_text(content)
    with pytest.raises(UserError, match=re.escape(f"tokenizer {folder} could not be loaded: ")):
        load_tokenizer(str(folder))


def _llama_folder(path, vocab=50):
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


class _RunsOnUnpickle:
    """A pickle payload: unpickling it would create `marker` (standing in for arbitrary code)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


@pytest.mark.parametrize("load", [load_causal_lm, load_scalar_model])
def test_pickled_objects_in_weights_are_never_unpickled(tmp_path, load):
    folder = _llama_folder(tmp_path / "m")
    state = {k: v.clone() for k, v in LlamaForCausalLM.from_pretrained(folder).state_dict().items()}
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "code_ran"
    torch.save({**state, "extra": _RunsOnUnpickle(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(
        UserError,
        match=re.escape(
            f"model {folder}: its PyTorch weights file holds pickled objects other than tensors"
        ),
    ):
        load(str(folder))
    assert not marker.exists()
    torch.save(state, folder / "pytorch_model.bin")  # a plain state dict of tensors is fine
    assert torch.equal(
        load_causal_lm(str(folder)).model.embed_tokens.weight, state["model.embed_tokens.weight"]
    )


def test_corrupt_safetensors_names_the_folder(tmp_path):
    folder = _llama_folder(tmp_path / "m")
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match=re.escape(f"model {folder} could not be loaded: ")):
        load_causal_lm(str(folder))


def test_custom_code_in_a_model_folder_runs_only_with_trust_remote_code(tmp_path, task_tokenizer):
    import json

    from pipeline.config import Config

    assert Config().model.trust_remote_code is False
    folder = _llama_folder(tmp_path / "m")
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
    for load in (load_causal_lm, load_scalar_model):
        with pytest.raises(
            UserError, match=re.escape(f"model {folder} needs custom code from its folder")
        ) as e:
            load(str(folder))
        assert "--model.trust_remote_code true" in str(e.value)
    assert not marker.exists()


def test_every_hf_load_passes_trust_remote_code_and_no_unsafe_torch_load():
    """Static guard over pipeline/: each from_pretrained/from_config call passes trust_remote_code
    (the user's option, default False); torch.load is only ever called with weights_only=True."""
    import ast

    root = pathlib.Path(__file__).resolve().parents[2] / "pipeline"
    hf_calls = 0
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            keywords = {k.arg: k.value for k in node.keywords}
            where = f"{path.name}:{node.lineno}"
            if node.func.attr in ("from_pretrained", "from_config"):
                hf_calls += 1
                assert "trust_remote_code" in keywords, where
                if node.func.attr == "from_pretrained" and getattr(
                    node.func.value, "id", ""
                ).startswith("AutoModel"):
                    assert getattr(keywords.get("weights_only"), "value", None) is True, where
            if node.func.attr == "load" and getattr(node.func.value, "id", "") == "torch":
                assert getattr(keywords.get("weights_only"), "value", None) is True, where
    assert hf_calls >= 7
