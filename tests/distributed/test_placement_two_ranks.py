"""Tier 2: on two ranks, the frozen reference and reward models score a rollout alike whether
resident (a plain module on the device, no ZeRO-3) or offloaded (a ZeRO-3 inference engine with
parameter offload, the design card's path for models that do not fit): same reference log-probs,
reward scores and sequence rewards within fp32 rounding, and for each member of an ensemble of two.
placement_probe.py builds the real trainer with both models offloaded, then swaps in resident
copies built by ppo_frozen.build_frozen.

Tolerance: the same weights and the same float32 forward; only ZeRO-3's gathered copies stand
between them, so equal up to reduction order (atol 1e-5 on log-probs of about -6, scores of about
1)."""

import json

import pytest
import torch
from launch_util import launch

PROMPTS = [
    "ana asks for a review of the pizza .",
    "please review the sofa for leo .",
    "grace wants to know about the camera .",
    "hugo asks for a review of the book .",
    "emma wants to know about the car .",
    "please review the lamp for ana .",
]


def _write_inputs(work):
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    from pipeline import default_task

    config = LlamaConfig(
        **default_task.model_config(len(default_task.vocabulary()), 32, 2, 2, 64, 64)
    )
    for name, cls, extra in (
        ("policy", LlamaForCausalLM, {}),
        ("reward", LlamaForSequenceClassification, {"num_labels": 1}),
    ):
        torch.manual_seed(1 if name == "policy" else 2)
        cls(LlamaConfig(**{**config.to_dict(), **extra})).save_pretrained(work / name)
        default_task.build_tokenizer(work / name)
    (work / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    work = tmp_path_factory.mktemp("placement")
    _write_inputs(work)
    out = work / "report"
    proc = launch(
        "../tests/distributed/placement_probe.py", str(out), str(work), num_gpus=2, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "placement ref: offload (asked by ppo.ref_placement" in proc.stdout + proc.stderr
    assert "placement reward 1: resident (asked by ppo.reward_placement" in (
        proc.stdout + proc.stderr
    )
    return [torch.load(f"{out}.rank{r}", weights_only=False) for r in (0, 1)]


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_the_placements_are_what_they_say(ranks):
    for rank in ranks:
        f = rank["facts"]
        for facts in f["offload"] + f["ensemble_offload"]:
            assert facts["kind"] == "engine" and facts["zero_partitioned"]
        for facts in f["resident"]:
            assert facts == {
                "kind": "plain",
                "zero_partitioned": False,
                "requires_grad": False,
                "training": False,
                "device": rank["device"],
            }


def test_reference_logprobs_equal(ranks):
    for rank in ranks:
        lp = rank["ref_logprobs"]
        assert lp["offload"].shape == (rank["rows"], 6) and lp["offload"].abs().sum() > 0
        _close(lp["resident"], lp["offload"])


def test_reward_scores_and_sequence_rewards_equal(ranks):
    for rank in ranks:
        _close(rank["rm_scores"]["resident"], rank["rm_scores"]["offload"])
        _close(rank["scores"]["resident"], rank["scores"]["offload"])
    # each rank scored its own rows
    assert not torch.equal(ranks[0]["rm_scores"]["offload"], ranks[1]["rm_scores"]["offload"])


def test_every_ensemble_member_scores_alike(ranks):
    for rank in ranks:
        m = rank["members"]
        assert m["offload"].shape == (2, rank["rows"])
        _close(m["resident"], m["offload"])
        _close(m["offload"][0], rank["rm_scores"]["offload"][0])  # the stage's own engine's
