"""Tier 3: the real launcher on the tiny preset — the whole pipeline, skip-on-rerun, bad input.

The reruns (skip-on-rerun, bad data, evaluation off, a short max_new_tokens) run one after the
other in one launch, each on its own copy of the session's finished run (the `reruns` fixture);
the usage errors in one plain process (`usage_errors`)."""

import hashlib
import json
import shutil

import pytest
from commands_probe import run_commands
from launch_util import TINY, launch_plan, metric_rows, summary

from pipeline.config import PPOConfig

SUMMARY_KEYS = {
    "sft": ("eval_loss", "wall_s", "skipped"),
    "reward": ("eval_accuracy", "wall_s", "skipped"),
    "ppo": (
        "gold_score_sft",
        "gold_score_final",
        "gold_win_rate_vs_sft",
        "kl_to_ref",
        "reward_score_sft",
        "reward_score_final",
        "wall_s",
        "skipped",
    ),
}


def _digest(folder) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


@pytest.fixture
def finished(pristine_run, run_copy):
    """A finished tiny pipeline of our own (tests here rerun stages in it)."""
    return run_copy, pristine_run[1]


def test_pipeline_fills_summary_and_exports_hf_folders(finished):
    out, proc = finished
    s = summary(out)
    for stage, keys in SUMMARY_KEYS.items():
        for key in keys:
            assert key in s[stage], f"{stage}.{key}"
        assert s[stage]["skipped"] is False
    assert "gold_win_rate_vs_sft" in proc.stdout  # the closing table
    for stage in ("sft", "reward", "ppo"):
        assert (out / stage / "model" / "model.safetensors").is_file()
        assert (out / stage / "metrics.jsonl").stat().st_size > 0
        assert list((out / stage / "tensorboard").glob("events.out.tfevents.*"))
        assert (out / stage / "config.yaml").is_file()
    assert (out / "config.yaml").is_file()
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out / "ppo" / "model").num_parameters() > 0
    # the reference-likelihood constraint is on by default: its ratio is the logged NLL over the
    # first iteration's, and the summary counts the iterations above the limit
    rows = [r for r in metric_rows(out / "ppo" / "metrics.jsonl") if "rollout/ref_nll" in r]
    first = rows[0]["rollout/ref_nll"]
    for r in rows:
        assert r["alarm/ref_nll_ratio"] == pytest.approx(r["rollout/ref_nll"] / first, rel=1e-6)
    limit = PPOConfig().ref_nll_limit  # the default, which the tiny preset keeps
    above = sum(r["alarm/ref_nll_ratio"] > limit for r in rows)
    assert s["ppo"]["alarm_ref_nll_iterations"] == above


def _documented_tags() -> dict[str, list[str]]:
    """The tag table of docs/metrics.md: stage -> tags (the test checks what the docs promise)."""
    from launch_util import REPO

    tags: dict[str, list[str]] = {}
    for line in (REPO / "docs" / "metrics.md").read_text().splitlines():
        cells = [c.strip() for c in line.replace("\\|", "").strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0] in ("sft", "reward", "ppo") and cells[1].startswith("`"):
            tags.setdefault(cells[0], []).append(cells[1].strip("`"))
    return tags


def test_tensorboard_has_every_documented_tag(finished):
    import math

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = finished
    documented = _documented_tags()
    assert len(documented["ppo"]) >= 33 and documented["sft"] and documented["reward"]
    for stage, tags in documented.items():
        acc = EventAccumulator(
            str(out / stage / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0}
        )
        acc.Reload()
        have = set(acc.Tags()["scalars"])
        for tag in tags:
            assert tag in have, f"{stage}: {tag} not in TensorBoard"
            events = acc.Scalars(tag)
            assert all(math.isfinite(e.value) for e in events), (stage, tag)
            steps = [e.step for e in events]
            assert steps == sorted(steps), (stage, tag, steps)
    acc = EventAccumulator(str(out / "ppo" / "tensorboard"), size_guidance={"tensors": 0})
    acc.Reload()
    samples = acc.Tensors("samples/text_summary")
    assert {s.step for s in samples} >= {0, 5}  # step-0 baseline and the last evaluation
    assert "| prompt | response |" in samples[-1].tensor_proto.string_val[0].decode()
    assert (out / "ppo" / "overoptimisation.png").stat().st_size > 1000


@pytest.fixture(scope="module")
def reruns(pristine_run, tmp_path_factory):
    """The launches of the tests below that rerun stages, each on its own copy of the finished
    run (<root>/<name>), one after the other in one launch with the default single rank
    (launch_util.launch_plan); what a test looks at between two of its launches is copied to
    <root>/<name>_after_1 first. (root, {launch: (exit code, rank 0's stdout, its stderr)})."""
    root = tmp_path_factory.mktemp("reruns")
    for name in ("rerun", "eval_off", "short", "bad_data"):
        shutil.copytree(pristine_run[0], root / name)
    rows = root / "rows.jsonl"
    rows.write_text(
        json.dumps({"prompt": "hello", "response": "world"})
        + "\n"
        + json.dumps({"prompt": "hello"})
        + "\n"
    )

    def argv(name, *args):
        return ["--config", str(TINY), "--output_dir", str(root / name), *args]

    rerun, snap = root / "rerun", root / "rerun_after_1"
    bad_sft = ["--force", "--data.sft_data_path"]
    plan = [
        {"name": "rerun_1", "argv": argv("rerun")},
        {
            "name": "rerun_2",
            "argv": argv("rerun", "--ppo.num_iterations", "2"),
            "before": [["copy", str(rerun / "summary.json"), str(snap / "summary.json")]]
            + [["copy", str(rerun / s / "model"), str(snap / s)] for s in STAGE_NAMES],
        },
        {"name": "eval_off", "argv": argv("eval_off", "--ppo.eval_steps", "0")},
        {
            "name": "short",
            "argv": argv("short", "--ppo.max_new_tokens", "4", "--ppo.num_iterations", "1"),
        },
        {
            "name": "bad_data_1",
            "argv": argv("bad_data", *bad_sft, str(root / "nope.jsonl")),
            "stages": ["sft"],
        },
        {
            "name": "bad_data_2",
            "argv": argv("bad_data", *bad_sft, str(rows)),
            "stages": ["sft"],
            "before": [
                ["copy", str(root / "bad_data" / "sft"), str(root / "bad_data_after_1" / "sft")]
            ],
        },
    ]
    return root, launch_plan(root, plan, num_gpus=1)


STAGE_NAMES = ("sft", "reward", "ppo")


def test_rerun_skips_finished_stages(pristine_run, reruns):
    root, ran = reruns
    before = {s: _digest(pristine_run[0] / s / "model") for s in STAGE_NAMES}
    code, stdout, stderr = ran["rerun_1"]
    assert code == 0, stderr[-3000:]
    snap = root / "rerun_after_1"  # the run as the first rerun left it
    for stage in STAGE_NAMES:
        assert f"stage {stage} is up to date" in stdout
        assert summary(snap)[stage]["skipped"] is True
        assert _digest(snap / stage) == before[stage]
    # A changed PPO option reruns PPO only: the second run goes straight to PPO.
    code, stdout, stderr = ran["rerun_2"]
    assert code == 0, stderr[-3000:]
    assert "stage sft is up to date" in stdout and "stage reward is up to date" in stdout
    assert "stage ppo: starting" in stdout
    assert "stage ppo: prompt_data examples read from the cache" in stdout  # tokenised once
    s = summary(root / "rerun")
    assert s["sft"]["skipped"] and s["reward"]["skipped"] and not s["ppo"]["skipped"]
    assert s["ppo"]["iterations"] == 2


def _one_paragraph_error(proc, *needles):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    err = proc.stderr
    assert "Traceback" not in err and "Traceback" not in proc.stdout
    line = next(x for x in err.splitlines() if x.startswith("error: "))
    for needle in needles:
        assert needle in line, (needle, line)


BAD_OPTIONS = [
    (["--sft.epochs", "many"], ["sft.epochs"]),
    (["--no_such_option", "1"], ["--no_such_option"]),
    (["--ppo.rollout_batch_size", "30"], ["ppo.rollout_batch_size", "ppo.mini_batch_size"]),
]


@pytest.fixture(scope="module")
def usage_errors(tmp_path_factory):
    """`launch/ppo.py` with each of BAD_OPTIONS (an empty output folder each), and with a
    malformed config file, one after the other in one plain process (commands_probe.py):
    (root, {name: Ran})."""
    root = tmp_path_factory.mktemp("usage")
    commands = {}
    for i, (args, _) in enumerate(BAD_OPTIONS):
        (root / f"out{i}").mkdir()
        commands[f"options{i}"] = (
            "ppo.py",
            ["--config", str(TINY), "--output_dir", str(root / f"out{i}"), *args],
        )
    bad = root / "bad.yaml"
    bad.write_text("sft: {epochs: 1\n")
    commands["malformed"] = ("ppo.py", ["--config", str(bad)])
    return root, run_commands(root, commands)


@pytest.mark.parametrize("case", range(len(BAD_OPTIONS)))
def test_bad_options_are_one_paragraph(usage_errors, case):
    _, needles = BAD_OPTIONS[case]
    _one_paragraph_error(usage_errors[1][f"options{case}"], *needles)


def test_malformed_config_file(usage_errors):
    root, ran = usage_errors
    _one_paragraph_error(ran["malformed"], str(root / "bad.yaml"))


def test_bad_data_leaves_earlier_outputs_untouched(pristine_run, reruns):
    root, ran = reruns
    before = _digest(pristine_run[0] / "sft")  # the copy's SFT stage before the two launches
    missing, rows = root / "nope.jsonl", root / "rows.jsonl"
    for name, needles, after in (
        ("bad_data_1", [str(missing), "does not exist"], root / "bad_data_after_1"),
        ("bad_data_2", [str(rows), "row 1", "'response'"], root / "bad_data"),
    ):
        code, stdout, stderr = ran[name]
        assert code != 0
        assert "Traceback" not in stderr
        line = next(x for x in (stderr + stdout).splitlines() if x.startswith("error: "))
        for needle in needles:
            assert needle in line, (needle, line)
        assert _digest(after / "sft") == before


def _ppo_rows(out) -> list[dict]:
    """PPO's metrics.jsonl rows without the wall-clock readings."""
    return metric_rows(out / "ppo" / "metrics.jsonl")


def test_evaluation_off_trains_the_same_and_leaves_out_the_eval_fields(pristine_run, reruns):
    root, ran = reruns
    out = root / "eval_off"
    code, stdout, stderr = ran["eval_off"]
    assert code == 0, stderr[-3000:]
    assert "stage sft is up to date" in stdout and "evaluation is off (ppo.eval_steps 0)" in stdout
    rows = _ppo_rows(out)
    assert rows and not any(k.startswith("eval/") for r in rows for k in r)
    with_eval = [
        {k: v for k, v in r.items() if not k.startswith(("eval/", "alarm/ensemble"))}
        for r in _ppo_rows(pristine_run[0])
        if "rollout/score_mean" in r
    ]
    assert [r["step"] for r in rows] == [r["step"] for r in with_eval] == [1, 2, 3, 4, 5]
    for row, expected in zip(rows, with_eval):  # evaluation does not change training
        assert row == pytest.approx(expected), row["step"]
    s = summary(out)["ppo"]
    assert s["iterations"] == 5 and not s["skipped"]
    for key in (
        "reward_score_sft",
        "reward_score_final",
        "kl_to_ref",
        "gold_score_sft",
        "gold_score_final",
        "gold_win_rate_vs_sft",
    ):
        assert key not in s, key
    assert not (
        out / "ppo" / "overoptimisation.png"
    ).exists()  # the copied run's plot went with its metrics
    for row in (json.loads(x) for x in (out / "ppo" / "metrics.jsonl").read_text().splitlines()):
        assert row["time"] > 1.7e9 and row["elapsed_s"] >= 0


def test_max_new_tokens_bounds_rollouts_and_evaluation(pristine_run, reruns):
    longest = max(
        r["rollout/response_length_mean"]
        for r in _ppo_rows(pristine_run[0])
        if "rollout/response_length_mean" in r
    )
    assert longest > 4  # at the default length, responses are longer than the bound below
    root, ran = reruns
    out = root / "short"
    code, _, stderr = ran["short"]
    assert code == 0, stderr[-3000:]
    rows = _ppo_rows(out)
    assert [r["step"] for r in rows if "rollout/response_length_mean" in r] == [1]
    for key in ("rollout/response_length_mean", "eval/response_length_mean"):
        assert all(r[key] <= 4 for r in rows if key in r) and any(key in r for r in rows), key
