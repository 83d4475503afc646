"""Metric logger files and the over-optimisation plot."""
import json
import math

from pipeline.monitoring import MetricLogger, overoptimisation_plot


def test_metric_logger_writes_jsonl_and_events(tmp_path):
    logger = MetricLogger(tmp_path, enabled=True)
    logger.log(1, {"train/loss": 2.0, "train/lr": 1e-3})
    logger.log(2, {"train/loss": float("nan")})
    logger.text("samples", "| a | b |", 2)
    logger.close()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[0] == {"step": 1, "train/loss": 2.0, "train/lr": 1e-3}
    assert rows[1]["train/loss"] == "nan"  # strict JSON; the value is still visible
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_disabled_logger_writes_nothing(tmp_path):
    logger = MetricLogger(tmp_path / "x", enabled=False)
    logger.log(1, {"a": 1.0})
    logger.close()
    assert not (tmp_path / "x").exists()


def test_overoptimisation_plot(tmp_path):
    rows = [{"step": s, "eval/kl_to_ref": kl, "eval/reward_score": 0.5 * s, "eval/gold_score": math.sin(s)}
            for s, kl in ((0, 0.0), (10, 0.4), (20, 1.5))]
    rows.insert(1, {"step": 5, "train/loss": 1.0})  # other rows are ignored
    assert overoptimisation_plot(rows, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not overoptimisation_plot(rows[:1], tmp_path / "q.png")  # one point is no curve
    assert not (tmp_path / "q.png").exists()
