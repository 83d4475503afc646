"""Tier 2: SFT -> RM -> PPO on two ranks for tiny random models of common architectures.

Each model is built locally from a config (no download) with the default task's tokenizer, then
the whole pipeline runs on it with `--model.model_name_or_path`: all six one after the other in
one `deepspeed --num_gpus 2` launch (tests/distributed/pipelines_probe.py calls launch/ppo.py's
entry point once per model), which saves five launcher and rank start-ups.
"""

import json

import pytest
import yaml
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
SHORT = [  # a few steps of each stage are enough for what the test checks of an architecture
    "--task.num_sft",
    "64",
    "--task.num_pairs",
    "64",
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


def _reward_accuracy(run, n_pairs):
    """(lowest, highest) held-out pairwise accuracy of the exported reward model, scored here with
    plain transformers on `task/pairs_eval.jsonl`, one sequence at a time (no padding); a pair
    whose margin is within rounding of 0 could count either way."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from pipeline.data.tokenize import Truncations, encode_prompt, encode_response

    folder = run / "reward" / "model"
    tok = AutoTokenizer.from_pretrained(folder)
    rm = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    rows = [json.loads(x) for x in (run / "task" / "pairs_eval.jsonl").read_text().splitlines()]
    assert len(rows) == n_pairs
    lens = yaml.safe_load((run / "config.yaml").read_text())["data"]

    def score(prompt, response):
        ids = encode_prompt(tok, prompt, lens["max_prompt_len"], Truncations()) + encode_response(
            tok, response, lens["max_response_len"], Truncations()
        )
        with torch.no_grad():
            return rm(input_ids=torch.tensor([ids])).logits[0, 0].item()

    margins = [score(r["prompt"], r["chosen"]) - score(r["prompt"], r["rejected"]) for r in rows]
    sure = sum(m > 1e-4 for m in margins)
    unsure = sum(abs(m) <= 1e-4 for m in margins)
    return sure / len(rows), (sure + unsure) / len(rows)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every architecture's whole pipeline, one after the other in one 2-rank launch (the same
    entry point as launch/ppo.py, run by pipelines_probe.py): {arch: (output_dir, rc, stdout)}."""
    root = tmp_path_factory.mktemp("architectures")
    plan = []
    for arch in sorted(ARCHITECTURES):
        model = _model_folder(root / arch, arch)
        argv = ["--config", str(TINY), "--output_dir", str(root / arch / "run")]
        argv += ["--model.model_name_or_path", str(model), *SHORT]
        plan.append({"name": arch, "argv": argv, "log": str(root)})
    (root / "plan.json").write_text(json.dumps(plan))
    proc = launch("../tests/distributed/pipelines_probe.py", str(root / "plan.json"), num_gpus=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = {}
    for arch in ARCHITECTURES:
        rcs = [int((root / f"{arch}.rank{r}.rc").read_text()) for r in (0, 1)]
        stdout, stderr = ((root / f"{arch}.rank0.{s}").read_text() for s in ("stdout", "stderr"))
        result[arch] = (root / arch / "run", max(rcs, key=abs), stdout, stderr)
    return result


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_pipeline_on_two_ranks(arch, runs):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    out, rc, stdout, stderr = runs[arch]
    assert rc == 0, stderr[-3000:]
    assert "world size 2," in stdout
    s = summary(out)
    assert all(s[stage]["skipped"] is False for stage in ("sft", "reward", "ppo"))
    assert 0 < s["sft"]["eval_loss"] < 10
    # the accuracy the reward stage reported is that of the exported model on the held-out pairs
    lowest, highest = _reward_accuracy(out, 16)
    assert lowest <= s["reward"]["eval_accuracy"] <= highest, (s["reward"], lowest, highest)
    policy = AutoModelForCausalLM.from_pretrained(out / "ppo" / "model")
    rm = AutoModelForSequenceClassification.from_pretrained(out / "reward" / "model")
    assert policy.config.model_type == arch and rm.config.model_type == arch
    rows = [json.loads(x) for x in (out / "ppo" / "metrics.jsonl").read_text().splitlines()]
    lengths = [
        r["rollout/response_length_mean"] for r in rows if "rollout/response_length_mean" in r
    ]
    assert len(lengths) == 2 and all(n >= 1 for n in lengths)  # responses were generated and scored
