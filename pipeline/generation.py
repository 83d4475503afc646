"""The hybrid engine: fast generation from the ZeRO-3 actor.

Hugging Face `generate` on a ZeRO-3 module all-gathers every layer at every decoding step, which
is an order of magnitude slower than a plain module (../shared/DESIGN.md). So for each
generation phase the actor's full weights are materialised once into a plain module of the same
architecture with no ZeRO hooks; each rank then decodes its own prompts with no collective calls,
and the weights are freed afterwards.

The PPO stage sees a generation backend only through `GenerationBackend` and builds it with
`make_backend`: another backend (an inference server such as vLLM) is one class and one entry in
`BACKENDS`, with no change to the stage. DeepSpeed's own hybrid engine is refused
(`pipeline.distributed.ds_config.load_ds_config`): with DeepSpeed 0.19 and transformers 5 it does
not run (issue #14).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Protocol

import torch

from pipeline.distributed.materialise import PlainCopy


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    do_sample: bool = True  # False: greedy
    min_new_tokens: int = 0  # EOS is suppressed until this many tokens were generated
    num_samples: int = 1  # responses per prompt (rows come out prompt-major)


def response_mask(responses: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """(B, R) 1 on response tokens up to and including the first EOS, 0 after it."""
    is_eos = (responses == eos_token_id).long()
    after_eos = (is_eos.cumsum(dim=1) - is_eos) > 0
    return (~after_eos).long()


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that start at 0 on the first real token (prompts are left-padded)."""
    return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)


def hf_generate(model, tokenizer, input_ids, attention_mask, params: SamplingParams, **extra_kw):
    """HF generate with our settings; returns (B * n, P + max_new_tokens), padded with pad id."""
    sample = (
        {"top_k": params.top_k, "top_p": params.top_p, "temperature": params.temperature}
        if params.do_sample
        else {}
    )
    out = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        do_sample=params.do_sample,
        max_new_tokens=params.max_new_tokens,
        min_new_tokens=params.min_new_tokens,
        num_return_sequences=params.num_samples,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
        **sample,
        **extra_kw,
    )
    width = input_ids.shape[1] + params.max_new_tokens
    if out.shape[1] < width:  # every row stopped early: pad to the fixed response width
        pad = out.new_full((out.shape[0], width - out.shape[1]), tokenizer.pad_token_id)
        out = torch.cat([out, pad], dim=1)
    return out


class HybridEngine:
    """The actor in two modes: training (the partitioned ZeRO-3 engine) and generation.

    Generation mode materialises the full weights once into a plain module of the same
    architecture (`materialise.PlainCopy`: no ZeRO hooks, eval mode, KV cache), gathering
    `gather_modules` submodules at a time (0: all at once; smaller numbers lower the transient
    peak), and frees them on exit. LoRA adapters are merged into the copy, so decoding costs what
    it costs without them. Works for any Hugging Face causal LM, on any accelerator.
    """

    def __init__(self, actor_engine, tokenizer, gather_modules: int = 0):
        self.engine = actor_engine
        self.tokenizer = tokenizer
        self.copy = PlainCopy(actor_engine, gather_modules, merge_lora=True)
        self.model = self.copy.model

    @property
    def materialised(self) -> bool:
        return self.copy.materialised

    @contextmanager
    def generation_mode(self):
        """Inside: `self.model` holds the actor's current full weights. Freed on exit."""
        with self.copy.materialise() as model:
            yield model

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, params: SamplingParams) -> torch.Tensor:
        assert self.materialised, "generate() runs inside generation_mode()"
        # transformers turns synced_gpus on by itself under ZeRO-3 with several ranks; this module
        # is plain, so each rank decodes alone with no collective per token.
        return hf_generate(
            self.model, self.tokenizer, input_ids, attention_mask, params, synced_gpus=False
        )


class GenerationBackend(Protocol):
    """What the PPO stage asks of a generation backend, once per generation phase:

        with backend.generation_mode() as model:  # 1. the actor's current weights, ready to decode
            seq = backend.generate(ids, mask, params)  # 2. sample (inside the mode only)
            logits = model(seq, ...)  # 3. pi_old log-probs from the training weights

    1. `generation_mode()` makes the training engine's current weights available for decoding
       (materialised into a plain module here; loaded into an inference engine by a server-based
       backend) and releases them on exit. It yields a module whose forward gives the logits of
       exactly those weights: pi_old is computed with it, so the ratio to the trained policy starts
       at 1 (a backend whose decoder computes differently, e.g. vLLM's kernels, yields the ZeRO-3
       engine itself here).
    2. `generate(input_ids, attention_mask, params)`: left-padded prompts (B, P) on
       `collectives.device()` -> (B * params.num_samples, P + params.max_new_tokens) token ids on
       the same device, right-padded with the pad id, prompt-major. Each rank decodes its own
       prompts.
    """

    def generation_mode(self) -> AbstractContextManager[torch.nn.Module]: ...

    def generate(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, params: SamplingParams
    ) -> torch.Tensor: ...


BACKENDS = {"materialise": HybridEngine}  # name -> class(actor_engine, tokenizer, gather_modules)


def make_backend(
    actor_engine, tokenizer, gather_modules: int = 0, name: str = "materialise"
) -> GenerationBackend:
    """The generation backend `name` for the actor's training engine."""
    assert name in BACKENDS, name  # a user-facing choice must be validated against BACKENDS first
    return BACKENDS[name](actor_engine, tokenizer, gather_modules)


@torch.no_grad()
def naive_generate(actor_engine, tokenizer, input_ids, attention_mask, params: SamplingParams):
    """HF generate directly on the ZeRO-3 module (ranks kept in step): the slow baseline."""
    return hf_generate(
        actor_engine.module, tokenizer, input_ids, attention_mask, params, synced_gpus=True
    )
