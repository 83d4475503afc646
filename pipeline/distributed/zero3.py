"""ZeRO-3 weights in full: gathers, materialisation into a plain module, Hugging Face export.

Every function here is collective: each rank holds a partition of every parameter
(`param.ds_tensor`), and the full weights exist only inside `deepspeed.zero.GatheredParameters`,
one group of submodules at a time. `zero3_partition` / `recut` reproduce ZeRO-3's partition
layout (for re-cutting per-rank shards saved on another rank count). Building engines is
engines.py.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING

import deepspeed
import torch

from pipeline.distributed.collectives import barrier

if TYPE_CHECKING:
    from pipeline.distributed.engines import ShardEMA
    from pipeline.models import LoraMerge


def full_state_dict(module: torch.nn.Module, rank: int, ema: ShardEMA | None = None) -> dict | None:
    """The whole state dict on rank 0 (None elsewhere), gathered one submodule at a time; with
    `ema`, the parameters are the EMA's (gathered from its shards) instead of the module's."""
    keys = set(module.state_dict().keys())  # persistent entries only (no rotary caches)
    state = {}
    for prefix, sub in module.named_modules():
        params = list(sub.named_parameters(recurse=False))
        own = params + list(sub.named_buffers(recurse=False))
        param_names = {name for name, _ in params}
        if not own:
            continue
        gather = (
            contextlib.nullcontext()
            if ema
            else deepspeed.zero.GatheredParameters([p for _, p in params])
        )
        with gather:
            values = [
                (name, ema.gathered(t) if ema and name in param_names else t) for name, t in own
            ]
            if rank == 0:
                for name, t in values:
                    key = f"{prefix}.{name}" if prefix else name
                    if key in keys:
                        state[key] = t.detach().cpu().clone()
    return state if rank == 0 else None


def save_hf(
    module: torch.nn.Module,
    tokenizer,
    folder: Path,
    rank: int,
    *,
    ema: ShardEMA | None = None,
    merge: LoraMerge | None = None,
) -> None:
    """Save as a plain Hugging Face folder (config, safetensors, tokenizer), atomically; with `ema`,
    the EMA's weights instead of the module's. With `merge`, LoRA adapters are merged into the
    weights: the folder has the base architecture's keys.

    Written to `<folder>.partial` and renamed, so a crash never leaves a half-written model
    where a finished one was.
    """
    state = full_state_dict(module, rank, ema)
    if rank == 0:
        import shutil

        if merge is not None:
            state = merge(state)

        tmp = folder.with_name(folder.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        module.save_pretrained(str(tmp), state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    barrier()


def copy_gathered(
    src: torch.nn.Module, dst: torch.nn.Module, group: int = 0, merge: LoraMerge | None = None
) -> None:
    """Copy the full weights of a ZeRO-3 module into a plain module of the same architecture.

    Gathers `group` submodules at a time (0: the whole module in one gather), so the transient
    extra memory is one group's full weights. With `merge`, LoRA adapters are folded into the
    weights they adapt (an adapted layer's base weight, A and B are gathered together).
    """
    targets = dict(dst.named_parameters(remove_duplicate=False))
    units: dict[str, list] = {}  # unit -> [(full name, parameter)], in module order
    for prefix, sub in src.named_modules():
        for name, p in sub.named_parameters(recurse=False):
            unit = merge.unit(prefix) if merge else prefix
            units.setdefault(unit, []).append((f"{prefix}.{name}" if prefix else name, p))
    owners = list(units.values())
    step = group if group > 0 else len(owners)
    for i in range(0, len(owners), step):
        chunk = [pair for own in owners[i : i + step] for pair in own]
        with deepspeed.zero.GatheredParameters([p for _, p in chunk]):
            state = {name: p.data for name, p in chunk}
            for name, t in (merge(state) if merge else state).items():
                targets[name].data.copy_(t)


# ---------------------------------------------------------------- ZeRO-3 partition layout
def zero3_partition(flat: torch.Tensor, world: int, rank: int) -> torch.Tensor:
    """Partition `rank` of a flattened parameter as ZeRO-3 lays it out (`param.ds_tensor`):
    ceil(numel / world) elements from rank x that size, zero-padded at the end of the last ranks
    (deepspeed.runtime.zero.partition_parameters, `_partition_param`)."""
    size = -(-flat.numel() // world)
    out = flat.new_zeros(size)
    piece = flat[rank * size : (rank + 1) * size]
    out[: piece.numel()] = piece
    return out


def recut(shards: list[torch.Tensor], numel: int, world: int, rank: int) -> torch.Tensor:
    """Partition `rank` of `world` of the parameter (`numel` elements) whose partitions on another
    rank count were `shards` (in rank order)."""
    return zero3_partition(torch.cat([s.flatten() for s in shards])[:numel], world, rank)
