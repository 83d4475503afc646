"""Models: tokenizer, policy (any causal LM), scalar models (reward / critic), forward helpers.

A scalar model is a Hugging Face sequence-classification model with `num_labels=1`: the backbone
plus a linear `score` head. We apply the head to every position ourselves (the critic needs a
value per token) and read the reward where plain Hugging Face pools it (`score_index`). Saved
folders load with plain `AutoModelForSequenceClassification` and score the same.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
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
        return UserError(
            f"{what} {path} needs custom code from its folder to load; that code is not run "
            f"unless you pass --model.trust_remote_code true (only for folders you trust)."
        )
    if isinstance(e, pickle.UnpicklingError):
        return UserError(
            f"{what} {path}: its PyTorch weights file holds pickled objects other than "
            f"tensors, which are never unpickled here (torch.load weights_only=True). "
            f"Save the weights as safetensors or as a plain state dict of tensors."
        )
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
    except (
        Exception
    ) as e:  # the `tokenizers` library raises a bare Exception for a malformed tokenizer.json
        if type(e) is not Exception:
            raise
        raise _why(path, "tokenizer", e) from None
    if tok.eos_token_id is None:
        raise UserError(f"tokenizer {path} has no EOS token; responses need one to end.")
    if tok.pad_token_id is None:
        log.warning(
            "tokenizer %s has no pad token; using EOS (%r) for padding.", path, tok.eos_token
        )
        tok.pad_token = tok.eos_token
    return tok


def _check_model_path(path: str, what: str) -> None:
    local = path.startswith((".", "/")) or Path(path).exists()
    if path and local and not (Path(path) / "config.json").is_file():
        raise UserError(f"{what} {path} is not a Hugging Face model folder (no config.json there).")


def has_weights(path: str) -> bool:
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
        if Path(path).is_dir() and not has_weights(path):
            config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
            return AutoModelForCausalLM.from_config(
                config, trust_remote_code=trust_remote_code, dtype=TORCH_DTYPES[dtype]
            )
        return AutoModelForCausalLM.from_pretrained(
            path,
            trust_remote_code=trust_remote_code,
            use_safetensors=None,
            weights_only=True,
            dtype=TORCH_DTYPES[dtype],
        )
    except _load_errors() as e:
        raise _why(path, "model", e) from None


def load_scalar_model(path: str, trust_remote_code: bool = False, dtype: str = "fp32"):
    """Backbone + scalar head in `dtype`. From a causal LM folder the head is new; from an RM folder
    it loads."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    _check_model_path(path, "model")
    try:
        if Path(path).is_dir() and not has_weights(path):
            config = AutoConfig.from_pretrained(
                path, num_labels=1, trust_remote_code=trust_remote_code
            )
            model = AutoModelForSequenceClassification.from_config(
                config, trust_remote_code=trust_remote_code, dtype=TORCH_DTYPES[dtype]
            )
        else:
            model = AutoModelForSequenceClassification.from_pretrained(
                path,
                num_labels=1,
                trust_remote_code=trust_remote_code,
                use_safetensors=None,
                weights_only=True,
                dtype=TORCH_DTYPES[dtype],
            )
    except _load_errors() as e:
        raise _why(path, "model", e) from None
    if _score_head(model) is None:
        raise UserError(f"model {path}: its sequence-classification class has no `score` head.")
    return model


def enable_gradient_checkpointing(model) -> None:
    """Hugging Face gradient checkpointing: each decoder layer's activations are recomputed in
    backward instead of kept; HF does this only in train mode. Non-reentrant torch checkpointing
    (inputs need not require grad). transformers 5 renamed `gradient_checkpointing_enable` to
    this."""
    if not model.supports_gradient_checkpointing:
        raise UserError(
            f"option model.gradient_checkpointing: the {type(model).__name__} model does not "
            f"support gradient checkpointing; set it to false."
        )
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout off for good, so train mode computes exactly what eval mode does.

    Dropout modules get p=0; HF attention and some layers read float attributes
    (`attention_dropout`, OPT's `dropout`) or config values (Falcon, Persimmon) in train mode, so
    those become 0 too.
    """
    configs = {}
    for module in model.modules():
        if isinstance(
            module, torch.nn.modules.dropout._DropoutNd
        ):  # Dropout, Dropout1d-3d, AlphaDropout
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
        raise UserError(
            f"{where}: the tokenizer has {len(tokenizer)} tokens but the model's vocabulary "
            f"has {n}; they do not belong together."
        )


def _score_head(model):
    return getattr(model, "score", None)


def token_values(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scalar head at every position: (B, T) float32."""
    hidden = model.base_model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
    ).last_hidden_state
    return _score_head(model)(hidden).squeeze(-1).float()


def last_real_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of the last attended position; works for left and right padding."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions * attention_mask.long()).argmax(dim=1)


def score_index(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, pad_token_id: int | None
) -> torch.Tensor:
    """(B,) the position a reward model's score is read at, in training, in PPO and by plain Hugging
    Face: the last attended token that is not the pad token (left and right padding alike).

    `AutoModelForSequenceClassification` pools the rightmost token that is not `config.pad_token_id`
    (the last one when that is unset); the reward stage sets it to the tokenizer's pad, so an
    exported reward model scores with HF / TRL / OpenRLHF-style consumers exactly what it was
    trained on. With a pad distinct from EOS (the default task) this is the last attended position,
    the response's EOS. When a tokenizer without a pad token pads with EOS, it is the token BEFORE
    the EOS: such a reward model cannot see whether a response was terminated or cut off at
    max_response_len, so it cannot learn to penalise truncation (give the tokenizer a pad token of
    its own for that).
    """
    real = attention_mask.bool()
    if pad_token_id is not None:
        real = real & (input_ids != pad_token_id)
    return last_real_index(real)


def pooling_pad_id(model) -> int | None:
    """The pad id a Hugging Face sequence-classification model pools by (None when unset)."""
    return model.config.get_text_config().pad_token_id


def sequence_scores(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, pad_token_id: int | None
) -> torch.Tensor:
    """Reward-model score read at `score_index` (the last attended non-pad token): (B,)."""
    values = token_values(model, input_ids, attention_mask)
    return values.gather(1, score_index(input_ids, attention_mask, pad_token_id)[:, None]).squeeze(
        1
    )


def causal_lm_loss(model, input_ids, attention_mask, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy over labelled tokens, and their count."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    target = labels[:, 1:]
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100, reduction="sum"
    )
    return loss, (target != -100).sum()


# ---------------------------------------------------------------- LoRA
ALL_LINEAR = "all-linear"


def _linear_layers(model) -> list[str]:
    """Names of the linear layers in the transformer body: not the LM head, not the score head."""
    from transformers.pytorch_utils import Conv1D

    heads = {id(model.get_output_embeddings()), id(_score_head(model))}
    return [
        name
        for name, m in model.named_modules()
        if isinstance(m, (torch.nn.Linear, Conv1D)) and id(m) not in heads
    ]


def lora_targets(model, names: list[str], where: str) -> list[str]:
    """Full names of the layers to adapt: every body linear layer for `all-linear`, else those whose
    name is or ends with one of `names` (peft's matching rule). Each name must match a layer."""
    linear = _linear_layers(model)
    if names == [ALL_LINEAR]:
        return linear
    matches = {t: [n for n in linear if n == t or n.endswith(f".{t}")] for t in names}
    missing = [t for t, found in matches.items() if not found]
    if missing:
        short = sorted({n.rsplit(".", 1)[-1] for n in linear})
        raise UserError(
            f"{where}: ppo.lora_target_modules names {', '.join(missing)}, which matches no linear "
            f"layer of this model; its linear layers are called {', '.join(short) or '(none)'} "
            f"(or use all-linear)."
        )
    return sorted({n for found in matches.values() for n in found})


def add_lora(model, rank: int, alpha: float, target_modules: list[str], where: str):
    """Inject LoRA adapters (peft) into `model` in place and freeze everything else except a
    scalar model's `score` head. The class stays the Hugging Face one, so `base_model`, `score`
    and `_from_config` keep working; adapters start at B = 0 (the model is unchanged)."""
    from peft import LoraConfig, inject_adapter_in_model
    from transformers.pytorch_utils import Conv1D

    targets = lora_targets(model, target_modules, where)
    modules = dict(model.named_modules())
    conv1d = all(isinstance(modules[n], Conv1D) for n in targets)  # GPT-2 style (in, out) weights
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=0.0,
        target_modules=targets,
        fan_in_fan_out=conv1d,
        bias="none",
    )
    model = inject_adapter_in_model(config, model)
    head = _score_head(model)
    if head is not None:  # a new value head must learn in full (it is tiny)
        head.requires_grad_(True)
    return model


@dataclass(frozen=True)
class LoraMerge:
    """Folds LoRA adapters into plain weights, W' = W + scaling * B @ A (peft's merge), so that a
    state dict with adapter keys becomes one with the base architecture's keys.

    `layers` maps each adapted layer's name to (scaling, fan_in_fan_out); fan_in_fan_out: the
    layer stores its weight as (in, out), as GPT-2's Conv1D does.
    """

    layers: dict[str, tuple[float, bool]]

    def unit(self, name: str) -> str:
        """The adapted layer a (sub)module name belongs to, or the name itself: the parameters of
        one unit must be at hand together to merge."""
        parts = name.split(".")
        for i in range(len(parts) - 1, 0, -1):
            head = ".".join(parts[:i])
            if head in self.layers:
                return head
        return name

    def __call__(self, state: dict) -> dict:
        """`state` with every adapted layer merged (its A and B keys must be in `state` too)."""
        out = {}
        for key, value in state.items():
            layer = self.unit(key)
            if layer == key:
                out[key] = value
                continue
            leaf = key[len(layer) + 1 :]
            if leaf == "base_layer.weight":
                scaling, fan_in_fan_out = self.layers[layer]
                b_a = (
                    state[f"{layer}.lora_B.default.weight"].float()
                    @ state[f"{layer}.lora_A.default.weight"].float()
                )
                delta = (b_a.T if fan_in_fan_out else b_a) * scaling
                out[f"{layer}.weight"] = (value.float() + delta).to(value.dtype)
            elif leaf.startswith("base_layer."):  # the bias
                out[f"{layer}.{leaf[len('base_layer.') :]}"] = value
            else:  # folded into the weight above; add_lora makes no other adapter tensors
                assert leaf in ("lora_A.default.weight", "lora_B.default.weight"), key
        return out


def lora_merge(model) -> LoraMerge | None:
    """The merge of `model`'s LoRA adapters, or None when it has none."""
    layers = {
        name: (m.scaling["default"], m.fan_in_fan_out)
        for name, m in model.named_modules()
        if hasattr(m, "lora_A") and "default" in getattr(m, "scaling", {})
    }  # peft's LoRA layers (without importing peft)
    return LoraMerge(layers) if layers else None
