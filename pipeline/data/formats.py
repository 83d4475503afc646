"""Dataset formats: which format a dataset's columns say it has (prompt/response,
prompt/chosen/rejected, HH-RLHF dialogues, chat messages, prompt only), whether that format can
feed a stage, and how its raw rows become the stage's rows ({prompt, response} for SFT, {prompt,
chosen, rejected} for the reward model, {prompt} for PPO), chat messages rendered through the
tokenizer's chat template. Bad rows raise UserError naming file, row and field.

Not here: reading files and mixing datasets (sources.py), tokens (tokenize.py).
"""

from __future__ import annotations

import logging

from pipeline.errors import UserError

log = logging.getLogger(__package__)  # "pipeline.data", the name its warnings have always had

ROLE_KIND = {
    "sft_data": "sft",
    "sft_eval_data": "sft",
    "reward_data": "reward",
    "reward_eval_data": "reward",
    "prompt_data": "prompt",
    "eval_prompt_data": "prompt",
    "ptx_data": "sft",
}
KINDS = {  # what a stage's rows hold, and how to name what it needs in a message
    "sft": ("SFT", ("prompt", "response"), "--data.sft_data_path"),
    "reward": ("reward-model", ("prompt", "chosen", "rejected"), "--data.reward_data_path"),
    "prompt": ("PPO", ("prompt",), "--data.prompt_data_path"),
}
ROLE_NAMES = {
    "ptx_data": ("PPO-ptx", "--ppo.ptx_data_path")
}  # roles that borrow a kind but not its stage
_FORMAT_COLUMNS = {
    "prompt_response": ("prompt", "response"),
    "prompt_chosen_rejected": ("prompt", "chosen", "rejected"),
    "hh": ("chosen", "rejected"),
    "prompt": ("prompt",),
}
HH_ASSISTANT, HH_HUMAN = "Assistant:", "Human:"


def check_text(path: str, i: int, field: str, value) -> str:
    if not isinstance(value, str) or not value.strip():
        raise UserError(
            f"dataset {path}, row {i}: field {field!r} is empty or not text (got {value!r})."
        )
    return value


def check_pair(path: str, i: int, chosen: str, rejected: str) -> None:
    if chosen.strip() == rejected.strip():
        raise UserError(
            f"dataset {path}, row {i}: 'chosen' and 'rejected' are identical "
            f"({chosen!r}); a preference pair needs two different responses."
        )


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
        f"dataset {path}: cannot tell its format from its columns "
        f"({', '.join(columns) or 'none'}). Expected prompt/response, prompt/chosen/rejected, "
        "chosen/rejected HH dialogues ('\\n\\nHuman: ... \\n\\nAssistant: ...'), chat 'messages', "
        "or prompt only; rename the columns or set --data.data_format."
    )


def _feeds(fmt: str, cols: set) -> set:
    if fmt == "messages":
        return {"sft", "reward", "prompt"} if {"chosen", "rejected"} <= cols else {"sft", "prompt"}
    return {"prompt_response": {"sft", "prompt"}, "prompt": {"prompt"}}.get(
        fmt, {"sft", "reward", "prompt"}
    )


def check_columns(
    path: str, columns: list[str], fmt: str, kind: str, given: bool, role: str = ""
) -> None:
    """The dataset has the columns of its format, and that format can feed this stage."""
    cols = set(columns)
    listed = ", ".join(columns) or "none"
    if given:
        need = _FORMAT_COLUMNS.get(fmt) or (
            ("messages",) if "messages" in cols or "chosen" not in cols else ("chosen", "rejected")
        )
        missing = [c for c in need if c not in cols]
        if missing:
            raise UserError(
                f"dataset {path}: field {missing[0]!r} is missing (columns: {listed}; "
                f"--data.data_format {fmt} expects {', '.join(need)})."
            )
    if kind not in _feeds(fmt, cols):
        stage, fields, option = KINDS[kind]
        stage, option = ROLE_NAMES.get(role, (stage, option))
        missing = [f for f in fields if f not in cols] or list(fields)
        raise UserError(
            f"dataset {path}: field {missing[0]!r} is missing (columns: {listed}; read as format "
            f"{fmt}). The {stage} stage needs {'/'.join(fields)} rows"
            + (
                ", chosen/rejected HH dialogues or chat messages with chosen/rejected"
                if kind == "reward"
                else ", preference rows (their chosen response is used) or chat 'messages'"
                if kind == "sft"
                else ""
            )
            + f"; give it its own dataset with {option} or change --data.data_format."
        )


def hh_split(path: str, i: int, field: str, text) -> tuple[str, str]:
    """An HH-RLHF dialogue ("\\n\\nHuman: ... \\n\\nAssistant: ...") cut at its LAST assistant turn:
    (prompt ending with "Assistant:", that turn's response)."""
    check_text(path, i, field, text)
    k = len(text)
    while True:
        k = text.rfind(HH_ASSISTANT, 0, k)
        if k <= 0 or text[k - 1] == "\n":  # at a turn boundary, not "Assistant:" quoted in a turn
            break
    if k < 0:
        raise UserError(
            f"dataset {path}, row {i}: field {field!r} is not an HH dialogue: it has no "
            f"'{HH_ASSISTANT}' turn (expected '\\n\\nHuman: ... \\n\\nAssistant: ...'; "
            f"got {text[:80]!r})."
        )
    prompt, response = text[: k + len(HH_ASSISTANT)], text[k + len(HH_ASSISTANT) :].strip()
    if HH_HUMAN not in prompt:
        raise UserError(
            f"dataset {path}, row {i}: field {field!r} has no '{HH_HUMAN}' turn before its "
            f"last '{HH_ASSISTANT}' (got {text[:80]!r})."
        )
    if not response:
        raise UserError(
            f"dataset {path}, row {i}: field {field!r}: the last '{HH_ASSISTANT}' turn is "
            f"empty, so there is no response to learn from."
        )
    return prompt, response


def _messages(path: str, i: int, field: str, value) -> list[dict]:
    """A validated chat message list: mappings with text `role` and non-empty text `content`."""
    if not isinstance(value, list) or not value:
        raise UserError(
            f"dataset {path}, row {i}: field {field!r} must be a non-empty list of chat "
            f"messages ({{'role': ..., 'content': ...}}), got {str(value)[:80]!r}."
        )
    out = []
    for j, m in enumerate(value):
        role = m.get("role") if isinstance(m, dict) else None
        content = m.get("content") if isinstance(m, dict) else None
        if not isinstance(role, str) or not role.strip():
            raise UserError(
                f"dataset {path}, row {i}: field {field!r}, message {j} has no 'role' text "
                f"(got {str(m)[:80]!r})."
            )
        if not isinstance(content, str) or not content.strip():
            raise UserError(
                f"dataset {path}, row {i}: field {field!r}, message {j} ({role}) has empty or "
                f"no 'content' text (got {str(m)[:80]!r})."
            )
        out.append({"role": role, "content": content})
    return out


def _reply(path: str, i: int, field: str, msgs: list[dict]) -> tuple[list[dict], str]:
    """(context, text of the final assistant message) of a conversation."""
    if msgs[-1]["role"] != "assistant":
        raise UserError(
            f"dataset {path}, row {i}: field {field!r} must end with an 'assistant' message "
            f"(the response), but its last message is from {msgs[-1]['role']!r}."
        )
    if len(msgs) < 2:
        raise UserError(
            f"dataset {path}, row {i}: field {field!r} has only the assistant message; a "
            f"prompt message must come before it."
        )
    return msgs[:-1], msgs[-1]["content"]


def _chat_row(path: str, i: int, row: dict, kind: str) -> dict:
    """A messages-format row as {"messages": prompt messages, plus response or chosen/rejected text}
    (rendered with the chat template later)."""
    if row.get("messages") is not None or "chosen" not in row:
        msgs = _messages(path, i, "messages", row.get("messages"))
        if kind == "prompt":  # PPO: the conversation up to its last assistant turn, or all of it
            return {
                "messages": msgs[:-1] if msgs[-1]["role"] == "assistant" and len(msgs) > 1 else msgs
            }
        context, response = _reply(path, i, "messages", msgs)
        return {"messages": context, "response": response}
    prompt = row.get("prompt")
    prompt = (
        []
        if prompt is None
        else [{"role": "user", "content": check_text(path, i, "prompt", prompt)}]
        if not isinstance(prompt, list)
        else _messages(path, i, "prompt", prompt)
    )
    sides = {}
    for side in ("chosen", "rejected"):
        msgs = _messages(path, i, side, row.get(side))
        if prompt and msgs[: len(prompt)] == prompt:  # the conversation repeats the prompt
            msgs = msgs[len(prompt) :]
        sides[side] = _reply(path, i, side, prompt + msgs)
    (context, chosen), (other, rejected) = sides["chosen"], sides["rejected"]
    if context != other:
        raise UserError(
            f"dataset {path}, row {i}: 'chosen' and 'rejected' differ before their last "
            f"assistant message; a preference pair must share its prompt."
        )
    check_pair(path, i, chosen, rejected)
    if kind == "prompt":
        return {"messages": context}
    return (
        {"messages": context, "response": chosen}
        if kind == "sft"
        else {"messages": context, "chosen": chosen, "rejected": rejected}
    )


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
                check_pair(path, i, chosen, rejected)
            r = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
        else:
            r = {f: row.get(f) for f in _FORMAT_COLUMNS[fmt]}
            if kind != "prompt":
                for f in r:
                    check_text(path, i, f, r[f])
                if fmt == "prompt_chosen_rejected":
                    check_pair(path, i, r["chosen"], r["rejected"])
        prompt = check_text(path, i, "prompt", r["prompt"])
        if kind == "sft":
            out.append({"prompt": prompt, "response": r.get("response") or r["chosen"]})
        elif kind == "reward":
            out.append({"prompt": prompt, "chosen": r["chosen"], "rejected": r["rejected"]})
        else:
            out.append({"prompt": prompt})
    if hh_mismatch:
        log.warning(
            "dataset %s: %d HH rows whose chosen and rejected dialogues differ before the last "
            "assistant turn use the chosen dialogue's prompt.",
            path,
            hh_mismatch,
        )
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
        raise UserError(
            f"dataset {what} holds chat messages, which are rendered with the tokenizer's chat "
            f"template, but tokenizer {name} has none: use a tokenizer that has one "
            f"(--data.tokenizer_path), add 'chat_template' to its tokenizer_config.json, or "
            f"give the data as text (--data.data_format prompt_response, "
            f"prompt_chosen_rejected or prompt)."
        )
    bos = tokenizer.bos_token
    adds_bos = bool(bos) and tokenizer("x", add_special_tokens=True)["input_ids"][:1] == [
        tokenizer.bos_token_id
    ]
    out = []
    for r in rows:
        if "messages" not in r:
            out.append(r)
            continue
        try:
            prompt = tokenizer.apply_chat_template(
                r["messages"], tokenize=False, add_generation_prompt=True
            )
        except Exception as e:  # a template may refuse a conversation (e.g. roles out of order)
            raise UserError(
                f"dataset {what}: the chat template of tokenizer {tokenizer_name} refused "
                f"the messages {str(r['messages'])[:120]!r}: {str(e).splitlines()[0]}"
            ) from None
        if adds_bos and prompt.startswith(bos):  # the tokenizer adds its own BOS: not twice
            prompt = prompt[len(bos) :]
        out.append({"prompt": prompt, **{k: v for k, v in r.items() if k != "messages"}})
    return out
