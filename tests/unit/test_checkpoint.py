"""Tier 1: the pieces of checkpointing that need no process group."""

import json
import random

import numpy as np
import pytest
import torch

from pipeline import checkpoint
from pipeline.checkpoint import identity_diff, rng_state, set_rng_state, verify
from pipeline.distributed.collectives import Dist
from pipeline.monitoring import MetricLogger
from pipeline.stages.common import EpochSampler
from pipeline.stages.ppo_setup import PromptOrder


def _checkpoint(folder):
    """A folder with a tensor file, a JSON file and a manifest describing them."""
    (folder / "model").mkdir(parents=True)
    torch.save({"w": torch.arange(10.0)}, folder / "model" / "states.pt")
    (folder / "state.json").write_text(json.dumps({"step": 3}))
    files = {
        rel: [(folder / rel).stat().st_size, checkpoint._sha256(folder / rel)]
        for rel in checkpoint._files(folder)
    }
    (folder / "manifest.json").write_text(
        json.dumps({"step": 3, "world_size": 1, "identity": {}, "files": files})
    )
    return folder


def test_an_intact_checkpoint_verifies(tmp_path):
    assert verify(_checkpoint(tmp_path / "ck")) is None


@pytest.mark.parametrize(
    "damage,needle",
    [
        (lambda f: (f / "model" / "states.pt").unlink(), "is missing"),
        (
            lambda f: (f / "model" / "states.pt").write_bytes(
                (f / "model" / "states.pt").read_bytes()[:50]
            ),
            "truncated",
        ),
        (lambda f: (f / "state.json").write_text(json.dumps({"step": 4})), "checksum"),
        (
            lambda f: (f / "manifest.json").write_text('{"files": '),
            "manifest.json is missing or unreadable",
        ),
        (lambda f: (f / "manifest.json").unlink(), "manifest.json is missing or unreadable"),
    ],
)
def test_damage_is_reported(tmp_path, damage, needle):
    folder = _checkpoint(tmp_path / "ck")
    damage(folder)
    problem = verify(folder)
    assert problem is not None and needle in problem


class Payload:  # an arbitrary object: unpickling it could run code
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickles_with_arbitrary_objects_are_refused(tmp_path, capsys):
    folder = _checkpoint(tmp_path / "ck")
    evil = folder / "model" / "states.pt"
    torch.save({"w": torch.zeros(2), "x": Payload()}, evil)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["model/states.pt"] = [
        evil.stat().st_size,
        checkpoint._sha256(evil),
    ]  # a consistent manifest
    (folder / "manifest.json").write_text(json.dumps(manifest))
    problem = verify(folder)
    assert problem is not None and "objects other than tensors" in problem
    assert "this must never run" not in capsys.readouterr().out


def test_identity_diff_names_what_changed():
    saved = {
        "section": {"learning_rate": 0.003, "epochs": 1},
        "seed": 42,
        "inputs": {"model": "a" * 64},
    }
    now = {
        "section": {"learning_rate": 0.5, "epochs": 1},
        "seed": 42,
        "inputs": {"model": "b" * 64},
    }
    diff = identity_diff(saved, now)
    assert "section.learning_rate: 0.003 -> 0.5" in diff
    assert any(d.startswith("inputs.model: aaaaaaaaaaaa... -> bbbbbbbbbbbb...") for d in diff)
    assert len(diff) == 2


def test_random_states_round_trip_through_a_weights_only_file(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    torch.save({"rng": rng_state()}, tmp_path / "r.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(torch.load(tmp_path / "r.pt", weights_only=True)["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def _dist(rank, world):
    return Dist(rank, world, rank, world)


def test_epoch_sampler_matches_distributed_sampler_order():
    from torch.utils.data import DistributedSampler

    for rank in range(2):
        ours = EpochSampler(103, seed=5, d=_dist(rank, 2))
        ref = DistributedSampler(
            range(103), num_replicas=2, rank=rank, shuffle=True, seed=5, drop_last=True
        )
        ours.set_epoch(3)
        ref.set_epoch(3)
        assert list(ours) == list(ref)


def test_epoch_sampler_skips_exactly_the_consumed_samples_on_any_rank_count():
    """Two ranks consumed 3 global batches of 8; the rest of the epoch, on 1 or 2 ranks, is the
    rest of the same permutation."""
    two = [list(EpochSampler(64, 0, _dist(r, 2))) for r in range(2)]
    consumed = {i for r in range(2) for i in two[r][:12]}  # 3 steps x 4 rows per rank
    assert len(consumed) == 24
    for world in (1, 2, 4):
        rest = []
        for r in range(world):
            s = EpochSampler(64, 0, _dist(r, world))
            s.set_epoch(0, skip=24)
            rest += list(s)
        assert sorted(rest) == sorted(set(range(64)) - consumed)


def test_prompt_order_resumes_mid_pass(tmp_path):
    a = PromptOrder(10, seed=3)
    a.take(4), a.take(4)
    state = json.loads(json.dumps(a.state_dict()))
    expected = [a.take(4) for _ in range(3)]  # crosses into the next pass
    b = PromptOrder(10, seed=3)
    b.load_state_dict(state)
    assert [b.take(4) for _ in range(3)] == expected


def test_metric_logger_drops_rows_after_the_resumed_step(tmp_path):
    log = MetricLogger(tmp_path, enabled=True)
    for step in range(1, 6):
        log.log(step, {"x": float(step)})
    log.close()
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 6, "x"')  # a torn line from a killed run
    log = MetricLogger(tmp_path, enabled=True, resume_step=3)
    log.log(4, {"x": 40.0})
    log.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["x"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]
