"""Tier 3: checkpoints under faults on the tiny preset — SIGKILL and resume (exact), a damaged
checkpoint, a full disk, a checkpoint from another config, a stop signal, another rank count.

To save launches, the three interrupted runs (SFT and PPO killed, PPO stopped on 2 ranks) run at
the same time, then resume in one launch (`interrupted_and_resumed`); the reruns of the resumed
SFT run (damaged checkpoint, another config, full disk) likewise share two (`restarts`). Each
test checks its own run's outputs."""

import json
import math
import os
import random
import resource
import shutil
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import psutil
import pytest
from launch_util import REPO, TINY, free_port, launch, launch_plan, metric_rows

from pipeline.checkpoint import verify


def _bytes(path):
    return path.read_bytes()


def _start(script, out, *args, num_gpus=None):
    """The launcher in its own process group (so SIGKILL reaches the launcher and every rank)."""
    cmd = ["deepspeed", "--master_port", str(free_port())]
    if num_gpus:
        cmd += ["--num_gpus", str(num_gpus)]
    cmd += [str(REPO / "launch" / script), "--config", str(TINY), "--output_dir", str(out), *args]
    return subprocess.Popen(
        cmd,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _wait_for_checkpoint(proc, stage_dir, timeout=600):
    latest = stage_dir / "checkpoints" / "latest"
    deadline = time.time() + timeout
    while not latest.is_file():
        assert proc.poll() is None, (
            f"ended before its first checkpoint:\n{proc.stdout.read()[-3000:]}"
        )
        assert time.time() < deadline
        time.sleep(0.05)


def _kill_at_random(proc, stage_dir, seed, within):
    """SIGKILL every process of the run a (seeded) random moment after its first checkpoint."""
    _wait_for_checkpoint(proc, stage_dir)
    delay = random.Random(seed).uniform(0.0, within)
    time.sleep(delay)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    print(
        f"killed {delay:.2f} s after the first checkpoint; checkpoints: "
        f"{sorted(p.name for p in (stage_dir / 'checkpoints').iterdir())}"
    )


def _unfinish(stage_dir):
    """What a run killed before the end leaves: no final model, no completion record."""
    shutil.rmtree(stage_dir / "model", ignore_errors=True)
    (stage_dir / "stage.json").unlink(missing_ok=True)


def _tensorboard_steps(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    scalars = {tag: [e.step for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    texts = (
        [e.step for e in acc.Tensors("samples/text_summary")]
        if "samples/text_summary" in acc.Tags()["tensors"]
        else []
    )
    return scalars, texts


def _killed(ref, root, script, stage, seed, within, *args):
    """A copy of the finished run without `stage`; `script` killed with SIGKILL a random moment
    after the stage's first checkpoint. The copy's folder and the command to resume it."""
    out = root / "run"
    shutil.copytree(ref, out)
    shutil.rmtree(out / stage)
    proc = _start(script, out, *args)
    _kill_at_random(proc, out / stage, seed=seed, within=within)
    assert not (out / stage / "stage.json").exists(), "killed too late to test anything"
    return out, ["--config", str(TINY), "--output_dir", str(out), *args]


SFT_CHECKPOINTS = ("--save_steps", "10", "--keep_last", "3")  # the SFT run killed mid-run


class _Resumed(NamedTuple):
    """What the resume of an interrupted run printed: the launcher's exit code and rank 0's
    output."""

    returncode: int
    stdout: str
    stderr: str


def _resume_all(root, commands):
    """The resumes {name: (stages, argv)}, one after the other in one 1-rank launch (each as
    `deepspeed launch/<stage script> argv` would run it, tests/distributed/pipelines_probe.py; one
    launcher start-up instead of one per resume): {name: _Resumed}."""
    plan = [{"name": n, "stages": list(st), "argv": argv} for n, (st, argv) in commands.items()]
    return {n: _Resumed(*r) for n, r in launch_plan(root, plan, num_gpus=1).items()}


@pytest.fixture(scope="module")
def interrupted_and_resumed(pristine_run, tmp_path_factory):
    """Three interrupted runs of copies of the finished run, then their resumes (to the end, in
    one launch): SFT killed with SIGKILL mid-run (checkpoints every 10 steps), PPO killed with
    SIGKILL mid-run (a checkpoint every iteration), and PPO on 2 ranks stopped by the stop
    signal then resumed on 1 rank. {"sft"/"ppo": (ref, output dir, resume), "stop": (output dir,
    what the stopped run left, resume)}."""
    ref = pristine_run[0]
    roots = [tmp_path_factory.mktemp(name) for name in ("sft_kill", "ppo_kill", "stop")]
    # At the same time (each its own launch, thread and folder): their start-ups, mostly one
    # core each, overlap. What is killed or stopped when does not depend on it (seeded delays
    # after each run's own first checkpoint).
    with ThreadPoolExecutor(3) as pool:
        runs = [
            pool.submit(_killed, ref, roots[0], "sft.py", "sft", 1, 3.0, *SFT_CHECKPOINTS),
            pool.submit(_killed, ref, roots[1], "ppo.py", "ppo", 2, 1.0, "--save_steps", "1"),
            pool.submit(_stopped_on_two_ranks, ref, roots[2]),
        ]
        (sft_out, sft_argv), (ppo_out, ppo_argv), (stop_out, stopped) = (r.result() for r in runs)
    resumed = _resume_all(
        tmp_path_factory.mktemp("resume_logs"),
        {
            "sft": (("sft",), sft_argv),
            "ppo": (("sft", "reward", "ppo"), ppo_argv),
            "stop": (
                ("sft", "reward", "ppo"),
                ["--config", str(TINY), "--output_dir", str(stop_out), "--save_steps", "1"],
            ),  # 1 rank
        },
    )
    return {
        "sft": (ref, sft_out, resumed["sft"]),
        "ppo": (ref, ppo_out, resumed["ppo"]),
        "stop": (stop_out, stopped, resumed["stop"]),
    }


@pytest.fixture(scope="module")
def sft_killed_and_resumed(interrupted_and_resumed):
    return interrupted_and_resumed["sft"]


def test_sft_sigkill_then_resume_is_exact(sft_killed_and_resumed):
    ref, out, resumed = sft_killed_and_resumed
    assert "stage sft: resuming from step" in resumed.stdout
    # Bitwise: same CPU, same threads, same order of every reduction; nothing else is tolerated.
    assert _bytes(out / "sft" / "model" / "model.safetensors") == _bytes(
        ref / "sft" / "model" / "model.safetensors"
    )
    assert metric_rows(out / "sft" / "metrics.jsonl") == metric_rows(ref / "sft" / "metrics.jsonl")


def _limit_file_size():  # in the child: files may not grow past 256 KiB (a full disk, per file)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # then writes fail with EFBIG instead of killing
    resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, 256 * 1024))


class _Restarts(NamedTuple):
    """Three unfinished copies of the resumed SFT run (see `restarts`) and what their restarts
    did."""

    damaged: object  # the copy whose newest checkpoint was truncated
    newest: object  # that checkpoint
    older: str  # the one before it
    fell_back: _Resumed  # its restart
    other: object  # the copy restarted with another learning rate
    before: dict  # its sft folder's files before the refused restart
    refused: object  # the refused restart (a plain process)
    after_refusal: dict  # its sft folder's files after it
    started_over: _Resumed  # the restart with --resume false
    disk: object  # the copy restarted on a "full disk"
    latest: str  # its latest checkpoint before
    disk_full: subprocess.CompletedProcess  # its restart


@pytest.fixture(scope="module")
def restarts(sft_killed_and_resumed, tmp_path_factory):
    """Three copies of the resumed SFT run, each unfinished: in one the newest checkpoint is
    truncated, then SFT reruns; in another SFT reruns with another learning rate (refused),
    then again with `--resume false` (for 2 steps, no checkpoints); in the third SFT reruns with
    a checkpoint every step where no file may grow past 256 KiB. The two reruns that train run in
    one launch, the third meanwhile in its own (their start-ups overlap)."""
    _, done, _ = sft_killed_and_resumed
    disk = tmp_path_factory.mktemp("disk_full") / "run"
    shutil.copytree(done, disk)
    _unfinish(disk / "sft")
    latest = (disk / "sft" / "checkpoints" / "latest").read_text()
    cmd = ["deepspeed", "--master_port", str(free_port()), str(REPO / "launch" / "sft.py")]
    cmd += ["--config", str(TINY), "--output_dir", str(disk), "--save_steps", "1"]
    # started before this process has any other thread (preexec_fn is not safe with threads)
    full = subprocess.Popen(
        cmd,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_limit_file_size,
    )
    with ThreadPoolExecutor(1) as pool:
        output = pool.submit(full.communicate, timeout=600)
        restarted = _restart(done, tmp_path_factory)
        disk_full = subprocess.CompletedProcess(cmd, full.wait(), *output.result())
    return _Restarts(*restarted, disk, latest, disk_full)


def _restart(done, tmp_path_factory):
    """`restarts`' first two copies and their reruns."""
    damaged = tmp_path_factory.mktemp("damaged") / "run"
    shutil.copytree(done, damaged)
    _unfinish(damaged / "sft")
    ckpts = damaged / "sft" / "checkpoints"
    newest = ckpts / (ckpts / "latest").read_text().strip()
    older = sorted(p.name for p in ckpts.glob("step_*"))[-2]
    victim = next(p for p in sorted(newest.rglob("*optim_states.pt")))
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])  # truncated

    other = tmp_path_factory.mktemp("other_config") / "run"
    shutil.copytree(done, other)
    _unfinish(other / "sft")
    before = {p: p.read_bytes() for p in (other / "sft").rglob("*") if p.is_file()}
    refused = launch(
        "sft.py",
        "--config",
        str(TINY),
        "--output_dir",
        str(other),
        "--sft.learning_rate",
        "0.5",
        launcher=False,
    )
    after = {p: p.read_bytes() for p in (other / "sft").rglob("*") if p.is_file()}
    # --resume false: the stage starts over with the new settings, its old checkpoints deleted.
    again = ["--config", str(TINY), "--output_dir", str(other), "--sft.learning_rate", "0.5"]
    again += ["--resume", "false", "--save_steps", "0", "--sft.max_steps", "2"]
    ran = _resume_all(
        tmp_path_factory.mktemp("restart_logs"),
        {
            "damaged": (("sft",), ["--config", str(TINY), "--output_dir", str(damaged)]),
            "started_over": (("sft",), again),
        },
    )
    return (
        damaged,
        newest,
        older,
        ran["damaged"],
        other,
        before,
        refused,
        after,
        ran["started_over"],
    )


def test_damaged_checkpoint_falls_back_to_the_previous_one(sft_killed_and_resumed, restarts):
    ref = sft_killed_and_resumed[0]
    out, newest, older, proc = restarts.damaged, restarts.newest, restarts.older, restarts.fell_back
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"checkpoint {newest} is damaged" in proc.stdout and "truncated" in proc.stdout
    assert f"resuming from step {int(older.split('_')[1])}" in proc.stdout
    assert _bytes(out / "sft" / "model" / "model.safetensors") == _bytes(
        ref / "sft" / "model" / "model.safetensors"
    )


def test_checkpoint_from_another_config_is_refused(restarts):
    out, proc = restarts.other, restarts.refused
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = next(x for x in proc.stderr.splitlines() if x.startswith("error: "))
    assert (
        "different model, data or config" in line and "section.learning_rate: 0.003 -> 0.5" in line
    )
    assert "--resume false" in line and "Traceback" not in proc.stderr
    assert restarts.before == restarts.after_refusal
    proc = restarts.started_over
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "stage sft: starting" in proc.stdout and "resuming" not in proc.stdout
    assert not (out / "sft" / "checkpoints").exists()
    assert (out / "sft" / "model" / "model.safetensors").is_file()


def test_disk_full_during_checkpoint_keeps_the_previous_one(restarts):
    ckpts, latest, proc = restarts.disk / "sft" / "checkpoints", restarts.latest, restarts.disk_full
    print(proc.stdout[-3000:], proc.stderr[-3000:])
    assert proc.returncode == 3
    line = next(x for x in proc.stderr.splitlines() if x.startswith("stopped: "))
    assert (
        "could not be written" in line and str(ckpts / ".tmp_step_") in line and "GiB free" in line
    )
    assert f"{ckpts / latest} is intact" in line
    assert (ckpts / "latest").read_text() == latest and verify(ckpts / latest) is None
    assert not list(ckpts.glob(".tmp_*"))


@pytest.fixture(scope="module")
def ppo_killed_and_resumed(interrupted_and_resumed):
    return interrupted_and_resumed["ppo"]


def test_ppo_sigkill_then_resume_is_exact(ppo_killed_and_resumed):
    ref, out, resumed = ppo_killed_and_resumed
    assert (
        "stage sft is up to date" in resumed.stdout
        and "stage reward is up to date" in resumed.stdout
    )
    assert "stage ppo: resuming from step" in resumed.stdout
    assert _bytes(out / "ppo" / "model" / "model.safetensors") == _bytes(
        ref / "ppo" / "model" / "model.safetensors"
    )
    assert metric_rows(out / "ppo" / "metrics.jsonl") == metric_rows(ref / "ppo" / "metrics.jsonl")
    for key in ("gold_score_final", "gold_win_rate_vs_sft", "kl_to_ref", "reward_score_final"):
        a = json.loads((out / "summary.json").read_text())["ppo"][key]
        b = json.loads((ref / "summary.json").read_text())["ppo"][key]
        assert a == b, key


def test_tensorboard_step_axis_is_monotonic_across_the_resume(ppo_killed_and_resumed):
    ref, out, _ = ppo_killed_and_resumed
    scalars, texts = _tensorboard_steps(out / "ppo" / "tensorboard")
    ref_scalars, ref_texts = _tensorboard_steps(ref / "ppo" / "tensorboard")
    assert scalars.keys() == ref_scalars.keys()
    for tag, steps in scalars.items():
        assert steps == sorted(set(steps)), (tag, steps)  # increasing, nothing logged twice
        assert steps == ref_scalars[tag], tag
    assert texts == ref_texts and texts  # the text samples too


def _signal_ranks(proc, signum):
    ranks = [
        p
        for p in psutil.Process(proc.pid).children(recursive=True)
        if "--local_rank" in " ".join(p.cmdline())
    ]
    assert ranks
    for p in ranks:  # as SLURM does: every task gets the signal
        p.send_signal(signum)


class _Stopped(NamedTuple):
    """What the 2-rank PPO run stopped by the stop signal left: the launcher's exit code and
    output, the step of its latest checkpoint, the ranks that wrote it, whether a model is there."""

    returncode: int
    log: str
    stopped_at: int
    world_size: int
    has_model: bool


def _stopped_on_two_ranks(ref, root):
    """A copy of the finished run without PPO; PPO on 2 ranks (a checkpoint every iteration)
    sent the stop signal after its first checkpoint. (output dir, _Stopped)."""
    out = root / "run"
    shutil.copytree(ref, out)
    shutil.rmtree(out / "ppo")
    proc = _start("ppo.py", out, "--save_steps", "1", num_gpus=2)
    _wait_for_checkpoint(proc, out / "ppo")
    _signal_ranks(proc, signal.SIGUSR1)
    log = proc.communicate(timeout=600)[0]
    ckpts = out / "ppo" / "checkpoints"
    latest = (ckpts / "latest").read_text()
    return out, _Stopped(
        proc.returncode,
        log,
        int(latest.split("_")[1]),
        json.loads((ckpts / latest / "manifest.json").read_text())["world_size"],
        (out / "ppo" / "model").exists(),
    )


def test_stop_signal_checkpoints_and_a_different_rank_count_resumes(interrupted_and_resumed):
    out, stopped, resumed = interrupted_and_resumed["stop"]
    log = stopped.log
    assert stopped.returncode == 75, log[-3000:]
    assert (
        "stop signal received; checkpoint of step" in log
        and "Rerun the same command to resume" in log
    )
    stopped_at = stopped.stopped_at
    assert stopped.world_size == 2
    assert not stopped.has_model

    assert resumed.returncode == 0, resumed.stderr[-3000:]  # 1 rank
    assert (
        f"resuming from iteration {stopped_at} of 5" in resumed.stdout
        and "written by 2 rank(s)" in resumed.stdout
    )
    rows = [json.loads(x) for x in (out / "ppo" / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in rows if "ppo/policy_loss" in r]
    assert train_steps == [1, 2, 3, 4, 5]
    assert all(math.isfinite(r["ppo/policy_loss"]) for r in rows if "ppo/policy_loss" in r)
    scalars, _ = _tensorboard_steps(out / "ppo" / "tensorboard")
    for tag, steps in scalars.items():
        assert steps == sorted(set(steps)), (tag, steps)
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out / "ppo" / "model").num_parameters() > 0
