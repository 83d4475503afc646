"""Run under `deepspeed`: `pipelines_probe.py PLAN.json` runs several whole pipelines one after
the other in one launch, each exactly as `launch/ppo.py ARGV` would (the same entry point,
`orchestrator.main(STAGES, ...)`), to save a launcher and its ranks' start-up per pipeline.

PLAN.json: `[{"name": ..., "argv": [...], "log": DIR}, ...]`. Each rank writes what a launch of
that pipeline would print to `DIR/<name>.rank<R>.stdout` / `.stderr`, and `DIR/<name>.rank<R>.rc`
(the exit code the launcher would have returned: 0, or the SystemExit code; 1 for an exception,
whose traceback goes to the .stderr file). One pipeline failing does not stop the next. Used by
test_architectures.py."""

import contextlib
import json
import os
import sys
import traceback
from pathlib import Path

from pipeline.inputs import STAGES
from pipeline.orchestrator import main as pipeline_main

DESCRIPTION = "RLHF pipeline (pipelines_probe.py)"


def run_one(argv: list[str], log: Path, name: str, rank: int) -> int:
    out, err = (log / f"{name}.rank{rank}.{s}" for s in ("stdout", "stderr"))
    with out.open("w") as o, err.open("w") as e:
        with contextlib.redirect_stdout(o), contextlib.redirect_stderr(e):
            try:
                pipeline_main(STAGES, DESCRIPTION, argv)
                code = 0
            except SystemExit as stop:
                code = stop.code if isinstance(stop.code, int) else 1
            except Exception:  # noqa: BLE001 - reported like an uncaught exception would be
                traceback.print_exc()
                code = 1
            sys.stdout.flush()
            sys.stderr.flush()
    return code


def main() -> None:
    (plan,) = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    rank = int(os.environ.get("RANK", "0"))
    for item in json.loads(Path(plan).read_text()):
        log = Path(item["log"])
        code = run_one(item["argv"], log, item["name"], rank)
        (log / f"{item['name']}.rank{rank}.rc").write_text(str(code))


if __name__ == "__main__":
    main()
