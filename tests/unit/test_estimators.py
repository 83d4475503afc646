"""Unit tests for pipeline/estimators.py: the advantage-estimator registry, GAE and the sequence
advantages against naive per-row loops, the group estimators against numbers worked out by hand."""

import math

import pytest
import torch

from pipeline.estimators import (
    ADVANTAGE_ESTIMATORS,
    AdvantageInputs,
    estimate_advantages,
    gae_advantages,
    group_score_metrics,
    group_stats,
    sequence_advantages,
)
from pipeline.ppo_math import masked_whiten


def close(a, b, tol=1e-6):
    a = a.detach().double() if isinstance(a, torch.Tensor) else torch.tensor(a, dtype=torch.float64)
    torch.testing.assert_close(a, torch.as_tensor(b, dtype=torch.float64), rtol=0, atol=tol)


# Five rows in two groups, interleaved (rows of a group need not be adjacent):
#   group 5: rows 0, 2, 3 with sequence rewards 1, 2, 6 (mean 3, unbiased std sqrt(7))
#   group 9: rows 1, 4 with sequence rewards 0.5, 0.5 (all equal: std 0)
# Row 2 has a KL-like reward -0.5 on its first token and 2.5 at its last: it sums to 2.
# Padding holds garbage (99) that must not count anywhere.
GROUP_IDS = torch.tensor([5, 9, 5, 5, 9])
MASK = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 0, 0], [1, 1, 0]])
REWARDS = torch.tensor(
    [[0.0, 1.0, 99.0], [0.5, 99.0, 99.0], [-0.5, 0.0, 2.5], [6.0, 99.0, 99.0], [0.0, 0.5, 99.0]],
    dtype=torch.float64,
)
SEQ_REWARD = [1.0, 0.5, 2.0, 6.0, 0.5]


def _inputs(**kw):
    return AdvantageInputs(REWARDS, MASK, group_ids=GROUP_IDS, **kw)


def _on_tokens(per_row):
    """(B,) -> (B, R) on the masked tokens of MASK."""
    return torch.tensor(per_row, dtype=torch.float64)[:, None] * MASK


def test_the_registry_declares_what_each_estimator_needs():
    assert list(ADVANTAGE_ESTIMATORS) == [
        "gae",
        "sequence",
        "grpo",
        "dr_grpo",
        "rloo",
        "reinforce_pp",
        "reinforce_pp_baseline",
    ]
    needs = {
        name: (e.needs_critic, e.needs_groups, e.whitens)
        for name, e in ADVANTAGE_ESTIMATORS.items()
    }
    assert needs == {
        "gae": (True, False, False),
        "sequence": (True, False, False),
        "grpo": (False, True, False),
        "dr_grpo": (False, True, False),
        "rloo": (False, True, False),
        "reinforce_pp": (False, False, True),
        "reinforce_pp_baseline": (False, True, True),
    }


def test_group_stats_in_any_row_order():
    group, mean, std, n = group_stats(torch.tensor(SEQ_REWARD, dtype=torch.float64), GROUP_IDS)
    assert group.tolist() == [0, 1, 0, 0, 1]  # groups numbered in id order: 5 -> 0, 9 -> 1
    close(mean, [3.0, 0.5])
    close(std, [math.sqrt(7.0), 0.0])
    close(n, [3.0, 2.0])
    _, _, std1, _ = group_stats(
        torch.tensor([4.0, 2.0]), torch.tensor([0, 1])
    )  # groups of one: std 0
    close(std1, [0.0, 0.0])


def test_grpo_group_mean_and_std():
    adv, ret = ADVANTAGE_ESTIMATORS["grpo"].fn(_inputs())
    s = math.sqrt(7.0) + 1e-6
    # (R - 3) / (sqrt 7 + 1e-6) in group 5; an all-equal group gets 0 (0 / (0 + 1e-6)), not NaN
    close(adv, _on_tokens([-2 / s, 0.0, -1 / s, 3 / s, 0.0]))
    close(ret, _on_tokens(SEQ_REWARD))


def test_dr_grpo_group_mean_without_std():
    adv, ret = ADVANTAGE_ESTIMATORS["dr_grpo"].fn(_inputs())
    close(adv, _on_tokens([-2.0, 0.0, -1.0, 3.0, 0.0]))
    close(ret, _on_tokens(SEQ_REWARD))


def test_rloo_leave_one_out_mean():
    adv, _ = ADVANTAGE_ESTIMATORS["rloo"].fn(_inputs())
    # row 0: 1 - (2 + 6) / 2 = -3; row 2: 2 - (1 + 6) / 2 = -1.5; row 3: 6 - (1 + 2) / 2 = 4.5;
    # group 9: 0
    close(adv, _on_tokens([-3.0, 0.0, -1.5, 4.5, 0.0]))


def test_reinforce_pp_returns_to_go_then_global_whitening():
    adv, ret = ADVANTAGE_ESTIMATORS["reinforce_pp"].fn(_inputs(gamma=1.0))
    # returns-to-go: row 0 [1, 1]; row 2 [-0.5 + 0 + 2.5, 0 + 2.5, 2.5] = [2, 2.5, 2.5];
    # row 4 [0.5, 0.5]
    expected = torch.tensor(
        [[1.0, 1.0, 0], [0.5, 0, 0], [2.0, 2.5, 2.5], [6.0, 0, 0], [0.5, 0.5, 0]]
    )
    close(adv, expected)
    close(ret, expected)
    adv, _ = ADVANTAGE_ESTIMATORS["reinforce_pp"].fn(_inputs(gamma=0.5))
    close(
        adv[2], [-0.5 + 0.5 * 1.25, 0.5 * 2.5, 2.5]
    )  # G1 = 0 + 0.5 * 2.5 = 1.25, G0 = -0.5 + 0.5 * 1.25
    # whitening over the rollout is part of the estimator: done even with whiten=False.
    # Hand-worked on two rows: returns-to-go {1, 1} and {-1}: mean 1/3, unbiased var 4/3
    x = AdvantageInputs(torch.tensor([[0.0, 1.0], [-1.0, 7.0]]), torch.tensor([[1, 1], [1, 0]]))
    adv, ret = estimate_advantages("reinforce_pp", x, whiten=False)
    close(adv, [[1 / math.sqrt(3), 1 / math.sqrt(3)], [-2 / math.sqrt(3), 0.0]])
    close(ret, [[1.0, 1.0], [-1.0, 0.0]])


def test_reinforce_pp_baseline_subtracts_the_group_mean_then_whitens():
    est = ADVANTAGE_ESTIMATORS["reinforce_pp_baseline"]
    adv, ret = est.fn(_inputs(gamma=1.0))
    # returns-to-go minus the group mean of the sequence reward (3 for group 5, 0.5 for group 9)
    close(
        adv, torch.tensor([[-2.0, -2.0, 0], [0, 0, 0], [-1.0, -0.5, -0.5], [3.0, 0, 0], [0, 0, 0]])
    )
    close(ret[2], [2.0, 2.5, 2.5])
    white, _ = estimate_advantages("reinforce_pp_baseline", _inputs(gamma=1.0), whiten=False)
    close(white, masked_whiten(adv, MASK))


# ---------------------------------------------------------------------------------------------- GAE


def naive_gae(rewards, values, mask, gamma, lam):
    """Per-row Python loop over the real tokens of each row (in order); value after the last is
    0."""
    B, R = len(rewards), len(rewards[0])
    adv = [[0.0] * R for _ in range(B)]
    ret = [[0.0] * R for _ in range(B)]
    for b in range(B):
        idx = [t for t in range(R) if mask[b][t]]
        last_gae, next_v = 0.0, 0.0
        for t in reversed(idx):
            delta = float(rewards[b][t]) + gamma * next_v - float(values[b][t])
            last_gae = delta + gamma * lam * last_gae
            adv[b][t] = last_gae
            ret[b][t] = last_gae + float(values[b][t])
            next_v = float(values[b][t])
    return torch.tensor(adv, dtype=torch.float64), torch.tensor(ret, dtype=torch.float64)


def test_gae_hand_worked_gamma1_lam1():
    # gamma = lam = 1: A_t = (sum of rewards from t on) - V_t = 1 - V_t; returns = 1
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.6, 0.7]])
    adv, ret = gae_advantages(rewards, values, torch.ones(1, 3), gamma=1.0, lam=1.0)
    close(adv, [[0.5, 0.4, 0.3]])
    close(ret, [[1.0, 1.0, 1.0]])


def test_gae_hand_worked_gamma09_lam095():
    # delta_2 = 1 + 0 - 0.7 = 0.3 ; delta_1 = 0 + 0.9*0.7 - 0.6 = 0.03 ;
    # delta_0 = 0 + 0.9*0.6 - 0.5 = 0.04
    # gamma*lam = 0.855: A_2 = 0.3 ; A_1 = 0.03 + 0.855*0.3 = 0.2865 ;
    # A_0 = 0.04 + 0.855*0.2865 = 0.2849575
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0, 0.0]])
    values = torch.tensor([[0.5, 0.6, 0.7, 5.0, -9.0]])  # last two positions are padding
    mask = torch.tensor([[1, 1, 1, 0, 0]])
    adv, ret = gae_advantages(rewards, values, mask, gamma=0.9, lam=0.95)
    close(adv, [[0.2849575, 0.2865, 0.3, 0.0, 0.0]])
    close(ret, [[0.7849575, 0.8865, 1.0, 0.0, 0.0]])


def test_gae_matches_naive_loop_under_masks():
    g = torch.Generator().manual_seed(4)
    mask = torch.tensor(
        [
            [1, 1, 1, 1, 1, 1],  # full length
            [1, 1, 1, 0, 0, 0],  # right-padded
            [1, 1, 1, 1, 1, 0],
            [1, 0, 0, 0, 0, 0],  # single token
            [0, 0, 0, 0, 0, 0],  # empty
            [0, 0, 1, 1, 1, 1],  # left-padded response tensor
        ],
        dtype=torch.float32,
    )
    rewards = torch.randn(6, 6, generator=g)
    values = torch.randn(6, 6, generator=g)
    for gamma, lam in ((1.0, 1.0), (0.99, 0.95), (0.5, 0.0)):
        adv, ret = gae_advantages(rewards, values, mask, gamma, lam)
        ref_adv, ref_ret = naive_gae(rewards.tolist(), values.tolist(), mask.tolist(), gamma, lam)
        close(adv, ref_adv, tol=1e-5)
        close(ret, ref_ret, tol=1e-5)
        assert torch.all(adv[mask == 0] == 0) and torch.all(ret[mask == 0] == 0)
        # padding values must not leak into real positions
        r2, v2 = rewards.clone(), values.clone()
        r2[mask == 0], v2[mask == 0] = 123.0, -77.0
        adv2, ret2 = gae_advantages(r2, v2, mask.bool(), gamma, lam)
        assert torch.equal(adv2, adv) and torch.equal(ret2, ret)
    # single-token row by hand: A = r - V (value after it is 0)
    close(adv[3, 0], rewards[3, 0] - values[3, 0])


def test_sequence_advantages():
    rewards = torch.tensor([[0.5, 0.25, 1.0], [2.0, 8.0, 8.0], [1.0, 1.0, 1.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    pv = torch.tensor([0.25, 1.0, 3.0])
    adv, ret = sequence_advantages(rewards, pv, mask)
    # R = [0.75, 2.0, 0]; A = R - V = [0.5, 1.0, -] broadcast over the mask (exactly representable)
    assert torch.equal(adv, torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))
    assert torch.equal(ret, torch.tensor([[0.75, 0.75, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))
    # random case vs per-row loop
    g = torch.Generator().manual_seed(5)
    rewards = torch.randn(4, 5, generator=g, dtype=torch.float64)
    pv = torch.randn(4, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 0, 0]])
    adv, ret = sequence_advantages(rewards, pv, mask)
    for b in range(4):
        R = sum(rewards[b, t].item() for t in range(5) if mask[b, t])
        for t in range(5):
            assert adv[b, t].item() == pytest.approx(
                (R - pv[b].item()) if mask[b, t] else 0.0, abs=1e-12
            )
            assert ret[b, t].item() == pytest.approx(R if mask[b, t] else 0.0, abs=1e-12)


# ----------------------------------------------------------------------------- through the registry


def test_critic_estimators_through_the_registry():
    # the GAE example above: gamma 0.9, lambda 0.95
    x = AdvantageInputs(
        torch.tensor([[0.0, 0.0, 1.0, 0.0, 0.0]]),
        torch.tensor([[1, 1, 1, 0, 0]]),
        values=torch.tensor([[0.5, 0.6, 0.7, 5.0, -9.0]]),
        gamma=0.9,
        lam=0.95,
    )
    adv, ret = estimate_advantages("gae", x, whiten=False)
    close(adv, [[0.2849575, 0.2865, 0.3, 0.0, 0.0]])
    close(ret, [[0.7849575, 0.8865, 1.0, 0.0, 0.0]])
    # sequence: R = 0.75 and 2.0, V(prompt) = 0.25 and 1.0
    x = AdvantageInputs(
        torch.tensor([[0.5, 0.25, 1.0], [2.0, 8.0, 8.0]]),
        torch.tensor([[1, 1, 0], [1, 0, 0]]),
        prompt_values=torch.tensor([0.25, 1.0]),
    )
    adv, ret = estimate_advantages("sequence", x, whiten=False)
    close(adv, [[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])
    # whiten=True whitens with the given function (the stage passes the all-rank one)
    seen = []
    estimate_advantages("sequence", x, whiten=True, whiten_fn=lambda a, m: seen.append(a) or a)
    assert len(seen) == 1


@pytest.mark.parametrize(
    "name", ["grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"]
)
def test_critic_free_estimators_ignore_padding_and_row_order(name):
    adv, ret = estimate_advantages(name, _inputs(), whiten=False)
    assert torch.all(adv[MASK == 0] == 0) and torch.all(ret[MASK == 0] == 0)
    other = REWARDS.clone()
    other[MASK == 0] = -1e6
    adv2, _ = estimate_advantages(
        name, AdvantageInputs(other, MASK, group_ids=GROUP_IDS), whiten=False
    )
    close(adv2, adv)
    perm = torch.tensor([3, 1, 4, 0, 2])  # the same rollout, rows shuffled
    adv3, _ = estimate_advantages(
        name, AdvantageInputs(REWARDS[perm], MASK[perm], group_ids=GROUP_IDS[perm]), whiten=False
    )
    close(adv3, adv[perm])


def test_group_score_metrics():
    all_equal, std = group_score_metrics(torch.tensor(SEQ_REWARD), GROUP_IDS)
    close(all_equal, [0.0, 1.0])  # group 5 varies, group 9 does not
    close(std, [math.sqrt(7.0), 0.0], tol=1e-5)
