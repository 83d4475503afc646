"""Tier 2: on two ranks, the frozen reference and reward models score a rollout alike whether
resident (a plain module on the device, no ZeRO-3) or offloaded (a ZeRO-3 inference engine with
parameter offload, the design card's path for models that do not fit): same reference log-probs,
reward scores and sequence rewards within fp32 rounding, and for each member of an ensemble of two.
placement_probe.py builds the real trainer with both models offloaded, then swaps in resident
copies built by ppo_frozen.build_frozen, in shared_probes.py's launch (its inputs too).

Tolerance: the same weights and the same float32 forward; only ZeRO-3's gathered copies stand
between them, so equal up to reduction order (atol 1e-5 on log-probs of about -6, scores of about
1)."""

import pytest
import shared_probes  # next to this file
import torch


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """placement_probe.py's report per rank (run in shared_probes.py's 2-rank launch)."""
    work, rc, stdout, stderr = shared_probes.launched(tmp_path_factory)["placement"]
    assert rc == 0, stdout[-3000:] + stderr[-3000:]
    assert "placement ref: offload (asked by ppo.ref_placement" in stdout + stderr
    assert "placement reward 1: resident (asked by ppo.reward_placement" in (stdout + stderr)
    return [torch.load(f"{work / 'report'}.rank{r}", weights_only=False) for r in (0, 1)]


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
