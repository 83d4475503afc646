"""PPO's log-probs are those of the distribution that sampled (temperature, min_new_tokens).

Hugging Face `generate(..., output_scores=True)` returns the processed scores it sampled from; the
log-softmax of those at every response position must be what the PPO stage records as pi_old.
"""

from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pipeline import ppo_math
from pipeline.generation import SamplingParams, hf_generate
from pipeline.stages.ppo import PPOTrainer

VOCAB, PAD, BOS, EOS = 8, 0, 1, 2  # a tiny vocabulary, so EOS is sampled often


def _tiny_lm():
    torch.manual_seed(0)
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=64,
            bos_token_id=BOS,
            eos_token_id=EOS,
            pad_token_id=PAD,
        )
    ).eval()


class _PlainGenerator:
    """The hybrid engine's interface around a plain module (what its generation mode yields)."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer

    @contextmanager
    def generation_mode(self):
        yield self.model

    def generate(self, ids, mask, params):
        return hf_generate(self.model, self.tokenizer, ids, mask, params)


def _trainer(model, params: SamplingParams) -> PPOTrainer:
    """A PPOTrainer with only what `generate` reads (no engines)."""
    trainer = object.__new__(PPOTrainer)
    trainer.tokenizer = SimpleNamespace(
        pad_token_id=PAD,
        eos_token_id=EOS,  # generate() decodes the responses
        decode=lambda ids, skip_special_tokens: " ".join(map(str, ids.tolist())),
    )
    trainer.p = SimpleNamespace(micro_batch_size_per_gpu=3, forward_micro_batch_size=0)
    trainer.sizes = SimpleNamespace(micro_batch_size_per_gpu=3)
    trainer.forward_rows = 0  # the training micro-batch
    trainer.sampling = params
    trainer.generator = _PlainGenerator(model, trainer.tokenizer)
    return trainer


def _recording(model):
    """Make `model.generate` also return its processed scores (B, steps, V) into a list."""
    scores, plain = [], model.generate

    def generate(**kw):
        out = plain(**kw, output_scores=True, return_dict_in_generate=True)
        scores.append(torch.stack(out.scores, dim=1))
        return out.sequences

    model.generate = generate
    return scores


@pytest.mark.parametrize("temperature, min_new_tokens", [(0.7, 0), (0.7, 4), (1.0, 0), (1.3, 6)])
def test_pi_old_is_the_log_softmax_of_the_scores_generate_sampled_from(temperature, min_new_tokens):
    model = _tiny_lm()
    params = SamplingParams(
        max_new_tokens=10, temperature=temperature, min_new_tokens=min_new_tokens
    )
    trainer = _trainer(model, params)
    scores = _recording(model)
    prompts = [
        [BOS, 3, 4, 5, 6],
        [BOS, 7],
        [BOS, 5, 3],
        [BOS, 4, 4, 4],
        [BOS, 6, 3, 7, 5, 4],
        [BOS, 3],
    ]
    batch = [{"prompt_ids": p, "prompt": str(p)} for p in prompts]
    exp = trainer.generate(batch, seed=3, params=params)
    steps = scores[0].shape[1]
    lp_hf = torch.log_softmax(scores[0], dim=-1)  # (B, steps, V)
    m = exp.response_mask[:, :steps].bool()
    sampled = exp.sequences[:, exp.prompt_width :][:, :steps]
    picked = lp_hf.gather(-1, sampled[..., None]).squeeze(-1)
    torch.testing.assert_close(exp.old_logprobs[:, :steps][m], picked[m], atol=1e-5, rtol=0)
    assert (exp.old_logprobs[:, steps:] == 0).all()  # every row had ended: nothing left unmasked
    # The whole distribution agrees, -inf at a blocked EOS included (not only the sampled token).
    logits, _ = trainer._logits_logprobs(model, exp.sequences, exp.attention_mask, exp.prompt_width)
    torch.testing.assert_close(
        torch.log_softmax(logits[:, :steps], -1)[m], lp_hf[m], atol=1e-5, rtol=0
    )
    ends = exp.response_mask.sum(1)
    assert (ends > min_new_tokens).all()  # min_new_tokens held EOS back ...
    if min_new_tokens:
        assert torch.isinf(logits[:, :min_new_tokens, EOS]).all()
        assert torch.isfinite(logits[:, min_new_tokens:, EOS]).all()
    assert (exp.sequences[:, exp.prompt_width :] == EOS).any(
        1
    ).sum() >= 2  # ... and EOS was sampled after it
    if temperature != 1.0:  # the check can tell: raw T=1 log-probs are far from pi_old
        raw = ppo_math.logprobs_from_logits(logits * temperature, sampled)
        assert (raw[m] - exp.old_logprobs[:, :steps][m]).abs().max() > 1e-2


def test_sampling_logits_defaults_are_the_raw_logits_bitwise():
    logits = torch.randn(2, 5, VOCAB)
    assert torch.equal(ppo_math.sampling_logits(logits, 1.0, EOS, 0), logits)
    torch.testing.assert_close(ppo_math.sampling_logits(logits, 0.5), logits * 2, atol=0, rtol=0)


def test_blocked_eos_gives_finite_gradients_of_logprobs_and_entropy():
    logits = torch.randn(2, 5, VOCAB, requires_grad=True)
    lg = ppo_math.sampling_logits(logits, 0.7, EOS, 3)
    tokens = torch.full((2, 5), 4)
    loss = ppo_math.logprobs_from_logits(lg, tokens).sum() + ppo_math.entropy_from_logits(lg).sum()
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    assert (logits.grad[:, :3, EOS] == 0).all() and (logits.grad[:, 3:, EOS] != 0).all()


def test_several_samples_per_prompt_come_out_grouped_with_their_prompt():
    """num_samples_per_prompt: each prompt's samples are adjacent rows with its own prompt,
    attention mask and group id, and pi_old of each row is that row's (the rollout of a GRPO/RLOO
    group)."""
    model = _tiny_lm()
    params = SamplingParams(max_new_tokens=8, num_samples=3)
    trainer = _trainer(model, params)
    prompts = [[BOS, 3, 4, 5], [BOS, 7], [BOS, 5, 3]]
    batch = [{"prompt_ids": p, "prompt": str(p)} for p in prompts]
    exp = trainer.generate(batch, seed=5, params=params)
    assert exp.group_ids.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert exp.prompts == [str(p) for p in prompts for _ in range(3)]
    w = exp.prompt_width
    for row in range(9):
        ids = prompts[row // 3]
        assert (
            exp.sequences[row, w - len(ids) : w].tolist() == ids
        )  # left-padded prompt of its group
        assert exp.attention_mask[row, :w].tolist() == [0] * (w - len(ids)) + [1] * len(ids)
    responses = {tuple(exp.sequences[r, w:].tolist()) for r in range(3)}
    assert len(responses) > 1  # a group's samples differ
    _, lp = trainer._logits_logprobs(model, exp.sequences, exp.attention_mask, w)
    torch.testing.assert_close(exp.old_logprobs, lp * exp.response_mask, atol=1e-5, rtol=0)
