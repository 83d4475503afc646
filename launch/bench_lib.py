"""The benchmark's pure parts (tests/unit/test_bench.py): the workload's shape (`Workload`,
`SMOKE`, `LARGE`; `num_params`), FLOP counting, the targets and their checks, the markdown table
and the strict JSON; `median` for timings. No torch, no ranks: measuring and the plain-PyTorch
floor are in bench_floor.py, the real stage, the report and the command line in bench.py.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from statistics import median as median  # raises StatisticsError (a ValueError) when empty
from typing import Any


@dataclass(frozen=True)
class Workload:
    """Shape of all four models (Llama, untied embeddings) and the PPO batch."""

    layers: int = 6
    hidden: int = 384
    intermediate: int = 1024
    heads: int = 6
    vocab: int = 8000
    prompts: int = 16  # per iteration, over all ranks
    prompt_len: int = 32  # tokens, BOS included
    new_tokens: int = 64  # exactly: min_new_tokens = max_new_tokens
    mini_batch: int = 8  # rows per optimizer step, over all ranks
    micro_batch: int = 4  # rows per rank per forward (lowered when a rank's mini-batch is smaller)
    warmup: int = 1
    repeats: int = 5
    matmul_n: int = 2048  # side of the fp32 matrices timed for the machine's matmul FLOP/s


SMOKE = Workload(
    layers=2,
    hidden=64,
    intermediate=128,
    heads=2,
    vocab=512,
    prompts=4,
    prompt_len=8,
    new_tokens=8,
    mini_batch=2,
    micro_batch=1,
    warmup=1,
    repeats=3,
    matmul_n=256,
)
# ~4x the default's parameters per model (68.9M against 16.8M: num_params), the same batch
LARGE = Workload(layers=8, hidden=768, intermediate=2048, heads=12, vocab=8000, repeats=3)
WORKLOADS = {"default": Workload(), "large": LARGE}  # bench.py --workload
TARGETS = {
    "hybrid/floor generation": ("<=", 1.3),
    "naive/hybrid generation": (">=", 5.0),
    # issue #15's targets: the whole iteration and each phase against the floor's same phase
    "iteration/floor": ("<=", 1.25),
    "generation incl. pi_old/floor": ("<=", 1.15),
    "scoring/floor": ("<=", 1.3),
    "training/floor": ("<=", 1.5),
    # the materialised actor copy once a generation phase is over, largest rank (bytes): must be 0
    "materialised bytes after generation": ("<=", 0),
}


def model_shape(w: Workload) -> dict[str, Any]:
    """The LlamaConfig fields of the workload's models (untied embeddings, as many KV heads as
    heads): what write_fixtures builds and `num_params` counts."""
    return dict(
        vocab_size=w.vocab,
        hidden_size=w.hidden,
        num_hidden_layers=w.layers,
        num_attention_heads=w.heads,
        num_key_value_heads=w.heads,
        intermediate_size=w.intermediate,
        tie_word_embeddings=False,
    )


# ---------------------------------------------------------------- FLOP counting
def body_params(w: Workload) -> int:
    """Weights of the transformer blocks, each used once per position: q, k, v, o (h x h each, as
    many KV heads as heads) and the gated MLP (3 x h x I). Embedding lookups cost no FLOPs."""
    return w.layers * (4 * w.hidden**2 + 3 * w.hidden * w.intermediate)


def num_params(w: Workload) -> int:
    """Parameters of the causal LM (LlamaForCausalLM, untied embeddings): the embedding and the
    LM head (vocab x hidden each), the blocks (body_params), two RMSNorm weights per layer and
    the final norm (hidden each). The scalar models differ only in their head (hidden x 1)."""
    return 2 * w.vocab * w.hidden + body_params(w) + (2 * w.layers + 1) * w.hidden


def forward_flops(
    w: Workload, positions: int, pairs: int, head_positions: int, head_width: int
) -> int:
    """FLOPs of one forward of one sequence:

        2 * body_params * positions                  one multiply-add per weight and position
      + 4 * layers * hidden * pairs                  attention QK^T and A.V: a multiply-add each per
                                                     attended (query, key) pair and hidden unit
      + 2 * hidden * head_width * head_positions     output head, vocab wide (LM) or 1 (scalar)
    Norms, softmax, rotary embeddings and optimizer updates are elementwise and not counted.
    """
    return (
        2 * body_params(w) * positions
        + 4 * w.layers * w.hidden * pairs
        + 2 * w.hidden * head_width * head_positions
    )


def iteration_flops(w: Workload, epochs: int = 1) -> dict[str, int]:
    """FLOPs of one PPO iteration on the whole batch, per phase and in total.

    T = prompt_len + new_tokens; a causal pass over n positions attends n(n+1)/2 pairs. Generation
    decodes with a KV cache (T - 1 positions, logits for the new_tokens sampled) and re-reads the
    rollout for pi_old (actor over T); scoring is the reference (LM head) plus critic and reward
    model (scalar heads) over T; training is, per epoch, actor and critic forward + backward over T,
    counted as 3 x the forward.
    """
    T, pairs = w.prompt_len + w.new_tokens, lambda n: n * (n + 1) // 2
    lm = forward_flops(w, T, pairs(T), T, w.vocab)
    scalar = forward_flops(w, T, pairs(T), T, 1)
    decode = forward_flops(w, T - 1, pairs(T - 1), w.new_tokens, w.vocab)
    row = {
        "generation": decode + lm,
        "scoring": lm + 2 * scalar,
        "training": epochs * 3 * (lm + scalar),
    }
    out = {k: v * w.prompts for k, v in row.items()}
    return {**out, "total": sum(out.values())}


def check(name: str, value: float) -> dict:
    """A compared figure, its target (TARGETS: <=, >= or "within" x of 1) and whether it is met."""
    op, bound = TARGETS[name]
    met = (
        math.isfinite(value)
        and {"<=": value <= bound, ">=": value >= bound, "within": abs(value - 1) <= bound}[op]
    )
    target = f"within {bound:.0%} of 1" if op == "within" else f"{op} {bound:g}"
    return {"figure": name, "value": value, "target": target, "met": met}


def _fmt(v: Any) -> str:
    """A table cell: 3 significant digits (exponent from 1e4), lists comma-separated, yes/**no**."""
    if isinstance(v, list):
        return ", ".join(_fmt(x) for x in v)
    if isinstance(v, bool):
        return "yes" if v else "**no**"
    return (f"{v:.3g}" if abs(v) < 1e4 else f"{v:.3e}") if isinstance(v, float) else str(v)


def _workload_name(results: dict) -> str:
    """SMOKE for a smoke run, else the --workload name (default when not recorded)."""
    return "SMOKE" if results["smoke"] else results.get("workload_name", "default")


def format_table(results: dict) -> str:
    """Markdown: a line of context (date, machine, versions, ranks), then
    figure | value | target | met."""
    m = results["machine"]
    lines = [
        f"Benchmark {results['date']} ({_workload_name(results)} workload): "
        f"{m['platform']}, {m['cores']} cores ({m['cpu']}), torch {m['torch']}, deepspeed "
        f"{m['deepspeed']}, transformers {m['transformers']}; {results['world_size']} rank(s) x "
        f"{results['threads_per_rank']} thread(s)",
        "",
        "| figure | value | target | met |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {c['figure']} | {_fmt(c['value'])} | {c['target']} | {_fmt(c['met'])} |"
        for c in results["checks"]
    ]
    lines += [f"| {name} | {_fmt(value)} | | |" for name, value in results["figures"].items()]
    return "\n".join(lines)


def write_json(path: str | Path, results: dict) -> None:
    """The results as strict JSON (non-finite numbers become null)."""

    def clean(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return None if isinstance(x, float) and not math.isfinite(x) else x

    Path(path).write_text(json.dumps(clean(results), indent=2, allow_nan=False) + "\n")
