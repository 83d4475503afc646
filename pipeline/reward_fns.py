"""User functions that score responses: a reward in training (`--ppo.reward_fn`) or a gold
metric for evaluation only (`--ppo.eval_reward_fn`).

A function is named `path/to/file.py:NAME` (a Python file, loaded by its path) or
`package.module:NAME` (imported), and is called batched on this rank's rows:

    def NAME(prompts: list[str], responses: list[str]) -> list[float]: ...

one finite number per row (a list, tuple, NumPy array or 1-D tensor). The default task's gold
preference is the built-in instance, `pipeline.default_task:gold`. Every failure (the file or name
missing, an exception, a wrong length, a non-number or a non-finite value) is a `UserError` of
one paragraph naming the option, the function and, for a value, the row.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pipeline.errors import UserError

DEFAULT_TASK_GOLD = "pipeline.default_task:gold"


def split_spec(spec: str, option: str) -> tuple[str, str]:
    """`FILE.py:NAME` or `module:NAME` -> (file or module, NAME); a malformed spec is refused."""
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name.isidentifier():
        raise UserError(
            f"option {option}={spec!r}: expected FILE.py:NAME (a Python file and the name of a "
            f"function in it) or module:NAME, e.g. my_task.py:gold."
        )
    return where, name


def source_file(spec: str, option: str) -> Path:
    """The file that defines the function (its content is part of the PPO stage's fingerprint)."""
    where, _ = split_spec(spec, option)
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise UserError(f"option {option}={spec!r}: the file {where} does not exist.")
        return path
    try:
        found = importlib.util.find_spec(where)
    except (ImportError, ValueError) as e:
        found, why = None, f" ({e})"
    else:
        why = ""
    if found is None or not found.origin or not Path(found.origin).is_file():
        raise UserError(
            f"option {option}={spec!r}: no module {where!r} can be imported{why}; give "
            "FILE.py:NAME for a function in a file."
        )
    return Path(found.origin)


@dataclass(frozen=True)
class ScoreFn:
    """A loaded user function, called with the checks of the module docstring."""

    spec: str  # as given, e.g. tasks/sort.py:gold
    option: str  # the option that named it, for messages
    fn: Callable

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        assert len(prompts) == len(responses)
        try:
            out = self.fn(list(prompts), list(responses))
        except Exception as e:  # the user's code: name the first row that raises on its own
            raise UserError(
                f"{self._who()} raised {type(e).__name__}: "
                f"{e}{self._failing_row(prompts, responses)}. PPO stopped; fix the function and "
                "rerun (the stage resumes from its last checkpoint)."
            ) from None
        if hasattr(out, "tolist"):  # NumPy arrays and tensors
            out = out.tolist()
        try:
            values = list(out)
        except TypeError:
            raise UserError(
                f"{self._who()} returned {type(out).__name__}, not a list of numbers (one per row)."
            ) from None
        if len(values) != len(prompts):
            raise UserError(
                f"{self._who()} returned {len(values)} values for {len(prompts)} rows: it must "
                "return one number per (prompt, response) row, in order."
            )
        result = []
        for i, v in enumerate(values):
            ok = isinstance(v, (int, float)) and not isinstance(v, bool)
            if not ok or not math.isfinite(v):
                raise UserError(
                    f"{self._who()} returned {v!r} for row {i} (prompt {prompts[i]!r}, response "
                    f"{responses[i]!r}): every value must be a finite number."
                )
            result.append(float(v))
        return result

    def _who(self) -> str:
        return f"option {self.option}: the function {self.spec}"

    def _failing_row(self, prompts: list[str], responses: list[str]) -> str:
        for i, (p, r) in enumerate(zip(prompts, responses)):
            try:
                self.fn([p], [r])
            except Exception:
                return f" (row {i} alone raises too: prompt {p!r}, response {r!r})"
        return " (on the whole batch; no single row raises alone)"


def load(spec: str, option: str) -> ScoreFn:
    """Import the function named by `spec` (see the module docstring)."""
    where, name = split_spec(spec, option)
    path = source_file(spec, option)
    try:
        if where.endswith(".py"):
            module_name = f"_rlhf_user_fn_{abs(hash(str(path.resolve())))}"
            module_spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[module_name] = module  # dataclasses and pickling look modules up here
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except Exception as e:
        raise UserError(
            f"option {option}={spec!r}: importing {where} raised {type(e).__name__}: {e}"
        ) from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise UserError(
            f"option {option}={spec!r}: {where} has no function {name!r}"
            f"{'' if fn is None else f' ({name} is a {type(fn).__name__})'}."
        )
    return ScoreFn(spec, option, fn)
