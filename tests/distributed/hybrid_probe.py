"""Run under `deepspeed --num_gpus 2`: the hybrid engine against naive ZeRO-3 generation, its
memory, and many mode switches with training steps in between. Writes <out>.rank<N> as JSON."""

import collections
import contextlib
import json
import sys
from pathlib import Path

import deepspeed.comm
import torch
import torch.distributed

from pipeline import data, default_task
from pipeline.distributed import collectives, ds_config, engines, zero3
from pipeline.config import REPO_ROOT
from pipeline.generation import HybridEngine, SamplingParams, naive_generate, response_mask
from pipeline.models import causal_lm_loss, load_causal_lm, load_tokenizer


def rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096


def materialised_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.device.type != "meta")


# Every collective a decode could reach, at three layers: the Python API of torch.distributed and
# of deepspeed.comm (module functions and its backend object, which binds some torch functions
# at start-up), and the methods of torch's ProcessGroup that every torch collective ends in.
TORCH_COLLECTIVES = (
    "all_reduce",
    "all_reduce_coalesced",
    "all_gather",
    "all_gather_into_tensor",
    "_all_gather_base",
    "all_gather_coalesced",
    "all_gather_object",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "_reduce_scatter_base",
    "broadcast",
    "broadcast_object_list",
    "reduce",
    "all_to_all",
    "all_to_all_single",
    "gather",
    "gather_object",
    "scatter",
    "scatter_object_list",
    "barrier",
    "monitored_barrier",
    "send",
    "recv",
    "isend",
    "irecv",
    "batch_isend_irecv",
)
DS_COLLECTIVES = (
    "all_reduce",
    "inference_all_reduce",
    "all_reduce_coalesced",
    "all_gather",
    "all_gather_into_tensor",
    "allgather_fn",
    "all_gather_coalesced",
    "all_gather_object",
    "all_gather_base",
    "reduce_scatter",
    "reduce_scatter_fn",
    "reduce_scatter_tensor",
    "broadcast",
    "broadcast_object_list",
    "reduce",
    "all_to_all",
    "all_to_all_single",
    "gather",
    "scatter",
    "barrier",
    "monitored_barrier",
    "send",
    "recv",
    "isend",
    "irecv",
    "batch_isend_irecv",
    "all_gather_function",
    "reduce_scatter_function",
)
PROCESS_GROUP_COLLECTIVES = (
    "allreduce",
    "allreduce_coalesced",
    "allgather",
    "allgather_coalesced",
    "allgather_into_tensor_coalesced",
    "_allgather_base",
    "all_gather_single",
    "all_gather_single_coalesced",
    "reduce_scatter",
    "_reduce_scatter_base",
    "reduce_scatter_single",
    "reduce_scatter_single_coalesced",
    "reduce_scatter_tensor_coalesced",
    "broadcast",
    "reduce",
    "alltoall",
    "alltoall_base",
    "all_to_all_single",
    "gather",
    "scatter",
    "barrier",
    "monitored_barrier",
    "send",
    "recv",
    "recv_anysource",
)


@contextlib.contextmanager
def count_collectives():
    """Inside: a Counter of the collective calls made, keyed "layer.name" (a call that passes
    through several layers counts once in each)."""
    counts = collections.Counter()
    patched = []

    def wrap(owner, name, key, method=False):
        real = getattr(owner, name, None)
        if real is None or not callable(real):
            return
        if method:  # a method of the pybind class (getattr gives its unbound function): keep `self`

            def counting(self, *args, **kwargs):
                counts[key] += 1
                return real(self, *args, **kwargs)
        else:

            def counting(*args, **kwargs):
                counts[key] += 1
                return real(*args, **kwargs)

        own = vars(
            owner
        )  # restored as it was: the class's own descriptor, or no instance attribute
        patched.append((owner, name, own[name] if name in own else None, name in own))
        setattr(owner, name, counting)

    c10d = torch.distributed.distributed_c10d
    for name in TORCH_COLLECTIVES:
        wrap(torch.distributed, name, f"torch.{name}")
        wrap(c10d, name, f"c10d.{name}")
    for name in DS_COLLECTIVES:
        wrap(deepspeed.comm, name, f"deepspeed.comm.{name}")
        wrap(deepspeed.comm.comm, name, f"deepspeed.comm.comm.{name}")
        wrap(deepspeed.comm.comm.cdb, name, f"deepspeed.cdb.{name}")
    for name in PROCESS_GROUP_COLLECTIVES:
        wrap(torch._C._distributed_c10d.ProcessGroup, name, f"ProcessGroup.{name}", method=True)
    try:
        yield counts
    finally:
        for owner, name, raw, had in reversed(patched):
            if had:
                setattr(owner, name, raw)
            else:
                delattr(owner, name)


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
    ds = ds_config.load_ds_config(
        REPO_ROOT / "ds_configs" / "zero3_train.json",
        train_micro_batch_size_per_gpu=4,
        gradient_accumulation_steps=1,
        gradient_clipping=1.0,
    )
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    collectives.seed_everything(0)
    with engines.zero3_construction(ds):
        model = load_causal_lm(str(work / "model"))
    engine = engines.train_engine(model, ds, 1e-2, 0.0, "constant", 0, 100)
    engine.eval()
    hybrid = HybridEngine(engine, tok, gather_modules=2)
    prompts = [
        "ana asks for a review of the pizza .",
        "please review the sofa for leo .",
        "grace wants to know about the camera .",
        "hugo asks for a review of the book .",
    ]
    mine = prompts[d.rank * 2 : (d.rank + 1) * 2] + [
        "emma wants to know about the car ."
    ]  # 3 rows, ragged
    batch = data.collate_prompts(
        data.prompt_examples([{"prompt": p} for p in mine], tok, 24), tok.pad_token_id
    )
    ids, mask = batch["input_ids"], batch["attention_mask"]
    greedy = SamplingParams(max_new_tokens=12, do_sample=False)
    report = {}

    with (
        count_collectives() as counts
    ):  # the counter's positive control: ZeRO-3 gathers while decoding
        naive = naive_generate(engine, tok, ids, mask, greedy)
    report["naive_collectives"] = dict(counts)
    before = rss_bytes()
    with (
        count_collectives() as around,
        hybrid.generation_mode(),
    ):  # entering gathers the weights, by design
        inside = rss_bytes()
        inside_bytes = materialised_bytes(hybrid.model)
        with count_collectives() as counts:  # decoding: each rank alone, no collective at all
            fast = hybrid.generate(ids, mask, greedy)
        report["collectives_while_decoding"] = dict(counts)
        with count_collectives() as counts:
            sampled = hybrid.generate(
                ids,
                mask,
                SamplingParams(max_new_tokens=10, min_new_tokens=6, num_samples=2, temperature=1.5),
            )
        report["collectives_while_sampling"] = dict(counts)
    report["generation_mode_collectives"] = dict(around)
    after = rss_bytes()
    report["greedy_equal"] = torch.equal(naive, fast)
    report["greedy_shape"] = list(fast.shape)
    report["rss"] = {"before": before, "inside": inside, "after": after}
    report["materialised_bytes"] = {
        "inside": inside_bytes,
        "after": materialised_bytes(hybrid.model),
        "full_model": sum(p.ds_numel * 4 for p in engine.module.parameters()),
    }
    resp = sampled[:, ids.shape[1] :]
    lengths = response_mask(resp, tok.eos_token_id).sum(1)
    report["samples_shape"] = list(sampled.shape)
    report["samples_min_length"] = int(lengths.min())

    # Many switches: generation mode, then a training step, and the copy must follow the engine.
    train = data.sft_examples(
        [{"prompt": p, "response": "the item is amazing ."} for p in prompts], tok, 24, 24
    )
    tb = data.collate_sft(train[d.rank * 2 : (d.rank + 1) * 2], tok.pad_token_id)
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
