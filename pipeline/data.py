"""Datasets: loading through `datasets`, row validation, tokenisation, masking and collation.

Every stage reads its rows here, whether they come from the embedded default task or from the
user's files, so the same checks apply to both. Bad rows raise UserError naming file, row and
field.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.errors import UserError

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label of tokens that carry no loss (prompt and padding)
FIELDS = {  # dataset role -> the fields each of its rows must have
    "sft_data": ("prompt", "response"), "sft_eval_data": ("prompt", "response"),
    "reward_data": ("prompt", "chosen", "rejected"), "reward_eval_data": ("prompt", "chosen", "rejected"),
    "prompt_data": ("prompt",), "eval_prompt_data": ("prompt",),
}
_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def _data_files(path: str) -> tuple[str, list[str]]:
    p = Path(path)
    if p.is_file():
        files = [p]
    elif p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix in _BUILDERS)
        if not files:
            raise UserError(f"dataset folder {path} has no .json/.jsonl/.parquet/.csv files.")
    else:
        raise UserError(f"dataset file {path} does not exist.")
    kinds = {_BUILDERS.get(f.suffix) for f in files}
    if None in kinds or len(kinds) != 1:
        raise UserError(f"dataset {path}: expected .json, .jsonl, .parquet or .csv files of one kind, "
                        f"got {', '.join(sorted(f.name for f in files))}.")
    return kinds.pop(), [str(f) for f in files]


def _check_utf8(files: list[str]) -> None:
    """Text files must be UTF-8: name the file, line and byte instead of a datasets traceback."""
    for name in files:
        with open(name, "rb") as f:
            offset = 0
            for lineno, line in enumerate(f, 1):  # a UTF-8 sequence never contains b"\n"
                try:
                    line.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise UserError(
                        f"dataset {name}, line {lineno}: not UTF-8 text (byte {line[e.start]:#04x} at "
                        f"column {e.start + 1}, file offset {offset + e.start}); save the file as "
                        f"UTF-8.") from None
                offset += len(line)


def _csv_as_text(builder: str, files: list[str]) -> dict:
    """CSV cells stay the text written ("4", "NA"), not numbers or missing values."""
    if builder != "csv":
        return {}
    import csv

    import datasets

    with open(files[0], newline="", encoding="utf-8", errors="replace") as f:
        header = next(csv.reader(f), [])
    return {"keep_default_na": False,
            "features": datasets.Features({c: datasets.Value("string") for c in header})}


def load_rows(path: str, fields: tuple[str, ...]) -> list[dict]:
    """Rows of a local dataset, each with every field a non-empty string; UserError otherwise."""
    import datasets

    builder, files = _data_files(path)
    if builder in ("json", "csv"):
        _check_utf8(files)
    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset(builder, data_files=files, split="train", **_csv_as_text(builder, files))
        missing = [f for f in fields if f not in ds.column_names]
        rows = ds.select_columns([f for f in fields if f in ds.column_names]).to_list()
    except Exception as e:  # datasets/pyarrow raise many types; name the file and the first line of why
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"dataset {path} could not be read as {builder}: {reason}") from None
    missing = [f for f in fields if f not in ds.column_names]
    if missing:
        raise UserError(f"dataset {path}: field {missing[0]!r} is missing (columns: "
                        f"{', '.join(ds.column_names) or 'none'}; expected {', '.join(fields)}).")
    if not rows:
        raise UserError(f"dataset {path} has no rows.")
    for i, row in enumerate(rows):
        for f in fields:
            if not isinstance(row[f], str) or not row[f].strip():
                raise UserError(f"dataset {path}, row {i}: field {f!r} is empty or not text "
                                f"(got {row[f]!r}).")
        if "chosen" in fields and row["chosen"].strip() == row["rejected"].strip():
            raise UserError(f"dataset {path}, row {i}: 'chosen' and 'rejected' are identical "
                            f"({row['chosen']!r}); a preference pair needs two different responses.")
    return rows


def file_digest(path: str) -> str:
    """Content hash of a dataset file or folder (for the orchestrator's up-to-date check)."""
    h = hashlib.sha256()
    p = Path(path)
    for f in sorted(p.rglob("*")) if p.is_dir() else [p]:
        if f.is_file():
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()


# ---------------------------------------------------------------- tokenisation
@dataclass
class Truncations:
    """How many prompts/responses were cut to fit the limits (reported, never silent)."""

    prompts: int = 0
    responses: int = 0

    def report(self, what: str, max_prompt_len: int, max_response_len: int) -> None:
        if self.prompts:
            log.warning("%s: %d prompts longer than max_prompt_len=%d were truncated from the left.",
                        what, self.prompts, max_prompt_len)
        if self.responses:
            log.warning("%s: %d responses longer than max_response_len=%d were truncated.",
                        what, self.responses, max_response_len)


def encode_prompt(tokenizer, prompt: str, max_len: int, cuts: Truncations) -> list[int]:
    """Prompt ids with the tokenizer's own special tokens (e.g. BOS), cut from the left to fit
    (a leading BOS is kept: the model always saw one)."""
    ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    if len(ids) > max_len:
        cuts.prompts += 1
        keep_bos = tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id
        ids = [ids[0]] + ids[len(ids) - max_len + 1:] if keep_bos else ids[-max_len:]
    return ids


def encode_response(tokenizer, response: str, max_len: int, cuts: Truncations) -> list[int]:
    """Response ids followed by EOS, cut to `max_len` (EOS included)."""
    ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
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
        out.append({"chosen_ids": p + encode_response(tokenizer, row["chosen"], max_response_len, cuts),
                    "rejected_ids": p + encode_response(tokenizer, row["rejected"], max_response_len, cuts)})
    cuts.report(what, max_prompt_len, max_response_len)
    return out


def prompt_examples(rows, tokenizer, max_prompt_len, what="prompts") -> list[dict]:
    cuts = Truncations()
    out = [{"prompt_ids": encode_prompt(tokenizer, row["prompt"], max_prompt_len, cuts),
            "prompt": row["prompt"]} for row in rows]
    cuts.report(what, max_prompt_len, 0)
    return out


def reencode(prompts: list[str], responses: list[list[int]], tokenizer, target_tokenizer,
             max_prompt_len: int, max_response_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt + response as another tokenizer reads them (a reward model with its own vocabulary).

    Responses (actor token ids, EOS included) are decoded to text and encoded again with the
    target tokenizer's own EOS; returns right-padded (input_ids, attention_mask).
    """
    cuts, rows = Truncations(), []
    for prompt, response in zip(prompts, responses):
        text = tokenizer.decode(response, skip_special_tokens=True)
        rows.append(encode_prompt(target_tokenizer, prompt, max_prompt_len, cuts)
                    + encode_response(target_tokenizer, text, max_response_len, cuts))
    cuts.report("reward-model re-encoding", max_prompt_len, max_response_len)
    return pad(rows, target_tokenizer.pad_token_id), pad([[1] * len(r) for r in rows], 0)


# ---------------------------------------------------------------- collation
def pad(seqs: list[list[int]], value: int, left: bool = False) -> torch.Tensor:
    """(B, T) tensor, padded on the right (training) or on the left (generation)."""
    width = max(len(s) for s in seqs)
    rows = [([value] * (width - len(s)) + s) if left else (s + [value] * (width - len(s))) for s in seqs]
    return torch.tensor(rows, dtype=torch.long)


def collate_sft(batch: list[dict], pad_id: int) -> dict:
    ids = pad([b["input_ids"] for b in batch], pad_id)
    return {"input_ids": ids,
            "attention_mask": pad([[1] * len(b["input_ids"]) for b in batch], 0),
            "labels": pad([b["labels"] for b in batch], IGNORE_INDEX)}


def collate_pairs(batch: list[dict], pad_id: int) -> dict:
    """Chosen rows first, then rejected rows: one forward pass scores both."""
    seqs = [b["chosen_ids"] for b in batch] + [b["rejected_ids"] for b in batch]
    return {"input_ids": pad(seqs, pad_id), "attention_mask": pad([[1] * len(s) for s in seqs], 0)}


def collate_prompts(batch: list[dict], pad_id: int) -> dict:
    """Left-padded prompts, ready for generation."""
    seqs = [b["prompt_ids"] for b in batch]
    return {"input_ids": pad(seqs, pad_id, left=True),
            "attention_mask": pad([[1] * len(s) for s in seqs], 0, left=True),
            "prompts": [b["prompt"] for b in batch]}
