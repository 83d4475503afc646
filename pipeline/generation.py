"""Generation from the ZeRO-3 actor through a plain (unpartitioned) inference copy.

Hugging Face `generate` on a ZeRO-3 module all-gathers every layer at every decoding step, which
is an order of magnitude slower than a plain module (../shared/DESIGN.md). So before each
generation phase the actor's full weights are copied, one layer at a time, into a plain copy of
the same architecture that has no ZeRO hooks; each rank then decodes its own prompts with no
collective calls.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline import engines


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    do_sample: bool = True


def response_mask(responses: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """(B, R) 1 on response tokens up to and including the first EOS, 0 after it."""
    is_eos = (responses == eos_token_id).long()
    after_eos = (is_eos.cumsum(dim=1) - is_eos) > 0
    return (~after_eos).long()


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that start at 0 on the first real token (prompts are left-padded)."""
    return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)


class PolicyGenerator:
    """Keeps a plain copy of the actor for decoding; `sync()` refreshes it from the engine."""

    def __init__(self, actor_module: torch.nn.Module, tokenizer):
        from transformers import AutoModelForCausalLM

        with engines.plain_construction():
            self.model = AutoModelForCausalLM.from_config(actor_module.config)
        self.model.to(engines.device()).eval().requires_grad_(False)
        self.actor_module = actor_module
        self.tokenizer = tokenizer

    def sync(self) -> None:
        engines.copy_gathered(self.actor_module, self.model)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 params: SamplingParams) -> torch.Tensor:
        """(B, P + R) prompt (left-padded, as given) + response padded to R = max_new_tokens."""
        extra = {"top_k": params.top_k, "top_p": params.top_p,
                 "temperature": params.temperature} if params.do_sample else {}
        out = self.model.generate(
            input_ids=input_ids, attention_mask=attention_mask, do_sample=params.do_sample,
            max_new_tokens=params.max_new_tokens, eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id, use_cache=True, **extra)
        width = input_ids.shape[1] + params.max_new_tokens
        if out.shape[1] < width:  # every row stopped early: pad to the fixed response width
            pad = out.new_full((out.shape[0], width - out.shape[1]), self.tokenizer.pad_token_id)
            out = torch.cat([out, pad], dim=1)
        return out
