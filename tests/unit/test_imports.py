"""Config, data, math, monitoring and the task import without DeepSpeed (only pipeline/distributed/
imports it: tests/unit/test_layout.py)."""

import subprocess
import sys


def test_light_modules_import_without_deepspeed():
    code = (
        "import sys\n"
        "import pipeline.config, pipeline.config_checks, pipeline.cli, pipeline.data, "
        "pipeline.ppo_math, pipeline.estimators, "
        "pipeline.monitoring, pipeline.default_task, pipeline.errors, pipeline.models\n"
        "heavy = [m for m in ('deepspeed',) if m in sys.modules]\n"
        "print(heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    loaded = out.stdout.strip().splitlines()[-1]
    assert loaded == "[]", f"deepspeed imported by a light module: {loaded}"
