"""The benchmark runs: `deepspeed --num_gpus 2 launch/bench.py --smoke` (tiny models, one measured
call per figure, no warm-up) exits 0 and writes its JSON with every section the README's table
is made from. The figures of a smoke run mean nothing and are not checked, except the one check
that can fail on any workload: no materialised actor weights are left after a generation phase."""

import json

from launch_util import launch

KEYS = {
    "date",
    "machine",
    "smoke",
    "world_size",
    "threads_per_rank",
    "floor_threads",
    "workload",
    "flops_per_iteration",
    "checks",
    "figures",
    "real",
    "floor",
    "placements",
    "critic_scoring",
    "forward_rows",
    "workload_name",
    "memory_budget_gb",
}


def test_bench_smoke_runs_on_two_ranks(tmp_path):
    out = tmp_path / "bench.json"
    args = ("--smoke", "--repeats", "1", "--warmup", "1", "--json", str(out))  # Adam moments exist
    proc = launch("bench.py", *args, num_gpus=2, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert set(results) == KEYS
    assert results["smoke"] is True and results["world_size"] == 2
    checks = {c["figure"]: c for c in results["checks"]}
    assert set(checks) == {
        "hybrid/floor generation",
        "naive/hybrid generation",
        "iteration/floor",
        "generation incl. pi_old/floor",
        "scoring/floor",
        "training/floor",
        "materialised bytes after generation",
    }
    assert checks["materialised bytes after generation"]["met"]
    assert set(results["floor"]) >= {"one_process", "data_parallel", "iteration_s", "phases_s"}
    assert results["placements"] == {"ref": "resident", "reward": "resident"}  # tiny: they fit
    assert results["critic_scoring"] == "materialise"  # and so does the critic's scoring copy
    assert results["workload_name"] == "smoke" and results["memory_budget_gb"] == 0
    assert results["forward_rows"] >= 1
    for rank in results["real"]["memory_bytes"]:  # ZeRO-3: 1/world of each trained model
        for e in ("actor", "critic"):
            part, whole = rank[f"{e}_partition"], rank[f"{e}_whole"]
            assert whole / 2 <= part < whole / 2 + 2**12  # an even split, padded
            # fp32 master partition + Adam's two moments (+ step counters)
            assert 3 * part <= rank[f"{e}_optimizer_state"] < 3 * part + 2**12
    assert "| iteration/floor |" in proc.stdout
