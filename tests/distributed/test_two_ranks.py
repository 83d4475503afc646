"""Tier 2: every stage on two ranks with real ZeRO-3 engines over gloo, through the real
launcher's entry points.

SFT alone, the reward model alone, then the whole pipeline (which finds both up to date), in one
folder as `launch/sft.py`, `launch/reward.py` and `launch/ppo.py` would run them one after the
other: all three in one 2-rank launch (tests/distributed/pipelines_probe.py), which saves two
launcher and rank start-ups; partition_probe.py runs last in the same launch, on that folder."""

import json

import pytest
import torch
from launch_util import REPO, TINY, launch_plan, summary


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    """(run_dir, {name: (exit code, stdout, stderr)}) of the sft, reward and ppo launches."""
    root = tmp_path_factory.mktemp("two_ranks")
    run_dir = root / "run"
    argv = ["--config", str(TINY), "--output_dir", str(run_dir)]

    # each launch's summary.json, as the next one rewrites it (a stage it finds up to date: skipped)
    def keep(name):
        return ["copy", str(run_dir / "summary.json"), str(root / name / "summary.json")]

    plan = [
        {"name": "sft", "argv": argv, "stages": ["sft"]},
        {"name": "reward", "argv": argv, "stages": ["reward"], "before": [keep("sft")]},
        {"name": "ppo", "argv": argv, "before": [keep("reward")]},
        {"name": "partition", "probe": "partition_probe.py", "argv": _partition_argv(root, argv)},
    ]
    return run_dir, launch_plan(root, plan)


def _partition_argv(root, argv):
    """partition_probe.py's arguments (for test_ppo_engines_are_partitioned_and_offloaded): the
    report root/report.json.rank<R>, the pipeline's `argv` with partitioned-even-tiny-tensors
    DeepSpeed configs and offloaded frozen models."""
    ds = json.loads((REPO / "ds_configs" / "zero3_train.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition even tiny norms
    ds_path = root / "ds.json"
    ds_path.write_text(json.dumps(ds))
    inf = json.loads((REPO / "ds_configs" / "zero3_offload_inference.json").read_text())
    inf["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    inf_path = root / "inf.json"
    inf_path.write_text(json.dumps(inf))
    return [
        str(root / "report.json"),
        *argv,
        "--ds_config",
        str(ds_path),
        "--ds_inference_config",
        str(inf_path),
        "--ppo.ref_placement",
        "offload",
        "--ppo.reward_placement",
        "offload",
    ]


@pytest.fixture(scope="module")
def run_dir(stages):
    return stages[0]


def _summary(stages, name):
    """summary.json as the `name` launch left it (kept before the next one ran)."""
    return summary(stages[0].parent / name)


def _ok(stages, name, world=2):
    """The launch's rank-0 stdout, once it is known to have run on `world` ranks without error."""
    rc, stdout, stderr = stages[1][name]
    assert rc == 0, stderr[-3000:]
    assert f"world size {world}," in stdout
    return stdout


def test_sft_two_ranks(stages, run_dir):
    _ok(stages, "sft")
    s = _summary(stages, "sft")["sft"]
    assert s["skipped"] is False and s["steps"] > 0
    # 1200 rows / (16 micro x 2 ranks) = 37 optimizer steps per epoch: each rank saw half the data.
    assert s["steps"] == 1200 // 32
    assert 0 < s["eval_loss"] < 5.0
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(run_dir / "sft" / "model")
    tok = AutoTokenizer.from_pretrained(run_dir / "sft" / "model")
    ids = tok("ana asks for a review of the pizza .", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]
    lines = (run_dir / "sft" / "metrics.jsonl").read_text().splitlines()
    assert any("eval/loss" in line for line in lines)
    first = json.loads(lines[0])["train/loss"]
    last = [json.loads(x) for x in lines if "train/loss" in x][-1]["train/loss"]
    assert last < first  # it learned


def test_reward_two_ranks(stages, run_dir):
    _ok(stages, "reward")
    s = _summary(stages, "reward")["reward"]
    assert s["eval_accuracy"] > 0.6  # tiny preset, one short epoch; chance is 0.5
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rm = AutoModelForSequenceClassification.from_pretrained(run_dir / "reward" / "model")
    tok = AutoTokenizer.from_pretrained(run_dir / "reward" / "model")
    assert rm.config.num_labels == 1 and rm.config.pad_token_id == tok.pad_token_id
    batch = tok(
        [
            "ana asks for a review of the pizza . the pizza is amazing .",
            "ana asks for a review of the pizza . the pizza is dreadful . the",
        ],
        return_tensors="pt",
        padding=True,
    )
    assert rm(**batch).logits.shape == (2, 1)


def test_ppo_two_ranks(stages, run_dir):
    stdout = _ok(stages, "ppo")
    assert "stage sft is up to date" in stdout and "stage reward is up to date" in stdout
    s = summary(run_dir)["ppo"]
    rows = [json.loads(x) for x in (run_dir / "ppo" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/gold_score" in r]
    assert [r["step"] for r in evals] == [
        0,
        2,
        4,
        5,
    ]  # eval_steps 2 of 5 iterations, step 0 and the end
    first, last = evals[0], evals[-1]
    # the summary reports the first evaluation (the SFT policy) and the last one
    assert (s["gold_score_sft"], s["reward_score_sft"]) == (
        first["eval/gold_score"],
        first["eval/reward_score"],
    )
    assert (
        s["gold_score_final"],
        s["reward_score_final"],
        s["gold_win_rate_vs_sft"],
        s["kl_to_ref"],
    ) == (
        last["eval/gold_score"],
        last["eval/reward_score"],
        last["eval/win_rate_vs_sft"],
        last["eval/kl_to_ref"],
    )
    # step 0 evaluates the SFT policy against itself: every comparison a tie, no KL to its own copy
    assert first["eval/win_rate_vs_sft"] == 0.5 and abs(first["eval/kl_to_ref"]) < 1e-6
    assert last["eval/kl_to_ref"] > 1e-3  # five updates moved the policy
    train = [r for r in rows if "ppo/policy_loss" in r]
    assert len(train) == 5
    assert all(r["rollout/response_length_mean"] > 0 for r in train)


def test_ppo_engines_are_partitioned_and_offloaded(stages):
    """Each rank holds about half of every actor and critic parameter; the frozen reference and
    reward engines, offloaded (ppo.ref_placement / ppo.reward_placement offload: the path of models
    that do not fit; auto keeps the tiny ones resident), keep their partitioned parameters in the
    offload device."""
    rc, _, stderr = stages[1]["partition"]
    assert rc == 0, stderr[-3000:]
    ranks = [json.loads((stages[0].parent / f"report.json.rank{r}").read_text()) for r in (0, 1)]
    for name in ("actor", "critic", "ref", "reward"):
        for pname, (local, full, _) in ranks[0][name].items():
            other = ranks[1][name][pname][0]
            assert local + other >= full and local <= -(-full // 2) and other <= -(-full // 2), (
                name,
                pname,
            )
    assert ranks[0]["ref_offload"].endswith("cpu") and ranks[0]["reward_offload"].endswith("cpu")
    assert all(
        dev == "cpu" for r in ranks for n in ("ref", "reward") for _, _, dev in r[n].values()
    )
    assert torch.tensor([v[1] for v in ranks[0]["actor"].values()]).sum() > 50_000
