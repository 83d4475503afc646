"""Unit tests for the advantage-estimator registry and the policy-loss variants of pipeline/ppo_math.py,
against numbers worked out by hand (as test_ppo_math.py does for GAE and the clipped surrogate)."""

import math

import pytest
import torch

from pipeline.ppo_math import (
    ADVANTAGE_ESTIMATORS,
    AdvantageInputs,
    aggregate_loss,
    estimate_advantages,
    group_score_metrics,
    group_stats,
    kl_penalty_loss,
    masked_whiten,
    policy_loss,
)


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
REWARDS = torch.tensor([[0.0, 1.0, 99.0], [0.5, 99.0, 99.0], [-0.5, 0.0, 2.5], [6.0, 99.0, 99.0], [0.0, 0.5, 99.0]],
                       dtype=torch.float64)
SEQ_REWARD = [1.0, 0.5, 2.0, 6.0, 0.5]


def _inputs(**kw):
    return AdvantageInputs(REWARDS, MASK, group_ids=GROUP_IDS, **kw)


def _on_tokens(per_row):
    """(B,) -> (B, R) on the masked tokens of MASK."""
    return torch.tensor(per_row, dtype=torch.float64)[:, None] * MASK


def test_the_registry_declares_what_each_estimator_needs():
    assert list(ADVANTAGE_ESTIMATORS) == ["gae", "sequence", "grpo", "dr_grpo", "rloo", "reinforce_pp",
                                          "reinforce_pp_baseline"]
    needs = {name: (e.needs_critic, e.needs_groups, e.whitens) for name, e in ADVANTAGE_ESTIMATORS.items()}
    assert needs == {"gae": (True, False, False), "sequence": (True, False, False),
                     "grpo": (False, True, False), "dr_grpo": (False, True, False), "rloo": (False, True, False),
                     "reinforce_pp": (False, False, True), "reinforce_pp_baseline": (False, True, True)}


def test_group_stats_in_any_row_order():
    group, mean, std, n = group_stats(torch.tensor(SEQ_REWARD, dtype=torch.float64), GROUP_IDS)
    assert group.tolist() == [0, 1, 0, 0, 1]  # groups numbered in id order: 5 -> 0, 9 -> 1
    close(mean, [3.0, 0.5])
    close(std, [math.sqrt(7.0), 0.0])
    close(n, [3.0, 2.0])
    _, _, std1, _ = group_stats(torch.tensor([4.0, 2.0]), torch.tensor([0, 1]))  # groups of one: std 0
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
    # row 0: 1 - (2 + 6) / 2 = -3; row 2: 2 - (1 + 6) / 2 = -1.5; row 3: 6 - (1 + 2) / 2 = 4.5; group 9: 0
    close(adv, _on_tokens([-3.0, 0.0, -1.5, 4.5, 0.0]))


def test_reinforce_pp_returns_to_go_then_global_whitening():
    adv, ret = ADVANTAGE_ESTIMATORS["reinforce_pp"].fn(_inputs(gamma=1.0))
    # returns-to-go: row 0 [1, 1]; row 2 [-0.5 + 0 + 2.5, 0 + 2.5, 2.5] = [2, 2.5, 2.5]; row 4 [0.5, 0.5]
    expected = torch.tensor([[1.0, 1.0, 0], [0.5, 0, 0], [2.0, 2.5, 2.5], [6.0, 0, 0], [0.5, 0.5, 0]])
    close(adv, expected)
    close(ret, expected)
    adv, _ = ADVANTAGE_ESTIMATORS["reinforce_pp"].fn(_inputs(gamma=0.5))
    close(adv[2], [-0.5 + 0.5 * 1.25, 0.5 * 2.5, 2.5])  # G1 = 0 + 0.5 * 2.5 = 1.25, G0 = -0.5 + 0.5 * 1.25
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
    close(adv, torch.tensor([[-2.0, -2.0, 0], [0, 0, 0], [-1.0, -0.5, -0.5], [3.0, 0, 0], [0, 0, 0]]))
    close(ret[2], [2.0, 2.5, 2.5])
    white, _ = estimate_advantages("reinforce_pp_baseline", _inputs(gamma=1.0), whiten=False)
    close(white, masked_whiten(adv, MASK))


def test_critic_estimators_through_the_registry():
    # the GAE example of test_ppo_math.py: gamma 0.9, lambda 0.95
    x = AdvantageInputs(torch.tensor([[0.0, 0.0, 1.0, 0.0, 0.0]]), torch.tensor([[1, 1, 1, 0, 0]]),
                        values=torch.tensor([[0.5, 0.6, 0.7, 5.0, -9.0]]), gamma=0.9, lam=0.95)
    adv, ret = estimate_advantages("gae", x, whiten=False)
    close(adv, [[0.2849575, 0.2865, 0.3, 0.0, 0.0]])
    close(ret, [[0.7849575, 0.8865, 1.0, 0.0, 0.0]])
    # sequence: R = 0.75 and 2.0, V(prompt) = 0.25 and 1.0
    x = AdvantageInputs(torch.tensor([[0.5, 0.25, 1.0], [2.0, 8.0, 8.0]]), torch.tensor([[1, 1, 0], [1, 0, 0]]),
                        prompt_values=torch.tensor([0.25, 1.0]))
    adv, ret = estimate_advantages("sequence", x, whiten=False)
    close(adv, [[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])
    # whiten=True whitens with the given function (the stage passes the all-rank one)
    seen = []
    estimate_advantages("sequence", x, whiten=True, whiten_fn=lambda a, m: seen.append(a) or a)
    assert len(seen) == 1


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"])
def test_critic_free_estimators_ignore_padding_and_row_order(name):
    adv, ret = estimate_advantages(name, _inputs(), whiten=False)
    assert torch.all(adv[MASK == 0] == 0) and torch.all(ret[MASK == 0] == 0)
    other = REWARDS.clone()
    other[MASK == 0] = -1e6
    adv2, _ = estimate_advantages(name, AdvantageInputs(other, MASK, group_ids=GROUP_IDS), whiten=False)
    close(adv2, adv)
    perm = torch.tensor([3, 1, 4, 0, 2])  # the same rollout, rows shuffled
    adv3, _ = estimate_advantages(name, AdvantageInputs(REWARDS[perm], MASK[perm], group_ids=GROUP_IDS[perm]),
                                  whiten=False)
    close(adv3, adv[perm])


def test_group_score_metrics():
    all_equal, std = group_score_metrics(torch.tensor(SEQ_REWARD), GROUP_IDS)
    close(all_equal, [0.0, 1.0])  # group 5 varies, group 9 does not
    close(std, [math.sqrt(7.0), 0.0], tol=1e-5)


# ------------------------------------------------------------------------------------------- losses
PER_TOKEN = torch.tensor([[1.0, 2.0, 3.0], [4.0, 50.0, -50.0]], dtype=torch.float64)
LOSS_MASK = torch.tensor([[1, 1, 1], [1, 0, 0]])


def test_loss_aggregation_modes_hand_worked():
    close(aggregate_loss(PER_TOKEN, LOSS_MASK, num_tokens=4), (1 + 2 + 3 + 4) / 4)  # 2.5
    # token means 2 and 4, over 2 responses
    close(aggregate_loss(PER_TOKEN, LOSS_MASK, 4, "seq_mean_token_mean", num_seqs=2), 3.0)
    # token sums 6 and 4, each / 3 (the generation budget), over 2 responses
    close(aggregate_loss(PER_TOKEN, LOSS_MASK, 4, "seq_mean_token_sum_norm", num_seqs=2, norm_const=3.0), 5 / 3)
    with pytest.raises(ValueError, match="seq_mean"):
        aggregate_loss(PER_TOKEN, LOSS_MASK, 4, "sum")


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_loss_aggregation_shards_add_up_with_global_counts(mode):
    x = PER_TOKEN.clone().requires_grad_(True)
    whole = aggregate_loss(x, LOSS_MASK, 4, mode, num_seqs=2, norm_const=3.0)
    parts = [aggregate_loss(x[r], LOSS_MASK[r], 4, mode, num_seqs=2, norm_const=3.0) for r in (slice(0, 1), slice(1, 2))]
    close(sum(parts), whole, tol=1e-12)
    whole.backward()
    per_token_weight = {"token_mean": [[1 / 4] * 3, [1 / 4, 0, 0]],
                        "seq_mean_token_mean": [[1 / 6] * 3, [1 / 2, 0, 0]],  # a short response's tokens weigh more
                        "seq_mean_token_sum_norm": [[1 / 6] * 3, [1 / 6, 0, 0]]}[mode]  # every token the same
    close(x.grad, per_token_weight, tol=1e-12)


def _ratios_loss(ratios, advantages, **kw):
    old = torch.full((1, len(ratios)), -1.0, dtype=torch.float64)
    lp = (old + torch.tensor([ratios], dtype=torch.float64).log()).requires_grad_(True)
    loss, stats = policy_loss(lp, old, torch.tensor([advantages], dtype=torch.float64), torch.ones(1, len(ratios)),
                              num_tokens=len(ratios), **kw)
    loss.backward()
    return loss, stats, lp.grad[0]


def test_asymmetric_clipping_clip_higher():
    # token 0: ratio 1.25, A = +1 ; token 1: ratio 0.75, A = -1 ; token 2: ratio 0.75, A = +1
    # symmetric eps 0.2: max(-1.25, -1.2) = -1.2 (clipped), max(0.75, 0.8) = 0.8 (clipped), max(-0.75, -0.8) = -0.75
    loss, stats, grad = _ratios_loss([1.25, 0.75, 0.75], [1.0, -1.0, 1.0], clip_eps=0.2)
    close(loss, (-1.2 + 0.8 - 0.75) / 3)
    close(stats["clip_fraction"], 2 / 3)
    # clip-higher 0.28: token 0 is inside [0.8, 1.28] now: -1.25, with gradient -A * ratio / 3
    loss, stats, grad = _ratios_loss([1.25, 0.75, 0.75], [1.0, -1.0, 1.0], clip_eps=0.2, clip_eps_high=0.28)
    close(loss, (-1.25 + 0.8 - 0.75) / 3)
    close(stats["clip_fraction"], 1 / 3)
    close(grad, [-1.25 / 3, 0.0, -0.75 / 3])
    # a lower bound of its own: eps_low 0.3 lets token 1 down to 0.7, inside now
    loss, _, _ = _ratios_loss([1.25, 0.75, 0.75], [1.0, -1.0, 1.0], clip_eps=0.3, clip_eps_high=0.2)
    close(loss, (-1.2 + 0.75 - 0.75) / 3)


def test_dual_clip_caps_the_loss_of_negative_advantages():
    # token 0: ratio 5, A = -1: max(5, 1.2) = 5, capped at -A * 3 = 3 (no gradient)
    # token 1: ratio 2, A = -1: max(2, 1.2) = 2 < 3: unchanged ; token 2: ratio 5, A = +1: max(-5, -1.2) = -1.2
    loss, stats, grad = _ratios_loss([5.0, 2.0, 5.0], [-1.0, -1.0, 1.0], clip_eps=0.2)
    close(loss, (5 + 2 - 1.2) / 3)
    assert "dual_clip_fraction" not in stats
    loss, stats, grad = _ratios_loss([5.0, 2.0, 5.0], [-1.0, -1.0, 1.0], clip_eps=0.2, dual_clip=3.0)
    close(loss, (3 + 2 - 1.2) / 3)
    close(stats["dual_clip_fraction"], 1 / 3)
    close(grad, [0.0, 2.0 / 3, 0.0])


def test_policy_loss_aggregation_mode_is_passed_through():
    # two responses of 1 and 3 tokens, ratio 1 everywhere: per-token loss = -A
    old = torch.zeros(2, 3)
    A = torch.tensor([[4.0, 0.0, 0.0], [1.0, 2.0, 3.0]])
    mask = torch.tensor([[1, 0, 0], [1, 1, 1]])
    loss, _ = policy_loss(old, old, A, mask, 0.2, 4, agg_mode="seq_mean_token_mean", num_seqs=2)
    close(loss, -(4 + 2) / 2)
    loss, _ = policy_loss(old, old, A, mask, 0.2, 4)
    close(loss, -10 / 4)


def test_kl_penalty_loss_k3_hand_worked_and_padding_safe():
    # token 0: pi = 0.5, ref = 0.25: k3 = (r - 1) - log r with r = 0.5: log 2 - 0.5; d/d log pi = 1 - r = 0.5
    # token 1: pi = ref: 0 ; token 2: padding with a log ratio of 150 (exp would overflow)
    ref = torch.tensor([[math.log(0.25), -2.0, -100.0]])
    lp = torch.tensor([[math.log(0.5), -2.0, 50.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0]])
    loss = kl_penalty_loss(lp, ref, mask, "k3", num_tokens=2)
    close(loss, (math.log(2) - 0.5) / 2)
    loss.backward()
    assert torch.isfinite(lp.grad).all()
    close(lp.grad, [[0.25, 0.0, 0.0]])
    close(kl_penalty_loss(lp, ref, mask, "k2", num_tokens=2), 0.5 * math.log(2) ** 2 / 2)
