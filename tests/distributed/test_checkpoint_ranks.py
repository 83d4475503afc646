"""Tier 2: a ZeRO-3 checkpoint written by 2 ranks, resumed on 1 (DeepSpeed's universal form) and on
2, with an EMA of the weights kept on the shards (checked against the EMA of the gathered
weights)."""

import json
import subprocess

import torch
from launch_util import REPO, free_port

PROBE = REPO / "tests" / "distributed" / "checkpoint_probe.py"


def _run(mode: str, folder, ranks: int) -> None:
    cmd = [
        "deepspeed",
        "--master_port",
        str(free_port()),
        "--num_gpus",
        str(ranks),
        str(PROBE),
        mode,
        str(folder),
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _load(path):
    return torch.load(path, weights_only=True)


def test_two_rank_checkpoint_resumes_on_one_and_two_ranks(tmp_path):
    _run("save+load", tmp_path, 2)  # and the load on the same 2 ranks, checked last below
    saved, after2 = _load(tmp_path / "saved.pt"), _load(tmp_path / "after_save_world.pt")

    ema_saved, hand = _load(tmp_path / "ema_saved.pt"), _load(tmp_path / "ema_hand.pt")
    assert ema_saved.keys() == saved.keys()
    for k in saved:  # the shard EMA is the EMA of the full weights after every step
        torch.testing.assert_close(ema_saved[k], hand[k], rtol=0, atol=1e-7, msg=k)
    assert (
        max((ema_saved[k] - saved[k]).abs().max().item() for k in saved) > 1e-4
    )  # not the weights

    _run("load", tmp_path, 1)  # another rank count: through the universal checkpoint
    report = json.loads((tmp_path / "load_report_world1.json").read_text())
    assert report["universal"] is True and report["saved_by"] == 2 and report["local"] is None
    assert report["global_steps"] == 3
    loaded = _load(tmp_path / "loaded_world1.pt")
    assert loaded.keys() == saved.keys()
    for k in saved:  # the weights come back exactly
        assert torch.equal(loaded[k], saved[k]), k
    # The next step on the same global batch matches the 2-rank run: the optimizer moments and
    # the schedule were carried over (a fresh Adam would move every weight by about lr instead).
    ema1 = _load(tmp_path / "ema_loaded_world1.pt")
    assert all(
        torch.equal(ema1[k], ema_saved[k]) for k in saved
    )  # the EMA shards re-cut for 1 rank
    after1 = _load(tmp_path / "after_world1.pt")
    moved = max((after2[k] - saved[k]).abs().max().item() for k in saved)
    for k in saved:
        torch.testing.assert_close(after1[k], after2[k], rtol=1e-5, atol=1e-6, msg=k)
    assert moved > 1e-4  # the step did change the weights (so the comparison means something)

    # the same rank count (loaded in the save launch): the ZeRO files themselves, exactly
    report = json.loads((tmp_path / "load_report_world2.json").read_text())
    assert report["universal"] is False and report["local"] == {"note": "rank-local"}
    assert all(
        torch.equal(_load(tmp_path / "ema_loaded_world2.pt")[k], ema_saved[k]) for k in saved
    )
    after_same = _load(tmp_path / "after_world2.pt")
    for k in saved:
        assert torch.equal(after_same[k], after2[k]), k
