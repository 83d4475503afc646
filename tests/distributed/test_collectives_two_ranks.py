"""Tier 2: on two ranks, checkpoint verification is shared out (each rank hashes its part, a
damaged file found by either rank rejects the checkpoint on both), and the process-group timeout
(option dist_timeout_minutes) turns a rank that never arrives into an error instead of a hang."""

import json
import subprocess

import pytest
from launch_util import REPO, free_port

PROBE = REPO / "tests" / "distributed" / "collectives_probe.py"


def _run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = ["deepspeed", "--master_port", str(free_port()), "--num_gpus", "2", str(PROBE), *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def _reports(folder, mode):
    return [json.loads((folder / f"{mode}.rank{r}").read_text()) for r in (0, 1)]


@pytest.fixture(scope="module")
def generous(tmp_path_factory):
    """The folder of one launch that runs `verify`, then `timeout` with a generous timeout (2 min,
    rank 1 5 s late), in one process group: (folder, the launch)."""
    folder = tmp_path_factory.mktemp("generous")
    return folder, _run("verify+timeout", str(folder), "2", "5")


def test_checkpoint_verification_is_shared_by_the_ranks(generous):
    folder, proc = generous
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = _reports(folder, "verify")
    assert r0["intact_step"] == r1["intact_step"] == 2 and not r0["universal"]
    a, b = set(r0["hashed_intact"]), set(r1["hashed_intact"])
    assert a and b and not a & b  # each file hashed once, by one rank
    assert a | b == {
        f"step_00000002/{n}" for n in [f"shard_{i}.bin" for i in range(5)] + ["state.json"]
    }
    assert (
        r0["fallback_step"] == r1["fallback_step"] == 1
    )  # rank 1 found the damage; both skip step 2


def test_a_late_rank_fails_the_barrier_after_dist_timeout_minutes(tmp_path, generous):
    # timeout 3 s, rank 1 would arrive after 20 s: rank 0 gives up after about 3 s (rank 1 then
    # arrives as soon as rank 0 has written its report, see collectives_probe.timeout_mode)
    short = tmp_path / "short"
    short.mkdir()
    proc = _run("timeout", str(short), "0.05", "20")
    r0 = json.loads((short / "timeout.rank0").read_text())
    assert r0["error"] is not None, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert 2 <= r0["waited_s"] < 15, r0
    # with a generous timeout the same lateness is waited out (in the verify launch, after it)
    folder, proc = generous
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert [r["error"] for r in _reports(folder, "timeout")] == [None, None]
