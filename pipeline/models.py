"""Models: tokenizer, policy (any causal LM), scalar models (reward / critic), forward helpers.

A scalar model is a Hugging Face sequence-classification model with `num_labels=1`: the backbone
plus a linear `score` head. We apply the head to every position ourselves (the critic needs a
value per token) and read the reward at the last real token. Saved folders load with plain
`AutoModelForSequenceClassification`.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from pipeline.errors import UserError

log = logging.getLogger(__name__)
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # model.dtype


def _why(path: str, what: str, e: Exception) -> UserError:
    """One paragraph for an error transformers/torch/safetensors raised while loading `path`."""
    import pickle

    text = str(e)
    if "trust_remote_code" in text or "contains custom code" in text:
        return UserError(f"{what} {path} needs custom code from its folder to load; that code is not run "
                         f"unless you pass --model.trust_remote_code true (only for folders you trust).")
    if isinstance(e, pickle.UnpicklingError):
        return UserError(f"{what} {path}: its PyTorch weights file holds pickled objects other than "
                         f"tensors, which are never unpickled here (torch.load weights_only=True). "
                         f"Save the weights as safetensors or as a plain state dict of tensors.")
    first = text.splitlines()[0] if text else ""
    if not isinstance(e, (OSError, ValueError)) or not first:
        first = f"{type(e).__name__} {first}".strip()
    return UserError(f"{what} {path} could not be loaded: {first}")


def _load_errors() -> tuple:
    """What a bad tokenizer or model folder raises (not our own bugs: those stay tracebacks)."""
    import pickle

    from safetensors import SafetensorError

    return OSError, ValueError, pickle.UnpicklingError, SafetensorError


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (*_load_errors(), KeyError, TypeError) as e:  # Key/TypeError: a malformed tokenizer file
        raise _why(path, "tokenizer", e) from None
    except Exception as e:  # the `tokenizers` library raises a bare Exception for a malformed tokenizer.json
        if type(e) is not Exception:
            raise
        raise _why(path, "tokenizer", e) from None
    if tok.eos_token_id is None:
        raise UserError(f"tokenizer {path} has no EOS token; responses need one to end.")
    if tok.pad_token_id is None:
        log.warning("tokenizer %s has no pad token; using EOS (%r) for padding.", path, tok.eos_token)
        tok.pad_token = tok.eos_token
    return tok


def _check_model_path(path: str, what: str) -> None:
    local = path.startswith((".", "/")) or Path(path).exists()
    if path and local and not (Path(path) / "config.json").is_file():
        raise UserError(f"{what} {path} is not a Hugging Face model folder (no config.json there).")


def _has_weights(path: str) -> bool:
    p = Path(path)
    return any(p.glob("*.safetensors")) or any(p.glob("*.bin"))


def load_causal_lm(path: str, trust_remote_code: bool = False, dtype: str = "fp32"):
    """A causal LM from a folder or hub name, in `dtype` (a model.dtype name); a folder with only
    config.json builds from scratch.

    Weights load from safetensors, or from a PyTorch file with torch.load(weights_only=True):
    nothing in a model folder is unpickled as arbitrary objects, and its own code runs only with
    `trust_remote_code`.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    _check_model_path(path, "model")
    try:
        if Path(path).is_dir() and not _has_weights(path):
            config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
            return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code,
                                                    dtype=TORCH_DTYPES[dtype])
        return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code,
                                                    use_safetensors=None, weights_only=True,
                                                    dtype=TORCH_DTYPES[dtype])
    except _load_errors() as e:
        raise _why(path, "model", e) from None


def load_scalar_model(path: str, trust_remote_code: bool = False, dtype: str = "fp32"):
    """Backbone + scalar head in `dtype`. From a causal LM folder the head is new; from an RM folder
    it loads."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    _check_model_path(path, "model")
    try:
        if Path(path).is_dir() and not _has_weights(path):
            config = AutoConfig.from_pretrained(path, num_labels=1, trust_remote_code=trust_remote_code)
            model = AutoModelForSequenceClassification.from_config(config, trust_remote_code=trust_remote_code,
                                                                   dtype=TORCH_DTYPES[dtype])
        else:
            model = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=1, trust_remote_code=trust_remote_code, use_safetensors=None,
                weights_only=True, dtype=TORCH_DTYPES[dtype])
    except _load_errors() as e:
        raise _why(path, "model", e) from None
    if _score_head(model) is None:
        raise UserError(f"model {path}: its sequence-classification class has no `score` head.")
    return model


def enable_gradient_checkpointing(model) -> None:
    """Hugging Face gradient checkpointing: each decoder layer's activations are recomputed in
    backward instead of kept; HF does this only in train mode. Non-reentrant torch checkpointing
    (inputs need not require grad). transformers 5 renamed `gradient_checkpointing_enable` to this."""
    if not model.supports_gradient_checkpointing:
        raise UserError(f"option model.gradient_checkpointing: the {type(model).__name__} model does not "
                        f"support gradient checkpointing; set it to false.")
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout off for good, so train mode computes exactly what eval mode does.

    Dropout modules get p=0; HF attention and some layers read float attributes (`attention_dropout`,
    OPT's `dropout`) or config values (Falcon, Persimmon) in train mode, so those become 0 too.
    """
    configs = {}
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):  # Dropout, Dropout1d-3d, AlphaDropout
            module.p = 0.0
        _zero_dropout_floats(module)
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "to_dict"):
            configs[id(config)] = config
    for config in configs.values():
        _zero_dropout_floats(config)


def _zero_dropout_floats(obj) -> None:
    for name, value in list(vars(obj).items()):
        if ("dropout" in name or name.endswith("pdrop")) and isinstance(value, float):
            setattr(obj, name, 0.0)


def check_vocab(model, tokenizer, where: str) -> None:
    n = getattr(model.config, "vocab_size", None)
    if n is not None and len(tokenizer) > n:
        raise UserError(f"{where}: the tokenizer has {len(tokenizer)} tokens but the model's vocabulary "
                        f"has {n}; they do not belong together.")


def _score_head(model):
    return getattr(model, "score", None)


def token_values(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Scalar head at every position: (B, T) float32."""
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                              position_ids=position_ids).last_hidden_state
    return _score_head(model)(hidden).squeeze(-1).float()


def last_real_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of the last attended position; works for left and right padding."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions * attention_mask.long()).argmax(dim=1)


def sequence_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Reward-model score read at the last real (non-pad) token: (B,)."""
    values = token_values(model, input_ids, attention_mask)
    return values.gather(1, last_real_index(attention_mask)[:, None]).squeeze(1)


def causal_lm_loss(model, input_ids, attention_mask, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy over labelled tokens, and their count."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    target = labels[:, 1:]
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100, reduction="sum")
    return loss, (target != -100).sum()
