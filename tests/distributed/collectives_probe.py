"""Run under `deepspeed --num_gpus 2`: `verify <folder>` has both ranks find the newest intact
checkpoint of a fake stage, each hashing a share of the files; `timeout <folder> <minutes> <late_s>`
has rank 1 arrive at a barrier late_s seconds late, or as soon as rank 0 has written its report
(a rank 0 that timed out does not wait for it: the launcher then ends without the rest of the
sleep); `verify+timeout <folder> <minutes> <late_s>` does both in one process group (saves a
launcher and rank start-up). Each rank writes <folder>/<mode>.rank<R> (JSON). Used by
test_collectives_two_ranks.py."""

import json
import sys
import time
from pathlib import Path

from pipeline import checkpoint
from pipeline.distributed import collectives


def fake_checkpoint(root: Path, step: int, identity: dict) -> None:
    """A checkpoint folder with six files of different sizes and a manifest (rank 0 writes it)."""
    folder = root / f"step_{step:08d}"
    folder.mkdir(parents=True)
    for i in range(5):
        (folder / f"shard_{i}.bin").write_bytes(bytes([i]) * (1000 * (i + 1)))
    (folder / "state.json").write_text(json.dumps({"step": step}))
    files = {
        n: [(folder / n).stat().st_size, checkpoint._sha256(folder / n)]
        for n in checkpoint._files(folder)
    }
    (folder / checkpoint.MANIFEST).write_text(
        json.dumps(
            {"format": 1, "step": step, "world_size": 2, "identity": identity, "files": files}
        )
    )
    (root / "latest").write_text(folder.name)


def verify_mode(d: collectives.Dist, folder: Path) -> dict:
    identity = {"probe": 1}
    root = folder / "stage" / "checkpoints"
    if d.is_main:
        fake_checkpoint(root, 1, identity)
        fake_checkpoint(root, 2, identity)
    collectives.barrier()
    hashed = []
    inner = checkpoint._sha256
    checkpoint._sha256 = lambda p: hashed.append(f"{p.parent.name}/{p.name}") or inner(p)
    ckpt = checkpoint.Checkpointer(folder / "stage", d, keep_last=2, identity=identity)
    intact = ckpt.find()
    hashed_intact = list(hashed)
    # damage the file of step 2 that rank 1 verifies: both ranks must fall back to step 1
    if d.is_main:
        files = json.loads((root / "step_00000002" / checkpoint.MANIFEST).read_text())["files"]
        victim = checkpoint.share(files, 1, 2)[0]
        (root / "step_00000002" / victim).write_bytes(b"damaged")
    collectives.barrier()
    hashed.clear()
    fallback = ckpt.find()
    return {
        "intact_step": intact.step,
        "hashed_intact": hashed_intact,
        "fallback_step": fallback.step,
        "universal": intact.universal,
    }


def timeout_mode(d: collectives.Dist, folder: Path, late_s: float) -> dict:
    if d.rank == 1:  # late by late_s, or until rank 0 has given up and written its report
        deadline = time.monotonic() + late_s
        while time.monotonic() < deadline and not (folder / "timeout.rank0").exists():
            time.sleep(0.1)
    start = time.monotonic()
    try:
        collectives.barrier()
        error = None
    except Exception as e:  # noqa: BLE001 - what the timeout raises is torch's business
        error = f"{type(e).__name__}: {e}"[:300]
    return {"error": error, "waited_s": time.monotonic() - start}


def main() -> None:
    modes, folder, *rest = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    folder = Path(folder)
    minutes = float(rest[0]) if rest else 120.0
    d = collectives.init_distributed(minutes)
    for mode in modes.split("+"):
        assert mode in ("verify", "timeout"), mode
        out = (
            verify_mode(d, folder) if mode == "verify" else timeout_mode(d, folder, float(rest[1]))
        )
        (folder / f"{mode}.rank{d.rank}").write_text(json.dumps(out))
    sys.stdout.flush()
    import os

    os._exit(0)  # a rank whose peer timed out must not wait for it in the process group's teardown


if __name__ == "__main__":
    main()
