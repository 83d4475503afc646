"""The command line: a Config from its defaults, `--config FILE` (YAML or JSON, several allowed)
and flags (`--sft.learning_rate 3e-4`), one `--FLAG` per option with its field comment as help,
"did you mean" for unknown flags, and every value coerced to its field's type.

Precedence: field defaults < `--config FILE` (later files override earlier ones option by option)
< command-line flags. Not here: the options themselves (config.py) and the checks of their values
(config_checks.py, run by `parse_config`).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import json
import types
import typing
from pathlib import Path
from typing import Any, Optional

import yaml

from pipeline.config import Config
from pipeline.config_checks import validate
from pipeline.errors import UserError


def _field_types(cls) -> dict:
    return typing.get_type_hints(cls)


def _is_dataclass_type(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp, where: str) -> Any:
    """Check/convert a value from a file or the command line to the field's type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(value, args[0], where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif origin is list:  # a YAML list, the command line's values, or one value
        (item,) = typing.get_args(tp)
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        if item is not str:  # numbers may also be given as "1,3"
            values = [v for x in values for v in (x.split(",") if isinstance(x, str) else [x])]
        return [
            _coerce(v, item, where) for v in values if not (isinstance(v, str) and not v.strip())
        ]
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    raise UserError(f"{where}: expected {getattr(tp, '__name__', tp)}, got {value!r}.")


def _from_dict(cls, data: dict, where: str, default=None):
    """A `cls` instance from a mapping, starting from `default` (so sections keep their
    defaults)."""
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a mapping of options, got {type(data).__name__}.")
    default = cls() if default is None else default
    hints = _field_types(cls)
    changes = {}
    for key, value in data.items():
        sub = f"{where}.{key}" if where else key
        if key not in hints:
            known = ", ".join(sorted(hints))
            close = difflib.get_close_matches(str(key), list(hints), n=1)
            hint = f" (did you mean {f'{where}.' if where else ''}{close[0]}?)" if close else ""
            raise UserError(
                f"{where or 'config'}: unknown option {sub!r}{hint}. Known options here: {known}."
            )
        tp = hints[key]
        changes[key] = (
            _from_dict(tp, value, sub, getattr(default, key))
            if _is_dataclass_type(tp)
            else _coerce(value, tp, f"option {sub}")
        )
    return dataclasses.replace(default, **changes)


def load_file(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file {path} does not exist.")
    try:
        text = p.read_text(encoding="utf-8")
        data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(
            f"config file {path} is not valid {'JSON' if p.suffix == '.json' else 'YAML'}: "
            f"{str(e).splitlines()[0]}"
        ) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path}: the top level must be a mapping of options.")
    return data


def _flat_fields(cls, prefix: str = ""):
    """Yield (dotted name, type, default, comment) for every leaf option."""
    default = cls()
    comments = _field_comments(cls)
    for f in dataclasses.fields(cls):
        tp = _field_types(cls)[f.name]
        name = f"{prefix}{f.name}"
        if _is_dataclass_type(tp):
            sub_default = getattr(default, f.name)
            for n, t, _, c in _flat_fields(tp, f"{name}."):
                yield n, t, getattr(sub_default, n[len(name) + 1 :]), c
        else:
            yield name, tp, getattr(default, f.name), comments.get(f.name, "")


def _field_comments(cls) -> dict:
    """Each field's help text: its `# comments`, on the lines of its statement (a trailing comment,
    also inside the parentheses the formatter wraps a long line in) and on comment-only lines
    directly above it, joined in order. A subclass's comment replaces its base's."""
    import ast
    import inspect
    import io
    import textwrap
    import tokenize

    out = {}
    for c in reversed(cls.__mro__[:-1]):
        source = textwrap.dedent(inspect.getsource(c))
        comments = {
            tok.start[0]: tok.string.lstrip("#").strip()
            for tok in tokenize.generate_tokens(io.StringIO(source).readline)
            if tok.type == tokenize.COMMENT
        }
        lines = source.splitlines()
        for node in ast.parse(source).body[0].body:
            if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
                continue
            above = []
            row = node.lineno - 1  # 1-based number of the line above the statement
            while row >= 1 and lines[row - 1].strip().startswith("#"):
                above.insert(0, comments[row])
                row -= 1
            inside = [comments[r] for r in range(node.lineno, node.end_lineno + 1) if r in comments]
            text = " ".join(t for t in above + inside if t)
            if text:
                out[node.target.id] = text
    return out


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _split_lines(self, text, width):  # keep values such as all-linear whole
        import textwrap

        return textwrap.wrap(
            self._whitespace_matcher.sub(" ", text).strip(), width, break_on_hyphens=False
        )


def build_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=description,
        argument_default=argparse.SUPPRESS,
        allow_abbrev=False,
        formatter_class=_HelpFormatter,
    )
    parser.add_argument(
        "--config",
        action="append",
        help="YAML or JSON file of options; may be given several times "
        "(e.g. a preset and a recipe: later files override earlier ones, command-line flags all)",
    )
    parser.add_argument("--local_rank", type=int, help="set by the deepspeed launcher")
    for name, tp, default, comment in _flat_fields(Config):
        kw = (
            {"metavar": "BOOL"}
            if tp is bool
            else {"nargs": "+"}
            if typing.get_origin(tp) is list
            else {}
        )
        parser.add_argument(
            f"--{name}",
            dest=name,
            help=f"{comment} (default: {default!r})".replace("%", "%%"),
            **({"nargs": "?", "const": "true"} if tp is bool else {}),
            **kw,
        )
    return parser


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one paragraph, exit 2, no usage wall
        raise UserError(f"command line: {message}. Run with --help to list the options.")


def did_you_mean(flag: str, known: list[str]) -> list[str]:
    """Options close to an unknown `--flag`, best first (at most 3). An option whose last
    component is the flag's wins (`--model_name_or_path`, the Hugging Face / TRL spelling, finds
    `model.model_name_or_path`); else the closest names by difflib's ratio (`--ppo.kl_coeff` finds
    `ppo.kl_coef`), comparing last components too when the flag names no known section."""
    name = flag.lstrip("-").split("=", 1)[0].replace("-", "_")  # also --model-name-or-path
    section, _, leaf = name.rpartition(".")
    sections = {k.rpartition(".")[0] for k in known}
    exact = [
        k
        for k in known
        if k == name or (k.rpartition(".")[2] == leaf and section in ("", k.rpartition(".")[0]))
    ]
    if exact:
        return exact[:3]

    def closest(candidates: list[str], leaves: bool) -> list[str]:
        scores = {
            k: max(
                difflib.SequenceMatcher(None, name, k).ratio(),
                difflib.SequenceMatcher(None, leaf, k.rpartition(".")[2]).ratio()
                if leaves
                else 0.0,
            )
            for k in candidates
        }
        best = max(scores.values(), default=0.0)
        return sorted(
            (k for k, v in scores.items() if v >= max(0.75, best - 0.05)), key=lambda k: -scores[k]
        )[:3]

    if section and section in sections:  # a known section: its own options first
        return closest([k for k in known if k.rpartition(".")[0] == section], False) or closest(
            known, False
        )
    return closest(known, True)


def _unknown_arguments(extra: list[str], known: list[str]) -> UserError:
    """One paragraph for what argparse could not place: each unknown flag with its suggestions."""
    flags = [x for x in extra if x.startswith("-")]
    if not flags:
        return UserError(
            f"command line: unexpected value(s) {' '.join(extra)} (each option takes the values "
            f"after it; list options take several). Run with --help to list the options."
        )
    parts = []
    for flag in flags:
        close = did_you_mean(flag, known)
        shown = flag.split("=", 1)[0]
        parts.append(
            f"{shown} (did you mean {' or '.join(f'--{k}' for k in close)}?)" if close else shown
        )
    return UserError(
        f"command line: unknown option{'s' if len(parts) > 1 else ''} {', '.join(parts)}. "
        f"Run with --help to list the options."
    )


def parse_config(argv: Optional[list[str]] = None, description: str = "RLHF pipeline") -> Config:
    """Build the Config from defaults, `--config FILE` and command-line overrides."""
    parser = build_parser(description)
    parser.__class__ = _Parser
    args, extra = parser.parse_known_args(argv)
    if extra:
        raise _unknown_arguments(extra, ["config", *(name for name, *_ in _flat_fields(Config))])
    args = vars(args)
    args.pop("local_rank", None)
    data = {}
    for path in args.pop("config", []):
        layer = load_file(path)
        try:  # each file alone first, so a mistake in it is reported as the file's
            _from_dict(Config, copy.deepcopy(layer), where="")
        except UserError as e:
            raise UserError(f"config file {path}: {e}") from None
        data = _merged(data, layer)
    for dotted, value in args.items():  # command line over file
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise UserError(
                    f"config file: section {p!r} must be a mapping of options "
                    f"(got {node!r}), so --{dotted} cannot be applied to it."
                )
        node[leaf] = value
    try:
        cfg = _from_dict(Config, data, where="")
    except UserError as e:  # the file alone was fine: the command line's value is at fault
        raise UserError(f"command line: {e}") from None
    validate(cfg)
    return cfg


def _merged(base: dict, over: dict) -> dict:
    """`over` on top of `base`, section by section (a later config file overrides single
    options)."""
    out = dict(base)
    for key, value in over.items():
        out[key] = (
            _merged(out[key], value)
            if isinstance(value, dict) and isinstance(out.get(key), dict)
            else value
        )
    return out
