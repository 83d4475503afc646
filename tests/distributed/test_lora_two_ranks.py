"""Tier 2: LoRA actor and critic on two ranks. The probe checks the engines (partitioned adapters,
optimizer, generation copy, export, resume); the pipeline run checks that PPO with LoRA changes
exactly the adapted weights of the policy and nothing else."""

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
def probe(tmp_path_factory):
    work = tmp_path_factory.mktemp("lora")
    (work / "model").mkdir()
    proc = launch("../tests/distributed/lora_probe.py", str(work / "report"), str(work), num_gpus=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((work / f"report.rank{r}").read_text()) for r in (0, 1)]


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


def test_ppo_with_lora_changes_only_the_adapted_weights(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    proc = launch(
        "ppo.py",
        "--config",
        str(TINY),
        "--output_dir",
        str(out),
        *SHORT,
        "--ppo.actor_lora_rank",
        "4",
        "--ppo.critic_lora_rank",
        "2",
        "--ppo.lora_target_modules",
        "q_proj",
        "v_proj",
        num_gpus=2,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
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
