"""Where a dataset role's rows come from: local json/jsonl/parquet/csv files and folders or hub
datasets read through `datasets`, their share of `data_split`, the held-out eval slice, and the
weighted mix of several datasets (`load_role`, the stages' entry point).

Not here: what the columns mean and how a row becomes a stage's row (formats.py), tokens
(tokenize.py), batches (collate.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path

from pipeline.data.formats import (
    KINDS,
    ROLE_KIND,
    ROLE_NAMES,
    check_columns,
    check_pair,
    check_text,
    convert,
    detect_format,
    render,
)
from pipeline.errors import UserError

FIELDS = {  # dataset role -> the fields each of its rows must have
    "sft_data": ("prompt", "response"),
    "sft_eval_data": ("prompt", "response"),
    "reward_data": ("prompt", "chosen", "rejected"),
    "reward_eval_data": ("prompt", "chosen", "rejected"),
    "prompt_data": ("prompt",),
    "eval_prompt_data": ("prompt",),
    "ptx_data": ("prompt", "response"),  # PPO-ptx: supervised rows mixed into the actor update
}
KNOWN_COLUMNS = (
    "prompt",
    "response",
    "chosen",
    "rejected",
    "messages",
)  # the columns read; others are ignored
_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def is_hub_name(path: str) -> bool:
    """A dataset named on the Hugging Face hub (`Dahoas/rm-static`), not a local file or folder."""
    p = Path(path)
    return (
        not p.exists()
        and not path.startswith((".", "/", "~"))
        and p.suffix not in _BUILDERS
        and 0 < len(path)
        and path.count("/") <= 1
    )


def _hub_dataset(name: str):
    """The `train` split of a hub dataset (cached by `datasets` after the first download)."""
    import datasets

    try:
        return datasets.load_dataset(name, split="train")
    except Exception as e:  # no network, unknown name, gated repo, no train split: one paragraph
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(
            f"dataset {name} is not a local file or folder, and the Hugging Face hub did not "
            f"give it ({reason}). Give a local json/jsonl/parquet/csv file or folder, or a hub "
            f"dataset with a train split (once downloaded it is read from the datasets cache, "
            f"also with HF_DATASETS_OFFLINE=1)."
        ) from None


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
        raise UserError(
            f"dataset {path}: expected .json, .jsonl, .parquet or .csv files of one kind, "
            f"got {', '.join(sorted(f.name for f in files))}."
        )
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
                        f"dataset {name}, line {lineno}: not UTF-8 text (byte {line[e.start]:#04x} "
                        f"at column {e.start + 1}, file offset {offset + e.start}); save the file "
                        "as UTF-8."
                    ) from None
                offset += len(line)


def _csv_as_text(builder: str, files: list[str]) -> dict:
    """CSV cells stay the text written ("4", "NA"), not numbers or missing values."""
    if builder != "csv":
        return {}
    import csv

    import datasets

    with open(files[0], newline="", encoding="utf-8", errors="replace") as f:
        header = next(csv.reader(f), [])
    return {
        "keep_default_na": False,
        "features": datasets.Features({c: datasets.Value("string") for c in header}),
    }


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
        ds = datasets.load_dataset(
            builder, data_files=files, split="train", **_csv_as_text(builder, files)
        )
        rows = _known_rows(ds)
    except (
        Exception
    ) as e:  # datasets/pyarrow raise many types; name the file and the first line of why
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"dataset {path} could not be read as {builder}: {reason}") from None
    return ds.column_names, rows


def load_rows(path: str, fields: tuple[str, ...]) -> list[dict]:
    """Rows of a local dataset, each with every field a non-empty string; UserError otherwise."""
    columns, rows = _read_table(path)
    missing = [f for f in fields if f not in columns]
    if missing:
        raise UserError(
            f"dataset {path}: field {missing[0]!r} is missing (columns: "
            f"{', '.join(columns) or 'none'}; expected {', '.join(fields)})."
        )
    if not rows:
        raise UserError(f"dataset {path} has no rows.")
    out = []
    for i, row in enumerate(rows):
        out.append({f: check_text(path, i, f, row[f]) for f in fields})
        if "chosen" in fields:
            check_pair(path, i, row["chosen"], row["rejected"])
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
    holdout: str = (
        ""  # "": every row of the share; "train": all but the eval slice; "eval": the slice
    )
    eval_fraction: float = 0.05
    seed: int = 0

    def __str__(self) -> str:
        notes = []
        if self.split:
            notes.append(
                f"share {self.part + 1} of data_split {','.join(f'{x:g}' for x in self.split)}"
            )
        if self.holdout:
            notes.append(
                "held-out eval slice"
                if self.holdout == "eval"
                else "without its held-out eval slice"
            )
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
    return sorted(perm[bounds[part] : bounds[part + 1]].tolist())


def holdout_indices(idx: list[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, eval) of a share: a seeded max(1, round(fraction * n)) rows held out for
    evaluation."""
    import numpy as np

    k = max(1, int(round(len(idx) * fraction)))
    perm = np.random.RandomState(seed + 1).permutation(len(idx))
    held = set(perm[:k].tolist())
    return (
        [x for j, x in enumerate(idx) if j not in held],
        [x for j, x in enumerate(idx) if j in held],
    )


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
        out += rows * full + [
            rows[j] for j in sorted(rng.choice(len(rows), rest, replace=False).tolist())
        ]
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
        check_columns(path, columns, fmt, kind, src.format != "auto", role)
        idx = (
            split_indices(len(raw), src.split, src.part, src.seed)
            if src.split
            else list(range(len(raw)))
        )
        if src.holdout:
            if len(idx) < 2:
                raise UserError(
                    f"dataset {path}: {len(idx)} rows in {src} are too few to hold out an eval "
                    f"slice; give the {KINDS[kind][0]} stage its own eval dataset."
                )
            idx = holdout_indices(idx, src.eval_fraction, src.seed)[src.holdout == "eval"]
        parts.append(convert(path, fmt, kind, ((i, raw[i]) for i in idx)))
    rows = mix(parts, src.weights if src.holdout != "eval" else (), src.seed)
    if not rows:
        stage, _, option = KINDS[kind]
        stage, option = ROLE_NAMES.get(role, (stage, option))
        raise UserError(
            f"dataset {src} gives the {stage} stage no rows: give it a non-zero share in "
            f"--data.data_split or its own dataset with {option}."
        )
    return render(rows, tokenizer, str(src), tokenizer_name) if tokenizer is not None else rows
