"""Advantage estimators: pure torch, tensors in, tensors out, no global state.

Here: the registry (`ADVANTAGE_ESTIMATORS`, `register_advantage_estimator`, `estimate_advantages`;
the config accepts exactly its names), its input container `AdvantageInputs`, the estimators
(gae, sequence with a critic; grpo, dr_grpo, rloo, reinforce_pp, reinforce_pp_baseline without
one), and the per-prompt group helpers they and the PPO stage's metrics use (`group_stats`,
`group_score_metrics`). Not here: masked statistics, whitening, KL estimators, reward shaping and
the PPO losses, which live in `pipeline/ppo_math.py`.

Shapes: B = batch, R = response length. Masks (B, R) hold 1 on real response tokens and 0 on
padding; masked-out positions never influence results and are 0 in every output. Everything here
runs without autograd.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from pipeline.ppo_math import masked_sum, masked_whiten


@torch.no_grad()
def gae_advantages(
    rewards: Tensor, values: Tensor, response_mask: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """Token-level GAE (Schulman et al. 2016, "High-Dimensional Continuous Control Using GAE").

    rewards, values, response_mask: (B, R) -> (advantages, returns), both (B, R), float32 or wider.
    delta_t = r_t + gamma * V_{t+1} - V_t;  A_t = delta_t + gamma * lam * A_{t+1};
    V after the last real token is 0 (episode ends). Masked-out positions are skipped (transparent:
    the recursion runs over real tokens only), so padding never leaks into real positions; they are
    0 in the outputs.
    returns = advantages + values on masked positions.
    """
    dtype = torch.promote_types(torch.promote_types(rewards.dtype, values.dtype), torch.float32)
    r, v, m = rewards.to(dtype), values.to(dtype), response_mask.bool()
    B, R = r.shape
    adv = torch.zeros_like(r)
    next_value = r.new_zeros(B)
    last_gae = r.new_zeros(B)
    for t in reversed(range(R)):
        mt = m[:, t]
        delta = r[:, t] + gamma * next_value - v[:, t]
        gae = delta + gamma * lam * last_gae
        adv[:, t] = torch.where(mt, gae, torch.zeros_like(gae))
        next_value = torch.where(mt, v[:, t], next_value)
        last_gae = torch.where(mt, gae, last_gae)
    returns = torch.where(m, adv + v, torch.zeros_like(adv))
    return adv, returns


@torch.no_grad()
def sequence_advantages(
    rewards: Tensor, prompt_values: Tensor, response_mask: Tensor
) -> tuple[Tensor, Tensor]:
    """Sequence-level (bandit) advantages: one return per sequence, baseline = value of the prompt.

    rewards (B, R), prompt_values (B,), response_mask (B, R) -> (advantages, returns), both (B, R):
    R_seq = sum of masked rewards; A = R_seq - V(prompt), broadcast over masked tokens (0
    elsewhere); returns = R_seq broadcast over masked tokens. (REINFORCE with a learned baseline,
    Williams 1992.)
    """
    m = response_mask.bool()
    ret = masked_sum(rewards, response_mask, dim=-1)
    adv = ret - prompt_values.to(ret.dtype)
    zero = torch.zeros_like(rewards, dtype=ret.dtype)
    return torch.where(m, adv.unsqueeze(1), zero), torch.where(m, ret.unsqueeze(1), zero)


# ------------------------------------------------------------------------------ the registry
@dataclass(frozen=True)
class AdvantageInputs:
    """What an advantage estimator reads; the fields an estimator does not need may be None."""

    # (B, R) per-token rewards (shape_rewards): -beta KL_t if the KL is in the reward, + score at
    # the last token
    rewards: Tensor
    response_mask: Tensor  # (B, R)
    values: Tensor | None = None  # (B, R) critic V(s_t) before each response token (gae)
    prompt_values: Tensor | None = None  # (B,) critic V at the prompt's last token (sequence)
    group_ids: Tensor | None = (
        None  # (B,) long: rows sampled from one prompt share an id (group estimators)
    )
    gamma: float = 1.0  # discount (gae, reinforce_pp*)
    lam: float = 0.95  # GAE lambda


@dataclass(frozen=True)
class AdvantageEstimator:
    fn: Callable[
        [AdvantageInputs], tuple[Tensor, Tensor]
    ]  # inputs -> (advantages, returns), both (B, R)
    needs_critic: bool  # reads values / prompt_values: PPO builds, scores with and trains a critic
    needs_groups: (
        bool  # compares the responses to one prompt: needs ppo.num_samples_per_prompt >= 2
    )
    # whitened over the global rollout by definition (REINFORCE++), whatever ppo.whiten_advantages
    # says
    whitens: bool


ADVANTAGE_ESTIMATORS: dict[
    str, AdvantageEstimator
] = {}  # name -> estimator; the config validates against the keys


def register_advantage_estimator(
    name: str, *, needs_critic: bool, needs_groups: bool = False, whitens: bool = False
):
    """Decorator: `fn(inputs: AdvantageInputs) -> (advantages, returns)` becomes estimator `name`
    (verl's `register_adv_est`). Estimators never whiten themselves: `estimate_advantages` does."""

    def register(fn):
        assert name not in ADVANTAGE_ESTIMATORS, name
        ADVANTAGE_ESTIMATORS[name] = AdvantageEstimator(fn, needs_critic, needs_groups, whitens)
        return fn

    return register


@torch.no_grad()
def estimate_advantages(
    name: str,
    inputs: AdvantageInputs,
    whiten: bool,
    whiten_fn: Callable[[Tensor, Tensor], Tensor] = masked_whiten,
) -> tuple[Tensor, Tensor]:
    """Estimator `name` on `inputs`, then `whiten_fn(advantages, mask)` when `whiten` or the
    estimator whitens by definition. -> (advantages, returns), (B, R), 0 on padding. The PPO stage
    passes `distributed.collectives.global_whiten` (statistics of every rank's rows); the default
    whitens locally."""
    est = ADVANTAGE_ESTIMATORS[name]
    adv, ret = est.fn(inputs)
    if whiten or est.whitens:
        adv = whiten_fn(adv, inputs.response_mask)
    return adv, ret


def group_stats(x: Tensor, group_ids: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Statistics of x (B,) per group of rows with the same id (group_ids (B,), rows in any order):
    (group of each row (B,) long in 0..G-1, then per group (G,) in x's dtype: mean, unbiased std (0
    for a group of one), size)."""
    _, group, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    n = counts.to(x.dtype)
    mean = x.new_zeros(len(n)).index_add_(0, group, x) / n
    std = (
        x.new_zeros(len(n)).index_add_(0, group, (x - mean[group]) ** 2) / (n - 1).clamp_min(1)
    ).sqrt()
    return group, mean, std, n


def _broadcast(per_row: Tensor, mask: Tensor) -> Tensor:
    """(B,) -> (B, R): the row's value on its masked tokens, 0 elsewhere."""
    return torch.where(mask.bool(), per_row.unsqueeze(1), per_row.new_zeros(()))


def _sequence_return(x: AdvantageInputs) -> Tensor:
    """(B,) sum of each row's masked rewards (float32 or wider): the score, minus beta x the summed
    KL when the KL is in the reward."""
    return masked_sum(
        x.rewards.to(torch.promote_types(x.rewards.dtype, torch.float32)), x.response_mask, dim=-1
    )


@register_advantage_estimator("gae", needs_critic=True)
def _gae(x: AdvantageInputs) -> tuple[Tensor, Tensor]:
    """Token-level GAE(gamma, lambda) with the critic's values (gae_advantages)."""
    return gae_advantages(x.rewards, x.values, x.response_mask, x.gamma, x.lam)


@register_advantage_estimator("sequence", needs_critic=True)
def _sequence(x: AdvantageInputs) -> tuple[Tensor, Tensor]:
    """A = R - V(prompt), one value per response (sequence_advantages)."""
    return sequence_advantages(x.rewards, x.prompt_values, x.response_mask)


GRPO_EPS = 1e-6  # added to the group std (DeepSeekMath's GRPO, verl's default epsilon)


@register_advantage_estimator("grpo", needs_critic=False, needs_groups=True)
def _grpo(x: AdvantageInputs) -> tuple[Tensor, Tensor]:
    """GRPO (Shao et al. 2024, DeepSeekMath, sec. 4.1.2, outcome supervision):
    A_i = (R_i - mean_g R) / (std_g R + 1e-6) over the responses g to the same prompt, broadcast
    over the response's tokens. returns = R_i broadcast."""
    ret = _sequence_return(x)
    g, mean, std, _ = group_stats(ret, x.group_ids)
    return _broadcast((ret - mean[g]) / (std[g] + GRPO_EPS), x.response_mask), _broadcast(
        ret, x.response_mask
    )


@register_advantage_estimator("dr_grpo", needs_critic=False, needs_groups=True)
def _dr_grpo(x: AdvantageInputs) -> tuple[Tensor, Tensor]:
    """Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training"): A_i = R_i - mean_g R, no
    division by the group std (it over-weights prompts that are too easy or too hard). Its other
    half, no per-response length normalisation, is the loss aggregation seq_mean_token_sum_norm."""
    ret = _sequence_return(x)
    g, mean, _, _ = group_stats(ret, x.group_ids)
    return _broadcast(ret - mean[g], x.response_mask), _broadcast(ret, x.response_mask)


@register_advantage_estimator("rloo", needs_critic=False, needs_groups=True)
def _rloo(x: AdvantageInputs) -> tuple[Tensor, Tensor]:
    """RLOO (Kool et al. 2019; Ahmadian et al. 2024): A_i = R_i - mean of the OTHER responses' R in
    the group = R_i - (sum_g R - R_i) / (n - 1), broadcast over the response's tokens."""
    ret = _sequence_return(x)
    g, mean, _, n = group_stats(ret, x.group_ids)
    baseline = (mean[g] * n[g] - ret) / (n[g] - 1).clamp_min(1)
    return _broadcast(ret - baseline, x.response_mask), _broadcast(ret, x.response_mask)


def _returns_to_go(x: AdvantageInputs) -> Tensor:
    # G_t = r_t + gamma G_{t+1} over real tokens: GAE with V = 0 and lambda = 1.
    return gae_advantages(x.rewards, torch.zeros_like(x.rewards), x.response_mask, x.gamma, 1.0)[0]


@register_advantage_estimator("reinforce_pp", needs_critic=False, whitens=True)
def _reinforce_pp(x: AdvantageInputs) -> tuple[Tensor, Tensor]:
    """REINFORCE++ (Hu 2025): A_t = the discounted return-to-go of the per-token rewards (the KL
    penalty at every token, the score at the last), whitened over the global rollout; no critic."""
    g = _returns_to_go(x)
    return g, g


@register_advantage_estimator(
    "reinforce_pp_baseline", needs_critic=False, needs_groups=True, whitens=True
)
def _reinforce_pp_baseline(x: AdvantageInputs) -> tuple[Tensor, Tensor]:
    """REINFORCE++-baseline (Hu 2025; OpenRLHF `reinforce_baseline`): the return-to-go minus the
    group mean of the responses' sequence reward (their score when the KL is a loss term), then
    whitened over the global rollout."""
    ret_to_go = _returns_to_go(x)
    g, mean, _, _ = group_stats(_sequence_return(x), x.group_ids)
    baseline = mean[g].to(ret_to_go.dtype).unsqueeze(1)
    return torch.where(
        x.response_mask.bool(), ret_to_go - baseline, torch.zeros_like(ret_to_go)
    ), ret_to_go


def group_score_metrics(scores: Tensor, group_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Per group (G,): 1.0 where every response to the prompt got the same score (a group baseline
    then gives it no learning signal), and the unbiased std of its scores. scores, group_ids:
    (B,)."""
    g, _, std, n = group_stats(scores, group_ids)
    hi = scores.new_full(n.shape, -math.inf).scatter_reduce(0, g, scores, "amax")
    lo = scores.new_full(n.shape, math.inf).scatter_reduce(0, g, scores, "amin")
    return (hi == lo).to(scores.dtype), std
