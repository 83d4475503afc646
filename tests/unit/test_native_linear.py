"""engines.native_linear: zero.Init replaces torch.nn.functional.linear for the whole process;
generation and scoring (no gradients) run PyTorch's own inside native_linear, with the same
logits, and the replacement is back after it (training needs it). In a fresh process: the
replacement is process-wide."""

import json
import os
import subprocess
import sys

from launch_util import free_port

SCRIPT = r"""
import json, sys
from pathlib import Path
import torch
import torch.nn.functional as F
from pipeline import default_task
from pipeline.config import REPO_ROOT
from pipeline.distributed import collectives, ds_config, engines
from pipeline.models import load_causal_lm

folder = Path(sys.argv[1])
collectives.init_distributed()
native = F.linear
config = default_task.model_config(len(default_task.vocabulary()), 32, 2, 2, 64, 64)
(folder / "config.json").write_text(json.dumps(config))
collectives.seed_everything(0)
with engines.plain_construction():
    plain = load_causal_lm(str(folder)).eval()
with engines.native_linear():
    untouched = F.linear is native  # nothing replaced it yet: a no-op
ds = ds_config.load_ds_config(REPO_ROOT / "ds_configs" / "zero3_train.json",
                              train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1)
with engines.zero3_construction(ds):
    load_causal_lm(str(folder))  # partitioned at construction: zero.Init replaces F.linear
ids = torch.randint(3, 40, (2, 12))
replaced = torch.nn.functional.linear is not native
with torch.no_grad():
    zero3_logits = plain(input_ids=ids).logits
    with engines.native_linear():
        inside = torch.nn.functional.linear is native
        native_logits = plain(input_ids=ids).logits
try:
    with engines.native_linear():
        raise KeyError
except KeyError:
    pass
print(json.dumps({
    "untouched": untouched, "replaced": replaced, "inside": inside,
    "restored": torch.nn.functional.linear is not native,
    "same_logits": bool(torch.equal(zero3_logits, native_logits)),
}))
"""


def test_native_linear_inside_and_zero3s_outside(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    env["MASTER_PORT"] = str(free_port())
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got == {
        "untouched": True,
        "replaced": True,
        "inside": True,
        "restored": True,
        "same_logits": True,
    }
