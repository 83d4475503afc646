"""Tier 3: the tiny preset reproduces its stored numbers.

A change that is not meant to change what the pipeline computes (a refactor, a new option that
is off by default) must reproduce `reference_tiny_run.json`: the SFT and reward-model loss
sequences, their evaluations, and every logged PPO step of the preset's 5 iterations (the step-0
evaluation, each iteration's rollout sampled from the policy the previous updates made, its scores,
losses and entropy, and the evaluations at iterations 2, 4 and 5). When a change is meant to change
the numbers, regenerate the file from a fresh tiny run and say why in the commit:
    deepspeed launch/ppo.py --config launch/configs/tiny.yaml --output_dir /tmp/tiny
    python tests/e2e/test_reference_run.py /tmp/tiny
"""

import json
import sys
from pathlib import Path

import pytest

REFERENCE = Path(__file__).with_name("reference_tiny_run.json")
TRACKED = {
    "sft": ("train/loss", "eval/loss"),
    "reward": ("train/loss", "train/accuracy", "eval/loss", "eval/accuracy"),
    "ppo": (
        "eval/gold_score",
        "eval/reward_score",
        "rollout/score_mean",
        "rollout/kl_to_ref",
        "ppo/policy_loss",
        "ppo/value_loss",
        "ppo/entropy",
    ),
}


def numbers(run: Path) -> dict:
    """{stage: {tag: [(step, value), ...]}} of the tracked tags in each stage's metrics.jsonl."""
    out = {}
    for stage, tags in TRACKED.items():
        rows = [json.loads(x) for x in (run / stage / "metrics.jsonl").read_text().splitlines()]
        out[stage] = {t: [[r["step"], r[t]] for r in rows if t in r] for t in tags}
    return out


def test_the_tiny_run_reproduces_its_stored_numbers(pristine_run):
    expected = json.loads(REFERENCE.read_text())
    got = numbers(pristine_run[0])
    for stage, tags in expected.items():
        for tag, series in tags.items():
            assert [s for s, _ in got[stage][tag]] == [s for s, _ in series], (stage, tag)
            assert [v for _, v in got[stage][tag]] == pytest.approx(
                [v for _, v in series], rel=1e-3, abs=1e-4
            ), (stage, tag)


if __name__ == "__main__":
    found = numbers(Path(sys.argv[1]))
    lines = [
        f'  "{stage}": {{\n'
        + ",\n".join(f'    "{tag}": {json.dumps(series)}' for tag, series in tags.items())
        + "\n  }"
        for stage, tags in found.items()
    ]
    REFERENCE.write_text("{\n" + ",\n".join(lines) + "\n}\n")
    print(f"wrote {REFERENCE}")
