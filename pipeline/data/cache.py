"""The tokenised-example cache: examples built once per node, stored by the content hash of the
data, the tokenizer and the data options, with the warnings their build logged.

Not here: building the examples (tokenize.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from pipeline.data.tokenize import EXAMPLES_VERSION
from pipeline.errors import UserError

log = logging.getLogger(
    __package__
)  # "pipeline.data": build_cached holds back this logger's warnings


def examples_cache_file(cache_dir: str, stage: str, role: str, identity: dict) -> Path:
    """Where the examples of a stage's data role are cached: keyed by the content hash of the data
    and the tokenizer (from the stage's identity, see fingerprint.identity) and the data options."""
    key = hashlib.sha256(
        json.dumps(
            {
                "role": role,
                "data": identity["inputs"][role],
                "tokenizer": identity["inputs"]["tokenizer"],
                "options": identity["data"],
                "trust_remote_code": identity["model"]["trust_remote_code"],
                "version": EXAMPLES_VERSION,
            },
            sort_keys=True,
        ).encode()
    ).hexdigest()
    root = (
        Path(cache_dir)
        if cache_dir
        else Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "rlhf-pipeline"
    )
    return root / "tokenized" / f"{stage}-{role}-{key[:32]}.json"


def build_cached(path: Path, build) -> str | None:
    """Build examples and write them, with the warnings the build logged (truncations), to `path`
    (atomically: several nodes may share the folder). Returns an error message, or None.

    The warnings are held back, not logged here: `read_cached` logs them, so every run, the one
    that built the file included, says them once."""
    notes: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: (
        notes.append(record.getMessage())
        if record.levelno >= logging.WARNING
        else log.parent.handle(record)
    )
    log.addHandler(handler)
    propagate, log.propagate = log.propagate, False
    try:
        rows = build()
    except UserError as e:
        rows, error = None, str(e)
    finally:
        log.removeHandler(handler)
        log.propagate = propagate
    if rows is None:
        for note in notes:  # what the build found before it failed
            log.warning("%s", note)
        return error
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"notes": notes, "examples": rows}))
        os.replace(tmp, path)
    except OSError as e:
        if tmp.is_file():
            tmp.unlink()
        return (
            f"the tokenised-data cache {path} could not be written ({e.strerror or e}); free space "
            f"there or set --cache_dir."
        )
    return None


def read_cached(path: Path) -> list[dict]:
    """Examples written by `build_cached`; the build's warnings are logged again."""
    cached = json.loads(path.read_text())
    for note in cached["notes"]:
        log.warning("%s", note)
    return cached["examples"]
