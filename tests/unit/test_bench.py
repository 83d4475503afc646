"""Unit tests for the benchmark's pure parts (launch/bench_lib.py): FLOP counting, targets,
table, JSON. The benchmark is a launcher script, not part of the package: launch/ is put on
sys.path as `deepspeed launch/bench.py` puts it."""

import json
import math
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "launch"))
from bench_lib import (
    LARGE,
    SMOKE,
    TARGETS,
    WORKLOADS,
    Workload,
    body_params,
    check,
    format_table,
    forward_flops,  # noqa: E402
    iteration_flops,
    model_shape,
    num_params,
    write_json,
)

TINY = Workload(
    layers=1, hidden=2, intermediate=3, heads=1, vocab=5, prompts=2, prompt_len=2, new_tokens=2
)


def test_body_params_of_the_benchmark_model():
    # 6 layers x (q, k, v, o: 4 x 384^2 + gated MLP: 3 x 384 x 1024)
    assert body_params(Workload()) == 6 * (4 * 384 * 384 + 3 * 384 * 1024) == 10_616_832


def test_forward_flops_by_hand():
    # body: 4 * 2^2 + 3 * 2 * 3 = 34 weights -> 2 * 34 * 4 positions = 272
    # attention: 4 * 1 layer * 2 hidden * 10 pairs = 80;
    # head: 2 * 2 hidden * 5 wide * 3 positions = 60
    assert (
        forward_flops(TINY, positions=4, pairs=10, head_positions=3, head_width=5) == 272 + 80 + 60
    )


def test_iteration_flops_phases_by_hand():
    T = TINY.prompt_len + TINY.new_tokens  # 4 positions, 10 causal pairs
    lm = forward_flops(TINY, T, 10, T, TINY.vocab)
    scalar = forward_flops(TINY, T, 10, T, 1)
    decode = forward_flops(TINY, T - 1, 6, TINY.new_tokens, TINY.vocab)
    f = iteration_flops(TINY, epochs=2)
    assert f["generation"] == 2 * (decode + lm)  # 2 prompts
    assert f["scoring"] == 2 * (lm + 2 * scalar)
    assert f["training"] == 2 * 2 * 3 * (lm + scalar)  # 2 prompts x 2 epochs x (forward + backward)
    assert f["total"] == f["generation"] + f["scoring"] + f["training"]


def test_training_flops_follow_the_6_params_tokens_rule():
    """Attention is a few percent at T = 96: training ~ 6 x (actor + critic matmul params) x
    tokens."""
    w = Workload()
    tokens = w.prompts * (w.prompt_len + w.new_tokens)
    rule = 6 * (2 * body_params(w) + w.hidden * w.vocab + w.hidden) * tokens
    assert 1.0 < iteration_flops(w)["training"] / rule < 1.05


def test_check_against_targets():
    assert (
        check("hybrid/floor generation", 1.3)["met"]
        and not check("hybrid/floor generation", 1.31)["met"]
    )
    assert (
        check("naive/hybrid generation", 5.0)["met"]
        and not check("naive/hybrid generation", 4.9)["met"]
    )
    # a check that can fail: one byte of the materialised copy left after generation fails it
    assert check("materialised bytes after generation", 0)["met"]
    assert not check("materialised bytes after generation", 1)["met"]
    assert not check("iteration/floor", math.nan)["met"]
    assert check("iteration/floor", 1.0)["target"] == "<= 1.25"
    assert check("iteration/floor", 1.25)["met"] and not check("iteration/floor", 1.26)["met"]
    assert check("training/floor", 1.5)["met"] and not check("training/floor", 1.51)["met"]
    assert check("scoring/floor", 1.3)["met"] and not check("scoring/floor", 1.31)["met"]
    assert not check("generation incl. pi_old/floor", 1.16)["met"]
    assert set(TARGETS) == {
        "hybrid/floor generation",
        "naive/hybrid generation",
        "iteration/floor",
        "generation incl. pi_old/floor",
        "scoring/floor",
        "training/floor",
        "materialised bytes after generation",
    }


def _results() -> dict:
    return {
        "date": "2026-01-01T00:00:00+00:00",
        "smoke": True,
        "world_size": 2,
        "threads_per_rank": 1,
        "machine": {
            "platform": "Linux-x",
            "cpu": "some cpu",
            "cores": 2,
            "torch": "2.13.0",
            "deepspeed": "0.19.8",
            "transformers": "5.23.0",
        },
        "checks": [check("hybrid/floor generation", 1.2), check("naive/hybrid generation", 2.0)],
        "figures": {
            "iteration s": 12.345,
            "peak RSS MiB per rank": [600.0, 590.4],
            "FLOPs per iteration": 4.2e11,
        },
    }


def test_format_table():
    lines = format_table(_results()).splitlines()
    assert "SMOKE" in lines[0] and "2 cores" in lines[0] and "deepspeed 0.19.8" in lines[0]
    assert "2 rank(s) x 1 thread(s)" in lines[0]
    assert "| figure | value | target | met |" in lines
    assert "| hybrid/floor generation | 1.2 | <= 1.3 | yes |" in lines
    assert "| naive/hybrid generation | 2 | >= 5 | **no** |" in lines
    assert "| iteration s | 12.3 | | |" in lines
    assert "| peak RSS MiB per rank | 600, 590 | | |" in lines
    assert "| FLOPs per iteration | 4.200e+11 | | |" in lines


def test_write_json_is_strict(tmp_path):
    results = _results()
    results["checks"].append(check("iteration/floor", math.nan))
    path = tmp_path / "bench.json"
    write_json(path, results)
    text = path.read_text()
    assert "NaN" not in text
    back = json.loads(text)
    assert back["checks"][2]["value"] is None and back["checks"][2]["met"] is False
    assert back["figures"]["peak RSS MiB per rank"] == [600.0, 590.4]


# ---------------------------------------------------------------- the large workload
def test_num_params_by_the_config_formula():
    # embedding + LM head: 2 x 8000 x 384; blocks: body_params; norms: (2 x 6 + 1) x 384
    assert num_params(Workload()) == 2 * 8000 * 384 + 10_616_832 + 13 * 384 == 16_765_824
    # 2 x 8000 x 768 + 8 x (4 x 768^2 + 3 x 768 x 2048) + 17 x 768
    assert num_params(LARGE) == 12_288_000 + 56_623_104 + 13_056 == 68_924_160


def test_num_params_matches_the_model_the_benchmark_builds():
    import pytest

    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    for w in (Workload(), LARGE, SMOKE):
        config = transformers.LlamaConfig(**model_shape(w))
        with torch.device("meta"):
            model = transformers.LlamaForCausalLM(config)
        assert sum(p.numel() for p in model.parameters()) == num_params(w), w


def test_large_is_about_4x_the_default_with_the_same_batch():
    assert abs(num_params(LARGE) / num_params(Workload()) / 4 - 1) <= 0.10
    batch = ("prompts", "prompt_len", "new_tokens", "mini_batch", "micro_batch", "warmup")
    assert all(getattr(LARGE, k) == getattr(Workload(), k) for k in batch)
    assert LARGE.repeats == 3 and LARGE.hidden % LARGE.heads == 0
    assert WORKLOADS == {"default": Workload(), "large": LARGE}


def test_parse_args_of_the_workload_and_the_budget():
    import pytest

    pytest.importorskip("deepspeed")
    import bench

    args = bench.parse_args([])
    assert (args.workload, args.memory_budget_gb) == ("default", 0.0)
    args = bench.parse_args(["--workload", "large", "--memory_budget_gb", "1.5", "--smoke"])
    assert (args.workload, args.memory_budget_gb, args.smoke) == ("large", 1.5, True)
    with pytest.raises(SystemExit):
        bench.parse_args(["--workload", "huge"])


def test_format_table_names_the_workload():
    results = _results()
    assert "(SMOKE workload)" in format_table(results).splitlines()[0]
    results.update(smoke=False, workload_name="large")
    assert "(large workload)" in format_table(results).splitlines()[0]
