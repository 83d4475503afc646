"""Unit tests for pipeline/ppo_math.py (masked statistics, KL, reward shaping, the losses and their
variants, controllers): hand-worked numbers and naive per-row reference loops. The advantage
estimators are tested in test_estimators.py."""

import math

import pytest
import torch

from pipeline.controllers import (
    AdaptiveKLController,
    FixedKLController,
    RefNLLConstraint,
    RunningMoments,
)
from pipeline.ppo_math import (
    aggregate_loss,
    entropy_from_logits,
    explained_variance,
    kl_estimate,
    kl_penalty_loss,
    last_token_index,
    logprobs_from_logits,
    masked_mean,
    masked_sum,
    masked_token_mean_global,
    masked_var,
    masked_whiten,
    policy_loss,
    shape_rewards,
    value_loss,
)


def _f64(x):
    return (
        x.detach().double() if isinstance(x, torch.Tensor) else torch.tensor(x, dtype=torch.float64)
    )


def close(a, b, tol=1e-6):
    torch.testing.assert_close(_f64(a), _f64(b), rtol=0, atol=tol)


# ------------------------------------------------------------------------------------- masked stats


def test_masked_sum_mean_var_basic_and_empty_rows():
    x = torch.tensor([[1.0, 2.0, 3.0, 99.0], [5.0, 7.0, 7.0, 7.0]])
    m = torch.tensor([[1, 1, 1, 0], [0, 0, 0, 0]])
    close(masked_sum(x, m), 6.0)
    close(masked_sum(x, m, dim=-1), [6.0, 0.0])
    close(masked_mean(x, m, dim=-1), [2.0, 0.0])  # empty row -> 0, not NaN
    close(masked_mean(x, m), 2.0)
    close(masked_mean(x, torch.zeros_like(m)), 0.0)  # empty mask overall -> 0
    close(masked_var(x, m), 1.0)  # values 1,2,3: unbiased var = (1+0+1)/2
    close(masked_var(x, m, unbiased=False), 2.0 / 3.0)
    # bool masks and NaN in padding are fine
    x_nan = x.clone()
    x_nan[0, 3] = float("nan")
    close(masked_mean(x_nan, m.bool(), dim=-1), [2.0, 0.0])


def test_masked_whiten():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, generator=g) * 3 + 5
    m = torch.tensor(
        [[1, 1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1]], dtype=torch.float32
    )
    w = masked_whiten(x, m)
    close(masked_mean(w, m), 0.0, tol=1e-5)
    close(masked_var(w, m), 1.0, tol=1e-4)
    assert torch.all(w[m == 0] == 0)
    # padding values do not affect the result
    x2 = x.clone()
    x2[m == 0] = torch.tensor([1e6, -1e6, 3.0, float("nan"), 0.5, 7.0, -2.0])  # the 7 padding slots
    torch.testing.assert_close(masked_whiten(x2, m), w)
    # shift_mean=False keeps the original masked mean, same scale
    w_keep = masked_whiten(x, m, shift_mean=False)
    close(masked_mean(w_keep, m), masked_mean(x, m), tol=1e-5)
    close(masked_var(w_keep, m), 1.0, tol=1e-4)
    assert torch.all(w_keep[m == 0] == 0)


# ----------------------------------------------------------------------------------- logits helpers


def test_logprobs_and_entropy_from_logits():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 5, generator=g)
    labels = torch.tensor([[0, 4, 2], [1, 1, 3]])
    lp = logprobs_from_logits(logits, labels)
    ref = torch.log_softmax(logits, -1).gather(-1, labels[..., None]).squeeze(-1)
    assert lp.shape == (2, 3)
    torch.testing.assert_close(lp, ref)
    lp_bf16 = logprobs_from_logits(logits.bfloat16(), labels)
    assert lp_bf16.dtype == torch.float32
    torch.testing.assert_close(lp_bf16, ref, atol=0.05, rtol=0)

    ent = entropy_from_logits(logits)
    p = torch.softmax(logits, -1)
    torch.testing.assert_close(ent, -(p * p.log()).sum(-1))
    # uniform over V -> log V; -inf logits (masked vocab) give a finite entropy over the rest
    close(entropy_from_logits(torch.zeros(1, 1, 8)), [[math.log(8)]])
    masked = torch.tensor([[[0.0, 0.0, float("-inf"), float("-inf")]]])
    close(entropy_from_logits(masked), [[math.log(2)]])


# ----------------------------------------------------------------------------------------------- KL


def test_k3_nonnegative_k1_can_be_negative_k2_formula():
    g = torch.Generator().manual_seed(2)
    for scale in (1e-4, 0.1, 1.0, 8.0):
        lp = torch.randn(64, 32, generator=g) * scale - 1
        ref = torch.randn(64, 32, generator=g) * scale - 1
        for dtype in (torch.float32, torch.float64, torch.bfloat16):
            assert (kl_estimate(lp.to(dtype), ref.to(dtype), "k3") >= 0).all()
        assert (kl_estimate(lp, ref, "k1") < 0).any()
        torch.testing.assert_close(kl_estimate(lp, ref, "k2"), 0.5 * (lp - ref) ** 2)
    # tiny differences: k3 stays >= 0 and ~ 0.5 d^2
    lp = torch.full((4,), -2.0, dtype=torch.float64)
    d = torch.tensor([1e-6, -1e-6, 1e-3, -1e-3], dtype=torch.float64)
    k3 = kl_estimate(lp + d, lp, "k3")
    assert (k3 >= 0).all()
    torch.testing.assert_close(k3, 0.5 * d**2, rtol=2e-3, atol=0)
    # hand-worked: log pi = log 0.5, log ref = log 0.25 -> r = 0.5, k3 = -0.5 - log 0.5 = 0.19314718
    lp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    close(kl_estimate(lp, ref, "k3"), [math.log(2) - 0.5])
    close(kl_estimate(lp, ref, "k1"), [math.log(2)])


def test_k1_and_k3_estimate_true_kl_from_samples():
    g = torch.Generator().manual_seed(3)
    p = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05], dtype=torch.float64)
    q = torch.tensor([0.2, 0.2, 0.2, 0.2, 0.2], dtype=torch.float64)
    true_kl = (p * (p / q).log()).sum().item()  # ~0.1757
    tokens = torch.multinomial(p, 200_000, replacement=True, generator=g)
    lp, ref = p.log()[tokens], q.log()[tokens]
    for est in ("k1", "k3"):
        k = kl_estimate(lp, ref, est)
        tol = 5 * k.std().item() / math.sqrt(k.numel())  # 5 standard errors
        assert abs(k.mean().item() - true_kl) < tol, (est, k.mean().item(), true_kl)
    assert (kl_estimate(lp, ref, "k1") < 0).any()  # individual k1 samples are negative sometimes


def test_kl_estimate_rejects_unknown_estimator():
    with pytest.raises(ValueError, match="k4") as exc:
        kl_estimate(torch.zeros(1, 2), torch.zeros(1, 2), "k4")
    assert "k1" in str(exc.value) and "k3" in str(exc.value)


# ----------------------------------------------------------------------------- rewards / last token


def test_last_token_index():
    m = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0], [0, 0, 1, 1], [1, 0, 1, 0]])
    expected = torch.tensor([1, 3, -1, 3, 2])
    for mask in (m, m.float(), m.bool()):
        out = last_token_index(mask)
        assert out.dtype == torch.long
        assert torch.equal(out, expected)


def test_shape_rewards():
    score = torch.tensor([1.0, 2.0, 3.0, 4.0])
    mask = torch.tensor(
        [[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0], [0, 0, 1, 1]], dtype=torch.float32
    )
    kl = torch.full((4, 4), 0.5)
    kl[mask == 0] = 100.0  # garbage on padding must not be penalised
    r = shape_rewards(score, kl, mask, kl_coef=0.1, score_clip=None)
    p = -0.05  # -0.1 * 0.5
    expected = torch.tensor(
        [
            [p, p + 1.0, 0.0, 0.0],  # ends early: score at index 1
            [p, p, p, p + 2.0],  # runs to the length limit: score at index 3
            [0.0, 0.0, 0.0, 0.0],  # empty response: nothing, no crash
            [0.0, 0.0, p, p + 4.0],  # left-padded response tensor: last real token is index 3
        ]
    )
    close(r, expected)
    # with clipping to [-1.5, 1.5]
    r = shape_rewards(torch.tensor([1.0, 2.0, 3.0, -4.0]), kl, mask, kl_coef=0.1, score_clip=1.5)
    expected[1, 3], expected[3, 3] = p + 1.5, p - 1.5
    close(r, expected)
    # kl_coef = 0: only the score
    r = shape_rewards(score, kl, mask.bool(), kl_coef=0.0, score_clip=None)
    assert r.sum().item() == pytest.approx(1 + 2 + 4)
    # ref_nll_coef (ppo.ref_nll_limit's lambda): + 0.5 x log ref on real tokens, garbage ignored
    ref_lp = torch.full((4, 4), -2.0)
    ref_lp[mask == 0] = -1000.0
    r = shape_rewards(score, kl, mask, 0.1, None, ref_logprobs=ref_lp, ref_nll_coef=0.5)
    close(
        r,
        torch.tensor([[p, p + 1.0, 0, 0], [p, p, p, p + 2.0], [0.0] * 4, [0, 0, p, p + 4.0]])
        + torch.where(mask.bool(), torch.tensor(-1.0), torch.tensor(0.0)),
    )
    # lambda 0 leaves the rewards bitwise as without the reference's log-probs
    assert torch.equal(
        shape_rewards(score, kl, mask, 0.1, None, ref_lp, 0.0),
        shape_rewards(score, kl, mask, 0.1, None),
    )


# ------------------------------------------------------------------------------------------- losses


def test_policy_loss_hand_worked_two_tokens():
    # eps = 0.2. token 0: ratio 1.5, A = +1 -> max(-1.5, -1.2) = -1.2 (clipped branch active)
    #            token 1: ratio 1.1, A = -2 -> max(2.2, 2.2) = 2.2  (inside the range, not clipped)
    #            token 2: padding (garbage) -> ignored. loss = (-1.2 + 2.2) / 2 = 0.5
    old = torch.tensor([[-1.0, -2.0, -3.0]])
    lp = old + torch.tensor([[math.log(1.5), math.log(1.1), 50.0]])
    A = torch.tensor([[1.0, -2.0, 1e6]])
    mask = torch.tensor([[1, 1, 0]])
    loss, stats = policy_loss(lp, old, A, mask, clip_eps=0.2, num_tokens=2)
    close(loss, 0.5)
    close(stats["clip_fraction"], 0.5)
    close(stats["ratio_mean"], 1.3)
    # k3 = (r - 1) - log r: (0.5 - log 1.5 + 0.1 - log 1.1) / 2
    close(stats["approx_kl"], (0.5 - math.log(1.5) + 0.1 - math.log(1.1)) / 2)
    assert all(not s.requires_grad and s.dtype == torch.float32 for s in stats.values())


def test_policy_loss_gradients_zero_where_clipped_in_advantage_direction():
    ratios = torch.tensor([1.5, 0.5, 1.5, 0.5, 1.1], dtype=torch.float64)
    A = torch.tensor([1.0, -1.0, -1.0, 1.0, 1.0], dtype=torch.float64)
    old = torch.full((1, 5), -1.0, dtype=torch.float64)
    lp = (old + ratios.log()).clone().requires_grad_(True)
    loss, stats = policy_loss(lp, old, A[None], torch.ones(1, 5), clip_eps=0.2, num_tokens=5)
    loss.backward()
    # d(-A * ratio)/d logprob = -A * ratio where the unclipped branch is active, else 0
    expected = torch.tensor([[0.0, 0.0, 1.5, -0.5, -1.1]], dtype=torch.float64) / 5
    close(lp.grad, expected, tol=1e-12)
    assert (
        lp.grad[0, 2] != 0 and lp.grad[0, 3] != 0
    )  # clipped region against A: still gets gradient
    close(stats["clip_fraction"], 2 / 5)
    # loss = (-1.2 + 0.8 + 1.5 - 0.5 - 1.1) / 5
    close(loss, (-1.2 + 0.8 + 1.5 - 0.5 - 1.1) / 5, tol=1e-12)


def _batch(seed):
    g = torch.Generator().manual_seed(seed)
    B, R = 4, 6
    mask = torch.tensor(
        [[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0], [1, 0, 0, 0, 0, 0]]
    ).float()
    t = lambda s=1.0: torch.randn(B, R, generator=g, dtype=torch.float64) * s  # noqa: E731
    return mask, t


def test_loss_normalisation_whole_vs_halves():
    mask, t = _batch(6)
    old_lp, A, ent = t(), t(), t().abs()
    lp0 = old_lp + t(0.3)
    old_v, ret = t(), t()
    v0 = old_v + t(0.5)
    n = mask.sum().item()  # 13 global tokens

    def run(rows, lp, v):
        pl, _ = policy_loss(lp[rows], old_lp[rows], A[rows], mask[rows], 0.2, n)
        vl, _ = value_loss(v[rows], old_v[rows], ret[rows], mask[rows], n, clip_range=0.2)
        el = masked_token_mean_global(ent[rows] * lp[rows], mask[rows], n)
        return pl + vl - 0.01 * el

    lp_a, v_a = lp0.clone().requires_grad_(True), v0.clone().requires_grad_(True)
    whole = run(slice(0, 4), lp_a, v_a)
    whole.backward()
    lp_b, v_b = lp0.clone().requires_grad_(True), v0.clone().requires_grad_(True)
    halves = [run(slice(0, 2), lp_b, v_b), run(slice(2, 4), lp_b, v_b)]
    for h in halves:
        h.backward()
    close(sum(halves), whole, tol=1e-12)
    close(lp_b.grad, lp_a.grad, tol=1e-12)
    close(v_b.grad, v_a.grad, tol=1e-12)
    assert lp_a.grad[mask == 0].abs().sum() == 0 and lp_a.grad.abs().sum() > 0
    # per-part losses are NOT the local masked means (those would not add up)
    local = policy_loss(lp0[:2], old_lp[:2], A[:2], mask[:2], 0.2, mask[:2].sum().item())[0]
    assert (
        abs(local.item() - policy_loss(lp0[:2], old_lp[:2], A[:2], mask[:2], 0.2, n)[0].item())
        > 1e-6
    )


# ------------------------------------------------ loss aggregation, clip-higher, dual clip, KL loss
PER_TOKEN = torch.tensor([[1.0, 2.0, 3.0], [4.0, 50.0, -50.0]], dtype=torch.float64)
LOSS_MASK = torch.tensor([[1, 1, 1], [1, 0, 0]])


def test_loss_aggregation_modes_hand_worked():
    close(aggregate_loss(PER_TOKEN, LOSS_MASK, num_tokens=4), (1 + 2 + 3 + 4) / 4)  # 2.5
    # token means 2 and 4, over 2 responses
    close(aggregate_loss(PER_TOKEN, LOSS_MASK, 4, "seq_mean_token_mean", num_seqs=2), 3.0)
    # token sums 6 and 4, each / 3 (the generation budget), over 2 responses
    close(
        aggregate_loss(
            PER_TOKEN, LOSS_MASK, 4, "seq_mean_token_sum_norm", num_seqs=2, norm_const=3.0
        ),
        5 / 3,
    )
    with pytest.raises(ValueError, match="seq_mean"):
        aggregate_loss(PER_TOKEN, LOSS_MASK, 4, "sum")


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_loss_aggregation_shards_add_up_with_global_counts(mode):
    x = PER_TOKEN.clone().requires_grad_(True)
    whole = aggregate_loss(x, LOSS_MASK, 4, mode, num_seqs=2, norm_const=3.0)
    parts = [
        aggregate_loss(x[r], LOSS_MASK[r], 4, mode, num_seqs=2, norm_const=3.0)
        for r in (slice(0, 1), slice(1, 2))
    ]
    close(sum(parts), whole, tol=1e-12)
    whole.backward()
    per_token_weight = {
        "token_mean": [[1 / 4] * 3, [1 / 4, 0, 0]],
        "seq_mean_token_mean": [[1 / 6] * 3, [1 / 2, 0, 0]],  # a short response's tokens weigh more
        "seq_mean_token_sum_norm": [[1 / 6] * 3, [1 / 6, 0, 0]],
    }[mode]  # every token the same
    close(x.grad, per_token_weight, tol=1e-12)


def _ratios_loss(ratios, advantages, **kw):
    old = torch.full((1, len(ratios)), -1.0, dtype=torch.float64)
    lp = (old + torch.tensor([ratios], dtype=torch.float64).log()).requires_grad_(True)
    loss, stats = policy_loss(
        lp,
        old,
        torch.tensor([advantages], dtype=torch.float64),
        torch.ones(1, len(ratios)),
        num_tokens=len(ratios),
        **kw,
    )
    loss.backward()
    return loss, stats, lp.grad[0]


def test_asymmetric_clipping_clip_higher():
    # token 0: ratio 1.25, A = +1 ; token 1: ratio 0.75, A = -1 ; token 2: ratio 0.75, A = +1
    # symmetric eps 0.2: max(-1.25, -1.2) = -1.2 (clipped), max(0.75, 0.8) = 0.8 (clipped),
    # max(-0.75, -0.8) = -0.75
    loss, stats, grad = _ratios_loss([1.25, 0.75, 0.75], [1.0, -1.0, 1.0], clip_eps=0.2)
    close(loss, (-1.2 + 0.8 - 0.75) / 3)
    close(stats["clip_fraction"], 2 / 3)
    # clip-higher 0.28: token 0 is inside [0.8, 1.28] now: -1.25, with gradient -A * ratio / 3
    loss, stats, grad = _ratios_loss(
        [1.25, 0.75, 0.75], [1.0, -1.0, 1.0], clip_eps=0.2, clip_eps_high=0.28
    )
    close(loss, (-1.25 + 0.8 - 0.75) / 3)
    close(stats["clip_fraction"], 1 / 3)
    close(grad, [-1.25 / 3, 0.0, -0.75 / 3])
    # a lower bound of its own: eps_low 0.3 lets token 1 down to 0.7, inside now
    loss, _, _ = _ratios_loss([1.25, 0.75, 0.75], [1.0, -1.0, 1.0], clip_eps=0.3, clip_eps_high=0.2)
    close(loss, (-1.2 + 0.75 - 0.75) / 3)


def test_dual_clip_caps_the_loss_of_negative_advantages():
    # token 0: ratio 5, A = -1: max(5, 1.2) = 5, capped at -A * 3 = 3 (no gradient)
    # token 1: ratio 2, A = -1: max(2, 1.2) = 2 < 3: unchanged ;
    # token 2: ratio 5, A = +1: max(-5, -1.2) = -1.2
    loss, stats, grad = _ratios_loss([5.0, 2.0, 5.0], [-1.0, -1.0, 1.0], clip_eps=0.2)
    close(loss, (5 + 2 - 1.2) / 3)
    assert "dual_clip_fraction" not in stats
    loss, stats, grad = _ratios_loss(
        [5.0, 2.0, 5.0], [-1.0, -1.0, 1.0], clip_eps=0.2, dual_clip=3.0
    )
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
    # token 0: pi = 0.5, ref = 0.25: k3 = (r - 1) - log r with r = 0.5: log 2 - 0.5;
    # d/d log pi = 1 - r = 0.5
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


def test_value_loss_clipping_hand_worked():
    # c = 0.2. token 0: old 1.0, V 1.5, R 2.0 -> V_clip 1.2: max(0.25, 0.64) = 0.64 (clipped branch)
    #          token 1: old 1.0, V 1.5, R 1.0 -> V_clip 1.2: max(0.25, 0.04) = 0.25
    #          token 2: old 0.0, V 0.1, R 1.0 -> inside range: 0.81 ; token 3: padding
    # loss = 0.5 * (0.64 + 0.25 + 0.81) / 3 = 0.283333 ; unclipped: 0.5 * (0.25 + 0.25 + 0.81) / 3
    old = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    v = torch.tensor([[1.5, 1.5, 0.1, 50.0]], requires_grad=True)
    ret = torch.tensor([[2.0, 1.0, 1.0, -50.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, stats = value_loss(v, old, ret, mask, num_tokens=3, clip_range=0.2)
    close(loss, 0.5 * 1.7 / 3)
    close(stats["value_clip_fraction"], 1 / 3)
    close(stats["values_mean"], 3.1 / 3)
    loss.backward()
    # token 0 is clipped (V_clip saturated): no gradient; others: (V - R) / 3
    close(v.grad, [[0.0, 0.5 / 3, -0.9 / 3, 0.0]])
    loss_nc, stats_nc = value_loss(v, old, ret, mask, num_tokens=3, clip_range=None)
    close(loss_nc, 0.5 * 1.31 / 3)
    close(stats_nc["value_clip_fraction"], 0.0)


def test_explained_variance():
    mask, t = _batch(7)
    ret = t()
    close(explained_variance(ret, ret, mask), 1.0)
    const = torch.full_like(ret, masked_mean(ret, mask).item())
    close(explained_variance(const, ret, mask), 0.0, tol=1e-6)
    # padding ignored
    v = ret + t(0.1)
    v2 = v.clone()
    v2[mask == 0] = 1e6
    close(explained_variance(v2, ret, mask), explained_variance(v, ret, mask))
    assert 0.9 < explained_variance(v, ret, mask).item() < 1.0
    # Var[R] == 0 -> documented 0.0
    close(explained_variance(t(), torch.full_like(ret, 2.0), mask), 0.0)


# -------------------------------------------------------------------------------------- controllers


def test_ref_nll_constraint_by_hand():
    c = RefNLLConstraint(limit=1.25, lr=0.5)
    assert c.ratio(3.0) == 1.0 and c.value == 0.0  # no first value yet
    c.update(2.0)  # the first iteration fixes the reference level; lambda stays 0
    assert (c.first, c.value) == (2.0, 0.0)
    c.update(2.4)  # 2.4 / (1.25 * 2) - 1 = -0.04: inside the limit, lambda floored at 0
    assert c.value == 0.0 and c.ratio(2.4) == pytest.approx(1.2)
    c.update(3.0)  # 3 / 2.5 - 1 = 0.2 -> lambda = 0.5 * 0.2
    assert c.value == pytest.approx(0.1)
    c.update(3.5)  # + 0.5 * 0.4
    assert c.value == pytest.approx(0.3)
    c.update(2.0)  # 2 / 2.5 - 1 = -0.2 -> 0.3 - 0.1
    assert c.value == pytest.approx(0.2)
    c.update(1.0)  # -0.3 -> floored at 0, not negative
    assert c.value == 0.0
    c.update(3.0)
    restored = RefNLLConstraint(1.25, 0.5)
    restored.load_state_dict(c.state_dict())
    assert restored.state_dict() == c.state_dict() == {"value": pytest.approx(0.1), "first": 2.0}
    restored.update(3.0)
    c.update(3.0)
    assert restored.value == c.value == pytest.approx(0.2)


def test_adaptive_kl_controller():
    c = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10000)
    c.update(current_kl=12.0, n_steps=256)  # error = 12/6 - 1 = 1 -> clipped to 0.2
    assert c.value == pytest.approx(0.1 * (1 + 0.2 * 256 / 10000))  # 0.100512
    c = AdaptiveKLController(0.1, 6.0, 10000)
    c.update(0.0, 256)  # error = -1 -> clipped to -0.2
    assert c.value == pytest.approx(0.1 * (1 - 0.2 * 256 / 10000))  # 0.099488
    c = AdaptiveKLController(0.1, 6.0, 10000)
    c.update(6.6, 256)  # error = 0.1, inside the clip range
    assert c.value == pytest.approx(0.1 * (1 + 0.1 * 256 / 10000))  # 0.100256
    c.update(torch.tensor(6.0), 256)  # on target: unchanged (tensors accepted)
    assert c.value == pytest.approx(0.100256)
    c3 = AdaptiveKLController(0.1, 2.0, 64)
    c3.update(
        0.0, 256
    )  # 256 samples > horizon 64: the step share is capped at 1 -> beta * 0.8, not 0
    assert c3.value == pytest.approx(0.08)
    c3.update(10.0, 32)  # error 4 -> 0.2; share 32/64 -> x 1.1
    assert c3.value == pytest.approx(0.088)
    c2 = AdaptiveKLController(1.0, 1.0, 1.0)
    c2.load_state_dict(c.state_dict())
    assert (
        c2.state_dict() == c.state_dict() == {"value": c.value, "target": 6.0, "horizon": 10000.0}
    )
    assert all(type(x) is float for x in c.state_dict().values())


def test_fixed_kl_controller():
    c = FixedKLController(0.05)
    for kl in (0.0, 100.0):
        c.update(kl, 512)
    assert c.value == 0.05
    c2 = FixedKLController(1.0)
    c2.load_state_dict(c.state_dict())
    assert c2.value == 0.05 and c.state_dict() == {"value": 0.05}


def test_running_moments():
    g = torch.Generator().manual_seed(8)
    batches = [torch.randn(n, generator=g) * 2 + 3 for n in (5, 1, 17, 3)]
    rm = RunningMoments()
    assert (rm.mean, rm.std, rm.count) == (0.0, 1.0, 0)
    for i, b in enumerate(batches):
        bm, bs = rm.update(b)
        assert bm == pytest.approx(b.double().mean().item())
        assert bs == pytest.approx(b.double().std().item() if b.numel() > 1 else 0.0)
        seen = torch.cat(batches[: i + 1]).double()
        assert rm.count == seen.numel()
        assert rm.mean == pytest.approx(seen.mean().item(), abs=1e-9)
        assert rm.std == pytest.approx(seen.std().item(), abs=1e-9)
    rm2 = RunningMoments()
    rm2.load_state_dict(rm.state_dict())
    extra = torch.randn(2, 3, generator=g)
    rm.update(extra)
    rm2.update(extra)
    assert rm2.state_dict() == rm.state_dict()
    full = torch.cat(batches + [extra.flatten()]).double()
    assert rm.std == pytest.approx(full.std().item(), abs=1e-9)
    with pytest.raises(ValueError):
        rm.update(torch.empty(0))
