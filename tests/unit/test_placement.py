"""The frozen models' memory plan (pipeline/distributed/placement.py) with fake budgets, and the
options that steer it and the scoring forwards (ppo.ref_placement, ppo.reward_placement,
ppo.forward_micro_batch_size, ppo.memory_budget_gb): defaults, command line, checks."""

import re

import pytest
import torch

from pipeline.cli import parse_config
from pipeline.config import PPOConfig
from pipeline.distributed import placement
from pipeline.distributed.placement import OFFLOAD, RESIDENT, Choice, human_bytes, plan
from pipeline.errors import UserError

MB = 10**6


def _choices(out: list[Choice]) -> list[str]:
    return [c.placement for c in out]


# ---------------------------------------------------------------- the plan
def test_a_model_that_fits_is_resident_and_says_of_what_budget():
    (c,) = plan([("ref", 12_300_000, "auto")], 5_100_000_000)
    assert c == Choice("ref", RESIDENT, "12.3 MB of a 5.1 GB budget")
    assert c.line() == "placement ref: resident (12.3 MB of a 5.1 GB budget)"


def test_a_model_that_does_not_fit_is_offloaded():
    (c,) = plan([("ref", 600 * MB, "auto")], 500 * MB)
    assert c.placement == OFFLOAD
    assert c.reason == "600 MB does not fit the 500 MB left of a 500 MB budget"


def test_an_ensemble_of_three_that_fits_only_partly():
    models = [("ref", 40 * MB, "auto")] + [(f"reward {i}", 30 * MB, "auto") for i in range(3)]
    out = plan(models, 100 * MB)
    # in order: ref (40) and reward 0 (30) fit, reward 1 (30 of the 30 left) fits, reward 2 not
    assert _choices(out) == [RESIDENT, RESIDENT, RESIDENT, OFFLOAD]
    assert out[2].reason == "30 MB of a 30 MB budget"
    assert out[3].reason == "30 MB does not fit the 0 B left of a 100 MB budget"
    # one byte less: reward 1 no longer fits, but nothing after it would either
    assert _choices(plan(models, 100 * MB - 1)) == [RESIDENT, RESIDENT, OFFLOAD, OFFLOAD]


def test_a_smaller_later_model_still_takes_what_is_left():
    out = plan([("reward 0", 80 * MB, "auto"), ("reward 1", 10 * MB, "auto")], 50 * MB)
    assert _choices(out) == [OFFLOAD, RESIDENT]


def test_zero_budget_offloads_every_auto_model():
    out = plan([("ref", 1, "auto"), ("reward", 1, "auto")], 0)
    assert _choices(out) == [OFFLOAD, OFFLOAD]
    assert out[0].reason == "1 B no budget of a 0 B budget"


def test_asked_placements_win_and_say_who_asked():
    options = {"ref": "ppo.ref_placement", "reward": "ppo.reward_placement"}
    out = plan([("ref", 10 * MB, "offload"), ("reward", 10 * MB, "resident")], 0, options)
    assert _choices(out) == [OFFLOAD, RESIDENT]
    assert out[0].reason == "asked by ppo.ref_placement; 10 MB"
    assert out[1].reason == "asked by ppo.reward_placement; 10 MB, over the 0 B left of the budget"


def test_an_asked_resident_model_uses_up_the_budget_of_the_auto_ones():
    out = plan([("ref", 60 * MB, "resident"), ("reward", 60 * MB, "auto")], 100 * MB)
    assert _choices(out) == [RESIDENT, OFFLOAD]


def test_plan_is_pure():
    models = [("ref", 10, "auto"), ("reward", 10, "auto")]
    assert plan(models, 15) == plan(models, 15)
    assert models == [("ref", 10, "auto"), ("reward", 10, "auto")]


def test_human_bytes():
    assert [human_bytes(n) for n in (0, 999, 1000, 12_345_678, 5.1e9)] == [
        "0 B",
        "999 B",
        "1 kB",
        "12.3 MB",
        "5.1 GB",
    ]


# ---------------------------------------------------------------- budget and bytes
def test_model_bytes_counts_parameters_in_a_dtype():
    m = torch.nn.Linear(10, 10)  # 110 parameters
    assert placement.model_bytes(m) == 440
    assert placement.model_bytes(m, torch.bfloat16) == 220


def test_available_ram_reads_meminfo():
    ram = placement.available_ram()
    assert 0 < ram < 2**50


def test_make_resident_is_a_frozen_plain_module_in_the_dtype():
    m = placement.make_resident(torch.nn.Linear(4, 4).train(), torch.float64)
    assert not m.training
    assert all(not p.requires_grad and p.dtype == torch.float64 for p in m.parameters())
    assert "resident plain module" in placement.describe(m, "ref")


# ---------------------------------------------------------------- scoring forward rows
def test_auto_scores_all_rollout_rows_when_they_fit():
    row = placement.forward_row_bytes(96, 8000)
    assert row == 96 * 8000 * 4 * placement.LOGIT_COPIES
    rows, why = placement.forward_rows(0, 16, 4, row, 100 * row)
    assert rows == 16 and why.startswith("auto: all 16 rollout rows of a rank")


def test_auto_takes_what_fits_but_never_less_than_the_micro_batch():
    row = 1000
    assert placement.forward_rows(0, 16, 4, row, 9 * row + 999)[0] == 9
    rows, why = placement.forward_rows(0, 16, 4, row, 2 * row)
    assert rows == 4 and "the training micro-batch; 2 rows fit" in why
    rows, why = placement.forward_rows(0, 16, 4, row, -5 * row)  # resident models took it all
    assert rows == 4 and "0 rows fit" in why and "0 B left" in why


def test_a_given_forward_micro_batch_is_kept():
    rows, why = placement.forward_rows(3, 16, 4, 1000, 10**12)
    assert rows == 3 and "asked by ppo.forward_micro_batch_size" in why


# ---------------------------------------------------------------- options
def test_defaults_leave_the_numbers_as_they_were():
    p = PPOConfig()
    assert (p.ref_placement, p.reward_placement, p.forward_micro_batch_size) == ("auto", "auto", 0)


def test_command_line_sets_them():
    cfg = parse_config(
        [
            "--ppo.ref_placement",
            "offload",
            "--ppo.reward_placement",
            "resident",
            "--ppo.forward_micro_batch_size",
            "16",
        ]
    )
    assert cfg.ppo.ref_placement == "offload" and cfg.ppo.reward_placement == "resident"
    assert cfg.ppo.forward_micro_batch_size == 16


@pytest.mark.parametrize(
    "option, value",
    [
        ("ppo.ref_placement", "gpu"),
        ("ppo.reward_placement", "Resident"),
        ("ppo.forward_micro_batch_size", "-1"),
    ],
)
def test_a_bad_value_is_one_paragraph_naming_the_option(option, value):
    with pytest.raises(ValueError, match=re.escape(f"option {option}=")) as e:
        parse_config([f"--{option}", value])
    assert isinstance(e.value, UserError)
    assert "\n" not in str(e.value)
    if "placement" in option:
        assert "auto, resident, offload" in str(e.value)


def test_help_documents_them(capsys):
    with pytest.raises(SystemExit):
        parse_config(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for option in ("ppo.ref_placement", "ppo.reward_placement", "ppo.forward_micro_batch_size"):
        assert f"--{option}" in text
    assert "resident (a plain copy on the device" in text


def test_make_resident_casts_parameters_and_keeps_buffers():
    import torch

    from pipeline.distributed.placement import make_resident

    module = torch.nn.Linear(2, 2)
    module.register_buffer("inv_freq", torch.tensor([1.0, 1e-4]))  # float32, as HF's rotary one
    out = make_resident(module, torch.bfloat16)
    assert {p.dtype for p in out.parameters()} == {torch.bfloat16}
    assert out.inv_freq.dtype == torch.float32 and out.inv_freq[1].item() == pytest.approx(1e-4)
    assert not out.training and not any(p.requires_grad for p in out.parameters())


# ---------------------------------------------------------------- ppo.memory_budget_gb
def test_memory_budget_defaults_to_measured():
    assert PPOConfig().memory_budget_gb == 0.0


def test_command_line_sets_the_memory_budget():
    assert parse_config(["--ppo.memory_budget_gb", "1.5"]).ppo.memory_budget_gb == 1.5


@pytest.mark.parametrize("value", ["-1", "nan", "inf"])
def test_a_bad_memory_budget_is_one_paragraph_naming_the_option(value):
    with pytest.raises(UserError, match=re.escape("option ppo.memory_budget_gb=")) as e:
        parse_config(["--ppo.memory_budget_gb", value])
    assert "\n" not in str(e.value)


def _ctx(gb: float):
    from types import SimpleNamespace

    cfg = parse_config(["--ppo.memory_budget_gb", str(gb)])
    return SimpleNamespace(cfg=cfg, dist=SimpleNamespace(local_world_size=2))


def test_a_given_memory_budget_is_used_without_measuring(monkeypatch, caplog):
    from pipeline.stages import ppo_frozen

    def measured(*_):
        raise AssertionError("memory_budget measured although ppo.memory_budget_gb was given")

    monkeypatch.setattr(placement, "memory_budget", measured)
    with caplog.at_level("INFO", logger=ppo_frozen.log.name):
        assert ppo_frozen.placement_budget(_ctx(1.5)) == int(1.5 * 2**30)
    assert "placement budget: 1.61 GB per rank (ppo.memory_budget_gb=1.5)" in caplog.text


def test_no_memory_budget_is_measured(monkeypatch):
    from pipeline.stages import ppo_frozen

    monkeypatch.setattr(placement, "memory_budget", lambda n: (7 * MB * n, "fake"))
    assert ppo_frozen.placement_budget(_ctx(0)) == 14 * MB
