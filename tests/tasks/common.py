"""Shared helpers of the test preference tasks (`sort_task.py`, `distinct_task.py`).

A task module supplies a prompt sampler, a demonstration sampler and a pair sampler; `write_task`
turns them into the pipeline's six JSONL files, a word-level tokenizer folder and a from-scratch
Llama `config.json`, exactly as the embedded default task does (`pipeline.default_task`), with one
difference: held-out prompts are drawn first and no training row (SFT, pairs, PPO) ever uses one
of them, so every evaluation is on prompts never seen in training.
"""

from __future__ import annotations

import json
import random
import shlex
from pathlib import Path
from typing import Callable

SPECIAL_TOKENS = {"pad": "<pad>", "bos": "<s>", "eos": "</s>", "unk": "<unk>"}
# prompts and responses (EOS included) fit the default data.max_response_len and max_prompt_len
MAX_LEN = 24
MAX_POSITIONS = 48
FILES = ("sft", "sft_eval", "pairs", "pairs_eval", "prompts", "prompts_eval")
FLAG_OF = {
    "sft": "--data.sft_data_path",
    "sft_eval": "--data.sft_eval_data_path",
    "pairs": "--data.reward_data_path",
    "pairs_eval": "--data.reward_eval_data_path",
    "prompts": "--data.prompt_data_path",
    "prompts_eval": "--data.eval_prompt_data_path",
}


def vocabulary(words) -> list[str]:
    """Special tokens first (ids 0-3, as in the default task), then the task's words sorted."""
    return list(SPECIAL_TOKENS.values()) + sorted(set(words) - set(SPECIAL_TOKENS.values()))


def build_tokenizer(folder: Path, words) -> None:
    """A WordLevel / WhitespaceSplit tokenizer with a BOS template, saved as a HF folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary(words))}
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
) -> dict:
    """A tiny from-scratch Llama (config only: the pipeline initialises the weights)."""
    from transformers import LlamaConfig

    ids = {k: i for i, k in enumerate(SPECIAL_TOKENS)}
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_attention_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=MAX_POSITIONS,
        bos_token_id=ids["bos"],
        eos_token_id=ids["eos"],
        pad_token_id=ids["pad"],
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
    ).to_dict()


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    return [
        json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line
    ]


def held_out_prompts(rng: random.Random, sample_prompt: Callable, n: int) -> list[str]:
    """`n` distinct prompts, in the order drawn (the evaluation prompts)."""
    seen: dict[str, None] = {}
    for _ in range(1000 * n):
        seen.setdefault(sample_prompt(rng), None)
        if len(seen) == n:
            return list(seen)
    raise ValueError(f"the prompt space is too small for {n} distinct held-out prompts")


def training_prompt(rng: random.Random, sample_prompt: Callable, held_out: set) -> str:
    """A prompt that is not a held-out one (rejection sampling)."""
    while True:
        p = sample_prompt(rng)
        if p not in held_out:
            return p


def write_task(
    folder: Path,
    seed: int,
    *,
    words,
    sample_prompt: Callable,
    demo: Callable,
    pair: Callable,
    num_sft: int,
    num_pairs: int,
    num_prompts: int,
    num_eval: int,
    label_noise: float,
    hidden_size: int,
    num_hidden_layers: int,
    num_attention_heads: int,
    intermediate_size: int,
) -> dict[str, Path]:
    """Write the six JSONL files, `tokenizer/` and `model/config.json`; deterministic per seed.

    `demo(rng, prompt) -> response`; `pair(rng, prompt, noise) -> (chosen, rejected)`.
    Evaluation rows (sft_eval, pairs_eval, prompts_eval) use the `num_eval` held-out prompts, one
    row each; training rows use any other prompt."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    held = held_out_prompts(rng, sample_prompt, num_eval)
    held_set = set(held)

    def train_prompt() -> str:
        return training_prompt(rng, sample_prompt, held_set)

    def pair_row(p: str, noise: float) -> dict:
        chosen, rejected = pair(rng, p, noise)
        return {"prompt": p, "chosen": chosen, "rejected": rejected}

    rows = {
        "sft": [
            {"prompt": p, "response": demo(rng, p)}
            for p in (train_prompt() for _ in range(num_sft))
        ],
        "sft_eval": [{"prompt": p, "response": demo(rng, p)} for p in held],
        "pairs": [pair_row(train_prompt(), label_noise) for _ in range(num_pairs)],
        "pairs_eval": [pair_row(p, 0.0) for p in held],
        "prompts": [{"prompt": train_prompt()} for _ in range(num_prompts)],
        "prompts_eval": [{"prompt": p} for p in held],
    }
    train_prompts = {r["prompt"] for name in ("sft", "pairs", "prompts") for r in rows[name]}
    assert not train_prompts & held_set, "a held-out prompt leaked into the training rows"
    paths = {}
    for name in FILES:
        paths[name] = folder / f"{name}.jsonl"
        write_jsonl(paths[name], rows[name])
    build_tokenizer(folder / "tokenizer", words)
    paths["tokenizer"] = folder / "tokenizer"
    (folder / "model").mkdir(exist_ok=True)
    config = model_config(
        len(vocabulary(words)),
        hidden_size,
        num_hidden_layers,
        num_attention_heads,
        intermediate_size,
    )
    (folder / "model" / "config.json").write_text(json.dumps(config, indent=2))
    paths["model"] = folder / "model"
    return paths


def flags(folder: Path) -> list[str]:
    """Command-line flags pointing the pipeline at a task folder written by `write_task`."""
    folder = Path(folder).resolve()
    out = [
        "--model.model_name_or_path",
        str(folder / "model"),
        "--data.tokenizer_path",
        str(folder / "tokenizer"),
    ]
    for name in FILES:
        out += [FLAG_OF[name], str(folder / f"{name}.jsonl")]
    return out


def choose(
    rng: random.Random, a: str, b: str, ga: float, gb: float, noise: float
) -> tuple[str, str]:
    """(chosen, rejected) by gold score, flipped with probability `noise`."""
    chosen, rejected = (a, b) if ga > gb else (b, a)
    if rng.random() < noise:
        chosen, rejected = rejected, chosen
    return chosen, rejected


def main(module, argv=None) -> None:
    """`python TASK.py OUT --seed S [--num_sft N ...]`: write the task, print the flags (last
    line)."""
    import argparse
    import inspect

    ap = argparse.ArgumentParser(description=(module.__doc__ or "").splitlines()[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--seed", type=int, required=True)
    for name, p in inspect.signature(module.generate).parameters.items():
        if p.default is not inspect.Parameter.empty:
            ap.add_argument(f"--{name}", type=type(p.default), default=p.default)
    args = vars(ap.parse_args(argv))
    folder, seed = args.pop("folder"), args.pop("seed")
    module.generate(folder, seed, **args)
    print(f"{Path(module.__file__).stem} written to {folder}")
    print(" ".join(shlex.quote(f) for f in module.flags(folder)))
