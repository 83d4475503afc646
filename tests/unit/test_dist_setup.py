"""Process-group set-up: the timeout option, and a SLURM step that started ranks without a
launcher."""

import os
import subprocess
import sys

import pytest
from launch_util import free_port

from pipeline.cli import parse_config
from pipeline.config import Config
from pipeline.distributed import collectives
from pipeline.distributed.collectives import check_slurm_world_size
from pipeline.errors import UserError


def test_srun_without_a_launcher_is_refused_naming_the_tasks_and_the_scripts():
    env = {"SLURM_PROCID": "3", "SLURM_STEP_NUM_TASKS": "8", "SLURM_NTASKS": "8"}
    with pytest.raises(UserError) as e:
        check_slurm_world_size(env, 1)
    message = str(e.value)
    assert "world size of 1" in message and "task 3 of 8" in message
    assert "launch/slurm/ppo.sbatch" in message and "\n" not in message


@pytest.mark.parametrize(
    "env",
    [
        {},  # not under SLURM
        {"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "1"},  # srun --ntasks=1
        {"SLURM_PROCID": "0", "SLURM_NTASKS": "4"},  # the batch script itself (not an srun step)
        {"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "junk"},
    ],
)
def test_single_task_or_no_slurm_is_fine(env):
    check_slurm_world_size(env, 1)


def test_a_launched_world_as_big_as_the_step_is_fine():
    check_slurm_world_size({"SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "2"}, 2)


def test_dist_timeout_option():
    assert Config().dist_timeout_minutes == 120.0  # DeepSpeed's default (10 min) is too short
    assert parse_config(["--dist_timeout_minutes", "30"]).dist_timeout_minutes == 30.0
    with pytest.raises(UserError, match=r"option dist_timeout_minutes=0.0 must be > 0"):
        parse_config(["--dist_timeout_minutes", "0"])


def test_the_timeout_is_not_part_of_a_stage_identity(tmp_path):
    from pipeline.fingerprint import identity

    a, b = Config(), Config(dist_timeout_minutes=5.0)
    assert identity("ppo", a, {}, tmp_path) == identity("ppo", b, {}, tmp_path)


def test_the_process_group_is_left_before_the_interpreter_tears_down():
    """A gloo group left to the interpreter's teardown can abort a rank after a run that succeeded
    (SIGABRT, CI saw exit -6): init_distributed registers the group's destruction at exit, to run
    before handlers registered earlier (atexit is last-in, first-out)."""
    code = (
        "import atexit, torch, torch.distributed as dist\n"
        "def report():\n"
        "    print('at exit, group alive:', dist.is_initialized(), flush=True)\n"
        "atexit.register(report)\n"
        "from pipeline.distributed import collectives\n"
        "collectives.init_distributed()\n"
        "print('after init, group alive:', dist.is_initialized(), flush=True)\n"
        "collectives.all_reduce_sum(torch.ones(2))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    env["MASTER_PORT"] = str(free_port())
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "after init, group alive: True" in proc.stdout
    assert "at exit, group alive: False" in proc.stdout, proc.stdout
    collectives.shutdown()  # and a no-op without a group
