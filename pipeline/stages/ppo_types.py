"""The typed containers between the PPO stage's phases (pipeline/stages/ppo.py).

`Experience`: one rollout on this rank, filled phase by phase (generate, score, advantages).
`UpdateStats`: one mini-batch's update statistics, logged as ppo/<field>. Not here: the phases
that fill them, and the math (pipeline/ppo_math.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from pipeline.distributed import collectives


@dataclass(frozen=True)
class Experience:
    """One rollout on this rank, filled phase by phase (fields of later phases start as None)."""

    sequences: torch.Tensor  # (B, P+R) prompt (left-padded) + response (right-padded)
    attention_mask: torch.Tensor  # (B, P+R)
    response_mask: torch.Tensor  # (B, R) 1 up to and including EOS
    old_logprobs: torch.Tensor  # (B, R) pi_old, recorded at generation
    prompt_width: int  # P
    prompts: list  # B prompt strings (for the gold scorer and samples)
    group_ids: torch.Tensor | None = (
        None  # (B,) long: the prompt's index on this rank, shared by its samples
    )
    ref_logprobs: torch.Tensor | None = None  # (B, R)
    responses: list | None = None  # B decoded response strings (reward functions, gold, samples)
    rm_scores: torch.Tensor | None = None  # (K, B) raw score of each reward model of the ensemble
    fn_scores: torch.Tensor | None = None  # (B,) ppo.reward_fn
    scores: torch.Tensor | None = (
        None  # (B,) the sequence reward: reward models and reward_fn combined
    )
    old_values: torch.Tensor | None = (
        None  # (B, R) critic V(s_t) before each response token (None: no critic)
    )
    prompt_values: torch.Tensor | None = (
        None  # (B,) critic V at the prompt's last token (None: no critic)
    )
    rewards: torch.Tensor | None = None  # (B, R) shaped: -beta KL_t, + score at the last token
    advantages: torch.Tensor | None = None  # (B, R)
    returns: torch.Tensor | None = None  # (B, R)


@dataclass
class UpdateStats:
    """One mini-batch's update statistics, summed over its micro-batches and then over the ranks:
    the losses as they enter the gradient (each micro-batch's is its share of the global loss), and
    the per-token stats of ppo_math.policy_loss / value_loss weighted by the micro-batch's share of
    the mini-batch's tokens. None: not computed by this run; adding to it (or to a name that is not
    a field) raises, so no stat the losses return goes unlogged."""

    policy_loss: float = 0.0
    entropy: float = 0.0
    clip_fraction: float = 0.0
    approx_kl: float = 0.0  # k3 of pi to pi_old
    ratio_mean: float = 0.0  # pi / pi_old
    value_loss: float | None = None  # with a critic
    value_clip_fraction: float | None = None
    values_mean: float | None = None  # V(s_t) of the critic being trained
    kl_loss: float | None = None  # ppo.kl_penalty loss
    dual_clip_fraction: float | None = None  # ppo.dual_clip
    ptx_loss: float | None = None  # ppo.ptx_coef

    @classmethod
    def tracking(cls, critic: bool, kl_loss: bool, dual_clip: bool, ptx: bool) -> UpdateStats:
        def on(x: bool) -> float | None:
            return 0.0 if x else None

        return cls(
            value_loss=on(critic),
            value_clip_fraction=on(critic),
            values_mean=on(critic),
            kl_loss=on(kl_loss),
            dual_clip_fraction=on(dual_clip),
            ptx_loss=on(ptx),
        )

    def add(self, name: str, value: float) -> None:
        setattr(self, name, getattr(self, name) + value)

    def add_token_stats(self, stats: dict[str, torch.Tensor], share: float) -> None:
        for name, v in stats.items():
            self.add(name, v.item() * share)

    def all_reduced(self) -> dict[str, float]:
        """The tracked stats summed over ranks (one collective), by name."""
        names = [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None]
        summed = collectives.all_reduce_sum(
            torch.tensor([getattr(self, n) for n in names], dtype=torch.float64)
        )
        return {n: float(v) for n, v in zip(names, summed)}
