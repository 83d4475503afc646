"""One finished tiny pipeline per test session; tests that change it work on their own copy."""

import shutil

import pytest
from launch_util import TINY, launch


@pytest.fixture(scope="session")
def pristine_run(tmp_path_factory):
    """The whole tiny pipeline with the launcher's default ranks: (folder, process). Read only."""
    out = tmp_path_factory.mktemp("pipeline") / "run"
    proc = launch("ppo.py", "--config", str(TINY), "--output_dir", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


@pytest.fixture
def run_copy(pristine_run, tmp_path):
    """A private copy of the finished tiny run."""
    dst = tmp_path / "run"
    shutil.copytree(pristine_run[0], dst)
    return dst
