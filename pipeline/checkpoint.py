"""Periodic checkpoints that survive crashes and full disks, and exact resume.

Layout under `<stage_dir>/checkpoints/`:

    step_00000040/          one checkpoint; the folder name carries the step
        <engine>/           DeepSpeed's ZeRO-3 checkpoint of each engine: this rank's partition of
                            the weights, the optimizer and the scheduler, one file pair per rank
        state.json          the stage's own state: step, data position, KL controller, ...
        rank_00000.pt       each rank's random states and rank-local state (loaded weights_only)
        manifest.json       written last: size and sha256 of every file, the world size and the
                            run identity (what must match for a resume)
    latest                  the name of the newest good checkpoint; replaced atomically, last
    .tmp_step_00000040/     a checkpoint being written; never read
    universal_step_.../     DeepSpeed's universal form, made when resuming on another rank count

Saving writes into the temporary folder, verifies it against the manifest, renames it into place,
then updates `latest`; a crash at any moment leaves the previous checkpoint usable. Loading checks
the manifest (sizes, checksums) and that every pickle holds only tensors and DeepSpeed's known
types, and falls back to an older checkpoint when the newest is damaged.

No DeepSpeed here: each engine's own files are written, read and converted by
pipeline/distributed/checkpoint.py, and every collective comes from
pipeline/distributed/collectives.py. Not here either: the stop signals that ask for a last
checkpoint (pipeline/stop_signals.py), what a stage's identity holds (pipeline/fingerprint.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.distributed import collectives
from pipeline.distributed.checkpoint import load_engine, safe_globals, save_engine, to_universal
from pipeline.errors import CheckpointError, UserError

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
FORMAT = 1


@dataclass(frozen=True)
class Resume:
    """A verified checkpoint to resume from."""

    path: Path
    step: int
    world_size: int  # ranks that wrote it
    state: dict  # the stage's state.json
    universal: bool  # written by a different number of ranks: load DeepSpeed's universal form


# ---------------------------------------------------------------- random states
def rng_state() -> dict:
    """Python, numpy, torch and accelerator random states, as tensors and plain lists."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
        "accelerator": collectives.accelerator_rng_state(),
    }


def set_rng_state(s: dict) -> None:
    version, internal, gauss = s["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = s["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(s["torch"])
    collectives.set_accelerator_rng_state(s["accelerator"])


# ---------------------------------------------------------------- files
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _files(folder: Path) -> list[str]:
    return sorted(
        str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST
    )


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def check_pickle(path: Path) -> None:
    """Raise if `path` holds anything but tensors, containers and DeepSpeed's known types.

    DeepSpeed itself loads checkpoints with `weights_only=False`; this check (weights_only, tensors
    memory-mapped so it reads little) runs on every file first, so no arbitrary object from a
    checkpoint folder is ever unpickled.
    """
    with torch.serialization.safe_globals(safe_globals()):
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def share(files: dict, rank: int, world: int) -> list[str]:
    """The manifest entries (`files`: name -> [size, sha256]) that `rank` of `world` verifies: the
    biggest file first to the least loaded rank, so each rank reads about 1/world of the bytes.
    Every rank computes the same split from the same manifest."""
    load, mine = [0] * world, []
    for name in sorted(files, key=lambda n: (-files[n][0], n)):
        r = load.index(min(load))
        load[r] += files[name][0] + 1
        if r == rank:
            mine.append(name)
    return mine


def verify(folder: Path, rank: int = 0, world: int = 1) -> str | None:
    """None if `folder` is a complete, intact checkpoint as far as `rank`'s share of its files goes
    (the whole of it for one rank); else what is wrong with it."""
    manifest = folder / MANIFEST
    try:
        m = json.loads(manifest.read_text())
        files = m["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{manifest} is missing or unreadable ({e.__class__.__name__}: {e})"
    for rel in share(files, rank, world):
        size, digest = files[rel]
        p = folder / rel
        if not p.is_file():
            return f"{p} is missing"
        if p.stat().st_size != size:
            return f"{p} has {p.stat().st_size} bytes, the manifest says {size} (truncated?)"
        if _sha256(p) != digest:
            return f"{p} does not match its checksum"
        if p.suffix == ".pt":
            try:
                check_pickle(p)
            except Exception as e:  # noqa: BLE001 - any failure means: do not load this file
                return (
                    f"{p} holds objects other than tensors and DeepSpeed's state "
                    f"({e.__class__.__name__})"
                )
    return None


def _step_of(folder: Path) -> int:
    return int(folder.name.split("_")[-1])


def identity_diff(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Human-readable differences between two nested identities."""
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key, "<absent>"), current.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += identity_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {_shortened(a)} -> {_shortened(b)}")
    return out


def _shortened(value):
    """A value as shown in an identity difference: long ones (hashes, file lists) cut to 12
    characters."""
    return value if len(str(value)) <= 40 else str(value)[:12] + "..."


# ---------------------------------------------------------------- the checkpointer
class Checkpointer:
    """Saves and finds the checkpoints of one stage. Every method is called on every rank."""

    def __init__(self, stage_dir: Path, d: collectives.Dist, keep_last: int, identity: dict):
        self.root = stage_dir / "checkpoints"
        self.d = d
        self.keep_last = keep_last
        self.identity = identity

    # ------------------------------------------------------------ finding
    def find(self) -> Resume | None:
        """The newest intact checkpoint (damaged ones are reported and skipped), or None.

        Every rank verifies a share of each candidate's files (an 8B actor's checkpoint is ~100 GB:
        rank 0 alone would take longer than a collective may wait). Raises UserError when it was
        written by a run with a different model, data or config.
        """
        candidates = collectives.broadcast_object(self._candidates() if self.d.is_main else None)
        for folder in map(Path, candidates):
            problems = collectives.all_gather_object(verify(folder, self.d.rank, self.d.world_size))
            problem = next((p for p in problems if p), None)
            if problem:
                log.warning("checkpoint %s is damaged and will not be used: %s", folder, problem)
                continue
            found = collectives.broadcast_object(self._read(folder) if self.d.is_main else None)
            if isinstance(found, str):
                raise UserError(found)
            path, step, world, state = found
            return Resume(Path(path), step, world, state, universal=world != self.d.world_size)
        if candidates:
            log.warning("no intact checkpoint in %s: starting the stage over", self.root)
        return None

    def _candidates(self) -> list[str]:
        """Checkpoint folders to try, best first: the one `latest` names, then newest to oldest."""
        if not self.root.is_dir():
            return []
        candidates = sorted(
            (p for p in self.root.glob("step_*") if p.is_dir()), key=_step_of, reverse=True
        )
        pointer = self.root / "latest"
        named = pointer.read_text().strip() if pointer.is_file() else None
        if named and (self.root / named).is_dir():
            candidates.sort(key=lambda p: p.name != named)
        return [str(p) for p in candidates]

    def _read(self, folder: Path):
        """(path, step, world size, state) of a verified checkpoint, or why this run cannot use
        it."""
        m = json.loads((folder / MANIFEST).read_text())
        if m.get("identity") != self.identity:
            diff = identity_diff(m.get("identity", {}), self.identity)
            return (
                f"checkpoint {folder} was written by a run with a different model, data or "
                f"config ({'; '.join(diff[:6])}{'; ...' if len(diff) > 6 else ''}), so this run "
                f"cannot resume from it. Rerun with the same settings to resume, or pass "
                f"--resume false to start the stage over (its checkpoints are then deleted)."
            )
        state = json.loads((folder / "state.json").read_text())
        return str(folder), m["step"], m["world_size"], state

    def clear(self) -> None:
        """Delete every checkpoint of the stage (starting over)."""
        if self.d.is_main:
            shutil.rmtree(self.root, ignore_errors=True)
        collectives.barrier()

    # ------------------------------------------------------------ loading
    def load(self, resume: Resume, models: dict) -> dict | None:
        """Load every engine in `models` (tag -> engine) and this rank's random and local state.

        Returns this rank's local state, or None when the checkpoint was written by a different
        number of ranks (then the engines come from DeepSpeed's universal form, and random
        states are re-seeded by the caller).
        """
        folder = resume.path
        if resume.universal:  # converted afresh from the verified checkpoint every time
            folder = self._convert(resume, list(models))
        for tag, engine in models.items():
            load_engine(engine, folder, tag)
        if resume.universal:
            return None
        own = torch.load(
            resume.path / f"rank_{self.d.rank:05d}.pt", map_location="cpu", weights_only=True
        )
        set_rng_state(own["rng"])
        return own["local"]

    def _convert(self, resume: Resume, tags: list[str]) -> Path:
        """DeepSpeed's universal form of every engine in `tags`: the engines are shared out over
        the ranks, each converted with this rank's threads as workers. Raises on every rank if any
        conversion failed."""
        folder = self.root / f"universal_{resume.path.name}"
        if self.d.is_main:
            shutil.rmtree(folder, ignore_errors=True)
        collectives.barrier()
        errors = []
        for tag in tags[self.d.rank :: self.d.world_size]:
            try:
                to_universal(resume.path / tag, folder / tag, workers=torch.get_num_threads())
            except RuntimeError as e:
                errors.append(str(e))
        errors = self._agree(errors)
        if errors:
            raise RuntimeError(errors[0])
        return folder

    def every_local(self, resume: Resume) -> list[dict]:
        """The rank-local state of every rank that wrote `resume`, in rank order (to re-cut per-rank
        state for another rank count). Tensors are memory-mapped: a caller reads only what it
        slices."""
        return [
            torch.load(
                resume.path / f"rank_{r:05d}.pt", map_location="cpu", weights_only=True, mmap=True
            )["local"]
            for r in range(resume.world_size)
        ]

    # ------------------------------------------------------------ saving
    def save(self, step: int, models: dict, state: dict, local: dict | None = None) -> Path:
        """Write checkpoint `step`: engines, `state` (rank 0's, JSON), `local` (every rank's).

        Raises CheckpointError (on every rank) when any rank could not write; the previous
        checkpoint and `latest` are then untouched.
        """
        final = self.root / f"step_{step:08d}"
        tmp = self.root / f".tmp_{final.name}"
        errors: list[str] = []
        if self.d.is_main:
            try:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            except OSError as e:
                errors.append(f"{tmp}: {e.strerror or e}")
        errors = self._agree(errors)
        if not errors:
            for tag, engine in models.items():
                errors += save_engine(engine, tmp, tag)
            try:
                torch.save(
                    {"rng": rng_state(), "local": local or {}}, tmp / f"rank_{self.d.rank:05d}.pt"
                )
                if self.d.is_main:
                    _write_atomic(tmp / "state.json", json.dumps(state))
            except (
                OSError,
                RuntimeError,
            ) as e:  # (torch.save reports failed writes as RuntimeError)
                errors.append(f"{tmp}: {e.strerror or e}")
            errors = self._agree(errors)
        if not errors:  # every rank hashes a share of the files
            names = _files(tmp)
            mine = {
                n: [(tmp / n).stat().st_size, _sha256(tmp / n)]
                for n in names[self.d.rank :: self.d.world_size]
            }
            files = {k: v for part in collectives.all_gather_object(mine) for k, v in part.items()}
            if self.d.is_main:
                try:
                    self._commit(tmp, final, step, files)
                except OSError as e:
                    errors.append(f"{tmp}: {e.strerror or e}")
            errors = self._agree(errors)
        if errors:
            if self.d.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            collectives.barrier()
            previous = self._latest_name()
            free = shutil.disk_usage(self.root).free / 2**30
            if previous:
                fallback = f"The previous checkpoint {self.root / previous} is intact"
            else:
                fallback = "There is no earlier checkpoint"
            raise CheckpointError(
                f"the checkpoint of step {step} could not be written ({errors[0]}; {free:.1f} GiB "
                "free on that file system, or a file-size limit). "
                f"{fallback}; "
                "free some space and rerun the same command to resume from it."
            )
        log.info("checkpoint saved: %s", final)
        return final

    def _commit(self, tmp: Path, final: Path, step: int, files: dict) -> None:
        manifest = {
            "format": FORMAT,
            "step": step,
            "world_size": self.d.world_size,
            "identity": self.identity,
            "files": files,
        }
        _write_atomic(tmp / MANIFEST, json.dumps(manifest, indent=1))
        # The checksums were computed by reading the written files back (that is the verification);
        # hashing them again here would double the cost of every save. What is left to check is
        # that the manifest itself landed and lists every file.
        listed = json.loads((tmp / MANIFEST).read_text())["files"]
        assert set(listed) == set(_files(tmp)), "manifest and checkpoint folder disagree"
        if final.exists():  # a damaged one of the same step, skipped at load time
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_atomic(self.root / "latest", final.name)
        self._prune(keep=final)

    def _prune(self, keep: Path) -> None:
        steps = sorted(
            (p for p in self.root.glob("step_*") if p.is_dir()), key=_step_of, reverse=True
        )
        for old in [p for p in steps if p != keep][max(self.keep_last - 1, 0) :]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in (*self.root.glob("universal_*"), *self.root.glob(".tmp_*")):
            shutil.rmtree(stale, ignore_errors=True)

    def _latest_name(self) -> str | None:
        pointer = self.root / "latest"
        return pointer.read_text().strip() if pointer.is_file() else None

    def _agree(self, errors: list[str]) -> list[str]:
        """Every rank's errors, on every rank (so all ranks take the same branch)."""
        return [e for part in collectives.all_gather_object(errors) for e in part]
