"""Independent check of an exported run on a test task, with plain `transformers` only.

    python tests/tasks/evaluate_export.py RUN_DIR --task sort|distinct --task_dir F \\
        [--n 128] [--seed 0]

Loads `RUN_DIR/sft/model` and `RUN_DIR/ppo/model` (AutoModelForCausalLM, AutoTokenizer), samples
one response per held-out prompt of `F/prompts_eval.jsonl` (the first n; temperature 1, no top-k or
top-p, at most 24 new tokens, EOS included, seeded: the same seed for both policies), and prints
JSON with, for each policy: mean gold, fraction well formed, mean distinct-word ratio (distinct
words / words, the final `.` excluded), mean response length in tokens (EOS included, as the
pipeline's `response_length_mean`) and, when `RUN_DIR/reward/model` exists, the mean reward-model
score of those responses: the score head read at the last real token of `BOS prompt response EOS`
(the attention mask's last 1 of right-padded inputs, as the pipeline reads it; not Hugging Face's
pooled logits).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
TASKS = {"sort": "sort_task.py", "distinct": "distinct_task.py"}
MAX_NEW_TOKENS = 24


def load_task(name: str):
    spec = importlib.util.spec_from_file_location(f"rlhf_test_task_{name}", HERE / TASKS[name])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@torch.no_grad()
def sample(
    model_dir: Path, prompts: list[str], seed: int, batch: int = 64
) -> list[tuple[list[int], list[int], str]]:
    """(prompt ids, response ids with EOS if produced, response text) per prompt. Prompts are
    batched by token length, so no padding enters generation."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    ids = [tok(p, add_special_tokens=True)["input_ids"] for p in prompts]
    by_len: dict[int, list[int]] = {}
    for i, x in enumerate(ids):
        by_len.setdefault(len(x), []).append(i)
    torch.manual_seed(seed)
    out: list = [None] * len(prompts)
    for length in sorted(by_len):
        group = by_len[length]
        for s in range(0, len(group), batch):
            idx = group[s : s + batch]
            x = torch.tensor([ids[i] for i in idx])
            gen = model.generate(
                x,
                attention_mask=torch.ones_like(x),
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                max_new_tokens=MAX_NEW_TOKENS,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
            )
            for row, i in zip(gen[:, length:].tolist(), idx):
                resp = row[: row.index(tok.eos_token_id) + 1] if tok.eos_token_id in row else row
                text = tok.decode(
                    [t for t in resp if t != tok.eos_token_id], skip_special_tokens=True
                )
                out[i] = (ids[i], resp, text)
    return out


@torch.no_grad()
def rm_scores(
    rm_dir: Path, rows: list[tuple[list[int], list[int], str]], batch: int = 64
) -> list[float]:
    """Score at the last real token of each right-padded `prompt ids + response ids`."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(rm_dir))
    rm = AutoModelForSequenceClassification.from_pretrained(str(rm_dir)).eval()
    backbone = getattr(rm, rm.base_model_prefix)
    scores = []
    for s in range(0, len(rows), batch):
        seqs = [p + r for p, r, _ in rows[s : s + batch]]
        width = max(map(len, seqs))
        x = torch.full((len(seqs), width), tok.pad_token_id)
        mask = torch.zeros_like(x)
        for i, q in enumerate(seqs):
            x[i, : len(q)] = torch.tensor(q)
            mask[i, : len(q)] = 1
        hidden = backbone(input_ids=x, attention_mask=mask).last_hidden_state
        per_token = rm.score(hidden).squeeze(-1)  # (B, T)
        last = mask.shape[1] - 1 - mask.flip(1).argmax(1)  # position of the last 1 of each row
        scores += per_token[torch.arange(len(seqs)), last].tolist()
    return scores


def distinct_ratio(text: str) -> float:
    words = text.split()
    if words and words[-1] == ".":
        words = words[:-1]
    return len(set(words)) / len(words) if words else 0.0


def evaluate(run_dir: Path, task: str, task_dir: Path, n: int = 128, seed: int = 0) -> dict:
    module = load_task(task)
    prompts = [
        json.loads(line)["prompt"]
        for line in (Path(task_dir) / "prompts_eval.jsonl").read_text().splitlines()
        if line
    ][:n]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    rm_dir = Path(run_dir) / "reward" / "model"
    result = {"run_dir": str(run_dir), "task": task, "n": len(prompts), "seed": seed}
    for policy in ("sft", "ppo"):
        rows = sample(Path(run_dir) / policy / "model", prompts, seed)
        texts = [t for _, _, t in rows]
        r = {
            "gold": mean(module.gold(prompts, texts)),
            "well_formed": mean([float(module.well_formed(p, t)) for p, t in zip(prompts, texts)]),
            "distinct_ratio": mean([distinct_ratio(t) for t in texts]),
            "response_length": mean([len(resp) for _, resp, _ in rows]),
            "examples": [{"prompt": p, "response": t} for p, t in zip(prompts[:4], texts[:4])],
        }
        if rm_dir.is_dir():
            r["rm_score"] = mean(rm_scores(rm_dir, rows))
        result[policy] = r
    return result


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--task", choices=sorted(TASKS), required=True)
    ap.add_argument("--task_dir", type=Path, required=True)
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    result = evaluate(a.run_dir, a.task, a.task_dir, a.n, a.seed)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    sys.exit(main() and 0)
