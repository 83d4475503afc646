"""Datasets: loading through `datasets`, row validation, tokenisation, masking and collation.

Every stage reads its rows here, whether they come from the embedded default task or from the
user's files, so the same checks apply to both. Bad rows raise UserError naming file, row and
field.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.config import DATA_FORMATS
from pipeline.errors import UserError

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label of tokens that carry no loss (prompt and padding)
FIELDS = {  # dataset role -> the fields each of its rows must have
    "sft_data": ("prompt", "response"), "sft_eval_data": ("prompt", "response"),
    "reward_data": ("prompt", "chosen", "rejected"), "reward_eval_data": ("prompt", "chosen", "rejected"),
    "prompt_data": ("prompt",), "eval_prompt_data": ("prompt",),
    "ptx_data": ("prompt", "response"),  # PPO-ptx: supervised rows mixed into the actor update
}
KNOWN_COLUMNS = ("prompt", "response", "chosen", "rejected", "messages")  # the columns read; others are ignored
_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def is_hub_name(path: str) -> bool:
    """A dataset named on the Hugging Face hub (`Dahoas/rm-static`), not a local file or folder."""
    p = Path(path)
    return (not p.exists() and not path.startswith((".", "/", "~")) and p.suffix not in _BUILDERS
            and 0 < len(path) and path.count("/") <= 1)


def _hub_dataset(name: str):
    """The `train` split of a hub dataset (cached by `datasets` after the first download)."""
    import datasets

    try:
        return datasets.load_dataset(name, split="train")
    except Exception as e:  # no network, unknown name, gated repo, no train split: one paragraph
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"dataset {name} is not a local file or folder, and the Hugging Face hub did not "
                        f"give it ({reason}). Give a local json/jsonl/parquet/csv file or folder, or a hub "
                        f"dataset with a train split (once downloaded it is read from the datasets cache, "
                        f"also with HF_DATASETS_OFFLINE=1).") from None


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


def _known_rows(ds) -> list[dict]:
    known = [c for c in KNOWN_COLUMNS if c in ds.column_names]
    return ds.select_columns(known).to_list() if known else [{} for _ in range(len(ds))]


def _read_table(path: str) -> tuple[list[str], list[dict]]:
    """(column names, rows holding the columns this package reads) of a local or hub dataset."""
    import datasets

    datasets.disable_progress_bars()
    if is_hub_name(path):
        ds = _hub_dataset(path)
        return ds.column_names, _known_rows(ds)
    builder, files = _data_files(path)
    if builder in ("json", "csv"):
        _check_utf8(files)
    try:
        ds = datasets.load_dataset(builder, data_files=files, split="train", **_csv_as_text(builder, files))
        rows = _known_rows(ds)
    except Exception as e:  # datasets/pyarrow raise many types; name the file and the first line of why
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"dataset {path} could not be read as {builder}: {reason}") from None
    return ds.column_names, rows


def _check_text(path: str, i: int, field: str, value) -> str:
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"dataset {path}, row {i}: field {field!r} is empty or not text (got {value!r}).")
    return value


def _check_pair(path: str, i: int, chosen: str, rejected: str) -> None:
    if chosen.strip() == rejected.strip():
        raise UserError(f"dataset {path}, row {i}: 'chosen' and 'rejected' are identical "
                        f"({chosen!r}); a preference pair needs two different responses.")


def load_rows(path: str, fields: tuple[str, ...]) -> list[dict]:
    """Rows of a local dataset, each with every field a non-empty string; UserError otherwise."""
    columns, rows = _read_table(path)
    missing = [f for f in fields if f not in columns]
    if missing:
        raise UserError(f"dataset {path}: field {missing[0]!r} is missing (columns: "
                        f"{', '.join(columns) or 'none'}; expected {', '.join(fields)}).")
    if not rows:
        raise UserError(f"dataset {path} has no rows.")
    out = []
    for i, row in enumerate(rows):
        out.append({f: _check_text(path, i, f, row[f]) for f in fields})
        if "chosen" in fields:
            _check_pair(path, i, row["chosen"], row["rejected"])
    return out


def file_digest(path: str) -> str:
    """Content hash of a dataset file or folder (for the orchestrator's up-to-date check); of a hub
    dataset, the fingerprint `datasets` gives its cached train split."""
    if is_hub_name(path):
        return f"hub:{path}:{_hub_dataset(path)._fingerprint}"
    h = hashlib.sha256()
    p = Path(path)
    for f in sorted(p.rglob("*")) if p.is_dir() else [p]:
        if f.is_file():
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()


# ---------------------------------------------------------------- formats, splits and mixes
FORMATS = DATA_FORMATS  # auto, prompt_response, prompt_chosen_rejected, hh, messages, prompt
ROLE_KIND = {"sft_data": "sft", "sft_eval_data": "sft", "reward_data": "reward",
             "reward_eval_data": "reward", "prompt_data": "prompt", "eval_prompt_data": "prompt",
             "ptx_data": "sft"}
_KIND = {  # what a stage's rows hold, and how to name what it needs in a message
    "sft": ("SFT", ("prompt", "response"), "--data.sft_data_path"),
    "reward": ("reward-model", ("prompt", "chosen", "rejected"), "--data.reward_data_path"),
    "prompt": ("PPO", ("prompt",), "--data.prompt_data_path"),
}
_ROLE_NAMES = {"ptx_data": ("PPO-ptx", "--ppo.ptx_data_path")}  # roles that borrow a kind but not its stage
_FORMAT_COLUMNS = {"prompt_response": ("prompt", "response"),
                   "prompt_chosen_rejected": ("prompt", "chosen", "rejected"),
                   "hh": ("chosen", "rejected"), "prompt": ("prompt",)}
HH_ASSISTANT, HH_HUMAN = "Assistant:", "Human:"


@dataclass(frozen=True)
class Source:
    """Where one dataset role's rows come from: one or more datasets (mixed by `weights`), their
    format, the share of `split` taken (`part`: 0 SFT, 1 reward model, 2 PPO) and, when the stage
    has no eval set of its own, which side of the seeded held-out slice (`holdout`)."""

    paths: tuple[str, ...]
    format: str = "auto"
    weights: tuple[float, ...] = ()  # one per path; empty: plain concatenation
    split: tuple[float, ...] = ()  # data_split ratios; empty: every row
    part: int = 0
    holdout: str = ""  # "": every row of the share; "train": all but the eval slice; "eval": the slice
    eval_fraction: float = 0.05
    seed: int = 0

    def __str__(self) -> str:
        notes = []
        if self.split:
            notes.append(f"share {self.part + 1} of data_split {','.join(f'{x:g}' for x in self.split)}")
        if self.holdout:
            notes.append("held-out eval slice" if self.holdout == "eval" else "without its held-out eval slice")
        return " + ".join(self.paths) + (f" ({'; '.join(notes)})" if notes else "")

    def describe(self) -> dict:
        """Everything but the paths' content (fingerprinted separately)."""
        d = dataclasses.asdict(self)
        d.pop("paths")
        if not self.holdout:
            d.pop("eval_fraction")
        if not (self.split or self.holdout or self.weights):
            d.pop("seed")
        return d


def as_source(spec) -> Source:
    return spec if isinstance(spec, Source) else Source((str(spec),))


def _first(rows: list[dict], column: str):
    return next((r[column] for r in rows if r.get(column) is not None), None)


def detect_format(path: str, columns: list[str], rows: list[dict]) -> str:
    """The format a dataset's columns (and the type of its chosen values) say it has."""
    cols = set(columns)
    if "messages" in cols:
        return "messages"
    if {"chosen", "rejected"} <= cols:
        if isinstance(_first(rows, "chosen"), list):
            return "messages"
        return "prompt_chosen_rejected" if "prompt" in cols else "hh"
    if {"prompt", "response"} <= cols:
        return "prompt_response"
    if "prompt" in cols:
        return "prompt"
    raise UserError(
        f"dataset {path}: cannot tell its format from its columns ({', '.join(columns) or 'none'}). "
        f"Expected prompt/response, prompt/chosen/rejected, chosen/rejected HH dialogues "
        f"('\\n\\nHuman: ... \\n\\nAssistant: ...'), chat 'messages', or prompt only; rename the "
        f"columns or set --data.data_format.")


def _feeds(fmt: str, cols: set) -> set:
    if fmt == "messages":
        return {"sft", "reward", "prompt"} if {"chosen", "rejected"} <= cols else {"sft", "prompt"}
    return {"prompt_response": {"sft", "prompt"}, "prompt": {"prompt"}}.get(fmt, {"sft", "reward", "prompt"})


def _check_columns(path: str, columns: list[str], fmt: str, kind: str, given: bool, role: str = "") -> None:
    """The dataset has the columns of its format, and that format can feed this stage."""
    cols = set(columns)
    listed = ", ".join(columns) or "none"
    if given:
        need = _FORMAT_COLUMNS.get(fmt) or (("messages",) if "messages" in cols or "chosen" not in cols
                                             else ("chosen", "rejected"))
        missing = [c for c in need if c not in cols]
        if missing:
            raise UserError(f"dataset {path}: field {missing[0]!r} is missing (columns: {listed}; "
                            f"--data.data_format {fmt} expects {', '.join(need)}).")
    if kind not in _feeds(fmt, cols):
        stage, fields, option = _KIND[kind]
        stage, option = _ROLE_NAMES.get(role, (stage, option))
        missing = [f for f in fields if f not in cols] or list(fields)
        raise UserError(
            f"dataset {path}: field {missing[0]!r} is missing (columns: {listed}; read as format "
            f"{fmt}). The {stage} stage needs {'/'.join(fields)} rows"
            + (", chosen/rejected HH dialogues or chat messages with chosen/rejected" if kind == "reward"
               else ", preference rows (their chosen response is used) or chat 'messages'" if kind == "sft"
               else "") + f"; give it its own dataset with {option} or change --data.data_format.")


def hh_split(path: str, i: int, field: str, text) -> tuple[str, str]:
    """An HH-RLHF dialogue ("\\n\\nHuman: ... \\n\\nAssistant: ...") cut at its LAST assistant turn:
    (prompt ending with "Assistant:", that turn's response)."""
    _check_text(path, i, field, text)
    k = len(text)
    while True:
        k = text.rfind(HH_ASSISTANT, 0, k)
        if k <= 0 or text[k - 1] == "\n":  # at a turn boundary, not "Assistant:" quoted in a turn
            break
    if k < 0:
        raise UserError(f"dataset {path}, row {i}: field {field!r} is not an HH dialogue: it has no "
                        f"'{HH_ASSISTANT}' turn (expected '\\n\\nHuman: ... \\n\\nAssistant: ...'; "
                        f"got {text[:80]!r}).")
    prompt, response = text[:k + len(HH_ASSISTANT)], text[k + len(HH_ASSISTANT):].strip()
    if HH_HUMAN not in prompt:
        raise UserError(f"dataset {path}, row {i}: field {field!r} has no '{HH_HUMAN}' turn before its "
                        f"last '{HH_ASSISTANT}' (got {text[:80]!r}).")
    if not response:
        raise UserError(f"dataset {path}, row {i}: field {field!r}: the last '{HH_ASSISTANT}' turn is "
                        f"empty, so there is no response to learn from.")
    return prompt, response


def _messages(path: str, i: int, field: str, value) -> list[dict]:
    """A validated chat message list: mappings with text `role` and non-empty text `content`."""
    if not isinstance(value, list) or not value:
        raise UserError(f"dataset {path}, row {i}: field {field!r} must be a non-empty list of chat "
                        f"messages ({{'role': ..., 'content': ...}}), got {str(value)[:80]!r}.")
    out = []
    for j, m in enumerate(value):
        role = m.get("role") if isinstance(m, dict) else None
        content = m.get("content") if isinstance(m, dict) else None
        if not isinstance(role, str) or not role.strip():
            raise UserError(f"dataset {path}, row {i}: field {field!r}, message {j} has no 'role' text "
                            f"(got {str(m)[:80]!r}).")
        if not isinstance(content, str) or not content.strip():
            raise UserError(f"dataset {path}, row {i}: field {field!r}, message {j} ({role}) has empty or "
                            f"no 'content' text (got {str(m)[:80]!r}).")
        out.append({"role": role, "content": content})
    return out


def _reply(path: str, i: int, field: str, msgs: list[dict]) -> tuple[list[dict], str]:
    """(context, text of the final assistant message) of a conversation."""
    if msgs[-1]["role"] != "assistant":
        raise UserError(f"dataset {path}, row {i}: field {field!r} must end with an 'assistant' message "
                        f"(the response), but its last message is from {msgs[-1]['role']!r}.")
    if len(msgs) < 2:
        raise UserError(f"dataset {path}, row {i}: field {field!r} has only the assistant message; a "
                        f"prompt message must come before it.")
    return msgs[:-1], msgs[-1]["content"]


def _chat_row(path: str, i: int, row: dict, kind: str) -> dict:
    """A messages-format row as {"messages": prompt messages, plus response or chosen/rejected text}
    (rendered with the chat template later)."""
    if row.get("messages") is not None or "chosen" not in row:
        msgs = _messages(path, i, "messages", row.get("messages"))
        if kind == "prompt":  # PPO: the conversation up to its last assistant turn, or all of it
            return {"messages": msgs[:-1] if msgs[-1]["role"] == "assistant" and len(msgs) > 1 else msgs}
        context, response = _reply(path, i, "messages", msgs)
        return {"messages": context, "response": response}
    prompt = row.get("prompt")
    prompt = ([] if prompt is None else [{"role": "user", "content": _check_text(path, i, "prompt", prompt)}]
              if not isinstance(prompt, list) else _messages(path, i, "prompt", prompt))
    sides = {}
    for side in ("chosen", "rejected"):
        msgs = _messages(path, i, side, row.get(side))
        if prompt and msgs[:len(prompt)] == prompt:  # the conversation repeats the prompt
            msgs = msgs[len(prompt):]
        sides[side] = _reply(path, i, side, prompt + msgs)
    (context, chosen), (other, rejected) = sides["chosen"], sides["rejected"]
    if context != other:
        raise UserError(f"dataset {path}, row {i}: 'chosen' and 'rejected' differ before their last "
                        f"assistant message; a preference pair must share its prompt.")
    _check_pair(path, i, chosen, rejected)
    if kind == "prompt":
        return {"messages": context}
    return {"messages": context, "response": chosen} if kind == "sft" else \
        {"messages": context, "chosen": chosen, "rejected": rejected}


def convert(path: str, fmt: str, kind: str, rows) -> list[dict]:
    """(row index, raw row) pairs of one dataset -> the stage's rows: {prompt, response} (SFT),
    {prompt, chosen, rejected} (reward model) or {prompt} (PPO). Chat rows keep their messages
    for `render`."""
    out, hh_mismatch = [], 0
    for i, row in rows:
        if fmt == "messages":
            out.append(_chat_row(path, i, row, kind))
            continue
        if fmt == "hh":
            prompt, chosen = hh_split(path, i, "chosen", row.get("chosen"))
            rejected = None
            if kind != "prompt":  # PPO reads the prompt only
                other, rejected = hh_split(path, i, "rejected", row.get("rejected"))
                hh_mismatch += other != prompt
                _check_pair(path, i, chosen, rejected)
            r = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
        else:
            r = {f: row.get(f) for f in _FORMAT_COLUMNS[fmt]}
            if kind != "prompt":
                for f in r:
                    _check_text(path, i, f, r[f])
                if fmt == "prompt_chosen_rejected":
                    _check_pair(path, i, r["chosen"], r["rejected"])
        prompt = _check_text(path, i, "prompt", r["prompt"])
        if kind == "sft":
            out.append({"prompt": prompt, "response": r.get("response") or r["chosen"]})
        elif kind == "reward":
            out.append({"prompt": prompt, "chosen": r["chosen"], "rejected": r["rejected"]})
        else:
            out.append({"prompt": prompt})
    if hh_mismatch:
        log.warning("dataset %s: %d HH rows whose chosen and rejected dialogues differ before the last "
                    "assistant turn use the chosen dialogue's prompt.", path, hh_mismatch)
    return out


def render(rows: list[dict], tokenizer, what: str, tokenizer_name: str = "") -> list[dict]:
    """Chat rows -> text rows: the prompt messages through the tokenizer's chat template (with the
    generation prompt); a response stays its assistant message's text (the EOS follows it)."""
    if not any("messages" in r for r in rows):
        return rows
    if callable(tokenizer) and not hasattr(tokenizer, "apply_chat_template"):
        tokenizer = tokenizer()  # loaded only when chat rows need it
    if not getattr(tokenizer, "chat_template", None):
        name = tokenizer_name or getattr(tokenizer, "name_or_path", "")
        raise UserError(f"dataset {what} holds chat messages, which are rendered with the tokenizer's chat "
                        f"template, but tokenizer {name} has none: use a tokenizer that has one "
                        f"(--data.tokenizer_path), add 'chat_template' to its tokenizer_config.json, or "
                        f"give the data as text (--data.data_format prompt_response, "
                        f"prompt_chosen_rejected or prompt).")
    bos = tokenizer.bos_token
    adds_bos = bool(bos) and tokenizer("x", add_special_tokens=True)["input_ids"][:1] == [tokenizer.bos_token_id]
    out = []
    for r in rows:
        if "messages" not in r:
            out.append(r)
            continue
        try:
            prompt = tokenizer.apply_chat_template(r["messages"], tokenize=False, add_generation_prompt=True)
        except Exception as e:  # a template may refuse a conversation (e.g. roles out of order)
            raise UserError(f"dataset {what}: the chat template of tokenizer {tokenizer_name} refused "
                            f"the messages {str(r['messages'])[:120]!r}: {str(e).splitlines()[0]}") from None
        if adds_bos and prompt.startswith(bos):  # the tokenizer adds its own BOS: not twice
            prompt = prompt[len(bos):]
        out.append({"prompt": prompt, **{k: v for k, v in r.items() if k != "messages"}})
    return out


def split_indices(n: int, ratios: tuple[float, ...], part: int, seed: int) -> list[int]:
    """Row indices of share `part` of `n` rows split by `ratios` (DeepSpeed-Chat's data_split):
    a seeded permutation cut at the rounded cumulative ratios, so the shares are disjoint, cover
    every row and depend only on (n, ratios, seed)."""
    import numpy as np

    perm = np.random.RandomState(seed).permutation(n)
    total, cum, bounds = sum(ratios), 0.0, [0]
    for r in ratios:
        cum += r
        bounds.append(int(round(n * cum / total)))
    return sorted(perm[bounds[part]:bounds[part + 1]].tolist())


def holdout_indices(idx: list[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, eval) of a share: a seeded max(1, round(fraction * n)) rows held out for evaluation."""
    import numpy as np

    k = max(1, int(round(len(idx) * fraction)))
    perm = np.random.RandomState(seed + 1).permutation(len(idx))
    held = set(perm[:k].tolist())
    return ([x for j, x in enumerate(idx) if j not in held], [x for j, x in enumerate(idx) if j in held])


def mix(parts: list[list[dict]], weights: tuple[float, ...], seed: int) -> list[dict]:
    """Several datasets' rows as one: with weights, dataset i makes up weights[i] / sum(weights) of
    the mix (as many rows in all as the datasets have together), repeating its rows whole and
    drawing the remainder without replacement, seeded; without weights, plain concatenation."""
    import numpy as np

    if not weights:
        return [r for p in parts for r in p]
    total_rows, total_w = sum(len(p) for p in parts), sum(weights)
    rng, out = np.random.RandomState(seed + 2), []
    for rows, w in zip(parts, weights):
        want = int(round(total_rows * w / total_w))
        if not rows or not want:
            continue
        full, rest = divmod(want, len(rows))
        out += rows * full + [rows[j] for j in sorted(rng.choice(len(rows), rest, replace=False).tolist())]
    return out


def load_role(spec, role: str, tokenizer=None, tokenizer_name: str = "") -> list[dict]:
    """The rows of one dataset role (`FIELDS`), from a path or a `Source`: every dataset read, its
    format detected (or given), its share and held-out side taken, converted, mixed, and chat
    messages rendered with `tokenizer` (an object or a zero-argument loader; None: checked only,
    not rendered). UserError names the file, row, field or option at fault."""
    src, kind = as_source(spec), ROLE_KIND[role]
    parts = []
    for path in src.paths:
        columns, raw = _read_table(path)
        if not raw:
            raise UserError(f"dataset {path} has no rows.")
        fmt = src.format if src.format != "auto" else detect_format(path, columns, raw)
        _check_columns(path, columns, fmt, kind, src.format != "auto", role)
        idx = split_indices(len(raw), src.split, src.part, src.seed) if src.split else list(range(len(raw)))
        if src.holdout:
            if len(idx) < 2:
                raise UserError(f"dataset {path}: {len(idx)} rows in {src} are too few to hold out an eval "
                                f"slice; give the {_KIND[kind][0]} stage its own eval dataset.")
            idx = holdout_indices(idx, src.eval_fraction, src.seed)[src.holdout == "eval"]
        parts.append(convert(path, fmt, kind, ((i, raw[i]) for i in idx)))
    rows = mix(parts, src.weights if src.holdout != "eval" else (), src.seed)
    if not rows:
        stage, _, option = _KIND[kind]
        stage, option = _ROLE_NAMES.get(role, (stage, option))
        raise UserError(f"dataset {src} gives the {stage} stage no rows: give it a non-zero share in "
                        f"--data.data_split or its own dataset with {option}.")
    return render(rows, tokenizer, str(src), tokenizer_name) if tokenizer is not None else rows


# ---------------------------------------------------------------- tokenisation
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
            log.warning("%s: %d of %d prompts were longer than max_prompt_len=%d tokens (the longest has %d) "
                        "and were truncated from the left; raise --data.max_prompt_len to keep them whole.",
                        what, self.prompts, self.prompts_seen, max_prompt_len, self.longest_prompt)
        if self.responses:
            log.warning("%s: %d of %d responses were longer than max_response_len=%d tokens, EOS included (the "
                        "longest has %d), and were truncated; raise --data.max_response_len to keep them whole.",
                        what, self.responses, self.responses_seen, max_response_len, self.longest_response)


def encode_prompt(tokenizer, prompt: str, max_len: int, cuts: Truncations) -> list[int]:
    """Prompt ids with the tokenizer's own special tokens (e.g. BOS), cut from the left to fit
    (a leading BOS is kept: the model always saw one)."""
    ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    cuts.prompts_seen += 1
    cuts.longest_prompt = max(cuts.longest_prompt, len(ids))
    if len(ids) > max_len:
        cuts.prompts += 1
        keep_bos = tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id
        ids = [ids[0]] + ids[len(ids) - max_len + 1:] if keep_bos else ids[-max_len:]
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


# ---------------------------------------------------------------- tokenised-example cache
EXAMPLES_VERSION = 1  # bump when the example builders below change what they produce


def examples_cache_file(cache_dir: str, stage: str, role: str, identity: dict) -> Path:
    """Where the examples of a stage's data role are cached: keyed by the content hash of the data
    and the tokenizer (from the stage's identity, see inputs.identity) and the data options."""
    key = hashlib.sha256(json.dumps(
        {"role": role, "data": identity["inputs"][role], "tokenizer": identity["inputs"]["tokenizer"],
         "options": identity["data"], "trust_remote_code": identity["model"]["trust_remote_code"],
         "version": EXAMPLES_VERSION}, sort_keys=True).encode()).hexdigest()
    root = Path(cache_dir) if cache_dir else Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "rlhf-pipeline"
    return root / "tokenized" / f"{stage}-{role}-{key[:32]}.json"


def build_cached(path: Path, build) -> str | None:
    """Build examples and write them, with the warnings the build logged (truncations), to `path`
    (atomically: several nodes may share the folder). Returns an error message, or None.

    The warnings are held back, not logged here: `read_cached` logs them, so every run, the one
    that built the file included, says them once."""
    notes: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: (notes.append(record.getMessage()) if record.levelno >= logging.WARNING
                                   else log.parent.handle(record))
    log.addHandler(handler)
    propagate, log.propagate = log.propagate, False
    try:
        rows = build()
    except UserError as e:
        rows, error = None, str(e)
    finally:
        log.removeHandler(handler)
        log.propagate = propagate
    if rows is None:
        for note in notes:  # what the build found before it failed
            log.warning("%s", note)
        return error
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"notes": notes, "examples": rows}))
        os.replace(tmp, path)
    except OSError as e:
        if tmp.is_file():
            tmp.unlink()
        return (f"the tokenised-data cache {path} could not be written ({e.strerror or e}); free space "
                f"there or set --cache_dir.")
    return None


def read_cached(path: Path) -> list[dict]:
    """Examples written by `build_cached`; the build's warnings are logged again."""
    cached = json.loads(path.read_text())
    for note in cached["notes"]:
        log.warning("%s", note)
    return cached["examples"]


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
