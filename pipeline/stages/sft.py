"""Stage 1, supervised fine-tuning: causal-LM loss on response tokens only, ZeRO-3 engine."""

from __future__ import annotations

import logging
import math

import torch

from pipeline import data
from pipeline.distributed import collectives, engines, zero3
from pipeline.distributed.ds_config import ds_configs
from pipeline.models import (
    causal_lm_loss,
    check_vocab,
    enable_gradient_checkpointing,
    load_causal_lm,
    load_tokenizer,
)
from pipeline.stages.common import (
    StageContext,
    eval_batches,
    schedule,
    supervised_loop,
    train_loader,
)


log = logging.getLogger(__name__)


def run(ctx: StageContext) -> dict:
    """Train the policy on demonstrations; save `<stage_dir>/model`. Returns eval metrics."""
    cfg, t, d = ctx.cfg, ctx.cfg.sft, ctx.dist
    tokenizer = load_tokenizer(ctx.inputs["tokenizer"], cfg.model.trust_remote_code)
    lens = (cfg.data.max_prompt_len, cfg.data.max_response_len)
    train, held_out = (
        ctx.examples(
            role,
            lambda role=role: data.sft_examples(
                data.load_role(ctx.inputs[role], role, tokenizer, ctx.inputs["tokenizer"]),
                tokenizer,
                *lens,
                what=str(ctx.inputs[role]),
            ),
        )
        for role in ("sft_data", "sft_eval_data")
    )
    log.info(
        "stage sft: %d training rows from %s; %d eval rows from %s",
        len(train),
        ctx.inputs["sft_data"],
        len(held_out),
        ctx.inputs["sft_eval_data"],
    )
    ds_config = ds_configs(cfg, "sft", d.world_size)["train"]
    loader = train_loader(
        train, data.collate_sft, tokenizer.pad_token_id, t.micro_batch_size_per_gpu, cfg.seed, d
    )
    total_steps, warmup = schedule(t, loader, "sft", len(train), d)

    collectives.seed_everything(cfg.seed)
    with engines.zero3_construction(ds_config):
        model = load_causal_lm(ctx.inputs["model"], cfg.model.trust_remote_code, cfg.model.dtype)
    check_vocab(model, tokenizer, f"model {ctx.inputs['model']}")
    if cfg.model.gradient_checkpointing:
        enable_gradient_checkpointing(model)

    logger = ctx.start()  # inputs are valid: from here on this stage's folder is rewritten
    engine = engines.train_engine(
        model,
        ctx.engine_config(ds_config, "deepspeed_sft"),
        t.learning_rate,
        t.weight_decay,
        t.lr_scheduler,
        warmup,
        total_steps,
    )
    log.info("engine %s", engines.describe(engine, "policy"))

    def loss_fn(batch: dict):
        loss_sum, n_tokens = causal_lm_loss(
            engine, batch["input_ids"], batch["attention_mask"], batch["labels"]
        )
        # Normalise by the global token count of this micro-step so every token weighs the same on
        # every rank; x world because DeepSpeed averages gradients over ranks.
        global_tokens = collectives.all_reduce_sum(n_tokens.float()).clamp(min=1)
        loss = loss_sum / global_tokens * d.world_size
        return loss, {"loss": loss_sum.detach() / n_tokens.clamp(min=1)}

    @torch.no_grad()
    def evaluate() -> dict:
        engine.eval()
        totals = torch.zeros(2, dtype=torch.float64)
        for batch, real in eval_batches(
            held_out, data.collate_sft, tokenizer.pad_token_id, t.micro_batch_size_per_gpu, d
        ):
            loss_sum, n = causal_lm_loss(
                engine, batch["input_ids"], batch["attention_mask"], batch["labels"]
            )
            totals += real * torch.tensor([loss_sum.item(), n.item()], dtype=torch.float64)
        loss_sum, n = collectives.all_reduce_sum(totals).tolist()
        loss = loss_sum / max(n, 1)
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}

    result = supervised_loop(ctx, engine, loader, t, total_steps, loss_fn, evaluate, logger)
    zero3.save_hf(engine.module, tokenizer, ctx.stage_dir / "model", d.rank)
    logger.close()
    return {
        "eval_loss": result["loss"],
        "eval_perplexity": result["perplexity"],
        "steps": result["steps"],
        "params": engines.num_params(engine.module),
    }
