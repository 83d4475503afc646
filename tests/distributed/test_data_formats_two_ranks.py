"""Tier 2: every data format through the real launcher on two ranks, in one run of the pipeline.

SFT trains on chat `messages` (rendered with a chat template) and evaluates on prompt/response
rows; the reward model and PPO read their shares (`--data.data_split 2,4,4`) of two datasets mixed
1:3 — prompt/chosen/rejected rows and HH dialogues; PPO evaluates on a prompt-only file. The text
comes from the default task (its word-level vocabulary), rewritten into each layout.
"""

import json

import pytest
from launch_util import TINY, launch, summary

TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}{% endif %}"
)


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from transformers import AutoTokenizer

    from pipeline import default_task

    root = tmp_path_factory.mktemp("formats")
    src = root / "src"
    default_task.generate(src, 5, 200, 400, 16, 40, 0.0)
    default_task.build_tokenizer(root / "tok")
    tok = AutoTokenizer.from_pretrained(str(root / "tok"))
    tok.chat_template = TEMPLATE
    tok.save_pretrained(str(root / "tok"))
    read = lambda name: [json.loads(x) for x in (src / name).read_text().splitlines()]  # noqa: E731
    pairs = read("pairs.jsonl")
    return {
        "tokenizer": str(root / "tok"),
        "messages": _jsonl(
            root / "chat.jsonl",
            [
                {
                    "messages": [
                        {"role": "user", "content": r["prompt"]},
                        {"role": "assistant", "content": r["response"]},
                    ]
                }
                for r in read("sft.jsonl")
            ],
        ),
        "prompt_response": _jsonl(root / "sft_eval.jsonl", read("sft_eval.jsonl")),
        "prompt_chosen_rejected": _jsonl(root / "rm_static.jsonl", pairs[:200]),
        "hh": _jsonl(
            root / "hh.jsonl",
            [
                {
                    side: f"\n\nHuman: {r['prompt']}\n\nAssistant: {r[side]}"
                    for side in ("chosen", "rejected")
                }
                for r in pairs[200:]
            ],
        ),
        "prompt": _jsonl(root / "prompts_eval.jsonl", read("prompts_eval.jsonl")),
    }


def test_every_format_and_a_mix_on_two_ranks(files, tmp_path):
    out = tmp_path / "run"
    f = files
    proc = launch(
        "ppo.py",
        "--config",
        str(TINY),
        "--output_dir",
        str(out),
        "--data.tokenizer_path",
        f["tokenizer"],
        "--data.sft_data_path",
        f["messages"],
        "--data.sft_eval_data_path",
        f["prompt_response"],
        "--data.data_path",
        f["prompt_chosen_rejected"],
        f["hh"],
        "--data.data_weights",
        "1",
        "3",
        "--data.data_split",
        "2,4,4",
        "--data.eval_prompt_data_path",
        f["prompt"],
        "--sft.max_steps",
        "3",
        "--reward.max_steps",
        "3",
        "--ppo.num_iterations",
        "1",
        num_gpus=2,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world size 2," in proc.stdout
    log = proc.stdout
    # SFT: 200 chat rows; the explicit prompt/response eval file (40 rows).
    assert (
        f"stage sft: 200 training rows from {f['messages']}; "
        f"40 eval rows from {f['prompt_response']}" in log
    )
    # Reward model: 2/5 of each 200-row dataset = 80 + 80, 4 + 4 held out, the 152 left mixed 1:3.
    mix = f"{f['prompt_chosen_rejected']} + {f['hh']} (share 2 of data_split 2,4,4"
    assert (
        f"stage reward: 152 training rows from {mix}; without its held-out eval slice); "
        f"8 eval rows from {mix}; held-out eval slice)" in log
    )
    # PPO: the last 2/5 of both datasets (no hold-out: the eval prompts have their own file).
    assert (
        f"stage ppo: 160 training prompts from {f['prompt_chosen_rejected']} + {f['hh']} "
        f"(share 3 of data_split 2,4,4); 40 eval prompts from {f['prompt']}"
    ) in log
    s = summary(out)
    assert s["sft"]["steps"] == 3 and s["reward"]["steps"] == 3
    accuracy = s["reward"]["eval_accuracy"]  # of the last evaluation, on the 8 held-out pairs
    rows = [json.loads(x) for x in (out / "reward" / "metrics.jsonl").read_text().splitlines()]
    assert accuracy == [r for r in rows if "eval/accuracy" in r][-1]["eval/accuracy"]
    assert accuracy * 8 == round(accuracy * 8)
    assert (
        "gold_score_final" not in s["ppo"]
    )  # the gold scorer is for the default task's prompts only
    from transformers import AutoTokenizer

    # the chat template travels with the SFT model (the reward and PPO stages read its tokenizer)
    assert AutoTokenizer.from_pretrained(str(out / "sft" / "model")).chat_template == TEMPLATE
