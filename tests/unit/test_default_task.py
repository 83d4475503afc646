"""Unit tests for pipeline/default_task: data generation, the gold preference, tokenizer, model
config."""

import json

import pytest

from pipeline.default_task import (
    ADJECTIVES,
    ITEMS,
    SENTIMENT,
    SPECIAL_TOKENS,
    build_tokenizer,
    generate,
    gold_score,
    model_config,
    vocabulary,
)

FILES = {"sft", "sft_eval", "pairs", "pairs_eval", "prompts", "prompts_eval"}


def _read(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _item(text):
    items = [w for w in text.split() if w in ITEMS]
    assert len(items) == 1, text
    return items[0]


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """A small task with ~2000 noisy training pairs (to measure the flip rate)."""
    folder = tmp_path_factory.mktemp("task")
    paths = generate(
        folder, seed=1, num_sft=300, num_pairs=2000, num_prompts=40, num_eval=300, label_noise=0.1
    )
    return {name: _read(p) for name, p in paths.items()}


# ---------------------------------------------------------------- generate
def test_generate_is_deterministic_for_a_seed(tmp_path):
    kw = dict(num_sft=20, num_pairs=20, num_prompts=10, num_eval=5, label_noise=0.1)
    a = generate(tmp_path / "a", seed=3, **kw)
    b = generate(tmp_path / "b", seed=3, **kw)
    c = generate(tmp_path / "c", seed=4, **kw)
    assert set(a) == set(b) == FILES
    for name in FILES:
        assert a[name].read_bytes() == b[name].read_bytes(), name
    assert all(
        a[name].parent == tmp_path / "a" and a[name].name == f"{name}.jsonl" for name in FILES
    )
    differing = [name for name in FILES if a[name].read_bytes() != c[name].read_bytes()]
    assert set(differing) == FILES  # another seed changes every file


def test_generate_rewrites_the_same_bytes_in_place(tmp_path):
    kw = dict(seed=9, num_sft=5, num_pairs=5, num_prompts=5, num_eval=5, label_noise=0.0)
    first = {k: p.read_bytes() for k, p in generate(tmp_path, **kw).items()}
    second = {k: p.read_bytes() for k, p in generate(tmp_path, **kw).items()}
    assert first == second


def test_row_counts_match_the_arguments(tmp_path):
    paths = generate(
        tmp_path, seed=0, num_sft=7, num_pairs=11, num_prompts=13, num_eval=3, label_noise=0.2
    )
    counts = {name: len(_read(p)) for name, p in paths.items()}
    assert counts == {
        "sft": 7,
        "sft_eval": 3,
        "pairs": 11,
        "pairs_eval": 3,
        "prompts": 13,
        "prompts_eval": 3,
    }


def test_row_fields(task):
    assert all(set(r) == {"prompt", "response"} for r in task["sft"] + task["sft_eval"])
    assert all(
        set(r) == {"prompt", "chosen", "rejected"} for r in task["pairs"] + task["pairs_eval"]
    )
    assert all(set(r) == {"prompt"} for r in task["prompts"] + task["prompts_eval"])


def test_every_prompt_asks_about_one_item(task):
    for rows in task.values():
        for r in rows:
            _item(r["prompt"])
            assert r["prompt"].endswith(" .")


def test_sft_responses_mention_the_item_and_end_with_a_full_stop(task):
    for r in task["sft"] + task["sft_eval"]:
        words = r["response"].split()
        assert [w for w in words if w in ITEMS] == [_item(r["prompt"])], r
        assert r["response"].endswith(" ."), r
        assert any(w in SENTIMENT for w in words), r


def test_sft_demonstrations_are_near_gold_zero_with_room_above(task):
    scores = [gold_score(r["prompt"], r["response"]) for r in task["sft"]]
    mean = sum(scores) / len(scores)
    assert abs(mean) < 0.15
    assert max(scores) <= 1.0


def test_eval_pairs_are_noise_free(task):
    for r in task["pairs_eval"]:
        assert r["chosen"] != r["rejected"]
        assert gold_score(r["prompt"], r["chosen"]) > gold_score(r["prompt"], r["rejected"]), r


def test_pairs_are_never_near_ties(task):
    for r in task["pairs"] + task["pairs_eval"]:
        gap = abs(gold_score(r["prompt"], r["chosen"]) - gold_score(r["prompt"], r["rejected"]))
        assert gap >= 0.05 - 1e-12, r


def test_training_label_noise_rate(task):
    pairs = task["pairs"]
    assert len(pairs) == 2000
    flipped = sum(
        gold_score(r["prompt"], r["chosen"]) < gold_score(r["prompt"], r["rejected"]) for r in pairs
    )
    assert flipped / len(pairs) == pytest.approx(0.1, abs=0.03)


def test_no_label_noise_means_no_flips(tmp_path):
    paths = generate(
        tmp_path, seed=5, num_sft=1, num_pairs=300, num_prompts=1, num_eval=1, label_noise=0.0
    )
    for r in _read(paths["pairs"]):
        assert gold_score(r["prompt"], r["chosen"]) > gold_score(r["prompt"], r["rejected"])


def test_some_training_pairs_contain_flawed_responses(task):
    """Off-topic, item-less or malformed responses appear, so the reward model can learn them."""
    kinds = set()
    for r in task["pairs"]:
        item = _item(r["prompt"])
        for resp in (r["chosen"], r["rejected"]):
            mentioned = {w for w in resp.split() if w in ITEMS}
            if mentioned - {item}:
                kinds.add("wrong item")
            elif not mentioned:
                kinds.add("no item")
            elif not resp.endswith(" ."):
                kinds.add("malformed")
    assert kinds == {"wrong item", "no item", "malformed"}


# ---------------------------------------------------------------- gold_score
PIZZA = "ana asks for a review of the pizza ."


@pytest.mark.parametrize(
    "response, expected",
    [
        ("the pizza is amazing .", 1.0),
        ("the pizza is dreadful .", -1.0),
        ("the movie is amazing .", 0.0),  # wrong item: -1
        ("the pizza and the movie are amazing .", 0.0),  # another item besides the asked one: -1
        ("the place is amazing .", 0.5),  # no item: -0.5
        ("the pizza is amazing", 0.75),  # no final " .": -0.25
        ("the movie is amazing", -0.25),  # both
        ("the pizza is amazing and dreadful .", 0.0),  # mean over adjectives
        ("the pizza is amazing and good .", (1.0 + 0.53) / 2),
        ("the pizza felt amazing , great and bad .", (1.0 + 0.73 - 0.6) / 3),
        ("the pizza is amazing and amazing .", 1.0),  # repeats do not add up
        ("the pizza .", 0.0),  # no adjective: 0
        ("the pizza is amazing.", -0.25),  # "amazing." is not a word of the task
    ],
)
def test_gold_score_hand_examples(response, expected):
    assert gold_score(PIZZA, response) == pytest.approx(expected)


def test_gold_score_uses_the_prompt_item():
    assert gold_score("please review the movie for ben .", "the movie is great .") == pytest.approx(
        0.73
    )
    assert gold_score("please review the movie for ben .", "the pizza is great .") == pytest.approx(
        -0.27
    )


def test_gold_score_ceiling_and_best_response():
    best = max(ADJECTIVES, key=SENTIMENT.get)
    assert gold_score(PIZZA, f"the pizza is {best} .") == 1.0
    assert all(-1 <= v <= 1 for v in SENTIMENT.values())
    assert len(set(SENTIMENT.values())) == len(SENTIMENT)  # distinct values


# ---------------------------------------------------------------- tokenizer
def test_vocabulary_layout():
    vocab = vocabulary()
    assert vocab[:4] == list(SPECIAL_TOKENS.values())
    assert len(vocab) == len(set(vocab))
    assert set(ITEMS) | set(ADJECTIVES) | {"place", "."} <= set(vocab)


def test_tokenizer_special_tokens(task_tokenizer):
    tok = task_tokenizer
    vocab = vocabulary()
    assert tok.pad_token == "<pad>" and tok.pad_token_id == vocab.index("<pad>")
    assert tok.bos_token == "<s>" and tok.bos_token_id == vocab.index("<s>")
    assert tok.eos_token == "</s>" and tok.eos_token_id == vocab.index("</s>")
    assert tok.unk_token == "<unk>" and tok.unk_token_id == vocab.index("<unk>")
    assert len(tok) == len(vocab)
    assert tok.padding_side == "right"


def test_tokenizer_round_trips_every_vocabulary_word(task_tokenizer):
    tok = task_tokenizer
    for i, word in enumerate(vocabulary()):
        if word in SPECIAL_TOKENS.values():
            continue
        ids = tok(word, add_special_tokens=False)["input_ids"]
        assert ids == [i], word
        assert tok.decode(ids) == word
    words = [w for w in vocabulary() if w not in SPECIAL_TOKENS.values()]
    text = " ".join(words)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == [vocabulary().index(w) for w in words]
    assert tok.decode(ids) == text


def test_tokenizer_round_trips_task_text_without_unk(task_tokenizer, task):
    tok = task_tokenizer
    texts = [v for rows in task.values() for r in rows[:200] for v in r.values()]
    for text in texts:
        ids = tok(text)["input_ids"]
        assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
        assert tok.unk_token_id not in ids, text
        assert tok.decode(ids, skip_special_tokens=True) == text
    # decoded responses score the same as the text (" ." survives decoding)
    r = task["sft"][0]
    ids = tok(r["response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    decoded = tok.decode(ids, skip_special_tokens=True)
    assert gold_score(r["prompt"], decoded) == gold_score(r["prompt"], r["response"])


def test_unknown_words_map_to_unk(task_tokenizer):
    ids = task_tokenizer("the zebra", add_special_tokens=False)["input_ids"]
    assert ids == [vocabulary().index("the"), task_tokenizer.unk_token_id]


def test_tokenizer_folder_is_a_normal_hf_folder(tmp_path):
    from transformers import AutoTokenizer

    build_tokenizer(tmp_path / "tok")
    assert (tmp_path / "tok" / "tokenizer.json").is_file()
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert tok("the pizza .")["input_ids"] == [
        vocabulary().index(w) for w in ("<s>", "the", "pizza", ".")
    ]


# ---------------------------------------------------------------- model config
def test_model_config_is_a_llama_config_matching_the_tokenizer(task_tokenizer):
    from transformers import LlamaConfig

    d = model_config(
        len(vocabulary()),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_positions=48,
    )
    json.dumps(d)  # written as config.json
    assert d["model_type"] == "llama"
    cfg = LlamaConfig.from_dict(d)
    assert isinstance(cfg, LlamaConfig)
    assert cfg.vocab_size == len(vocabulary()) == len(task_tokenizer)
    assert cfg.pad_token_id == task_tokenizer.pad_token_id
    assert cfg.bos_token_id == task_tokenizer.bos_token_id
    assert cfg.eos_token_id == task_tokenizer.eos_token_id
    assert (
        cfg.hidden_size,
        cfg.num_hidden_layers,
        cfg.num_attention_heads,
        cfg.intermediate_size,
        cfg.max_position_embeddings,
    ) == (16, 1, 2, 32, 48)
    assert cfg.num_key_value_heads == 2
    assert cfg.tie_word_embeddings is True


def test_model_config_builds_a_tiny_model(task_tokenizer):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    d = model_config(len(vocabulary()), 16, 1, 2, 32, 48)
    cfg = AutoConfig.for_model(**d)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    assert sum(p.numel() for p in model.parameters()) < 100_000
    assert model.get_input_embeddings().weight.shape == (len(vocabulary()), 16)
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()  # tied
    ids = torch.tensor([task_tokenizer("the pizza is amazing .")["input_ids"]])
    assert model(input_ids=ids).logits.shape == (1, ids.shape[1], len(vocabulary()))


def test_item_swap_pairs_are_a_large_share(task):
    """The same review about another item: the pair that teaches the item apart from sentiment.
    The reward model only learns it when such pairs are common (about 40% of the pairs)."""
    for rows in (task["pairs"], task["pairs_eval"]):
        swaps = 0
        for r in rows:
            item = _item(r["prompt"])
            a, b = r["chosen"].split(), r["rejected"].split()
            for good, bad in ((a, b), (b, a)):
                swapped = [w for w, v in zip(good, bad) if w != v]
                if len(good) == len(bad) and swapped == [item] and any(w in ITEMS for w in bad):
                    swaps += 1
                    assert gold_score(r["prompt"], " ".join(good)) - gold_score(
                        r["prompt"], " ".join(bad)
                    ) == pytest.approx(1.0)
        assert 0.35 < swaps / len(rows) < 0.5, swaps / len(rows)
