"""Construction of the PPO stage: what `PPOTrainer` is built from, before the first iteration.

Here: the tokenizers, the training, evaluation and PTX rows (validated before anything is written),
the reward and gold functions, the actor and critic (LoRA, dropout, vocabulary checks), their
DeepSpeed engines, the generation backend and the critic's scoring copy (ppo.critic_scoring), the
frozen reference and reward models through ppo_frozen.py (their placement: resident or offloaded),
the seeded row order (`PromptOrder`), and the PTX micro-batches drawn in it for each optimizer
step. Not here: the algorithm (pipeline/stages/ppo.py), its evaluation and metrics
(pipeline/stages/ppo_eval.py), checkpoints and the final save (pipeline/stages/ppo_checkpoint.py),
the derived sizes (pipeline/config.py: `ppo_sizes`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from pipeline import data, reward_fns
from pipeline.config import PPOSizes
from pipeline.distributed import collectives, engines, placement
from pipeline.distributed.materialise import PlainCopy
from pipeline.errors import UserError
from pipeline.generation import make_backend
from pipeline.models import (
    add_lora,
    check_vocab,
    disable_dropout,
    enable_gradient_checkpointing,
    load_causal_lm,
    load_scalar_model,
    load_tokenizer,
)
from pipeline.stages import ppo_frozen
from pipeline.stages.common import StageContext, to_device

if TYPE_CHECKING:
    from pipeline.stages.ppo import PPOTrainer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PPOInputs:
    """Everything the stage reads besides the models, validated."""

    tokenizer: object  # the actor's (and the critic's, reference's)
    reward_tokenizer: object  # the (first) reward model's; the actor's without a reward model
    same_tokenizer: (
        bool  # same vocabulary: the reward models read the rollout's token ids as they are
    )
    reward_paths: list  # the reward models: one, an ensemble's members, or none (reward_fn alone)
    prompts: list  # training prompt rows
    eval_prompts: list  # held-out prompt rows
    ptx: list | None  # PPO-ptx rows (tokenised like SFT's); None: ppo.ptx_coef 0
    reward_fn: reward_fns.ScoreFn | None  # ppo.reward_fn
    gold: reward_fns.ScoreFn | None  # the evaluation's gold metric


@dataclass(frozen=True)
class PPOModels:
    """The engines: actor and critic ZeRO-3 training engines, reference and reward models frozen."""

    actor: object
    critic: object | None  # None: the advantage estimator needs no critic
    ref: object
    rewards: list  # one engine per reward model
    reward_pad_ids: list  # per reward model: the pad id where HF's sequence classifier pools
    generator: object  # generation backend of the actor (pipeline/generation.py)
    # the critic's plain copy for scoring (distributed/materialise.py); None: ZeRO-3 scoring
    critic_copy: PlainCopy | None = None
    forward_rows: int = 0  # rows per scoring forward (ppo_frozen.scoring_rows; 0: micro-batch)


def load_inputs(ctx: StageContext) -> PPOInputs:
    """Tokenizers, prompts, PTX rows and reward functions, all validated before anything is
    written."""
    cfg, p = ctx.cfg, ctx.cfg.ppo
    tokenizer = load_tokenizer(ctx.inputs["tokenizer"], cfg.model.trust_remote_code)
    # The reward models: the stage's (one, or an ensemble's members), or none (reward_fn alone).
    roles = ("reward_model", *(f"reward_model_{i}" for i in range(1, len(ctx.inputs))))
    reward_paths = [ctx.inputs[role] for role in roles if role in ctx.inputs]
    reward_tokenizer = (
        load_tokenizer(reward_paths[0], cfg.model.trust_remote_code) if reward_paths else tokenizer
    )
    prompts, eval_prompts = (
        ctx.examples(
            role,
            lambda role=role: data.prompt_examples(
                data.load_role(ctx.inputs[role], role, tokenizer, ctx.inputs["tokenizer"]),
                tokenizer,
                cfg.data.max_prompt_len,
                str(ctx.inputs[role]),
            ),
        )
        for role in ("prompt_data", "eval_prompt_data")
    )
    log.info(
        "stage ppo: %d training prompts from %s; %d eval prompts from %s",
        len(prompts),
        ctx.inputs["prompt_data"],
        len(eval_prompts),
        ctx.inputs["eval_prompt_data"],
    )
    if len(prompts) < p.rollout_batch_size:
        raise UserError(
            f"dataset {ctx.inputs['prompt_data']}: {len(prompts)} prompts are fewer "
            f"than ppo.rollout_batch_size={p.rollout_batch_size}."
        )
    ptx = _load_ptx(ctx, tokenizer) if p.ptx_coef > 0 else None
    if p.ptx_coef == 0 and p.ptx_data_path:
        log.info("ppo.ptx_data_path is given but ppo.ptx_coef is 0: no PTX loss.")
    reward_fn = reward_fns.load(p.reward_fn, "ppo.reward_fn") if p.reward_fn else None
    # The gold metric: the user's, else the embedded default task's on its own prompts.
    dc = cfg.data
    default = not (dc.eval_prompt_data_path or dc.prompt_data_path or dc.data_path)
    spec = p.eval_reward_fn or (reward_fns.DEFAULT_TASK_GOLD if default else "")
    gold = reward_fns.load(spec, "ppo.eval_reward_fn") if spec else None
    inputs = PPOInputs(
        tokenizer,
        reward_tokenizer,
        reward_tokenizer.get_vocab() == tokenizer.get_vocab(),
        reward_paths,
        prompts,
        eval_prompts,
        ptx,
        reward_fn,
        gold,
    )
    log.info(
        "stage ppo: reward = %s; evaluation gold: %s",
        _reward_description(p, inputs),
        (spec or "none (give --ppo.eval_reward_fn FILE.py:NAME to log eval/gold_score)")
        if p.eval_steps
        else "none, evaluation is off (ppo.eval_steps 0)",
    )
    log.info(
        "KL penalty estimator: %s; the reported kl_to_ref is the sequence sum of k3 "
        "(unbiased and >= 0, http://joschu.net/blog/kl-approx.html).",
        p.kl_estimator,
    )
    log.info(
        "log-probs (pi_old, pi, reference, KL, entropy) of the sampling distribution: logits / "
        "temperature %g%s.",
        p.temperature,
        f", EOS blocked before response token {p.min_new_tokens}" if p.min_new_tokens else "",
    )
    if p.select_best and p.select_best not in eval_metric_names(inputs):
        raise UserError(
            f"option ppo.select_best={p.select_best!r} is not an evaluation metric of this run; "
            f"choose one of {', '.join(sorted(eval_metric_names(inputs)))}."
        )
    return inputs


def _reward_description(p, inputs: PPOInputs) -> str:
    k, parts = len(inputs.reward_paths), []
    if k:
        what = (
            f"mean - {p.ensemble_penalty:g} x std over {k} reward models"
            if k > 1
            else "the reward model"
        )
        parts.append(f"{p.reward_model_coef:g} x ({what})" if p.reward_model_coef != 1 else what)
    if inputs.reward_fn:
        parts.append(f"{p.reward_fn_coef:g} x {p.reward_fn}")
    return " + ".join(parts)


def eval_metric_names(inputs: PPOInputs) -> set[str]:
    """The evaluation metrics of this run: the candidates of ppo.select_best (higher is better)."""
    names = {"eval/reward_score"}
    if inputs.reward_paths:
        names |= {"eval/reward_model_raw"}
    if inputs.gold:
        names |= {"eval/gold_score", "eval/win_rate_vs_sft"}
    if len(inputs.reward_paths) > 1:
        names |= {"eval/reward_lcb"}
    return names


def _load_ptx(ctx: StageContext, tokenizer) -> list[dict]:
    """PPO-ptx rows, tokenised like SFT's (loss on the response tokens only)."""
    p, dc = ctx.cfg.ppo, ctx.cfg.data
    spec = ctx.inputs["ptx_data"]
    ptx = ctx.examples(
        "ptx_data",
        lambda: data.sft_examples(
            data.load_role(spec, "ptx_data", tokenizer, ctx.inputs["tokenizer"]),
            tokenizer,
            dc.max_prompt_len,
            dc.max_response_len,
            what=str(spec),
        ),
    )
    log.info("stage ppo: PTX loss (ppo.ptx_coef %g) on %d rows from %s", p.ptx_coef, len(ptx), spec)
    if len(ptx) < p.mini_batch_size:
        raise UserError(
            f"dataset {spec}: {len(ptx)} PTX rows are fewer than ppo.mini_batch_size="
            f"{p.mini_batch_size} (one PTX row per rollout row of each optimizer step)."
        )
    return ptx


def load_models(ctx: StageContext, inputs: PPOInputs, ds: dict, needs_critic: bool) -> tuple:
    """Actor and critic (None without one) under the training ZeRO-3 config, and the specs of the
    reference and reward models (ppo_frozen.py: built once the training engines exist); every
    vocabulary checked against the tokenizer that feeds it."""
    m = ctx.cfg.model
    actor_path = ctx.inputs["actor"]
    # The critic starts from the (first) reward model, or from the policy with a fresh value head.
    reward_path = inputs.reward_paths[0] if inputs.reward_paths else actor_path
    with engines.zero3_construction(ds["train"]):
        actor = load_causal_lm(actor_path, m.trust_remote_code, m.dtype)
        critic = (
            load_scalar_model(reward_path, m.trust_remote_code, m.dtype) if needs_critic else None
        )
    actor, critic = _add_lora(ctx.cfg.ppo, actor, critic, actor_path, reward_path)
    for model in [
        x for x in (actor, critic) if x is not None
    ]:  # see PPOTrainer.update for why dropout goes
        disable_dropout(model)
        if m.gradient_checkpointing:
            enable_gradient_checkpointing(model)
    check_vocab(actor, inputs.tokenizer, f"actor model {actor_path}")
    frozen = ppo_frozen.frozen_specs(ctx, inputs)  # built after the training engines
    if critic is None:
        return actor, critic, frozen
    # The critic starts from the reward model but reads the actor's token ids.
    check_vocab(
        critic,
        inputs.tokenizer,
        f"critic (initialised from reward model {reward_path}, "
        f"reading the actor's tokens from {ctx.inputs['tokenizer']})",
    )
    if not inputs.same_tokenizer:
        log.warning(
            "the reward model %s has its own tokenizer: rollouts are re-encoded for it, but "
            "the critic initialised from it reads the actor's token ids, so its embeddings "
            "start out meaningless for them.",
            reward_path,
        )
    return actor, critic, frozen


def _add_lora(p, actor, critic, actor_path: str, reward_path: str) -> tuple:
    """LoRA adapters where asked; the adapters are plain tensors until the engines partition
    them (DeepSpeed converts them, broadcast from rank 0, in `deepspeed.initialize`)."""
    if p.actor_lora_rank:
        actor = add_lora(
            actor, p.actor_lora_rank, p.lora_alpha, p.lora_target_modules, f"actor {actor_path}"
        )
    if p.critic_lora_rank:  # (the config refuses it without a critic)
        critic = add_lora(
            critic,
            p.critic_lora_rank,
            p.lora_alpha,
            p.lora_target_modules,
            f"critic (from reward model {reward_path})",
        )
    return actor, critic


def build_engines(
    ctx: StageContext, models: tuple, ds: dict, sizes: PPOSizes, tokenizer
) -> PPOModels:
    """Actor and critic: ZeRO-3 training engines; reference and reward: frozen, each placed by the
    memory plan (ppo_frozen.build_frozen: resident or offloaded)."""
    p = ctx.cfg.ppo
    actor, critic, frozen = models
    reward_pad_ids = [s.pad_id for s in frozen[1:]]  # the score is read where HF's forward pools it
    steps = p.num_iterations * p.num_ppo_epochs * sizes.mini_batches_per_epoch
    warmup = p.warmup_iterations * p.num_ppo_epochs * sizes.mini_batches_per_epoch
    actor = engines.train_engine(
        actor,
        ctx.engine_config(ds["train"], "deepspeed_actor"),
        p.actor_learning_rate,
        0.0,
        "constant_with_warmup",
        warmup,
        steps,
    )
    critic = (
        None
        if critic is None
        else engines.train_engine(
            critic,
            ctx.engine_config(ds["train"], "deepspeed_critic"),
            p.critic_learning_rate,
            0.0,
            "constant_with_warmup",
            warmup,
            steps,
        )
    )
    for engine in [e for e in (actor, critic) if e is not None]:
        engine.eval()  # train mode only inside PPOTrainer.update
    for name, engine in (("actor", actor), ("critic", critic)):
        if engine is not None:
            log.info("engine %s", engines.describe(engine, name))
    if critic is None:
        log.info(
            "no critic: ppo.advantage_mode=%s needs none (no critic engine, optimizer, scoring, "
            "update or checkpoint)",
            p.advantage_mode,
        )
    auto = [s.requested for s in frozen] + ([p.critic_scoring] if critic is not None else [])
    auto += [placement.AUTO] if p.forward_micro_batch_size == 0 else []
    budget = ppo_frozen.placement_budget(ctx) if placement.AUTO in auto else 0
    ref, *rewards = ppo_frozen.build_frozen(ctx, frozen, ds, engines.model_dtype(actor), budget)
    # pi_old's forwards run beside the actor's materialised copy (generation.py)
    left = budget - placement.resident_bytes([ref, *rewards])
    left -= placement.model_bytes(actor.module, engines.model_dtype(actor))
    critic_copy = None
    if critic is not None:
        how = ppo_frozen.critic_scoring(p.critic_scoring, critic, [ref, *rewards], budget)
        if how.placement == placement.MATERIALISE:  # LoRA kept as adapters: the engine's values
            critic_copy = PlainCopy(critic, p.gather_modules, merge_lora=False)
            left -= placement.model_bytes(critic.module, engines.model_dtype(critic))
    forward_rows = ppo_frozen.scoring_rows(ctx, sizes, actor, left)
    generator = make_backend(actor, tokenizer, p.gather_modules)
    log.info(
        "generation: the actor's weights materialised into a plain module each phase "
        "(pipeline/generation.py)"
    )
    return PPOModels(
        actor, critic, ref, rewards, reward_pad_ids, generator, critic_copy, forward_rows
    )


class PromptOrder:
    """Rows (prompts, PTX rows) in a fresh seeded permutation per pass; resumable (the state is
    JSON)."""

    def __init__(self, n: int, seed: int):
        self.n, self.g, self.queue = n, torch.Generator().manual_seed(seed), []

    def take(self, k: int) -> list[int]:
        if len(self.queue) < k:  # reshuffle each pass over the prompts
            self.queue += torch.randperm(self.n, generator=self.g).tolist()
        chosen, self.queue = self.queue[:k], self.queue[k:]
        return chosen

    def state_dict(self) -> dict:
        return {"queue": self.queue, "generator": self.g.get_state().tolist()}

    def load_state_dict(self, s: dict) -> None:
        self.queue = list(s["queue"])
        self.g.set_state(torch.tensor(s["generator"], dtype=torch.uint8))


def ptx_micro_batches(t: PPOTrainer) -> tuple[list[dict], torch.Tensor]:
    """The next global mini-batch of PTX rows (drawn in `t.ptx_order`): this rank's share as
    micro-batches, and the global count of their labelled (response) tokens."""
    per_rank, r = t.sizes.mini_per_rank, t.d.rank
    chosen = t.ptx_order.take(t.p.mini_batch_size)[r * per_rank : (r + 1) * per_rank]
    rows = [t.ptx[i] for i in chosen]
    batches = [
        to_device(data.collate_sft(rows[s], t.tokenizer.pad_token_id))
        for s in t.micro_slices(len(rows))
    ]
    tokens = sum((b["labels"][:, 1:] != data.IGNORE_INDEX).sum() for b in batches)
    return batches, collectives.all_reduce_sum(tokens.float()).clamp(min=1)
