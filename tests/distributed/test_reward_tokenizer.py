"""Tier 2: PPO on two ranks with a reward model whose tokenizer differs from the actor's.

The actor is a tiny random Llama with the default task's word-level tokenizer (BOS, pad token);
the reward model a tiny random GPT-2 with a byte-level BPE tokenizer trained here (no BOS, no pad
token). Both are given as existing models, so the launcher goes straight to PPO. Each logged
sample's reward must be what the reward model gives the text encoded with its own tokenizer.
"""

import json
import re

import pytest
import torch
from launch_util import TINY, launch, summary

from pipeline import default_task


def _texts():
    for item in default_task.ITEMS:
        for name, adjective in zip(default_task.NAMES, default_task.ADJECTIVES):
            yield f"{name} asks for a review of the {item} . the {item} is {adjective} ."


def _byte_level_tokenizer(folder):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        _texts(),
        trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=["<|endoftext|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    fast.save_pretrained(folder)
    return fast


def _models(root):
    from transformers import (
        AutoTokenizer,
        GPT2Config,
        GPT2ForSequenceClassification,
        LlamaConfig,
        LlamaForCausalLM,
    )

    torch.manual_seed(0)
    default_task.build_tokenizer(root / "actor")
    actor_tok = AutoTokenizer.from_pretrained(root / "actor")
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(actor_tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=64,
            bos_token_id=actor_tok.bos_token_id,
            eos_token_id=actor_tok.eos_token_id,
            pad_token_id=actor_tok.pad_token_id,
        )
    ).save_pretrained(root / "actor")
    reward_tok = _byte_level_tokenizer(root / "reward")
    GPT2ForSequenceClassification(
        GPT2Config(
            vocab_size=len(reward_tok),
            n_embd=32,
            n_layer=2,
            n_head=2,
            n_positions=128,
            num_labels=1,
            eos_token_id=reward_tok.eos_token_id,
            bos_token_id=reward_tok.eos_token_id,
        )
    ).save_pretrained(root / "reward")
    assert actor_tok.get_vocab() != reward_tok.get_vocab()
    return root / "actor", root / "reward"


def _logged_samples(tb_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"tensors": 0})
    acc.Reload()
    rows = []
    for event in acc.Tensors("samples/text_summary"):
        table = event.tensor_proto.string_val[0].decode()
        rows += [re.split(r" \| ", line.strip("| ")) for line in table.splitlines()[2:]]
    return rows


def test_ppo_with_a_reward_model_that_has_its_own_tokenizer(tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from pipeline.data.tokenize import Truncations, encode_prompt, encode_response

    actor, reward = _models(tmp_path)
    out = tmp_path / "run"
    proc = launch(
        "ppo.py",
        "--config",
        str(TINY),
        "--output_dir",
        str(out),
        "--ppo.actor_model_path",
        str(actor),
        "--ppo.reward_model_path",
        str(reward),
        "--task.num_prompts",
        "32",
        "--task.num_eval",
        "8",
        "--ppo.num_iterations",
        "2",
        "--save_steps",
        "0",
        num_gpus=2,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert "stage sft is not needed: PPO starts from ppo.actor_model_path" in log
    assert "stage reward is not needed: PPO scores with ppo.reward_model_path" in log
    assert "has its own tokenizer: rollouts are re-encoded" in log
    assert set(summary(out)) == {"ppo"}

    tok = AutoTokenizer.from_pretrained(reward)
    tok.pad_token = tok.eos_token
    rm = AutoModelForSequenceClassification.from_pretrained(reward).eval()
    samples = _logged_samples(out / "ppo" / "tensorboard")
    assert len(samples) >= 8  # 4 samples at each of the evaluations (steps 0, 2)
    for prompt, response, score, _gold in samples:
        ids = encode_prompt(tok, prompt, 24, Truncations()) + encode_response(
            tok, response, 96, Truncations()
        )
        with torch.no_grad():
            expected = rm(input_ids=torch.tensor([ids])).logits[0, 0].item()
        assert float(score) == pytest.approx(expected, abs=2e-3), (prompt, response)
    rows = [json.loads(x) for x in (out / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "rollout/score_mean" in r] == [1, 2]
