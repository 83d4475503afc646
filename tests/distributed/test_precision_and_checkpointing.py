"""Tier 2, two ranks: the pipeline trained in bf16 (with gradient checkpointing), and the PPO
stage's losses unchanged by gradient checkpointing.

One 2-rank launch does both: checkpointing_probe.py's PPO runs, then the bf16 pipeline as
`launch/ppo.py` would run it (pipelines_probe.py's plan), which saves a launcher and rank start-up.
"""

import json
import math

import pytest
from launch_util import TINY, launch, summary

SHORT = [
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
    "--save_steps",
    "0",
]


def _metrics(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """(checkpointing_probe.py's report, the bf16 run's folder, its (exit code, stdout, stderr))."""
    work = tmp_path_factory.mktemp("gc")
    out = work / "bf16" / "run"
    out.parent.mkdir()
    argv = ["--config", str(TINY), "--output_dir", str(out), *SHORT, "--model.dtype", "bf16"]
    argv += ["--model.gradient_checkpointing", "true"]
    plan = [{"name": "bf16", "argv": argv, "log": str(out.parent)}]
    (work / "plan.json").write_text(json.dumps(plan))
    proc = launch(
        "../tests/distributed/checkpointing_probe.py",
        str(work),
        str(work / "plan.json"),
        num_gpus=2,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rcs = [int((out.parent / f"bf16.rank{r}.rc").read_text()) for r in (0, 1)]
    stdout, stderr = ((out.parent / f"bf16.rank0.{s}").read_text() for s in ("stdout", "stderr"))
    report = json.loads((work / "report.json").read_text())
    return report, out, (max(rcs, key=abs), stdout, stderr)


@pytest.fixture(scope="module")
def checkpointing(launched):
    return launched[0]


def test_bf16_pipeline_trains_every_engine_in_bf16(launched):
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    _, out, (rc, stdout, stderr) = launched
    assert rc == 0, stderr[-3000:]
    log = stdout + stderr
    for engine in ("policy", "reward model", "actor", "critic"):
        assert f"engine {engine}: ZeRO-3, torch.bfloat16," in log, engine
    for frozen in ("ref", "reward"):  # the tiny frozen models fit: ppo.*_placement auto -> resident
        assert f"engine {frozen}: resident plain module (no ZeRO), torch.bfloat16," in log, frozen
    s = summary(out)
    for stage in ("sft", "reward", "ppo"):
        assert s[stage]["skipped"] is False
        assert all(math.isfinite(v) for v in s[stage].values() if isinstance(v, float)), s[stage]
        rows = _metrics(out / stage / "metrics.jsonl")
        assert rows and all(
            math.isfinite(v) for r in rows for v in r.values() if isinstance(v, float)
        ), stage
        with safe_open(str(out / stage / "model" / "model.safetensors"), "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}, stage
    assert 0 < s["sft"]["eval_loss"] < 10
    # Iteration 1: the actor still equals the reference, and each of its mini-batches sees the
    # policy that recorded pi_old (the one step before the last mini-batch has learning rate 0,
    # warmup). Both KLs vanish only if the generation copy that recorded pi_old computes in the
    # engines' bf16 too (with a float32 copy: kl_to_ref 1e-5, approx_kl 6e-7).
    first = next(r for r in _metrics(out / "ppo" / "metrics.jsonl") if "ppo/approx_kl" in r)
    assert abs(first["rollout/kl_to_ref"]) < 1e-8 and abs(first["ppo/approx_kl"]) < 1e-8
    policy = AutoModelForCausalLM.from_pretrained(out / "ppo" / "model")  # plain transformers
    rm = AutoModelForSequenceClassification.from_pretrained(out / "reward" / "model")
    assert policy.dtype == rm.dtype == torch.bfloat16
    ids = torch.tensor([[1, 5, 6, 7]])
    assert torch.isfinite(policy(input_ids=ids).logits.float()).all()
    assert torch.isfinite(rm(input_ids=ids).logits.float()).all()


def test_checkpointing_engages_in_the_ppo_update(checkpointing):
    off, on = checkpointing["false"]["mlp_calls"], checkpointing["true"]["mlp_calls"]
    assert off > 0 and on == 2 * off  # every layer of actor and critic recomputed once in backward


def test_ppo_losses_are_the_same_with_and_without_checkpointing(checkpointing):
    off, on = checkpointing["false"]["iterations"], checkpointing["true"]["iterations"]
    assert len(off) == len(on) == 2
    for a, b in zip(off, on):  # iteration 2 also shows iteration 1's updates were the same
        for key in (
            "ppo/policy_loss",
            "ppo/value_loss",
            "ppo/entropy",
            "ppo/approx_kl",
            "ppo/actor_grad_norm",
            "ppo/critic_grad_norm",
        ):
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-7), (a["step"], key)


def test_train_mode_update_starts_at_ratio_one_despite_dropout_in_the_config(checkpointing):
    # one mini-batch per iteration: approx KL is measured before the step, against pi_old
    # recorded in eval mode; dropout left on in train mode would make it > 0
    for run in checkpointing.values():
        first = run["iterations"][0]
        assert abs(first["ppo/approx_kl"]) < 1e-6 and first["ppo/clip_fraction"] == 0
