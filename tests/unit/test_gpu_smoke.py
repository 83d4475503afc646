"""scripts/gpu_smoke.sh: on a machine without a GPU it skips cleanly, saying why."""

import os
import subprocess
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_smoke.sh"


def test_the_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="a GPU is here: run scripts/gpu_smoke.sh itself (minutes)"
)
def test_without_a_gpu_it_skips_with_the_reason_and_can_be_required():
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("SKIPPED: scripts/gpu_smoke.sh needs a CUDA GPU: no CUDA GPU")
    required = subprocess.run(
        ["bash", str(SCRIPT)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "RLHF_REQUIRE_GPU": "1"},
    )
    assert required.returncode == 1 and "SKIPPED" in required.stdout
