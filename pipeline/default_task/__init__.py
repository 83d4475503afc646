"""The embedded default task: short product reviews judged by a shipped "human" preference.

A prompt asks for a review of one item ("ana asks for a review of the pizza ."). A response is a
short sentence built from a small grammar. The gold preference (what the humans in this toy world
want), `gold_score`, rewards reviews that:
  * are about the item that was asked for (mentioning another item costs 1, none costs 0.5),
  * are positive: the mean sentiment of the adjectives used, each adjective has its own value
    in [-1, 1], so the best review uses only the most positive words,
  * are well formed (end with " ."), else 0.25 is lost.
SFT demonstrations pick adjectives uniformly, so the SFT policy sits near gold 0 with clear
room above it (the ceiling is 1). Preference pairs are two such responses to one prompt,
labelled by the gold score and flipped with probability `label_noise` (as human labels are
noisy); some pairs contain an off-topic or malformed response so the reward model learns those
too. Held-out pairs carry the noise-free gold label, so held-out accuracy measures agreement with
the true preference.

Everything is written as plain files (JSONL data, a Hugging Face tokenizer folder, a Llama
config.json) and read back through the same code paths as a user's data and model.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

ITEMS = [
    "pizza",
    "movie",
    "hotel",
    "phone",
    "book",
    "song",
    "car",
    "game",
    "camera",
    "laptop",
    "coffee",
    "bakery",
    "museum",
    "concert",
    "bike",
    "jacket",
    "garden",
    "train",
    "beach",
    "tablet",
    "album",
    "theater",
    "salad",
    "sofa",
]
# Adjective -> sentiment in [-1, 1]; distinct values make ties between responses rare.
SENTIMENT = {
    "amazing": 1.0,
    "excellent": 0.93,
    "wonderful": 0.86,
    "superb": 0.8,
    "great": 0.73,
    "delightful": 0.66,
    "lovely": 0.6,
    "good": 0.53,
    "pleasant": 0.46,
    "nice": 0.4,
    "solid": 0.33,
    "decent": 0.26,
    "fine": 0.2,
    "okay": 0.13,
    "ordinary": 0.06,
    "average": 0.0,
    "plain": -0.06,
    "bland": -0.13,
    "forgettable": -0.2,
    "mediocre": -0.26,
    "dull": -0.33,
    "clumsy": -0.4,
    "weak": -0.46,
    "poor": -0.53,
    "bad": -0.6,
    "disappointing": -0.66,
    "annoying": -0.73,
    "awful": -0.8,
    "terrible": -0.86,
    "horrible": -0.93,
    "dreadful": -1.0,
}
ADJECTIVES = list(SENTIMENT)
NAMES = [
    "ana",
    "ben",
    "chloe",
    "dev",
    "emma",
    "farid",
    "grace",
    "hugo",
    "iris",
    "jon",
    "kira",
    "leo",
    "maya",
    "nils",
    "omar",
    "pia",
]
PROMPT_TEMPLATES = [
    "{name} asks for a review of the {item} .",
    "please review the {item} for {name} .",
    "{name} wants to know about the {item} .",
]
RESPONSE_TEMPLATES = [
    "the {item} is {a} .",
    "the {item} is {a} and {b} .",
    "i found the {item} {a} and {b} .",
    "overall a {a} {item} .",
    "the {item} felt {a} , {b} and {c} .",
    "this {item} was {a} but {b} .",
]
GRAMMAR_WORDS = sorted(
    {w for t in PROMPT_TEMPLATES + RESPONSE_TEMPLATES for w in t.split() if not w.startswith("{")}
)
VERSION = (
    7  # bump when generated data changes, so runs regenerate it (7: held-out prompts disjoint)
)
MIN_GOLD_GAP = 0.2  # pairs closer than this in gold score are not labelled (near-ties)
FLAWED_FRACTION = 0.5  # share of preference pairs whose second response is flawed
# Weights of the flaw kinds of `_flawed_response` (item swap, other item, no item, unterminated,
# cut off, "."). The item swap (the same review about another item) is the only pair that teaches
# "the review must be about the asked item" apart from sentiment. At about a quarter of the pairs
# (v5) the reward model never learned it (held-out swap pairs stayed at chance on every seed while
# sentiment was learned); at about 40% of the pairs it is learned in a few hundred steps.
FLAW_WEIGHTS = (14, 2, 1, 1, 1, 1)
SPECIAL_TOKENS = {"pad": "<pad>", "bos": "<s>", "eos": "</s>", "unk": "<unk>"}


def gold_score(prompt: str, response: str) -> float:
    """The task's true preference for `response` to `prompt` (higher is better, at most 1)."""
    words = response.split()
    asked = next((w for w in prompt.split() if w in ITEMS), None)
    mentioned = {w for w in words if w in ITEMS}
    score = 0.0
    if mentioned - {asked}:
        score -= 1.0
    elif asked not in mentioned:
        score -= 0.5
    adjectives = [SENTIMENT[w] for w in words if w in SENTIMENT]
    if adjectives:
        score += sum(adjectives) / len(adjectives)
    if not response.strip().endswith(" .") and response.strip() != ".":
        score -= 0.25
    return score


def gold(prompts: list[str], responses: list[str]) -> list[float]:
    """`gold_score` batched: the task's built-in `--ppo.eval_reward_fn`
    (pipeline.default_task:gold)."""
    return [gold_score(p, r) for p, r in zip(prompts, responses)]


def _prompt(rng: random.Random, held_out: frozenset = frozenset()) -> str:
    """A random prompt that is not one of the `held_out` evaluation prompts."""
    while True:
        prompt = rng.choice(PROMPT_TEMPLATES).format(name=rng.choice(NAMES), item=rng.choice(ITEMS))
        if prompt not in held_out:
            return prompt


def all_prompts() -> list[str]:
    """Every prompt the task can ask (templates x names x items), in a fixed order."""
    return [t.format(name=n, item=i) for t in PROMPT_TEMPLATES for n in NAMES for i in ITEMS]


MAX_EVAL_PROMPTS = len(all_prompts()) // 2  # the other half (at least) is left to training


def _item_of(prompt: str) -> str:
    return next(w for w in prompt.split() if w in ITEMS)


def _response(rng: random.Random, item: str) -> str:
    a, b, c = rng.sample(ADJECTIVES, 3)
    return rng.choice(RESPONSE_TEMPLATES).format(item=item, a=a, b=b, c=c)


def _flawed_response(rng: random.Random, item: str, good: str) -> str:
    """A review the reward model must learn to dislike, so that PPO cannot win by producing it:
    the good review about another item (the most common flaw, so the item is learned as part of
    the preference), another review about another item or none, malformed, cut off, or empty."""
    kind = rng.choices(range(6), weights=FLAW_WEIGHTS)[0]
    other = rng.choice([i for i in ITEMS if i != item])
    if kind == 0:
        return " ".join(other if w == item else w for w in good.split())
    if kind == 1:
        return _response(rng, other)
    if kind == 2:
        return _response(rng, "place")  # "place" is not an item: no item mentioned
    if kind == 3:
        return _response(rng, item).removesuffix(" .")
    if kind == 4:  # cut off after a few words
        words = _response(rng, item).split()
        return " ".join(words[: rng.randrange(1, max(2, len(words) - 1))])
    return "."  # next to nothing


def _pair(rng: random.Random, noise: float, prompt: str) -> dict:
    item = _item_of(prompt)
    while True:
        a = _response(rng, item)
        b = (
            _flawed_response(rng, item, a)
            if rng.random() < FLAWED_FRACTION
            else _response(rng, item)
        )
        ga, gb = gold_score(prompt, a), gold_score(prompt, b)
        if abs(ga - gb) >= MIN_GOLD_GAP:  # skip near-ties: no human would agree on them
            break
    chosen, rejected = (a, b) if ga > gb else (b, a)
    if rng.random() < noise:
        chosen, rejected = rejected, chosen
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def vocabulary() -> list[str]:
    words = set(GRAMMAR_WORDS) | set(ITEMS) | set(ADJECTIVES) | set(NAMES) | {"place"}
    return list(SPECIAL_TOKENS.values()) + sorted(words)


def build_tokenizer(folder: Path) -> None:
    """A word-level tokenizer (the `tokenizers` library) saved as a normal Hugging Face folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk"]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    bos = SPECIAL_TOKENS["bos"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, vocab[bos])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=SPECIAL_TOKENS["eos"],
        pad_token=SPECIAL_TOKENS["pad"],
        unk_token=SPECIAL_TOKENS["unk"],
        padding_side="right",
    )
    fast.save_pretrained(str(folder))


def model_config(
    vocab_size: int,
    hidden_size: int,
    num_hidden_layers: int,
    num_attention_heads: int,
    intermediate_size: int,
    max_positions: int,
) -> dict:
    """A small Llama config (a few million parameters at the defaults) as a config.json dict."""
    from transformers import LlamaConfig

    ids = {k: vocabulary().index(v) for k, v in SPECIAL_TOKENS.items()}
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_attention_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_positions,
        bos_token_id=ids["bos"],
        eos_token_id=ids["eos"],
        pad_token_id=ids["pad"],
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
    )
    return cfg.to_dict()


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def generate(
    folder: Path,
    seed: int,
    num_sft: int,
    num_pairs: int,
    num_prompts: int,
    num_eval: int,
    label_noise: float,
) -> dict[str, Path]:
    """Write the task's data files into `folder`; deterministic given the arguments.

    The `num_eval` held-out prompts are distinct and never appear in the training files (SFT
    demonstrations, preference pairs, PPO prompts): held-out scores measure generalisation to
    prompts the policy and the reward model never trained on, not recall."""
    if not 0 < num_eval <= MAX_EVAL_PROMPTS:
        raise ValueError(
            f"default task: num_eval={num_eval} must be in [1, {MAX_EVAL_PROMPTS}] (the task has "
            f"{len(all_prompts())} distinct prompts; held-out ones are kept out of training)."
        )
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    eval_prompts = rng.sample(all_prompts(), num_eval)
    held_out = frozenset(eval_prompts)

    def demo(p: str) -> dict:
        return {"prompt": p, "response": _response(rng, _item_of(p))}

    files = {
        "sft": [demo(_prompt(rng, held_out)) for _ in range(num_sft)],
        "sft_eval": [demo(p) for p in eval_prompts],
        "pairs": [_pair(rng, label_noise, _prompt(rng, held_out)) for _ in range(num_pairs)],
        "pairs_eval": [_pair(rng, 0.0, p) for p in eval_prompts],
        "prompts": [{"prompt": _prompt(rng, held_out)} for _ in range(num_prompts)],
        "prompts_eval": [{"prompt": p} for p in eval_prompts],
    }
    paths = {}
    for name, rows in files.items():
        paths[name] = folder / f"{name}.jsonl"
        _write_jsonl(paths[name], rows)
    return paths
