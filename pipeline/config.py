"""Run configuration: one tree of dataclasses, loaded from YAML/JSON with command-line overrides.

Precedence: field defaults < `--config FILE` < command-line flags (`--sft.learning_rate 3e-4`).
Every field carries a comment; `--help` lists every option with its default. Derived sizes
(global batch sizes) are computed and checked here and nowhere else.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from pipeline.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class TaskConfig:
    """Sizes of the embedded default task (used when no dataset paths are given)."""

    num_sft: int = 6000  # SFT demonstrations (prompt, response)
    num_pairs: int = 6000  # preference pairs (prompt, chosen, rejected) for the reward model
    num_prompts: int = 4000  # PPO training prompts
    num_eval: int = 256  # held-out prompts (distinct, never in training data), SFT demonstrations and preference pairs, each
    label_noise: float = 0.1  # probability that a training preference label is flipped


@dataclass
class ModelConfig:
    """The policy model. Empty `model_name_or_path` builds the default task's Llama from scratch."""

    model_name_or_path: str = ""  # HF hub name or local folder; empty = from scratch (below)
    reward_model_name_or_path: str = ""  # the reward model's (and so the critic's) own base model, e.g. a smaller one; empty = as the policy (see reward_init)
    hidden_size: int = 256  # from-scratch model: width
    num_hidden_layers: int = 4  # from-scratch model: depth
    num_attention_heads: int = 4  # from-scratch model: heads
    intermediate_size: int = 688  # from-scratch model: MLP width
    trust_remote_code: bool = False  # allow custom modelling code from the model folder
    dtype: str = "auto"  # precision of every engine: auto (bf16 on an accelerator other than the CPU that supports it, else fp32), fp32, bf16 or fp16 (GPU; dynamic loss scaling); fills the DeepSpeed bf16/fp16 sections
    gradient_checkpointing: bool = False  # recompute each layer's activations in backward (trained models): less activation memory, ~1/3 more compute


PRECISIONS = ("fp32", "bf16", "fp16")
SCORE_NORMS = ("none", "sft", "running")
EVAL_METRICS = ("eval/gold_score", "eval/win_rate_vs_sft", "eval/reward_score", "eval/reward_model_raw",
                "eval/reward_lcb")  # ppo.select_best candidates (the stage checks which this run has)
AUTO = "auto"  # model.dtype, ds_config, ds_inference_config: chosen for the accelerator (engines.resolve_auto)
DATA_FORMATS = ("auto", "prompt_response", "prompt_chosen_rejected", "hh", "messages", "prompt")


@dataclass
class DataConfig:
    """Datasets (local json/jsonl/parquet/csv files or folders). Empty = the embedded default task."""

    tokenizer_path: str = ""  # tokenizer folder or hub name; empty = the model's, or the task's
    data_path: list[str] = field(default_factory=list)  # one or more datasets feeding every stage (split by data_split); a stage's own path below overrides it
    data_split: str = "2,4,4"  # shares of each data_path dataset for SFT, reward model, PPO (seeded, disjoint)
    data_weights: list[float] = field(default_factory=list)  # mixing weights of the data_path datasets, one each (empty: concatenate)
    data_format: str = "auto"  # auto (from the columns), prompt_response, prompt_chosen_rejected, hh, messages or prompt
    eval_fraction: float = 0.05  # share of a stage's user rows held out for evaluation when it has no eval path
    sft_data_path: str = ""  # rows with `prompt`, `response`
    sft_eval_data_path: str = ""  # held-out rows with `prompt`, `response`
    reward_data_path: str = ""  # rows with `prompt`, `chosen`, `rejected`
    reward_eval_data_path: str = ""  # held-out rows with `prompt`, `chosen`, `rejected`
    prompt_data_path: str = ""  # rows with `prompt` (PPO)
    eval_prompt_data_path: str = ""  # held-out rows with `prompt` (PPO evaluation)
    max_prompt_len: int = 256  # tokens (the tokenizer's special tokens included); a longer prompt is cut from the left (its BOS kept), and each dataset says once how many it cut
    max_response_len: int = 24  # tokens, EOS included: the longest dataset response (longer ones are cut, with a warning) and, unless ppo.max_new_tokens says otherwise, the length of PPO's sampled responses


@dataclass
class TrainConfig:
    """Optimisation settings of one supervised stage (SFT or reward model)."""

    epochs: int = 2  # passes over the training set
    max_steps: int = -1  # stop after this many optimizer steps (-1: run all epochs)
    learning_rate: float = 1e-3  # peak learning rate (AdamW)
    weight_decay: float = 0.0  # AdamW weight decay
    lr_scheduler: str = "cosine"  # transformers scheduler name: cosine, linear, constant_with_warmup
    warmup_ratio: float = 0.05  # fraction of steps spent warming up
    micro_batch_size_per_gpu: int = 16  # rows (pairs for the reward model) per rank per micro-step
    gradient_accumulation_steps: int = 1  # micro-steps per optimizer step
    logging_steps: int = 10  # log train metrics every N optimizer steps
    eval_steps: int = 100  # evaluate every N optimizer steps (and at the end)
    gradient_clipping: float = 1.0  # max global gradient norm (0: off)


@dataclass
class RewardConfig(TrainConfig):
    """The reward-model stage: TrainConfig plus the ensemble."""

    ensemble_size: int = 1  # reward models trained (different seeds: initialisation and data order); PPO scores with all of them (see ppo.ensemble_penalty)


@dataclass
class PPOConfig:
    """The PPO stage: rollout sizes, objective and its coefficients."""

    actor_model_path: str = ""  # start from this policy folder; empty = the SFT stage's output
    reward_model_path: str = ""  # reward model folder; empty = the reward stage's output
    num_iterations: int = 60  # PPO iterations (rollout + update)
    rollout_batch_size: int = 32  # prompts per iteration, over all ranks (each sampled num_samples_per_prompt times: rollout_batch_size x num_samples_per_prompt rows)
    num_samples_per_prompt: int = 1  # responses sampled for each prompt (a group); each rank samples the groups of its own prompts, so a group never spans ranks. The group estimators (grpo, dr_grpo, rloo, reinforce_pp_baseline) need >= 2
    mini_batch_size: int = 16  # rollout rows (responses) per optimizer step, over all ranks
    micro_batch_size_per_gpu: int = 8  # rows per rank per forward/backward
    num_ppo_epochs: int = 1  # passes over each rollout
    actor_learning_rate: float = 2e-4  # actor peak learning rate
    critic_learning_rate: float = 2e-4  # critic peak learning rate
    actor_lora_rank: int = 0  # rank of LoRA adapters on the actor (0: off, every weight is trained); LoRA usually wants a higher actor_learning_rate
    critic_lora_rank: int = 0  # rank of LoRA adapters on the critic (0: off); its scalar score head is trained in full either way
    lora_alpha: float = 16.0  # LoRA scale: an adapted layer's weight is W + (lora_alpha / rank) * B @ A
    lora_target_modules: list[str] = field(default_factory=lambda: ["all-linear"])  # layers LoRA adapts: all-linear (every linear layer in the transformer blocks, not the LM or score head) or module names such as q_proj v_proj
    warmup_iterations: int = 2  # linear warmup, in iterations
    temperature: float = 1.0  # sampling temperature; every PPO log-prob (pi_old, pi, reference, KL, entropy) is of logits / temperature, the distribution sampled from
    top_p: float = 1.0  # nucleus sampling: only 1 (off); a truncated distribution makes the log-probs and KL disagree with the sampler, so other values are refused
    top_k: int = 0  # top-k sampling: only 0 (off), refused otherwise for the same reason as top_p
    max_new_tokens: int = 0  # new tokens sampled per response (EOS included) in PPO rollouts and evaluation; 0: data.max_response_len, the length the SFT and reward-model data were cut to
    min_new_tokens: int = 0  # EOS is suppressed until this many response tokens, in sampling and in every PPO log-prob alike
    gather_modules: int = 0  # hybrid engine: submodules gathered at a time to materialise (0: all)
    clip_eps: float = 0.2  # PPO ratio clip: the ratio is clipped to [1 - clip_eps_low, 1 + clip_eps_high], both clip_eps unless given
    clip_eps_low: Optional[float] = None  # lower ratio clip (none: clip_eps)
    clip_eps_high: Optional[float] = None  # upper ratio clip (none: clip_eps); above clip_eps_low is DAPO's clip-higher (0.28 with low 0.2), against entropy collapse
    dual_clip: float = 0.0  # dual-clip PPO (Ye et al. 2020): the loss of a negative-advantage token is capped at -A x dual_clip (0: off; else > 1, e.g. 3)
    loss_agg: str = "token_mean"  # how per-token losses (policy, entropy, KL loss) are averaged: token_mean (over the mini-batch's tokens, all ranks), seq_mean_token_mean (each response's token mean, then over responses: GRPO) or seq_mean_token_sum_norm (each response's token sum / data.max_response_len, then over responses: Dr. GRPO)
    value_clip: float = 0.2  # clip of V around old values (0: off)
    vf_coef: float = 0.5  # c1, critic loss weight
    entropy_coef: float = 0.0  # c2, entropy bonus weight
    gamma: float = 1.0  # GAE discount
    lam: float = 0.95  # GAE lambda
    advantage_mode: str = "gae"  # the advantage estimator (pipeline/ppo_math.py ADVANTAGE_ESTIMATORS): gae (token-level GAE) or sequence (A = R - V(prompt)), both with a critic; critic-free (no critic engine at all): grpo, dr_grpo, rloo, reinforce_pp_baseline (groups: num_samples_per_prompt >= 2) and reinforce_pp
    whiten_advantages: bool = True  # whiten advantages over the masked rollout of every rank (reinforce_pp and reinforce_pp_baseline always do)
    kl_penalty: str = "reward"  # where the KL to the reference goes: reward (-beta KL_t in every token's reward: PPO, REINFORCE++) or loss (+ beta x KL of the current policy in the actor loss, aggregated like it: GRPO; needs kl_estimator k2 or k3)
    kl_estimator: str = "k1"  # per-token KL estimator of the penalty: k1 (log-ratio), k2 or k3
    kl_coef: float = 0.1  # initial beta of the KL penalty (in the reward or the loss, see kl_penalty)
    adaptive_kl: bool = False  # adapt beta towards target_kl (Ziegler et al. 2019); false: beta stays kl_coef
    target_kl: float = 3.0  # adaptive controller target (sequence KL, nats per response)
    kl_horizon: int = 128  # adaptive controller horizon (samples): beta moves by up to 0.2 x min(rollout_batch_size / horizon, 1) per iteration (5% at 32 rollouts)
    kl_alarm: float = 0.0  # warn (alarm/kl_to_ref) when the rollout KL to the reference exceeds this many nats (0: 2 x target_kl with adaptive_kl, else off)
    score_clip: float = 5.0  # clip the reward-model score to +-score_clip (0: off)
    reward_model_coef: float = 1.0  # weight of the reward model's score in the reward; 0: no reward model (needs reward_fn), no reward stage, the critic starts from the policy with a fresh value head
    reward_fn: str = ""  # FILE.py:NAME or module:NAME, f(prompts, responses) -> floats: a rule-based reward added to the score (weight reward_fn_coef)
    reward_fn_coef: float = 1.0  # weight of reward_fn in the reward
    ensemble_penalty: float = 0.0  # with a reward-model ensemble (reward.ensemble_size > 1): reward = mean - ensemble_penalty x std over the members, each normalised on its held-out pairs (Coste et al. 2023)
    eval_reward_fn: str = ""  # FILE.py:NAME or module:NAME, f(prompts, responses) -> floats: your gold metric, logged as eval/gold_score (evaluation only); empty: the default task's gold on its own prompts, none otherwise
    select_best: str = ""  # also keep the policy with the best value of this evaluation metric (e.g. eval/gold_score) as <ppo>/model_best; empty: off
    score_norm: str = "none"  # the reward model's score before the KL penalty and score_clip: none, sft (fixed mean/std of the scores of the SFT policy's held-out responses at step 0; beta then means the same on every task) or running (running mean/std of every rollout's scores)
    early_stop_kl: float = 0.0  # stop the epoch loop when approx KL to pi_old exceeds this (0: off)
    max_nonfinite_skips: int = 3  # stop after this many non-finite updates in a row
    gradient_clipping: float = 1.0  # max global gradient norm for actor and critic
    eval_steps: int = 10  # evaluate on held-out prompts every N iterations (and at 0 and the end); 0: no evaluation (no eval/ metrics, no eval-based summary fields; select_best refused)
    logging_steps: int = 1  # log every N iterations
    ptx_coef: float = 0.0  # PPO-ptx (InstructGPT): weight of a supervised LM loss on ptx data added to the actor loss (0: off)
    ptx_data_path: str = ""  # PPO-ptx dataset in any SFT format (prompt/response, messages, hh, ...); empty = the SFT stage's training data
    ema_beta: float = 0.0  # EMA of the actor weights after each optimizer step, saved as <ppo>/model_ema (0: off; e.g. 0.992)


@dataclass
class Config:
    """The whole run."""

    output_dir: str = "runs/default"  # each stage writes <output_dir>/<stage>
    seed: int = 42  # seeds data generation, initialisation, shuffling and sampling
    force: bool = False  # rerun stages from scratch even when their outputs are up to date
    dist_timeout_minutes: float = 120.0  # process-group timeout: a rank waiting longer in a collective (a dead node, a hung rank) fails instead of hanging; covers rank-0 work the others wait for (task generation, tokenising, checkpoint conversion)
    save_steps: int = 50  # checkpoint every N optimizer steps (SFT, RM) or PPO iterations; 0: never
    keep_last: int = 2  # checkpoints kept per stage (older ones are deleted)
    resume: bool = True  # an unfinished stage resumes from its newest intact checkpoint; false: start over
    deepspeed_monitor: bool = False  # also log DeepSpeed's engine metrics to <stage>/tensorboard
    ds_config: str = "auto"  # DeepSpeed JSON of trained engines; auto: ds_configs/zero3_train.json on CPU, ds_configs/zero3_train_gpu.json on other accelerators
    ds_inference_config: str = "auto"  # DeepSpeed JSON of the frozen reference and reward model; auto: ds_configs/zero3_offload_inference.json on CPU, ..._gpu.json (pinned offload) elsewhere
    cache_dir: str = ""  # tokenised examples are cached here by content hash, built once per node (empty: ~/.cache/rlhf-pipeline)
    reward_init: str = "auto"  # reward model starts from: sft (SFT output), base (the SFT's start), auto (base for a from-scratch model, else sft)
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sft: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=2, learning_rate=2e-3))
    reward: RewardConfig = field(default_factory=lambda: RewardConfig(epochs=3, learning_rate=5e-4))
    ppo: PPOConfig = field(default_factory=PPOConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- derived sizes and checks
def global_batch(micro_batch_size_per_gpu: int, gradient_accumulation_steps: int, world_size: int) -> int:
    """Rows per optimizer step over all ranks."""
    return micro_batch_size_per_gpu * gradient_accumulation_steps * world_size


@dataclass(frozen=True)
class PPOSizes:
    """Per-rank PPO sizes, derived from the ppo section and the rank count by `ppo_sizes`."""

    prompts_per_rank: int  # ppo.rollout_batch_size / ranks: prompts each rank samples
    rollout_per_rank: int  # rollout rows: prompts_per_rank x num_samples_per_prompt
    mini_per_rank: int  # ppo.mini_batch_size / ranks: rows of each optimizer step on a rank
    micro_batch_size_per_gpu: int  # ppo.micro_batch_size_per_gpu, clamped to mini_per_rank
    micro_clamped: bool  # whether that clamp applied
    gradient_accumulation_steps: int  # mini_per_rank / micro_batch_size_per_gpu
    mini_batches_per_epoch: int  # optimizer steps per PPO epoch


def ppo_sizes(ppo: PPOConfig, world_size: int) -> PPOSizes:
    """Per-rank PPO sizes; raise UserError when they do not divide.

    A micro-batch larger than a rank's share of the mini-batch is clamped to that share
    (`micro_batch_size_per_gpu` here; `micro_clamped` says so), so the defaults run on 1, 2, 4 and
    8 ranks; 1 and 2 ranks keep the configured micro-batch.
    """
    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise UserError(f"option ppo: {msg} (world size {world_size}).")

    rows = ppo.rollout_batch_size * ppo.num_samples_per_prompt
    need(rows % ppo.mini_batch_size == 0,
         f"ppo.rollout_batch_size x ppo.num_samples_per_prompt = {ppo.rollout_batch_size} x "
         f"{ppo.num_samples_per_prompt} = {rows} rollout rows must be a multiple of "
         f"ppo.mini_batch_size={ppo.mini_batch_size}" if ppo.num_samples_per_prompt > 1 else
         f"ppo.rollout_batch_size={ppo.rollout_batch_size} must be a multiple of "
         f"ppo.mini_batch_size={ppo.mini_batch_size}")
    need(ppo.mini_batch_size % world_size == 0,
         f"ppo.mini_batch_size={ppo.mini_batch_size} must be a multiple of the number of ranks")
    need(ppo.rollout_batch_size % world_size == 0,
         f"ppo.rollout_batch_size={ppo.rollout_batch_size} (prompts) must be a multiple of the number of ranks: "
         f"each rank samples ppo.num_samples_per_prompt responses to each of its own prompts, so that a "
         f"group lives on one rank")
    per_rank_mini = ppo.mini_batch_size // world_size
    micro = min(ppo.micro_batch_size_per_gpu, per_rank_mini)
    need(per_rank_mini % micro == 0,
         f"ppo.mini_batch_size / ranks = {per_rank_mini} must be a multiple of "
         f"ppo.micro_batch_size_per_gpu={ppo.micro_batch_size_per_gpu}")
    return PPOSizes(
        prompts_per_rank=ppo.rollout_batch_size // world_size,
        rollout_per_rank=rows // world_size,
        mini_per_rank=per_rank_mini,
        micro_batch_size_per_gpu=micro,
        micro_clamped=micro != ppo.micro_batch_size_per_gpu,
        gradient_accumulation_steps=per_rank_mini // micro,
        mini_batches_per_epoch=rows // ppo.mini_batch_size,
    )


def max_new_tokens(cfg: Config) -> int:
    """Tokens sampled per PPO response (EOS included): ppo.max_new_tokens, or data.max_response_len."""
    return cfg.ppo.max_new_tokens or cfg.data.max_response_len


LR_SCHEDULERS = ("cosine", "linear", "constant_with_warmup", "constant", "polynomial",
                 "cosine_with_restarts", "inverse_sqrt")


def validate(cfg: Config) -> None:
    """Checks that do not depend on the world size. Raises UserError naming the option."""
    def positive(name: str, value: float) -> None:
        if not value > 0:  # also rejects NaN
            raise UserError(f"option {name}={value} must be > 0.")

    def non_negative(name: str, value: float) -> None:
        if not value >= 0:  # also rejects NaN
            raise UserError(f"option {name}={value} must be >= 0.")

    def within(name: str, value: float, low: float, high: float) -> None:
        if not low <= value <= high:
            raise UserError(f"option {name}={value} must be in [{low}, {high}].")

    for stage in ("sft", "reward"):
        t: TrainConfig = getattr(cfg, stage)
        for f in ("epochs", "learning_rate", "micro_batch_size_per_gpu",
                  "gradient_accumulation_steps", "logging_steps", "eval_steps"):
            positive(f"{stage}.{f}", getattr(t, f))
        for f in ("weight_decay", "gradient_clipping"):
            non_negative(f"{stage}.{f}", getattr(t, f))
        if t.max_steps != -1 and t.max_steps < 1:
            raise UserError(f"option {stage}.max_steps={t.max_steps} must be >= 1, or -1 to run all epochs.")
        if not 0 <= t.warmup_ratio < 1:
            raise UserError(f"option {stage}.warmup_ratio={t.warmup_ratio} must be in [0, 1).")
        if t.lr_scheduler not in LR_SCHEDULERS:
            raise UserError(f"option {stage}.lr_scheduler={t.lr_scheduler!r}: expected one of "
                            f"{', '.join(LR_SCHEDULERS)}.")
    p = cfg.ppo
    for f in ("num_iterations", "rollout_batch_size", "mini_batch_size", "micro_batch_size_per_gpu",
              "num_ppo_epochs", "actor_learning_rate", "critic_learning_rate", "temperature",
              "clip_eps", "logging_steps", "target_kl", "kl_horizon", "max_nonfinite_skips"):
        positive(f"ppo.{f}", getattr(p, f))
    for f in ("warmup_iterations", "top_k", "min_new_tokens", "gather_modules", "value_clip", "vf_coef",
              "entropy_coef", "kl_coef", "score_clip", "early_stop_kl", "gradient_clipping", "ptx_coef",
              "kl_alarm", "reward_model_coef", "ensemble_penalty", "max_new_tokens", "eval_steps"):
        non_negative(f"ppo.{f}", getattr(p, f))
    validate_rewards(cfg)
    validate_lora(p)
    within("ppo.gamma", p.gamma, 0.0, 1.0)
    within("ppo.lam", p.lam, 0.0, 1.0)
    if cfg.reward_init not in ("auto", "base", "sft"):
        raise UserError(f"option reward_init={cfg.reward_init!r}: expected 'auto', 'base' or 'sft'.")
    if cfg.reward_init == "sft" and cfg.model.reward_model_name_or_path:
        raise UserError(f"option reward_init=sft asks the reward model to start from the SFT policy, but "
                        f"model.reward_model_name_or_path={cfg.model.reward_model_name_or_path!r} gives it a "
                        f"base model of its own; drop one of the two.")
    validate_estimator(p)
    if p.score_norm not in SCORE_NORMS:
        raise UserError(f"option ppo.score_norm={p.score_norm!r}: expected one of {', '.join(SCORE_NORMS)}.")
    if not 0 <= p.ema_beta < 1:
        raise UserError(f"option ppo.ema_beta={p.ema_beta} must be in [0, 1) (0: no EMA of the actor; "
                        f"DeepSpeed-Chat uses 0.992).")
    if not 0 < p.top_p <= 1:
        raise UserError(f"option ppo.top_p={p.top_p} must be in (0, 1].")
    validate_sampling(p)
    if cfg.save_steps < 0:
        raise UserError(f"option save_steps={cfg.save_steps} must be >= 0 (0: no periodic checkpoints).")
    positive("keep_last", cfg.keep_last)
    positive("dist_timeout_minutes", cfg.dist_timeout_minutes)
    for f in ("max_prompt_len", "max_response_len"):
        positive(f"data.{f}", getattr(cfg.data, f))
    validate_data(cfg.data)
    for f in ("num_sft", "num_pairs", "num_prompts", "num_eval"):
        positive(f"task.{f}", getattr(cfg.task, f))
    from pipeline.default_task import MAX_EVAL_PROMPTS

    if cfg.task.num_eval > MAX_EVAL_PROMPTS:
        raise UserError(f"option task.num_eval={cfg.task.num_eval} must be <= {MAX_EVAL_PROMPTS}: the default task "
                        f"keeps its held-out prompts out of training, and has twice that many distinct prompts.")
    if not 0 <= cfg.task.label_noise < 0.5:
        raise UserError(f"option task.label_noise={cfg.task.label_noise} must be in [0, 0.5).")
    m = cfg.model
    if m.dtype not in (AUTO, *PRECISIONS):
        raise UserError(f"option model.dtype={m.dtype!r}: expected one of {', '.join((AUTO, *PRECISIONS))}.")
    if not m.model_name_or_path:  # the from-scratch model's shape
        for f in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
            positive(f"model.{f}", getattr(m, f))
        if m.hidden_size % m.num_attention_heads:
            raise UserError(f"option model.hidden_size={m.hidden_size} must be a multiple of "
                            f"model.num_attention_heads={m.num_attention_heads}.")
    if not 0 <= cfg.seed < 2**32:
        raise UserError(f"option seed={cfg.seed} must be in [0, 2**32).")


def validate_rewards(cfg: Config) -> None:
    """What the reward is made of: the reward model(s) and/or a reward function."""
    p = cfg.ppo
    if not cfg.reward.ensemble_size >= 1:
        raise UserError(f"option reward.ensemble_size={cfg.reward.ensemble_size} must be >= 1 (1: one reward model).")
    if not math.isfinite(p.reward_fn_coef):
        raise UserError(f"option ppo.reward_fn_coef={p.reward_fn_coef} must be a finite number.")
    if p.reward_model_coef == 0 and not p.reward_fn:
        raise UserError("option ppo.reward_model_coef=0 leaves no reward: give --ppo.reward_fn FILE.py:NAME (a "
                        "rule-based reward) or keep the reward model (reward_model_coef > 0).")
    if p.reward_model_coef == 0 and p.reward_model_path:
        raise UserError(f"option ppo.reward_model_path={p.reward_model_path!r} is given but ppo.reward_model_coef=0 "
                        f"uses no reward model; drop one of the two.")
    if p.ensemble_penalty > 0 and cfg.reward.ensemble_size < 2:
        raise UserError(f"option ppo.ensemble_penalty={p.ensemble_penalty} penalises disagreement between reward "
                        f"models, but reward.ensemble_size={cfg.reward.ensemble_size}: train an ensemble "
                        f"(--reward.ensemble_size 3) or set ppo.ensemble_penalty 0.")
    if cfg.reward.ensemble_size > 1 and p.reward_model_path:
        raise UserError(f"option reward.ensemble_size={cfg.reward.ensemble_size} trains an ensemble for PPO, but "
                        f"ppo.reward_model_path={p.reward_model_path!r} scores with one given model; drop one of "
                        f"the two.")
    if p.select_best and p.select_best not in EVAL_METRICS:
        raise UserError(f"option ppo.select_best={p.select_best!r}: expected an evaluation metric, one of "
                        f"{', '.join(EVAL_METRICS)} (higher is better).")
    if p.select_best and p.eval_steps == 0:
        raise UserError(f"option ppo.select_best={p.select_best!r} keeps the policy with the best evaluation, but "
                        f"ppo.eval_steps=0 turns evaluation off; give ppo.eval_steps > 0 or drop select_best.")
    for option in ("reward_fn", "eval_reward_fn"):
        if getattr(p, option):
            from pipeline.reward_fns import split_spec

            split_spec(getattr(p, option), f"ppo.{option}")


def validate_estimator(p: PPOConfig) -> None:
    """The advantage estimator (a name of ppo_math's registry), groups, the KL placement and the
    policy-loss variants."""
    from pipeline.ppo_math import ADVANTAGE_ESTIMATORS, KL_ESTIMATORS, LOSS_AGG_MODES

    name = p.advantage_mode
    if name not in ADVANTAGE_ESTIMATORS:
        raise UserError(f"option ppo.advantage_mode={name!r}: expected one of {', '.join(ADVANTAGE_ESTIMATORS)}.")
    est = ADVANTAGE_ESTIMATORS[name]
    if not p.num_samples_per_prompt >= 1:
        raise UserError(f"option ppo.num_samples_per_prompt={p.num_samples_per_prompt} must be >= 1.")
    if est.needs_groups and p.num_samples_per_prompt < 2:
        raise UserError(f"option ppo.num_samples_per_prompt={p.num_samples_per_prompt}: ppo.advantage_mode={name} "
                        f"compares each response with the other responses to the same prompt, so it needs "
                        f"ppo.num_samples_per_prompt >= 2 (e.g. 4).")
    if est.whitens and not p.whiten_advantages:
        raise UserError(f"option ppo.whiten_advantages=false: ppo.advantage_mode={name} (REINFORCE++) whitens its "
                        f"advantages over the global rollout by definition; set whiten_advantages true or choose "
                        f"another estimator.")
    if not est.needs_critic and p.critic_lora_rank:
        raise UserError(f"option ppo.critic_lora_rank={p.critic_lora_rank}: ppo.advantage_mode={name} uses no critic; "
                        f"set critic_lora_rank 0.")
    if p.kl_estimator not in KL_ESTIMATORS:
        raise UserError(f"option ppo.kl_estimator={p.kl_estimator!r}: expected one of {', '.join(KL_ESTIMATORS)}.")
    if p.kl_penalty not in ("reward", "loss"):
        raise UserError(f"option ppo.kl_penalty={p.kl_penalty!r}: expected 'reward' (in every token's reward) or "
                        f"'loss' (a term of the actor loss).")
    if p.kl_penalty == "loss" and p.kl_estimator == "k1":
        raise UserError("option ppo.kl_estimator=k1 with ppo.kl_penalty=loss: the gradient of the k1 estimate (the "
                        "log-ratio) is zero in expectation on the policy's own samples, so it would not pull towards "
                        "the reference; use k3 (GRPO) or k2.")
    if p.loss_agg not in LOSS_AGG_MODES:
        raise UserError(f"option ppo.loss_agg={p.loss_agg!r}: expected one of {', '.join(LOSS_AGG_MODES)}.")
    for option in ("clip_eps_low", "clip_eps_high"):
        value = getattr(p, option)
        if value is not None and not 0 < value < (1 if option == "clip_eps_low" else math.inf):
            raise UserError(f"option ppo.{option}={value} must be "
                            f"{'in (0, 1)' if option == 'clip_eps_low' else '> 0'} (none: ppo.clip_eps).")
    if not (p.dual_clip == 0 or p.dual_clip > 1):
        raise UserError(f"option ppo.dual_clip={p.dual_clip} must be 0 (off) or > 1: the loss of a negative-advantage "
                        f"token is capped at -A x dual_clip, which must lie above the clipped PPO loss (e.g. 3).")


def validate_sampling(p: PPOConfig) -> None:
    """Sampling settings PPO can compute log-probs for (as TRL does): pi_old, pi and the reference
    are all read from logits / temperature (with EOS blocked before min_new_tokens), exactly the
    distribution the sampler draws from. A truncated distribution (top-k, top-p) cannot be matched:
    the reference would need the same truncation, and KL(pi || ref) is infinite where ref is zero."""
    why = ("PPO's log-probs (pi_old, pi, the reference) and the KL penalty are computed from the full "
           "distribution logits / ppo.temperature, so sampling from a truncated one would make them "
           "disagree with the sampler (and the KL to an untruncated reference infinite); use ppo.temperature "
           "to make sampling less random")
    if p.top_k != 0:
        raise UserError(f"option ppo.top_k={p.top_k}: top-k sampling is not supported, set it to 0 (off). {why}.")
    if p.top_p != 1:
        raise UserError(f"option ppo.top_p={p.top_p}: nucleus sampling is not supported, set it to 1 (off). {why}.")


def validate_lora(p: PPOConfig) -> None:
    """LoRA options (which layers exist is checked when the models are built)."""
    for f in ("actor_lora_rank", "critic_lora_rank"):
        if not getattr(p, f) >= 0:
            raise UserError(f"option ppo.{f}={getattr(p, f)} must be >= 0 (0: no LoRA, train every weight).")
    if not p.lora_alpha > 0:
        raise UserError(f"option ppo.lora_alpha={p.lora_alpha} must be > 0 (adapters are scaled by lora_alpha / rank).")
    names = p.lora_target_modules
    if (p.actor_lora_rank or p.critic_lora_rank) and not names:
        raise UserError("option ppo.lora_target_modules is empty but a LoRA rank is set: name the layers to adapt "
                        "(e.g. q_proj v_proj), or all-linear for every linear layer of the transformer blocks.")
    if "all-linear" in names and len(names) > 1:
        raise UserError(f"option ppo.lora_target_modules={names}: all-linear already takes every linear layer; "
                        f"give either all-linear alone or a list of module names.")


def parse_split(text: str) -> tuple[float, ...]:
    """`--data.data_split 2,4,4`: three non-negative shares (SFT, reward model, PPO), not all zero."""
    try:
        shares = tuple(float(x) for x in text.split(","))
    except ValueError:
        shares = ()
    if len(shares) != 3 or not all(s >= 0 for s in shares) or not sum(shares) > 0:
        raise UserError(f"option data.data_split={text!r}: expected three non-negative shares for SFT, "
                        f"reward model and PPO, not all zero, e.g. 2,4,4 (DeepSpeed-Chat's convention).")
    return shares


def validate_data(dc: DataConfig) -> None:
    parse_split(dc.data_split)
    if dc.data_format not in DATA_FORMATS:
        raise UserError(f"option data.data_format={dc.data_format!r}: expected one of {', '.join(DATA_FORMATS)}.")
    if dc.data_weights:
        if not dc.data_path:
            raise UserError("option data.data_weights is given but data.data_path is not: the weights mix "
                            "the data_path datasets.")
        if len(dc.data_weights) != len(dc.data_path):
            raise UserError(f"option data.data_weights has {len(dc.data_weights)} values but data.data_path "
                            f"has {len(dc.data_path)} datasets: give one weight per dataset.")
        if not all(w >= 0 for w in dc.data_weights) or not sum(dc.data_weights) > 0:
            raise UserError(f"option data.data_weights={dc.data_weights}: weights must be >= 0 and not all zero.")
    if not 0 < dc.eval_fraction <= 0.5:
        raise UserError(f"option data.eval_fraction={dc.eval_fraction} must be in (0, 0.5].")


# ---------------------------------------------------------------- loading
def _field_types(cls) -> dict:
    return typing.get_type_hints(cls)


def _is_dataclass_type(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp, where: str) -> Any:
    """Check/convert a value from a file or the command line to the field's type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(value, args[0], where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif origin is list:  # a YAML list, the command line's values, or one value
        (item,) = typing.get_args(tp)
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        if item is not str:  # numbers may also be given as "1,3"
            values = [v for x in values for v in (x.split(",") if isinstance(x, str) else [x])]
        return [_coerce(v, item, where) for v in values if not (isinstance(v, str) and not v.strip())]
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    raise UserError(f"{where}: expected {getattr(tp, '__name__', tp)}, got {value!r}.")


def _from_dict(cls, data: dict, where: str, default=None):
    """A `cls` instance from a mapping, starting from `default` (so sections keep their defaults)."""
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a mapping of options, got {type(data).__name__}.")
    default = cls() if default is None else default
    hints = _field_types(cls)
    changes = {}
    for key, value in data.items():
        sub = f"{where}.{key}" if where else key
        if key not in hints:
            known = ", ".join(sorted(hints))
            close = difflib.get_close_matches(str(key), list(hints), n=1)
            hint = f" (did you mean {f'{where}.' if where else ''}{close[0]}?)" if close else ""
            raise UserError(f"{where or 'config'}: unknown option {sub!r}{hint}. Known options here: {known}.")
        tp = hints[key]
        changes[key] = (_from_dict(tp, value, sub, getattr(default, key)) if _is_dataclass_type(tp)
                        else _coerce(value, tp, f"option {sub}"))
    return dataclasses.replace(default, **changes)


def load_file(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file {path} does not exist.")
    try:
        text = p.read_text(encoding="utf-8")
        data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"config file {path} is not valid {'JSON' if p.suffix == '.json' else 'YAML'}: "
                        f"{str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path}: the top level must be a mapping of options.")
    return data


def _flat_fields(cls, prefix: str = ""):
    """Yield (dotted name, type, default, comment) for every leaf option."""
    default = cls()
    comments = _field_comments(cls)
    for f in dataclasses.fields(cls):
        tp = _field_types(cls)[f.name]
        name = f"{prefix}{f.name}"
        if _is_dataclass_type(tp):
            sub_default = getattr(default, f.name)
            for n, t, _, c in _flat_fields(tp, f"{name}."):
                yield n, t, getattr(sub_default, n[len(name) + 1:]), c
        else:
            yield name, tp, getattr(default, f.name), comments.get(f.name, "")


def _field_comments(cls) -> dict:
    """The trailing `# comment` of each field in the class source: the help text."""
    import inspect

    out = {}
    for line in (line for c in reversed(cls.__mro__[:-1]) for line in inspect.getsource(c).splitlines()):
        line = line.strip()
        if ":" in line and "#" in line and not line.startswith(("#", '"')):
            name = line.split(":", 1)[0].strip()
            out[name] = line.split("#", 1)[1].strip()
    return out


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _split_lines(self, text, width):  # keep values such as all-linear whole
        import textwrap

        return textwrap.wrap(self._whitespace_matcher.sub(" ", text).strip(), width, break_on_hyphens=False)


def build_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=description, argument_default=argparse.SUPPRESS, allow_abbrev=False,
        formatter_class=_HelpFormatter)
    parser.add_argument("--config", action="append", help="YAML or JSON file of options; may be given several times "
                        "(e.g. a preset and a recipe: later files override earlier ones, command-line flags all)")
    parser.add_argument("--local_rank", type=int, help="set by the deepspeed launcher")
    for name, tp, default, comment in _flat_fields(Config):
        kw = {"metavar": "BOOL"} if tp is bool else {"nargs": "+"} if typing.get_origin(tp) is list else {}
        parser.add_argument(f"--{name}", dest=name, help=f"{comment} (default: {default!r})",
                            **({"nargs": "?", "const": "true"} if tp is bool else {}), **kw)
    return parser


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one paragraph, exit 2, no usage wall
        raise UserError(f"command line: {message}. Run with --help to list the options.")


def did_you_mean(flag: str, known: list[str]) -> list[str]:
    """Options close to an unknown `--flag`, best first (at most 3). An option whose last
    component is the flag's wins (`--model_name_or_path`, the Hugging Face / TRL spelling, finds
    `model.model_name_or_path`); else the closest names by difflib's ratio (`--ppo.kl_coeff` finds
    `ppo.kl_coef`), comparing last components too when the flag names no known section."""
    name = flag.lstrip("-").split("=", 1)[0].replace("-", "_")  # also --model-name-or-path
    section, _, leaf = name.rpartition(".")
    sections = {k.rpartition(".")[0] for k in known}
    exact = [k for k in known
             if k == name or (k.rpartition(".")[2] == leaf and section in ("", k.rpartition(".")[0]))]
    if exact:
        return exact[:3]

    def closest(candidates: list[str], leaves: bool) -> list[str]:
        scores = {k: max(difflib.SequenceMatcher(None, name, k).ratio(),
                         difflib.SequenceMatcher(None, leaf, k.rpartition(".")[2]).ratio() if leaves else 0.0)
                  for k in candidates}
        best = max(scores.values(), default=0.0)
        return sorted((k for k, v in scores.items() if v >= max(0.75, best - 0.05)), key=lambda k: -scores[k])[:3]

    if section and section in sections:  # a known section: its own options first
        return closest([k for k in known if k.rpartition(".")[0] == section], False) or closest(known, False)
    return closest(known, True)


def _unknown_arguments(extra: list[str], known: list[str]) -> UserError:
    """One paragraph for what argparse could not place: each unknown flag with its suggestions."""
    flags = [x for x in extra if x.startswith("-")]
    if not flags:
        return UserError(f"command line: unexpected value(s) {' '.join(extra)} (each option takes the values "
                         f"after it; list options take several). Run with --help to list the options.")
    parts = []
    for flag in flags:
        close = did_you_mean(flag, known)
        shown = flag.split("=", 1)[0]
        parts.append(f"{shown} (did you mean {' or '.join(f'--{k}' for k in close)}?)" if close else shown)
    return UserError(f"command line: unknown option{'s' if len(parts) > 1 else ''} {', '.join(parts)}. "
                     f"Run with --help to list the options.")


def parse_config(argv: Optional[list[str]] = None, description: str = "RLHF pipeline") -> Config:
    """Build the Config from defaults, `--config FILE` and command-line overrides."""
    parser = build_parser(description)
    parser.__class__ = _Parser
    args, extra = parser.parse_known_args(argv)
    if extra:
        raise _unknown_arguments(extra, ["config", *(name for name, *_ in _flat_fields(Config))])
    args = vars(args)
    args.pop("local_rank", None)
    data = {}
    for path in args.pop("config", []):
        layer = load_file(path)
        try:  # each file alone first, so a mistake in it is reported as the file's
            _from_dict(Config, copy.deepcopy(layer), where="")
        except UserError as e:
            raise UserError(f"config file {path}: {e}") from None
        data = _merged(data, layer)
    for dotted, value in args.items():  # command line over file
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise UserError(f"config file: section {p!r} must be a mapping of options "
                                f"(got {node!r}), so --{dotted} cannot be applied to it.")
        node[leaf] = value
    try:
        cfg = _from_dict(Config, data, where="")
    except UserError as e:  # the file alone was fine: the command line's value is at fault
        raise UserError(f"command line: {e}") from None
    validate(cfg)
    return cfg


def _merged(base: dict, over: dict) -> dict:
    """`over` on top of `base`, section by section (a later config file overrides single options)."""
    out = dict(base)
    for key, value in over.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def resolve_path(path: str) -> Path:
    """A path as given, or relative to the repository (for the shipped ds_configs/ and presets)."""
    p = Path(path)
    if p.exists() or p.is_absolute():
        return p
    alt = REPO_ROOT / path
    return alt if alt.exists() else p


def save_config(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
