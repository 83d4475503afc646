"""Tier 2: on two ranks, the critic's rollout values from its materialised plain copy
(ppo.critic_scoring materialise, what auto chooses for a model this small) are those of its ZeRO-3
training engine (zero3: the engine's forward per micro-batch): old values and prompt values
bit-identical in float32, with and without LoRA adapters, gathering all submodules at once or 1 or
2 at a time; the rest of the scoring (reference log-probs, scores) is untouched.
critic_scoring_probe.py builds the real trainer and scores one rollout each way (in
shared_probes.py's 2-rank launch).

Why bit-identical: the copy holds exactly the gathered weights (a copy, no arithmetic) and runs the
same float32 modules on the same inputs; ZeRO-3 only fetches the parameters around each module's
forward, it does not change the arithmetic (unlike the merged LoRA copy of the hybrid engine,
W + sBA, which is why the critic's copy keeps the adapters)."""

import pytest
import shared_probes  # next to this file
import torch

WAYS = ("stage", "gather_1", "gather_2")


@pytest.fixture(scope="module", params=["plain", "lora"])
def ranks(request, tmp_path_factory):
    """critic_scoring_probe.py's report per rank for a plain and a LoRA critic (run in
    shared_probes.py's 2-rank launch, on its tiny policy, reward model and prompts)."""
    folder, rc, stdout, stderr = shared_probes.launched(tmp_path_factory)[f"critic_{request.param}"]
    log = stdout + stderr
    assert rc == 0, stdout[-3000:] + stderr[-3000:]
    assert "critic scoring: materialise (" in log and " budget)" in log
    reports = [torch.load(folder / f"report.rank{r}", weights_only=False) for r in (0, 1)]
    return request.param, reports


def test_the_stage_chose_the_copy_and_freed_it(ranks):
    kind, reports = ranks
    for rank in reports:
        assert rank["stage_chose_copy"] and rank["copy_freed"]
        assert rank["copy_names_are_the_engines"] and rank["partitioned"]
        assert (rank["adapters"] > 0) == (kind == "lora")


def test_values_are_bit_identical_to_the_zero3_engines(ranks):
    _, reports = ranks
    for rank in reports:
        for key in ("old_values", "prompt_values"):
            zero3 = rank[key]["zero3"]
            assert zero3.dtype == torch.float32 and zero3.abs().sum() > 0
            for way in WAYS:
                assert torch.equal(rank[key][way], zero3), (key, way)
        assert rank["old_values"]["zero3"].shape == (rank["rows"], 6)
    # each rank scored its own rows
    assert not torch.equal(reports[0]["old_values"]["zero3"], reports[1]["old_values"]["zero3"])


def test_the_rest_of_scoring_is_untouched(ranks):
    _, reports = ranks
    for rank in reports:
        for key in ("ref_logprobs", "scores"):
            for way in WAYS:
                assert torch.equal(rank[key][way], rank[key]["zero3"]), (key, way)
