"""What the PPO stage measures and reports, as functions of a `PPOTrainer`.

Here: the metrics of an iteration (rollout, engines, timers, throughput), the evaluation on the
held-out prompts (reward and gold score, win rate against the step-0 SFT policy), the
over-optimisation alarms (KL to the reference, ensemble disagreement), model_best (ppo.select_best)
and the stage's summary. They read the trainer's phases (`generate`, `score`) and keep its
bookkeeping state (`sft_eval`, `best`, `alarms`: started and checkpointed in ppo_checkpoint.py).
Not here: the phases themselves (pipeline/stages/ppo.py), construction
(pipeline/stages/ppo_setup.py).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from typing import TYPE_CHECKING

import torch

from pipeline import estimators, ppo_math
from pipeline.distributed import collectives, zero3
from pipeline.distributed.collectives import global_mean as _global_mean
from pipeline.models import lora_merge
from pipeline.monitoring import PhaseTimer, overoptimisation_plot, peak_rss_gb
from pipeline.stages import ppo_reward
from pipeline.stages.common import StageContext

if TYPE_CHECKING:
    from pipeline.stages.ppo import Experience, PPOTrainer

log = logging.getLogger(__name__)
ENSEMBLE_ALARM_RATIO = (
    2.0  # alarm when the ensemble disagrees this many times as much as on the SFT policy
)


# ------------------------------------------------------------ metrics of an iteration
def rollout_metrics(t: PPOTrainer, exp: Experience) -> dict:
    m = exp.response_mask
    lengths = m.sum(1).float()
    seq_kl = (ppo_math.kl_estimate(exp.old_logprobs, exp.ref_logprobs, "k3") * m).sum(1)
    truncated = (exp.sequences[:, -1] != t.tokenizer.eos_token_id) & (m[:, -1] == 1)
    score_mean = _global_mean(exp.scores)
    out = {
        "rollout/score_mean": score_mean,
        "rollout/score_std": math.sqrt(max(_global_mean(exp.scores**2) - score_mean**2, 0.0)),
        "rollout/reward_mean": _global_mean(exp.rewards.sum(1)),
        "rollout/kl_to_ref": _global_mean(seq_kl),
        "rollout/ref_nll": collectives.masked_global_mean(-exp.ref_logprobs, m),
        "rollout/response_length_mean": _global_mean(lengths),
        "rollout/truncated_fraction": _global_mean(truncated.float()),
        "ppo/advantage_mean": _global_mean(ppo_math.masked_mean(exp.advantages, m, dim=1)),
        "ppo/return_mean": _global_mean(ppo_math.masked_mean(exp.returns, m, dim=1)),
        **ensemble_metrics(t, exp, "rollout"),
    }
    if exp.old_values is not None:
        out["ppo/value_explained_variance"] = _global_mean(
            ppo_math.explained_variance(exp.old_values, exp.returns, m)[None]
        )
    if t.p.num_samples_per_prompt > 1:  # groups of responses to one prompt (each on one rank)
        all_equal, std = estimators.group_score_metrics(exp.scores, exp.group_ids)
        out["rollout/group_all_equal_fraction"] = _global_mean(all_equal)
        out["rollout/group_score_std"] = _global_mean(std)
    if exp.fn_scores is not None and exp.rm_scores is not None:  # the two parts of the score
        out["rollout/reward_fn_mean"] = _global_mean(exp.fn_scores)
    return out


def ref_nll_alarm(t: PPOTrainer, step: int, nll: float) -> dict:
    """alarm/ref_nll_ratio: the rollout's per-token NLL under the reference over its first value;
    a warning when it first goes above ppo.ref_nll_limit (the constraint then acts)."""
    ratio = t.ref_nll.ratio(nll)
    if ratio > t.p.ref_nll_limit and not t.alarms.get("ref_nll_on"):
        log.warning(
            "iteration %d: the policy's responses are %.2fx less likely under the reference than "
            "at the start (per-token NLL %.3f), above ppo.ref_nll_limit=%.2f: it is leaving what "
            "the reward model was trained on; the penalty on -log ref now grows until it is back.",
            step,
            ratio,
            nll,
            t.p.ref_nll_limit,
        )
    t.alarms["ref_nll_on"] = ratio > t.p.ref_nll_limit
    t.alarms["ref_nll_iterations"] = t.alarms.get("ref_nll_iterations", 0) + int(
        t.alarms["ref_nll_on"]
    )
    return {"alarm/ref_nll_ratio": ratio}


def ensemble_metrics(t: PPOTrainer, exp: Experience, phase: str) -> dict:
    """Disagreement of the reward-model ensemble (std over members, normalised units) and its
    lower confidence bound mean - std: the over-optimisation signals of Coste et al. (2023)."""
    if exp.rm_scores is None or len(exp.rm_scores) < 2:
        return {}
    z = ppo_reward.normalised(t, exp.rm_scores)
    std = z.std(0)
    return {
        f"{phase}/ensemble_std": _global_mean(std),
        f"{phase}/reward_lcb": _global_mean(z.mean(0) - std),
    }


def engine_and_time_metrics(t: PPOTrainer, exp: Experience, timer: PhaseTimer) -> dict:
    """Learning rates and gradient norms of the trained engines, seconds per phase, throughput,
    memory."""
    metrics = {}
    for name, engine in (("actor", t.actor), ("critic", t.critic)):
        if engine is None:
            continue
        metrics[f"ppo/{name}_lr"] = engine.get_lr()[0]
        norm = engine.get_global_grad_norm()
        if norm is not None:
            metrics[f"ppo/{name}_grad_norm"] = float(norm)
    for k, v in timer.seconds.items():
        metrics[f"time/{k}"] = v
    metrics["time/step"] = sum(timer.seconds.values())
    tokens = collectives.all_reduce_sum(exp.response_mask.sum().float()).item()
    metrics["perf/tokens_per_second"] = tokens / max(metrics["time/step"], 1e-9)
    metrics["memory/peak_rss_gb"] = peak_rss_gb()
    metrics.update(timer.memory_metrics())  # accelerator memory per phase (none on CPU)
    return metrics


def kl_alarm(t: PPOTrainer, step: int, kl: float) -> dict:
    """alarm/kl_to_ref: the rollout's KL to the reference (rollout/kl_to_ref, k3 per response)
    above ppo.kl_alarm (or 2 x target_kl)."""
    if not t.kl_alarm:
        return {}
    on = kl > t.kl_alarm
    if on and not t.alarms["kl_on"]:
        log.warning(
            "iteration %d: over-optimisation alarm: KL to the reference is %.2f nats, above %.2f "
            "(ppo.kl_alarm). The policy is leaving what the reward model was trained on; watch "
            "eval/gold_score, raise ppo.kl_coef or lower ppo.target_kl.",
            step,
            kl,
            t.kl_alarm,
        )
    t.alarms["kl_on"] = on
    t.alarms["kl_iterations"] += int(on)
    return {"alarm/kl_to_ref": float(on)}


# ------------------------------------------------------------ evaluation on held-out prompts
@torch.no_grad()
def _eval_rollout(t: PPOTrainer) -> tuple[list[int], Experience]:
    """This rank's share of the held-out prompts (their indices), sampled with a fixed seed and
    scored."""
    idx = list(range(t.d.rank, len(t.eval_prompts), t.d.world_size))
    n = math.ceil(len(t.eval_prompts) / t.d.world_size)
    idx = idx + idx[: n - len(idx)]  # equal counts on every rank (ZeRO-3 forwards are collective)
    mine = [t.eval_prompts[i] for i in idx]
    return idx, t.score(t.generate(mine, t.cfg.seed + 7 + t.d.rank, t.sampling))


def calibrate(t: PPOTrainer) -> None:
    """Without evaluation (ppo.eval_steps 0): the step-0 pass over the held-out prompts that fixes
    the reward models' scale (score_norm sft, an ensemble's members; see ppo_reward.normalised)
    still runs, unlogged, so the rewards, and so training, are those of a run with evaluation."""
    if t.rewards and (len(t.rewards) > 1 or t.p.score_norm == "sft"):
        _eval_rollout(t)


@torch.no_grad()
def evaluate(t: PPOTrainer, step: int) -> tuple[dict, list]:
    """Held-out prompts, fixed-seed sampling: gold and RM score, KL to reference, length."""
    idx, exp = _eval_rollout(t)
    m = exp.response_mask
    seq_kl = (ppo_math.kl_estimate(exp.old_logprobs, exp.ref_logprobs, "k3") * m).sum(1)
    metrics = {
        "eval/reward_score": _global_mean(exp.scores),
        "eval/kl_to_ref": _global_mean(seq_kl),
        "eval/response_length_mean": _global_mean(m.sum(1).float()),
        **ensemble_metrics(t, exp, "eval"),
    }
    if exp.rm_scores is not None:  # as the reward model(s) output it, before normalisation
        metrics["eval/reward_model_raw"] = _global_mean(exp.rm_scores.mean(0))
    samples = list(zip(exp.prompts, exp.responses, exp.scores.tolist()))
    if t.gold is not None:
        gold = exp.sequences.new_tensor(ppo_reward.call_user_fn(t.gold, exp), dtype=torch.float64)
        metrics["eval/gold_score"] = _global_mean(gold)
        if t.sft_eval is None:  # step 0: the SFT policy's gold score per held-out prompt
            t.sft_eval = [0.0] * len(t.eval_prompts)
            for part in collectives.all_gather_object(list(zip(idx, gold.tolist()))):
                for i, g in part:
                    t.sft_eval[i] = g
        baseline = gold.new_tensor([t.sft_eval[i] for i in idx])  # on gold's device
        wins = (gold > baseline).double() + 0.5 * (gold == baseline).double()
        metrics["eval/win_rate_vs_sft"] = _global_mean(wins)
        samples = [(*s, g) for s, g in zip(samples, gold.tolist())]
    return metrics, samples


def after_evaluation(t: PPOTrainer, step: int, metrics: dict, first: dict) -> dict:
    """The ensemble alarm, and model_best (ppo.select_best) when this evaluation is the best yet."""
    out = {}
    if "eval/ensemble_std" in metrics:
        ratio = metrics["eval/ensemble_std"] / max(first["eval/ensemble_std"], 1e-9)
        out = {"alarm/ensemble_std_ratio": ratio}
        if ratio > ENSEMBLE_ALARM_RATIO:
            t.alarms["ensemble_evaluations"] += 1
            log.warning(
                "iteration %d: over-optimisation alarm: the reward models disagree %.1fx as much "
                "on this policy's held-out responses as on the SFT policy's: the policy reaches "
                "outputs they were not trained on. Compare eval/gold_score, raise "
                "ppo.ensemble_penalty or stop here.",
                step,
                ratio,
            )
    metric = t.p.select_best
    if metric and (t.best is None or metrics[metric] > t.best["value"]):
        t.best = {"iteration": step, "metric": metric, "value": metrics[metric]}
        folder = t.stage_dir / "model_best"
        zero3.save_hf(
            t.actor.module, t.tokenizer, folder, t.d.rank, merge=lora_merge(t.actor.module)
        )
        if t.d.is_main:
            (folder / "best.json").write_text(json.dumps(t.best, indent=2))
        log.info(
            "iteration %d: best %s so far (%.4f): policy saved to %s",
            step,
            metric,
            metrics[metric],
            folder,
        )
    return out


def samples_text(samples: list, k: int = 4) -> str:
    lines = ["| prompt | response | score | gold |", "|---|---|---|---|"]
    for s in samples[:k]:
        gold = f"{s[3]:.3f}" if len(s) > 3 else "-"
        lines.append(f"| {s[0]} | {s[1]} | {s[2]:.3f} | {gold} |")
    return "\n".join(lines)


# ------------------------------------------------------------ the stage's summary
def stage_result(
    t: PPOTrainer, ctx: StageContext, first: dict, last_eval: dict, metrics: dict
) -> dict:
    """The summary of the stage (summary.json), and the over-optimisation plot; with evaluation off
    (`first` empty) no evaluation fields. Removes an earlier run's plot or model_best this run did
    not write."""
    p, d = ctx.cfg.ppo, ctx.dist
    if d.is_main:
        rows = [
            json.loads(line) for line in (ctx.stage_dir / "metrics.jsonl").read_text().splitlines()
        ]
        if not overoptimisation_plot(
            rows, ctx.stage_dir / "overoptimisation.png"
        ):  # e.g. evaluation off
            (ctx.stage_dir / "overoptimisation.png").unlink(
                missing_ok=True
            )  # not an earlier run's plot
    evaluated = (
        {
            "reward_score_sft": first["eval/reward_score"],
            "reward_score_final": last_eval["eval/reward_score"],
            "kl_to_ref": last_eval["eval/kl_to_ref"],
        }
        if p.eval_steps > 0
        else {}
    )
    result = {
        **evaluated,
        "iterations": p.num_iterations,
        "seconds_per_iteration": metrics.get("time/step", float("nan")),
        **{f"time_{k.split('/')[1]}": v for k, v in metrics.items() if k.startswith("time/")},
    }
    if "eval/gold_score" in first:
        result.update(
            gold_score_sft=first["eval/gold_score"],
            gold_score_final=last_eval["eval/gold_score"],
            gold_win_rate_vs_sft=last_eval["eval/win_rate_vs_sft"],
        )
    if "eval/ensemble_std" in first:
        result.update(
            ensemble_std_sft=first["eval/ensemble_std"],
            ensemble_std_final=last_eval["eval/ensemble_std"],
        )
    a = t.alarms
    result.update(
        alarm_kl_iterations=a["kl_iterations"], alarm_ensemble_evaluations=a["ensemble_evaluations"]
    )
    if t.p.ref_nll_limit:
        result["alarm_ref_nll_iterations"] = a.get("ref_nll_iterations", 0)
    if t.best is not None:
        result.update(best_iteration=t.best["iteration"], best_value=t.best["value"])
    elif d.is_main:  # not a stale model_best of an earlier run next to this run's model
        shutil.rmtree(ctx.stage_dir / "model_best", ignore_errors=True)
    return result
