"""A ZeRO-3 engine's module materialised: its full weights copied once into a plain module.

A forward of a ZeRO-3 module all-gathers every layer's parameters (and concatenates them from the
partitions) each time it runs; a phase of many forwards on unchanged weights (decoding, scoring
the rollout's micro-batches) pays that once per forward. `PlainCopy` keeps a plain module of the
engine's architecture on the meta device (no memory, no ZeRO hooks, eval mode, no gradients);
inside `materialised()` it holds the engine's current full weights on this rank's device, with
no collective per forward, and they are freed on exit. Used by the hybrid engine
(pipeline/generation.py, the actor, LoRA merged) and by the PPO stage's critic scoring (LoRA kept
as adapters, so the values are the engine's own bit for bit). The gathers themselves are
zero3.py (`copy_gathered`).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from pipeline.distributed import collectives, engines, zero3
from pipeline.models import lora_merge


class PlainCopy:
    """A plain module of `engine`'s architecture, filled with its full weights inside
    `materialised()`, gathering `gather_modules` submodules at a time (0: all at once; smaller
    numbers lower the transient peak). With `merge_lora`, LoRA adapters are folded into the
    weights (the base architecture: decoding costs what it costs without them, the logits are
    the adapted model's up to rounding); without it the copy has the same adapters (peft's
    config of the engine's module) and computes exactly what the engine does."""

    def __init__(self, engine, gather_modules: int = 0, merge_lora: bool = True):
        self.engine = engine
        self.gather_modules = gather_modules
        module = engine.module
        self.merge = lora_merge(module) if merge_lora else None
        adapters = None if merge_lora else getattr(module, "peft_config", None)
        with engines.plain_construction(), torch.device("meta"):  # the module's own loaded class
            self.model = type(module)._from_config(module.config, dtype=engines.model_dtype(engine))
            if adapters:
                from peft import inject_adapter_in_model

                for name, config in adapters.items():
                    self.model = inject_adapter_in_model(config, self.model, adapter_name=name)
        self.model.eval().requires_grad_(False)
        self.materialised = False

    @contextmanager
    def materialise(self):
        """Inside: `self.model` (yielded) holds the engine's current full weights. Freed on exit.
        Collective (the gathers)."""
        self.model.to_empty(device=collectives.device())
        self.model.tie_weights()  # to_empty gives tied parameters separate storage; share it again
        buffers = dict(self.engine.module.named_buffers())  # not partitioned by ZeRO (e.g. rotary)
        for name, buf in self.model.named_buffers():
            buf.data.copy_(buffers[name].data)
        zero3.copy_gathered(self.engine.module, self.model, self.gather_modules, self.merge)
        self.materialised = True
        try:
            yield self.model
        finally:
            self.model.to("meta")  # drop every materialised tensor
            self.materialised = False
