"""The PPO update's per-mini-batch statistics (pipeline/stages/ppo_types.py: UpdateStats): every
stat the losses return is kept (an unexpected one raises instead of being dropped), the options a
run leaves off log nothing, and the token stats are weighted by each micro-batch's token share."""

import pytest
import torch

from pipeline import ppo_math
from pipeline.distributed import collectives
from pipeline.stages.ppo_types import UpdateStats


@pytest.fixture(scope="module", autouse=True)
def one_rank():
    collectives.init_distributed()


def _loss_stats(dual_clip: float = 0.0) -> dict:
    mask = torch.ones(2, 3)
    lp, old, adv = torch.full((2, 3), -1.0), torch.full((2, 3), -1.2), torch.ones(2, 3)
    _, pg = ppo_math.policy_loss(lp, old, adv, mask, 0.2, num_tokens=6.0, dual_clip=dual_clip)
    _, v = ppo_math.value_loss(
        torch.ones(2, 3), torch.zeros(2, 3), torch.ones(2, 3), mask, 6.0, 0.2
    )
    return {**pg, **v}


def test_every_stat_of_the_losses_is_tracked_with_a_critic_and_logged():
    stats = UpdateStats.tracking(critic=True, kl_loss=False, dual_clip=True, ptx=False)
    stats.add_token_stats(_loss_stats(dual_clip=3.0), 0.25)
    stats.add_token_stats(_loss_stats(dual_clip=3.0), 0.75)
    out = stats.all_reduced()
    assert set(out) == {
        "policy_loss",
        "entropy",
        "clip_fraction",
        "approx_kl",
        "ratio_mean",
        "value_loss",
        "value_clip_fraction",
        "values_mean",
        "dual_clip_fraction",
    }
    assert out["ratio_mean"] == pytest.approx(torch.exp(torch.tensor(0.2)).item())
    assert out["values_mean"] == pytest.approx(1.0)


def test_stats_a_run_does_not_compute_are_absent_and_adding_one_raises():
    stats = UpdateStats.tracking(critic=False, kl_loss=False, dual_clip=False, ptx=False)
    assert set(stats.all_reduced()) == {
        "policy_loss",
        "entropy",
        "clip_fraction",
        "approx_kl",
        "ratio_mean",
    }
    with pytest.raises(TypeError):  # a value stat without a critic: not silently dropped
        stats.add("values_mean", 1.0)
    with pytest.raises(AttributeError):  # a stat nobody declared
        stats.add("new_stat", 1.0)
