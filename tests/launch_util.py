"""Run the real launchers (`deepspeed launch/<stage>.py ...`) from tests, on a free port."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "launch" / "configs" / "tiny.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(
    script: str, *args: str, num_gpus: int | None = None, timeout: int = 900, launcher: bool = True
) -> subprocess.CompletedProcess:
    """`deepspeed [--num_gpus N] launch/<script> args`; output captured (and echoed on failure)."""
    if launcher:
        cmd = ["deepspeed", "--master_port", str(free_port())]
        if num_gpus:
            cmd += ["--num_gpus", str(num_gpus)]
    else:
        cmd = [sys.executable]
    cmd += [str(REPO / "launch" / script), *args]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    print(proc.stdout[-4000:], proc.stderr[-4000:], sep="\n")
    return proc


# Wall-clock and machine readings differ between any two runs; everything else must not.
VOLATILE = (
    "time",
    "elapsed_s",
    "perf/",
    "memory/",
)  # wall-clock readings: "time" also covers "time/..."


def metric_rows(path: Path) -> list[dict]:
    """A stage's metrics.jsonl without its VOLATILE readings: equal for two runs that trained
    alike."""
    return [
        {k: v for k, v in json.loads(line).items() if not k.startswith(VOLATILE)}
        for line in path.read_text().splitlines()
    ]


def summary(output_dir: Path) -> dict:
    return json.loads((output_dir / "summary.json").read_text())


def launch_plan(root: Path, plan: list[dict], num_gpus: int = 2) -> dict:
    """Several pipelines one after the other in one launch (tests/distributed/pipelines_probe.py;
    each plan item's "log" is `root`): {name: (exit code, rank 0's stdout, rank 0's stderr)}, the
    exit code the launch would have returned (that of the rank furthest from 0)."""
    plan = [{**item, "log": str(root)} for item in plan]
    (root / "plan.json").write_text(json.dumps(plan))
    proc = launch(
        "../tests/distributed/pipelines_probe.py", str(root / "plan.json"), num_gpus=num_gpus
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = {}
    for item in plan:
        name = item["name"]
        rcs = [int((root / f"{name}.rank{r}.rc").read_text()) for r in range(num_gpus)]
        out, err = ((root / f"{name}.rank0.{s}").read_text() for s in ("stdout", "stderr"))
        result[name] = (max(rcs, key=abs), out, err)
    return result
