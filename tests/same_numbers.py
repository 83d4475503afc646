"""Whether two pipeline runs computed the same numbers: every stage's metrics.jsonl row for row,
without the wall-clock readings (tests/launch_util.VOLATILE), and the final models' weights.

    python tests/same_numbers.py RUN_A RUN_B     # exit 0 when equal, 1 with the first difference

The rule for a refactor: a tiny run before and a tiny run after it (same command, same seed) are
the same numbers.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from launch_util import metric_rows  # noqa: E402


def differences(a: Path, b: Path) -> list[str]:
    out = []
    for stage in ("sft", "reward", "ppo"):
        ra, rb = metric_rows(a / stage / "metrics.jsonl"), metric_rows(b / stage / "metrics.jsonl")
        if len(ra) != len(rb):
            out.append(f"{stage}: {len(ra)} vs {len(rb)} metric rows")
        for i, (x, y) in enumerate(zip(ra, rb)):
            if x != y:
                keys = sorted(k for k in set(x) | set(y) if x.get(k) != y.get(k))
                out.append(
                    f"{stage} row {i} (step {x.get('step')}): {', '.join(keys[:6])} differ, "
                    f"e.g. {keys[0]}: {x.get(keys[0])} vs {y.get(keys[0])}"
                )
                break
        ma, mb = (
            a / stage / "model" / "model.safetensors",
            b / stage / "model" / "model.safetensors",
        )
        if ma.is_file() and mb.is_file() and ma.read_bytes() != mb.read_bytes():
            out.append(f"{stage}: the final model's weights differ")
    return out


if __name__ == "__main__":
    found = differences(Path(sys.argv[1]), Path(sys.argv[2]))
    print("\n".join(found) if found else "same numbers")
    sys.exit(1 if found else 0)
