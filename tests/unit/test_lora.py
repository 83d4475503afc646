"""LoRA (peft) without DeepSpeed: which weights train, the merge against peft's own, the options."""

import copy

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
)

from pipeline.cli import parse_config
from pipeline.errors import UserError
from pipeline.models import add_lora, lora_merge, token_values

LLAMA = dict(
    vocab_size=40,
    hidden_size=16,
    intermediate_size=24,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
)
BUILDERS = {
    "llama_causal": lambda: LlamaForCausalLM(LlamaConfig(**LLAMA)),
    "llama_scalar": lambda: LlamaForSequenceClassification(LlamaConfig(**LLAMA, num_labels=1)),
    # GPT-2's Conv1D stores weights as (in, out): peft's fan_in_fan_out, square c_proj included
    "gpt2_causal": lambda: GPT2LMHeadModel(
        GPT2Config(
            vocab_size=40,
            n_embd=16,
            n_layer=2,
            n_head=2,
            n_positions=32,
            bos_token_id=0,
            eos_token_id=1,
        )
    ),
}


def _base(kind: str):
    torch.manual_seed(0)
    return BUILDERS[kind]().eval()


def _adapted(kind: str, targets=("all-linear",)):
    """The base model and a copy with LoRA whose B is non-zero (fresh adapters are B = 0, a
    no-op)."""
    base = _base(kind)
    model = add_lora(copy.deepcopy(base), 4, 8.0, list(targets), "test model")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return base, model


def _outputs(model, ids):
    if model.get_output_embeddings() is not None:
        return model(input_ids=ids).logits
    return token_values(model, ids, torch.ones_like(ids))


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_merge_equals_peft_merge_and_unload(kind):
    from peft import LoraConfig, get_peft_model

    base, model = _adapted(kind)
    merge = lora_merge(model)
    ours = merge(model.state_dict())
    fan_in_fan_out = kind.startswith("gpt2")
    peft_model = get_peft_model(
        copy.deepcopy(base),
        LoraConfig(
            r=4, lora_alpha=8.0, target_modules=sorted(merge.layers), fan_in_fan_out=fan_in_fan_out
        ),
    )
    with torch.no_grad():  # the same adapter weights, in peft's own wrapper
        for name, p in model.named_parameters():
            if "lora_" in name:
                peft_model.get_parameter(f"base_model.model.{name}").copy_(p)
    theirs = peft_model.merge_and_unload().state_dict()
    assert ours.keys() == theirs.keys() == base.state_dict().keys()  # the base architecture's keys
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key
    changed = {k for k in ours if not torch.equal(ours[k], base.state_dict()[k])}
    assert changed == {
        f"{layer}.weight" for layer in merge.layers
    }  # the adapted weights, nothing else


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_merged_plain_model_computes_what_the_adapted_model_computes(kind):
    _, model = _adapted(kind)
    plain = type(model)._from_config(model.config).eval()
    plain.load_state_dict(lora_merge(model)(model.state_dict()), strict=True)
    ids = torch.randint(2, 40, (3, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        adapted, merged, before = (
            _outputs(model, ids),
            _outputs(plain, ids),
            _outputs(_base(kind), ids),
        )
    torch.testing.assert_close(merged, adapted, rtol=0, atol=1e-5)
    assert (adapted - before).abs().max() > 1e-2  # the adapters do change the outputs


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_only_adapters_and_the_score_head_train(kind):
    base = _base(kind)
    model = add_lora(base, 4, 8.0, ["all-linear"], "test model")
    assert (
        type(model) is BUILDERS[kind]().__class__
    )  # still the Hugging Face class, not a PeftModel
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    adapters = {n for n in trained if ".lora_A." in n or ".lora_B." in n}
    head = {"score.weight"} if kind.endswith("scalar") else set()
    assert trained == adapters | head
    assert len(adapters) == 2 * len(lora_merge(model).layers)
    layers = lora_merge(model).layers
    assert not any(n.endswith(("lm_head", "score", "wte", "embed_tokens")) for n in layers)
    expected = (
        7 if kind.startswith("llama") else 4
    )  # q k v o gate up down / c_attn c_proj c_fc c_proj
    assert len(layers) == expected * 2


def test_fresh_adapters_leave_the_model_unchanged():
    base = _base("llama_causal")
    model = add_lora(copy.deepcopy(base), 8, 16.0, ["all-linear"], "m")
    ids = torch.arange(2, 12)[None]
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, base(input_ids=ids).logits)


def test_named_targets_adapt_only_those_layers():
    model = add_lora(_base("llama_causal"), 2, 4.0, ["q_proj", "v_proj"], "m")
    layers = sorted(lora_merge(model).layers)
    assert layers == [
        f"model.layers.{i}.self_attn.{n}" for i in (0, 1) for n in ("q_proj", "v_proj")
    ]
    assert lora_merge(model).layers[layers[0]] == (2.0, False)  # scaling alpha / rank


def test_unknown_target_is_refused_with_the_layer_names():
    with pytest.raises(
        UserError,
        match=r"actor m: ppo.lora_target_modules names qkv, which matches no linear "
        r"layer of this model; its linear layers are called down_proj, gate_proj",
    ):
        add_lora(_base("llama_causal"), 2, 4.0, ["q_proj", "qkv"], "actor m")
    with pytest.raises(UserError, match="lm_head"):  # the LM head is not a LoRA target
        add_lora(_base("llama_causal"), 2, 4.0, ["lm_head"], "actor m")


def test_no_adapters_no_merge():
    assert lora_merge(_base("llama_causal")) is None


# ---------------------------------------------------------------- options
def test_lora_options_parse():
    cfg = parse_config(
        [
            "--ppo.actor_lora_rank",
            "8",
            "--ppo.critic_lora_rank",
            "4",
            "--ppo.lora_alpha",
            "32",
            "--ppo.lora_target_modules",
            "q_proj",
            "v_proj",
        ]
    )
    p = cfg.ppo
    assert (p.actor_lora_rank, p.critic_lora_rank, p.lora_alpha) == (8, 4, 32.0)
    assert p.lora_target_modules == ["q_proj", "v_proj"]
    assert parse_config([]).ppo.lora_target_modules == ["all-linear"]
    assert parse_config([]).ppo.actor_lora_rank == 0 == parse_config([]).ppo.critic_lora_rank


@pytest.mark.parametrize(
    "args,message",
    [
        (["--ppo.actor_lora_rank", "-1"], "option ppo.actor_lora_rank=-1 must be >= 0"),
        (["--ppo.critic_lora_rank", "-4"], "option ppo.critic_lora_rank=-4 must be >= 0"),
        (["--ppo.lora_alpha", "0"], "option ppo.lora_alpha=0.0 must be > 0"),
        (["--ppo.lora_alpha", "nan"], "option ppo.lora_alpha=nan must be > 0"),
        (
            ["--ppo.actor_lora_rank", "8", "--ppo.lora_target_modules", " "],
            "ppo.lora_target_modules is empty",
        ),
        (["--ppo.lora_target_modules", "all-linear", "q_proj"], "give either all-linear alone"),
    ],
)
def test_bad_lora_options_are_refused(args, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(".", r"\.")):
        parse_config(args)
