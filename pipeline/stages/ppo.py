"""Stage 3, PPO: ZeRO-3 actor and critic, offloaded frozen reference and reward models.

One iteration, one method per phase (see `PPOTrainer.iteration`):
  1. generate    sample num_samples_per_prompt responses per prompt from the actor (eval mode); pi_old
  2. score       reference log-probs, reward-model score at the last real token, critic values
  3. advantages  per-token KL penalty + clipped score; the estimator ppo.advantage_mode (GAE,
                 A = R - V(prompt), or a critic-free one: estimators.ADVANTAGE_ESTIMATORS)
  4. update      num_ppo_epochs x mini-batches: clipped surrogate - c2 entropy (+ beta x KL with
                 kl_penalty loss; + ptx_coef x LM loss on supervised rows: PPO-ptx); clipped value
                 loss (with a critic); EMA of the actor after each step
  5. bookkeeping KL controller, metrics, evaluation on held-out prompts
The critic exists only when the estimator needs one: critic-free runs build, score with, train and
checkpoint no critic at all.
Shapes: B rollout rows on this rank, P prompt width (left-padded), R response width.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
from dataclasses import dataclass

import torch

from pipeline import data, estimators, ppo_math, reward_fns
from pipeline.config import max_new_tokens, ppo_sizes
from pipeline.distributed import collectives, engines, zero3
from pipeline.distributed.collectives import global_mean as _global_mean, global_whiten as _global_whiten
from pipeline.distributed.ds_config import ds_configs
from pipeline.errors import SharedUserError, TrainingHalted, UserError
from pipeline.generation import SamplingParams, make_backend, position_ids, response_mask
from pipeline.models import (add_lora, causal_lm_loss, check_vocab, disable_dropout, enable_gradient_checkpointing,
                             load_causal_lm, load_scalar_model, load_tokenizer, lora_merge, pooling_pad_id,
                             score_index, token_values)
from pipeline.monitoring import PhaseTimer, overoptimisation_plot, peak_rss_gb, progress
from pipeline.stages.common import StageContext, to_device

log = logging.getLogger(__name__)
ENSEMBLE_ALARM_RATIO = 2.0  # alarm when the ensemble disagrees this many times as much as on the SFT policy


@dataclass(frozen=True)
class Experience:
    """One rollout on this rank, filled phase by phase (fields of later phases start as None)."""

    sequences: torch.Tensor  # (B, P+R) prompt (left-padded) + response (right-padded)
    attention_mask: torch.Tensor  # (B, P+R)
    response_mask: torch.Tensor  # (B, R) 1 up to and including EOS
    old_logprobs: torch.Tensor  # (B, R) pi_old, recorded at generation
    prompt_width: int  # P
    prompts: list  # B prompt strings (for the gold scorer and samples)
    group_ids: torch.Tensor | None = None  # (B,) long: the prompt's index on this rank, shared by its samples
    ref_logprobs: torch.Tensor | None = None  # (B, R)
    responses: list | None = None  # B decoded response strings (reward functions, gold, samples)
    rm_scores: torch.Tensor | None = None  # (K, B) raw score of each reward model of the ensemble
    fn_scores: torch.Tensor | None = None  # (B,) ppo.reward_fn
    scores: torch.Tensor | None = None  # (B,) the sequence reward: reward models and reward_fn combined
    old_values: torch.Tensor | None = None  # (B, R) critic V(s_t) before each response token (None: no critic)
    prompt_values: torch.Tensor | None = None  # (B,) critic V at the prompt's last token (None: no critic)
    rewards: torch.Tensor | None = None  # (B, R) shaped: -beta KL_t, + score at the last token
    advantages: torch.Tensor | None = None  # (B, R)
    returns: torch.Tensor | None = None  # (B, R)


class PPOTrainer:
    """Holds the four engines and the generator; `iteration()` runs one PPO step."""

    def __init__(self, ctx: StageContext):
        cfg, p, d = ctx.cfg, ctx.cfg.ppo, ctx.dist
        self.cfg, self.p, self.d, self.stage_dir = cfg, p, d, ctx.stage_dir
        self.sizes = ppo_sizes(p, d.world_size)
        self.estimator = estimators.ADVANTAGE_ESTIMATORS[p.advantage_mode]
        self.ds = ds_configs(cfg, "ppo", d.world_size)
        self._load_inputs(ctx)
        collectives.seed_everything(cfg.seed)
        models = self._load_models(ctx)
        self.logger = ctx.start()  # inputs are valid: from here on the stage folder is rewritten
        self._build_engines(ctx, *models)
        self.sampling = SamplingParams(max_new_tokens(cfg), p.temperature, p.top_p, p.top_k,
                                       min_new_tokens=p.min_new_tokens)  # evaluation: one response per prompt
        self.rollout_sampling = dataclasses.replace(self.sampling, num_samples=p.num_samples_per_prompt)
        self.kl_ctl = (ppo_math.AdaptiveKLController(p.kl_coef, p.target_kl, p.kl_horizon)
                       if p.adaptive_kl else ppo_math.FixedKLController(p.kl_coef))
        self.score_moments = ppo_math.RunningMoments()
        log.info("KL penalty estimator: %s; the reported kl_to_ref is the sequence sum of k3 "
                 "(unbiased and >= 0, http://joschu.net/blog/kl-approx.html).", p.kl_estimator)
        log.info("log-probs (pi_old, pi, reference, KL, entropy) of the sampling distribution: logits / "
                 "temperature %g%s.", p.temperature,
                 f", EOS blocked before response token {p.min_new_tokens}" if p.min_new_tokens else "")
        self.nonfinite_in_a_row = 0
        self.sft_eval: list[float] | None = None  # step-0 gold score per eval prompt (win rate)
        # Ensemble members are put on one scale: (score - mean) / std of each member over the first
        # scored batch, the SFT policy's responses to the held-out prompts (the step-0 evaluation).
        self.member_norm: list[list[float]] | None = None  # K x [mean, std]
        self.best: dict | None = None  # ppo.select_best: {"iteration", "value"} of model_best
        self.alarms = {"kl_iterations": 0, "ensemble_evaluations": 0, "kl_on": False}
        self.kl_alarm = p.kl_alarm or (2 * p.target_kl if p.adaptive_kl else 0.0)
        # PPO-ptx rows are drawn in their own seeded order, a global mini-batch per optimizer step.
        self.ptx_order = PromptOrder(len(self.ptx), cfg.seed + 1) if self.ptx else None
        self.ema = engines.ShardEMA(self.actor.module, p.ema_beta) if p.ema_beta > 0 else None

    def state_dict(self) -> dict:
        """What a resumed run needs besides the engines and the EMA (JSON)."""
        s = {"kl_ctl": self.kl_ctl.state_dict(), "score_moments": self.score_moments.state_dict(),
             "nonfinite_in_a_row": self.nonfinite_in_a_row, "sft_eval": self.sft_eval,
             "member_norm": self.member_norm, "best": self.best, "alarms": self.alarms}
        return {**s, "ptx_order": self.ptx_order.state_dict()} if self.ptx_order else s

    def load_state_dict(self, s: dict) -> None:
        self.kl_ctl.load_state_dict(s["kl_ctl"])
        self.score_moments.load_state_dict(s["score_moments"])
        self.nonfinite_in_a_row, self.sft_eval = s["nonfinite_in_a_row"], s["sft_eval"]
        self.member_norm, self.best = s.get("member_norm"), s.get("best")
        self.alarms = s.get("alarms", self.alarms)
        if self.ptx_order:
            self.ptx_order.load_state_dict(s["ptx_order"])

    def _load_inputs(self, ctx: StageContext) -> None:
        """Tokenizers and prompts, all validated before anything is written."""
        cfg, p = self.cfg, self.p
        self.tokenizer = load_tokenizer(ctx.inputs["tokenizer"], cfg.model.trust_remote_code)
        # The reward models: the stage's (one, or an ensemble's members), or none (reward_fn alone).
        roles = ("reward_model", *(f"reward_model_{i}" for i in range(1, len(ctx.inputs))))
        self.reward_paths = [ctx.inputs[role] for role in roles if role in ctx.inputs]
        self.reward_tokenizer = (load_tokenizer(self.reward_paths[0], cfg.model.trust_remote_code)
                                 if self.reward_paths else self.tokenizer)
        self.same_tokenizer = self.reward_tokenizer.get_vocab() == self.tokenizer.get_vocab()
        self.prompts, self.eval_prompts = (ctx.examples(role, lambda role=role: data.prompt_examples(
            data.load_role(ctx.inputs[role], role, self.tokenizer, ctx.inputs["tokenizer"]), self.tokenizer,
            cfg.data.max_prompt_len, str(ctx.inputs[role]))) for role in ("prompt_data", "eval_prompt_data"))
        log.info("stage ppo: %d training prompts from %s; %d eval prompts from %s", len(self.prompts),
                 ctx.inputs["prompt_data"], len(self.eval_prompts), ctx.inputs["eval_prompt_data"])
        if len(self.prompts) < p.rollout_batch_size:
            raise UserError(f"dataset {ctx.inputs['prompt_data']}: {len(self.prompts)} prompts are fewer "
                            f"than ppo.rollout_batch_size={p.rollout_batch_size}.")
        self.ptx = self._load_ptx(ctx) if p.ptx_coef > 0 else None
        if p.ptx_coef == 0 and p.ptx_data_path:
            log.info("ppo.ptx_data_path is given but ppo.ptx_coef is 0: no PTX loss.")
        self.reward_fn = reward_fns.load(p.reward_fn, "ppo.reward_fn") if p.reward_fn else None
        # The gold metric: the user's, else the embedded default task's on its own prompts.
        dc = cfg.data
        default = not (dc.eval_prompt_data_path or dc.prompt_data_path or dc.data_path)
        spec = p.eval_reward_fn or (reward_fns.DEFAULT_TASK_GOLD if default else "")
        self.gold = reward_fns.load(spec, "ppo.eval_reward_fn") if spec else None
        log.info("stage ppo: reward = %s; evaluation gold: %s", self._reward_description(),
                 (spec or "none (give --ppo.eval_reward_fn FILE.py:NAME to log eval/gold_score)")
                 if p.eval_steps else "none, evaluation is off (ppo.eval_steps 0)")
        if p.select_best and p.select_best not in self._eval_metric_names():
            raise UserError(f"option ppo.select_best={p.select_best!r} is not an evaluation metric of this run; "
                            f"choose one of {', '.join(sorted(self._eval_metric_names()))}.")

    def _reward_description(self) -> str:
        p, k = self.p, len(self.reward_paths)
        parts = []
        if k:
            what = (f"mean - {p.ensemble_penalty:g} x std over {k} reward models" if k > 1 else "the reward model")
            parts.append(f"{p.reward_model_coef:g} x ({what})" if p.reward_model_coef != 1 else what)
        if self.reward_fn:
            parts.append(f"{p.reward_fn_coef:g} x {p.reward_fn}")
        return " + ".join(parts)

    def _eval_metric_names(self) -> set[str]:
        names = {"eval/reward_score"}  # (the candidates of ppo.select_best: higher is better)
        if self.reward_paths:
            names |= {"eval/reward_model_raw"}
        if self.gold:
            names |= {"eval/gold_score", "eval/win_rate_vs_sft"}
        if len(self.reward_paths) > 1:
            names |= {"eval/reward_lcb"}
        return names

    def _load_ptx(self, ctx: StageContext) -> list[dict]:
        """PPO-ptx rows, tokenised like SFT's (loss on the response tokens only)."""
        spec, lens = ctx.inputs["ptx_data"], (self.cfg.data.max_prompt_len, self.cfg.data.max_response_len)
        ptx = ctx.examples("ptx_data", lambda: data.sft_examples(
            data.load_role(spec, "ptx_data", self.tokenizer, ctx.inputs["tokenizer"]), self.tokenizer, *lens,
            what=str(spec)))
        log.info("stage ppo: PTX loss (ppo.ptx_coef %g) on %d rows from %s", self.p.ptx_coef, len(ptx), spec)
        if len(ptx) < self.p.mini_batch_size:
            raise UserError(f"dataset {spec}: {len(ptx)} PTX rows are fewer than ppo.mini_batch_size="
                            f"{self.p.mini_batch_size} (one PTX row per rollout row of each optimizer step).")
        return ptx

    def _load_models(self, ctx: StageContext) -> tuple:
        """Actor and critic under the training ZeRO-3 config, reference and reward model under the
        inference one; every vocabulary checked against the tokenizer that feeds it."""
        m = self.cfg.model
        actor_path = ctx.inputs["actor"]
        # The critic starts from the (first) reward model, or from the policy with a fresh value head.
        reward_path = self.reward_paths[0] if self.reward_paths else actor_path
        with engines.zero3_construction(self.ds["train"]):
            actor = load_causal_lm(actor_path, m.trust_remote_code, m.dtype)
            critic = (load_scalar_model(reward_path, m.trust_remote_code, m.dtype)
                      if self.estimator.needs_critic else None)
        actor, critic = self._add_lora(actor, critic, actor_path, reward_path)
        for model in [x for x in (actor, critic) if x is not None]:  # see update() for why dropout goes
            disable_dropout(model)
            if m.gradient_checkpointing:
                enable_gradient_checkpointing(model)
        with engines.zero3_construction(self.ds["inference"]):
            ref = load_causal_lm(actor_path, m.trust_remote_code, m.dtype)
            rewards = [load_scalar_model(path, m.trust_remote_code, m.dtype) for path in self.reward_paths]
        check_vocab(actor, self.tokenizer, f"actor model {actor_path}")
        for path, reward in zip(self.reward_paths, rewards):
            check_vocab(reward, self.reward_tokenizer, f"reward model {path}")
        self.reward_pad_ids = [pooling_pad_id(r) for r in rewards]  # the score is read where HF's forward pools it
        if critic is None:
            return actor, critic, ref, rewards
        # The critic starts from the reward model but reads the actor's token ids.
        check_vocab(critic, self.tokenizer, f"critic (initialised from reward model {reward_path}, "
                                            f"reading the actor's tokens from {ctx.inputs['tokenizer']})")
        if not self.same_tokenizer:
            log.warning("the reward model %s has its own tokenizer: rollouts are re-encoded for it, but "
                        "the critic initialised from it reads the actor's token ids, so its embeddings "
                        "start out meaningless for them.", reward_path)
        return actor, critic, ref, rewards

    def _add_lora(self, actor, critic, actor_path: str, reward_path: str) -> tuple:
        """LoRA adapters where asked; the adapters are plain tensors until the engines partition
        them (DeepSpeed converts them, broadcast from rank 0, in `deepspeed.initialize`)."""
        p = self.p
        if p.actor_lora_rank:
            actor = add_lora(actor, p.actor_lora_rank, p.lora_alpha, p.lora_target_modules, f"actor {actor_path}")
        if p.critic_lora_rank:  # (the config refuses it without a critic)
            critic = add_lora(critic, p.critic_lora_rank, p.lora_alpha, p.lora_target_modules,
                              f"critic (from reward model {reward_path})")
        return actor, critic

    def _build_engines(self, ctx: StageContext, actor, critic, ref, rewards) -> None:
        """Actor and critic: ZeRO-3 training engines; reference and reward: offloaded, frozen."""
        p = self.p
        train_ds, infer_ds = self.ds["train"], self.ds["inference"]
        steps = p.num_iterations * p.num_ppo_epochs * self.sizes["mini_batches_per_epoch"]
        warmup = p.warmup_iterations * p.num_ppo_epochs * self.sizes["mini_batches_per_epoch"]
        self.actor = engines.train_engine(actor, ctx.engine_config(train_ds, "deepspeed_actor"),
                                          p.actor_learning_rate, 0.0, "constant_with_warmup", warmup, steps)
        self.critic = None if critic is None else engines.train_engine(
            critic, ctx.engine_config(train_ds, "deepspeed_critic"), p.critic_learning_rate, 0.0,
            "constant_with_warmup", warmup, steps)
        for engine in [e for e in (self.actor, self.critic) if e is not None]:
            engine.eval()  # train mode only inside update()
        self.ref = engines.inference_engine(ref, infer_ds)
        self.rewards = [engines.inference_engine(reward, infer_ds) for reward in rewards]
        for name in ("actor", "critic", "ref"):
            if getattr(self, name) is not None:
                log.info("engine %s", engines.describe(getattr(self, name), name))
        if self.critic is None:
            log.info("no critic: ppo.advantage_mode=%s needs none (no critic engine, optimizer, scoring, update "
                     "or checkpoint)", p.advantage_mode)
        for i, engine in enumerate(self.rewards):  # "reward", or "reward 0", "reward 1", ... of an ensemble
            log.info("engine %s", engines.describe(engine, "reward" if len(self.rewards) == 1 else f"reward {i}"))
        self.generator = make_backend(self.actor, self.tokenizer, p.gather_modules)
        log.info("generation: the actor's weights materialised into a plain module each phase "
                 "(pipeline/generation.py)")

    # ------------------------------------------------------------ forward helpers
    def _micro(self, n: int):
        mb = self.sizes["micro_batch_size_per_gpu"]  # clamped to a rank's share of a mini-batch
        return [slice(i, i + mb) for i in range(0, n, mb)]

    def _logits_logprobs(self, model, seq, mask, width):
        """Response logits (B, R, V) and log-probs (B, R) of the distribution the sampler drew from
        (logits / temperature, EOS blocked before min_new_tokens): pi_old, pi and the reference all
        come from here, so ratio, KL and entropy are those of the sampling distribution."""
        logits = model(input_ids=seq, attention_mask=mask, position_ids=position_ids(mask)).logits
        logits = ppo_math.sampling_logits(logits[:, width - 1:-1], self.sampling.temperature,
                                          self.tokenizer.eos_token_id, self.sampling.min_new_tokens)
        return logits, ppo_math.logprobs_from_logits(logits, seq[:, width:])

    @staticmethod
    def _values(model, seq, mask, width):
        """Critic values before each response token (B, R), and at the prompt's last token (B,)."""
        v = token_values(model, seq, mask, position_ids(mask))
        return v[:, width - 1:-1], v[:, width - 1]

    # ------------------------------------------------------------ 1. generation
    @torch.no_grad()
    def generate(self, batch: list[dict], seed: int, params: SamplingParams) -> Experience:
        prompts = data.collate_prompts(batch, self.tokenizer.pad_token_id)
        ids = prompts["input_ids"].to(collectives.device())
        prompt_mask = prompts["attention_mask"].to(collectives.device())
        width = ids.shape[1]
        n = params.num_samples  # rows come out prompt-major: a prompt's n samples are adjacent
        mask = prompt_mask.repeat_interleave(n, 0)
        groups = torch.arange(len(batch), device=ids.device).repeat_interleave(n)  # a group lives on one rank
        with self.generator.generation_mode() as model:
            torch.manual_seed(seed)
            seq = self.generator.generate(ids, prompt_mask, params)
            resp_mask = response_mask(seq[:, width:], self.tokenizer.eos_token_id)
            full_mask = torch.cat([mask, resp_mask], dim=1)
            old_logprobs = torch.cat([self._logits_logprobs(model, seq[s], full_mask[s], width)[1]
                                      for s in self._micro(len(seq))])
        texts = [self.tokenizer.decode(seq[i, width:][resp_mask[i].bool()], skip_special_tokens=True)
                 for i in range(len(seq))]
        return Experience(seq, full_mask, resp_mask, old_logprobs * resp_mask, width,
                          [x for x in prompts["prompts"] for _ in range(n)], group_ids=groups, responses=texts)

    # ------------------------------------------------------------ 2. scoring
    @torch.no_grad()
    def score(self, exp: Experience) -> Experience:
        seq, mask, w = exp.sequences, exp.attention_mask, exp.prompt_width
        ref_lp, values, prompt_values = [], [], []
        for s in self._micro(len(seq)):
            ref_lp.append(self._logits_logprobs(self.ref, seq[s], mask[s], w)[1])
            if self.critic is not None:
                v, v0 = self._values(self.critic, seq[s], mask[s], w)
                values.append(v)
                prompt_values.append(v0)
        rm_scores = fn_scores = None
        if self.rewards:
            r_ids, r_mask = self._reward_inputs(exp)
            rm_scores = torch.stack([self._rm_scores(engine, pad_id, r_ids, r_mask)
                                     for engine, pad_id in zip(self.rewards, self.reward_pad_ids)])
        if self.reward_fn:
            fn_scores = seq.new_tensor(self._call(self.reward_fn, exp), dtype=torch.float32)
        m = exp.response_mask
        exp = dataclasses.replace(exp, ref_logprobs=torch.cat(ref_lp) * m, rm_scores=rm_scores, fn_scores=fn_scores,
                                  old_values=torch.cat(values) * m if values else None,
                                  prompt_values=torch.cat(prompt_values) if values else None)
        return dataclasses.replace(exp, scores=self._combine(exp))

    def _rm_scores(self, engine, pad_id, r_ids: torch.Tensor, r_mask: torch.Tensor) -> torch.Tensor:
        """One reward model's score of each row, read where HF's sequence classifier pools: (B,)."""
        scores = []
        for s in self._micro(len(r_ids)):
            v = token_values(engine, r_ids[s], r_mask[s], position_ids(r_mask[s]))
            scores.append(v.gather(1, score_index(r_ids[s], r_mask[s], pad_id)[:, None]).squeeze(1))
        return torch.cat(scores)

    def _call(self, fn: reward_fns.ScoreFn, exp: Experience) -> list[float]:
        """A user function on this rank's rows; a failure on any rank stops every rank with its message."""
        try:
            values, error = fn(exp.prompts, exp.responses), None
        except UserError as e:
            values, error = None, str(e)
        errors = [e for e in collectives.all_gather_object(error) if e]
        if errors:
            raise SharedUserError(errors[0])
        return values

    def _combine(self, exp: Experience) -> torch.Tensor:
        """The sequence reward (B,): reward_model_coef x the reward models' score (an ensemble's
        members normalised, mean - ensemble_penalty x std) + reward_fn_coef x reward_fn."""
        p = self.p
        total = torch.zeros(len(exp.prompts), device=exp.sequences.device)
        if exp.rm_scores is not None:
            rm = exp.rm_scores
            if len(rm) > 1:
                z = self._normalised(rm)
                rm = (z.mean(0) - p.ensemble_penalty * z.std(0))[None]
            elif p.score_norm == "sft":
                rm = self._normalised(rm)
            total = total + p.reward_model_coef * rm[0]
        if exp.fn_scores is not None:
            total = total + p.reward_fn_coef * exp.fn_scores
        return total

    def _normalised(self, rm_scores: torch.Tensor) -> torch.Tensor:
        """(K, B) reward-model scores in units of the SFT policy's: the first call (the step-0
        evaluation) fixes each model's mean and std over every rank's rows. An ensemble's members
        need it to be compared (a pairwise loss leaves each model's offset and scale free)."""
        if self.member_norm is None:
            everyone = rm_scores.new_tensor([v for part in collectives.all_gather_object(rm_scores.T.tolist())
                                             for v in part], dtype=torch.float64).T  # (K, rows of every rank)
            self.member_norm = [[m, max(sd, 1e-6)] for m, sd in zip(everyone.mean(1).tolist(),
                                                                   everyone.std(1).tolist())]
            log.info("reward model scores normalised by (mean, std) %s of the SFT policy's held-out "
                     "responses", [tuple(round(x, 4) for x in ms) for ms in self.member_norm])
        norm = rm_scores.new_tensor(self.member_norm)  # (K, 2)
        return (rm_scores - norm[:, :1]) / norm[:, 1:]

    def _reward_inputs(self, exp: Experience):
        """The rollout as the reward model reads it: same ids, or decoded and re-encoded text."""
        if self.same_tokenizer:
            return exp.sequences, exp.attention_mask
        responses = [exp.sequences[i, exp.prompt_width:][exp.response_mask[i].bool()].tolist()
                     for i in range(len(exp.prompts))]  # token ids: re-encoded with the RM's tokenizer
        ids, mask = data.reencode(exp.prompts, responses, self.tokenizer, self.reward_tokenizer,
                                  self.cfg.data.max_prompt_len, 4 * self.sampling.max_new_tokens)
        return ids.to(collectives.device()), mask.to(collectives.device())

    # ------------------------------------------------------------ 3. rewards and advantages
    @torch.no_grad()
    def advantages(self, exp: Experience) -> Experience:
        p, m = self.p, exp.response_mask
        scores = exp.scores
        if p.score_norm == "running":
            all_scores = collectives.all_reduce_sum(torch.zeros(self.d.world_size, len(scores), device=scores.device)
                                                .index_copy(0, torch.tensor([self.d.rank], device=scores.device),
                                                            scores[None]))
            self.score_moments.update(all_scores.flatten())
            scores = (scores - self.score_moments.mean) / max(self.score_moments.std, 1e-6)
        kl = ppo_math.kl_estimate(exp.old_logprobs, exp.ref_logprobs, p.kl_estimator) * m
        beta = self.kl_ctl.value if p.kl_penalty == "reward" else 0.0  # else a term of the actor loss
        rewards = ppo_math.shape_rewards(scores, kl, m, beta, p.score_clip or None)
        inputs = estimators.AdvantageInputs(rewards, m, exp.old_values, exp.prompt_values, exp.group_ids, p.gamma, p.lam)
        # A group lives on one rank (generate), so group baselines are local; whitening is global.
        adv, ret = estimators.estimate_advantages(p.advantage_mode, inputs, p.whiten_advantages, _global_whiten)
        return dataclasses.replace(exp, rewards=rewards, advantages=adv, returns=ret)

    # ------------------------------------------------------------ 4. training
    def update(self, exp: Experience, seed: int) -> dict:
        # Dropout was disabled in actor and critic (as TRL and OpenRLHF do), so train mode computes
        # what eval mode does and the ratio is exactly 1 before the first step (pi_old was recorded
        # without dropout). Train mode is what HF gradient checkpointing needs to engage.
        trained = [e for e in (self.actor, self.critic) if e is not None]
        for engine in trained:
            engine.train()
        try:
            return self._epochs(exp, seed)
        finally:
            for engine in trained:
                engine.eval()

    def _epochs(self, exp: Experience, seed: int) -> dict:
        p, sizes = self.p, self.sizes
        stats: dict[str, list] = {}
        g = torch.Generator().manual_seed(seed)
        stop = False
        for _ in range(p.num_ppo_epochs):
            order = torch.randperm(len(exp.sequences), generator=g)
            for start in range(0, len(order), sizes["mini_per_rank"]):
                idx = order[start:start + sizes["mini_per_rank"]].to(exp.sequences.device)
                mb_stats = self._mini_batch(exp, idx)
                for k, v in mb_stats.items():
                    stats.setdefault(k, []).append(v)
                if p.early_stop_kl and mb_stats["approx_kl"] > p.early_stop_kl:
                    stop = True
                    break
            if stop:
                break
        out = {k: sum(v) / len(v) for k, v in stats.items()}
        out["early_stopped"] = float(stop)
        return out

    def _mini_batch(self, exp: Experience, idx: torch.Tensor) -> dict:
        p, w, world = self.p, exp.prompt_width, self.d.world_size
        mb_mask = exp.response_mask[idx]
        num_tokens = collectives.all_reduce_sum(mb_mask.sum().float()).clamp(min=1)
        # Global denominators of ppo.loss_agg (so micro-batches and ranks add up to the mini-batch).
        agg = {"num_tokens": num_tokens, "agg_mode": p.loss_agg, "num_seqs": float(p.mini_batch_size),
               "norm_const": float(self.cfg.data.max_response_len)}
        acc = {"policy_loss": 0.0, "entropy": 0.0, "clip_fraction": 0.0, "approx_kl": 0.0}
        if self.critic is not None:
            acc.update(value_loss=0.0, value_clip_fraction=0.0)
        if p.kl_penalty == "loss":
            acc["kl_loss"] = 0.0
        if p.dual_clip:
            acc["dual_clip_fraction"] = 0.0
        if self.ptx:
            ptx_batches, ptx_tokens = self._ptx_micro_batches()
            acc["ptx_loss"] = 0.0
        steps_before = self.actor.global_steps
        for j, s in enumerate(self._micro(len(idx))):
            rows = idx[s]
            seq, mask, m = exp.sequences[rows], exp.attention_mask[rows], exp.response_mask[rows]
            share = m.sum() / num_tokens  # this micro-batch's share of the global mini-batch tokens
            logits, logprobs = self._logits_logprobs(self.actor, seq, mask, w)
            pg_loss, pg_stats = ppo_math.policy_loss(
                logprobs, exp.old_logprobs[rows], exp.advantages[rows], m, p.clip_eps_low or p.clip_eps,
                clip_eps_high=p.clip_eps_high or p.clip_eps, dual_clip=p.dual_clip, **agg)
            ent = ppo_math.aggregate_loss(ppo_math.entropy_from_logits(logits), m, **agg)
            actor_loss = pg_loss - p.entropy_coef * ent
            if p.kl_penalty == "loss":  # GRPO: beta x KL(pi || ref) of the current policy, in the loss
                kl_loss = ppo_math.kl_penalty_loss(logprobs, exp.ref_logprobs[rows], m, p.kl_estimator, **agg)
                actor_loss = actor_loss + self.kl_ctl.value * kl_loss
                acc["kl_loss"] += kl_loss.item()
            if self.ptx:  # PPO-ptx (InstructGPT, eq. 2): + gamma x LM loss, normalised by the global count
                b = ptx_batches[j]
                ptx_loss = causal_lm_loss(self.actor, b["input_ids"], b["attention_mask"], b["labels"])[0] / ptx_tokens
                actor_loss = actor_loss + p.ptx_coef * ptx_loss
                acc["ptx_loss"] += ptx_loss.item()
            v_loss, v_stats = self._value_loss(exp, rows, seq, mask, m, num_tokens)
            self._check_finite(actor_loss, *([] if v_loss is None else [v_loss]))
            # DeepSpeed averages gradients over ranks: x world turns that into the global sum.
            self.actor.backward(actor_loss * world, scale_wrt_gas=False)
            self.actor.step()
            if v_loss is not None:
                self.critic.backward(p.vf_coef * v_loss * world, scale_wrt_gas=False)
                self.critic.step()
                acc["value_loss"] += v_loss.item()
            acc["policy_loss"] += pg_loss.item()
            acc["entropy"] += ent.item()
            for k, v in ((*pg_stats.items(), *v_stats.items())):
                if k in acc:
                    acc[k] += v.item() * share.item()
        if self.ema is not None:
            assert self.actor.global_steps == steps_before + 1, "a mini-batch is one optimizer step"
            self.ema.update()
        summed = collectives.all_reduce_sum(torch.tensor(list(acc.values()), dtype=torch.float64))
        return {k: float(v) for k, v in zip(acc, summed)}

    def _value_loss(self, exp: Experience, rows, seq, mask, m, num_tokens) -> tuple:
        """The critic's clipped value loss on a micro-batch and its stats; (None, {}) without a critic."""
        if self.critic is None:
            return None, {}
        values, _ = self._values(self.critic, seq, mask, exp.prompt_width)
        return ppo_math.value_loss(values, exp.old_values[rows], exp.returns[rows], m, num_tokens,
                                   self.p.value_clip or None)

    def _ptx_micro_batches(self) -> tuple[list[dict], torch.Tensor]:
        """The next global mini-batch of PTX rows: this rank's share as micro-batches, and the
        global count of their labelled (response) tokens."""
        per_rank, r = self.sizes["mini_per_rank"], self.d.rank
        chosen = self.ptx_order.take(self.p.mini_batch_size)[r * per_rank:(r + 1) * per_rank]
        rows = [self.ptx[i] for i in chosen]
        batches = [to_device(data.collate_sft(rows[s], self.tokenizer.pad_token_id)) for s in self._micro(len(rows))]
        tokens = sum((b["labels"][:, 1:] != data.IGNORE_INDEX).sum() for b in batches)
        return batches, collectives.all_reduce_sum(tokens.float()).clamp(min=1)

    def _check_finite(self, *losses: torch.Tensor) -> None:
        """Stop before a non-finite loss reaches the weights (every rank stops together).

        The rollout was finite (checked in iteration()), so a non-finite loss means the model
        itself produced inf/NaN; stepping on would only spread it.
        """
        bad = torch.tensor(float(not all(torch.isfinite(x).all() for x in losses)))
        if collectives.all_reduce_sum(bad).item() > 0:
            raise TrainingHalted("PPO stopped: a non-finite loss in the update (the model produced "
                               "inf/NaN; lower ppo.actor_learning_rate or check the reward scale). "
                               "Weights were not updated with it.")

    # ------------------------------------------------------------ 5. the iteration
    def iteration(self, step: int, batch: list[dict]) -> dict:
        timer = PhaseTimer()
        seed = self.cfg.seed * 100003 + step * self.d.world_size + self.d.rank
        with timer("generation"):
            exp = self.generate(batch, seed, self.rollout_sampling)
        with timer("scoring"):
            exp = self.score(exp)
        with timer("advantages"):
            exp = self.advantages(exp)
        finite = torch.isfinite(exp.advantages).all() & torch.isfinite(exp.returns).all()
        finite = collectives.all_reduce_sum(finite.float()).item() == self.d.world_size
        if finite:
            with timer("training"):
                train = {f"ppo/{k}": v for k, v in self.update(exp, seed).items()}
            self.nonfinite_in_a_row = 0
        else:
            train = {"ppo/skipped_nonfinite": 1.0}
            self.nonfinite_in_a_row += 1
            log.warning("iteration %d: non-finite rewards or advantages; update skipped.", step)
            if self.nonfinite_in_a_row >= self.p.max_nonfinite_skips:
                raise TrainingHalted(f"PPO stopped: {self.nonfinite_in_a_row} iterations in a row had "
                                   f"non-finite rewards or advantages (see metrics.jsonl).")
        metrics = {**self.rollout_metrics(exp), **train}
        metrics.update(self._kl_alarm(step, metrics["rollout/kl_to_ref"]))
        self.kl_ctl.update(metrics["rollout/kl_to_ref"], self.p.rollout_batch_size * self.p.num_samples_per_prompt)
        metrics["ppo/kl_coef"] = self.kl_ctl.value
        for name, engine in (("actor", self.actor), ("critic", self.critic)):
            if engine is None:
                continue
            metrics[f"ppo/{name}_lr"] = engine.get_lr()[0]
            norm = engine.get_global_grad_norm()
            if norm is not None:
                metrics[f"ppo/{name}_grad_norm"] = float(norm)
        for k, v in timer.seconds.items():
            metrics[f"time/{k}"] = v
        metrics["time/step"] = sum(timer.seconds.values())
        tokens = collectives.all_reduce_sum(exp.response_mask.sum().float()).item()
        metrics["perf/tokens_per_second"] = tokens / max(metrics["time/step"], 1e-9)
        metrics["memory/peak_rss_gb"] = peak_rss_gb()
        metrics.update(timer.memory_metrics())  # accelerator memory per phase (none on CPU)
        return metrics

    def _kl_alarm(self, step: int, kl: float) -> dict:
        """alarm/kl_to_ref: the rollout's KL to the reference (rollout/kl_to_ref, k3 per response)
        above ppo.kl_alarm (or 2 x target_kl)."""
        if not self.kl_alarm:
            return {}
        on = kl > self.kl_alarm
        if on and not self.alarms["kl_on"]:
            log.warning("iteration %d: over-optimisation alarm: KL to the reference is %.2f nats, above %.2f "
                        "(ppo.kl_alarm). The policy is leaving what the reward model was trained on; watch "
                        "eval/gold_score, raise ppo.kl_coef or lower ppo.target_kl.", step, kl, self.kl_alarm)
        self.alarms["kl_on"] = on
        self.alarms["kl_iterations"] += int(on)
        return {"alarm/kl_to_ref": float(on)}

    def after_evaluation(self, step: int, metrics: dict, first: dict) -> dict:
        """The ensemble alarm, and model_best (ppo.select_best) when this evaluation is the best yet."""
        out = {}
        if "eval/ensemble_std" in metrics:
            ratio = metrics["eval/ensemble_std"] / max(first["eval/ensemble_std"], 1e-9)
            out = {"alarm/ensemble_std_ratio": ratio}
            if ratio > ENSEMBLE_ALARM_RATIO:
                self.alarms["ensemble_evaluations"] += 1
                log.warning("iteration %d: over-optimisation alarm: the reward models disagree %.1fx as much on "
                            "this policy's held-out responses as on the SFT policy's: the policy reaches outputs "
                            "they were not trained on. Compare eval/gold_score, raise ppo.ensemble_penalty or "
                            "stop here.", step, ratio)
        metric = self.p.select_best
        if metric and (self.best is None or metrics[metric] > self.best["value"]):
            self.best = {"iteration": step, "metric": metric, "value": metrics[metric]}
            folder = self.stage_dir / "model_best"
            zero3.save_hf(self.actor.module, self.tokenizer, folder, self.d.rank,
                            merge=lora_merge(self.actor.module))
            if self.d.is_main:
                (folder / "best.json").write_text(json.dumps(self.best, indent=2))
            log.info("iteration %d: best %s so far (%.4f): policy saved to %s", step, metric, metrics[metric], folder)
        return out

    def rollout_metrics(self, exp: Experience) -> dict:
        m = exp.response_mask
        lengths = m.sum(1).float()
        seq_kl = (ppo_math.kl_estimate(exp.old_logprobs, exp.ref_logprobs, "k3") * m).sum(1)
        truncated = (exp.sequences[:, -1] != self.tokenizer.eos_token_id) & (m[:, -1] == 1)
        score_mean = _global_mean(exp.scores)
        out = {
            "rollout/score_mean": score_mean,
            "rollout/score_std": math.sqrt(max(_global_mean(exp.scores ** 2) - score_mean ** 2, 0.0)),
            "rollout/reward_mean": _global_mean(exp.rewards.sum(1)),
            "rollout/kl_to_ref": _global_mean(seq_kl),
            "rollout/response_length_mean": _global_mean(lengths),
            "rollout/truncated_fraction": _global_mean(truncated.float()),
            "ppo/advantage_mean": _global_mean(ppo_math.masked_mean(exp.advantages, m, dim=1)),
            "ppo/return_mean": _global_mean(ppo_math.masked_mean(exp.returns, m, dim=1)),
            **self._ensemble_metrics(exp, "rollout"),
        }
        if exp.old_values is not None:
            out["ppo/value_explained_variance"] = _global_mean(
                ppo_math.explained_variance(exp.old_values, exp.returns, m)[None])
        if self.p.num_samples_per_prompt > 1:  # groups of responses to one prompt (each on one rank)
            all_equal, std = estimators.group_score_metrics(exp.scores, exp.group_ids)
            out["rollout/group_all_equal_fraction"] = _global_mean(all_equal)
            out["rollout/group_score_std"] = _global_mean(std)
        if exp.fn_scores is not None and exp.rm_scores is not None:  # the two parts of the score
            out["rollout/reward_fn_mean"] = _global_mean(exp.fn_scores)
        return out

    def _ensemble_metrics(self, exp: Experience, phase: str) -> dict:
        """Disagreement of the reward-model ensemble (std over members, normalised units) and its
        lower confidence bound mean - std: the over-optimisation signals of Coste et al. (2023)."""
        if exp.rm_scores is None or len(exp.rm_scores) < 2:
            return {}
        z = self._normalised(exp.rm_scores)
        std = z.std(0)
        return {f"{phase}/ensemble_std": _global_mean(std), f"{phase}/reward_lcb": _global_mean(z.mean(0) - std)}

    # ------------------------------------------------------------ evaluation
    @torch.no_grad()
    def _eval_rollout(self) -> tuple[list[int], Experience]:
        """This rank's share of the held-out prompts (their indices), sampled with a fixed seed and scored."""
        idx = list(range(self.d.rank, len(self.eval_prompts), self.d.world_size))
        n = math.ceil(len(self.eval_prompts) / self.d.world_size)
        idx = idx + idx[:n - len(idx)]  # equal counts on every rank (ZeRO-3 forwards are collective)
        mine = [self.eval_prompts[i] for i in idx]
        return idx, self.score(self.generate(mine, self.cfg.seed + 7 + self.d.rank, self.sampling))

    def calibrate(self) -> None:
        """Without evaluation (ppo.eval_steps 0): the step-0 pass over the held-out prompts that fixes
        the reward models' scale (score_norm sft, an ensemble's members; see _normalised) still runs,
        unlogged, so the rewards, and so training, are those of a run with evaluation."""
        if self.rewards and (len(self.rewards) > 1 or self.p.score_norm == "sft"):
            self._eval_rollout()

    @torch.no_grad()
    def evaluate(self, step: int) -> tuple[dict, list]:
        """Held-out prompts, fixed-seed sampling: gold and RM score, KL to reference, length."""
        idx, exp = self._eval_rollout()
        m = exp.response_mask
        seq_kl = (ppo_math.kl_estimate(exp.old_logprobs, exp.ref_logprobs, "k3") * m).sum(1)
        metrics = {"eval/reward_score": _global_mean(exp.scores),
                   "eval/kl_to_ref": _global_mean(seq_kl),
                   "eval/response_length_mean": _global_mean(m.sum(1).float()),
                   **self._ensemble_metrics(exp, "eval")}
        if exp.rm_scores is not None:  # as the reward model(s) output it, before normalisation
            metrics["eval/reward_model_raw"] = _global_mean(exp.rm_scores.mean(0))
        samples = list(zip(exp.prompts, exp.responses, exp.scores.tolist()))
        if self.gold is not None:
            gold = exp.sequences.new_tensor(self._call(self.gold, exp), dtype=torch.float64)
            metrics["eval/gold_score"] = _global_mean(gold)
            if self.sft_eval is None:  # step 0: the SFT policy's gold score per held-out prompt
                self.sft_eval = [0.0] * len(self.eval_prompts)
                for part in collectives.all_gather_object(list(zip(idx, gold.tolist()))):
                    for i, g in part:
                        self.sft_eval[i] = g
            baseline = torch.tensor([self.sft_eval[i] for i in idx], dtype=torch.float64)
            wins = (gold > baseline).double() + 0.5 * (gold == baseline).double()
            metrics["eval/win_rate_vs_sft"] = _global_mean(wins)
            samples = [(*s, g) for s, g in zip(samples, gold.tolist())]
        return metrics, samples


def _samples_text(samples: list, k: int = 4) -> str:
    lines = ["| prompt | response | score | gold |", "|---|---|---|---|"]
    for s in samples[:k]:
        gold = f"{s[3]:.3f}" if len(s) > 3 else "-"
        lines.append(f"| {s[0]} | {s[1]} | {s[2]:.3f} | {gold} |")
    return "\n".join(lines)


class PromptOrder:
    """Rows (prompts, PTX rows) in a fresh seeded permutation per pass; resumable (the state is JSON)."""

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


def run(ctx: StageContext) -> dict:
    """Train the actor with PPO; save `<stage_dir>/model` (the final policy)."""
    p, d = ctx.cfg.ppo, ctx.dist
    trainer = PPOTrainer(ctx)
    logger = trainer.logger
    per_rank = trainer.sizes["prompts_per_rank"]
    order = PromptOrder(len(trainer.prompts), ctx.cfg.seed)
    models = {name: e for name, e in (("actor", trainer.actor), ("critic", trainer.critic)) if e is not None}
    evaluating = p.eval_steps > 0  # 0: no evaluation; `first` and `last_eval` stay empty
    if ctx.resume is None:
        start, first = 0, {}
        if evaluating:
            first, first_samples = trainer.evaluate(0)
            first.update(trainer.after_evaluation(0, first, first))
            logger.log(0, first)
            logger.text("samples", _samples_text(first_samples), 0)
        else:
            trainer.calibrate()
        last_eval, metrics = first, {}
    else:
        local = ctx.checkpointer.load(ctx.resume, models)  # (random states: every draw in PPO is seeded)
        if trainer.ema is not None:  # per-rank shards; from another rank count, re-cut
            if local is not None:
                trainer.ema.load_state_dict(local["ema"])
            else:
                trainer.ema.load_resharded([old["ema"] for old in ctx.checkpointer.every_local(ctx.resume)])
        s = ctx.resume.state
        start, first, last_eval, metrics = s["step"], s["first_eval"], s["last_eval"], s["last_metrics"]
        order.load_state_dict(s["order"])
        trainer.load_state_dict(s["trainer"])
        log.info("stage ppo: resuming from iteration %d of %d (checkpoint %s, written by %d rank(s))",
                 start, p.num_iterations, ctx.resume.path, ctx.resume.world_size)
    bar = progress(p.num_iterations, "ppo", d.is_main, initial=start)
    for step in range(start + 1, p.num_iterations + 1):
        chosen = order.take(p.rollout_batch_size)
        batch = [trainer.prompts[i] for i in chosen[d.rank * per_rank:(d.rank + 1) * per_rank]]
        metrics = trainer.iteration(step, batch)
        if step % p.logging_steps == 0 or step == p.num_iterations:
            logger.log(step, metrics)
        if evaluating and (step % p.eval_steps == 0 or step == p.num_iterations):
            last_eval, samples = trainer.evaluate(step)
            last_eval.update(trainer.after_evaluation(step, last_eval, first))
            logger.log(step, last_eval)
            logger.text("samples", _samples_text(samples), step)
        bar.update(1)
        bar.set_postfix(score=f"{metrics['rollout/score_mean']:.3f}", kl=f"{metrics['rollout/kl_to_ref']:.3f}")
        ctx.end_of_step(step, step == p.num_iterations, models, lambda: (  # called within this iteration
            {"step": step, "first_eval": first, "last_eval": last_eval, "last_metrics": metrics,  # noqa: B023
             "order": order.state_dict(), "trainer": trainer.state_dict()},
            {"ema": trainer.ema.state_dict()} if trainer.ema else {}))
    bar.close()
    # LoRA adapters are merged: the policy is a plain model of the base architecture.
    merge = lora_merge(trainer.actor.module)
    zero3.save_hf(trainer.actor.module, trainer.tokenizer, ctx.stage_dir / "model", d.rank, merge=merge)
    if trainer.ema is not None:
        zero3.save_hf(trainer.actor.module, trainer.tokenizer, ctx.stage_dir / "model_ema", d.rank, ema=trainer.ema,
                        merge=merge)
    elif d.is_main:  # not a stale EMA from an earlier run next to this run's model
        shutil.rmtree(ctx.stage_dir / "model_ema", ignore_errors=True)
    logger.close()
    if d.is_main:
        rows = [json.loads(line) for line in (ctx.stage_dir / "metrics.jsonl").read_text().splitlines()]
        if not overoptimisation_plot(rows, ctx.stage_dir / "overoptimisation.png"):  # e.g. evaluation off
            (ctx.stage_dir / "overoptimisation.png").unlink(missing_ok=True)  # not an earlier run's plot
    evaluated = {"reward_score_sft": first["eval/reward_score"], "reward_score_final": last_eval["eval/reward_score"],
                 "kl_to_ref": last_eval["eval/kl_to_ref"]} if evaluating else {}
    result = {**evaluated, "iterations": p.num_iterations,
              "seconds_per_iteration": metrics.get("time/step", float("nan")),
              **{f"time_{k.split('/')[1]}": v for k, v in metrics.items() if k.startswith("time/")}}
    if "eval/gold_score" in first:
        result.update(gold_score_sft=first["eval/gold_score"], gold_score_final=last_eval["eval/gold_score"],
                      gold_win_rate_vs_sft=last_eval["eval/win_rate_vs_sft"])
    if "eval/ensemble_std" in first:
        result.update(ensemble_std_sft=first["eval/ensemble_std"], ensemble_std_final=last_eval["eval/ensemble_std"])
    a = trainer.alarms
    result.update(alarm_kl_iterations=a["kl_iterations"], alarm_ensemble_evaluations=a["ensemble_evaluations"])
    if trainer.best is not None:
        result.update(best_iteration=trainer.best["iteration"], best_value=trainer.best["value"])
    elif d.is_main:  # not a stale model_best of an earlier run next to this run's model
        shutil.rmtree(ctx.stage_dir / "model_best", ignore_errors=True)
    return result
