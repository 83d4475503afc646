"""The sequence reward of a PPO rollout (the score phase's reward part), as functions of a
`PPOTrainer`.

Here: the reward models' scores (read where HF's sequence classifier pools; the rollout re-encoded
when a reward model has a tokenizer of its own), user reward functions run on every rank, the
ensemble's members put on one scale (the trainer's `member_norm`, fixed by the first scored batch),
and their combination with ppo.reward_fn into one score per row. Not here: the KL penalty and the
advantages (pipeline/ppo_math.py, `PPOTrainer.advantages`), the reward functions themselves
(pipeline/reward_fns.py).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from pipeline import data, reward_fns
from pipeline.distributed import collectives, engines
from pipeline.errors import SharedUserError, UserError
from pipeline.generation import position_ids
from pipeline.models import score_index, token_values

if TYPE_CHECKING:
    from pipeline.stages.ppo import Experience, PPOTrainer

log = logging.getLogger(__name__)


def reward_model_scores(t: PPOTrainer, exp: Experience) -> torch.Tensor:
    """Each reward model's raw score of each row: (K, B)."""
    r_ids, r_mask = reward_inputs(t, exp)
    return torch.stack(
        [
            _rm_scores(t, engine, pad_id, r_ids, r_mask)
            for engine, pad_id in zip(t.rewards, t.reward_pad_ids)
        ]
    )


def _rm_scores(
    t: PPOTrainer, engine, pad_id, r_ids: torch.Tensor, r_mask: torch.Tensor
) -> torch.Tensor:
    """One reward model's score of each row, read where HF's sequence classifier pools: (B,)."""
    scores = []
    for s in t.micro_slices(len(r_ids), t.forward_rows):
        v = engines.forward(engine, token_values, r_ids[s], r_mask[s], position_ids(r_mask[s]))
        scores.append(v.gather(1, score_index(r_ids[s], r_mask[s], pad_id)[:, None]).squeeze(1))
    return torch.cat(scores)


def reward_inputs(t: PPOTrainer, exp: Experience) -> tuple[torch.Tensor, torch.Tensor]:
    """The rollout as the reward model reads it: same ids, or decoded and re-encoded text."""
    if t.same_tokenizer:
        return exp.sequences, exp.attention_mask
    responses = [
        exp.sequences[i, exp.prompt_width :][exp.response_mask[i].bool()].tolist()
        for i in range(len(exp.prompts))
    ]  # token ids: re-encoded with the RM's tokenizer
    ids, mask = data.reencode(
        exp.prompts,
        responses,
        t.tokenizer,
        t.reward_tokenizer,
        t.cfg.data.max_prompt_len,
        4 * t.sampling.max_new_tokens,
    )
    return ids.to(collectives.device()), mask.to(collectives.device())


def call_user_fn(fn: reward_fns.ScoreFn, exp: Experience) -> list[float]:
    """A user function on this rank's rows; a failure on any rank stops every rank with its
    message."""
    try:
        values, error = fn(exp.prompts, exp.responses), None
    except UserError as e:
        values, error = None, str(e)
    errors = [e for e in collectives.all_gather_object(error) if e]
    if errors:
        raise SharedUserError(errors[0])
    return values


def combine(t: PPOTrainer, exp: Experience) -> torch.Tensor:
    """The sequence reward (B,): reward_model_coef x the reward models' score (an ensemble's
    members normalised, mean - ensemble_penalty x std) + reward_fn_coef x reward_fn."""
    p = t.p
    total = torch.zeros(len(exp.prompts), device=exp.sequences.device)
    if exp.rm_scores is not None:
        rm = exp.rm_scores
        if len(rm) > 1:
            z = normalised(t, rm)
            rm = (z.mean(0) - p.ensemble_penalty * z.std(0))[None]
        elif p.score_norm == "sft":
            rm = normalised(t, rm)
        total = total + p.reward_model_coef * rm[0]
    if exp.fn_scores is not None:
        total = total + p.reward_fn_coef * exp.fn_scores
    return total


def normalised(t: PPOTrainer, rm_scores: torch.Tensor) -> torch.Tensor:
    """(K, B) reward-model scores in units of the SFT policy's: the first call (the step-0
    evaluation) fixes each model's mean and std over every rank's rows. An ensemble's members
    need it to be compared (a pairwise loss leaves each model's offset and scale free)."""
    if t.member_norm is None:
        everyone = rm_scores.new_tensor(
            [v for part in collectives.all_gather_object(rm_scores.T.tolist()) for v in part],
            dtype=torch.float64,
        ).T  # (K, rows of every rank)
        t.member_norm = [
            [m, max(sd, 1e-6)] for m, sd in zip(everyone.mean(1).tolist(), everyone.std(1).tolist())
        ]
        log.info(
            "reward model scores normalised by (mean, std) %s of the SFT policy's held-out "
            "responses",
            [tuple(round(x, 4) for x in ms) for ms in t.member_norm],
        )
    norm = rm_scores.new_tensor(t.member_norm)  # (K, 2)
    return (rm_scores - norm[:, :1]) / norm[:, 1:]
