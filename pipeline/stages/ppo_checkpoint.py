"""What a PPO run carries across a restart and leaves behind, as functions of a `PPOTrainer`.

Here: the trainer's resumable state (`trainer_state`, `load_trainer_state`: KL controller, score
moments, bookkeeping of ppo_eval and ppo_reward, PTX order), the checkpoint when it is due (the
trained engines, the loop's and the trainer's state as JSON, this rank's EMA shard), the resume
from one (EMA shards re-cut for another rank count), and the final `model` and `model_ema`.
Not here: the checkpoint files, their verification and the choice of checkpoint to resume from
(pipeline/checkpoint.py), the phases and the loop that calls these (pipeline/stages/ppo.py).
"""

from __future__ import annotations

import logging
import shutil
from typing import TYPE_CHECKING

from pipeline.distributed import zero3
from pipeline.models import lora_merge
from pipeline.stages.common import StageContext
from pipeline.stages.ppo_setup import PromptOrder

if TYPE_CHECKING:
    from pipeline.stages.ppo import PPOTrainer

log = logging.getLogger("pipeline.stages.ppo")  # the resume line reads as the stage's own


def init_bookkeeping(t: PPOTrainer) -> None:
    """The fresh run's values of the resumable state that is not the KL controller's or the score
    moments' (those are built with the trainer)."""
    t.nonfinite_in_a_row = 0
    t.sft_eval: list[float] | None = None  # step-0 gold score per eval prompt (win rate)
    # Ensemble members are put on one scale: (score - mean) / std of each member over the first
    # scored batch, the SFT policy's responses to the held-out prompts (the step-0 evaluation).
    t.member_norm: list[list[float]] | None = None  # K x [mean, std]
    t.best: dict | None = None  # ppo.select_best: {"iteration", "value"} of model_best
    t.alarms = {"kl_iterations": 0, "ensemble_evaluations": 0, "kl_on": False}
    # PPO-ptx rows are drawn in their own seeded order, a global mini-batch per optimizer step.
    t.ptx_order = PromptOrder(len(t.ptx), t.cfg.seed + 1) if t.ptx else None


def trainer_state(t: PPOTrainer) -> dict:
    """What a resumed run needs besides the engines and the EMA (JSON)."""
    s = {
        "kl_ctl": t.kl_ctl.state_dict(),
        "score_moments": t.score_moments.state_dict(),
        "nonfinite_in_a_row": t.nonfinite_in_a_row,
        "sft_eval": t.sft_eval,
        "member_norm": t.member_norm,
        "best": t.best,
        "alarms": t.alarms,
    }
    return {**s, "ptx_order": t.ptx_order.state_dict()} if t.ptx_order else s


def load_trainer_state(t: PPOTrainer, s: dict) -> None:
    t.kl_ctl.load_state_dict(s["kl_ctl"])
    t.score_moments.load_state_dict(s["score_moments"])
    t.nonfinite_in_a_row, t.sft_eval = s["nonfinite_in_a_row"], s["sft_eval"]
    t.member_norm, t.best = s.get("member_norm"), s.get("best")
    t.alarms = s.get("alarms", t.alarms)
    if t.ptx_order:
        t.ptx_order.load_state_dict(s["ptx_order"])


def trained_engines(t: PPOTrainer) -> dict:
    return {name: e for name, e in (("actor", t.actor), ("critic", t.critic)) if e is not None}


def checkpoint(
    t: PPOTrainer,
    ctx: StageContext,
    step: int,
    first: dict,
    last_eval: dict,
    metrics: dict,
    order: PromptOrder,
) -> None:
    """A checkpoint when it is due (ctx.end_of_step): the engines, the loop's state (the step-0 and
    the latest evaluation, the latest metrics, the prompt order) and the trainer's (JSON, every
    rank the same), this rank's EMA shard."""
    loop = {
        "step": step,
        "first_eval": first,
        "last_eval": last_eval,
        "last_metrics": metrics,
        "order": order.state_dict(),
    }
    ctx.end_of_step(
        step,
        step == t.p.num_iterations,
        trained_engines(t),
        lambda: (
            {**loop, "trainer": trainer_state(t)},
            {"ema": t.ema.state_dict()} if t.ema else {},
        ),
    )


def resume(t: PPOTrainer, ctx: StageContext, order: PromptOrder) -> tuple[int, dict, dict, dict]:
    """Engines, EMA, trainer state and the prompt `order` from `ctx.resume`; returns the loop's
    state: the step, the step-0 and the latest evaluation, the latest metrics."""
    # (No random states to restore: PPO's draws are seeded.)
    local = ctx.checkpointer.load(ctx.resume, trained_engines(t))
    if t.ema is not None:  # per-rank shards; from another rank count, re-cut
        if local is not None:
            t.ema.load_state_dict(local["ema"])
        else:
            t.ema.load_resharded([old["ema"] for old in ctx.checkpointer.every_local(ctx.resume)])
    s = ctx.resume.state
    load_trainer_state(t, s["trainer"])
    order.load_state_dict(s["order"])
    log.info(
        "stage ppo: resuming from iteration %d of %d (checkpoint %s, written by %d rank(s))",
        s["step"],
        t.p.num_iterations,
        ctx.resume.path,
        ctx.resume.world_size,
    )
    return s["step"], s["first_eval"], s["last_eval"], s["last_metrics"]


def save(t: PPOTrainer) -> None:
    """The final policy `model` (and `model_ema`), LoRA adapters merged: plain models of the base
    architecture."""
    merge, d, out = lora_merge(t.actor.module), t.d, t.stage_dir
    zero3.save_hf(t.actor.module, t.tokenizer, out / "model", d.rank, merge=merge)
    if t.ema is not None:
        zero3.save_hf(
            t.actor.module, t.tokenizer, out / "model_ema", d.rank, ema=t.ema, merge=merge
        )
    elif d.is_main:  # not a stale EMA from an earlier run next to this run's model
        shutil.rmtree(out / "model_ema", ignore_errors=True)
