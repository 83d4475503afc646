"""The linter and the formatter (ruff, configured in pyproject.toml) find nothing to change in the
package, launchers and tests."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_ruff_finds_nothing():
    proc = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--no-cache", "pipeline", "launch", "tests"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, (
        f"ruff check (pip install -e '.[test]' installs it):\n{proc.stdout}{proc.stderr}"
    )


def test_ruff_reads_the_projects_rules():
    proc = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--show-settings", "pipeline/config.py"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert str(REPO / "pyproject.toml") in proc.stdout and "line_length = 100" in proc.stdout


def test_ruff_format_changes_nothing():
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ruff",
            "format",
            "--check",
            "--no-cache",
            "pipeline",
            "launch",
            "tests",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, (
        f"ruff format would change these files (run `ruff format .`):\n{proc.stdout}{proc.stderr}"
    )
