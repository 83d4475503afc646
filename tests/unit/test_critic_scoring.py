"""How the critic computes the rollout's values (ppo.critic_scoring): the plan's decision with fake
budgets (pipeline/distributed/placement.py: `critic_scoring`, ppo_frozen.critic_scoring), the
option's default, command line, check and help, and the materialised plain copy
(pipeline/distributed/materialise.py) on a plain module, whose values must be the module's own bit
for bit (with LoRA adapters kept) and freed on exit. The two-rank comparison with the ZeRO-3
engine is tests/distributed/test_critic_scoring_two_ranks.py."""

import re
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForSequenceClassification

from pipeline.cli import parse_config
from pipeline.config import PPOConfig
from pipeline.distributed import placement
from pipeline.distributed.materialise import PlainCopy
from pipeline.distributed.placement import MATERIALISE, ZERO3, critic_scoring
from pipeline.errors import UserError
from pipeline.generation import position_ids
from pipeline.models import add_lora, token_values
from pipeline.stages import ppo_frozen

MB = 10**6


# ---------------------------------------------------------------- the plan
def test_auto_materialises_when_the_critic_fits_what_the_frozen_models_leave():
    c = critic_scoring(30 * MB, 100 * MB, 60 * MB, "auto")
    assert (c.placement, c.reason) == (MATERIALISE, "30 MB of a 40 MB budget")


def test_auto_scores_through_zero3_when_it_does_not_fit():
    c = critic_scoring(50 * MB, 100 * MB, 60 * MB, "auto")
    assert c.placement == ZERO3
    assert c.reason == "50 MB does not fit the 40 MB left of a 100 MB budget"
    assert critic_scoring(50 * MB, 0, 0, "auto").placement == ZERO3  # no budget measured


def test_auto_without_resident_frozen_models_has_the_whole_budget():
    assert critic_scoring(100 * MB, 100 * MB, 0, "auto").placement == MATERIALISE
    assert critic_scoring(101 * MB, 100 * MB, 0, "auto").placement == ZERO3


def test_asked_choices_hold_whatever_the_budget():
    c = critic_scoring(50 * MB, 10 * MB, 0, "materialise")
    assert c.placement == MATERIALISE
    assert c.reason == "asked by ppo.critic_scoring; 50 MB, over the 10 MB left of the budget"
    c = critic_scoring(1 * MB, 100 * MB, 0, "zero3")
    assert (c.placement, c.reason) == (ZERO3, "asked by ppo.critic_scoring; 1 MB")


def test_the_stage_counts_resident_frozen_models_and_the_critic_in_its_dtype(caplog):
    critic = SimpleNamespace(
        module=torch.nn.Linear(1000, 1000, bias=False),  # 1e6 parameters
        get_data_types=lambda: (torch.bfloat16,),
    )
    resident = torch.nn.Linear(500, 1000, bias=False)  # 0.5e6 float32 parameters: 2 MB
    caplog.set_level("INFO")
    c = ppo_frozen.critic_scoring("auto", critic, [resident], 4 * MB)
    assert (c.placement, c.reason) == (MATERIALISE, "2 MB of a 2 MB budget")
    assert "critic scoring: materialise (2 MB of a 2 MB budget)" in caplog.text
    assert ppo_frozen.critic_scoring("auto", critic, [resident], 4 * MB - 1).placement == ZERO3


# ---------------------------------------------------------------- the option
def test_default_is_auto_and_the_command_line_sets_it():
    assert PPOConfig().critic_scoring == "auto"
    assert parse_config(["--ppo.critic_scoring", "zero3"]).ppo.critic_scoring == "zero3"
    assert parse_config(["--ppo.critic_scoring", "materialise"]).ppo.critic_scoring == MATERIALISE


@pytest.mark.parametrize("value", ["gpu", "Materialise", "resident"])
def test_a_bad_value_is_one_paragraph_naming_the_option(value):
    with pytest.raises(ValueError, match=re.escape("option ppo.critic_scoring=")) as e:
        parse_config(["--ppo.critic_scoring", value])
    assert isinstance(e.value, UserError)
    assert "\n" not in str(e.value)
    assert "auto, materialise, zero3" in str(e.value)


def test_help_documents_it(capsys):
    with pytest.raises(SystemExit):
        parse_config(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--ppo.critic_scoring" in text
    assert "materialise (its full weights copied once per scoring phase" in text


# ---------------------------------------------------------------- the plain copy
def _critic(lora: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=40,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        num_labels=1,
        pad_token_id=0,
    )
    model = LlamaForSequenceClassification(config)
    if lora:
        model = add_lora(model, 4, 8.0, ["all-linear"], "critic")
        for name, p in model.named_parameters():  # B = 0 at the start: make the adapters count
            if "lora_B" in name:
                p.data.normal_()
    return model.eval()


def _fake_engine(module):  # not ZeRO-partitioned: the gathers are no-ops, the copy is the same
    return SimpleNamespace(module=module, get_data_types=lambda: (torch.float32,))


@pytest.mark.parametrize("lora", [False, True])
def test_the_plain_copy_gives_the_modules_values_bit_for_bit_and_is_freed(lora):
    critic = _critic(lora)
    ids = torch.randint(1, 40, (3, 9))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    with torch.no_grad():
        want = token_values(critic, ids, mask, position_ids(mask))
    copy = PlainCopy(_fake_engine(critic), gather_modules=2, merge_lora=False)
    assert all(p.device.type == "meta" for p in copy.model.parameters())
    with torch.no_grad(), copy.materialise() as plain:
        assert plain is copy.model and copy.materialised and not plain.training
        assert not any(p.requires_grad for p in plain.parameters())
        assert sorted(dict(plain.named_parameters())) == sorted(dict(critic.named_parameters()))
        got = token_values(plain, ids, mask, position_ids(mask))
    assert torch.equal(got, want)
    assert not copy.materialised
    assert all(t.device.type == "meta" for t in [*copy.model.parameters(), *copy.model.buffers()])


def test_merged_lora_copy_has_the_base_architecture_and_the_values_up_to_rounding():
    critic = _critic(lora=True)
    ids = torch.randint(1, 40, (2, 7))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        want = token_values(critic, ids, mask)
        with PlainCopy(_fake_engine(critic), merge_lora=True).materialise() as plain:
            assert not any("lora" in n for n, _ in plain.named_parameters())
            got = token_values(plain, ids, mask)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_model_bytes_of_the_plan_counts_partitioned_parameters_in_full():
    p = torch.nn.Parameter(torch.zeros(3))
    p.ds_numel = 10  # as ZeRO-3 marks a partitioned parameter
    module = torch.nn.Module()
    module.w = p
    assert placement.model_bytes(module, torch.bfloat16) == 20


def test_the_choice_is_not_part_of_the_stage_fingerprint(tmp_path):
    """Values are bit-identical either way: switching keeps finished stages and checkpoints (and
    the identity of runs from before the option existed)."""
    from pipeline.fingerprint import identity
    from pipeline.inputs import stage_inputs

    def ident(*args):
        cfg = parse_config(["--output_dir", str(tmp_path / "run"), *args])
        inputs = stage_inputs(cfg, tmp_path / "run", tmp_path / "task")["ppo"]
        return identity("ppo", cfg, inputs, tmp_path / "run")

    base = ident()
    assert "critic_scoring" not in base["section"]
    assert ident("--ppo.critic_scoring", "zero3") == base
    assert ident("--ppo.critic_scoring", "materialise") == base
