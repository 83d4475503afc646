"""Everything DeepSpeed: process group, ZeRO-3 engines, model construction under ZeRO-3, gathers.

This is the only module that imports `deepspeed`. Devices come from DeepSpeed's accelerator
abstraction, so the same code runs on CPU (gloo) and on GPUs (nccl).
"""
from __future__ import annotations

import atexit
import contextlib
import copy
import dataclasses
import datetime
import json
import logging
import os
import random
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import deepspeed
import numpy as np
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator

from pipeline import ppo_math
from pipeline.config import AUTO, LR_SCHEDULERS, Config
from pipeline.errors import UserError

if TYPE_CHECKING:
    from pipeline.models import LoraMerge

log = logging.getLogger(__name__)
_HF_DS_CONFIG = None  # transformers reads ZeRO-3 settings through a live HfDeepSpeedConfig


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
    for key, default in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                         ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, default)
    if not launched:
        check_slurm_world_size(os.environ, 1)
    if "MASTER_PORT" not in os.environ:  # a single process started without a launcher
        os.environ["MASTER_PORT"] = str(29500 + os.getpid() % 1000)
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(),
                                   timeout=datetime.timedelta(minutes=timeout_minutes))
    d = Dist(dist.get_rank(), dist.get_world_size(), int(os.environ["LOCAL_RANK"]),
             int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    # The cores this process may use (a SLURM cpuset or `taskset` narrows them), shared by local ranks.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(max(1, cores // d.local_world_size))
    get_accelerator().set_device(d.local_rank)
    atexit.register(_remove_shm_buffer, d.rank)
    return d


def check_slurm_world_size(env, world_size: int) -> None:
    """Refuse a world of `world_size` ranks inside a SLURM step that has more tasks: a plain
    `srun python launch/ppo.py` would otherwise start one independent single-rank run per task,
    all writing the same output folder."""
    tasks = env.get("SLURM_STEP_NUM_TASKS", "")  # set by srun for its step (not in the batch script itself)
    if not tasks.isdigit() or int(tasks) <= world_size:
        return
    raise UserError(f"this process sees a world size of {world_size}, but SLURM runs it as task "
                    f"{env.get('SLURM_PROCID', '?')} of {tasks} (SLURM_STEP_NUM_TASKS): started "
                    f"without a distributed launcher, each task would train alone on the same output folder. "
                    f"Submit launch/slurm/ppo.sbatch (or sft/reward.sbatch), which starts DeepSpeed's launcher "
                    f"on every node, or run a single task (srun --ntasks=1).")


def _remove_shm_buffer(rank: int) -> None:
    """DeepSpeed's CPU shared-memory all-reduce creates /dev/shm/deepspeed_allreduce_buffer_..._<rank>
    (about 70 MB of RAM) and never unlinks it, so every run would leave one per rank behind.
    Other ranks keep their mapping; only the name goes."""
    port = os.environ.get("MASTER_PORT", "")
    for f in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_{rank}"):
        f.unlink(missing_ok=True)


def device() -> torch.device:
    return torch.device(get_accelerator().current_device_name())


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    get_accelerator().manual_seed_all(seed)


def barrier() -> None:
    dist.barrier()


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (returns a new tensor)."""
    x = x.detach().clone().to(device())
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def broadcast_object(obj, src: int = 0):
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def accelerator_rng_state():
    return get_accelerator().get_rng_state()


def set_accelerator_rng_state(state) -> None:
    get_accelerator().set_rng_state(state)


# ---------------------------------------------------------------- DeepSpeed configs
_BATCH_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping")


def load_ds_config(path: Path, dtype: str = "fp32", **fill) -> dict:
    """Read a DeepSpeed JSON and fill in batch sizes and precision (`model.dtype`) from the run config.

    Batch sizes and precision live in the run config; a DS file that sets them differently is
    refused rather than silently winning or losing.
    """
    if not path.is_file():
        raise UserError(f"DeepSpeed config {path} does not exist.")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"DeepSpeed config {path} is not valid JSON: {e}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"DeepSpeed config {path} is not UTF-8 text (byte {e.object[e.start]:#04x} "
                        f"at offset {e.start}).") from None
    if not isinstance(cfg, dict):
        raise UserError(f"DeepSpeed config {path}: the top level must be an object.")
    zero = cfg.get("zero_optimization", {})
    stage = zero.get("stage") if isinstance(zero, dict) else None
    if stage != 3:
        raise UserError(f"DeepSpeed config {path}: zero_optimization.stage must be 3 (got {stage!r}).")
    for key, owner in (("optimizer", "the run config's learning_rate and weight_decay"),
                       ("scheduler", "the run config's lr_scheduler and warmup")):
        if key in cfg:  # DeepSpeed would silently ignore it in favour of ours
            raise UserError(f"DeepSpeed config {path} sets {key!r}, which would be ignored: training "
                            f"uses AdamW with {owner}; remove {key!r} from the DeepSpeed file.")
    _refuse_hybrid_engine(cfg, path)
    for key, value in fill.items():
        if key in cfg and cfg[key] not in ("auto", value):
            raise UserError(f"DeepSpeed config {path} sets {key}={cfg[key]!r} but the run config "
                            f"gives {value!r}; remove it from the DeepSpeed file (the run config owns it).")
        cfg[key] = value
    if "train_batch_size" in cfg and cfg["train_batch_size"] != "auto":
        raise UserError(f"DeepSpeed config {path} sets train_batch_size; remove it (it is derived "
                        f"from micro batch x accumulation x ranks).")
    cfg.pop("train_batch_size", None)
    cfg.setdefault("steps_per_print", 10**9)  # we log ourselves
    _fill_precision(cfg, path, dtype)
    return cfg


def _refuse_hybrid_engine(cfg: dict, path: Path) -> None:
    """DeepSpeed's hybrid engine cannot run with DeepSpeed 0.19 and transformers 5 (issue #14)."""
    section = cfg.get("hybrid_engine", {})
    if isinstance(section, dict) and section.get("enabled", False) in (False, "auto"):
        return
    raise UserError(f"DeepSpeed config {path} enables hybrid_engine, which this pipeline refuses: with "
                    f"DeepSpeed 0.19 and transformers 5 DeepSpeed's hybrid engine does not run (its OPT "
                    f"policy skips cache-based layers so generate raises, Llama-3 rope_type=llama3 raises at "
                    f"initialisation, num_key_value_heads (GQA) is not sized, inference_tp_size > 1 does not "
                    f"gather the attention mask). Generation already materialises the actor's weights "
                    f"for fast decoding on every accelerator (pipeline/generation.py); remove the "
                    f"hybrid_engine section from the DeepSpeed file or set \"enabled\": false.")


# DeepSpeed's precision sections; "bfloat16" is its older name for "bf16" ("bf16" wins if both).
_PRECISION_SECTIONS = {"bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16"}


def _fill_precision(cfg: dict, path: Path, dtype: str) -> None:
    """Enable exactly the precision section `dtype` names; refuse a file that enables another."""
    for key, precision in _PRECISION_SECTIONS.items():
        section = cfg.get(key, {})
        if not isinstance(section, dict):
            raise UserError(f"DeepSpeed config {path}: {key!r} must be an object (got {section!r}).")
        if section.get("enabled", False) not in (False, "auto") and precision != dtype:
            raise UserError(f"DeepSpeed config {path} enables {key} but the run config has "
                            f"model.dtype={dtype!r}; set the precision with --model.dtype (the run config "
                            f"owns it) and remove \"enabled\" from the file's {key!r} section.")
    cfg.pop("bfloat16", None)
    cfg["bf16"] = {**cfg.get("bf16", {}), "enabled": dtype == "bf16"}
    cfg["fp16"] = {**cfg.get("fp16", {}), "enabled": dtype == "fp16"}
    if dtype == "fp16":
        cfg["fp16"].setdefault("loss_scale", 0)  # 0: DeepSpeed's dynamic loss scaling


# ds_config / ds_inference_config "auto": one pair tuned for DeepSpeed's CPU accelerator (gloo: no
# overlap, small buckets, unpinned offload), one for GPUs (overlap, larger buckets, pinned offload).
AUTO_DS_CONFIGS = {"cpu": ("ds_configs/zero3_train.json", "ds_configs/zero3_offload_inference.json"),
                   "gpu": ("ds_configs/zero3_train_gpu.json", "ds_configs/zero3_offload_inference_gpu.json")}


def auto_dtype(accelerator=None) -> str:
    """model.dtype "auto": bf16 on an accelerator other than the CPU that supports it, else fp32
    (DeepSpeed's CPU accelerator answers bf16 support, but the CPU results must stay fp32)."""
    acc = accelerator or get_accelerator()
    return "bf16" if acc.device_name() != "cpu" and acc.is_bf16_supported() else "fp32"


def resolve_auto(cfg: Config, accelerator=None) -> Config:
    """`cfg` with every "auto" (model.dtype, ds_config, ds_inference_config) replaced by the choice
    for `accelerator` (DeepSpeed's, or a stand-in answering device_name / is_bf16_supported);
    `cfg` itself when nothing is auto. A DS file the user names is used as given."""
    m = cfg.model
    if AUTO not in (m.dtype, cfg.ds_config, cfg.ds_inference_config):
        return cfg
    acc = accelerator or get_accelerator()
    train, inference = AUTO_DS_CONFIGS["cpu" if acc.device_name() == "cpu" else "gpu"]
    return dataclasses.replace(
        cfg, model=dataclasses.replace(m, dtype=auto_dtype(acc) if m.dtype == AUTO else m.dtype),
        ds_config=train if cfg.ds_config == AUTO else cfg.ds_config,
        ds_inference_config=inference if cfg.ds_inference_config == AUTO else cfg.ds_inference_config)


def check_precision(dtype: str, accelerator=None) -> None:
    """Refuse a precision this accelerator cannot train in (`accelerator`: DeepSpeed's, or a
    stand-in answering is_bf16_supported / is_fp16_supported)."""
    acc = accelerator or get_accelerator()
    supported = {"fp32": True, "bf16": bool(acc.is_bf16_supported()), "fp16": bool(acc.is_fp16_supported())}
    if supported[dtype]:
        return
    others = " or ".join(d for d in ("bf16", "fp16", "fp32") if supported[d] and d != dtype)
    raise UserError(f"option model.dtype={dtype}: the {acc.device_name()} accelerator does not support "
                    f"{dtype} (DeepSpeed's is_{dtype}_supported() is false); use --model.dtype {others}.")


# ---------------------------------------------------------------- models and engines
@contextmanager
def zero3_construction(ds_config: dict):
    """Build Hugging Face models inside this to get partitioned parameters with correct init.

    transformers partitions at construction (zero.Init) while an HfDeepSpeedConfig is alive;
    the last one stays alive for later transformers calls that ask whether ZeRO-3 is on.
    """
    from transformers.integrations import HfDeepSpeedConfig

    global _HF_DS_CONFIG
    _HF_DS_CONFIG = HfDeepSpeedConfig(copy.deepcopy(ds_config))
    yield


def train_engine(model: torch.nn.Module, ds_config: dict, learning_rate: float, weight_decay: float,
                 scheduler: str, warmup_steps: int, total_steps: int):
    """A ZeRO-3 training engine with AdamW and a transformers learning-rate schedule."""
    from transformers import get_scheduler

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and p.requires_grad]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 and p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=learning_rate, betas=(0.9, 0.95))
    assert scheduler in LR_SCHEDULERS, scheduler  # config.validate refused the others

    def lr_scheduler(wrapped_optimizer):  # built on DeepSpeed's wrapped optimizer, stepped by it
        return get_scheduler(scheduler, wrapped_optimizer, num_warmup_steps=warmup_steps,
                             num_training_steps=max(total_steps, 1))

    cfg = dict(ds_config, zero_allow_untested_optimizer=True)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=lr_scheduler,
                                      config=cfg)
    return engine


def inference_engine(model: torch.nn.Module, ds_config: dict):
    """A frozen ZeRO-3 engine (no optimizer), parameters offloaded as the DS config says."""
    model.requires_grad_(False)
    model.eval()
    engine, *_ = deepspeed.initialize(model=model, config=ds_config)
    engine.eval()
    return engine


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
        gather = contextlib.nullcontext() if ema else deepspeed.zero.GatheredParameters([p for _, p in params])
        with gather:
            values = [(name, ema.gathered(t) if ema and name in param_names else t) for name, t in own]
            if rank == 0:
                for name, t in values:
                    key = f"{prefix}.{name}" if prefix else name
                    if key in keys:
                        state[key] = t.detach().cpu().clone()
    return state if rank == 0 else None


def save_hf(module: torch.nn.Module, tokenizer, folder: Path, rank: int, *, ema: ShardEMA | None = None,
            merge: LoraMerge | None = None) -> None:
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


def describe(engine, name: str) -> str:
    """One banner line: ZeRO stage, offload and size of an engine."""
    zero = engine.zero_optimization_stage()
    param = engine.zero_offload_param()
    optim = engine.zero_offload_optimizer()
    total, trained = num_params(engine.module), num_params(engine.module, trainable=True)
    return (f"{name}: ZeRO-{zero}, {model_dtype(engine)}, params offloaded to {param.device if param else 'none'}, "
            f"optimizer offloaded to {optim.device if optim else 'none'}, "
            f"{total / 1e6:.2f}M parameters ({trained:,} trained, {100 * trained / max(total, 1):.1f}%), "
            f"{engine.device}")


def model_dtype(engine) -> torch.dtype:
    """The dtype the engine keeps its model in (bf16/fp16 when enabled, else float32)."""
    return engine.get_data_types()[0]


def num_params(module: torch.nn.Module, trainable: bool = False) -> int:
    """Total (or only trainable) parameters, counting ZeRO-3 partitioned ones at full size."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters() if p.requires_grad or not trainable)


@contextmanager
def plain_construction():
    """Build ordinary (unpartitioned) modules even while a ZeRO-3 config is alive."""
    from transformers.integrations.deepspeed import set_hf_deepspeed_config, unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if _HF_DS_CONFIG is not None:
            set_hf_deepspeed_config(_HF_DS_CONFIG)


def copy_gathered(src: torch.nn.Module, dst: torch.nn.Module, group: int = 0, merge: LoraMerge | None = None) -> None:
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
        chunk = [pair for own in owners[i:i + step] for pair in own]
        with deepspeed.zero.GatheredParameters([p for _, p in chunk]):
            state = {name: p.data for name, p in chunk}
            for name, t in (merge(state) if merge else state).items():
                targets[name].data.copy_(t)


# ---------------------------------------------------------------- EMA of a ZeRO-3 module
def zero3_partition(flat: torch.Tensor, world: int, rank: int) -> torch.Tensor:
    """Partition `rank` of a flattened parameter as ZeRO-3 lays it out (`param.ds_tensor`):
    ceil(numel / world) elements from rank x that size, zero-padded at the end of the last ranks
    (deepspeed.runtime.zero.partition_parameters, `_partition_param`)."""
    size = -(-flat.numel() // world)
    out = flat.new_zeros(size)
    piece = flat[rank * size:(rank + 1) * size]
    out[:piece.numel()] = piece
    return out


def recut(shards: list[torch.Tensor], numel: int, world: int, rank: int) -> torch.Tensor:
    """Partition `rank` of `world` of the parameter (`numel` elements) whose partitions on another
    rank count were `shards` (in rank order)."""
    return zero3_partition(torch.cat([s.flatten() for s in shards])[:numel], world, rank)


class ShardEMA:
    """Exponential moving average of a ZeRO-3 module's parameters, kept by each rank on its own
    partition of each parameter (`param.ds_tensor`), in float32.

    The update touches local memory only (no communication; 4 bytes x parameters / ranks per
    rank); DeepSpeed-Chat's `--enable_ema` instead gathers every parameter at every step. The full
    weights are gathered only to export them (`save_hf(..., ema=...)`). State: one tensor per
    parameter name and rank; `load_resharded` re-cuts the shards of another rank count.
    """

    def __init__(self, module: torch.nn.Module, beta: float):
        self.beta = beta
        self.params = dict(module.named_parameters())
        for name, p in self.params.items():
            if p.ds_tensor.numel() != p.ds_tensor.ds_numel:  # swapped out to NVMe
                raise UserError(f"ppo.ema_beta: parameter {name} has its partition swapped out (offload_param "
                                f"to nvme in the DeepSpeed config); the EMA needs it in memory. Offload to "
                                f"cpu or none, or set ppo.ema_beta 0.")
        self.shards = {n: p.ds_tensor.detach().float().clone() for n, p in self.params.items()}
        self._by_param = {id(p): n for n, p in self.params.items()}

    @torch.no_grad()
    def update(self) -> None:
        """After an optimizer step: ema = beta * ema + (1 - beta) * weights, shard by shard."""
        for name, p in self.params.items():
            ppo_math.ema_update_(self.shards[name], p.ds_tensor, self.beta)

    def gathered(self, param: torch.nn.Parameter) -> torch.Tensor:
        """The full EMA of `param` (its shape and dtype), on every rank. Collective."""
        shard = self.shards[self._by_param[id(param)]].to(device())
        parts = [torch.empty_like(shard) for _ in range(dist.get_world_size(param.ds_process_group))]
        dist.all_gather(parts, shard, group=param.ds_process_group)
        return torch.cat(parts)[:param.ds_numel].view(param.ds_shape).to(param.dtype)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: t.cpu() for n, t in self.shards.items()}

    def load_state_dict(self, shards: dict[str, torch.Tensor]) -> None:
        """This rank's shards, saved by a run on the same rank count."""
        for name, t in self.shards.items():
            t.copy_(shards[name])

    def load_resharded(self, per_rank: list[dict[str, torch.Tensor]]) -> None:
        """Every old rank's shards (in rank order), saved on another rank count: this rank's
        partitions re-cut from them."""
        for name, p in self.params.items():
            group = p.ds_process_group
            self.shards[name].copy_(recut([old[name] for old in per_rank], p.ds_numel,
                                          dist.get_world_size(group), dist.get_rank(group)))


# ---------------------------------------------------------------- engine checkpoints
def save_engine(engine, folder: Path, tag: str) -> list[str]:
    """DeepSpeed's ZeRO-3 checkpoint of `engine` (this rank's partition of weights, optimizer and
    scheduler) into `folder/tag`. Collective.

    Write errors (a full disk) are returned, not raised, so that every rank still reaches
    DeepSpeed's closing barrier and the caller can decide together; the rest of this rank's
    writes are skipped after the first error.
    """
    errors: list[str] = []
    inner = engine.checkpoint_engine.save

    def save(state_dict, path):
        if errors:
            return
        try:
            inner(state_dict, path)
        except (OSError, RuntimeError) as e:  # torch.save's zip writer reports a failed write as RuntimeError
            errors.append(f"{path}: {getattr(e, 'strerror', None) or e}")

    engine.checkpoint_engine.save = save
    try:
        engine.save_checkpoint(str(folder), tag=tag, save_latest=False)
    finally:
        engine.checkpoint_engine.save = inner
    return errors


def load_engine(engine, folder: Path, tag: str) -> None:
    """Load weights, optimizer and scheduler saved by `save_engine` (or its universal form, when
    the engine was built with `universal_loading`). Collective."""
    path, _ = engine.load_checkpoint(str(folder), tag=tag, load_optimizer_states=True,
                                     load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"DeepSpeed found no checkpoint {tag} in {folder}")


def set_schedule_step(engine, step: int) -> None:
    """Put the engine's learning-rate schedule at optimizer step `step` (after a resume that
    changed the number of steps per epoch)."""
    sched = engine.lr_scheduler
    sched.last_epoch = step - 1
    sched.step()


def universal_loading(ds_config: dict) -> dict:
    """The DS config with universal-checkpoint loading on (resuming on a different rank count)."""
    return {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}


def to_universal(src: Path, dst: Path, workers: int = 1) -> None:
    """Convert one engine's ZeRO checkpoint to DeepSpeed's rank-count-independent universal form,
    with `workers` processes extracting the shards (and half as many merging them)."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                           str(src), "--output_folder", str(dst), "--num_extract_workers", str(max(1, workers)),
                           "--num_merge_workers", str(max(1, workers // 2)), "--inject_missing_state"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"converting {src} to a universal checkpoint failed:\n{proc.stderr[-2000:]}")


def safe_globals() -> list:
    """The non-tensor types DeepSpeed pickles into its checkpoints: the only ones we unpickle."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    return [ZeroStageEnum, LossScaler, DynamicLossScaler]
