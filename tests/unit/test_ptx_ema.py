"""PPO-ptx and the actor EMA: the EMA math and its ZeRO-3 re-sharding on plain tensors, the options'
validation, and where the PTX rows come from (inputs, fingerprint, preflight)."""

import json
import re
import types

import pytest
import torch

from pipeline import ppo_math
from pipeline.cli import parse_config
from pipeline.errors import UserError


def test_ema_update_by_hand():
    ema = torch.tensor([1.0, -2.0, 0.0])
    out = ppo_math.ema_update_(ema, torch.tensor([3.0, 2.0, 10.0]), beta=0.75)
    assert out is ema  # in place
    assert torch.allclose(ema, torch.tensor([1.5, -1.0, 2.5]))  # 0.75 x old + 0.25 x new


def test_ema_over_steps_is_the_weighted_sum_of_the_weights():
    torch.manual_seed(0)
    beta, weights = 0.9, [torch.randn(4, 3) for _ in range(6)]  # w0 (the start), w1..w5 after steps
    ema = weights[0].clone()
    for w in weights[1:]:
        ppo_math.ema_update_(ema, w, beta)
    k = len(weights) - 1
    expected = beta**k * weights[0] + sum(
        (1 - beta) * beta ** (k - i) * weights[i] for i in range(1, k + 1)
    )
    assert torch.allclose(ema, expected, atol=1e-6)


def test_ema_of_bf16_weights_stays_float32():
    ema = torch.zeros(3)
    ppo_math.ema_update_(ema, torch.tensor([1.0, 2.0, 3.0], dtype=torch.bfloat16), beta=0.5)
    assert ema.dtype == torch.float32 and torch.equal(ema, torch.tensor([0.5, 1.0, 1.5]))


@pytest.mark.parametrize(
    "numel, old_world, new_world", [(10, 2, 3), (7, 3, 2), (5, 2, 1), (1, 4, 2), (12, 4, 4)]
)
def test_zero3_partitions_recut_for_another_rank_count(numel, old_world, new_world):
    from pipeline.distributed.zero3 import recut, zero3_partition

    flat = torch.arange(1.0, numel + 1)
    old = [zero3_partition(flat, old_world, r) for r in range(old_world)]
    size = -(-numel // old_world)
    assert all(s.numel() == size for s in old)  # ZeRO-3: equal partitions, the tail zero-padded
    assert torch.equal(torch.cat(old)[:numel], flat) and not torch.cat(old)[numel:].any()
    for r in range(new_world):
        assert torch.equal(recut(old, numel, new_world, r), zero3_partition(flat, new_world, r))


@pytest.mark.parametrize(
    "args, option",
    [
        (["--ppo.ptx_coef", "-0.1"], "ppo.ptx_coef"),
        (["--ppo.ptx_coef", "nan"], "ppo.ptx_coef"),
        (["--ppo.ema_beta", "1"], "ppo.ema_beta"),
        (["--ppo.ema_beta", "-0.5"], "ppo.ema_beta"),
        (["--ppo.ema_beta", "nan"], "ppo.ema_beta"),
    ],
)
def test_invalid_ptx_and_ema_options_are_named(args, option):
    with pytest.raises(UserError, match=re.escape(option)):
        parse_config(args)


def test_ptx_and_ema_defaults_are_off_and_sensible_values_pass():
    cfg = parse_config([])
    assert cfg.ppo.ptx_coef == 0 and cfg.ppo.ptx_data_path == "" and cfg.ppo.ema_beta == 0
    cfg = parse_config(
        ["--ppo.ptx_coef", "27.8", "--ppo.ema_beta", "0.992"]
    )  # InstructGPT's gamma, DS-Chat's beta
    assert cfg.ppo.ptx_coef == 27.8 and cfg.ppo.ema_beta == 0.992


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_ptx_rows_come_from_the_option_else_the_sft_training_rows(tmp_path):
    from pipeline.data.sources import Source
    from pipeline.inputs import stage_inputs

    out, task = tmp_path / "run", tmp_path / "task"
    ppo = lambda *a: stage_inputs(parse_config(["--output_dir", str(out), *a]), out, task)["ppo"]  # noqa: E731
    assert "ptx_data" not in ppo()  # off: no input, nothing read
    assert ppo("--ppo.ptx_coef", "1")["ptx_data"] == str(
        task / "sft.jsonl"
    )  # the default task's SFT rows
    shared = ppo("--ppo.ptx_coef", "1", "--data.data_path", "d.jsonl")["ptx_data"]
    assert shared == Source(
        ("d.jsonl",), split=(2, 4, 4), part=0, holdout="train", seed=42
    )  # SFT's share
    assert ppo("--ppo.ptx_coef", "1", "--data.sft_data_path", "s.jsonl")["ptx_data"].paths == (
        "s.jsonl",
    )
    own = ppo(
        "--ppo.ptx_coef", "1", "--ppo.ptx_data_path", "p.jsonl", "--data.data_format", "messages"
    )
    assert own["ptx_data"] == Source(("p.jsonl",), format="messages")  # every row of it
    assert ppo("--ppo.ptx_data_path", "p.jsonl")["ptx_data"].paths == (
        "p.jsonl",
    )  # checked even when off
    with pytest.raises(
        UserError, match=r"ppo.ptx_coef=1.0: PTX needs supervised rows.*--ppo.ptx_data_path"
    ):
        ppo(
            "--ppo.ptx_coef", "1", "--data.prompt_data_path", "q.jsonl"
        )  # not the default task's reviews


def test_ptx_data_is_fingerprinted_and_preflighted(tmp_path, task_tokenizer):
    from pipeline.fingerprint import fingerprint, identity
    from pipeline.inputs import stage_inputs
    from pipeline.orchestrator import preflight

    out, task = tmp_path / "run", tmp_path / "task"
    tok = tmp_path / "tok"
    task_tokenizer.save_pretrained(str(tok))
    good = _jsonl(tmp_path / "ptx.jsonl", [{"prompt": f"p{i}", "response": "r"} for i in range(8)])
    base = [
        "--output_dir",
        str(out),
        "--model.model_name_or_path",
        str(tok),
        "--data.prompt_data_path",
        good,
        "--data.eval_prompt_data_path",
        good,
    ]

    def fp(*args):
        cfg = parse_config([*base, *args])
        inputs = stage_inputs(cfg, out, task)
        return {s: fingerprint(identity(s, cfg, inputs[s], out)) for s in ("sft", "ppo")}

    before = fp("--ppo.ptx_coef", "1", "--ppo.ptx_data_path", good)
    _jsonl(tmp_path / "ptx.jsonl", [{"prompt": f"q{i}", "response": "r"} for i in range(8)])
    after = fp("--ppo.ptx_coef", "1", "--ppo.ptx_data_path", good)
    assert (
        after["sft"] == before["sft"] and after["ppo"] != before["ppo"]
    )  # the file's content counts
    assert (
        fp("--ppo.ema_beta", "0.9")["ppo"] != fp()["ppo"]
        and fp("--ppo.ema_beta", "0.9")["sft"] == fp()["sft"]
    )

    bad = _jsonl(
        tmp_path / "bad.jsonl", [{"prompt": "p", "response": "r"}, {"prompt": "p", "response": ""}]
    )
    d = types.SimpleNamespace(world_size=1)
    with pytest.raises(UserError, match=r"bad.jsonl, row 1"):
        preflight(
            parse_config([*base, "--ppo.ptx_coef", "1", "--ppo.ptx_data_path", bad]),
            d,
            ("ppo",),
            out,
            task,
        )
    prompts = _jsonl(tmp_path / "prompts.jsonl", [{"prompt": "p"}] * 4)  # no responses to learn
    with pytest.raises(
        UserError,
        match=r"prompts.jsonl: field 'response' is missing .*The PPO-ptx stage needs "
        r"prompt/response rows.*--ppo.ptx_data_path",
    ):
        preflight(
            parse_config([*base, "--ppo.ptx_coef", "1", "--ppo.ptx_data_path", prompts]),
            d,
            ("ppo",),
            out,
            task,
        )
    with pytest.raises(UserError, match=r"ptx_data path .*missing.jsonl does not exist"):
        preflight(
            parse_config([*base, "--ppo.ptx_data_path", str(tmp_path / "missing.jsonl")]),
            d,
            ("ppo",),
            out,
            task,
        )
