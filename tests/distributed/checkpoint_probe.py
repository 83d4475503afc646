"""Run under `deepspeed`: `save` (2 ranks) trains a tiny ZeRO-3 engine 3 steps, checkpoints it with
the Checkpointer, then takes step 4 and writes the full weights before and after it; `load` (any
rank count) resumes from that checkpoint, writes the loaded weights (loaded_world<N>.pt), takes
the same step 4 on the same global batch and writes the result (and load_report_world<N>.json);
`save+load` does both in one launch, the load into a fresh engine, Checkpointer and EMA built as
a new launch would build them (saves a launcher and rank start-up). Used by
test_checkpoint_ranks.py.

An EMA of the weights (engines.ShardEMA, on the ZeRO-3 shards) follows every step; `save` also keeps
the same EMA by hand on the full weights gathered after each step, and both modes write the EMA
gathered from the shards (saved per rank in the checkpoint, re-cut on another rank count)."""

import json
import sys
from pathlib import Path

import torch

from pipeline import default_task
from pipeline.distributed import collectives, ds_config, engines, zero3
from pipeline.checkpoint import Checkpointer
from pipeline.models import load_causal_lm

GLOBAL_BATCH = 4
EMA_BETA = 0.5


def batch(step: int, d: collectives.Dist) -> torch.Tensor:
    g = torch.Generator().manual_seed(step)
    rows = torch.randint(3, 40, (GLOBAL_BATCH, 12), generator=g)
    return rows[d.rank :: d.world_size]  # this rank's share of the global batch


def main() -> None:
    modes, folder = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    d = collectives.init_distributed()
    for mode in modes.split("+"):
        run(mode, Path(folder), d)


def run(mode: str, folder: Path, d: collectives.Dist) -> None:
    assert mode in ("save", "load"), mode
    collectives.seed_everything(0)
    ckpt = Checkpointer(folder / "stage", d, keep_last=2, identity={"probe": 1})
    resume = ckpt.find() if mode == "load" else None
    ds = ds_config.load_ds_config(
        Path(__file__).parents[2] / "ds_configs" / "zero3_train.json",
        train_micro_batch_size_per_gpu=GLOBAL_BATCH // d.world_size,
        gradient_accumulation_steps=1,
        gradient_clipping=1.0,
    )
    if resume is not None and resume.universal:
        ds = ds_config.universal_loading(ds)
    model_dir = folder / "model"
    if d.is_main and not model_dir.is_dir():
        model_dir.mkdir(parents=True)
        config = default_task.model_config(len(default_task.vocabulary()), 32, 2, 2, 64, 64)
        (model_dir / "config.json").write_text(json.dumps(config))
    collectives.barrier()
    with engines.zero3_construction(ds):
        model = load_causal_lm(str(model_dir), False)
    engine = engines.train_engine(model, ds, 1e-2, 0.1, "cosine", 2, 20)
    ema = engines.ShardEMA(engine.module, EMA_BETA)
    hand = zero3.full_state_dict(engine.module, d.rank)  # rank 0: the EMA on full weights

    def train_step(step: int) -> None:
        ids = batch(step, d)
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        ema.update()

    def dump(name: str, ema_of=None) -> None:  # the weights, or those of an EMA (collective)
        state = zero3.full_state_dict(engine.module, d.rank, ema_of)
        if d.is_main:
            torch.save(state, folder / f"{name}.pt")

    if mode == "save":
        for step in range(1, 4):
            train_step(step)
            full = zero3.full_state_dict(engine.module, d.rank)
            if d.is_main:
                hand = {k: EMA_BETA * hand[k] + (1 - EMA_BETA) * full[k] for k in hand}
        ckpt.save(
            3, {"model": engine}, {"step": 3}, {"note": "rank-local", "ema": ema.state_dict()}
        )
        dump("saved")
        if d.is_main:
            torch.save(hand, folder / "ema_hand.pt")
        dump("ema_saved", ema)
        train_step(4)
        dump("after_save_world")
    else:
        assert resume is not None and resume.step == 3, resume
        local = ckpt.load(resume, {"model": engine})
        if local is not None:
            ema.load_state_dict(local["ema"])
        else:
            ema.load_resharded([old["ema"] for old in ckpt.every_local(resume)])
        dump(f"loaded_world{d.world_size}")
        dump(f"ema_loaded_world{d.world_size}", ema)
        if d.is_main:
            (folder / f"load_report_world{d.world_size}.json").write_text(
                json.dumps(
                    {
                        "universal": resume.universal,
                        "saved_by": resume.world_size,
                        "local": local and {"note": local["note"]},
                        "lr": engine.get_lr()[0],
                        "global_steps": engine.global_steps,
                    }
                )
            )
        train_step(4)
        dump(f"after_world{d.world_size}")


if __name__ == "__main__":
    main()
