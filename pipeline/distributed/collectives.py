"""The process group, its accelerator, and the collectives every stage uses.

Joining the group (`init_distributed`, `Dist`), the current device, seeding and the accelerator's
random state, barriers, sums, object broadcasts and gathers, and the statistics over every rank's
rollout (global means and whitening). Devices come from DeepSpeed's accelerator abstraction, so the
same code runs on CPU (gloo) and on GPUs (nccl). Engines and ZeRO-3 gathers are not here
(engines.py, zero3.py).

Each rank reduces its own tensor to a few sums built on that tensor's device (`x.new_tensor`,
reductions of `x`), and `all_reduce_sum` adds them up on `device()`. A scalar built on the CPU and
stacked with a device tensor passes every CPU test and crashes on a GPU (issue #14);
tests/unit/test_device_placement.py keeps it from coming back.
"""

from __future__ import annotations

import atexit
import datetime
import gc
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path

import deepspeed
import numpy as np
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator

from pipeline.config import Config
from pipeline.errors import UserError


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(timeout_minutes: float = Config.dist_timeout_minutes) -> Dist:
    """Join (or create) the process group; one thread per core share for each local rank.

    `timeout_minutes` bounds every collective (option dist_timeout_minutes; DeepSpeed's default is
    10 minutes, shorter than what rank 0 alone may do while the others wait): a rank waiting longer
    (a dead node, a hung rank) fails instead of hanging until the job's time limit.
    """
    launched = "WORLD_SIZE" in os.environ
    for key, default in (
        ("RANK", "0"),
        ("LOCAL_RANK", "0"),
        ("WORLD_SIZE", "1"),
        ("MASTER_ADDR", "127.0.0.1"),
    ):
        os.environ.setdefault(key, default)
    if not launched:
        check_slurm_world_size(os.environ, 1)
    if "MASTER_PORT" not in os.environ:  # a single process started without a launcher
        os.environ["MASTER_PORT"] = str(29500 + os.getpid() % 1000)
    if not dist.is_initialized():
        deepspeed.init_distributed(
            dist_backend=get_accelerator().communication_backend_name(),
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    d = Dist(
        dist.get_rank(),
        dist.get_world_size(),
        int(os.environ["LOCAL_RANK"]),
        int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1"))),
    )
    # The cores this process may use (a SLURM cpuset or `taskset` narrows them), shared by local
    # ranks.
    cores = (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    )
    torch.set_num_threads(max(1, cores // d.local_world_size))
    get_accelerator().set_device(d.local_rank)
    atexit.register(_remove_shm_buffer, d.rank)
    atexit.register(shutdown)  # runs first (atexit is last-in, first-out)
    return d


def shutdown() -> None:
    """Leave the process group (every group DeepSpeed made too) while the interpreter is alive.

    A gloo group left to the interpreter's teardown can abort the process after a run that
    succeeded (SIGABRT, "terminate called without an active exception": its worker threads still
    hold tensors; pytorch/pytorch#190489): one rank of a two-rank CI probe exited -6 that way. NCCL
    asks for the same call on a normal exit. Registered at exit by `init_distributed`; a no-op once
    the group is gone."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def check_slurm_world_size(env, world_size: int) -> None:
    """Refuse a world of `world_size` ranks inside a SLURM step that has more tasks: a plain
    `srun python launch/ppo.py` would otherwise start one independent single-rank run per task,
    all writing the same output folder."""
    tasks = env.get(
        "SLURM_STEP_NUM_TASKS", ""
    )  # set by srun for its step (not in the batch script itself)
    if not tasks.isdigit() or int(tasks) <= world_size:
        return
    raise UserError(
        f"this process sees a world size of {world_size}, but SLURM runs it as task "
        f"{env.get('SLURM_PROCID', '?')} of {tasks} (SLURM_STEP_NUM_TASKS): started "
        f"without a distributed launcher, each task would train alone on the same output folder. "
        f"Submit launch/slurm/ppo.sbatch (or sft/reward.sbatch), which starts DeepSpeed's launcher "
        f"on every node, or run a single task (srun --ntasks=1)."
    )


def _remove_shm_buffer(rank: int) -> None:
    """DeepSpeed's CPU shared-memory all-reduce creates
    /dev/shm/deepspeed_allreduce_buffer_..._<rank> (about 70 MB of RAM) and never unlinks it, so
    every run would leave one per rank behind. Other ranks keep their mapping; only the name
    goes."""
    port = os.environ.get("MASTER_PORT", "")
    for f in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_{rank}"):
        f.unlink(missing_ok=True)


def device() -> torch.device:
    return torch.device(get_accelerator().current_device_name())


def free_memory() -> None:
    """Free what a finished stage left: DeepSpeed engines hold reference cycles (hooks, optimizer
    and engine point at each other), so without a full collection the previous stage's models,
    optimizer states and (on a GPU) device memory stay allocated while the next stage builds."""
    gc.collect()
    get_accelerator().empty_cache()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    get_accelerator().manual_seed_all(seed)


def accelerator_rng_state():
    return get_accelerator().get_rng_state()


def set_accelerator_rng_state(state) -> None:
    get_accelerator().set_rng_state(state)


# ---------------------------------------------------------------- collectives
def barrier() -> None:
    dist.barrier()


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (returns a new tensor)."""
    x = x.detach().clone().to(device())
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def finite_on_every_rank(*tensors: torch.Tensor) -> bool:
    """True when every tensor is finite on every rank (collective: every rank calls it)."""
    bad = ~torch.stack([torch.isfinite(t).all() for t in tensors]).all()
    return all_reduce_sum(bad.float()).item() == 0


def broadcast_object(obj, src: int = 0):
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


# ---------------------------------------------------------------- statistics over every rank's rows
def mean_sums(x: torch.Tensor) -> torch.Tensor:
    """(2,) float64 on x's device: the sum of `x` and its element count."""
    return torch.stack([x.sum().double(), x.new_tensor(float(x.numel()), dtype=torch.float64)])


def global_mean(x: torch.Tensor) -> float:
    """Mean of `x` (any shape) over the elements of every rank. Collective."""
    s = all_reduce_sum(mean_sums(x))
    return (s[0] / s[1].clamp(min=1)).item()


def masked_global_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean of `x` over the masked entries of every rank (each weighs the same). Collective."""
    m = mask.to(x.dtype)
    total, n = all_reduce_sum(torch.stack([(x * m).sum(), m.sum()]).double()).tolist()
    return total / max(n, 1.0)


def whiten_sums(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(3,) float64 on x's device: masked sum, masked sum of squares, mask count."""
    m = mask.float()
    return torch.stack([(x * m).sum(), (x * x * m).sum(), m.sum()]).double()


def global_whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`x` whitened with the mean and (unbiased) variance of its masked entries on every rank;
    zero where `mask` is 0. Same shape and device as `x`. Collective."""
    total, total_sq, n = all_reduce_sum(whiten_sums(x, mask)).tolist()
    mean = total / max(n, 1)
    var = max(total_sq / max(n, 1) - mean * mean, 0.0) * n / max(n - 1, 1)
    return ((x - mean) / math.sqrt(var + 1e-8)) * mask.float()
