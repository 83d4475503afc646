"""Tokenisation: prompts and responses to token ids within data.max_prompt_len /
data.max_response_len (prompts cut from the left, BOS kept; responses cut after, EOS included;
each dataset says once how many it cut), the examples each stage trains on, and re-encoding for
a reward model with its own tokenizer.

Not here: where the cached examples are written (cache.py), padding into batches (collate.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from pipeline.data.collate import IGNORE_INDEX, pad

log = logging.getLogger(__package__)  # "pipeline.data", the name its warnings have always had

EXAMPLES_VERSION = (
    1  # bump when the example builders below change what they produce (keys cache.py's files)
)


@dataclass
class Truncations:
    """How many prompts/responses were cut to fit the limits, of how many, and the longest
    (reported once per dataset with the option to raise, never silent)."""

    prompts: int = 0  # cut
    responses: int = 0  # cut
    prompts_seen: int = 0
    responses_seen: int = 0
    longest_prompt: int = 0  # tokens, before cutting
    longest_response: int = 0

    def report(self, what: str, max_prompt_len: int, max_response_len: int) -> None:
        if self.prompts:
            log.warning(
                "%s: %d of %d prompts were longer than max_prompt_len=%d tokens (the longest has "
                "%d) and were truncated from the left; raise --data.max_prompt_len to keep them "
                "whole.",
                what,
                self.prompts,
                self.prompts_seen,
                max_prompt_len,
                self.longest_prompt,
            )
        if self.responses:
            log.warning(
                "%s: %d of %d responses were longer than max_response_len=%d tokens, EOS included "
                "(the longest has %d), and were truncated; raise --data.max_response_len to keep "
                "them whole.",
                what,
                self.responses,
                self.responses_seen,
                max_response_len,
                self.longest_response,
            )


def encode_prompt(tokenizer, prompt: str, max_len: int, cuts: Truncations) -> list[int]:
    """Prompt ids with the tokenizer's own special tokens (e.g. BOS), cut from the left to fit
    (a leading BOS is kept: the model always saw one)."""
    ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    cuts.prompts_seen += 1
    cuts.longest_prompt = max(cuts.longest_prompt, len(ids))
    if len(ids) > max_len:
        cuts.prompts += 1
        keep_bos = tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id
        ids = [ids[0]] + ids[len(ids) - max_len + 1 :] if keep_bos else ids[-max_len:]
    return ids


def encode_response(tokenizer, response: str, max_len: int, cuts: Truncations) -> list[int]:
    """Response ids followed by EOS, cut to `max_len` (EOS included)."""
    ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    cuts.responses_seen += 1
    cuts.longest_response = max(cuts.longest_response, len(ids))
    if len(ids) > max_len:
        cuts.responses += 1
        ids = ids[:max_len]
    return ids


def sft_examples(rows, tokenizer, max_prompt_len, max_response_len, what="sft") -> list[dict]:
    """input_ids = prompt + response + EOS; labels mask the prompt (loss on the response only)."""
    cuts, out = Truncations(), []
    for row in rows:
        p = encode_prompt(tokenizer, row["prompt"], max_prompt_len, cuts)
        r = encode_response(tokenizer, row["response"], max_response_len, cuts)
        out.append({"input_ids": p + r, "labels": [IGNORE_INDEX] * len(p) + r})
    cuts.report(what, max_prompt_len, max_response_len)
    return out


def pair_examples(rows, tokenizer, max_prompt_len, max_response_len, what="pairs") -> list[dict]:
    """Two full sequences per row: prompt + chosen + EOS and prompt + rejected + EOS."""
    cuts, out = Truncations(), []
    for row in rows:
        p = encode_prompt(tokenizer, row["prompt"], max_prompt_len, cuts)
        out.append(
            {
                "chosen_ids": p + encode_response(tokenizer, row["chosen"], max_response_len, cuts),
                "rejected_ids": p
                + encode_response(tokenizer, row["rejected"], max_response_len, cuts),
            }
        )
    cuts.report(what, max_prompt_len, max_response_len)
    return out


def prompt_examples(rows, tokenizer, max_prompt_len, what="prompts") -> list[dict]:
    cuts = Truncations()
    out = [
        {
            "prompt_ids": encode_prompt(tokenizer, row["prompt"], max_prompt_len, cuts),
            "prompt": row["prompt"],
        }
        for row in rows
    ]
    cuts.report(what, max_prompt_len, 0)
    return out


def reencode(
    prompts: list[str],
    responses: list[list[int]],
    tokenizer,
    target_tokenizer,
    max_prompt_len: int,
    max_response_len: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt + response as another tokenizer reads them (a reward model with its own vocabulary).

    Responses (actor token ids, EOS included) are decoded to text and encoded again with the
    target tokenizer's own EOS; returns right-padded (input_ids, attention_mask).
    """
    cuts, rows = Truncations(), []
    for prompt, response in zip(prompts, responses):
        text = tokenizer.decode(response, skip_special_tokens=True)
        rows.append(
            encode_prompt(target_tokenizer, prompt, max_prompt_len, cuts)
            + encode_response(target_tokenizer, text, max_response_len, cuts)
        )
    cuts.report("reward-model re-encoding", max_prompt_len, max_response_len)
    return pad(rows, target_tokenizer.pad_token_id), pad([[1] * len(r) for r in rows], 0)
