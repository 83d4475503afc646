"""Collation: padded (B, T) tensors of token ids, attention masks and labels, one batch per stage.

Not here: the token ids themselves (tokenize.py).
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100  # label of tokens that carry no loss (prompt and padding)


def pad(seqs: list[list[int]], value: int, left: bool = False) -> torch.Tensor:
    """(B, T) tensor, padded on the right (training) or on the left (generation)."""
    width = max(len(s) for s in seqs)
    rows = [
        ([value] * (width - len(s)) + s) if left else (s + [value] * (width - len(s))) for s in seqs
    ]
    return torch.tensor(rows, dtype=torch.long)


def collate_sft(batch: list[dict], pad_id: int) -> dict:
    ids = pad([b["input_ids"] for b in batch], pad_id)
    return {
        "input_ids": ids,
        "attention_mask": pad([[1] * len(b["input_ids"]) for b in batch], 0),
        "labels": pad([b["labels"] for b in batch], IGNORE_INDEX),
    }


def collate_pairs(batch: list[dict], pad_id: int) -> dict:
    """Chosen rows first, then rejected rows: one forward pass scores both."""
    seqs = [b["chosen_ids"] for b in batch] + [b["rejected_ids"] for b in batch]
    return {"input_ids": pad(seqs, pad_id), "attention_mask": pad([[1] * len(s) for s in seqs], 0)}


def collate_prompts(batch: list[dict], pad_id: int) -> dict:
    """Left-padded prompts, ready for generation."""
    seqs = [b["prompt_ids"] for b in batch]
    return {
        "input_ids": pad(seqs, pad_id, left=True),
        "attention_mask": pad([[1] * len(s) for s in seqs], 0, left=True),
        "prompts": [b["prompt"] for b in batch],
    }
