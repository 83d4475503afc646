"""The SLURM scripts against a real SLURM: munged, slurmctld and two slurmd daemons (node1 at
127.0.0.2, node2 at 127.0.0.3) on this machine, started by tests/slurm/local_cluster.py.

- the whole tiny pipeline submitted with `sbatch --nodes=2 launch/slurm/ppo.sbatch ...` completes
  with 2 ranks on 2 nodes and leaves the final models and TensorBoard events;
- the stop signal SLURM sends before the time limit (`--signal=B:USR1@N`, here
  `scancel -b -s USR1`): every rank checkpoints, the job requeues itself and resumes;
- `scontrol requeue` mid-PPO (of that resumed attempt): the job restarts and resumes from its
  checkpoint, and completes, with a TensorBoard step axis without gap or duplicate.
The last two are one PPO job (two requeues) that both tests read, each its own attempt's logs.

Needs root (the daemons) and apt-get when slurm-wlm/munge are missing; skips with the reason
otherwise (RLHF_REQUIRE_SLURM_TESTS=1 turns the skip into a failure).
"""

import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest
from launch_util import REPO, TINY
from local_cluster import LocalCluster, Unavailable

TERMINAL = (
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
)
PPO = REPO / "launch" / "slurm" / "ppo.sbatch"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = LocalCluster(tmp_path_factory.mktemp("slurm"))
    try:
        c.start()
    except Unavailable as e:
        if os.environ.get("RLHF_REQUIRE_SLURM_TESTS") == "1":
            pytest.fail(f"local SLURM cluster required but unavailable: {e}")
        pytest.skip(f"local SLURM cluster unavailable: {e}")
    print(
        f"local cluster in {c.dir}: daemons {', '.join(f'{n}={p.pid}' for n, p in c.procs.items())}"
    )
    yield c
    c.stop()


def _submit(cluster, submit_dir: Path, *args: str) -> str:
    submit_dir.mkdir(parents=True, exist_ok=True)
    env = {
        **cluster.env(),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    proc = cluster.run(
        "sbatch",
        "--parsable",
        "--nodes=2",
        str(PPO),
        "--config",
        str(TINY),
        *args,
        cwd=submit_dir,
        env=env,
    )
    return proc.stdout.strip().split(";")[0]


def _wait(cluster, job_id: str, until, timeout: float = 900, what: str = "the job to end") -> dict:
    deadline = time.time() + timeout
    while True:
        job = cluster.job(job_id)
        if until(job):
            return job
        assert time.time() < deadline, f"timed out waiting for {what}: {job}"
        time.sleep(1)


def _finished(cluster, job_id, timeout=900):
    return _wait(cluster, job_id, lambda j: j.get("JobState") in TERMINAL, timeout)


def _logs(submit_dir: Path, job_id: str) -> str:
    """The batch log and every per-node log, for assertion messages."""
    parts = [
        f"== {p.name}\n{p.read_text(errors='replace')[-3000:]}"
        for p in sorted(submit_dir.glob("slurm-*.out"))
    ]
    parts += [
        f"== {p.name}\n{p.read_text(errors='replace')[-3000:]}"
        for p in sorted((submit_dir / "logs" / "slurm" / job_id).glob("*.log"))
    ]
    return "\n".join(parts)


def _node_log(submit_dir, job_id, attempt, node):
    return (submit_dir / "logs" / "slurm" / job_id / f"attempt{attempt}-node{node}.log").read_text(
        errors="replace"
    )


def _tensorboard_scalars(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [e.step for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.fixture(scope="module")
def two_node_run(cluster, tmp_path_factory):
    """The whole tiny pipeline as one 2-node SLURM job: (submit dir, output dir, job id, job)."""
    sub = tmp_path_factory.mktemp("submit")
    out = sub / "run"
    start = time.time()
    job_id = _submit(cluster, sub, "--output_dir", str(out))
    job = _finished(cluster, job_id)
    print(f"2-node pipeline job {job_id}: {job['JobState']} in {time.time() - start:.0f} s")
    return sub, out, job_id, job


def test_pipeline_on_two_nodes(two_node_run):
    sub, out, job_id, job = two_node_run
    logs = _logs(sub, job_id)
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", logs
    assert job["NodeList"] == "node[1-2]" and job["NumNodes"] == "2"
    rank0, rank1 = _node_log(sub, job_id, 0, 0), _node_log(sub, job_id, 0, 1)
    # The ranks' own all-gather of their node names: 2 ranks, one on each node.
    assert "world size 2," in rank0 and "ranks by node: node1: 0; node2: 1" in rank0, logs
    assert re.search(r"node node1 \(.*\): node rank 0 of 2", rank0), logs
    assert re.search(r"node node2 \(.*\): node rank 1 of 2", rank1), logs
    assert (
        "dist_world_size=2" in rank1 and "rendezvous 127.0.0.2:" in rank1
    )  # the first node's NodeAddr
    for stage in ("sft", "reward", "ppo"):
        assert (out / stage / "model" / "model.safetensors").is_file(), stage
        assert list((out / stage / "tensorboard").rglob("events.out.tfevents.*")), stage
    assert json.loads((out / "summary.json").read_text())["ppo"]["iterations"] == 5
    batch = (sub / f"slurm-rlhf-ppo-{job_id}.out").read_text()
    assert (
        "on 2 node(s) (node1,node2) x 1 rank(s)" in batch and "finished with exit code 0" in batch
    )


ITERATIONS = 8


def _attempt_batch_log(sub, job_id, attempt) -> str:
    """The batch log's lines of one attempt (from its "job <id> attempt <n>:" line on)."""
    batch = (sub / f"slurm-rlhf-ppo-{job_id}.out").read_text()
    parts = re.split(rf"(?=^.*job {job_id} attempt \d+:)", batch, flags=re.M)
    return "".join(p for p in parts if re.match(rf".*job {job_id} attempt {attempt}:", p))


def _check_resumed(sub, out, job_id, job, attempt):
    """Attempt `attempt` resumed PPO from a step before the end; the job completed with a full
    step axis. Returns the step it resumed from."""
    logs = _logs(sub, job_id)
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", logs
    assert job["Restarts"] == "2", logs
    resumed = _node_log(sub, job_id, attempt, 0)
    assert "stage sft is up to date" in resumed and "stage reward is up to date" in resumed, logs
    m = re.search(r"stage ppo: resuming from step (\d+)", resumed)
    assert m and 1 <= int(m.group(1)) < ITERATIONS, logs
    print(f"job {job_id}: attempt {attempt} resumed PPO from step {m.group(1)} of {ITERATIONS}")
    assert "ranks by node: node1: 0; node2: 1" in resumed
    assert (out / "ppo" / "model" / "model.safetensors").is_file()
    rows = [json.loads(x) for x in (out / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "ppo/policy_loss" in r] == list(range(1, ITERATIONS + 1))
    scalars = _tensorboard_scalars(out / "ppo" / "tensorboard")
    assert scalars["ppo/policy_loss"] == list(range(1, ITERATIONS + 1))  # no gap, no duplicate
    for tag, steps in scalars.items():
        assert steps == sorted(set(steps)), (tag, steps)
    return int(m.group(1))


def _trained(out, step) -> bool:
    """PPO's metrics.jsonl has the training row of `step` (a line being written is not read)."""
    metrics = out / "ppo" / "metrics.jsonl"
    lines = metrics.read_text().split("\n")[:-1] if metrics.is_file() else []
    return any(f'"step": {step},' in x and "ppo/policy_loss" in x for x in lines)


def _wait_until(cluster, job_id, sub, ready, timeout=600):
    """Until ready() while the job runs."""
    deadline = time.time() + timeout
    while not ready():
        job = cluster.job(job_id)
        assert job.get("JobState") not in TERMINAL, _logs(sub, job_id)
        assert time.time() < deadline, _logs(sub, job_id)
        time.sleep(0.2)


@pytest.fixture(scope="module")
def requeued_job(cluster, two_node_run, tmp_path_factory):
    """PPO alone (a copy of the 2-node run without its PPO stage) as a 2-node job, without periodic
    checkpoints: attempt 0 gets the stop signal once PPO trains (its checkpoint, the job requeues
    itself); attempt 1, once it has trained one iteration past that checkpoint, gets `scontrol
    requeue`; attempt 2 resumes and completes. (submit dir, output dir, job id, job)."""
    sub = tmp_path_factory.mktemp("requeue") / "submit"
    out = sub / "run"
    shutil.copytree(two_node_run[1], out)
    shutil.rmtree(out / "ppo")
    (out / "summary.json").unlink()
    job_id = _submit(
        cluster,
        sub,
        "--output_dir",
        str(out),
        "--save_steps",
        "0",  # only the stop signals save
        "--ppo.num_iterations",
        str(ITERATIONS),
    )
    _wait_until(cluster, job_id, sub, lambda: _trained(out, 1))  # PPO is training
    # What `#SBATCH --signal=B:USR1@180` does before the time limit: SIGUSR1 to the batch shell
    # only.
    cluster.run("scancel", "--batch", "--signal=USR1", job_id)
    _wait(cluster, job_id, lambda j: j.get("Restarts") == "1", 300, "the self-requeue")
    at = (out / "ppo" / "checkpoints" / "latest").read_text().strip()
    signalled = int(at.split("_")[1])
    # mid-PPO: attempt 1 has trained the iteration after the signal's checkpoint
    _wait_until(cluster, job_id, sub, lambda: _trained(out, signalled + 1))
    cluster.run("scontrol", "requeue", job_id)
    print(f"job {job_id}: scontrol requeue in attempt 1 with checkpoint {at} on disk")
    _wait(cluster, job_id, lambda j: j.get("Restarts") == "2", 300, "the requeue")
    return sub, out, job_id, _finished(cluster, job_id)


def test_stop_signal_checkpoints_and_the_job_requeues_itself(requeued_job):
    sub, out, job_id, job = requeued_job
    batch = _attempt_batch_log(sub, job_id, 0)
    assert "SIGUSR1: asking every rank to checkpoint and stop" in batch, batch
    assert "stopped with a checkpoint (exit 75): requeueing job" in batch, batch
    attempt0 = _node_log(sub, job_id, 0, 0)
    m = re.search(r"stop signal received; checkpoint of step (\d+) saved", attempt0)
    assert m, _logs(sub, job_id)
    resumed = re.search(r"stage ppo: resuming from step (\d+)", _node_log(sub, job_id, 1, 0))
    assert resumed, _logs(sub, job_id)
    assert int(resumed.group(1)) == int(m.group(1))  # resumed from the checkpoint the signal wrote
    _check_resumed(sub, out, job_id, job, 1)


def test_scontrol_requeue_resumes_from_the_checkpoint(requeued_job):
    sub, out, job_id, job = requeued_job
    _check_resumed(sub, out, job_id, job, 2)
    batch = _attempt_batch_log(sub, job_id, 1)
    assert _attempt_batch_log(sub, job_id, 2)  # SLURM started attempt 2
    assert "attempt 1" in batch and "requeueing" not in batch, batch  # SLURM requeued it
