"""The PPO step's pure parts, as the stage's options configure them: tensors and a `PPOConfig` in,
tensors out, no engines, no ranks (a whitening function is passed in).

`PPOTrainer` (ppo.py) computes its rewards, advantages and actor loss only through these, and the
benchmark's plain-PyTorch floor (launch/bench_floor.py) calls the same ones, so the floor cannot
drift from the algorithm it is the floor of. The math itself is ppo_math.py and estimators.py.
"""

from __future__ import annotations

from typing import Callable

from torch import Tensor

from pipeline import estimators, ppo_math
from pipeline.stages.ppo_types import Experience


def loss_aggregation(p, num_tokens: Tensor | float, max_response_len: int) -> dict:
    """The keyword arguments of ppo.loss_agg for ppo_math's losses: the mini-batch's global
    denominators (`num_tokens` response tokens over all ranks, ppo.mini_batch_size rows, the
    response budget), so micro-batches and ranks add up to the mini-batch's loss."""
    return {
        "num_tokens": num_tokens,
        "agg_mode": p.loss_agg,
        "num_seqs": float(p.mini_batch_size),
        "norm_const": float(max_response_len),
    }


def rewards_and_advantages(
    p,
    exp: Experience,
    scores: Tensor,
    kl_coef: float,
    ref_nll_coef: float,
    whiten_fn: Callable[[Tensor, Tensor], Tensor] = ppo_math.masked_whiten,
) -> tuple[Tensor, Tensor, Tensor]:
    """(rewards, advantages, returns), (B, R) each, of a scored rollout `exp` with sequence
    `scores` (B,): the per-token KL penalty (ppo.kl_estimator, x `kl_coef` when ppo.kl_penalty is
    reward; in the loss otherwise), the clipped score at the last token, the reference-likelihood
    term (x `ref_nll_coef`), then the estimator ppo.advantage_mode, whitened by `whiten_fn` when
    ppo.whiten_advantages (the stage passes the global whitening over every rank's rows)."""
    m = exp.response_mask
    kl = ppo_math.kl_estimate(exp.old_logprobs, exp.ref_logprobs, p.kl_estimator) * m
    beta = kl_coef if p.kl_penalty == "reward" else 0.0
    rewards = ppo_math.shape_rewards(
        scores, kl, m, beta, p.score_clip or None, exp.ref_logprobs, ref_nll_coef
    )
    inputs = estimators.AdvantageInputs(
        rewards, m, exp.old_values, exp.prompt_values, exp.group_ids, p.gamma, p.lam
    )
    adv, ret = estimators.estimate_advantages(
        p.advantage_mode, inputs, p.whiten_advantages, whiten_fn
    )
    return rewards, adv, ret


def actor_loss(
    p,
    logits: Tensor,
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    agg: dict,
    ref_logprobs: Tensor | None = None,
    kl_coef: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The actor's loss on a micro-batch, before PPO-ptx: the clipped surrogate (ppo.clip_eps*,
    ppo.dual_clip) - ppo.entropy_coef x entropy, + `kl_coef` x the KL to `ref_logprobs` when
    ppo.kl_penalty is loss; all aggregated by `agg` (loss_aggregation). -> (loss, parts): the
    detached parts "policy_loss", "entropy", "kl_loss" (with the KL in the loss) and the policy
    loss's token statistics ("token_stats")."""
    pg_loss, pg_stats = ppo_math.policy_loss(
        logprobs,
        old_logprobs,
        advantages,
        mask,
        p.clip_eps_low or p.clip_eps,
        clip_eps_high=p.clip_eps_high or p.clip_eps,
        dual_clip=p.dual_clip,
        **agg,
    )
    ent = ppo_math.aggregate_loss(ppo_math.entropy_from_logits(logits), mask, **agg)
    loss = pg_loss - p.entropy_coef * ent
    parts = {"policy_loss": pg_loss.detach(), "entropy": ent.detach(), "token_stats": pg_stats}
    if p.kl_penalty == "loss":  # GRPO: beta x KL(pi || ref) of the current policy
        kl_loss = ppo_math.kl_penalty_loss(logprobs, ref_logprobs, mask, p.kl_estimator, **agg)
        loss = loss + kl_coef * kl_loss
        parts["kl_loss"] = kl_loss.detach()
    return loss, parts
