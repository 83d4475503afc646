"""Run under `deepspeed --num_gpus 2`: a LoRA actor and a LoRA critic as ZeRO-3 training engines.
Checks that the adapters are partitioned and are all the optimizer holds, that the hybrid engine's
copy holds the merged weights and computes the engine's logits, that the merged export loads with
plain transformers and computes them too, and that a checkpoint resumes exactly on the same ranks.
Writes <out>.rank<N> as JSON. Used by test_lora_two_ranks.py.

`lora_probe.py OUT WORK [PLAN.json]`: with a plan, its pipelines run afterwards in the same
launch, as pipelines_probe.py runs them (to save a launcher and rank start-up)."""

import json
import sys
from pathlib import Path

import pipelines_probe  # next to this script
import torch

from pipeline import default_task
from pipeline.distributed import collectives, ds_config, engines, zero3
from pipeline.checkpoint import Checkpointer
from pipeline.config import REPO_ROOT
from pipeline.generation import HybridEngine
from pipeline.models import (
    add_lora,
    load_causal_lm,
    load_scalar_model,
    load_tokenizer,
    lora_merge,
    token_values,
)


def batch(step: int, d: collectives.Dist) -> torch.Tensor:
    rows = torch.randint(3, 40, (4, 12), generator=torch.Generator().manual_seed(step))
    return rows[d.rank :: d.world_size].to(collectives.device())


def build(folder: Path, ds: dict) -> tuple:
    collectives.seed_everything(0)
    with engines.zero3_construction(ds):
        actor = load_causal_lm(str(folder))
        critic = load_scalar_model(str(folder))
    actor = add_lora(actor, 4, 8.0, ["all-linear"], "actor")
    critic = add_lora(critic, 4, 8.0, ["all-linear"], "critic")
    return (
        engines.train_engine(actor, ds, 1e-2, 0.0, "constant", 0, 100),
        engines.train_engine(critic, ds, 1e-2, 0.0, "constant", 0, 100),
    )


def train_step(actor, critic, step: int, d: collectives.Dist) -> None:
    ids = batch(step, d)
    actor.backward(actor(input_ids=ids, labels=ids).loss)
    actor.step()
    values = token_values(critic, ids, torch.ones_like(ids))
    critic.backward(((values - 1.0) ** 2).mean())
    critic.step()


def structure(engine) -> dict:
    """Every parameter partitioned by ZeRO-3; the optimizer holds exactly the trainable ones."""
    named = list(engine.module.named_parameters())
    trainable = {id(p) for _, p in named if p.requires_grad}
    in_optimizer = {id(p) for group in engine.optimizer.fp16_groups for p in group}
    return {
        "all_partitioned": all(
            hasattr(p, "ds_id") and p.ds_tensor.numel() < p.ds_numel for _, p in named
        ),
        "adapters": sum(1 for n, _ in named if ".lora_" in n),
        "optimizer_is_trainable": in_optimizer == trainable,
        "trainable_names": sorted(n for n, p in named if p.requires_grad),
        "trained": engines.num_params(engine.module, trainable=True),
        "total": engines.num_params(engine.module),
    }


def full(engine, d: collectives.Dist) -> dict:
    return collectives.broadcast_object(zero3.full_state_dict(engine.module, d.rank))


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def main() -> None:
    out, work, *plan = [Path(a) for a in sys.argv[1:] if not a.startswith("--local_rank")]
    d = collectives.init_distributed()
    model_dir = work / "model"
    if d.is_main:
        default_task.build_tokenizer(model_dir)
        config = default_task.model_config(len(default_task.vocabulary()), 32, 2, 2, 64, 64)
        (model_dir / "config.json").write_text(json.dumps(config))
    collectives.barrier()
    tok = load_tokenizer(str(model_dir))
    ds = ds_config.load_ds_config(
        REPO_ROOT / "ds_configs" / "zero3_train.json",
        train_micro_batch_size_per_gpu=2,
        gradient_accumulation_steps=1,
        gradient_clipping=1.0,
    )
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition even tiny tensors
    actor, critic = build(model_dir, ds)
    report = {"actor": structure(actor), "critic": structure(critic)}
    for step in (1, 2):
        train_step(actor, critic, step, d)
    actor.eval()

    # Generation copy: merged weights, the engine's logits.
    ids = batch(9, d)
    hybrid = HybridEngine(
        actor, tok, gather_modules=3
    )  # a few units per gather: an adapted layer stays whole
    with hybrid.generation_mode() as plain, torch.no_grad():
        copy_logits = plain(input_ids=ids).logits
        copy = {n: p.detach().clone() for n, p in plain.state_dict().items()}
    with torch.no_grad():
        engine_logits = actor(input_ids=ids).logits
    saved = full(actor, d)
    merged = lora_merge(actor.module)(saved)
    report["copy_vs_merged"] = max_diff({k: copy[k] for k in merged}, merged)
    report["copy_logits_vs_engine"] = (copy_logits - engine_logits).abs().max().item()
    report["adapters_moved"] = max(saved[k].abs().max().item() for k in saved if ".lora_B." in k)

    # Export: merged, plain keys, loadable without peft.
    zero3.save_hf(actor.module, tok, work / "export", d.rank, merge=lora_merge(actor.module))
    from transformers import AutoModelForCausalLM

    with engines.plain_construction():  # (a live ZeRO-3 config would partition it)
        exported, info = AutoModelForCausalLM.from_pretrained(
            work / "export", output_loading_info=True
        )
    with torch.no_grad():
        report["export_logits_vs_engine"] = (
            (exported.eval()(input_ids=ids).logits - engine_logits).abs().max().item()
        )
    report["export_missing_or_unexpected"] = sorted(info["missing_keys"]) + sorted(
        info["unexpected_keys"]
    )
    report["export_has_lora_keys"] = any(
        "lora" in k or "base_layer" in k for k in exported.state_dict()
    )

    # Checkpoint after step 2, resume into fresh engines on the same ranks, take step 3 on both.
    critic_saved = full(critic, d)
    ckpt = Checkpointer(work / "stage", d, keep_last=1, identity={"probe": "lora"})
    ckpt.save(2, {"actor": actor, "critic": critic}, {"step": 2})
    actor.train()
    train_step(actor, critic, 3, d)
    after = {"actor": full(actor, d), "critic": full(critic, d)}
    actor2, critic2 = build(model_dir, ds)
    resume = ckpt.find()
    ckpt.load(resume, {"actor": actor2, "critic": critic2})
    report["resumed_vs_saved"] = max(
        max_diff(full(actor2, d), saved), max_diff(full(critic2, d), critic_saved)
    )
    train_step(actor2, critic2, 3, d)
    report["step3_resumed_vs_uninterrupted"] = max(
        max_diff(full(actor2, d), after["actor"]), max_diff(full(critic2, d), after["critic"])
    )
    report["step3_moved"] = max_diff(after["actor"], saved)
    Path(f"{out}.rank{d.rank}").write_text(json.dumps(report))
    if plan:
        pipelines_probe.run_plan(plan[0], d.rank)


if __name__ == "__main__":
    main()
