"""Run under `deepspeed --num_gpus 2`: the hybrid engine against naive ZeRO-3 generation, its
memory, and many mode switches with training steps in between. Writes <out>.rank<N> as JSON."""
import json
import sys
from pathlib import Path

import torch

from pipeline import data, default_task
from pipeline.distributed import collectives, ds_config, engines, zero3
from pipeline.config import REPO_ROOT
from pipeline.generation import HybridEngine, SamplingParams, naive_generate, response_mask
from pipeline.models import causal_lm_loss, load_causal_lm, load_tokenizer


def rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096


def materialised_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.device.type != "meta")


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # added by the launcher
    out, work = Path(args[0]), Path(args[1])
    d = collectives.init_distributed()
    if d.is_main:
        default_task.build_tokenizer(work / "model")
        config = default_task.model_config(len(default_task.vocabulary()), 128, 3, 4, 256, 64)
        (work / "model" / "config.json").write_text(json.dumps(config))
    collectives.barrier()
    tok = load_tokenizer(str(work / "model"))
    ds = ds_config.load_ds_config(REPO_ROOT / "ds_configs" / "zero3_train.json",
                                train_micro_batch_size_per_gpu=4, gradient_accumulation_steps=1,
                                gradient_clipping=1.0)
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    collectives.seed_everything(0)
    with engines.zero3_construction(ds):
        model = load_causal_lm(str(work / "model"))
    engine = engines.train_engine(model, ds, 1e-2, 0.0, "constant", 0, 100)
    engine.eval()
    hybrid = HybridEngine(engine, tok, gather_modules=2)
    prompts = ["ana asks for a review of the pizza .", "please review the sofa for leo .",
               "grace wants to know about the camera .", "hugo asks for a review of the book ."]
    mine = prompts[d.rank * 2:(d.rank + 1) * 2] + ["emma wants to know about the car ."]  # 3 rows, ragged
    batch = data.collate_prompts(data.prompt_examples([{"prompt": p} for p in mine], tok, 24), tok.pad_token_id)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    greedy = SamplingParams(max_new_tokens=12, do_sample=False)
    report = {}

    naive = naive_generate(engine, tok, ids, mask, greedy)
    before = rss_bytes()
    with hybrid.generation_mode():
        inside = rss_bytes()
        inside_bytes = materialised_bytes(hybrid.model)
        calls = []
        real_all_reduce = torch.distributed.all_reduce
        torch.distributed.all_reduce = lambda *a, **k: calls.append(1) or real_all_reduce(*a, **k)
        try:  # count collectives while decoding: each rank must decode alone
            fast = hybrid.generate(ids, mask, greedy)
        finally:
            torch.distributed.all_reduce = real_all_reduce
        report["collectives_while_decoding"] = len(calls)
        sampled = hybrid.generate(ids, mask, SamplingParams(max_new_tokens=10, min_new_tokens=6,
                                                            num_samples=2, temperature=1.5))
    after = rss_bytes()
    report["greedy_equal"] = torch.equal(naive, fast)
    report["greedy_shape"] = list(fast.shape)
    report["rss"] = {"before": before, "inside": inside, "after": after}
    report["materialised_bytes"] = {"inside": inside_bytes, "after": materialised_bytes(hybrid.model),
                                    "full_model": sum(p.ds_numel * 4 for p in engine.module.parameters())}
    resp = sampled[:, ids.shape[1]:]
    lengths = response_mask(resp, tok.eos_token_id).sum(1)
    report["samples_shape"] = list(sampled.shape)
    report["samples_min_length"] = int(lengths.min())

    # Many switches: generation mode, then a training step, and the copy must follow the engine.
    train = data.sft_examples([{"prompt": p, "response": "the item is amazing ."} for p in prompts], tok, 24, 24)
    tb = data.collate_sft(train[d.rank * 2:(d.rank + 1) * 2], tok.pad_token_id)
    rss_cycles, drift, changed = [], [], []
    previous = None
    for _ in range(15):
        with hybrid.generation_mode():
            hybrid.generate(ids, mask, SamplingParams(max_new_tokens=8))
            copy = {n: p.detach().clone() for n, p in hybrid.model.named_parameters()}
        full = zero3.full_state_dict(engine.module, d.rank)
        full = collectives.broadcast_object(full)
        drift.append(max((copy[n] - full[n]).abs().max().item() for n in copy))
        if previous is not None:
            changed.append(max((copy[n] - previous[n]).abs().max().item() for n in copy))
        previous = copy
        engine.train()
        loss, n = causal_lm_loss(engine, tb["input_ids"], tb["attention_mask"], tb["labels"])
        engine.backward(loss / n)
        engine.step()
        engine.eval()
        rss_cycles.append(rss_bytes())
    report["drift"] = drift
    report["changed"] = changed
    report["rss_cycles"] = rss_cycles
    Path(f"{out}.rank{d.rank}").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
