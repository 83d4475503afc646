"""The stage orchestrator: SFT -> reward model -> PPO, skipping stages that are up to date.

A stage is up to date when `<output_dir>/<stage>/stage.json` records the same fingerprint: a hash
of the stage's config section, the seed, the DeepSpeed configs and the content of its inputs (data
files, and the fingerprints of the stages whose models it reads). An unfinished stage resumes from
its newest intact checkpoint (see pipeline/checkpoint.py).
Here: the checks before the first stage (agreed over ranks), running the stages, the summary and
the launchers' entry point. What each stage reads: pipeline/inputs.py; its identity and
fingerprint: pipeline/fingerprint.py; stop signals: pipeline/stop_signals.py.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

from pipeline import default_task, reward_fns
from pipeline.cli import parse_config
from pipeline.config import Config, save_config
from pipeline.checkpoint import Checkpointer
from pipeline.data import FIELDS, load_role
from pipeline.errors import (
    PREEMPTED_EXIT_CODE,
    Preempted,
    SharedUserError,
    TrainingHalted,
    UserError,
)
from pipeline.fingerprint import fingerprint, identity, up_to_date
from pipeline.inputs import (
    STAGES,
    base_stage,
    check_exists,
    check_given_paths,
    in_task,
    needed_stages,
    needs_task,
    prepare_task,
    reward_members,
    stage_config,
    stage_inputs,
)
from pipeline.monitoring import setup_logging
from pipeline.distributed import collectives, ds_config
from pipeline.distributed.ds_config import ds_configs
from pipeline.stages.common import StageContext
from pipeline.stop_signals import StopRequest

log = logging.getLogger("pipeline")


def _stage_fn(name: str):
    import importlib

    return importlib.import_module(f"pipeline.stages.{base_stage(name)}").run


# ---------------------------------------------------------------- running
def preflight(
    cfg: Config, d: collectives.Dist, stages: tuple[str, ...], out: Path, task: Path
) -> None:
    """What can be checked without running earlier stages fails before the first stage runs, and
    before anything is written (the default task included): input paths, DeepSpeed configs and
    sizes, and every row of every dataset of the user's (a bad prompt file stops the run before
    SFT, not hours later at PPO; the default task's files are generated valid). Each stage checks
    its own inputs again."""
    tokenizers: dict = {}  # loaded once per preflight, only if chat rows need one
    for stage in stages:
        inputs = stage_inputs(cfg, out, task)[stage]
        check_exists(stage, inputs, out)
        ds_configs(cfg, stage, d.world_size)
        # Chat messages are rendered with the stage's tokenizer (before SFT has written its own:
        # the one SFT starts from, which it saves unchanged), loaded only if a dataset needs it.
        tok_path = (
            inputs["tokenizer"]
            if Path(inputs["tokenizer"]).exists() or out not in Path(inputs["tokenizer"]).parents
            else stage_inputs(cfg, out, task)["sft"]["tokenizer"]
        )
        tokenizer = functools.partial(
            _preflight_tokenizer, tokenizers, tok_path, cfg.model.trust_remote_code, task
        )
        for role, spec in inputs.items():
            if role in FIELDS and not in_task(spec, task):
                load_role(spec, role, tokenizer, tok_path)
        for option in ("reward_fn", "eval_reward_fn"):  # importable, and naming a function
            if stage == "ppo" and getattr(cfg.ppo, option):
                reward_fns.load(getattr(cfg.ppo, option), f"ppo.{option}")


def _preflight_tokenizer(cache: dict, path: str, trust_remote_code: bool, task: Path):
    from pipeline.models import load_tokenizer

    if path not in cache and in_task(path, task) and not Path(path).is_dir():  # not written yet
        with tempfile.TemporaryDirectory() as tmp:  # the same tokenizer, built outside the run
            default_task.build_tokenizer(Path(tmp))
            cache[path] = load_tokenizer(tmp, trust_remote_code)
    if path not in cache:
        cache[path] = load_tokenizer(path, trust_remote_code)
    return cache[path]


def _agreed(d: collectives.Dist, check) -> None:
    """`check()` on every rank; if it raised UserError on any, every rank raises the lowest failing
    rank's, so rank 0 reports it once and no rank is left waiting for the others (a path may exist
    on one node and not on another)."""
    try:
        check()
        problem = None
    except UserError as e:
        problem = str(e)
    problems = collectives.all_gather_object(problem) if d.world_size > 1 else [problem]
    for rank, message in enumerate(problems):
        if message:
            raise SharedUserError(
                message if problems[0] else f"on rank {rank} ({node_name()}): {message}"
            )


def run(
    cfg: Config,
    d: collectives.Dist,
    stages: tuple[str, ...] = STAGES,
    stop: StopRequest | None = None,
) -> dict:
    """Run `stages` in order; returns the summary written to `<output_dir>/summary.json`."""
    auto = ds_config.resolve_auto(cfg)
    for name, before, after in (
        ("model.dtype", cfg.model.dtype, auto.model.dtype),
        ("ds_config", cfg.ds_config, auto.ds_config),
        ("ds_inference_config", cfg.ds_inference_config, auto.ds_inference_config),
    ):
        if before != after:
            log.info("%s auto: %s (chosen for this accelerator)", name, after)
    cfg = auto
    stop = stop or StopRequest()
    out = Path(cfg.output_dir)
    task = out / "task"
    stages, not_run = needed_stages(cfg, stages)
    for stage, why in not_run.items():
        log.info("stage %s is not needed: %s.", stage, why)

    def checks():
        """Everything that can be checked before the first stage, before anything is written."""
        check_given_paths(cfg)
        ds_config.check_precision(cfg.model.dtype)
        preflight(cfg, d, stages, out, task)

    _agreed(d, checks)
    if needs_task(cfg, stages):  # else nothing reads it, and it is not written
        prepare_task(cfg, d, out)
    summary_path = out / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    stages = tuple(
        s for stage in stages for s in (reward_members(cfg) if stage == "reward" else (stage,))
    )
    for stage in stages:
        inputs = stage_inputs(cfg, out, task)[stage]
        stage_dir = out / stage
        run_cfg = stage_config(cfg, stage)
        ident = identity(stage, run_cfg, inputs, out)
        fp = fingerprint(ident)
        record = None if cfg.force else up_to_date(stage_dir, fp)
        if record is not None:
            log.info(
                "stage %s is up to date (same inputs and config): skipped. --force reruns it.",
                stage,
            )
            summary[stage] = {**record["results"], "wall_s": record["wall_s"], "skipped": True}
            continue
        checkpointer = Checkpointer(stage_dir, d, cfg.keep_last, ident)
        # A finished stage whose inputs or config changed starts over; an unfinished one resumes.
        finished_before = (stage_dir / "stage.json").is_file()
        resume = (
            checkpointer.find() if cfg.resume and not cfg.force and not finished_before else None
        )
        log.info(
            "stage %s: %s (output %s)",
            stage,
            f"resuming from step {resume.step}" if resume else "starting",
            stage_dir,
        )
        if d.is_main:
            stage_dir.mkdir(parents=True, exist_ok=True)
        collectives.barrier()
        start = time.time()
        results = _stage_fn(stage)(
            StageContext(run_cfg, d, stage_dir, inputs, checkpointer, resume, stop, ident)
        )
        wall = time.time() - start
        collectives.free_memory()  # the stage's engines, before the next stage builds its own
        if d.is_main:
            save_config(run_cfg, stage_dir / "config.yaml")
            (stage_dir / "stage.json").write_text(
                json.dumps(
                    {
                        "fingerprint": fp,
                        "results": results,
                        "wall_s": wall,
                        "inputs": {role: str(spec) for role, spec in inputs.items()},
                    },
                    indent=2,
                )
            )
        summary[stage] = {**results, "wall_s": wall, "skipped": False}
        if d.is_main:
            summary_path.write_text(json.dumps(summary, indent=2))
        collectives.barrier()
    if d.is_main:  # written only after success: a failed run leaves the last good ones in place
        save_config(cfg, out / "config.yaml")
        summary_path.write_text(json.dumps(summary, indent=2))
        print(format_summary(summary), flush=True)
    return summary


def format_summary(summary: dict) -> str:
    lines = [f"{'stage':<8} {'metric':<28} {'value':>12}", "-" * 50]
    for stage, results in summary.items():
        for key, value in results.items():
            shown = f"{value:.4f}" if isinstance(value, float) else str(value)
            lines.append(f"{stage:<8} {key:<28} {shown:>12}")
    return "\n".join(lines)


def node_name() -> str:
    """This process's node: SLURM's node name under SLURM (several may share a host), else the
    host."""
    import os
    import socket

    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def placement(nodes: list[str]) -> str:
    """Rank -> node list as `node1: 0,1; node2: 2,3` (nodes in order of their first rank)."""
    by_node: dict[str, list[int]] = {}
    for rank, node in enumerate(nodes):
        by_node.setdefault(node, []).append(rank)
    return "; ".join(f"{node}: {','.join(map(str, ranks))}" for node, ranks in by_node.items())


def main(stages: tuple[str, ...], description: str, argv: list[str] | None = None) -> None:
    """Entry point of the launchers: parse, run, turn user mistakes into one paragraph + exit 2.

    A mistake every rank meets (SharedUserError, or any before the process group exists) is reported
    by rank 0 alone; the other ranks exit with the same code without repeating it; a mistake met by
    one rank only is printed by that rank. Every rank meets the same mistakes: the command line and
    config file are the same, and the checks before the first stage agree over ranks (`_agreed`).
    Before the process group exists a rank cannot know that rank 0 saw the same, so then the first
    rank of each other node reports too (a config file may be missing on one node only)."""
    stop = StopRequest()
    stop.install()  # first: a signal during start-up is not lost, and the launcher's SIGTERM, sent
    # when a quiet rank exits, does not cut rank 0 off before it has printed the error
    rank = int(
        os.environ.get("RANK", "0")
    )  # the launcher's numbering, until the process group exists
    reports = rank == 0 or os.environ.get("LOCAL_RANK", "0") == "0"
    pg_ready = False  # before the process group, every rank parsed the same command line
    try:
        cfg = parse_config(argv, description)
        d = collectives.init_distributed(cfg.dist_timeout_minutes)
        reports, pg_ready = d.is_main, True
        setup_logging(d.is_main)
        log.info(
            "world size %d, accelerator %s, output %s",
            d.world_size,
            collectives.device(),
            cfg.output_dir,
        )
        log.info("ranks by node: %s", placement(collectives.all_gather_object(node_name())))
        run(cfg, d, stages, stop)
    except Preempted as e:
        print(f"\nstopped: {e}", file=sys.stderr, flush=True)  # (after a progress bar)
        sys.exit(PREEMPTED_EXIT_CODE)
    except UserError as e:
        if reports or (pg_ready and not isinstance(e, SharedUserError)):  # only this rank may know
            print(f"\nerror: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except TrainingHalted as e:
        print(f"\nstopped: {e}", file=sys.stderr, flush=True)  # (after a progress bar)
        sys.exit(3)
