"""Run under `deepspeed`: `pipelines_probe.py PLAN.json` runs several pipelines one after the
other in one launch, each exactly as `launch/ppo.py ARGV` would (the same entry point,
`orchestrator.main(STAGES, ...)`; with "stages", e.g. `["sft"]`, as `launch/sft.py ARGV` would),
to save a launcher and its ranks' start-up per pipeline.

PLAN.json: `[{"name": ..., "argv": [...], "log": DIR, "stages": [...], "before": [...]}, ...]`
("stages" and "before" optional). An item with `"probe": "x_probe.py"` (a script next to this one)
runs that script instead, as `deepspeed x_probe.py ARGV` would (its `__main__`), in the same
process group. Each rank writes what a launch of that pipeline would print to
`DIR/<name>.rank<R>.stdout` / `.stderr`, and `DIR/<name>.rank<R>.rc` (the exit code the launcher
would have returned: 0, or the SystemExit code; 1 for an exception, whose traceback goes to the
.stderr file). One pipeline failing does not stop the next. "before" lists what a test would do to
the files between two launches, done by rank 0 while the others wait (so not before the first
pipeline, which creates the process group): `["copy", SRC, DST]` (a file; or a folder, DST must
not exist), `["remove", PATH]` (a file or a folder). Used by test_architectures.py,
test_two_ranks.py, test_ptx_ema_two_ranks.py and, through checkpointing_probe.py and
lora_probe.py, test_precision_and_checkpointing.py and test_lora_two_ranks.py."""

import contextlib
import json
import logging
import os
import runpy
import shutil
import sys
import traceback
from pathlib import Path

from pipeline.inputs import STAGES
from pipeline.orchestrator import main as pipeline_main

DESCRIPTION = "RLHF pipeline (pipelines_probe.py)"


def run_one(
    argv: list[str], log: Path, name: str, rank: int, stages: tuple[str, ...], probe: str = ""
) -> int:
    out, err = (log / f"{name}.rank{rank}.{s}" for s in ("stdout", "stderr"))
    with out.open("w") as o, err.open("w") as e:
        with contextlib.redirect_stdout(o), contextlib.redirect_stderr(e):
            try:
                if probe:
                    run_probe(Path(__file__).parent / probe, argv)
                else:
                    pipeline_main(stages, DESCRIPTION, argv)
                code = 0
            except SystemExit as stop:
                code = stop.code if isinstance(stop.code, int) else 1
            except Exception:  # noqa: BLE001 - reported like an uncaught exception would be
                traceback.print_exc()
                code = 1
            sys.stdout.flush()
            sys.stderr.flush()
            forget_log_handlers()
    return code


def forget_log_handlers() -> None:
    """The root logger as a fresh process has it (no handlers): those an item set up write to its
    files, closed once it is done (the next item sets up its own, as its launch would)."""
    for handler in logging.root.handlers[:]:
        logging.root.removeHandler(handler)
        handler.close()


def run_probe(script: Path, argv: list[str]) -> None:
    """`script`'s `__main__` with `sys.argv` = [script, *argv], as its own launch would run it."""
    saved = sys.argv
    sys.argv = [str(script), *argv]
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv = saved


def prepare(ops: list[list[str]], rank: int) -> None:
    """The file changes a test would make between two launches: on rank 0, then a barrier."""
    import torch.distributed as dist

    assert dist.is_initialized(), "'before' needs a pipeline before it (the process group)"
    if rank == 0:
        for op, *paths in ops:
            if op == "copy" and Path(paths[0]).is_dir():
                shutil.copytree(*paths)
            elif op == "copy":
                Path(paths[1]).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(*paths)
            elif op == "remove":
                path = Path(*paths)
                shutil.rmtree(path) if path.is_dir() else path.unlink()
            else:
                raise ValueError(f"unknown operation {op!r}")
    dist.barrier()


def run_plan(plan: Path, rank: int) -> None:
    """Every pipeline of PLAN.json in turn (also called by checkpointing_probe.py, after its own
    runs)."""
    for item in json.loads(plan.read_text()):
        log = Path(item["log"])
        if item.get("before"):
            prepare(item["before"], rank)
        stages = tuple(item.get("stages", STAGES))
        code = run_one(item["argv"], log, item["name"], rank, stages, item.get("probe", ""))
        (log / f"{item['name']}.rank{rank}.rc").write_text(str(code))


def main() -> None:
    (plan,) = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    run_plan(Path(plan), int(os.environ.get("RANK", "0")))


if __name__ == "__main__":
    main()
