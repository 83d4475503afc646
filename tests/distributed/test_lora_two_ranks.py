"""Tier 2: LoRA actor and critic on two ranks. The probe checks the engines (partitioned adapters,
optimizer, generation copy, export, resume); the pipeline run checks that PPO with LoRA changes
exactly the adapted weights of the policy and nothing else.

One 2-rank launch does both: lora_probe.py's checks, then the LoRA pipeline as `launch/ppo.py`
would run it (pipelines_probe.py's plan), which saves a launcher and rank start-up."""

import json

import pytest
import torch
from launch_util import TINY, launch

SHORT = [
    "--task.num_sft",
    "256",
    "--task.num_pairs",
    "256",
    "--task.num_prompts",
    "32",
    "--task.num_eval",
    "16",
    "--ppo.num_iterations",
    "2",
    "--save_steps",
    "1",
]


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """(lora_probe.py's report per rank, the LoRA pipeline's folder, its (exit code, stdout,
    stderr))."""
    work = tmp_path_factory.mktemp("lora")
    (work / "model").mkdir()
    out = work / "ppo" / "run"
    out.parent.mkdir()
    argv = ["--config", str(TINY), "--output_dir", str(out), *SHORT]
    argv += ["--ppo.actor_lora_rank", "4", "--ppo.critic_lora_rank", "2"]
    argv += ["--ppo.lora_target_modules", "q_proj", "v_proj"]
    plan = [{"name": "lora", "argv": argv, "log": str(out.parent)}]
    (work / "plan.json").write_text(json.dumps(plan))
    proc = launch(
        "../tests/distributed/lora_probe.py",
        str(work / "report"),
        str(work),
        str(work / "plan.json"),
        num_gpus=2,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = [json.loads((work / f"report.rank{r}").read_text()) for r in (0, 1)]
    rcs = [int((out.parent / f"lora.rank{r}.rc").read_text()) for r in (0, 1)]
    stdout, stderr = ((out.parent / f"lora.rank0.{s}").read_text() for s in ("stdout", "stderr"))
    return report, out, (max(rcs, key=abs), stdout, stderr)


@pytest.fixture(scope="module")
def probe(launched):
    return launched[0]


def test_adapters_are_partitioned_and_are_all_the_optimizer_holds(probe):
    for rank in probe:
        for role, head in (("actor", set()), ("critic", {"score.weight"})):
            s = rank[role]
            assert s["all_partitioned"] and s["optimizer_is_trainable"], role
            assert s["adapters"] == 2 * 7 * 2  # A and B of q k v o gate up down, in 2 layers
            assert set(s["trainable_names"]) - head == {
                n for n in s["trainable_names"] if ".lora_" in n
            }
            assert s["trained"] < 0.2 * s["total"]


def test_generation_copy_and_export_hold_the_merged_weights(probe):
    for rank in probe:
        assert rank["adapters_moved"] > 1e-3  # training moved B away from 0, so the merge matters
        assert rank["copy_vs_merged"] == 0.0
        assert rank["copy_logits_vs_engine"] < 1e-5
        assert rank["export_logits_vs_engine"] < 1e-5
        assert rank["export_missing_or_unexpected"] == [] and not rank["export_has_lora_keys"]


def test_checkpoint_resumes_exactly_on_the_same_ranks(probe):
    for rank in probe:
        assert rank["resumed_vs_saved"] == 0.0
        assert rank["step3_resumed_vs_uninterrupted"] == 0.0
        assert rank["step3_moved"] > 1e-4  # the compared step did change the weights


def test_ppo_with_lora_changes_only_the_adapted_weights(launched):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    _, out, (rc, stdout, stderr) = launched
    assert rc == 0, stderr[-3000:]
    log = stdout + stderr
    assert (
        "(2,048 trained, " in log.split("engine actor:")[1].splitlines()[0]
    )  # 2 layers x (q, v) x (64 x 4 x 2)
    assert (
        "(1,088 trained, " in log.split("engine critic:")[1].splitlines()[0]
    )  # 2 x 2 x (64 x 2 x 2) + score 64
    assert "ppo/checkpoints/step_00000001" in log  # the LoRA engines' checkpoint at iteration 1
    sft = load_file(out / "sft" / "model" / "model.safetensors")
    ppo = load_file(out / "ppo" / "model" / "model.safetensors")
    assert ppo.keys() == sft.keys()  # the base architecture's keys: adapters merged, none left
    changed = {k for k in sft if not torch.equal(sft[k], ppo[k])}
    assert changed == {
        f"model.layers.{i}.self_attn.{n}.weight" for i in (0, 1) for n in ("q_proj", "v_proj")
    }
    policy, info = AutoModelForCausalLM.from_pretrained(
        out / "ppo" / "model", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert type(policy).__name__ == "LlamaForCausalLM"
