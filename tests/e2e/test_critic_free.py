"""Tier 3: a critic-free recipe (launch/configs/grpo.yaml) on the tiny preset: no critic engine is
built, scored with, trained or checkpointed; the group metrics are logged; the run finishes; and a
resume from its iteration-2 checkpoint ends exactly where the uninterrupted run ended. The same
recipe with a reward function instead of a reward model (`--ppo.reward_model_coef 0
--ppo.reward_fn`) trains no reward model and scores with the function alone; so does PPO-GAE, whose
critic then starts from the policy with a fresh value head.

The five launches of these tests run one after the other in one launch (the `ran` fixture), each
test's on its own copy of (part of) the session's finished run."""

import json
import shutil

import pytest
from launch_util import REPO, TINY, launch_plan, metric_rows

GRPO = REPO / "launch" / "configs" / "grpo.yaml"
# 4 prompts x 4 samples = 16 rows per iteration, the tiny preset's 16; checkpoint at iteration 2 of
# 4 (the last before the end)
ARGS = (
    "--config",
    str(TINY),
    "--config",
    str(GRPO),
    "--ppo.rollout_batch_size",
    "4",
    "--save_steps",
    "2",
    "--ppo.num_iterations",
    "4",
)
STEP_2 = "step_00000002"  # the checkpoint of iteration 2
CRITIC_KEYS = (
    "ppo/value_loss",
    "ppo/value_clip_fraction",
    "ppo/value_explained_variance",
    "ppo/critic_lr",
    "ppo/critic_grad_norm",
)


def _check_group_metrics(row):
    """What the group metrics of 4 groups of 4 must satisfy given the batch's own statistics: a
    whole number of uniform groups; no spread within groups exactly when all are uniform (up to
    float32 rounding of the group means); and, by the law of total variance, a mean within-group
    (unbiased) std of at most sqrt(4/3) x the batch's std."""
    frac, std = row["rollout/group_all_equal_fraction"], row["rollout/group_score_std"]
    assert frac * 4 == round(frac * 4), row
    if frac == 1:
        assert std <= 1e-5 * (1 + abs(row["rollout/score_mean"])), row
    else:
        assert std > 0, row
    assert std <= (4 / 3) ** 0.5 * row["rollout/score_std"] + 1e-4, row


def _group_metrics(calls):
    """(all-equal fraction, mean unbiased std) of each training rollout's 4 groups of 4, computed
    from the scores the reward function returned (rows are prompt-major: a group is 4 adjacent rows
    with one prompt); evaluation calls (64 held-out prompts, one response each) are left out."""
    import torch

    out = []
    for call in calls:
        if len(call["prompts"]) != 16:
            continue
        prompts = [call["prompts"][i : i + 4] for i in range(0, 16, 4)]
        assert all(len(set(g)) == 1 for g in prompts), call["prompts"]
        groups = torch.tensor(call["scores"], dtype=torch.float32).view(4, 4)  # as the pipeline
        equal = (groups.max(1).values == groups.min(1).values).double().mean().item()
        out.append((equal, groups.double().std(1).mean().item()))
    return out


@pytest.fixture(scope="module")
def ran(pristine_run, tmp_path_factory):
    """The tests' launches, one after the other in one launch with the default single rank
    (launch_util.launch_plan), each test's in its own folder of root: grpo/run (a copy of the
    finished run: only PPO runs), then the same command again on it after what a killed run leaves
    (grpo/after_1: its PPO stage's metrics, model and iteration-2 checkpoint before that); fn/run
    and gae/run (copies of the task and SFT stage only, each with its own my_reward.py).
    (root, {launch: (exit code, rank 0's stdout, its stderr)})."""
    root = tmp_path_factory.mktemp("critic_free")
    grpo = root / "grpo" / "run"
    shutil.copytree(pristine_run[0], grpo)
    ppo, first = grpo / "ppo", root / "grpo" / "after_1"
    for name in ("fn", "gae"):
        (root / name).mkdir()
        (root / name / "my_reward.py").write_text(SHIFTED_GOLD)
        _sft_only(pristine_run, root / name / "run")
    fn_only = ["--ppo.reward_model_coef", "0", "--ppo.reward_fn"]
    plan = [
        {"name": "grpo", "argv": [*ARGS, "--output_dir", str(grpo)]},
        {
            "name": "grpo_resumed",
            "argv": [*ARGS, "--output_dir", str(grpo)],
            "before": [
                ["copy", str(ppo / "metrics.jsonl"), str(first / "metrics.jsonl")],
                ["copy", str(ppo / "model"), str(first / "model")],
                ["copy", str(ppo / "checkpoints" / STEP_2), str(first / "checkpoints" / STEP_2)],
                ["remove", str(ppo / "model")],
                ["remove", str(ppo / "stage.json")],
            ],
        },
        {
            "name": "fn",
            "argv": [
                *ARGS,
                *fn_only,
                f"{root / 'fn' / 'my_reward.py'}:shifted_gold",
                "--output_dir",
                str(root / "fn" / "run"),
            ],
        },
        {
            "name": "gae",
            "argv": [
                "--config",
                str(TINY),
                "--config",
                str(REPO / "launch" / "configs" / "ppo.yaml"),
                "--ppo.num_iterations",
                "2",
                *fn_only,
                f"{root / 'gae' / 'my_reward.py'}:shifted_gold",
                "--output_dir",
                str(root / "gae" / "run"),
            ],
        },
    ]
    return root, launch_plan(root, plan, num_gpus=1)


def test_grpo_runs_without_a_critic_and_resumes_exactly(ran):
    root, results = ran
    out = root / "grpo" / "run"  # SFT and reward model finished: only PPO ran
    code, stdout, stderr = results["grpo"]
    assert code == 0, stderr[-3000:]
    log = stdout + stderr
    assert "no critic: ppo.advantage_mode=grpo needs none" in log
    assert "engine actor" in log and "engine critic" not in log
    assert "stage sft" in log and "stage ppo" in log
    ppo, first = out / "ppo", root / "grpo" / "after_1"  # first: its PPO stage before the resume
    rows = metric_rows(first / "metrics.jsonl")
    train = [r for r in rows if "ppo/policy_loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    for r in train:
        assert not [k for k in r if k in CRITIC_KEYS or "critic" in k], r
        _check_group_metrics(r)
        assert r["ppo/kl_loss"] >= 0 and r["ppo/kl_coef"] == 0.04  # the k3 loss term, fixed beta
    assert (first / "model" / "model.safetensors").is_file()
    checkpoint = first / "checkpoints" / STEP_2
    assert (checkpoint / "actor").is_dir() and not list(checkpoint.glob("*critic*"))

    # resume: the stage unfinished after iteration 2's checkpoint, the same command again
    expected_rows, expected_model = rows, (first / "model" / "model.safetensors").read_bytes()
    code, stdout, stderr = results["grpo_resumed"]
    assert code == 0, stderr[-3000:]
    assert "stage ppo: resuming from iteration 2" in stdout + stderr
    assert metric_rows(ppo / "metrics.jsonl") == expected_rows
    assert (ppo / "model" / "model.safetensors").read_bytes() == expected_model


# The default task's gold shifted by 100: scores no reward model gives, so the metrics show whose
# scores they are (GRPO's group normalisation ignores the shift).
# It also records each call (prompts and the scores it returned) in calls.jsonl next to itself.
SHIFTED_GOLD = """import json
from pathlib import Path

from pipeline.default_task import gold


def shifted_gold(prompts, responses):
    scores = [100.0 + g for g in gold(prompts, responses)]
    with Path(__file__).with_name("calls.jsonl").open("a") as f:
        f.write(json.dumps({"prompts": list(prompts), "scores": scores}) + "\\n")
    return scores
"""


def _sft_only(pristine_run, out):
    """A copy of the session's finished run with its task and SFT stage only (no reward model)."""
    for part in ("task", "sft"):
        shutil.copytree(pristine_run[0] / part, out / part)


def test_grpo_with_a_reward_function_instead_of_a_reward_model(ran):
    root, results = ran
    fn = root / "fn" / "my_reward.py"
    out = root / "fn" / "run"  # SFT finished: it is reused, and no reward model is trained
    code, stdout, stderr = results["fn"]
    assert code == 0, stderr[-3000:]
    log = stdout + stderr
    assert (
        "stage sft is up to date" in log
        and "stage ppo: starting" in log
        and "stage reward: starting" not in log
    )
    assert "stage reward is not needed: PPO's reward is ppo.reward_fn alone" in log
    assert not (out / "reward").exists()  # no reward model trained
    assert f"reward = 1 x {fn}:shifted_gold;" in log
    assert "engine actor" in log and "engine reward" not in log and "engine critic" not in log
    rows = metric_rows(out / "ppo" / "metrics.jsonl")
    train = [r for r in rows if "ppo/policy_loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    calls = [json.loads(x) for x in (root / "fn" / "calls.jsonl").read_text().splitlines()]
    groups = _group_metrics(calls)
    assert len(groups) == len(train)  # one call per training rollout
    for r, (equal, std) in zip(train, groups):
        # the training rollouts are scored by the function (gold is in [-2.25, 1]), and the group
        # metrics are those of the scores it returned
        assert 97.75 <= r["rollout/score_mean"] <= 101, r
        assert r["rollout/group_all_equal_fraction"] == equal, (r, equal)
        assert r["rollout/group_score_std"] == pytest.approx(std, rel=1e-4, abs=1e-4), (r, std)
        _check_group_metrics(r)
    evals = [r for r in rows if "eval/reward_score" in r]
    assert evals
    for r in evals:  # the same held-out responses: the function's score is the gold + 100
        assert abs(r["eval/reward_score"] - (r["eval/gold_score"] + 100)) < 1e-3, r
    assert (out / "ppo" / "model" / "model.safetensors").is_file()


def test_ppo_gae_with_a_reward_function_starts_its_critic_from_the_policy(ran):
    """PPO-GAE (launch/configs/ppo.yaml) needs a critic: with no reward model to start it from, the
    critic is the policy with a fresh value head, and training runs on the function's scores."""
    root, results = ran
    out = root / "gae" / "run"
    code, stdout, stderr = results["gae"]
    assert code == 0, stderr[-3000:]
    log = stdout + stderr
    assert "stage reward is not needed: PPO's reward is ppo.reward_fn alone" in log
    assert not (out / "reward").exists()
    assert "engine critic" in log and "engine reward" not in log
    train = [r for r in metric_rows(out / "ppo" / "metrics.jsonl") if "ppo/policy_loss" in r]
    assert [r["step"] for r in train] == [1, 2]
    for r in train:
        assert 97.75 <= r["rollout/score_mean"] <= 101, r
        # the fresh value head starts near 0 against returns near 100: a large loss the critic
        # reduces
        assert r["ppo/value_loss"] > 1.0 and r["ppo/critic_grad_norm"] > 0, r
    assert train[1]["ppo/value_loss"] < train[0]["ppo/value_loss"]
    assert (out / "ppo" / "model" / "model.safetensors").is_file()
