"""Unit tests for the dataset formats of pipeline/data/ (detection, conversion of each format to
every stage's rows, chat-template rendering, malformed rows), the seeded data_split shares, held-out
eval slices and weighted mixing, the data options of pipeline/config.py and config_checks.py, and
how the orchestrator turns them into per-stage sources (fingerprints, preflight)."""

import json
import logging
import re
import shutil
import types

import pytest

from pipeline.cli import parse_config
from pipeline.data.formats import detect_format
from pipeline.data.sources import Source, holdout_indices, load_role, mix, split_indices
from pipeline.data.tokenize import pair_examples, prompt_examples, sft_examples
from pipeline.errors import UserError

TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}[assistant]{% endif %}"
)


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def chat_tokenizer(task_tokenizer, tmp_path_factory):
    """The default task's tokenizer with a small chat template, saved and loaded again."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("chat_tok")
    task_tokenizer.save_pretrained(str(folder))
    tok = AutoTokenizer.from_pretrained(str(folder))
    tok.chat_template = TEMPLATE
    tok.save_pretrained(str(folder))
    return AutoTokenizer.from_pretrained(str(folder))


# ---------------------------------------------------------------- detection
@pytest.mark.parametrize(
    "row, fmt",
    [
        ({"prompt": "p", "response": "r"}, "prompt_response"),
        ({"prompt": "p", "chosen": "a", "rejected": "b"}, "prompt_chosen_rejected"),
        (
            {"chosen": "\n\nHuman: p\n\nAssistant: a", "rejected": "\n\nHuman: p\n\nAssistant: b"},
            "hh",
        ),
        ({"messages": [{"role": "user", "content": "p"}]}, "messages"),
        (
            {
                "prompt": "p",
                "chosen": [{"role": "assistant", "content": "a"}],
                "rejected": [{"role": "assistant", "content": "b"}],
            },
            "messages",
        ),
        ({"prompt": "p", "id": 3}, "prompt"),
    ],
)
def test_format_is_detected_from_the_columns(row, fmt):
    assert detect_format("d.jsonl", list(row), [row]) == fmt


def test_undetectable_columns_name_the_option(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(
        UserError,
        match=r"cannot tell its format from its columns \(question, answer\).*"
        r"--data.data_format",
    ):
        load_role(path, "sft_data")


# ---------------------------------------------------------------- prompt/response and prompt only
def test_prompt_response_feeds_sft_and_ppo_but_not_the_reward_model(tmp_path):
    path = _jsonl(
        tmp_path / "d.jsonl",
        [{"prompt": "p1", "response": "r1"}, {"prompt": "p2", "response": "r2"}],
    )
    assert load_role(path, "sft_data") == [
        {"prompt": "p1", "response": "r1"},
        {"prompt": "p2", "response": "r2"},
    ]
    assert load_role(path, "prompt_data") == [{"prompt": "p1"}, {"prompt": "p2"}]
    with pytest.raises(UserError) as e:
        load_role(path, "reward_data")
    msg = str(e.value)
    assert msg.startswith(
        f"dataset {path}: field 'chosen' is missing (columns: prompt, response; read as "
        f"format prompt_response). The reward-model stage needs prompt/chosen/rejected rows"
    )
    assert "--data.reward_data_path" in msg


def test_prompt_only_feeds_ppo_only(tmp_path):
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": "x"}, {"prompt": "y"}])
    assert load_role(path, "eval_prompt_data") == [{"prompt": "x"}, {"prompt": "y"}]
    with pytest.raises(
        UserError, match=r"field 'response' is missing.*The SFT stage needs prompt/response rows"
    ):
        load_role(path, "sft_data")


def test_empty_prompt_names_row_and_field(tmp_path):
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": "x"}, {"prompt": " "}])
    with pytest.raises(
        UserError, match=re.escape(f"dataset {path}, row 1: field 'prompt' is empty or not text")
    ):
        load_role(path, "prompt_data")


def test_given_format_must_match_the_columns(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "response": "r"}])
    with pytest.raises(
        UserError,
        match=re.escape(
            f"dataset {path}: field 'chosen' is missing (columns: prompt, response; --data.data_format "
            f"prompt_chosen_rejected expects prompt, chosen, rejected)"
        ),
    ):
        load_role(Source((path,), format="prompt_chosen_rejected"), "sft_data")
    # a given format that fits reads the file as that format: here prompt only, for PPO
    assert load_role(Source((path,), format="prompt"), "prompt_data") == [{"prompt": "p"}]


# ---------------------------------------------------------------- prompt/chosen/rejected (rm-static)
RM_STATIC = [
    {
        "prompt": "\n\nHuman: review the pizza\n\nAssistant:",
        "chosen": " the pizza is great .",
        "rejected": " bad",
        "response": None,
    }
]


def test_rm_static_rows_feed_every_stage(tmp_path):
    path = _jsonl(
        tmp_path / "rm.jsonl", [{k: v for k, v in r.items() if k != "response"} for r in RM_STATIC]
    )
    p = RM_STATIC[0]["prompt"]
    assert load_role(path, "reward_data") == [
        {"prompt": p, "chosen": " the pizza is great .", "rejected": " bad"}
    ]
    assert load_role(path, "sft_data") == [
        {"prompt": p, "response": " the pizza is great ."}
    ]  # chosen
    assert load_role(path, "prompt_data") == [{"prompt": p}]


def test_rm_static_identical_pair_is_refused(tmp_path):
    path = _jsonl(
        tmp_path / "rm.jsonl",
        [
            {"prompt": "p", "chosen": "a", "rejected": "b"},
            {"prompt": "p", "chosen": "same", "rejected": "same "},
        ],
    )
    with pytest.raises(
        UserError, match=re.escape(f"dataset {path}, row 1: 'chosen' and 'rejected' are identical")
    ):
        load_role(path, "sft_data")


# ---------------------------------------------------------------- HH dialogues
HH_PROMPT = (
    "\n\nHuman: hi there\n\nAssistant: hello , what can i do ?"
    "\n\nHuman: please review the pizza for ana .\n\nAssistant:"
)


def test_hh_is_split_at_the_last_assistant_turn_keeping_earlier_turns_in_the_prompt(tmp_path):
    rows = [
        {
            "chosen": HH_PROMPT + " the pizza is great .",
            "rejected": HH_PROMPT + " the pizza is bad .",
        }
    ]
    path = _jsonl(tmp_path / "hh.jsonl", rows)
    [pair] = load_role(path, "reward_data")
    assert pair == {
        "prompt": HH_PROMPT,
        "chosen": "the pizza is great .",
        "rejected": "the pizza is bad .",
    }
    assert (
        pair["prompt"].count("Human:") == 2 and pair["prompt"].count("Assistant:") == 2
    )  # multi-turn
    assert load_role(path, "sft_data") == [
        {"prompt": HH_PROMPT, "response": "the pizza is great ."}
    ]
    assert load_role(path, "prompt_data") == [{"prompt": HH_PROMPT}]


def test_hh_assistant_quoted_inside_a_turn_is_not_a_turn(tmp_path):
    text = "\n\nHuman: what does Assistant: mean ?\n\nAssistant: it names the speaker. Assistant: is a label"
    rows = [
        {"chosen": text, "rejected": "\n\nHuman: what does Assistant: mean ?\n\nAssistant: no idea"}
    ]
    [pair] = load_role(_jsonl(tmp_path / "hh.jsonl", rows), "reward_data")
    assert pair["prompt"] == "\n\nHuman: what does Assistant: mean ?\n\nAssistant:"
    assert pair["chosen"] == "it names the speaker. Assistant: is a label"


@pytest.mark.parametrize(
    "field, text, needle",
    [
        (
            "chosen",
            "\n\nHuman: hello , no answer here",
            "field 'chosen' is not an HH dialogue: it has no 'Assistant:' turn",
        ),
        (
            "rejected",
            "\n\nHuman: hi\n\nAssistant:   ",
            "field 'rejected': the last 'Assistant:' turn is empty",
        ),
        (
            "chosen",
            "\n\nAssistant: an answer without a question",
            "field 'chosen' has no 'Human:' turn before",
        ),
        ("rejected", 7, "field 'rejected' is empty or not text"),
    ],
)
def test_malformed_hh_rows_name_row_and_field(tmp_path, field, text, needle):
    good = {"chosen": "\n\nHuman: hi\n\nAssistant: a", "rejected": "\n\nHuman: hi\n\nAssistant: b"}
    path = _jsonl(tmp_path / "hh.jsonl", [good, {**good, field: text}])
    with pytest.raises(UserError) as e:
        load_role(path, "reward_data")
    assert str(e.value).startswith(f"dataset {path}, row 1: "), str(e.value)
    assert needle in str(e.value)


def test_hh_pair_with_different_prompts_uses_the_chosen_prompt_and_warns(tmp_path, caplog):
    rows = [{"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: b\n\nAssistant: y"}]
    path = _jsonl(tmp_path / "hh.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="pipeline.data"):
        assert load_role(path, "reward_data")[0]["prompt"] == "\n\nHuman: a\n\nAssistant:"
    assert any(f"dataset {path}: 1 HH rows" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------- chat messages
def _m(role, content):
    return {"role": role, "content": content}


def test_messages_render_the_prompt_with_the_chat_template(tmp_path, chat_tokenizer):
    rows = [
        {
            "messages": [
                _m("system", "be kind"),
                _m("user", "review the pizza"),
                _m("assistant", "great"),
                _m("user", "and the movie ?"),
                _m("assistant", "the movie is dull ."),
            ]
        }
    ]
    path = _jsonl(tmp_path / "chat.jsonl", rows)
    [row] = load_role(path, "sft_data", chat_tokenizer)
    # multi-turn: every turn before the last assistant message is the prompt, with the generation prompt
    assert row == {
        "prompt": "[system] be kind [user] review the pizza [assistant] great [user] and the movie ? "
        "[assistant]",
        "response": "the movie is dull .",
    }
    # the template's BOS text is dropped: the tokenizer adds BOS itself, so it appears once
    [ex] = sft_examples([row], chat_tokenizer, 64, 24)
    assert (
        ex["input_ids"].count(chat_tokenizer.bos_token_id) == 1
        and ex["input_ids"][0] == chat_tokenizer.bos_token_id
    )
    # PPO: the conversation up to its last assistant turn; one ending with the user is all prompt
    path2 = _jsonl(tmp_path / "chat2.jsonl", rows + [{"messages": [_m("user", "review the sofa")]}])
    assert load_role(path2, "prompt_data", chat_tokenizer) == [
        {"prompt": row["prompt"]},
        {"prompt": "[user] review the sofa [assistant]"},
    ]
    assert (
        prompt_examples(load_role(path2, "prompt_data", chat_tokenizer), chat_tokenizer, 64)[1][
            "prompt"
        ]
        == "[user] review the sofa [assistant]"
    )


def test_message_pairs_with_a_text_or_message_prompt(tmp_path, chat_tokenizer):
    rows = [  # UltraFeedback style: the conversations repeat the prompt turn
        {
            "prompt": "review the pizza",
            "chosen": [_m("user", "review the pizza"), _m("assistant", "great .")],
            "rejected": [_m("user", "review the pizza"), _m("assistant", "bad .")],
        },
        # prompt as messages, chosen/rejected as the replies only
        {
            "prompt": [_m("user", "hi"), _m("assistant", "hello"), _m("user", "review the sofa")],
            "chosen": [_m("assistant", "comfy .")],
            "rejected": [_m("assistant", "awful .")],
        },
    ]
    path = _jsonl(tmp_path / "pairs.jsonl", rows)
    pairs = load_role(path, "reward_data", chat_tokenizer)
    assert pairs == [
        {"prompt": "[user] review the pizza [assistant]", "chosen": "great .", "rejected": "bad ."},
        {
            "prompt": "[user] hi [assistant] hello [user] review the sofa [assistant]",
            "chosen": "comfy .",
            "rejected": "awful .",
        },
    ]
    assert load_role(path, "sft_data", chat_tokenizer)[1] == {
        "prompt": pairs[1]["prompt"],
        "response": "comfy .",
    }
    [ex, _] = pair_examples(pairs, chat_tokenizer, 64, 24)
    assert ex["chosen_ids"][-1] == chat_tokenizer.eos_token_id


def test_messages_without_a_chat_template_name_the_option(tmp_path, task_tokenizer):
    path = _jsonl(tmp_path / "chat.jsonl", [{"messages": [_m("user", "p"), _m("assistant", "r")]}])
    with pytest.raises(UserError) as e:
        load_role(path, "sft_data", task_tokenizer, "my/tokenizer")
    msg = str(e.value)
    assert (
        msg.startswith(f"dataset {path} holds chat messages")
        and "tokenizer my/tokenizer has none" in msg
    )
    assert "--data.tokenizer_path" in msg and "--data.data_format" in msg
    assert load_role(path, "sft_data") == [
        {"messages": [_m("user", "p")], "response": "r"}
    ]  # no tokenizer: checked only


def test_chat_tokenizer_is_loaded_only_when_chat_rows_need_it(tmp_path, chat_tokenizer):
    calls = []

    def loader():
        calls.append(1)
        return chat_tokenizer

    text = _jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "response": "r"}])
    assert load_role(text, "sft_data", loader) == [{"prompt": "p", "response": "r"}] and not calls
    chat = _jsonl(tmp_path / "c.jsonl", [{"messages": [_m("user", "p"), _m("assistant", "r")]}])
    assert load_role(chat, "sft_data", loader) == [
        {"prompt": "[user] p [assistant]", "response": "r"}
    ]
    assert calls == [1]


@pytest.mark.parametrize(
    "row, role, needle",
    [
        (
            {"messages": [_m("user", "p"), _m("user", "q")]},
            "sft_data",
            "field 'messages' must end with an 'assistant' message (the response), but its last message is from 'user'",
        ),
        (
            {"messages": [_m("user", "p"), {"role": "assistant"}]},
            "sft_data",
            "field 'messages', message 1 (assistant) has empty or no 'content' text",
        ),
        (
            {"messages": [{"content": "x"}, _m("assistant", "r")]},
            "sft_data",
            "field 'messages', message 0 has no 'role' text",
        ),
        (
            {"messages": []},
            "prompt_data",
            "field 'messages' must be a non-empty list of chat messages",
        ),
        (
            {"messages": [_m("assistant", "r")]},
            "sft_data",
            "field 'messages' has only the assistant message",
        ),
    ],
)
def test_malformed_message_rows_name_row_and_field(tmp_path, row, role, needle):
    good = {"messages": [_m("user", "p"), _m("assistant", "r")]}
    path = _jsonl(tmp_path / "chat.jsonl", [good, row])
    with pytest.raises(UserError) as e:
        load_role(path, role)
    assert str(e.value).startswith(f"dataset {path}, row 1: ") and needle in str(e.value), str(
        e.value
    )


def test_message_pair_whose_prompts_differ_is_refused(tmp_path):
    rows = [
        {
            "chosen": [_m("user", "a"), _m("assistant", "x")],
            "rejected": [_m("user", "b"), _m("assistant", "y")],
        }
    ]
    path = _jsonl(tmp_path / "pairs.jsonl", rows)
    with pytest.raises(
        UserError,
        match=re.escape(
            f"dataset {path}, row 0: 'chosen' and 'rejected' differ before "
            f"their last assistant message"
        ),
    ):
        load_role(path, "reward_data")


# ---------------------------------------------------------------- data_split, held-out slices, mixing
def test_split_shares_are_disjoint_cover_every_row_and_follow_the_ratios():
    parts = [split_indices(100, (2, 4, 4), k, seed=7) for k in range(3)]
    assert [len(p) for p in parts] == [20, 40, 40]
    assert sorted(i for p in parts for i in p) == list(range(100))
    assert [len(split_indices(7, (1, 1, 1), k, 0)) for k in range(3)] == [
        2,
        3,
        2,
    ]  # rounded, sum exact
    assert split_indices(50, (10, 0, 0), 1, 0) == []


def test_split_is_deterministic_by_seed(tmp_path):
    path = _jsonl(
        tmp_path / "d.jsonl", [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(60)]
    )
    src = Source((path,), split=(2, 4, 4), part=0, seed=3)
    first = load_role(src, "sft_data")
    assert first == load_role(src, "sft_data") and len(first) == 12
    assert first != load_role(Source((path,), split=(2, 4, 4), part=0, seed=4), "sft_data")
    ppo = load_role(Source((path,), split=(2, 4, 4), part=2, seed=3), "prompt_data")
    assert not {r["prompt"] for r in first} & {r["prompt"] for r in ppo}


def test_held_out_slice_is_disjoint_from_training_and_seeded(tmp_path):
    train, held = holdout_indices(list(range(10, 50)), 0.1, seed=1)
    assert len(held) == 4 and len(train) == 36 and sorted(train + held) == list(range(10, 50))
    assert (train, held) == holdout_indices(list(range(10, 50)), 0.1, seed=1)
    assert holdout_indices([5, 6], 0.05, 0)[1] in ([5], [6])  # at least one row
    path = _jsonl(tmp_path / "d.jsonl", [{"prompt": f"p{i}"} for i in range(40)])
    src = Source((path,), holdout="train", eval_fraction=0.25, seed=0)
    tr, ev = (
        load_role(src, "prompt_data"),
        load_role(Source((path,), holdout="eval", eval_fraction=0.25), "prompt_data"),
    )
    assert (
        len(tr) == 30
        and len(ev) == 10
        and not {r["prompt"] for r in tr} & {r["prompt"] for r in ev}
    )


def test_too_few_rows_to_hold_out_name_the_stage(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "response": "r"}])
    with pytest.raises(
        UserError, match=r"too few to hold out an eval slice; give the SFT stage its own eval"
    ):
        load_role(Source((path,), holdout="eval"), "sft_eval_data")


def test_mix_with_weights_sets_each_dataset_share():
    a = [{"prompt": f"a{i}"} for i in range(10)]
    b = [{"prompt": f"b{i}"} for i in range(30)]
    out = mix([a, b], (3.0, 1.0), seed=0)
    assert len(out) == 40
    assert sum(r["prompt"][0] == "a" for r in out) == 30  # a repeated three times
    assert sum(r["prompt"][0] == "b" for r in out) == 10  # a seeded third of b
    assert out == mix([a, b], (3.0, 1.0), seed=0) and out != mix([a, b], (3.0, 1.0), seed=1)
    assert mix([a, b], (), 0) == a + b  # no weights: concatenation
    assert mix([a, b], (1.0, 0.0), 0) == a * 4


def test_two_datasets_of_different_formats_mixed_for_the_reward_model(tmp_path):
    rm = _jsonl(
        tmp_path / "rm.jsonl",
        [{"prompt": f"p{i}", "chosen": "good", "rejected": "bad"} for i in range(20)],
    )
    hh = _jsonl(
        tmp_path / "hh.jsonl",
        [
            {
                "chosen": f"\n\nHuman: q{i}\n\nAssistant: yes",
                "rejected": f"\n\nHuman: q{i}\n\nAssistant: no",
            }
            for i in range(20)
        ],
    )
    src = Source((rm, hh), weights=(1.0, 3.0), split=(0, 1, 1), part=1, seed=0)
    rows = load_role(src, "reward_data")
    assert len(rows) == 20  # 10 + 10 rows in the reward share, mixed 1:3
    assert (
        sum(r["chosen"] == "good" for r in rows) == 5
        and sum(r["chosen"] == "yes" for r in rows) == 15
    )
    eval_rows = load_role(
        Source((rm, hh), weights=(1.0, 3.0), split=(0, 1, 1), part=1, holdout="eval"),
        "reward_eval_data",
    )
    assert len(eval_rows) == 2  # one held-out row of each dataset, not reweighted


def test_empty_share_names_the_options(tmp_path):
    path = _jsonl(
        tmp_path / "d.jsonl",
        [{"prompt": f"p{i}", "chosen": "a", "rejected": "b"} for i in range(10)],
    )
    with pytest.raises(
        UserError,
        match=r"gives the reward-model stage no rows: give it a non-zero share in "
        r"--data.data_split or its own dataset with --data.reward_data_path",
    ):
        load_role(Source((path,), split=(1, 0, 1), part=1), "reward_data")


# ---------------------------------------------------------------- options and the orchestrator
def test_data_options_on_the_command_line():
    cfg = parse_config(
        [
            "--data.data_path",
            "a.jsonl",
            "b/",
            "--data.data_weights",
            "1",
            "3",
            "--data.data_split",
            "1,0,1",
            "--data.data_format",
            "hh",
        ]
    )
    assert cfg.data.data_path == ["a.jsonl", "b/"] and cfg.data.data_weights == [1.0, 3.0]
    assert parse_config(
        ["--data.data_path", "a", "b", "--data.data_weights", "1,3"]
    ).data.data_weights == [1.0, 3.0]
    assert parse_config([]).data.data_split == "2,4,4"


@pytest.mark.parametrize(
    "args, needle",
    [
        (
            ["--data.data_split", "2,4"],
            "option data.data_split='2,4': expected three non-negative shares",
        ),
        (["--data.data_split", "0,0,0"], "option data.data_split='0,0,0'"),
        (
            ["--data.data_format", "alpaca"],
            "option data.data_format='alpaca': expected one of auto, prompt_response",
        ),
        (
            ["--data.data_path", "a", "--data.data_weights", "1", "2"],
            "data.data_weights has 2 values but data.data_path has 1",
        ),
        (["--data.data_weights", "1"], "data.data_weights is given but data.data_path is not"),
        (["--data.data_path", "a", "b", "--data.data_weights", "0", "0"], "not all zero"),
        (["--data.eval_fraction", "0"], "option data.eval_fraction=0.0 must be in (0, 0.5]"),
    ],
)
def test_bad_data_options(args, needle):
    with pytest.raises(UserError, match=re.escape(needle)):
        parse_config(args)


def _cfg(tmp_path, *args):
    return parse_config(["--output_dir", str(tmp_path / "run"), *args])


def test_stage_sources_own_path_then_data_path_then_default_task(tmp_path):
    from pipeline.inputs import needs_task, stage_inputs

    cfg = _cfg(
        tmp_path,
        "--data.data_path",
        "a.jsonl",
        "b.jsonl",
        "--data.sft_data_path",
        "s.jsonl",
        "--data.eval_prompt_data_path",
        "e.jsonl",
        "--model.model_name_or_path",
        "m",
    )
    inputs = stage_inputs(cfg, tmp_path / "run", tmp_path / "task")
    assert inputs["sft"]["sft_data"] == Source(("s.jsonl",), holdout="train", seed=42)
    assert inputs["sft"]["sft_eval_data"] == Source(("s.jsonl",), holdout="eval", seed=42)
    assert inputs["reward"]["reward_data"] == Source(
        ("a.jsonl", "b.jsonl"), split=(2, 4, 4), part=1, holdout="train", seed=42
    )
    assert inputs["ppo"]["prompt_data"] == Source(
        ("a.jsonl", "b.jsonl"), split=(2, 4, 4), part=2, seed=42
    )
    assert inputs["ppo"]["eval_prompt_data"] == Source(("e.jsonl",), seed=42)
    assert not needs_task(cfg)
    default = stage_inputs(_cfg(tmp_path), tmp_path / "run", tmp_path / "task")
    assert default["reward"]["reward_eval_data"] == str(tmp_path / "task" / "pairs_eval.jsonl")


def test_fingerprints_follow_split_and_format_only_where_they_apply(tmp_path):
    from pipeline.fingerprint import fingerprint, identity
    from pipeline.inputs import stage_inputs

    data = _jsonl(
        tmp_path / "d.jsonl",
        [{"prompt": f"p{i}", "chosen": "a", "rejected": "b"} for i in range(30)],
    )
    own = _jsonl(tmp_path / "s.jsonl", [{"prompt": "p", "response": "r"}] * 4)

    def fps(*args):
        cfg = _cfg(tmp_path, "--data.data_path", data, "--data.sft_data_path", own, *args)
        inputs = stage_inputs(cfg, tmp_path / "run", tmp_path / "task")
        return {
            s: fingerprint(identity(s, cfg, inputs[s], tmp_path / "run"))
            for s in ("sft", "reward", "ppo")
        }

    base = fps()
    assert base == fps()
    split = fps("--data.data_split", "1,5,4")
    assert split["sft"] == base["sft"]  # SFT reads its own file
    assert split["reward"] != base["reward"] and split["ppo"] != base["ppo"]
    fmt = fps("--data.data_format", "prompt_chosen_rejected")
    assert all(fmt[s] != base[s] for s in base)
    assert fps("--seed", "1")["reward"] != base["reward"]
    _jsonl(
        tmp_path / "d.jsonl",
        [{"prompt": f"q{i}", "chosen": "a", "rejected": "b"} for i in range(30)],
    )
    changed = fps()
    assert changed["sft"] == base["sft"] and changed["reward"] != base["reward"]


def test_default_run_fingerprint_ignores_the_new_options(tmp_path):
    """A default run's stages keep the identity they had before these options existed."""
    from pipeline.fingerprint import identity
    from pipeline.inputs import stage_inputs

    cfg = _cfg(tmp_path)
    ident = identity(
        "sft", cfg, stage_inputs(cfg, tmp_path / "run", tmp_path / "task")["sft"], tmp_path / "run"
    )
    assert set(ident["data"]) == {"max_prompt_len", "max_response_len"}
    assert all(isinstance(v, str) for v in ident["inputs"].values())


def test_preflight_checks_every_share_and_renders_chat_rows(
    tmp_path, task_tokenizer, chat_tokenizer
):
    from pipeline.orchestrator import preflight

    d = types.SimpleNamespace(world_size=1)
    good = [
        {
            "chosen": f"\n\nHuman: q{i}\n\nAssistant: yes",
            "rejected": f"\n\nHuman: q{i}\n\nAssistant: no",
        }
        for i in range(40)
    ]
    bad = good[:39] + [{"chosen": "\n\nHuman: q\n\nAssistant: yes", "rejected": "no assistant"}]
    tok = tmp_path / "tok"
    task_tokenizer.save_pretrained(str(tok))
    chat = _jsonl(
        tmp_path / "chat.jsonl", [{"messages": [_m("user", "p"), _m("assistant", "r")]}] * 4
    )
    args = ["--model.model_name_or_path", str(tok), "--data.tokenizer_path", str(tok)]
    cfg = _cfg(tmp_path, "--data.data_path", _jsonl(tmp_path / "hh.jsonl", good), *args)
    preflight(cfg, d, ("sft", "reward", "ppo"), tmp_path / "run", tmp_path / "task")
    cfg = _cfg(
        tmp_path, "--data.data_path", _jsonl(tmp_path / "bad.jsonl", bad), "--seed", "0", *args
    )
    with pytest.raises(
        UserError, match=r"bad.jsonl, row 39: field 'rejected' is not an HH dialogue"
    ):
        preflight(cfg, d, ("sft", "reward", "ppo"), tmp_path / "run", tmp_path / "task")
    cfg = _cfg(tmp_path, "--data.sft_data_path", chat, *args)
    with pytest.raises(UserError, match=f"tokenizer {tok} has none"):
        preflight(cfg, d, ("sft",), tmp_path / "run", tmp_path / "task")
    shutil.rmtree(tok)
    chat_tokenizer.save_pretrained(str(tok))
    preflight(cfg, d, ("sft",), tmp_path / "run", tmp_path / "task")


# ---------------------------------------------------------------- hub dataset names
@pytest.mark.parametrize(
    "path, hub",
    [
        ("Dahoas/rm-static", True),
        ("imdb", True),
        ("./data/prefs", False),
        ("/abs/prefs", False),
        ("prefs.jsonl", False),
        ("a/b/c", False),
    ],
)
def test_hub_names_are_told_from_local_paths(path, hub):
    from pipeline.data.sources import is_hub_name

    assert is_hub_name(path) is hub


def test_a_hub_dataset_is_read_through_datasets_train_split(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, split=None, **kw):
        calls.append((name, split, kw))
        return datasets.Dataset.from_list(
            [{"prompt": f"p{i}", "chosen": "good", "rejected": "bad", "id": i} for i in range(10)]
        )

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    rows = load_role(Source(("someorg/prefs",)), "reward_data")
    assert calls[0] == ("someorg/prefs", "train", {})
    assert rows[3] == {"prompt": "p3", "chosen": "good", "rejected": "bad"}
    from pipeline.data.sources import file_digest

    assert file_digest("someorg/prefs").startswith("hub:someorg/prefs:")


def test_an_unreachable_hub_dataset_is_one_paragraph_naming_it(tmp_path):
    import subprocess
    import sys

    code = (
        "from pipeline.data.sources import load_role, Source\n"
        "from pipeline.errors import UserError\n"
        "try:\n    load_role(Source(('someorg/no-such-prefs',)), 'reward_data')\n"
        "except UserError as e:\n    print('USERERROR', e)\n"
    )
    env = {
        **__import__("os").environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(tmp_path),
        "HF_HOME": str(tmp_path),
    }
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    ).stdout
    assert (
        "USERERROR dataset someorg/no-such-prefs is not a local file or folder, and the Hugging Face hub"
        in out
    )


def test_missing_local_inputs_are_refused_but_hub_names_pass_to_loading(tmp_path):
    from pipeline.inputs import check_exists

    check_exists(
        "reward",
        {"reward_data": Source(("someorg/prefs",)), "model": "facebook/opt-350m"},
        tmp_path,
    )
    with pytest.raises(
        UserError, match=r"reward_data path ./nope does not exist .*hub dataset names"
    ):
        check_exists("reward", {"reward_data": Source(("./nope",))}, tmp_path)
    with pytest.raises(UserError, match=r"model path /no/model does not exist"):
        check_exists("reward", {"model": "/no/model"}, tmp_path)
