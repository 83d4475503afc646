"""DeepSpeed engines: building models under ZeRO-3, the training and frozen engines, and the EMA.

`zero3_construction` builds Hugging Face models partitioned at construction, `plain_construction`
ordinary ones while a ZeRO-3 config is alive; `train_engine` (AdamW and a learning-rate schedule)
and `inference_engine` (frozen, offloaded) wrap them; `ShardEMA` averages a ZeRO-3 module's weights
on each rank's own shards. Gathering full weights and exporting them is zero3.py; the DS JSON the
engines are built from is ds_config.py; engine checkpoints are checkpoint.py.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager

import deepspeed
import torch
import torch.distributed as dist

from pipeline import ppo_math
from pipeline.config import LR_SCHEDULERS
from pipeline.distributed.collectives import device
from pipeline.distributed.zero3 import recut
from pipeline.errors import UserError

_HF_DS_CONFIG = None  # transformers reads ZeRO-3 settings through a live HfDeepSpeedConfig


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


def train_engine(
    model: torch.nn.Module,
    ds_config: dict,
    learning_rate: float,
    weight_decay: float,
    scheduler: str,
    warmup_steps: int,
    total_steps: int,
):
    """A ZeRO-3 training engine with AdamW and a transformers learning-rate schedule."""
    from transformers import get_scheduler

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and p.requires_grad]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 and p.requires_grad]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=learning_rate,
        betas=(0.9, 0.95),
    )
    assert scheduler in LR_SCHEDULERS, scheduler  # config.validate refused the others

    def lr_scheduler(wrapped_optimizer):  # built on DeepSpeed's wrapped optimizer, stepped by it
        return get_scheduler(
            scheduler,
            wrapped_optimizer,
            num_warmup_steps=warmup_steps,
            num_training_steps=max(total_steps, 1),
        )

    cfg = dict(ds_config, zero_allow_untested_optimizer=True)
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=lr_scheduler, config=cfg
    )
    return engine


def inference_engine(model: torch.nn.Module, ds_config: dict):
    """A frozen ZeRO-3 engine (no optimizer), parameters offloaded as the DS config says."""
    model.requires_grad_(False)
    model.eval()
    engine, *_ = deepspeed.initialize(model=model, config=ds_config)
    engine.eval()
    return engine


def describe(engine, name: str) -> str:
    """One banner line: ZeRO stage, offload and size of an engine."""
    zero = engine.zero_optimization_stage()
    param = engine.zero_offload_param()
    optim = engine.zero_offload_optimizer()
    total, trained = num_params(engine.module), num_params(engine.module, trainable=True)
    return (
        f"{name}: ZeRO-{zero}, {model_dtype(engine)}, params offloaded to "
        f"{param.device if param else 'none'}, optimizer offloaded to "
        f"{optim.device if optim else 'none'}, {total / 1e6:.2f}M parameters ({trained:,} trained, "
        f"{100 * trained / max(total, 1):.1f}%), {engine.device}"
    )


def model_dtype(engine) -> torch.dtype:
    """The dtype the engine keeps its model in (bf16/fp16 when enabled, else float32)."""
    return engine.get_data_types()[0]


def num_params(module: torch.nn.Module, trainable: bool = False) -> int:
    """Total (or only trainable) parameters, counting ZeRO-3 partitioned ones at full size."""
    return sum(
        getattr(p, "ds_numel", p.numel())
        for p in module.parameters()
        if p.requires_grad or not trainable
    )


@contextmanager
def plain_construction():
    """Build ordinary (unpartitioned) modules even while a ZeRO-3 config is alive."""
    from transformers.integrations.deepspeed import (
        set_hf_deepspeed_config,
        unset_hf_deepspeed_config,
    )

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if _HF_DS_CONFIG is not None:
            set_hf_deepspeed_config(_HF_DS_CONFIG)


@contextmanager
def native_linear():
    """Run `torch.nn.functional.linear` as PyTorch's own inside this (e.g. no-grad phases).

    zero.Init replaces it, for the rest of the process, with ZeRO-3's autograd function (which
    re-gathers a partitioned weight in backward instead of keeping it alive); every linear layer
    after the first ZeRO-3 model, plain copies included, then runs through a Python-level autograd
    function: +15% on a decode of the default task's model (docs/benchmark.md). Without
    gradients the two compute the same product, and an engine's forward gathers its weights
    before the layer runs, so generation and scoring need only the native one; training keeps
    ZeRO-3's. A no-op where nothing replaced it."""
    from deepspeed.runtime.zero.partition_parameters import InsertPostInitMethodToModuleSubClasses

    native = getattr(InsertPostInitMethodToModuleSubClasses, "linear_bk", None)
    current = torch.nn.functional.linear
    if native is None or current is native:
        yield
        return
    torch.nn.functional.linear = native
    try:
        yield
    finally:
        torch.nn.functional.linear = current


def set_schedule_step(engine, step: int) -> None:
    """Put the engine's learning-rate schedule at optimizer step `step` (after a resume that
    changed the number of steps per epoch)."""
    sched = engine.lr_scheduler
    sched.last_epoch = step - 1
    sched.step()


# ---------------------------------------------------------------- EMA of a ZeRO-3 module
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
                raise UserError(
                    f"ppo.ema_beta: parameter {name} has its partition swapped out (offload_param "
                    f"to nvme in the DeepSpeed config); the EMA needs it in memory. Offload to "
                    f"cpu or none, or set ppo.ema_beta 0."
                )
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
        parts = [
            torch.empty_like(shard) for _ in range(dist.get_world_size(param.ds_process_group))
        ]
        dist.all_gather(parts, shard, group=param.ds_process_group)
        return torch.cat(parts)[: param.ds_numel].view(param.ds_shape).to(param.dtype)

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
            self.shards[name].copy_(
                recut(
                    [old[name] for old in per_rank],
                    p.ds_numel,
                    dist.get_world_size(group),
                    dist.get_rank(group),
                )
            )


def forward(engine, fn, *args, **kwargs):
    """`fn(module, *args, **kwargs)` run AS the engine's forward, for a model read another way than
    its own `forward` (the scalar head at every position, `models.token_values`).

    DeepSpeed's `engine.forward` does per-forward bookkeeping that ZeRO relies on: with ZeRO-3 it
    advances the optimizer's micro-step counter, and a backward in micro-step 0 overwrites the
    accumulated gradient instead of adding to it. Calling submodules of `engine.module` directly
    skips it, so under gradient accumulation only the last micro-batch's gradient survived (the
    critic's, and the reward model's with reward.gradient_accumulation_steps > 1). Here the module's
    forward is swapped for `fn` for one call through the engine; a plain module is simply called.
    """
    if not isinstance(engine, deepspeed.DeepSpeedEngine):
        return fn(engine, *args, **kwargs)
    module = engine.module
    own = module.__dict__.get(
        "forward"
    )  # a forward already set on the instance (a wrapper's) comes back after
    module.forward = lambda *a, **k: fn(
        module, *a, **k
    )  # an instance attribute over the class's forward
    try:
        return engine(*args, **kwargs)
    finally:
        if own is None:
            del module.forward
        else:
            module.forward = own
