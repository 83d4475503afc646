"""Training, PPO scoring and the exported model read a reward model's score at the same token.

Plain Hugging Face `AutoModelForSequenceClassification` pools the rightmost token that is not
`config.pad_token_id`. When a tokenizer has no pad token the pipeline pads with EOS, and HF then
reads the token before the response's EOS: `models.score_index` reads that token everywhere.
"""

import json
from types import SimpleNamespace

import pytest
import torch
from transformers import (
    AutoModelForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
)

from pipeline import data
from pipeline.generation import position_ids, response_mask
from pipeline.models import last_real_index, load_tokenizer, score_index, sequence_scores
from pipeline.stages import ppo_reward
from pipeline.stages.ppo import PPOTrainer
from pipeline.stages.ppo_types import Experience
from pipeline.stages.reward import pairwise

PROMPTS = [
    "ana asks for a review of the pizza .",
    "the hotel .",
    "emma asks for a review of the museum .",
]
RESPONSES = [
    "the pizza is great .",
    "the hotel is bad",
    "the museum is great . the museum is great .",
]


def _eos_pad_tokenizer(tmp_path, task_tokenizer):
    """The task tokenizer without a pad token, loaded as the pipeline loads it (pad = EOS)."""
    folder = tmp_path / "tok"
    task_tokenizer.save_pretrained(folder)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg.pop("pad_token", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = load_tokenizer(str(folder))
    assert tok.pad_token_id == tok.eos_token_id
    return tok


def _exported_rm(tmp_path, tok):
    """A tiny scalar model with the pad id the reward stage gives it, saved and loaded back by plain
    HF."""
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(
        LlamaConfig(
            vocab_size=len(tok),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            num_labels=1,
            max_position_embeddings=128,
        )
    ).eval()
    model.config.pad_token_id = tok.pad_token_id  # as stages/reward.py does before training
    folder = tmp_path / "rm"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model, AutoModelForSequenceClassification.from_pretrained(folder).eval()


def _pairs(tok):
    rejected = RESPONSES[1:] + RESPONSES[:1]
    rows = [
        {"prompt": p, "chosen": c, "rejected": r} for p, c, r in zip(PROMPTS, RESPONSES, rejected)
    ]
    return data.collate_pairs(
        data.pair_examples(rows, tok, 24, 24), tok.pad_token_id
    )  # right-padded


@pytest.mark.parametrize("pad_is_eos", [True, False])
@torch.no_grad()
def test_reward_training_scores_what_the_exported_model_scores(
    tmp_path, task_tokenizer, pad_is_eos
):
    tok = _eos_pad_tokenizer(tmp_path, task_tokenizer) if pad_is_eos else task_tokenizer
    model, hf = _exported_rm(tmp_path, tok)
    batch = _pairs(tok)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert len(set(mask.sum(1).tolist())) > 1  # rows of different lengths: padding in play
    expected = hf(input_ids=ids, attention_mask=mask).logits[:, 0]
    torch.testing.assert_close(
        sequence_scores(model, ids, mask, tok.pad_token_id), expected, atol=1e-5, rtol=0
    )
    _, _, margin = pairwise(
        model, batch, tok.pad_token_id
    )  # the reward stage's loss reads the same
    chosen, rejected = expected.chunk(2)
    torch.testing.assert_close(margin, chosen - rejected, atol=1e-5, rtol=0)
    index, last = score_index(ids, mask, tok.pad_token_id), last_real_index(mask)
    assert (
        ids.gather(1, last[:, None]) == tok.eos_token_id
    ).all()  # the last attended token is the EOS
    if pad_is_eos:  # HF reads the token before it; so do we
        assert (index == last - 1).all()
    else:  # a pad of its own: the EOS, as before
        assert torch.equal(index, last)


def _tiny_lm(vocab):
    torch.manual_seed(1)
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=vocab,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
        )
    ).eval()


def _rollout(tok) -> Experience:
    """What the generation phase hands to scoring: left-padded prompts, right-padded responses (one
    ending early, one cut off at the response width without EOS), padded with the actor's pad id."""
    batch = data.collate_prompts(
        data.prompt_examples([{"prompt": p} for p in PROMPTS], tok, 24), tok.pad_token_id
    )
    width = 8
    responses = [
        tok(r, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for r in RESPONSES
    ]
    responses = torch.tensor(
        [r[:width] + [tok.pad_token_id] * (width - len(r[:width])) for r in responses]
    )
    resp_mask = response_mask(responses, tok.eos_token_id)
    assert (
        resp_mask.sum(1).tolist()[-1] == width and (responses[-1] != tok.eos_token_id).all()
    )  # truncated
    seq = torch.cat([batch["input_ids"], responses], dim=1)
    mask = torch.cat([batch["attention_mask"], resp_mask], dim=1)
    assert (batch["attention_mask"][:, 0] == 0).any()  # left padding in play
    return Experience(
        seq,
        mask,
        resp_mask,
        torch.zeros(resp_mask.shape),
        batch["input_ids"].shape[1],
        batch["prompts"],
    )


def _scoring_trainer(tok, reward_tok, reward, same_tokenizer: bool) -> PPOTrainer:
    """A PPOTrainer with only what `score` reads (plain modules for the engines)."""
    trainer = object.__new__(PPOTrainer)
    trainer.tokenizer, trainer.reward_tokenizer, trainer.same_tokenizer = (
        tok,
        reward_tok,
        same_tokenizer,
    )
    trainer.p = SimpleNamespace(
        micro_batch_size_per_gpu=2,
        forward_micro_batch_size=0,
        reward_model_coef=1.0,
        score_norm="none",
    )
    trainer.sizes = SimpleNamespace(micro_batch_size_per_gpu=2)
    trainer.forward_rows = 0  # the training micro-batch
    trainer.cfg = SimpleNamespace(data=SimpleNamespace(max_prompt_len=24, max_response_len=24))
    trainer.sampling = SimpleNamespace(temperature=1.0, min_new_tokens=0, max_new_tokens=24)
    trainer.ref, trainer.critic, trainer.rewards, trainer.reward_fn = (
        _tiny_lm(len(tok)),
        reward,
        [reward],
        None,
    )
    trainer.reward_pad_ids = [
        reward.config.pad_token_id
    ]  # what ppo_setup.build_engines reads (models.pooling_pad_id)
    return trainer


@torch.no_grad()
def test_ppo_scores_rollouts_where_the_exported_model_reads_them(tmp_path, task_tokenizer):
    tok = _eos_pad_tokenizer(tmp_path, task_tokenizer)  # actor and reward model pad with EOS
    model, hf = _exported_rm(tmp_path, tok)
    exp = _rollout(tok)
    scores = _scoring_trainer(tok, tok, model, same_tokenizer=True).score(exp).scores
    # Left padding: HF consumers pass position ids from the mask (as TRL's get_reward does).
    expected = hf(
        input_ids=exp.sequences,
        attention_mask=exp.attention_mask,
        position_ids=position_ids(exp.attention_mask),
    ).logits[:, 0]
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=0)
    index = score_index(exp.sequences, exp.attention_mask, tok.pad_token_id)
    last = last_real_index(exp.attention_mask)
    assert index.tolist() == [i - 1 for i in last[:2].tolist()] + [
        last[2].item()
    ]  # before EOS; truncated: last


@torch.no_grad()
def test_ppo_scores_re_encoded_rows_where_the_exported_model_reads_them(tmp_path, task_tokenizer):
    reward_tok = _eos_pad_tokenizer(
        tmp_path, task_tokenizer
    )  # the reward model's own tokenizer pads with EOS
    model, hf = _exported_rm(tmp_path, reward_tok)
    exp = _rollout(task_tokenizer)  # the actor has a pad token of its own
    trainer = _scoring_trainer(task_tokenizer, reward_tok, model, same_tokenizer=False)
    scores = trainer.score(exp).scores
    ids, mask = ppo_reward.reward_inputs(
        trainer, exp
    )  # decoded and re-encoded, right-padded with EOS
    assert mask[:, 0].all() and not mask[:, -1].all()  # no left padding now; right padding in play
    expected = hf(input_ids=ids, attention_mask=mask).logits[:, 0]
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=0)
    # Re-encoding ends every row with the reward tokenizer's EOS (the truncated one too); read
    # before it.
    assert (ids.gather(1, last_real_index(mask)[:, None]) == reward_tok.eos_token_id).all()
    assert (score_index(ids, mask, reward_tok.pad_token_id) == last_real_index(mask) - 1).all()


def test_score_index_without_a_pad_id_is_the_last_attended_position():
    # A reward model whose config has no pad_token_id (e.g. GPT-2's): HF reads the last token of an
    # unpadded row; with padding, the last attended one.
    ids = torch.tensor([[5, 6, 2, 2], [0, 5, 6, 2]])
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]])
    assert score_index(ids, mask, None).tolist() == [2, 3]
    assert score_index(ids, mask, 2).tolist() == [1, 2]
    assert score_index(ids, mask, 0).tolist() == [2, 3]
