"""How the PPO stage turns reward models and reward functions into one sequence reward, and its
over-optimisation alarms (pipeline/stages/ppo_reward.py: combine, normalised; ppo_eval.py: kl_alarm,
after_evaluation), on a trainer holding only what those read (one process, world size 1)."""

import logging
from types import SimpleNamespace

import pytest
import torch

from pipeline.distributed import collectives
from pipeline.errors import UserError
from pipeline.ppo_math import kl_estimate
from pipeline.reward_fns import ScoreFn
from pipeline.stages import ppo_eval, ppo_reward
from pipeline.stages.ppo import PPOTrainer
from pipeline.stages.ppo_types import Experience


@pytest.fixture(scope="module", autouse=True)
def one_rank():
    collectives.init_distributed()


def _trainer(**ppo) -> PPOTrainer:
    t = object.__new__(PPOTrainer)
    defaults = dict(
        reward_model_coef=1.0,
        reward_fn_coef=1.0,
        ensemble_penalty=0.0,
        score_norm="none",
        select_best="",
        target_kl=1.0,
        adaptive_kl=False,
        kl_alarm=0.0,
    )
    t.p = SimpleNamespace(**{**defaults, **ppo})
    t.d = SimpleNamespace(rank=0, world_size=1, is_main=True)
    t.member_norm, t.best = None, None
    t.alarms = {"kl_iterations": 0, "ensemble_evaluations": 0, "kl_on": False}
    t.kl_alarm = t.p.kl_alarm or (2 * t.p.target_kl if t.p.adaptive_kl else 0.0)
    return t


def _exp(rm=None, fn=None, n=4, logprob_gap=0.0) -> Experience:
    mask = torch.ones(n, 3)
    old = torch.zeros(n, 3)
    return Experience(
        torch.zeros(n, 5, dtype=torch.long),
        torch.ones(n, 5),
        mask,
        old,
        2,
        ["p"] * n,
        ref_logprobs=old - logprob_gap,
        responses=["r"] * n,
        rm_scores=None if rm is None else torch.tensor(rm),
        fn_scores=None if fn is None else torch.tensor(fn),
    )


def test_one_reward_model_raw_score_times_its_coefficient_plus_the_function():
    t = _trainer(reward_model_coef=2.0, reward_fn_coef=0.5)
    scores = ppo_reward.combine(t, _exp(rm=[[1.0, -1.0, 3.0, 0.0]], fn=[2.0, 2.0, 0.0, -4.0]))
    torch.testing.assert_close(scores, torch.tensor([3.0, -1.0, 6.0, -2.0]))
    assert t.member_norm is None  # raw: nothing normalised


def test_reward_function_alone():
    t = _trainer(reward_fn_coef=3.0)
    torch.testing.assert_close(
        ppo_reward.combine(t, _exp(fn=[1.0, 0.0, -1.0, 2.0])), torch.tensor([3.0, 0.0, -3.0, 6.0])
    )


def test_sft_normalisation_is_fixed_by_the_first_batch():
    t = _trainer(score_norm="sft")
    first = ppo_reward.combine(t, _exp(rm=[[1.0, 2.0, 3.0, 4.0]]))  # mean 2.5, unbiased std 1.2910
    std = (5 / 3) ** 0.5
    torch.testing.assert_close(first, (torch.tensor([1.0, 2.0, 3.0, 4.0]) - 2.5) / std)
    later = ppo_reward.combine(
        t, _exp(rm=[[2.5, 2.5 + std, 0.0, 0.0]])
    )  # the same scale, not re-fitted
    torch.testing.assert_close(later, torch.tensor([0.0, 1.0, -2.5 / std, -2.5 / std]))
    assert t.member_norm == [[2.5, pytest.approx(std)]]


def test_ensemble_members_are_normalised_then_mean_minus_penalty_times_std():
    t = _trainer(ensemble_penalty=0.5)
    # member 1 is member 0 shifted and scaled (same ranking, another offset and scale); member 2
    # disagrees
    rm = [[0.0, 1.0, 2.0, 3.0], [10.0, 12.0, 14.0, 16.0], [3.0, 2.0, 1.0, 0.0]]
    scores = ppo_reward.combine(t, _exp(rm=rm))
    z0 = (torch.tensor(rm[0]) - 1.5) / (5 / 3) ** 0.5
    z = torch.stack([z0, z0, -z0])
    torch.testing.assert_close(scores, z.mean(0) - 0.5 * z.std(0))
    assert [m for m, _ in t.member_norm] == [1.5, 13.0, 1.5]
    metrics = ppo_eval.ensemble_metrics(t, _exp(rm=rm), "eval")
    assert metrics["eval/ensemble_std"] == pytest.approx(z.std(0).mean().item())
    assert metrics["eval/reward_lcb"] == pytest.approx((z.mean(0) - z.std(0)).mean().item())


def test_no_ensemble_metrics_for_one_model():
    assert ppo_eval.ensemble_metrics(_trainer(), _exp(rm=[[1.0, 2.0, 3.0, 4.0]]), "rollout") == {}


def _seq_kl(exp: Experience) -> float:
    """rollout/kl_to_ref of a one-rank rollout: the k3 estimate summed per response, averaged."""
    return (
        (kl_estimate(exp.old_logprobs, exp.ref_logprobs, "k3") * exp.response_mask)
        .sum(1)
        .mean()
        .item()
    )


def test_kl_alarm_turns_on_and_off_and_warns_once(caplog):
    t = _trainer(adaptive_kl=True, target_kl=1.0)  # alarm above 2 nats per response
    caplog.set_level(logging.WARNING)
    per_token = 1.0  # k3 of a log ratio of 1 nat: e^-1 - 1 + 1 = 0.368 per token, x3 tokens = 1.10
    assert ppo_eval.kl_alarm(t, 1, _seq_kl(_exp(logprob_gap=per_token))) == {"alarm/kl_to_ref": 0.0}
    assert ppo_eval.kl_alarm(t, 2, _seq_kl(_exp(logprob_gap=2.0))) == {
        "alarm/kl_to_ref": 1.0
    }  # 3 x 1.135 = 3.41
    assert ppo_eval.kl_alarm(t, 3, _seq_kl(_exp(logprob_gap=2.0))) == {"alarm/kl_to_ref": 1.0}
    assert ppo_eval.kl_alarm(t, 4, _seq_kl(_exp(logprob_gap=0.0))) == {"alarm/kl_to_ref": 0.0}
    assert t.alarms["kl_iterations"] == 2
    warnings = [
        r.getMessage() for r in caplog.records if "over-optimisation alarm" in r.getMessage()
    ]
    assert len(warnings) == 1 and "iteration 2" in warnings[0]


def test_no_kl_alarm_without_a_threshold():
    assert ppo_eval.kl_alarm(_trainer(), 1, _seq_kl(_exp(logprob_gap=5.0))) == {}


def test_ensemble_alarm_counts_evaluations_past_twice_the_sft_disagreement(caplog):
    t = _trainer()
    caplog.set_level(logging.WARNING)
    first = {"eval/ensemble_std": 0.25}
    assert ppo_eval.after_evaluation(t, 0, first, first) == {"alarm/ensemble_std_ratio": 1.0}
    assert ppo_eval.after_evaluation(t, 10, {"eval/ensemble_std": 0.4}, first)[
        "alarm/ensemble_std_ratio"
    ] == pytest.approx(1.6)
    assert t.alarms["ensemble_evaluations"] == 0
    assert ppo_eval.after_evaluation(t, 20, {"eval/ensemble_std": 0.75}, first)[
        "alarm/ensemble_std_ratio"
    ] == pytest.approx(3.0)
    assert t.alarms["ensemble_evaluations"] == 1
    assert any("disagree 3.0x" in r.getMessage() for r in caplog.records)


def test_a_failing_user_function_stops_with_its_message(tmp_path):
    def bad(prompts, responses):
        return [float("inf")] * len(prompts)

    with pytest.raises(
        UserError, match=r"option ppo.reward_fn: the function f.py:bad returned inf for row 0"
    ):
        ppo_reward.call_user_fn(ScoreFn("f.py:bad", "ppo.reward_fn", bad), _exp(fn=[0.0] * 4))
