"""Unit tests for pipeline/data/ (loading, checks, tokenisation, collation) and the pure mask
helpers of pipeline/generation.py and pipeline/models.py."""

import json
import logging
import re

import datasets
import pytest
import torch

from pipeline.data.collate import IGNORE_INDEX, collate_pairs, collate_prompts, collate_sft, pad
from pipeline.data.sources import file_digest, load_rows
from pipeline.data.tokenize import pair_examples, prompt_examples, sft_examples
from pipeline.errors import UserError

SFT = ("prompt", "response")
PAIRS = ("prompt", "chosen", "rejected")
ROWS = [
    {"prompt": "ana asks for a review of the pizza .", "response": "the pizza is amazing ."},
    {"prompt": "please review the movie for ben .", "response": "overall a dull movie ."},
    {"prompt": "café ☕ prompt", "response": "naïve – ünïcode"},
]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------- load_rows: formats
def test_jsonl_written_by_datasets(tmp_path):
    path = tmp_path / "d.jsonl"
    datasets.Dataset.from_list(ROWS).to_json(str(path))
    assert load_rows(str(path), SFT) == ROWS


def test_json_array(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(ROWS), encoding="utf-8")
    assert load_rows(str(path), SFT) == ROWS


def test_csv(tmp_path):
    path = tmp_path / "d.csv"
    datasets.Dataset.from_list(ROWS).to_csv(str(path), index=False)
    assert load_rows(str(path), SFT) == ROWS


def test_hand_written_csv_with_quoted_commas(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('prompt,response\n"a, b",c\nd,"e ""quoted"""\n', encoding="utf-8")
    assert load_rows(str(path), SFT) == [
        {"prompt": "a, b", "response": "c"},
        {"prompt": "d", "response": 'e "quoted"'},
    ]


@pytest.mark.parametrize("cells", [["4", "12"], ["None", "NA"]], ids=["numeric-text", "na-words"])
def test_csv_cells_are_text_as_written(tmp_path, cells):
    # A CSV cell is text: "4" or "NA" is a valid, non-empty response (e.g. arithmetic answers),
    # not a number to reject as "not text" nor a missing value.
    path = tmp_path / "d.csv"
    path.write_text(
        "prompt,response\n" + "".join(f"q{i},{c}\n" for i, c in enumerate(cells)), encoding="utf-8"
    )
    assert load_rows(str(path), SFT) == [
        {"prompt": f"q{i}", "response": c} for i, c in enumerate(cells)
    ]


def test_parquet(tmp_path):
    path = tmp_path / "d.parquet"
    datasets.Dataset.from_list(ROWS).to_parquet(str(path))
    assert load_rows(str(path), SFT) == ROWS


def test_folder_of_jsonl_files_in_name_order(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    _jsonl(folder / "b.jsonl", ROWS[1:])
    _jsonl(folder / "a.jsonl", ROWS[:1])
    (folder / "README.md").write_text("not data")  # other files are ignored
    assert load_rows(str(folder), SFT) == ROWS


def test_extra_columns_are_dropped_and_field_order_follows_the_request(tmp_path):
    rows = [{"id": 1, "response": "r", "prompt": "p", "meta": {"x": 1}}]
    path = _jsonl(tmp_path / "d.jsonl", rows)
    out = load_rows(path, SFT)
    assert out == [{"prompt": "p", "response": "r"}]
    assert list(out[0]) == ["prompt", "response"]


def test_prompt_only_rows(tmp_path):
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": "x"}, {"prompt": "y"}])
    assert load_rows(path, ("prompt",)) == [{"prompt": "x"}, {"prompt": "y"}]


def test_pairs(tmp_path):
    rows = [{"prompt": "p", "chosen": "good", "rejected": "bad"}]
    assert load_rows(_jsonl(tmp_path / "pairs.jsonl", rows), PAIRS) == rows


# ---------------------------------------------------------------- load_rows: errors
def test_missing_file_names_the_path(tmp_path):
    path = str(tmp_path / "nope.jsonl")
    with pytest.raises(UserError, match=re.escape(path)):
        load_rows(path, SFT)


def test_empty_folder_names_the_folder(tmp_path):
    with pytest.raises(UserError, match=re.escape(str(tmp_path))):
        load_rows(str(tmp_path), SFT)


def test_folder_of_mixed_kinds(tmp_path):
    _jsonl(tmp_path / "a.jsonl", ROWS)
    datasets.Dataset.from_list(ROWS).to_csv(str(tmp_path / "b.csv"), index=False)
    with pytest.raises(UserError, match="a.jsonl"):
        load_rows(str(tmp_path), SFT)


def test_unsupported_suffix(tmp_path):
    path = tmp_path / "d.txt"
    path.write_text("prompt\tresponse\n")
    with pytest.raises(UserError, match="d.txt"):
        load_rows(str(path), SFT)


def test_column_missing_names_the_field(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "answer": "a"}])
    with pytest.raises(UserError, match="'response'") as e:
        load_rows(path, SFT)
    assert path in str(e.value)


def test_field_missing_in_one_row_names_row_and_field(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "response": "r"}, {"prompt": "q"}])
    with pytest.raises(UserError, match=r"row 1\b.*'response'"):
        load_rows(path, SFT)


@pytest.mark.parametrize("bad", ["", "   ", "\n"])
def test_empty_string_names_row_and_field(tmp_path, bad):
    rows = [
        {"prompt": "p", "response": "r"},
        {"prompt": "p", "response": "r"},
        {"prompt": "p", "response": bad},
    ]
    path = _jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(UserError, match=r"row 2\b.*'response'") as e:
        load_rows(path, SFT)
    assert path in str(e.value)


def test_empty_csv_cell_names_row_and_field(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("prompt,response\np,r\n,r2\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"row 1\b.*'prompt'"):
        load_rows(str(path), SFT)


def test_non_text_value(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "response": 5}])
    with pytest.raises(UserError, match=r"row 0\b.*'response'"):
        load_rows(path, SFT)


def test_chosen_equal_to_rejected(tmp_path):
    rows = [
        {"prompt": "p", "chosen": "a", "rejected": "b"},
        {"prompt": "p", "chosen": "same", "rejected": "same"},
    ]
    path = _jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(UserError, match=r"row 1\b.*identical"):
        load_rows(path, PAIRS)
    rows[1] = {"prompt": "p", "chosen": "same ", "rejected": " same"}  # differ only in spacing
    path = _jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(
        UserError, match=re.escape(f"dataset {path}, row 1: 'chosen' and 'rejected' are identical")
    ):
        load_rows(path, PAIRS)


def test_not_json_names_the_file(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "p", "response": \n', encoding="utf-8")
    with pytest.raises(UserError, match=re.escape(str(path))):
        load_rows(str(path), SFT)


def test_empty_file_is_a_user_error(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("")
    with pytest.raises(UserError, match=re.escape(str(path))):
        load_rows(str(path), SFT)


def test_non_utf8_jsonl_names_the_file_and_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(
        '{"prompt": "café", "response": "r"}\n'.encode()  # valid UTF-8 (é is 2 bytes)
        + b'{"prompt": "caf\xe9 \xff", "response": "r"}\n'
    )
    with pytest.raises(UserError) as e:
        load_rows(str(path), SFT)
    assert str(e.value) == (
        f"dataset {path}, line 2: not UTF-8 text (byte 0xe9 at column 16, file offset "
        f"52); save the file as UTF-8."
    )


def test_non_utf8_csv_names_the_file_and_line(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes(b"prompt,response\np,r\ncaf\xe9 \xff,r\n")
    with pytest.raises(
        UserError, match=re.escape(f"dataset {path}, line 3: not UTF-8 text (byte 0xe9")
    ):
        load_rows(str(path), SFT)


def test_non_utf8_file_in_a_folder_names_that_file(tmp_path):
    _jsonl(tmp_path / "a.jsonl", ROWS)
    (tmp_path / "b.jsonl").write_bytes(b'{"prompt": "\x80", "response": "r"}\n')
    with pytest.raises(
        UserError, match=re.escape(f"dataset {tmp_path / 'b.jsonl'}, line 1: not UTF-8")
    ):
        load_rows(str(tmp_path), SFT)


# ---------------------------------------------------------------- file_digest
def test_file_digest_follows_content(tmp_path):
    a = _jsonl(tmp_path / "a.jsonl", ROWS)
    d1 = file_digest(a)
    assert d1 == file_digest(a) and re.fullmatch(r"[0-9a-f]{64}", d1)
    _jsonl(tmp_path / "a.jsonl", ROWS[:2])
    assert file_digest(a) != d1


def test_file_digest_of_a_folder(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    _jsonl(folder / "a.jsonl", ROWS)
    d1 = file_digest(str(folder))
    _jsonl(folder / "b.jsonl", ROWS)
    d2 = file_digest(str(folder))
    assert d1 != d2
    (folder / "b.jsonl").rename(folder / "c.jsonl")  # a renamed file changes the digest
    assert file_digest(str(folder)) != d2


# ---------------------------------------------------------------- tokenisation
PROMPT = "ana asks for a review of the pizza ."  # 9 words
RESPONSE = "the pizza is amazing ."  # 5 words


def test_prompt_gets_bos_and_response_gets_eos(task_tokenizer):
    tok = task_tokenizer
    [ex] = sft_examples([{"prompt": PROMPT, "response": RESPONSE}], tok, 24, 24)
    p, r = _ids(tok, PROMPT), _ids(tok, RESPONSE)
    assert len(p) == 9 and len(r) == 5
    assert tok.unk_token_id not in p + r
    assert ex["input_ids"] == [tok.bos_token_id] + p + r + [tok.eos_token_id]
    assert ex["input_ids"].count(tok.bos_token_id) == 1  # not doubled


def test_sft_labels_mask_the_prompt_and_keep_response_and_eos(task_tokenizer):
    tok = task_tokenizer
    rows = [
        {"prompt": PROMPT, "response": RESPONSE},
        {"prompt": "please review the movie for ben .", "response": "overall a dull movie ."},
    ]
    for row, ex in zip(rows, sft_examples(rows, tok, 24, 24)):
        n_prompt = 1 + len(_ids(tok, row["prompt"]))
        response = _ids(tok, row["response"]) + [tok.eos_token_id]
        assert len(ex["labels"]) == len(ex["input_ids"])
        assert ex["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
        assert ex["labels"][n_prompt:] == response
        assert ex["input_ids"][n_prompt:] == response
        labelled = [i for i, label in zip(ex["input_ids"], ex["labels"]) if label != IGNORE_INDEX]
        assert tok.decode(labelled, skip_special_tokens=True) == row["response"]


def test_long_prompt_is_cut_from_the_left_and_counted(task_tokenizer, caplog):
    tok = task_tokenizer
    rows = [
        {"prompt": PROMPT, "response": RESPONSE},
        {"prompt": "please review the movie for ben .", "response": RESPONSE},
        {"prompt": "the pizza .", "response": RESPONSE},
    ]  # 4 tokens with BOS: fits
    with caplog.at_level(logging.WARNING, logger="pipeline.data"):
        out = sft_examples(rows, tok, max_prompt_len=4, max_response_len=24, what="sft-test")
    p0 = out[0]["input_ids"][:4]
    # The leading BOS stays (the model always saw one); the end of the prompt survives.
    assert p0 == [tok.bos_token_id] + _ids(tok, "the pizza .")
    assert tok.decode(p0, skip_special_tokens=True) == "the pizza ."
    assert out[0]["labels"][:4] == [IGNORE_INDEX] * 4
    assert out[0]["labels"][4:] == _ids(tok, RESPONSE) + [tok.eos_token_id]
    assert out[1]["input_ids"][:4] == [tok.bos_token_id] + _ids(tok, "for ben .")
    assert out[2]["input_ids"][:4] == [tok.bos_token_id] + _ids(tok, "the pizza .")
    warnings = [
        r.getMessage() for r in caplog.records if "truncated from the left" in r.getMessage()
    ]
    assert len(warnings) == 1
    # counts, the longest, and the option to raise (PROMPT is 10 tokens with BOS)
    assert warnings[0] == (
        "sft-test: 2 of 3 prompts were longer than max_prompt_len=4 tokens (the longest has "
        "10) and were truncated from the left; raise --data.max_prompt_len to keep them whole."
    )
    assert not any("responses" in r.getMessage() for r in caplog.records)


def test_a_32_token_prompt_is_not_cut_at_the_default_max_prompt_len(task_tokenizer, caplog):
    from pipeline.config import Config

    prompt = " ".join(["please review the movie for ben ."] * 5)[
        :-2
    ]  # 30 words + BOS: over the old 24
    assert len(task_tokenizer(prompt)["input_ids"]) > 24
    with caplog.at_level(logging.WARNING, logger="pipeline.data"):
        (ex,) = prompt_examples([{"prompt": prompt}], task_tokenizer, Config().data.max_prompt_len)
    assert ex["prompt_ids"] == task_tokenizer(prompt)["input_ids"]
    assert not caplog.records


def test_long_response_is_cut_to_max_response_len(task_tokenizer, caplog):
    tok = task_tokenizer
    rows = [
        {"prompt": PROMPT, "response": RESPONSE},  # 5 + EOS = 6 tokens
        {"prompt": PROMPT, "response": "the pizza is ."},
    ]  # 4 + EOS = 5 tokens: fits
    with caplog.at_level(logging.WARNING, logger="pipeline.data"):
        out = sft_examples(rows, tok, max_prompt_len=24, max_response_len=5)
    response = out[0]["input_ids"][10:]
    assert response == _ids(tok, RESPONSE)[:5]
    assert out[0]["labels"][10:] == response
    assert len(out[0]["input_ids"]) == 10 + 5
    assert out[1]["input_ids"][10:] == _ids(tok, "the pizza is .") + [tok.eos_token_id]
    msgs = [r.getMessage() for r in caplog.records]
    assert any(
        re.search(
            r"\b1 of 2 responses\b.*max_response_len=5 tokens, EOS included \(the longest has 6\)"
            r".*--data.max_response_len",
            m,
        )
        for m in msgs
    ), msgs


def test_no_warning_when_everything_fits(task_tokenizer, caplog):
    with caplog.at_level(logging.WARNING, logger="pipeline.data"):
        sft_examples([{"prompt": PROMPT, "response": RESPONSE}], task_tokenizer, 10, 6)
    assert not caplog.records


def test_pair_examples_share_the_prompt(task_tokenizer):
    tok = task_tokenizer
    row = {"prompt": PROMPT, "chosen": RESPONSE, "rejected": "the movie is dull and bad ."}
    [ex] = pair_examples([row], tok, 24, 24)
    prompt = [tok.bos_token_id] + _ids(tok, PROMPT)
    assert ex["chosen_ids"] == prompt + _ids(tok, row["chosen"]) + [tok.eos_token_id]
    assert ex["rejected_ids"] == prompt + _ids(tok, row["rejected"]) + [tok.eos_token_id]


def test_prompt_examples(task_tokenizer):
    tok = task_tokenizer
    out = prompt_examples([{"prompt": PROMPT}, {"prompt": "the pizza ."}], tok, 5)
    assert out[0]["prompt_ids"] == [tok.bos_token_id] + _ids(tok, "of the pizza .")
    assert out[0]["prompt"] == PROMPT  # the original text is kept
    assert out[1]["prompt_ids"] == [tok.bos_token_id] + _ids(tok, "the pizza .")


# ---------------------------------------------------------------- collation
def test_pad_right_and_left():
    assert pad([[1, 2, 3], [4]], 0).tolist() == [[1, 2, 3], [4, 0, 0]]
    assert pad([[1, 2, 3], [4]], 9, left=True).tolist() == [[1, 2, 3], [9, 9, 4]]
    assert pad([[1, 2]], 0).dtype == torch.long


def test_collate_sft_right_pads(task_tokenizer):
    tok = task_tokenizer
    rows = [
        {"prompt": PROMPT, "response": RESPONSE},
        {"prompt": "the pizza .", "response": "the pizza is ."},
    ]
    ex = sft_examples(rows, tok, 24, 24)
    n0, n1 = len(ex[0]["input_ids"]), len(ex[1]["input_ids"])
    assert n0 > n1
    b = collate_sft(ex, tok.pad_token_id)
    assert set(b) == {"input_ids", "attention_mask", "labels"}
    assert b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape == (2, n0)
    assert b["input_ids"][0].tolist() == ex[0]["input_ids"]
    assert b["input_ids"][1].tolist() == ex[1]["input_ids"] + [tok.pad_token_id] * (n0 - n1)
    assert b["labels"][1].tolist() == ex[1]["labels"] + [IGNORE_INDEX] * (n0 - n1)
    assert b["attention_mask"].tolist() == [[1] * n0, [1] * n1 + [0] * (n0 - n1)]
    # padding never carries loss; every real response token does
    assert ((b["labels"] != IGNORE_INDEX) <= (b["attention_mask"] == 1)).all()
    assert int((b["labels"] != IGNORE_INDEX).sum()) == (5 + 1) + (4 + 1)


def test_collate_prompts_left_pads(task_tokenizer):
    tok = task_tokenizer
    rows = [{"prompt": PROMPT}, {"prompt": "the pizza ."}]
    b = collate_prompts(prompt_examples(rows, tok, 24), tok.pad_token_id)
    assert b["prompts"] == [PROMPT, "the pizza ."]
    assert b["input_ids"].shape == (2, 10)
    assert b["input_ids"][1].tolist() == [tok.pad_token_id] * 6 + [tok.bos_token_id] + _ids(
        tok, "the pizza ."
    )
    assert b["attention_mask"].tolist() == [[1] * 10, [0] * 6 + [1] * 4]
    assert (b["input_ids"][:, -1] == tok.convert_tokens_to_ids(".")).all()  # prompts end together


def test_collate_pairs_chosen_rows_first(task_tokenizer):
    tok = task_tokenizer
    rows = [
        {"prompt": PROMPT, "chosen": "the pizza is amazing .", "rejected": "the pizza is bad"},
        {"prompt": "the movie .", "chosen": "the movie is great and good .", "rejected": "dull ."},
    ]
    ex = pair_examples(rows, tok, 24, 24)
    b = collate_pairs(ex, tok.pad_token_id)
    order = [ex[0]["chosen_ids"], ex[1]["chosen_ids"], ex[0]["rejected_ids"], ex[1]["rejected_ids"]]
    width = max(len(s) for s in order)
    assert b["input_ids"].shape == b["attention_mask"].shape == (4, width)
    for i, seq in enumerate(order):
        assert b["input_ids"][i].tolist() == seq + [tok.pad_token_id] * (width - len(seq))
        assert b["attention_mask"][i].tolist() == [1] * len(seq) + [0] * (width - len(seq))


# ---------------------------------------------------------------- masks (generation.py, models.py)
EOS = 2


def test_response_mask():
    from pipeline.generation import response_mask

    responses = torch.tensor(
        [
            [5, 6, EOS, 0, 0],  # ends early: EOS included, zeros after
            [5, 6, 7, 8, 9],  # runs to the limit without EOS: all ones
            [EOS, 0, 0, 0, 0],  # empty response: only the EOS
            [5, EOS, EOS, 7, 0],  # only the first EOS counts
            [5, 6, 7, 8, EOS],  # EOS on the last position
        ]
    )
    assert response_mask(responses, EOS).tolist() == [
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1],
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 1, 1],
    ]


def test_response_mask_when_pad_is_eos():
    from pipeline.generation import response_mask

    # tokenizers without a pad token pad with EOS: the trailing EOS padding is masked out
    assert response_mask(torch.tensor([[5, EOS, EOS, EOS]]), EOS).tolist() == [[1, 1, 0, 0]]


def test_position_ids_start_at_zero_on_the_first_real_token():
    from pipeline.generation import position_ids

    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1]])
    pos = position_ids(mask)
    assert pos.tolist() == [[0, 0, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5], [0, 0, 0, 0, 0, 0]]
    first_real = mask.argmax(dim=1)
    assert (pos.gather(1, first_real[:, None]) == 0).all()
    # same positions as the unpadded sequence
    assert pos[0, 2:].tolist() == list(range(4))


def test_last_real_index_left_and_right_padding():
    from pipeline.models import last_real_index

    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1], [0, 0, 0, 1]])
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    both = torch.tensor([[0, 1, 1, 1, 0, 0]])  # left-padded prompt + right-padded response
    assert last_real_index(left).tolist() == [3, 3, 3]
    assert last_real_index(right).tolist() == [1, 2, 0, 3]
    assert last_real_index(both).tolist() == [3]
    assert last_real_index(torch.tensor([[True, True, False]])).tolist() == [1]


def test_reencode_for_a_reward_model_with_another_tokenizer(task_tokenizer, tmp_path):
    """A reward model whose tokenizer differs reads the decoded text in its own ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from pipeline.data.tokenize import reencode
    from pipeline.default_task import vocabulary

    # Same words, reversed ids, different special-token spelling: every id differs.
    words = list(reversed(vocabulary()[4:])) + ["[PAD]", "[EOS]", "[UNK]"]
    inner = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    inner.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    other = PreTrainedTokenizerFast(
        tokenizer_object=inner, pad_token="[PAD]", eos_token="[EOS]", unk_token="[UNK]"
    )
    actor = task_tokenizer
    response = actor("the pizza is great .", add_special_tokens=False)["input_ids"] + [
        actor.eos_token_id
    ]
    ids, mask = reencode(
        ["ana asks for a review of the pizza .", "please review the sofa for leo ."],
        [response, [actor.eos_token_id]],
        actor,
        other,
        24,
        24,
    )
    assert ids.shape[0] == 2 and mask.shape == ids.shape
    first = ids[0][mask[0].bool()].tolist()
    assert other.decode(first[:-1]) == "ana asks for a review of the pizza . the pizza is great ."
    assert first[-1] == other.eos_token_id
    empty = ids[1][mask[1].bool()].tolist()  # an empty response is just the target's EOS
    assert (
        other.decode(empty[:-1]) == "please review the sofa for leo ."
        and empty[-1] == other.eos_token_id
    )
    assert mask[1].sum() < mask[0].sum() and ids[1][mask[1] == 0].eq(other.pad_token_id).all()


# ---------------------------------------------------------------- tokenised-example cache
def _identity(data_digest="d1", tokenizer="t1", max_prompt_len=24):
    return {
        "inputs": {"sft_data": data_digest, "tokenizer": tokenizer},
        "data": {"max_prompt_len": max_prompt_len},
        "model": {"trust_remote_code": False},
    }


def test_the_cache_key_follows_data_tokenizer_and_options_only(tmp_path):
    from pipeline.data.cache import examples_cache_file

    path = examples_cache_file(str(tmp_path), "sft", "sft_data", _identity())
    assert path.parent == tmp_path / "tokenized" and path.name.startswith("sft-sft_data-")
    assert path == examples_cache_file(str(tmp_path), "sft", "sft_data", _identity())
    for changed in (
        _identity(data_digest="d2"),
        _identity(tokenizer="t2"),
        _identity(max_prompt_len=32),
    ):
        assert examples_cache_file(str(tmp_path), "sft", "sft_data", changed) != path


def test_cached_examples_come_back_with_the_warnings_of_their_build(
    tmp_path, task_tokenizer, caplog
):
    from pipeline.data.cache import build_cached, read_cached

    rows = [
        {"prompt": "ana asks for a review of the pizza . " * 3, "response": "the pizza is good ."}
    ] * 2
    path = tmp_path / "c" / "sft.json"
    with caplog.at_level("WARNING"):
        assert (
            build_cached(path, lambda: sft_examples(rows, task_tokenizer, 8, 24, what="data.jsonl"))
            is None
        )
    assert (
        "truncated" not in caplog.text
    )  # held back: read_cached says it, so the building rank says it once
    expected = sft_examples(rows, task_tokenizer, 8, 24)
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert read_cached(path) == expected
    assert (
        caplog.text.count("data.jsonl: 2 of 2 prompts were longer than max_prompt_len=8 tokens")
        == 1
    )
    assert not list(path.parent.glob("*.tmp"))


def test_a_failed_build_writes_nothing_and_says_why(tmp_path):
    from pipeline.data.cache import build_cached

    def bad():
        raise UserError("dataset x.jsonl, row 3: field 'prompt' is empty")

    assert (
        build_cached(tmp_path / "sft.json", bad)
        == "dataset x.jsonl, row 3: field 'prompt' is empty"
    )
    assert not list(tmp_path.iterdir())
    blocked = tmp_path / "file"
    blocked.write_text("")  # a file where the cache folder should be
    assert "could not be written" in build_cached(blocked / "sub" / "sft.json", lambda: [])
