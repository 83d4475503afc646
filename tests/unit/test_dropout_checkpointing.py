"""Dropout disabled for PPO (train mode then computes what eval mode does) and gradient
checkpointing (same gradients, really engaged): tiny Hugging Face models on CPU, no DeepSpeed."""

import copy

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification
from transformers.modeling_layers import GradientCheckpointingLayer

from pipeline.models import (
    causal_lm_loss,
    disable_dropout,
    enable_gradient_checkpointing,
    token_values,
)
from pipeline.ppo_math import logprobs_from_logits

# Dropout reaches the forward in three ways: nn.Dropout modules (gpt2), a float attribute the
# attention reads (llama's attention_dropout, opt's dropout) and the config itself (falcon).
ARCHITECTURES = {
    "llama": dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        attention_dropout=0.3,
    ),
    "gpt2": dict(n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.3, embd_pdrop=0.3, attn_pdrop=0.3),
    "opt": dict(
        hidden_size=32,
        num_hidden_layers=2,
        ffn_dim=64,
        num_attention_heads=2,
        word_embed_proj_dim=32,
        dropout=0.3,
        attention_dropout=0.3,
    ),
    "falcon": dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        hidden_dropout=0.3,
        attention_dropout=0.3,
        new_decoder_architecture=True,
        num_kv_heads=2,
    ),
}
VOCAB = 64


def _model(arch: str, scalar: bool = False):
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        arch,
        vocab_size=VOCAB,
        max_position_embeddings=32,
        num_labels=1,
        pad_token_id=0,
        **ARCHITECTURES[arch],
    )
    cls = AutoModelForSequenceClassification if scalar else AutoModelForCausalLM
    return cls.from_config(config)


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # one left-padded row
    return ids, mask


def _logprobs(model, ids, mask):
    torch.manual_seed(123)  # the same dropout draws in both modes: a difference is dropout itself
    return logprobs_from_logits(
        model(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), ids[:, 1:]
    )


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_train_mode_equals_eval_mode_once_dropout_is_disabled(arch):
    model = _model(arch)
    ids, mask = _batch()
    with torch.no_grad():
        eval_lp = _logprobs(model.eval(), ids, mask)
        assert not torch.allclose(
            _logprobs(model.train(), ids, mask), eval_lp, atol=1e-4
        )  # dropout is on
        disable_dropout(model)
        assert torch.equal(_logprobs(model.train(), ids, mask), eval_lp)
    assert not any(
        v for k, v in vars(model.config).items() if "dropout" in k and isinstance(v, float)
    )


def _layer_calls(model) -> list:
    """Calls of the modules inside each decoder layer. transformers checkpoints a layer's `forward`,
    not its `__call__`, so the layer's own hooks fire once; its submodules' fire again when the
    backward pass recomputes it. Pre-hooks: torch stops a recompute as soon as it has every saved
    tensor back, i.e. inside the layer's last submodule, whose forward hook then never fires."""
    calls = []
    for layer in model.modules():
        if isinstance(layer, GradientCheckpointingLayer):
            for sub in layer.children():
                sub.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


def _loss(model, scalar: bool, ids, mask):
    if scalar:  # the critic: a value at every position
        return token_values(model, ids, mask).pow(2).mean()
    loss_sum, n = causal_lm_loss(model, ids, mask, ids.masked_fill(mask == 0, -100))
    return loss_sum / n


@pytest.mark.parametrize("arch, scalar", [("llama", False), ("llama", True), ("gpt2", False)])
def test_checkpointing_gives_the_same_gradients_and_recomputes_each_layer(arch, scalar):
    plain = _model(arch, scalar)
    disable_dropout(plain)
    checkpointed = copy.deepcopy(plain)
    enable_gradient_checkpointing(checkpointed)
    ids, mask = _batch()
    grads, calls = [], []
    for model in (plain, checkpointed):
        model.train()  # HF checkpoints only in train mode
        counted = _layer_calls(model)
        _loss(model, scalar, ids, mask).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
        calls.append(len(counted))
    assert (
        calls[0] > 0 and calls[1] == 2 * calls[0]
    )  # forward, then once more in backward with checkpointing
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, atol=1e-6, rtol=0, msg=name)


def test_checkpointing_is_off_in_eval_mode():
    """Why PPO's update now runs in train mode: in eval mode HF does not checkpoint at all."""
    model = _model("llama")
    enable_gradient_checkpointing(model)
    ids, mask = _batch()
    counts = []
    for mode in (model.eval, model.train):
        mode()
        counted = _layer_calls(model)
        _loss(model, False, ids, mask).backward()
        counts.append(len(counted))
    assert counts[1] == 2 * counts[0]
