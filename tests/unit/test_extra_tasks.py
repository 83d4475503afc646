"""Unit tests for the test preference tasks in tests/tasks (sort, distinct): gold functions on
hand-worked examples, deterministic generation, held-out prompts disjoint from training prompts,
well-formed pairs, tokenizer coverage and lengths. No training."""

import json
import statistics

import pytest

from tasks import common, distinct_task, sort_task

TASKS = {"sort": sort_task, "distinct": distinct_task}
KW = dict(num_sft=400, num_pairs=2000, num_prompts=200, num_eval=64)
TRAIN = ("sft", "pairs", "prompts")
EVAL = ("sft_eval", "pairs_eval", "prompts_eval")


@pytest.fixture(scope="module", params=sorted(TASKS))
def written(request, tmp_path_factory):
    module = TASKS[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    paths = module.generate(folder, seed=5, **KW)
    rows = {name: common.read_jsonl(paths[name]) for name in common.FILES}
    return module, folder, paths, rows


# ---------------------------------------------------------------- gold, hand-worked
SORT_PROMPT = "sort : 7 2 19 4 ."


@pytest.mark.parametrize(
    "response, expected",
    [
        ("2 4 7 19 .", 1.0),
        ("19 7 4 2 .", 0.0),
        ("2 4 19 7 .", 5 / 6),  # one of six pairs out of order
        ("4 2 7 19 .", 5 / 6),
        ("7 2 19 4 .", 3 / 6),  # (7,19) (2,19) (2,4) ascending
        ("2 4 7 19", 0.0),  # not terminated
        ("2 4 7 .", 0.0),  # a number missing
        ("2 2 4 7 19 .", 0.0),  # a number repeated
        ("0 1 2 3 .", 0.0),  # ascending, but not the prompt's numbers
        ("2 4 7 19 . .", 0.0),
        ("", 0.0),
    ],
)
def test_sort_gold(response, expected):
    assert sort_task.gold([SORT_PROMPT], [response]) == [pytest.approx(expected)]


def test_sort_well_formed():
    assert sort_task.well_formed(SORT_PROMPT, "19 7 4 2 .")
    assert not sort_task.well_formed(SORT_PROMPT, "0 1 2 3 .")
    assert not sort_task.well_formed(SORT_PROMPT, "2 4 7 19")


FRUITS = "name four fruits ."


@pytest.mark.parametrize(
    "prompt, response, expected",
    [
        (FRUITS, "apple pear kiwi plum .", 1.0),
        (FRUITS, "apple pear cat plum .", 0.5),  # (3 on - 1 off) / 4
        (FRUITS, "apple pear pear kiwi .", 0.5),  # (3 on - 1 repeat) / 4
        (FRUITS, "apple apple apple apple .", 0.0),  # (1 - 3) / 4, clipped
        (FRUITS, "apple pear .", 0.5),  # too short
        (FRUITS, "apple pear kiwi plum mango .", 1.0),  # clipped at 1
        (FRUITS, "apple pear kiwi plum", 0.0),  # not terminated
        (FRUITS, "cat dog red blue .", 0.0),  # all off-category
        (FRUITS, "apple cat cat plum .", 0.0),  # (2 on - 1 off - 1 repeat) / 4
        ("ana asks : list three animals .", "cat dog horse .", 1.0),
        ("tell me two colors .", "red apple .", 0.0),
        ("give me five tools .", "saw axe rake cat .", 0.4),
    ],
)
def test_distinct_gold(prompt, response, expected):
    assert distinct_task.gold([prompt], [response]) == [pytest.approx(expected)]


def test_gold_is_batched():
    prompts, responses = [SORT_PROMPT, SORT_PROMPT], ["2 4 7 19 .", "19 7 4 2 ."]
    assert sort_task.gold(prompts, responses) == [1.0, 0.0]
    with pytest.raises(ValueError):
        sort_task.gold(prompts, responses[:1])


def test_categories_do_not_share_words():
    words = [w for ws in distinct_task.CATEGORIES.values() for w in ws]
    assert len(words) == len(set(words))
    assert all(10 <= len(ws) <= 15 for ws in distinct_task.CATEGORIES.values())


# ---------------------------------------------------------------- generation
@pytest.mark.parametrize("name", sorted(TASKS))
def test_generate_is_deterministic_for_a_seed(name, tmp_path):
    module = TASKS[name]
    kw = dict(num_sft=30, num_pairs=30, num_prompts=20, num_eval=10)
    a, b, c = (
        module.generate(tmp_path / d, seed=s, **kw) for d, s in (("a", 3), ("b", 3), ("c", 4))
    )
    for f in common.FILES:
        assert a[f].read_bytes() == b[f].read_bytes(), f
        assert a[f].read_bytes() != c[f].read_bytes(), f
    for f in ("tokenizer/tokenizer.json", "model/config.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()


def test_eval_prompts_are_disjoint_from_training_prompts(written):
    _, _, _, rows = written
    train = {r["prompt"] for f in TRAIN for r in rows[f]}
    held = [r["prompt"] for r in rows["prompts_eval"]]
    assert len(held) == len(set(held)) == KW["num_eval"]
    for f in EVAL:
        assert [r["prompt"] for r in rows[f]] == held, f
    assert not train & set(held)


def test_rows_are_well_formed(written):
    module, _, _, rows = written
    for r in rows["sft"] + rows["sft_eval"]:
        assert module.well_formed(r["prompt"], r["response"]), r
        words = r["response"].split()[:-1]
        assert len(words) == len(set(words)), r  # no demonstration repeats a word
    for r in rows["pairs"] + rows["pairs_eval"]:
        for side in ("chosen", "rejected"):
            assert module.well_formed(r["prompt"], r[side]), r
            words = r[side].split()[:-1]
            assert len(words) == len(set(words)), r
        assert r["chosen"] != r["rejected"]


def test_sft_demonstrations_leave_room(written):
    module, _, _, rows = written
    g = module.gold([r["prompt"] for r in rows["sft"]], [r["response"] for r in rows["sft"]])
    assert 0.3 <= statistics.mean(g) <= 0.7  # the SFT policy itself lands lower (it also errs)


def test_pair_labels(written):
    module, _, _, rows = written

    def golds(f):
        ps = [r["prompt"] for r in rows[f]]
        return (
            module.gold(ps, [r["chosen"] for r in rows[f]]),
            module.gold(ps, [r["rejected"] for r in rows[f]]),
        )

    c, r = golds("pairs_eval")  # noise-free, no near-ties
    assert all(a - b >= module.MIN_GOLD_GAP for a, b in zip(c, r))
    c, r = golds("pairs")
    assert all(abs(a - b) >= module.MIN_GOLD_GAP for a, b in zip(c, r))
    flipped = statistics.mean(a < b for a, b in zip(c, r))
    assert 0.07 <= flipped <= 0.13  # label_noise 0.1 on 2000 pairs


def test_tokenizer_round_trips_every_row_within_24_tokens(written):
    from transformers import AutoTokenizer

    module, folder, _, rows = written
    tok = AutoTokenizer.from_pretrained(str(folder / "tokenizer"))
    assert tok.convert_tokens_to_ids(["<pad>", "<s>", "</s>", "<unk>"]) == [0, 1, 2, 3]
    assert (tok.pad_token, tok.bos_token, tok.eos_token, tok.unk_token) == (
        "<pad>",
        "<s>",
        "</s>",
        "<unk>",
    )
    texts = [
        (r["prompt"], [r[k] for k in ("response", "chosen", "rejected") if k in r])
        for f in common.FILES
        for r in rows[f]
    ]
    for prompt, responses in texts:
        ids = tok(prompt, add_special_tokens=True)["input_ids"]
        assert ids[0] == tok.bos_token_id and tok.unk_token_id not in ids
        assert len(ids) <= common.MAX_LEN
        assert tok.decode(ids, skip_special_tokens=True) == prompt
        for resp in responses:
            ids = tok(resp, add_special_tokens=False)["input_ids"]
            assert tok.unk_token_id not in ids and len(ids) + 1 <= common.MAX_LEN  # + EOS
            assert tok.decode(ids) == resp


def test_model_config_and_flags(written):
    from pipeline.cli import parse_config

    module, folder, _, _ = written
    cfg = json.loads((folder / "model" / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["max_position_embeddings"] == 48
    assert cfg["vocab_size"] == len(common.vocabulary(module.WORDS))
    assert (cfg["pad_token_id"], cfg["bos_token_id"], cfg["eos_token_id"]) == (0, 1, 2)
    flags = module.flags(folder)
    parsed = parse_config(flags)
    assert parsed.model.model_name_or_path == str((folder / "model").resolve())
    for path in flags[1::2]:
        assert (folder / path.rsplit("/", 1)[-1]).exists() or path.endswith(("model", "tokenizer"))
    for f, flag in common.FLAG_OF.items():
        assert flags[flags.index(flag) + 1] == str((folder / f"{f}.jsonl").resolve())


def test_command_line_prints_the_flags(tmp_path, capsys):
    common.main(
        sort_task,
        [
            str(tmp_path / "t"),
            "--seed",
            "2",
            "--num_sft",
            "5",
            "--num_pairs",
            "5",
            "--num_prompts",
            "5",
            "--num_eval",
            "4",
        ],
    )
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.split() == sort_task.flags(tmp_path / "t")
    assert len(common.read_jsonl(tmp_path / "t" / "sft.jsonl")) == 5
