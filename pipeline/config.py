"""Run configuration, the schema: one tree of dataclasses with every option's type, default and
comment (the comment is its `--help` text), the values some options accept, and the sizes derived
from them (global batch sizes, PPO's per-rank sizes), computed and checked here and nowhere else.

Not here: the checks of the options' values (config_checks.py), the command line and `--config`
files (cli.py, `parse_config`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from pipeline.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class TaskConfig:
    """Sizes of the embedded default task (used when no dataset paths are given), chosen so that
    `deepspeed launch/ppo.py` runs in about 15 minutes on a 2-core CPU (docs/results.md)."""

    num_sft: int = 3000  # SFT demonstrations (prompt, response)
    num_pairs: int = 2000  # preference pairs (prompt, chosen, rejected) for the reward model
    num_prompts: int = 4000  # PPO training prompts
    # held-out prompts (distinct, never in training data), SFT demonstrations and preference pairs,
    # each
    num_eval: int = 256
    label_noise: float = 0.1  # probability that a training preference label is flipped


@dataclass
class ModelConfig:
    """The policy model. Empty `model_name_or_path` builds the default task's Llama from scratch."""

    model_name_or_path: str = ""  # HF hub name or local folder; empty = from scratch (below)
    # the reward model's (and so the critic's) own base model, e.g. a smaller one; empty = as the
    # policy (see reward_init)
    reward_model_name_or_path: str = ""
    hidden_size: int = 256  # from-scratch model: width
    num_hidden_layers: int = 4  # from-scratch model: depth
    num_attention_heads: int = 4  # from-scratch model: heads
    intermediate_size: int = 688  # from-scratch model: MLP width
    trust_remote_code: bool = False  # allow custom modelling code from the model folder
    # precision of every engine: auto (bf16 on an accelerator other than the CPU that supports it,
    # else fp32), fp32, bf16 or fp16 (GPU; dynamic loss scaling); fills the DeepSpeed bf16/fp16
    # sections
    dtype: str = "auto"
    # recompute each layer's activations in backward (trained models): less activation memory, ~1/3
    # more compute
    gradient_checkpointing: bool = False


PRECISIONS = ("fp32", "bf16", "fp16")
SCORE_NORMS = ("none", "sft", "running")
PLACEMENTS = ("auto", "resident", "offload")  # ppo.ref_placement, ppo.reward_placement
CRITIC_SCORINGS = ("auto", "materialise", "zero3")  # ppo.critic_scoring
EVAL_METRICS = (
    "eval/gold_score",
    "eval/win_rate_vs_sft",
    "eval/reward_score",
    "eval/reward_model_raw",
    "eval/reward_lcb",
)  # ppo.select_best candidates (the stage checks which this run has)
# model.dtype, ds_config, ds_inference_config: chosen for the accelerator
# (distributed.ds_config.resolve_auto)
AUTO = "auto"
DATA_FORMATS = ("auto", "prompt_response", "prompt_chosen_rejected", "hh", "messages", "prompt")
LR_SCHEDULERS = (
    "cosine",
    "linear",
    "constant_with_warmup",
    "constant",
    "polynomial",
    "cosine_with_restarts",
    "inverse_sqrt",
)


@dataclass
class DataConfig:
    """Datasets (local json/jsonl/parquet/csv files or folders). Empty = the embedded default
    task."""

    tokenizer_path: str = ""  # tokenizer folder or hub name; empty = the model's, or the task's
    # one or more datasets feeding every stage (split by data_split); a stage's own path below
    # overrides it
    data_path: list[str] = field(default_factory=list)
    # shares of each data_path dataset for SFT, reward model, PPO (seeded, disjoint)
    data_split: str = "2,4,4"
    # mixing weights of the data_path datasets, one each (empty: concatenate)
    data_weights: list[float] = field(default_factory=list)
    # auto (from the columns), prompt_response, prompt_chosen_rejected, hh, messages or prompt
    data_format: str = "auto"
    # share of a stage's user rows held out for evaluation when it has no eval path
    eval_fraction: float = 0.05
    sft_data_path: str = ""  # rows with `prompt`, `response`
    sft_eval_data_path: str = ""  # held-out rows with `prompt`, `response`
    reward_data_path: str = ""  # rows with `prompt`, `chosen`, `rejected`
    reward_eval_data_path: str = ""  # held-out rows with `prompt`, `chosen`, `rejected`
    prompt_data_path: str = ""  # rows with `prompt` (PPO)
    eval_prompt_data_path: str = ""  # held-out rows with `prompt` (PPO evaluation)
    # tokens (the tokenizer's special tokens included); a longer prompt is cut from the left (its
    # BOS kept), and each dataset says once how many it cut
    max_prompt_len: int = 256
    # tokens, EOS included: the longest dataset response (longer ones are cut, with a warning) and,
    # unless ppo.max_new_tokens says otherwise, the length of PPO's sampled responses
    max_response_len: int = 24


@dataclass
class TrainConfig:
    """Optimisation settings of one supervised stage (SFT or reward model)."""

    epochs: int = 2  # passes over the training set
    max_steps: int = -1  # stop after this many optimizer steps (-1: run all epochs)
    learning_rate: float = 1e-3  # peak learning rate (AdamW)
    weight_decay: float = 0.0  # AdamW weight decay
    # transformers scheduler name: cosine, linear, constant_with_warmup
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.05  # fraction of steps spent warming up
    micro_batch_size_per_gpu: int = 16  # rows (pairs for the reward model) per rank per micro-step
    gradient_accumulation_steps: int = 1  # micro-steps per optimizer step
    logging_steps: int = 10  # log train metrics every N optimizer steps
    eval_steps: int = 100  # evaluate every N optimizer steps (and at the end)
    gradient_clipping: float = 1.0  # max global gradient norm (0: off)


@dataclass
class RewardConfig(TrainConfig):
    """The reward-model stage: TrainConfig plus the ensemble."""

    # reward models trained (different seeds: initialisation and data order); PPO scores with all of
    # them (see ppo.ensemble_penalty)
    ensemble_size: int = 1


@dataclass
class PPOConfig:
    """The PPO stage: rollout sizes, objective and its coefficients."""

    actor_model_path: str = ""  # start from this policy folder; empty = the SFT stage's output
    reward_model_path: str = ""  # reward model folder; empty = the reward stage's output
    num_iterations: int = 60  # PPO iterations (rollout + update)
    # prompts per iteration, over all ranks (each sampled num_samples_per_prompt times:
    # rollout_batch_size x num_samples_per_prompt rows)
    rollout_batch_size: int = 32
    # responses sampled for each prompt (a group); each rank samples the groups of its own prompts,
    # so a group never spans ranks. The group estimators (grpo, dr_grpo, rloo,
    # reinforce_pp_baseline) need >= 2
    num_samples_per_prompt: int = 1
    mini_batch_size: int = 16  # rollout rows (responses) per optimizer step, over all ranks
    micro_batch_size_per_gpu: int = 8  # rows per rank per forward/backward
    num_ppo_epochs: int = 1  # passes over each rollout
    actor_learning_rate: float = 2e-4  # actor peak learning rate
    critic_learning_rate: float = 2e-4  # critic peak learning rate
    # rank of LoRA adapters on the actor (0: off, every weight is trained); LoRA usually wants a
    # higher actor_learning_rate
    actor_lora_rank: int = 0
    # rank of LoRA adapters on the critic (0: off); its scalar score head is trained in full either
    # way
    critic_lora_rank: int = 0
    # LoRA scale: an adapted layer's weight is W + (lora_alpha / rank) * B @ A
    lora_alpha: float = 16.0
    # layers LoRA adapts: all-linear (every linear layer in the transformer blocks, not the LM or
    # score head) or module names such as q_proj v_proj
    lora_target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    warmup_iterations: int = 2  # linear warmup, in iterations
    # sampling temperature; every PPO log-prob (pi_old, pi, reference, KL, entropy) is of logits /
    # temperature, the distribution sampled from
    temperature: float = 1.0
    # nucleus sampling: only 1 (off); a truncated distribution makes the log-probs and KL disagree
    # with the sampler, so other values are refused
    top_p: float = 1.0
    top_k: int = 0  # top-k sampling: only 0 (off), refused otherwise for the same reason as top_p
    # new tokens sampled per response (EOS included) in PPO rollouts and evaluation; 0:
    # data.max_response_len, the length the SFT and reward-model data were cut to
    max_new_tokens: int = 0
    # EOS is suppressed until this many response tokens, in sampling and in every PPO log-prob alike
    min_new_tokens: int = 0
    # submodules gathered at a time to materialise the actor (hybrid engine) or the critic (0: all)
    gather_modules: int = 0
    # rows per rank per scoring forward of the rollout (pi_old, reference, reward models, critic
    # values); not used in training. 0 (auto): as many of a rank's rollout rows as what the
    # resident models and plain copies leave of the memory plan's budget holds, at least the
    # training micro-batch
    forward_micro_batch_size: int = 0
    # per-rank bytes the memory plan may fill with resident frozen models, plain copies and
    # scoring forwards, in GiB; 0: measured (half of the free device memory, or of the RAM shared
    # by a node's ranks)
    memory_budget_gb: float = 0.0
    # where the frozen reference model lives: resident (a plain copy on the device, built once),
    # offload (a ZeRO-3 inference engine, parameters offloaded as ds_inference_config says) or
    # auto (resident when it fits half of the free device memory per rank, else offload)
    ref_placement: str = "auto"
    # where each frozen reward model (every ensemble member) lives: as ref_placement
    reward_placement: str = "auto"
    # how the critic computes the rollout's values: materialise (its full weights copied once per
    # scoring phase into a plain module, freed after: no gathers per micro-batch), zero3 (the
    # training engine's forward per micro-batch, each gathering every layer) or auto (materialise
    # when it fits what the resident frozen models leave of the per-rank budget, else zero3)
    critic_scoring: str = "auto"
    # PPO ratio clip: the ratio is clipped to [1 - clip_eps_low, 1 + clip_eps_high], both clip_eps
    # unless given
    clip_eps: float = 0.2
    clip_eps_low: Optional[float] = None  # lower ratio clip (none: clip_eps)
    # upper ratio clip (none: clip_eps); above clip_eps_low is DAPO's clip-higher (0.28 with low
    # 0.2), against entropy collapse
    clip_eps_high: Optional[float] = None
    # dual-clip PPO (Ye et al. 2020): the loss of a negative-advantage token is capped at -A x
    # dual_clip (0: off; else > 1, e.g. 3)
    dual_clip: float = 0.0
    # how per-token losses (policy, entropy, KL loss) are averaged: token_mean (over the
    # mini-batch's tokens, all ranks), seq_mean_token_mean (each response's token mean, then over
    # responses: GRPO) or seq_mean_token_sum_norm (each response's token sum /
    # data.max_response_len, then over responses: Dr. GRPO)
    loss_agg: str = "token_mean"
    value_clip: float = 0.2  # clip of V around old values (0: off)
    vf_coef: float = 0.5  # c1, critic loss weight
    entropy_coef: float = 0.0  # c2, entropy bonus weight
    gamma: float = 1.0  # GAE discount
    lam: float = 0.95  # GAE lambda
    # the advantage estimator (pipeline/estimators.py ADVANTAGE_ESTIMATORS): gae (token-level GAE)
    # or sequence (A = R - V(prompt)), both with a critic; critic-free (no critic engine at all):
    # grpo, dr_grpo, rloo, reinforce_pp_baseline (groups: num_samples_per_prompt >= 2) and
    # reinforce_pp
    advantage_mode: str = "gae"
    # whiten advantages over the masked rollout of every rank (reinforce_pp and
    # reinforce_pp_baseline always do)
    whiten_advantages: bool = True
    # where the KL to the reference goes: reward (-beta KL_t in every token's reward: PPO,
    # REINFORCE++) or loss (+ beta x KL of the current policy in the actor loss, aggregated like it:
    # GRPO; needs kl_estimator k2 or k3)
    kl_penalty: str = "reward"
    kl_estimator: str = "k1"  # per-token KL estimator of the penalty: k1 (log-ratio), k2 or k3
    # initial beta of the KL penalty (in the reward or the loss, see kl_penalty)
    kl_coef: float = 0.1
    # adapt beta towards target_kl (Ziegler et al. 2019); false: beta stays kl_coef
    adaptive_kl: bool = False
    target_kl: float = 3.0  # adaptive controller target (sequence KL, nats per response)
    # adaptive controller horizon (samples): beta moves by up to 0.2 x min(rollout_batch_size /
    # horizon, 1) per iteration (5% at 32 rollouts)
    kl_horizon: int = 128
    # warn (alarm/kl_to_ref) when the rollout KL to the reference exceeds this many nats (0: 2 x
    # target_kl with adaptive_kl, else off)
    kl_alarm: float = 0.0
    # keep the rollout's mean per-token NLL under the reference (entropy + KL) at most this multiple
    # of its first-iteration value: a reward penalty lambda x -log ref(y_t) whose lambda grows by
    # dual ascent while it is above (controllers.RefNLLConstraint); 0: off. 1.1: measured against
    # 1.2 and off on three tasks x 3 seeds (docs/results.md#over-optimisation-on-three-tasks)
    ref_nll_limit: float = 1.1
    # dual-ascent step of that lambda per iteration, per unit of relative excess
    ref_nll_lr: float = 1.0
    score_clip: float = 5.0  # clip the reward-model score to +-score_clip (0: off)
    # weight of the reward model's score in the reward; 0: no reward model (needs reward_fn), no
    # reward stage, the critic starts from the policy with a fresh value head
    reward_model_coef: float = 1.0
    # FILE.py:NAME or module:NAME, f(prompts, responses) -> floats: a rule-based reward added to the
    # score (weight reward_fn_coef)
    reward_fn: str = ""
    reward_fn_coef: float = 1.0  # weight of reward_fn in the reward
    # with a reward-model ensemble (reward.ensemble_size > 1): reward = mean - ensemble_penalty x
    # std over the members, each normalised on its held-out pairs (Coste et al. 2023)
    ensemble_penalty: float = 0.0
    # FILE.py:NAME or module:NAME, f(prompts, responses) -> floats: your gold metric, logged as
    # eval/gold_score (evaluation only); empty: the default task's gold on its own prompts, none
    # otherwise
    eval_reward_fn: str = ""
    # also keep the policy with the best value of this evaluation metric (e.g. eval/gold_score) as
    # <ppo>/model_best; empty: off
    select_best: str = ""
    # the reward model's score before the KL penalty and score_clip: none, sft (fixed mean/std of
    # the scores of the SFT policy's held-out responses at step 0; beta then means the same on every
    # task) or running (running mean/std of every rollout's scores)
    score_norm: str = "none"
    early_stop_kl: float = 0.0  # stop the epoch loop when approx KL to pi_old exceeds this (0: off)
    max_nonfinite_skips: int = 3  # stop after this many non-finite updates in a row
    gradient_clipping: float = 1.0  # max global gradient norm for actor and critic
    # evaluate on held-out prompts every N iterations (and at 0 and the end); 0: no evaluation (no
    # eval/ metrics, no eval-based summary fields; select_best refused)
    eval_steps: int = 20
    logging_steps: int = 1  # log every N iterations
    # PPO-ptx (InstructGPT): weight of a supervised LM loss on ptx data added to the actor loss (0:
    # off)
    ptx_coef: float = 0.0
    # PPO-ptx dataset in any SFT format (prompt/response, messages, hh, ...); empty = the SFT
    # stage's training data
    ptx_data_path: str = ""
    # EMA of the actor weights after each optimizer step, saved as <ppo>/model_ema (0: off; e.g.
    # 0.992)
    ema_beta: float = 0.0


@dataclass
class Config:
    """The whole run."""

    output_dir: str = "runs/default"  # each stage writes <output_dir>/<stage>
    seed: int = 42  # seeds data generation, initialisation, shuffling and sampling
    force: bool = False  # rerun stages from scratch even when their outputs are up to date
    # process-group timeout: a rank waiting longer in a collective (a dead node, a hung rank) fails
    # instead of hanging; covers rank-0 work the others wait for (task generation, tokenising,
    # checkpoint conversion)
    dist_timeout_minutes: float = 120.0
    save_steps: int = 50  # checkpoint every N optimizer steps (SFT, RM) or PPO iterations; 0: never
    keep_last: int = 2  # checkpoints kept per stage (older ones are deleted)
    # an unfinished stage resumes from its newest intact checkpoint; false: start over
    resume: bool = True
    deepspeed_monitor: bool = False  # also log DeepSpeed's engine metrics to <stage>/tensorboard
    # DeepSpeed JSON of trained engines; auto: ds_configs/zero3_train.json on CPU,
    # ds_configs/zero3_train_gpu.json on other accelerators
    ds_config: str = "auto"
    # DeepSpeed JSON of the frozen reference and reward model; auto:
    # ds_configs/zero3_offload_inference.json on CPU, ..._gpu.json (pinned offload) elsewhere
    ds_inference_config: str = "auto"
    # tokenised examples are cached here by content hash, built once per node (empty:
    # ~/.cache/rlhf-pipeline)
    cache_dir: str = ""
    # reward model starts from: sft (SFT output), base (the SFT's start), auto (base for a
    # from-scratch model, else sft)
    reward_init: str = "auto"
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sft: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=2, learning_rate=2e-3))
    reward: RewardConfig = field(default_factory=lambda: RewardConfig(epochs=3, learning_rate=5e-4))
    ppo: PPOConfig = field(default_factory=PPOConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- derived sizes and values
def global_batch(
    micro_batch_size_per_gpu: int, gradient_accumulation_steps: int, world_size: int
) -> int:
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
    need(
        rows % ppo.mini_batch_size == 0,
        f"ppo.rollout_batch_size x ppo.num_samples_per_prompt = {ppo.rollout_batch_size} x "
        f"{ppo.num_samples_per_prompt} = {rows} rollout rows must be a multiple of "
        f"ppo.mini_batch_size={ppo.mini_batch_size}"
        if ppo.num_samples_per_prompt > 1
        else f"ppo.rollout_batch_size={ppo.rollout_batch_size} must be a multiple of "
        f"ppo.mini_batch_size={ppo.mini_batch_size}",
    )
    need(
        ppo.mini_batch_size % world_size == 0,
        f"ppo.mini_batch_size={ppo.mini_batch_size} must be a multiple of the number of ranks",
    )
    need(
        ppo.rollout_batch_size % world_size == 0,
        f"ppo.rollout_batch_size={ppo.rollout_batch_size} (prompts) must be a multiple of the "
        "number of ranks: each rank samples ppo.num_samples_per_prompt responses to each of its "
        "own prompts, so that a group lives on one rank",
    )
    per_rank_mini = ppo.mini_batch_size // world_size
    micro = min(ppo.micro_batch_size_per_gpu, per_rank_mini)
    need(
        per_rank_mini % micro == 0,
        f"ppo.mini_batch_size / ranks = {per_rank_mini} must be a multiple of "
        f"ppo.micro_batch_size_per_gpu={ppo.micro_batch_size_per_gpu}",
    )
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
    """Tokens sampled per PPO response (EOS included): ppo.max_new_tokens, or
    data.max_response_len."""
    return cfg.ppo.max_new_tokens or cfg.data.max_response_len


# ---------------------------------------------------------------- files
def resolve_path(path: str) -> Path:
    """A path as given, or relative to the repository (for the shipped ds_configs/ and presets)."""
    p = Path(path)
    if p.exists() or p.is_absolute():
        return p
    alt = REPO_ROOT / path
    return alt if alt.exists() else p


def save_config(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
