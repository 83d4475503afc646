"""Run under `deepspeed --num_gpus N` (N = 1 or 2): one PPO update (`PPOTrainer.update`) of one
fixed global rollout, each rank training on its contiguous share of the rows. The trainer is built
by `PPOTrainer(ctx)` (ZeRO-3 actor and critic, frozen reference and reward model) from the folders
the test wrote: <work>/policy (causal LM and tokenizer), <work>/reward (scalar model),
<work>/prompts.jsonl. Rank 0 writes <out> (torch.save): the gathered actor and critic weights before
and after, the gathered fp32 gradient of every optimizer step (taken just before DeepSpeed's step at
the accumulation boundary), each step's global gradient norm, and the stats `update` returns.
Used by test_ppo_update_ranks.py."""

import sys
from pathlib import Path

import torch
from deepspeed.utils import safe_get_full_grad

from pipeline.cli import parse_config
from pipeline.distributed import collectives, zero3
from pipeline.generation import response_mask
from pipeline.inputs import stage_inputs
from pipeline.stages.common import StageContext
from pipeline.stages.ppo import PPOTrainer
from pipeline.stages.ppo_types import Experience

PROMPTS, SAMPLES, PROMPT_WIDTH, RESPONSE_WIDTH = 4, 2, 6, 6
ROWS = PROMPTS * SAMPLES


def options(work: Path) -> list[str]:
    """One mini-batch holding the whole rollout (so 1 and 2 ranks take the same optimizer steps on
    the same rows), two epochs (the second step starts from ratios != 1), micro-batches of 2 rows
    (gradient accumulation 4 on one rank, 2 on two), no warmup (the first step moves the
    weights)."""
    return [
        "--output_dir",
        str(work / "run"),
        "--ppo.actor_model_path",
        str(work / "policy"),
        "--ppo.reward_model_path",
        str(work / "reward"),
        "--data.prompt_data_path",
        str(work / "prompts.jsonl"),
        "--data.eval_prompt_data_path",
        str(work / "prompts.jsonl"),
        "--data.max_response_len",
        str(RESPONSE_WIDTH),
        "--ppo.rollout_batch_size",
        str(PROMPTS),
        "--ppo.num_samples_per_prompt",
        str(SAMPLES),
        "--ppo.mini_batch_size",
        str(ROWS),
        "--ppo.micro_batch_size_per_gpu",
        "2",
        "--ppo.num_ppo_epochs",
        "2",
        "--ppo.num_iterations",
        "1",
        "--ppo.warmup_iterations",
        "0",
        "--ppo.actor_learning_rate",
        "1e-3",
        "--ppo.critic_learning_rate",
        "1e-3",
        "--ppo.entropy_coef",
        "0.01",
        "--ppo.eval_steps",
        "0",
        "--save_steps",
        "0",
        "--cache_dir",
        str(work / "cache"),
    ]


def rollout(vocab_size: int, eos: int, pad: int) -> dict:
    """The global rollout without model outputs: token ids, masks, advantages and returns, and the
    offsets added to the model's pi_old and old values (so ratio and value clipping both engage)."""
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(5, vocab_size, (ROWS, PROMPT_WIDTH), generator=g)
    prompt_len = torch.randint(2, PROMPT_WIDTH + 1, (ROWS,), generator=g)
    prompt_mask = (
        torch.arange(PROMPT_WIDTH)[None] >= PROMPT_WIDTH - prompt_len[:, None]
    ).long()  # left-padded
    prompt = torch.where(prompt_mask.bool(), prompt, pad)
    response = torch.randint(5, vocab_size, (ROWS, RESPONSE_WIDTH), generator=g)
    eos_at = torch.randint(
        0, RESPONSE_WIDTH + 1, (ROWS,), generator=g
    )  # RESPONSE_WIDTH: no EOS, cut
    pos = torch.arange(RESPONSE_WIDTH)[None]
    response = torch.where(
        pos == eos_at[:, None], eos, torch.where(pos > eos_at[:, None], pad, response)
    )
    m = response_mask(response, eos)
    return {
        "sequences": torch.cat([prompt, response], 1),
        "attention_mask": torch.cat([prompt_mask, m], 1),
        "response_mask": m,
        "advantages": torch.randn(ROWS, RESPONSE_WIDTH, generator=g) * m,
        "returns": torch.randn(ROWS, RESPONSE_WIDTH, generator=g) * m,
        "logprob_offset": 0.3 * torch.randn(ROWS, RESPONSE_WIDTH, generator=g),
        "value_offset": 0.3 * torch.randn(ROWS, RESPONSE_WIDTH, generator=g),
    }


def my_experience(trainer: PPOTrainer, rank: int, world: int) -> Experience:
    """This rank's contiguous share of the global rollout; pi_old and old values are the engines'
    own (each rank computes its rows, as the stage's generate() and score() do) plus fixed
    offsets."""
    tok = trainer.tokenizer
    full = rollout(len(tok), tok.eos_token_id, tok.pad_token_id)
    per_rank = ROWS // world
    mine = {
        k: v[rank * per_rank : (rank + 1) * per_rank].to(collectives.device())
        for k, v in full.items()
    }
    seq, mask, m = mine["sequences"], mine["attention_mask"], mine["response_mask"]
    with torch.no_grad():
        old_logprobs = torch.cat(
            [
                trainer._logits_logprobs(trainer.actor, seq[s], mask[s], PROMPT_WIDTH)[1]
                for s in trainer.micro_slices(len(seq))
            ]
        )
        old_values = torch.cat(
            [
                trainer._values(trainer.critic, seq[s], mask[s], PROMPT_WIDTH)[0]
                for s in trainer.micro_slices(len(seq))
            ]
        )
    return Experience(
        seq,
        mask,
        m,
        (old_logprobs + mine["logprob_offset"]) * m,
        PROMPT_WIDTH,
        ["p"] * per_rank,
        old_values=(old_values + mine["value_offset"]) * m,
        advantages=mine["advantages"],
        returns=mine["returns"],
    )


def record_steps(engine, d: collectives.Dist) -> dict:
    """Wrap engine.step: at each accumulation boundary keep the full fp32 gradient (before the step)
    and the global gradient norm DeepSpeed computed (before clipping)."""
    log = {"grads": [], "grad_norms": []}
    step = engine.step

    def recording_step(*args, **kwargs):
        boundary = engine.is_gradient_accumulation_boundary()
        if boundary:  # collective under ZeRO-3: every rank gathers each gradient
            grads = {
                n: safe_get_full_grad(p).detach().cpu().clone()
                for n, p in engine.module.named_parameters()
            }
            if d.is_main:
                log["grads"].append(grads)
        out = step(*args, **kwargs)
        if boundary:
            log["grad_norms"].append(float(engine.get_global_grad_norm()))
        return out

    engine.step = recording_step
    return log


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # added by the launcher
    out, work = Path(args[0]), Path(args[1])
    cfg = parse_config(options(work))
    d = collectives.init_distributed()
    run = Path(cfg.output_dir)
    trainer = PPOTrainer(
        StageContext(cfg, d, run / "ppo", stage_inputs(cfg, run, run / "task")["ppo"])
    )
    exp = my_experience(trainer, d.rank, d.world_size)
    before = {
        name: zero3.full_state_dict(e.module, d.rank)
        for name, e in (("actor", trainer.actor), ("critic", trainer.critic))
    }
    logs = {"actor": record_steps(trainer.actor, d), "critic": record_steps(trainer.critic, d)}
    stats = trainer.update(exp, seed=7)
    after = {
        name: zero3.full_state_dict(e.module, d.rank)
        for name, e in (("actor", trainer.actor), ("critic", trainer.critic))
    }
    if d.is_main:
        torch.save(
            {
                "world_size": d.world_size,
                "before": before,
                "after": after,
                "steps": logs,
                "stats": stats,
                "tokens": int(
                    rollout(
                        len(trainer.tokenizer),
                        trainer.tokenizer.eos_token_id,
                        trainer.tokenizer.pad_token_id,
                    )["response_mask"].sum()
                ),
            },
            out,
        )
    collectives.barrier()


if __name__ == "__main__":
    main()
