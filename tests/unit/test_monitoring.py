"""Metric logger files and the over-optimisation plot."""

import json
import math
import time

from pipeline.monitoring import MetricLogger, overoptimisation_plot


def test_metric_logger_writes_jsonl_and_events(tmp_path):
    logger = MetricLogger(tmp_path, enabled=True)
    logger.log(1, {"train/loss": 2.0, "train/lr": 1e-3})
    logger.log(2, {"train/loss": float("nan")})
    logger.text("samples", "| a | b |", 2)
    logger.close()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {k: v for k, v in rows[0].items() if k not in ("time", "elapsed_s")} == {
        "step": 1,
        "train/loss": 2.0,
        "train/lr": 1e-3,
    }
    assert list(rows[0])[:3] == ["step", "time", "elapsed_s"]
    assert rows[1]["train/loss"] == "nan"  # strict JSON; the value is still visible
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_metrics_rows_carry_the_wall_clock_and_the_elapsed_seconds_across_a_resume(tmp_path):
    clock = iter(
        [1000.0, 1005.5, 1010.0, 5000.0, 5002.25]
    ).__next__  # two attempts, over an hour apart
    logger = MetricLogger(tmp_path, enabled=True, clock=clock)  # starts at 1000
    logger.log(1, {"x": 1.0})
    logger.log(2, {"x": 2.0})
    logger.close()
    logger = MetricLogger(tmp_path, enabled=True, resume_step=2, clock=clock)  # resumed at 5000
    logger.log(3, {"x": 3.0})
    logger.close()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["time"], r["elapsed_s"]) for r in rows] == [
        (1, 1005.5, 5.5),
        (2, 1010.0, 10.0),
        (3, 5002.25, 12.25),
    ]  # the gap is not counted


def test_metrics_rows_have_real_unix_timestamps(tmp_path):
    before = time.time()
    logger = MetricLogger(tmp_path, enabled=True)
    logger.log(1, {"x": 1.0})
    logger.close()
    (row,) = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert before - 1 <= row["time"] <= time.time() + 1
    assert 0 <= row["elapsed_s"] <= time.time() - before + 1


def test_disabled_logger_writes_nothing(tmp_path):
    logger = MetricLogger(tmp_path / "x", enabled=False)
    logger.log(1, {"a": 1.0})
    logger.close()
    assert not (tmp_path / "x").exists()


def test_overoptimisation_plot(tmp_path):
    rows = [
        {
            "step": s,
            "eval/kl_to_ref": kl,
            "eval/reward_score": 0.5 * s,
            "eval/gold_score": math.sin(s),
        }
        for s, kl in ((0, 0.0), (10, 0.4), (20, 1.5))
    ]
    rows.insert(1, {"step": 5, "train/loss": 1.0})  # other rows are ignored
    assert overoptimisation_plot(rows, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not overoptimisation_plot(rows[:1], tmp_path / "q.png")  # one point is no curve
    assert not (tmp_path / "q.png").exists()


class FakeAccelerator:
    """Counts synchronize() calls; memory grows by 1 GiB at each call of memory_allocated()."""

    def __init__(self):
        self.syncs, self.allocated = 0, 0

    def synchronize(self):
        self.syncs += 1

    def memory_allocated(self):
        self.allocated += 2**30
        return self.allocated

    def memory_reserved(self):
        return 2 * self.allocated

    def max_memory_allocated(self):
        return 5 * 2**30


def test_phase_timer_synchronises_the_accelerator_around_each_phase_and_records_memory():
    from pipeline.monitoring import PhaseTimer

    acc = FakeAccelerator()
    timer = PhaseTimer(acc)
    with timer("generation"):
        assert acc.syncs == 1  # the previous phase's kernels are done before the clock starts
    assert acc.syncs == 2  # ...and this phase's before it stops
    with timer("training"):
        pass
    assert acc.syncs == 4 and set(timer.seconds) == {"generation", "training"}
    assert timer.memory_metrics() == {
        "memory/accelerator_peak_gb": 5.0,
        "memory/generation_allocated_gb": 1.0,
        "memory/generation_reserved_gb": 2.0,
        "memory/training_allocated_gb": 2.0,
        "memory/training_reserved_gb": 4.0,
    }


def test_on_cpu_there_is_nothing_to_synchronise_and_no_accelerator_memory(monkeypatch):
    from pipeline import monitoring
    from pipeline.monitoring import PhaseTimer, device_accelerator

    assert device_accelerator() is None  # this machine: CPU only
    timer = PhaseTimer()
    ticks = iter(
        [10.0, 10.25, 20.0, 20.5, 30.0, 31.0]
    )  # perf_counter at each phase's start and end
    monkeypatch.setattr(monitoring.time, "perf_counter", lambda: next(ticks))
    for name in ("generation", "training", "generation"):
        with timer(name):
            pass
    assert timer.memory_metrics() == {}
    assert timer.seconds == {"generation": 0.25 + 1.0, "training": 0.5}  # a phase's calls add up
