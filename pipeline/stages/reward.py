"""Stage 2, reward model: backbone + scalar head, pairwise loss -log sigmoid(r_chosen -
r_rejected)."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from pipeline import data
from pipeline.distributed import collectives, engines, zero3
from pipeline.distributed.ds_config import ds_configs
from pipeline.models import (
    check_vocab,
    enable_gradient_checkpointing,
    load_scalar_model,
    load_tokenizer,
    sequence_scores,
)
from pipeline.stages.common import (
    StageContext,
    eval_batches,
    schedule,
    supervised_loop,
    train_loader,
)


log = logging.getLogger(__name__)


def pairwise(
    engine, batch: dict, pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair loss, accuracy and margin; the batch holds chosen rows, then rejected rows. Scores
    are read where the exported model's HF forward pools them (`models.score_index`;
    config.pad_token_id is this pad id)."""
    scores = engines.forward(
        engine, sequence_scores, batch["input_ids"], batch["attention_mask"], pad_token_id
    )
    chosen, rejected = scores.chunk(2)
    margin = chosen - rejected
    return -F.logsigmoid(margin), (margin > 0).float(), margin


def run(ctx: StageContext) -> dict:
    """Train the reward model on preference pairs; save `<stage_dir>/model`."""
    cfg, t, d = ctx.cfg, ctx.cfg.reward, ctx.dist
    tokenizer = load_tokenizer(ctx.inputs["tokenizer"], cfg.model.trust_remote_code)
    lens = (cfg.data.max_prompt_len, cfg.data.max_response_len)
    train, held_out = (
        ctx.examples(
            role,
            lambda role=role: data.pair_examples(
                data.load_role(ctx.inputs[role], role, tokenizer, ctx.inputs["tokenizer"]),
                tokenizer,
                *lens,
                what=str(ctx.inputs[role]),
            ),
        )
        for role in ("reward_data", "reward_eval_data")
    )
    log.info(
        "stage reward: %d training rows from %s; %d eval rows from %s",
        len(train),
        ctx.inputs["reward_data"],
        len(held_out),
        ctx.inputs["reward_eval_data"],
    )
    ds_config = ds_configs(cfg, "reward", d.world_size)["train"]
    loader = train_loader(
        train, data.collate_pairs, tokenizer.pad_token_id, t.micro_batch_size_per_gpu, cfg.seed, d
    )
    total_steps, warmup = schedule(t, loader, "reward", len(train), d)

    collectives.seed_everything(cfg.seed)
    with engines.zero3_construction(ds_config):
        model = load_scalar_model(ctx.inputs["model"], cfg.model.trust_remote_code, cfg.model.dtype)
    check_vocab(model, tokenizer, f"model {ctx.inputs['model']}")
    if cfg.model.gradient_checkpointing:
        enable_gradient_checkpointing(model)

    logger = ctx.start()  # inputs are valid: from here on this stage's folder is rewritten
    # HF's own pooled forward reads the last non-pad token: the same token as training (pairwise).
    model.config.pad_token_id = tokenizer.pad_token_id
    engine = engines.train_engine(
        model,
        ctx.engine_config(ds_config, "deepspeed_reward"),
        t.learning_rate,
        t.weight_decay,
        t.lr_scheduler,
        warmup,
        total_steps,
    )
    log.info("engine %s", engines.describe(engine, "reward model"))

    def loss_fn(batch: dict):
        loss, acc, margin = pairwise(engine, batch, tokenizer.pad_token_id)
        return loss.mean(), {
            "loss": loss.mean().detach(),
            "accuracy": acc.mean(),
            "reward_margin": margin.mean().detach(),
        }

    @torch.no_grad()
    def evaluate() -> dict:
        engine.eval()
        totals = torch.zeros(4, dtype=torch.float64)  # loss, correct, margin, pairs
        for batch, real in eval_batches(
            held_out, data.collate_pairs, tokenizer.pad_token_id, t.micro_batch_size_per_gpu, d
        ):
            loss, acc, margin = pairwise(engine, batch, tokenizer.pad_token_id)
            totals += real * torch.tensor(
                [loss.sum().item(), acc.sum().item(), margin.sum().item(), len(loss)],
                dtype=torch.float64,
            )
        loss, correct, margin, n = collectives.all_reduce_sum(totals).tolist()
        return {"loss": loss / n, "accuracy": correct / n, "reward_margin": margin / n}

    result = supervised_loop(ctx, engine, loader, t, total_steps, loss_fn, evaluate, logger)
    zero3.save_hf(engine.module, tokenizer, ctx.stage_dir / "model", d.rank)
    logger.close()
    return {
        "eval_accuracy": result["accuracy"],
        "eval_loss": result["loss"],
        "eval_reward_margin": result["reward_margin"],
        "steps": result["steps"],
    }
