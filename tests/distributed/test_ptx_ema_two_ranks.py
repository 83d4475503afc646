"""Tier 2: PPO-ptx and the actor EMA on two ranks, through the real launcher.

Three PPO runs on the same SFT and reward models (tiny sizes, 2 iterations, one optimizer step per
iteration, no warmup so both steps move the weights, a checkpoint after iteration 1):
  base   no PTX, no EMA
  off    ptx_coef 0 with a ptx_data_path given, ema_beta 0.9
  ptx    ptx_coef 1 on the SFT stage's training rows, ema_beta 0.9; then killed-like (final models
         removed) and resumed from the iteration-1 checkpoint: the PTX draw order and the EMA shards
         come back, so both models are bitwise those of the uninterrupted run
All four, with the copies a test keeps between them, run one after the other in one 2-rank launch
(tests/distributed/pipelines_probe.py), in one folder, as four launches of launch/ppo.py would.
"""

import json

import pytest
import torch
from launch_util import TINY, launch_plan, metric_rows

SIZES = [
    "--task.num_sft",
    "256",
    "--task.num_pairs",
    "256",
    "--task.num_prompts",
    "32",
    "--task.num_eval",
    "16",
    "--ppo.num_iterations",
    "2",
    "--ppo.rollout_batch_size",
    "16",
    "--ppo.mini_batch_size",
    "16",
    "--ppo.micro_batch_size_per_gpu",
    "4",
    "--ppo.warmup_iterations",
    "0",
    "--save_steps",
    "1",
]
BETA = 0.9


def _ok(runs, name):
    """A pipeline's rank-0 stdout, once it is known to have run on two ranks without error."""
    rc, stdout, stderr = runs[name]
    assert rc == 0, stderr[-3000:]
    assert "world size 2," in stdout
    return stdout


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def _checkpointed(run, tag):
    """An engine's full fp32 weights in the PPO checkpoint after iteration 1."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(
        str(run / "ppo" / "checkpoints" / "step_00000001"), tag=tag
    )


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _lm_loss(model_dir, rows):
    """Mean response-token cross-entropy of a plain transformers model on SFT rows."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline import data
    from pipeline.models import causal_lm_loss

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    batch = data.collate_sft(data.sft_examples(rows, tok, 24, 24), tok.pad_token_id)
    with torch.no_grad():
        total, n = causal_lm_loss(
            model, batch["input_ids"], batch["attention_mask"], batch["labels"]
        )
    return (total / n).item()


PTX = ["--ppo.ptx_coef", "1", "--ppo.ema_beta", str(BETA)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(run, {name: (exit code, stdout, stderr)}): base, off, ptx and the resumed ptx run in
    `run`; the PPO folder each of the first three left is kept as `<name>/ppo` (the later runs
    overwrite it in `run`)."""
    root = tmp_path_factory.mktemp("ptx_ema")
    run = root / "run"
    argv = ["--config", str(TINY), "--output_dir", str(run), *SIZES]

    def keep(name):
        return ["copy", str(run / "ppo"), str(root / name / "ppo")]

    off = ["--ppo.ptx_coef", "0", "--ppo.ptx_data_path", str(run / "task" / "sft.jsonl")]
    off += ["--ppo.ema_beta", str(BETA)]
    killed = [["remove", str(run / "ppo" / name)] for name in ("model", "model_ema", "stage.json")]
    plan = [
        {"name": "base", "argv": argv},
        {"name": "off", "argv": argv + off, "before": [keep("base")]},
        {"name": "ptx", "argv": argv + PTX, "before": [keep("off")]},
        # as if killed during iteration 2: the final models and the stage's record removed
        {"name": "resumed", "argv": argv + PTX, "before": [keep("ptx"), *killed]},
    ]
    result = launch_plan(root, plan)
    _ok(result, "base")
    return run, result


def test_ptx_off_and_ema_leave_the_policy_bitwise_unchanged_and_the_ema_is_exact(runs):
    run, result = runs
    stdout = _ok(result, "off")
    base, off = run.parent / "base", run.parent / "off"
    assert "stage sft is up to date" in stdout and "no PTX loss" in stdout
    final = _weights(off / "ppo" / "model")
    assert _same(
        final, _weights(base / "ppo" / "model")
    )  # neither ptx_coef 0 nor the EMA changed training
    rows = [json.loads(x) for x in (off / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert not any("ppo/ptx_loss" in r for r in rows)

    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(off / "ppo" / "model_ema")  # a plain Hugging Face folder
    ema = _weights(off / "ppo" / "model_ema")
    w0, w1 = _weights(run / "sft" / "model"), _checkpointed(off, "actor")  # start, after step 1
    assert ema.keys() == final.keys() == w0.keys()
    for k in ema:  # two optimizer steps: ema = b^2 w0 + b (1 - b) w1 + (1 - b) w2
        expected = BETA**2 * w0[k] + BETA * (1 - BETA) * w1[k] + (1 - BETA) * final[k]
        assert torch.allclose(ema[k], expected, rtol=0, atol=1e-6), k
    assert max((w1[k] - w0[k]).abs().max() for k in ema) > 1e-5  # both steps moved the weights
    assert max((final[k] - w1[k]).abs().max() for k in ema) > 1e-5
    assert max((final[k] - ema[k]).abs().max() for k in ema) > 1e-5  # model_ema is not model


def _metrics(run):
    return metric_rows(run / "ppo" / "metrics.jsonl")


def test_ptx_moves_the_actor_towards_the_ptx_data_and_resumes_exactly(runs):
    run, result = runs
    stdout = _ok(result, "ptx")
    base, whole = run.parent / "base", run.parent / "ptx"  # whole: the uninterrupted run
    assert "PTX loss (ppo.ptx_coef 1) on 256 rows" in stdout  # the SFT stage's training rows
    final = _weights(whole / "ppo" / "model")
    assert not _same(final, _weights(base / "ppo" / "model"))
    # Iteration 1's rollouts come from the same policy, so the critic's first update is identical;
    # the actor's first update is not.
    assert _same(_checkpointed(whole, "critic"), _checkpointed(base, "critic"))
    assert not _same(_checkpointed(whole, "actor"), _checkpointed(base, "actor"))
    rows = [json.loads(x) for x in (whole / "ppo" / "metrics.jsonl").read_text().splitlines()]
    ptx = [r["ppo/ptx_loss"] for r in rows if "ppo/ptx_loss" in r]
    assert len(ptx) == 2 and all(0 < x < 20 for x in ptx)
    sft_rows = [json.loads(x) for x in (run / "task" / "sft.jsonl").read_text().splitlines()][:128]
    with_ptx, without = (
        _lm_loss(whole / "ppo" / "model", sft_rows),
        _lm_loss(base / "ppo" / "model", sft_rows),
    )
    print(
        f"LM loss on 128 PTX rows: with PTX {with_ptx:.5f}, without {without:.5f}; "
        f"ptx_loss logged {ptx}"
    )
    assert with_ptx < without

    # Resumed from the iteration-1 checkpoint as if killed during iteration 2.
    stdout = _ok(result, "resumed")
    assert "stage ppo: resuming from iteration 1 of 2" in stdout
    assert _same(_weights(run / "ppo" / "model"), final) and _same(
        _weights(run / "ppo" / "model_ema"), _weights(whole / "ppo" / "model_ema")
    )
    assert _metrics(run) == _metrics(whole)
