"""Tier 3: the real launcher on the tiny preset — the whole pipeline, skip-on-rerun, bad input."""

import hashlib
import json

import pytest
from launch_util import TINY, launch, metric_rows, summary

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
    above = sum(r["alarm/ref_nll_ratio"] > 1.2 for r in rows)
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


def test_rerun_skips_finished_stages(finished):
    out, _ = finished
    before = {s: _digest(out / s / "model") for s in ("sft", "reward", "ppo")}
    proc = launch("ppo.py", "--config", str(TINY), "--output_dir", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for stage in ("sft", "reward", "ppo"):
        assert f"stage {stage} is up to date" in proc.stdout
        assert summary(out)[stage]["skipped"] is True
        assert _digest(out / stage / "model") == before[stage]
    # A changed PPO option reruns PPO only: the second run goes straight to PPO.
    proc = launch(
        "ppo.py", "--config", str(TINY), "--output_dir", str(out), "--ppo.num_iterations", "2"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "stage sft is up to date" in proc.stdout and "stage reward is up to date" in proc.stdout
    assert "stage ppo: starting" in proc.stdout
    assert "stage ppo: prompt_data examples read from the cache" in proc.stdout  # tokenised once
    s = summary(out)
    assert s["sft"]["skipped"] and s["reward"]["skipped"] and not s["ppo"]["skipped"]
    assert s["ppo"]["iterations"] == 2


def _one_paragraph_error(proc, *needles):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    err = proc.stderr
    assert "Traceback" not in err and "Traceback" not in proc.stdout
    line = next(x for x in err.splitlines() if x.startswith("error: "))
    for needle in needles:
        assert needle in line, (needle, line)


@pytest.mark.parametrize(
    "args,needles",
    [
        (["--sft.epochs", "many"], ["sft.epochs"]),
        (["--no_such_option", "1"], ["--no_such_option"]),
        (["--ppo.rollout_batch_size", "30"], ["ppo.rollout_batch_size", "ppo.mini_batch_size"]),
    ],
)
def test_bad_options_are_one_paragraph(tmp_path, args, needles):
    proc = launch(
        "ppo.py", "--config", str(TINY), "--output_dir", str(tmp_path), *args, launcher=False
    )
    _one_paragraph_error(proc, *needles)


def test_malformed_config_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("sft: {epochs: 1\n")
    proc = launch("ppo.py", "--config", str(bad), launcher=False)
    _one_paragraph_error(proc, str(bad))


def test_bad_data_leaves_earlier_outputs_untouched(finished, tmp_path):
    out, _ = finished
    before = _digest(out / "sft")
    rows = tmp_path / "rows.jsonl"
    rows.write_text(
        json.dumps({"prompt": "hello", "response": "world"})
        + "\n"
        + json.dumps({"prompt": "hello"})
        + "\n"
    )
    missing = tmp_path / "nope.jsonl"
    for path, needles in (
        (missing, [str(missing), "does not exist"]),
        (rows, [str(rows), "row 1", "'response'"]),
    ):
        proc = launch(
            "sft.py",
            "--config",
            str(TINY),
            "--output_dir",
            str(out),
            "--force",
            "--data.sft_data_path",
            str(path),
        )
        assert proc.returncode != 0
        assert "Traceback" not in proc.stderr
        line = next(x for x in (proc.stderr + proc.stdout).splitlines() if x.startswith("error: "))
        for needle in needles:
            assert needle in line, (needle, line)
        assert _digest(out / "sft") == before


def _ppo_rows(out) -> list[dict]:
    """PPO's metrics.jsonl rows without the wall-clock readings."""
    return metric_rows(out / "ppo" / "metrics.jsonl")


def test_evaluation_off_trains_the_same_and_leaves_out_the_eval_fields(pristine_run, run_copy):
    out = run_copy
    proc = launch(
        "ppo.py", "--config", str(TINY), "--output_dir", str(out), "--ppo.eval_steps", "0"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (
        "stage sft is up to date" in proc.stdout
        and "evaluation is off (ppo.eval_steps 0)" in proc.stdout
    )
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


def test_max_new_tokens_bounds_rollouts_and_evaluation(pristine_run, run_copy):
    longest = max(
        r["rollout/response_length_mean"]
        for r in _ppo_rows(pristine_run[0])
        if "rollout/response_length_mean" in r
    )
    assert longest > 4  # at the default length, responses are longer than the bound below
    out = run_copy
    proc = launch(
        "ppo.py",
        "--config",
        str(TINY),
        "--output_dir",
        str(out),
        "--ppo.max_new_tokens",
        "4",
        "--ppo.num_iterations",
        "1",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _ppo_rows(out)
    assert [r["step"] for r in rows if "rollout/response_length_mean" in r] == [1]
    for key in ("rollout/response_length_mean", "eval/response_length_mean"):
        assert all(r[key] <= 4 for r in rows if key in r) and any(key in r for r in rows), key
