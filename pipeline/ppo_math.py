"""PPO / RLHF math: pure torch, tensors in, tensors out, no global state.

Here: masked statistics and whitening, the sampling distribution's log-probs and entropy, KL
estimators and reward shaping with a per-token KL penalty, the losses (clipped policy loss with its
aggregation modes, asymmetric and dual clipping; the KL as a loss term; the clipped value loss),
explained variance, the KL controllers, running moments and the EMA update. Not here: the
advantage estimators, their registry and the per-prompt group statistics, which live in
`pipeline/estimators.py`.

Shapes: B = batch, R = response length, T = sequence length, V = vocab. Masks are float or bool
tensors of shape (B, R) holding 1 on real response tokens and 0 on padding. Masked-out positions
never influence results (their values may be anything, even NaN) and are returned as 0.
Per-token losses are normalised by a caller-supplied GLOBAL token count (`num_tokens`, the number
of response tokens in the whole mini-batch across all ranks), so that losses from shards of a
mini-batch add up to the full mini-batch loss.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

KL_ESTIMATORS = ("k1", "k2", "k3")
LOSS_AGG_MODES = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")


def _m(mask: Tensor) -> Tensor:
    return mask.bool()


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of x over positions where mask is 1. x, mask: same shape; dim None -> scalar."""
    z = torch.where(_m(mask), x, torch.zeros((), dtype=x.dtype, device=x.device))
    return z.sum() if dim is None else z.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of x over masked positions; 0 (not NaN) where the mask is empty."""
    total = masked_sum(x, mask, dim)
    count = masked_sum(torch.ones_like(x), mask, dim)
    return torch.where(count > 0, total / count.clamp_min(1), torch.zeros_like(total))


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Scalar variance of x over all masked positions
    (0 if too few positions: <2 unbiased, 0 biased)."""
    mean = masked_mean(x, mask)
    count = masked_sum(torch.ones_like(x), mask)
    sq = masked_sum((x - mean) ** 2, mask)
    denom = count - 1 if unbiased else count
    return torch.where(denom > 0, sq / denom.clamp_min(1), torch.zeros_like(sq))


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(x - mean) / sqrt(var + eps) with mean / unbiased var over masked positions only.

    With shift_mean=False the mean is added back (only the scale changes). Masked-out -> 0.
    Shape of x.
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(_m(mask), out, torch.zeros_like(out))


def sampling_logits(
    logits: Tensor,
    temperature: float = 1.0,
    eos_token_id: int | None = None,
    min_new_tokens: int = 0,
) -> Tensor:
    """The logits of the distribution the sampler drew each response token from: (B, R, V), position
    t predicting response token t -> (B, R, V) float32.

    As Hugging Face `generate` processes them (and TRL scores them): divided by the temperature
    (TemperatureLogitsWarper), and the EOS logit set to -inf at response positions t <
    min_new_tokens (MinNewTokensLengthLogitsProcessor). Every log-prob and entropy of the policy or
    the reference in PPO is of these logits, so pi_old, pi and the KL are those of the distribution
    that sampled. Temperature 1 and min_new_tokens 0 return the logits unchanged (bitwise).
    """
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    if min_new_tokens > 0:
        assert eos_token_id is not None, "min_new_tokens blocks the EOS token: give its id"
        early = torch.arange(logits.shape[1], device=logits.device) < min_new_tokens  # (R,)
        is_eos = torch.arange(logits.shape[-1], device=logits.device) == eos_token_id  # (V,)
        logits = logits.masked_fill(early[:, None] & is_eos[None, :], -math.inf)
    return logits


def logprobs_from_logits(logits: Tensor, labels: Tensor) -> Tensor:
    """log softmax(logits)[labels]: logits (B, T, V), labels (B, T) long -> (B, T) float32."""
    logits = logits.float()
    picked = logits.gather(-1, labels.long().unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy -sum_v p log p of softmax(logits): (B, T, V) -> (B, T) float32 (-inf logits
    allowed)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    p = logp.exp()
    # 0 log 0 = 0; the where sits on logp, not on p * logp, so that a -inf logit (EOS blocked by
    # min_new_tokens) gives a zero gradient instead of 0 * inf = NaN.
    return -(p * torch.where(p > 0, logp, torch.zeros_like(logp))).sum(-1)


def kl_estimate(logprobs: Tensor, ref_logprobs: Tensor, estimator: str) -> Tensor:
    """Per-token estimate of KL(pi || ref) from tokens sampled from pi: (B, R), (B, R) -> (B, R).

    k1 = log pi - log ref (unbiased, can be negative); k2 = 0.5 * (log ratio)^2 (biased, >= 0);
    k3 = (r - 1) - log r with r = ref / pi (unbiased, always >= 0).
    Source: J. Schulman, "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        # r - 1 - log r with log r = -log_ratio; expm1 keeps precision when r ~ 1.
        return torch.expm1(-log_ratio) + log_ratio
    allowed = ", ".join(KL_ESTIMATORS)
    raise ValueError(f"kl_estimate: unknown estimator {estimator!r}; allowed values: {allowed}")


def last_token_index(mask: Tensor) -> Tensor:
    """Index of the last 1 in each row of mask (B, R) -> (B,) long; -1 for rows without a 1."""
    B, R = mask.shape
    if R == 0:
        return torch.full((B,), -1, dtype=torch.long, device=mask.device)
    idx = torch.arange(R, device=mask.device).expand(B, R)
    return torch.where(_m(mask), idx, torch.full_like(idx, -1)).max(dim=-1).values


@torch.no_grad()
def shape_rewards(
    score: Tensor, kl: Tensor, response_mask: Tensor, kl_coef: float, score_clip: float | None
) -> Tensor:
    """Per-token rewards (B, R): -kl_coef * kl on masked tokens, plus the (clipped) sequence score
    (B,) added at the last real response token. Rows with an empty mask are all zero. Reward shaping
    with a per-token KL penalty: Ziegler et al. 2019; Ouyang et al. 2022 (InstructGPT).
    """
    rewards = -kl_coef * torch.where(_m(response_mask), kl, torch.zeros_like(kl))
    score = score.to(rewards.dtype)
    if score_clip is not None:
        score = score.clamp(-score_clip, score_clip)
    last = last_token_index(response_mask)
    add = torch.where(last >= 0, score, torch.zeros_like(score))
    return rewards.scatter_add(1, last.clamp_min(0).unsqueeze(1), add.unsqueeze(1))


def _denom(num_tokens: float | Tensor) -> float | Tensor:
    # Global token count; clamped to >= 1 so an empty mini-batch gives loss 0 instead of NaN.
    return (
        num_tokens.clamp_min(1) if isinstance(num_tokens, Tensor) else max(float(num_tokens), 1.0)
    )


def masked_token_mean_global(x: Tensor, mask: Tensor, num_tokens: float | Tensor) -> Tensor:
    """masked_sum(x, mask) / num_tokens (global token count): scalar. Used for the entropy bonus."""
    return masked_sum(x, mask) / _denom(num_tokens)


def aggregate_loss(
    per_token: Tensor,
    mask: Tensor,
    num_tokens: float | Tensor,
    agg_mode: str = "token_mean",
    num_seqs: float | Tensor = 1.0,
    norm_const: float = 1.0,
) -> Tensor:
    """A per-token loss (B, R) -> scalar, normalised by GLOBAL counts so that shards add up:
    token_mean: masked sum / num_tokens (every token of the mini-batch weighs the same; PPO);
    seq_mean_token_mean: sum over rows of each row's token mean / num_seqs (every response weighs
    the same; GRPO as published); seq_mean_token_sum_norm: sum over rows of each row's token sum /
    norm_const, / num_seqs (no per-response length normalisation, Dr. GRPO: norm_const = the
    generation budget). num_tokens, num_seqs: response tokens and rows of the whole mini-batch."""
    if agg_mode == "token_mean":
        return masked_sum(per_token, mask) / _denom(num_tokens)
    if agg_mode == "seq_mean_token_mean":
        return masked_mean(per_token, mask, dim=-1).sum() / _denom(num_seqs)
    if agg_mode == "seq_mean_token_sum_norm":
        return masked_sum(per_token, mask, dim=-1).sum() / norm_const / _denom(num_seqs)
    raise ValueError(
        f"aggregate_loss: unknown agg_mode {agg_mode!r}; allowed values: "
        f"{', '.join(LOSS_AGG_MODES)}"
    )


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    clip_eps: float,
    num_tokens: float | Tensor,
    *,
    clip_eps_high: float | None = None,
    dual_clip: float = 0.0,
    agg_mode: str = "token_mean",
    num_seqs: float | Tensor = 1.0,
    norm_const: float = 1.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate (Schulman et al. 2017, "Proximal Policy Optimization Algorithms",
    eq. 7).

    All inputs (B, R). ratio = exp(logprobs - old_logprobs);
    per-token loss = max(-A * ratio, -A * clip(ratio, 1 - clip_eps, 1 + clip_eps_high)),
    clip_eps_high defaulting to clip_eps (a larger one is DAPO's clip-higher, Yu et al. 2025).
    dual_clip c > 1 (0: off) caps the loss of negative-advantage tokens at -A * c, so a huge ratio
    cannot blow it up (dual-clip PPO, Ye et al. 2020). Aggregated by `aggregate_loss` (default:
    masked sum / num_tokens).
    Stats (detached scalars): clip_fraction (masked tokens where the clipped branch is active),
    dual_clip_fraction (where the dual clip is), approx_kl (masked mean of
    k3 = (ratio - 1) - log ratio, http://joschu.net/blog/kl-approx.html), ratio_mean.
    """
    # Zero the log ratio on padding so garbage there cannot overflow exp() and NaN the gradient.
    log_ratio = torch.where(_m(response_mask), logprobs - old_logprobs, torch.zeros_like(logprobs))
    ratio = torch.exp(log_ratio)
    high = clip_eps if clip_eps_high is None else clip_eps_high
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_eps, 1.0 + high)
    per_token = torch.maximum(unclipped, clipped)
    if dual_clip:
        capped = torch.minimum(per_token, -advantages * dual_clip)
        dual = (advantages < 0) & (capped < per_token)
        per_token = torch.where(advantages < 0, capped, per_token)
    loss = aggregate_loss(per_token, response_mask, num_tokens, agg_mode, num_seqs, norm_const)
    with torch.no_grad():
        stats = {
            "clip_fraction": masked_mean((clipped > unclipped).float(), response_mask),
            "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, response_mask),
            "ratio_mean": masked_mean(ratio, response_mask),
        }
        if dual_clip:
            stats["dual_clip_fraction"] = masked_mean(dual.float(), response_mask)
    return loss, {k: s.detach().float() for k, s in stats.items()}


def kl_penalty_loss(
    logprobs: Tensor,
    ref_logprobs: Tensor,
    response_mask: Tensor,
    estimator: str,
    num_tokens: float | Tensor,
    agg_mode: str = "token_mean",
    num_seqs: float | Tensor = 1.0,
    norm_const: float = 1.0,
) -> Tensor:
    """The KL to the reference as a loss term (GRPO, Shao et al. 2024, eq. 4, with k3): kl_estimate
    of the CURRENT policy's log-probs (differentiable) against the reference's, (B, R) each,
    aggregated like the policy loss. The caller multiplies it by beta. k1 is refused by the config:
    its gradient is zero in expectation on samples of the policy."""
    # Padding: log ratio 0 (so k = 0 and no exp() overflow whose 0 x inf gradient would be NaN).
    lp = torch.where(_m(response_mask), logprobs, ref_logprobs.to(logprobs.dtype))
    kl = kl_estimate(lp, ref_logprobs.to(logprobs.dtype), estimator)
    return aggregate_loss(kl, response_mask, num_tokens, agg_mode, num_seqs, norm_const)


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    response_mask: Tensor,
    num_tokens: float | Tensor,
    clip_range: float | None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Value-function loss 0.5 * (V - R)^2, optionally clipped around old_values
    (all inputs (B, R)).

    With clip_range c: V_clip = old + clamp(V - old, -c, c),
    per-token 0.5 * max((V-R)^2, (V_clip-R)^2)
    (value clipping as in OpenAI baselines PPO2 / Ziegler et al. 2019).
    loss = masked sum / num_tokens.
    Stats (detached scalars): value_clip_fraction (0 without clipping), values_mean.
    """
    unclipped = (values - returns) ** 2
    if clip_range is None:
        per_token = unclipped
        clip_frac = torch.zeros((), dtype=torch.float32, device=values.device)
    else:
        v_clip = old_values + (values - old_values).clamp(-clip_range, clip_range)
        clipped = (v_clip - returns) ** 2
        per_token = torch.maximum(unclipped, clipped)
        clip_frac = masked_mean((clipped > unclipped).float(), response_mask)
    loss = 0.5 * masked_sum(per_token, response_mask) / _denom(num_tokens)
    stats = {"value_clip_fraction": clip_frac, "values_mean": masked_mean(values, response_mask)}
    return loss, {k: s.detach().float() for k, s in stats.items()}


@torch.no_grad()
def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """1 - Var[R - V] / Var[R] over masked positions (B, R) -> 0-dim float tensor.

    1 = perfect prediction, 0 = no better than a constant. Returns 0.0 when Var[R] == 0 (undefined).
    """
    var_r = masked_var(returns, mask, unbiased=False)
    var_d = masked_var(returns - values, mask, unbiased=False)
    safe = var_r.clamp_min(torch.finfo(var_r.dtype).tiny)
    ev = torch.where(var_r > 0, 1 - var_d / safe, torch.zeros_like(var_r))
    return ev.float()


class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019, "Fine-Tuning Language Models from Human
    Preferences", sec. 2.2): e = clip(KL / target - 1, -0.2, 0.2);
    beta <- beta * (1 + e * min(n_steps / horizon, 1)).
    The step share is capped at 1 so that one update moves beta by at most 20% (a rollout larger
    than the horizon would otherwise drive beta to 0 or double it at once).
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float) -> None:
        self.value, self.target, self.horizon = float(init_kl_coef), float(target), float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * min(n_steps / self.horizon, 1.0)

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, d: dict[str, float]) -> None:
        self.value, self.target, self.horizon = (
            float(d["value"]),
            float(d["target"]),
            float(d["horizon"]),
        )


class FixedKLController:
    """Constant KL coefficient with the AdaptiveKLController interface; update() does nothing."""

    def __init__(self, kl_coef: float) -> None:
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, d: dict[str, float]) -> None:
        self.value = float(d["value"])


class RunningMoments:
    """Running mean / std of all scalars seen so far (e.g. for reward normalisation).

    Batches are merged with the parallel variance formula of Chan, Golub & LeVeque (1979). Before
    any update mean = 0, std = 1, count = 0. `std` is the unbiased (n - 1) standard deviation.
    """

    def __init__(self) -> None:
        self.mean, self.std, self.count = 0.0, 1.0, 0
        self._m2 = 0.0  # sum of squared deviations from the mean

    def update(self, x: Tensor) -> tuple[float, float]:
        """Merge the values of x (any shape, non-empty); returns (batch mean, unbiased batch
        std)."""
        xs = x.detach().double().flatten()
        n = xs.numel()
        if n == 0:
            raise ValueError("RunningMoments.update: empty tensor")
        b_mean = xs.mean().item()
        b_m2 = ((xs - b_mean) ** 2).sum().item()
        tot = self.count + n
        delta = b_mean - self.mean
        self._m2 += b_m2 + delta**2 * self.count * n / tot
        self.mean += delta * n / tot
        self.count = tot
        self.std = math.sqrt(self._m2 / (tot - 1)) if tot > 1 else 0.0
        return b_mean, (math.sqrt(b_m2 / (n - 1)) if n > 1 else 0.0)

    def state_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "std": self.std, "count": self.count, "m2": self._m2}

    def load_state_dict(self, d: dict[str, float]) -> None:
        self.mean, self.std = float(d["mean"]), float(d["std"])
        self.count, self._m2 = int(d["count"]), float(d["m2"])


@torch.no_grad()
def ema_update_(ema: Tensor, weights: Tensor, beta: float) -> Tensor:
    """ema <- beta * ema + (1 - beta) * weights, in place (DeepSpeed-Chat's `--enable_ema`, there
    with beta = 0.992). `ema` keeps its dtype (float32 for an EMA of bf16/fp16 weights); same
    shapes."""
    return ema.mul_(beta).add_(weights.to(ema.dtype), alpha=1.0 - beta)
