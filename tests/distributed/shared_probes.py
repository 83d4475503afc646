"""One 2-rank launch shared by several test files: hybrid_probe.py (test_hybrid_engine.py),
placement_probe.py (test_placement_two_ranks.py), ppo_update_probe.py's 2-rank run
(test_ppo_update_ranks.py), estimators_probe.py (test_estimators_two_ranks.py) and
critic_scoring_probe.py with a plain and a LoRA critic (test_critic_scoring_two_ranks.py), one
after the other in one process group (pipelines_probe.py's "probe" items), each with its own
folder, report, rank-0 stdout/stderr and exit code, as its own `deepspeed --num_gpus 2
x_probe.py ...` launch would leave them. Saves five launcher and rank start-ups. The first test
file that asks for it runs the launch (also when that file runs alone); the others reuse the
result in the same pytest process.

Also here: the tiny policy, reward model and prompts that placement_probe.py,
ppo_update_probe.py and critic_scoring_probe.py read (`write_inputs`)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from launch_util import launch_plan

PROMPTS = [
    "ana asks for a review of the pizza .",
    "please review the sofa for leo .",
    "grace wants to know about the camera .",
    "hugo asks for a review of the book .",
    "emma wants to know about the car .",
    "please review the lamp for ana .",
]
INPUTS = ("policy", "reward", "prompts.jsonl")

_launched: dict = {}


def write_inputs(work: Path) -> None:
    """A tiny policy and reward model with weights on disk (so every run starts from the same
    ones), with the default task's tokenizer, and PROMPTS as prompts.jsonl."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    from pipeline import default_task

    config = LlamaConfig(
        **default_task.model_config(len(default_task.vocabulary()), 32, 2, 2, 64, 64)
    )
    for name, cls, extra in (
        ("policy", LlamaForCausalLM, {}),
        ("reward", LlamaForSequenceClassification, {"num_labels": 1}),
    ):
        torch.manual_seed(1 if name == "policy" else 2)
        cls(LlamaConfig(**{**config.to_dict(), **extra})).save_pretrained(work / name)
        default_task.build_tokenizer(work / name)
    (work / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))


def linked_inputs(inputs: Path, folder: Path) -> Path:
    """`folder`, made, with links to the inputs (a run writes its own stage folder next to them)."""
    folder.mkdir()
    for name in INPUTS:
        (folder / name).symlink_to(inputs / name)
    return folder


def launched(tmp_path_factory) -> dict:
    """{"inputs": folder of write_inputs, probe name: (its folder, exit code, rank-0 stdout,
    rank-0 stderr)} for "hybrid", "placement", "ppo_update", "estimators", "critic_plain" and
    "critic_lora"; the reports are where each probe writes them: hybrid, placement and the critic
    ones `<folder>/report.rank<R>`, ppo_update `<folder>/update.2.pt`, estimators
    `<folder>/estimators.rank<R>`."""
    if _launched:
        return _launched
    root = tmp_path_factory.mktemp("shared_probes")
    inputs = root / "inputs"
    inputs.mkdir()
    write_inputs(inputs)
    hybrid = root / "hybrid"
    (hybrid / "model").mkdir(parents=True)
    placement = linked_inputs(inputs, root / "placement")
    update = root / "ppo_update"
    update.mkdir()
    linked_inputs(inputs, update / "w2")
    estimators = root / "estimators"
    estimators.mkdir()
    folders = {"hybrid": hybrid, "placement": placement, "ppo_update": update}
    folders["estimators"] = estimators
    for kind in ("plain", "lora"):
        folders[f"critic_{kind}"] = linked_inputs(inputs, root / f"critic_{kind}")
    argvs = {  # hybrid first: its memory readings see no earlier probe's leftovers
        "hybrid": [str(hybrid / "report"), str(hybrid)],
        "placement": [str(placement / "report"), str(placement)],
        "ppo_update": [str(update / "update.2.pt"), str(update / "w2")],
        "estimators": [str(estimators)],
        **{
            f"critic_{k}": [str(folders[f"critic_{k}"] / "report"), str(folders[f"critic_{k}"]), k]
            for k in ("plain", "lora")
        },
    }
    probes = {"critic_plain": "critic_scoring", "critic_lora": "critic_scoring"}
    plan = [
        {"name": name, "probe": f"{probes.get(name, name)}_probe.py", "argv": argv}
        for name, argv in argvs.items()
    ]
    result = launch_plan(root, plan)
    _launched["inputs"] = inputs
    for name, folder in folders.items():
        _launched[name] = (folder, *result[name])
    return _launched
