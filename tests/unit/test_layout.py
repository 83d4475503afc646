"""The package layout: DeepSpeed is imported only under pipeline/distributed/.

Every .py under pipeline/ and launch/ is parsed (not imported), so a stray `import deepspeed`,
`from deepspeed.x import y`, or one inside a function body, is found without running anything.
"""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FENCE = REPO / "pipeline" / "distributed"


def deepspeed_imports(path: Path) -> list[int]:
    """Line numbers of every import of deepspeed (or one of its submodules) in `path`."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module or ""]
        else:
            continue
        if any(n == "deepspeed" or n.startswith("deepspeed.") for n in names):
            lines.append(node.lineno)
    return lines


def test_deepspeed_is_imported_only_under_pipeline_distributed():
    files = sorted(p for folder in ("pipeline", "launch") for p in (REPO / folder).rglob("*.py"))
    assert len(files) > 10  # the scan really ran over the package
    outside = [
        f"{p.relative_to(REPO)}:{line}"
        for p in files
        if FENCE not in p.parents
        for line in deepspeed_imports(p)
    ]
    assert not outside, (
        "deepspeed imported outside pipeline/distributed/ (route it through a module "
        "there): " + ", ".join(outside)
    )


def test_the_fence_finds_what_it_looks_for(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import os\nimport deepspeed.comm as c\n\ndef f():\n    from deepspeed import zero\n"
        "from deepspeed_extras import x\nfrom .deepspeed import y\n"
    )
    assert deepspeed_imports(probe) == [2, 5]
    inside = [p for p in FENCE.glob("*.py") if deepspeed_imports(p)]
    assert inside, (
        "pipeline/distributed/ no longer imports deepspeed: the fence checks the wrong place"
    )
