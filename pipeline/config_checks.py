"""Checks of a run configuration that do not depend on the world size (those that do are
config.ppo_sizes): `validate` raises UserError naming the option, its value and what it accepts.

Not here: the schema and its defaults (config.py), the command line (cli.py).
"""

from __future__ import annotations

import math

from pipeline.config import (
    AUTO,
    CRITIC_SCORINGS,
    DATA_FORMATS,
    EVAL_METRICS,
    LR_SCHEDULERS,
    PLACEMENTS,
    PRECISIONS,
    SCORE_NORMS,
    Config,
    DataConfig,
    PPOConfig,
    TrainConfig,
)
from pipeline.errors import UserError


def parse_split(text: str) -> tuple[float, ...]:
    """`--data.data_split 2,4,4`: three non-negative shares (SFT, reward model, PPO), not all
    zero."""
    try:
        shares = tuple(float(x) for x in text.split(","))
    except ValueError:
        shares = ()
    if len(shares) != 3 or not all(s >= 0 for s in shares) or not sum(shares) > 0:
        raise UserError(
            f"option data.data_split={text!r}: expected three non-negative shares for SFT, "
            f"reward model and PPO, not all zero, e.g. 2,4,4 (DeepSpeed-Chat's convention)."
        )
    return shares


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
        for f in (
            "epochs",
            "learning_rate",
            "micro_batch_size_per_gpu",
            "gradient_accumulation_steps",
            "logging_steps",
            "eval_steps",
        ):
            positive(f"{stage}.{f}", getattr(t, f))
        for f in ("weight_decay", "gradient_clipping"):
            non_negative(f"{stage}.{f}", getattr(t, f))
        if t.max_steps != -1 and t.max_steps < 1:
            raise UserError(
                f"option {stage}.max_steps={t.max_steps} must be >= 1, or -1 to run all epochs."
            )
        if not 0 <= t.warmup_ratio < 1:
            raise UserError(f"option {stage}.warmup_ratio={t.warmup_ratio} must be in [0, 1).")
        if t.lr_scheduler not in LR_SCHEDULERS:
            raise UserError(
                f"option {stage}.lr_scheduler={t.lr_scheduler!r}: expected one of "
                f"{', '.join(LR_SCHEDULERS)}."
            )
    p = cfg.ppo
    for f in (
        "num_iterations",
        "rollout_batch_size",
        "mini_batch_size",
        "micro_batch_size_per_gpu",
        "num_ppo_epochs",
        "actor_learning_rate",
        "critic_learning_rate",
        "temperature",
        "clip_eps",
        "logging_steps",
        "target_kl",
        "kl_horizon",
        "max_nonfinite_skips",
    ):
        positive(f"ppo.{f}", getattr(p, f))
    for f in (
        "warmup_iterations",
        "top_k",
        "min_new_tokens",
        "gather_modules",
        "forward_micro_batch_size",
        "value_clip",
        "vf_coef",
        "entropy_coef",
        "kl_coef",
        "score_clip",
        "early_stop_kl",
        "gradient_clipping",
        "ptx_coef",
        "kl_alarm",
        "reward_model_coef",
        "ensemble_penalty",
        "max_new_tokens",
        "eval_steps",
    ):
        non_negative(f"ppo.{f}", getattr(p, f))
    if not (math.isfinite(p.memory_budget_gb) and p.memory_budget_gb >= 0):
        raise UserError(
            f"option ppo.memory_budget_gb={p.memory_budget_gb} must be a finite number >= 0: the "
            f"GiB per rank the memory plan may fill (0: measured)."
        )
    validate_rewards(cfg)
    validate_lora(p)
    within("ppo.gamma", p.gamma, 0.0, 1.0)
    within("ppo.lam", p.lam, 0.0, 1.0)
    if cfg.reward_init not in ("auto", "base", "sft"):
        raise UserError(
            f"option reward_init={cfg.reward_init!r}: expected 'auto', 'base' or 'sft'."
        )
    if cfg.reward_init == "sft" and cfg.model.reward_model_name_or_path:
        raise UserError(
            f"option reward_init=sft asks the reward model to start from the SFT policy, but "
            f"model.reward_model_name_or_path={cfg.model.reward_model_name_or_path!r} gives it a "
            f"base model of its own; drop one of the two."
        )
    validate_estimator(p)
    if p.ref_nll_limit != 0 and p.ref_nll_limit <= 1:
        raise UserError(
            f"option ppo.ref_nll_limit={p.ref_nll_limit} must be 0 (off) or above 1: it is the "
            f"allowed multiple of the first iteration's per-token NLL under the reference."
        )
    positive("ppo.ref_nll_lr", p.ref_nll_lr)
    if p.score_norm not in SCORE_NORMS:
        raise UserError(
            f"option ppo.score_norm={p.score_norm!r}: expected one of {', '.join(SCORE_NORMS)}."
        )
    if not 0 <= p.ema_beta < 1:
        raise UserError(
            f"option ppo.ema_beta={p.ema_beta} must be in [0, 1) (0: no EMA of the actor; "
            f"DeepSpeed-Chat uses 0.992)."
        )
    if not 0 < p.top_p <= 1:
        raise UserError(f"option ppo.top_p={p.top_p} must be in (0, 1].")
    validate_sampling(p)
    for f in ("ref_placement", "reward_placement"):
        if getattr(p, f) not in PLACEMENTS:
            raise UserError(
                f"option ppo.{f}={getattr(p, f)!r}: expected one of {', '.join(PLACEMENTS)} "
                f"(resident: a plain copy on the device; offload: a ZeRO-3 inference engine; "
                f"auto: resident when it fits the per-rank memory budget)."
            )
    if p.critic_scoring not in CRITIC_SCORINGS:
        raise UserError(
            f"option ppo.critic_scoring={p.critic_scoring!r}: expected one of "
            f"{', '.join(CRITIC_SCORINGS)} (materialise: a plain copy of the critic per scoring "
            f"phase; zero3: the training engine per micro-batch; auto: materialise when it fits "
            f"the per-rank memory budget)."
        )
    if cfg.save_steps < 0:
        raise UserError(
            f"option save_steps={cfg.save_steps} must be >= 0 (0: no periodic checkpoints)."
        )
    positive("keep_last", cfg.keep_last)
    positive("dist_timeout_minutes", cfg.dist_timeout_minutes)
    for f in ("max_prompt_len", "max_response_len"):
        positive(f"data.{f}", getattr(cfg.data, f))
    validate_data(cfg.data)
    for f in ("num_sft", "num_pairs", "num_prompts", "num_eval"):
        positive(f"task.{f}", getattr(cfg.task, f))
    from pipeline.default_task import MAX_EVAL_PROMPTS

    if cfg.task.num_eval > MAX_EVAL_PROMPTS:
        raise UserError(
            f"option task.num_eval={cfg.task.num_eval} must be <= {MAX_EVAL_PROMPTS}: the default "
            "task keeps its held-out prompts out of training, and has twice that many distinct "
            "prompts."
        )
    if not 0 <= cfg.task.label_noise < 0.5:
        raise UserError(f"option task.label_noise={cfg.task.label_noise} must be in [0, 0.5).")
    m = cfg.model
    if m.dtype not in (AUTO, *PRECISIONS):
        raise UserError(
            f"option model.dtype={m.dtype!r}: expected one of {', '.join((AUTO, *PRECISIONS))}."
        )
    if not m.model_name_or_path:  # the from-scratch model's shape
        for f in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
            positive(f"model.{f}", getattr(m, f))
        if m.hidden_size % m.num_attention_heads:
            raise UserError(
                f"option model.hidden_size={m.hidden_size} must be a multiple of "
                f"model.num_attention_heads={m.num_attention_heads}."
            )
    if not 0 <= cfg.seed < 2**32:
        raise UserError(f"option seed={cfg.seed} must be in [0, 2**32).")


def validate_rewards(cfg: Config) -> None:
    """What the reward is made of: the reward model(s) and/or a reward function."""
    p = cfg.ppo
    if not cfg.reward.ensemble_size >= 1:
        raise UserError(
            f"option reward.ensemble_size={cfg.reward.ensemble_size} must be >= 1 (1: one reward "
            "model)."
        )
    if not math.isfinite(p.reward_fn_coef):
        raise UserError(f"option ppo.reward_fn_coef={p.reward_fn_coef} must be a finite number.")
    if p.reward_model_coef == 0 and not p.reward_fn:
        raise UserError(
            "option ppo.reward_model_coef=0 leaves no reward: give --ppo.reward_fn FILE.py:NAME (a "
            "rule-based reward) or keep the reward model (reward_model_coef > 0)."
        )
    if p.reward_model_coef == 0 and p.reward_model_path:
        raise UserError(
            f"option ppo.reward_model_path={p.reward_model_path!r} is given but "
            "ppo.reward_model_coef=0 uses no reward model; drop one of the two."
        )
    if p.ensemble_penalty > 0 and cfg.reward.ensemble_size < 2:
        raise UserError(
            f"option ppo.ensemble_penalty={p.ensemble_penalty} penalises disagreement between "
            f"reward models, but reward.ensemble_size={cfg.reward.ensemble_size}: train an "
            "ensemble (--reward.ensemble_size 3) or set ppo.ensemble_penalty 0."
        )
    if cfg.reward.ensemble_size > 1 and p.reward_model_path:
        raise UserError(
            f"option reward.ensemble_size={cfg.reward.ensemble_size} trains an ensemble for PPO, "
            f"but ppo.reward_model_path={p.reward_model_path!r} scores with one given model; drop "
            "one of the two."
        )
    if p.select_best and p.select_best not in EVAL_METRICS:
        raise UserError(
            f"option ppo.select_best={p.select_best!r}: expected an evaluation metric, one of "
            f"{', '.join(EVAL_METRICS)} (higher is better)."
        )
    if p.select_best and p.eval_steps == 0:
        raise UserError(
            f"option ppo.select_best={p.select_best!r} keeps the policy with the best evaluation, "
            "but ppo.eval_steps=0 turns evaluation off; give ppo.eval_steps > 0 or drop "
            "select_best."
        )
    for option in ("reward_fn", "eval_reward_fn"):
        if getattr(p, option):
            from pipeline.reward_fns import split_spec

            split_spec(getattr(p, option), f"ppo.{option}")


def validate_estimator(p: PPOConfig) -> None:
    """The advantage estimator (a name of the registry in pipeline/estimators.py), groups, the KL
    placement and the policy-loss variants."""
    from pipeline.estimators import ADVANTAGE_ESTIMATORS
    from pipeline.ppo_math import KL_ESTIMATORS, LOSS_AGG_MODES

    name = p.advantage_mode
    if name not in ADVANTAGE_ESTIMATORS:
        raise UserError(
            f"option ppo.advantage_mode={name!r}: expected one of "
            f"{', '.join(ADVANTAGE_ESTIMATORS)}."
        )
    est = ADVANTAGE_ESTIMATORS[name]
    if not p.num_samples_per_prompt >= 1:
        raise UserError(
            f"option ppo.num_samples_per_prompt={p.num_samples_per_prompt} must be >= 1."
        )
    if est.needs_groups and p.num_samples_per_prompt < 2:
        raise UserError(
            f"option ppo.num_samples_per_prompt={p.num_samples_per_prompt}: "
            f"ppo.advantage_mode={name} compares each response with the other responses to the "
            "same prompt, so it needs ppo.num_samples_per_prompt >= 2 (e.g. 4)."
        )
    if est.whitens and not p.whiten_advantages:
        raise UserError(
            f"option ppo.whiten_advantages=false: ppo.advantage_mode={name} (REINFORCE++) whitens "
            "its advantages over the global rollout by definition; set whiten_advantages true or "
            "choose another estimator."
        )
    if not est.needs_critic and p.critic_lora_rank:
        raise UserError(
            f"option ppo.critic_lora_rank={p.critic_lora_rank}: ppo.advantage_mode={name} uses no "
            "critic; set critic_lora_rank 0."
        )
    if p.kl_estimator not in KL_ESTIMATORS:
        raise UserError(
            f"option ppo.kl_estimator={p.kl_estimator!r}: expected one of "
            f"{', '.join(KL_ESTIMATORS)}."
        )
    if p.kl_penalty not in ("reward", "loss"):
        raise UserError(
            f"option ppo.kl_penalty={p.kl_penalty!r}: expected 'reward' (in every token's reward) "
            "or 'loss' (a term of the actor loss)."
        )
    if p.kl_penalty == "loss" and p.kl_estimator == "k1":
        raise UserError(
            "option ppo.kl_estimator=k1 with ppo.kl_penalty=loss: the gradient of the k1 estimate "
            "(the log-ratio) is zero in expectation on the policy's own samples, so it would not "
            "pull towards the reference; use k3 (GRPO) or k2."
        )
    if p.loss_agg not in LOSS_AGG_MODES:
        raise UserError(
            f"option ppo.loss_agg={p.loss_agg!r}: expected one of {', '.join(LOSS_AGG_MODES)}."
        )
    for option in ("clip_eps_low", "clip_eps_high"):
        value = getattr(p, option)
        if value is not None and not 0 < value < (1 if option == "clip_eps_low" else math.inf):
            raise UserError(
                f"option ppo.{option}={value} must be "
                f"{'in (0, 1)' if option == 'clip_eps_low' else '> 0'} (none: ppo.clip_eps)."
            )
    if not (p.dual_clip == 0 or p.dual_clip > 1):
        raise UserError(
            f"option ppo.dual_clip={p.dual_clip} must be 0 (off) or > 1: the loss of a "
            "negative-advantage token is capped at -A x dual_clip, which must lie above the "
            "clipped PPO loss (e.g. 3)."
        )


def validate_sampling(p: PPOConfig) -> None:
    """Sampling settings PPO can compute log-probs for (as TRL does): pi_old, pi and the reference
    are all read from logits / temperature (with EOS blocked before min_new_tokens), exactly the
    distribution the sampler draws from. A truncated distribution (top-k, top-p) cannot be matched:
    the reference would need the same truncation, and KL(pi || ref) is infinite where ref is
    zero."""
    why = (
        "PPO's log-probs (pi_old, pi, the reference) and the KL penalty are computed from the full "
        "distribution logits / ppo.temperature, so sampling from a truncated one would make them "
        "disagree with the sampler (and the KL to an untruncated reference infinite); use "
        "ppo.temperature to make sampling less random"
    )
    if p.top_k != 0:
        raise UserError(
            f"option ppo.top_k={p.top_k}: top-k sampling is not supported, set it to 0 (off). "
            f"{why}."
        )
    if p.top_p != 1:
        raise UserError(
            f"option ppo.top_p={p.top_p}: nucleus sampling is not supported, set it to 1 (off). "
            f"{why}."
        )


def validate_lora(p: PPOConfig) -> None:
    """LoRA options (which layers exist is checked when the models are built)."""
    for f in ("actor_lora_rank", "critic_lora_rank"):
        if not getattr(p, f) >= 0:
            raise UserError(
                f"option ppo.{f}={getattr(p, f)} must be >= 0 (0: no LoRA, train every weight)."
            )
    if not p.lora_alpha > 0:
        raise UserError(
            f"option ppo.lora_alpha={p.lora_alpha} must be > 0 (adapters are scaled by lora_alpha "
            "/ rank)."
        )
    names = p.lora_target_modules
    if (p.actor_lora_rank or p.critic_lora_rank) and not names:
        raise UserError(
            "option ppo.lora_target_modules is empty but a LoRA rank is set: name the layers to "
            "adapt (e.g. q_proj v_proj), or all-linear for every linear layer of the transformer "
            "blocks."
        )
    if "all-linear" in names and len(names) > 1:
        raise UserError(
            f"option ppo.lora_target_modules={names}: all-linear already takes every linear layer; "
            f"give either all-linear alone or a list of module names."
        )


def validate_data(dc: DataConfig) -> None:
    parse_split(dc.data_split)
    if dc.data_format not in DATA_FORMATS:
        raise UserError(
            f"option data.data_format={dc.data_format!r}: expected one of "
            f"{', '.join(DATA_FORMATS)}."
        )
    if dc.data_weights:
        if not dc.data_path:
            raise UserError(
                "option data.data_weights is given but data.data_path is not: the weights mix "
                "the data_path datasets."
            )
        if len(dc.data_weights) != len(dc.data_path):
            raise UserError(
                f"option data.data_weights has {len(dc.data_weights)} values but data.data_path "
                f"has {len(dc.data_path)} datasets: give one weight per dataset."
            )
        if not all(w >= 0 for w in dc.data_weights) or not sum(dc.data_weights) > 0:
            raise UserError(
                f"option data.data_weights={dc.data_weights}: weights must be >= 0 and not all "
                "zero."
            )
    if not 0 < dc.eval_fraction <= 0.5:
        raise UserError(f"option data.eval_fraction={dc.eval_fraction} must be in (0, 0.5].")
