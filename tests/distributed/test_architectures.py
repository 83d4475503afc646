"""Tier 2: SFT -> RM -> PPO on two ranks for tiny random models of common architectures.

Each model is built locally from a config (no download) with the default task's tokenizer, then
the whole pipeline runs on it through the real launcher with `--model.model_name_or_path`.
"""

import json

import pytest
from launch_util import TINY, launch, summary

ARCHITECTURES = {
    "gpt2": dict(n_embd=32, n_layer=2, n_head=2, n_positions=64),
    "llama": dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    ),
    "opt": dict(
        hidden_size=32,
        num_hidden_layers=2,
        ffn_dim=64,
        num_attention_heads=2,
        word_embed_proj_dim=32,
        max_position_embeddings=64,
    ),
    "gpt_neox": dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    ),
    "qwen2": dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    ),
    "mistral": dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    ),
}
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
    "0",
]


def _model_folder(root, arch):
    from transformers import AutoConfig, AutoTokenizer

    from pipeline import default_task

    default_task.build_tokenizer(root / "tokenizer")
    tok = AutoTokenizer.from_pretrained(root / "tokenizer")
    config = AutoConfig.for_model(
        arch,
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **ARCHITECTURES[arch],
    )
    folder = root / arch
    config.save_pretrained(folder)  # config only: the pipeline builds the random model itself
    tok.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_pipeline_on_two_ranks(arch, tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    model = _model_folder(tmp_path, arch)
    out = tmp_path / "run"
    proc = launch(
        "ppo.py",
        "--config",
        str(TINY),
        "--output_dir",
        str(out),
        "--model.model_name_or_path",
        str(model),
        *SHORT,
        num_gpus=2,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world size 2," in proc.stdout
    s = summary(out)
    assert all(s[stage]["skipped"] is False for stage in ("sft", "reward", "ppo"))
    assert 0 < s["sft"]["eval_loss"] < 10 and 0 <= s["reward"]["eval_accuracy"] <= 1
    policy = AutoModelForCausalLM.from_pretrained(out / "ppo" / "model")
    rm = AutoModelForSequenceClassification.from_pretrained(out / "reward" / "model")
    assert policy.config.model_type == arch and rm.config.model_type == arch
    rows = [json.loads(x) for x in (out / "ppo" / "metrics.jsonl").read_text().splitlines()]
    lengths = [
        r["rollout/response_length_mean"] for r in rows if "rollout/response_length_mean" in r
    ]
    assert len(lengths) == 2 and all(n >= 1 for n in lengths)  # responses were generated and scored
