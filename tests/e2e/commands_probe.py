"""Run as a plain process (one rank, no launcher): `commands_probe.py PLAN.json` runs several
launcher command lines one after the other in one process, each exactly as `launch/<script> ARGV`
would (tests/distributed/pipelines_probe.py's run_one: the launchers' own entry point), to save a
Python start-up and its imports per command; after each, it records the digest of a folder.

PLAN.json: `[{"name": ..., "argv": [...], "stages": [...], "log": DIR, "watch": FOLDER}, ...]`.
Each command writes `DIR/<name>.rank0.stdout` / `.stderr` / `.rc` (as pipelines_probe.py does) and
`DIR/<name>.digest`, the `digest` of FOLDER right after the command ("" without a FOLDER). Used by
test_bad_input.py and test_pipeline.py for the commands that exit before, or just after, building
anything."""

import hashlib
import json
import pathlib
import sys
from typing import NamedTuple

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "distributed"))
from pipelines_probe import run_one  # noqa: E402


def digest(folder: pathlib.Path) -> str:
    """Names and bytes of every file under `folder` (the whole run: task, stages, summary)."""
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            h.update(str(f.relative_to(folder)).encode() + f.read_bytes())
    return h.hexdigest()


class Ran(NamedTuple):
    """What one command did: the launcher's exit code, rank 0's output, `digest` of FOLDER after."""

    returncode: int
    stdout: str
    stderr: str
    digest: str


SCRIPT_STAGES = {"sft.py": ["sft"], "reward.py": ["reward"], "ppo.py": ["sft", "reward", "ppo"]}


def run_commands(root: pathlib.Path, commands: dict[str, tuple], watch=None) -> dict:
    """{name: (script, argv)} run in one process by this probe (logs under `root`):
    {name: Ran}. `watch`: the folder whose digest is taken after each command (or None)."""
    from launch_util import launch

    plan = [
        {
            "name": n,
            "argv": list(argv),
            "stages": SCRIPT_STAGES[script],
            "log": str(root),
            "watch": str(watch) if watch else None,
        }
        for n, (script, argv) in commands.items()
    ]
    (root / "plan.json").write_text(json.dumps(plan))
    proc = launch("../tests/e2e/commands_probe.py", str(root / "plan.json"), launcher=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {
        n: Ran(
            int((root / f"{n}.rank0.rc").read_text()),
            (root / f"{n}.rank0.stdout").read_text(),
            (root / f"{n}.rank0.stderr").read_text(),
            (root / f"{n}.digest").read_text(),
        )
        for n in commands
    }


def main() -> None:
    for item in json.loads(pathlib.Path(sys.argv[1]).read_text()):
        log = pathlib.Path(item["log"])
        code = run_one(item["argv"], log, item["name"], 0, tuple(item["stages"]))
        (log / f"{item['name']}.rank0.rc").write_text(str(code))
        watched = digest(pathlib.Path(item["watch"])) if item["watch"] else ""
        (log / f"{item['name']}.digest").write_text(watched)


if __name__ == "__main__":
    main()
