"""Stage 3, PPO: ZeRO-3 actor and critic, frozen reference and reward models (resident/offloaded).

One iteration, one method per phase (see `PPOTrainer.iteration`):
  1. generate    num_samples_per_prompt responses per prompt from the actor (eval mode): pi_old
  2. score       reference log-probs, reward-model score at the last real token, critic values
                 (from its materialised plain copy or its ZeRO-3 engine: ppo.critic_scoring)
  3. advantages  per-token KL penalty + clipped score; the estimator ppo.advantage_mode (GAE,
                 A = R - V(prompt), or a critic-free one: estimators.ADVANTAGE_ESTIMATORS)
  4. update      num_ppo_epochs x mini-batches: clipped surrogate - c2 entropy (+ beta x KL with
                 kl_penalty loss; + ptx_coef x LM loss on supervised rows: PPO-ptx); clipped value
                 loss (with a critic); EMA of the actor after each step
  5. bookkeeping KL controller, metrics; `evaluate` on held-out prompts, and `run`, the loop
The critic exists only when the estimator needs one: critic-free runs build, score with, train and
checkpoint no critic at all.
Shapes: B rollout rows on this rank, P prompt width (left-padded), R response width.
Elsewhere: construction (inputs, models, engines, PTX micro-batches) in ppo_setup.py, the frozen
models' placement in ppo_frozen.py, the reward's parts in ppo_reward.py, metrics, evaluation,
alarms and model_best in ppo_eval.py, containers in ppo_types.py, the resumable state, checkpoint,
resume and the final save in ppo_checkpoint.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging

import torch

from pipeline import controllers, data, estimators, ppo_math
from pipeline.config import max_new_tokens, ppo_sizes
from pipeline.distributed import collectives, engines
from pipeline.distributed.collectives import global_whiten as _global_whiten
from pipeline.distributed.ds_config import ds_configs
from pipeline.errors import TrainingHalted
from pipeline.generation import SamplingParams, position_ids, response_mask
from pipeline.models import causal_lm_loss, token_values
from pipeline.monitoring import PhaseTimer, progress
from pipeline.stages import ppo_checkpoint, ppo_core, ppo_eval, ppo_reward, ppo_setup
from pipeline.stages.common import StageContext
from pipeline.stages.ppo_setup import PromptOrder
from pipeline.stages.ppo_types import Experience, UpdateStats

log = logging.getLogger(__name__)
# The rollout was finite (checked in iteration()), so a non-finite loss means the model itself
# produced inf/NaN; stepping on would only spread it.
NONFINITE_LOSS = (
    "PPO stopped: a non-finite loss in the update (the model produced inf/NaN; lower "
    "ppo.actor_learning_rate or check the reward scale). Weights were not updated with it."
)


class PPOTrainer:
    """Holds the four engines and the generator; `iteration()` runs one PPO step."""

    critic_copy = None  # the critic's materialised copy for scoring; None: its ZeRO-3 engine

    def __init__(self, ctx: StageContext):
        cfg, p, d = ctx.cfg, ctx.cfg.ppo, ctx.dist
        self.cfg, self.p, self.d, self.stage_dir = cfg, p, d, ctx.stage_dir
        self.sizes = ppo_sizes(p, d.world_size)
        self.estimator = estimators.ADVANTAGE_ESTIMATORS[p.advantage_mode]
        ds = ds_configs(cfg, "ppo", d.world_size)
        inputs = ppo_setup.load_inputs(ctx)
        self.tokenizer, self.reward_tokenizer = inputs.tokenizer, inputs.reward_tokenizer
        self.same_tokenizer = inputs.same_tokenizer
        self.prompts, self.eval_prompts, self.ptx = inputs.prompts, inputs.eval_prompts, inputs.ptx
        self.reward_fn, self.gold = inputs.reward_fn, inputs.gold
        collectives.seed_everything(cfg.seed)
        models = ppo_setup.load_models(ctx, inputs, ds, self.estimator.needs_critic)
        self.logger = ctx.start()  # inputs are valid: from here on the stage folder is rewritten
        m = ppo_setup.build_engines(ctx, models, ds, self.sizes, self.tokenizer)
        self.actor, self.critic, self.ref, self.rewards = m.actor, m.critic, m.ref, m.rewards
        self.reward_pad_ids, self.generator = m.reward_pad_ids, m.generator
        self.critic_copy, self.forward_rows = m.critic_copy, m.forward_rows
        self.sampling = SamplingParams(
            max_new_tokens(cfg), p.temperature, p.top_p, p.top_k, min_new_tokens=p.min_new_tokens
        )  # evaluation: one response per prompt
        self.rollout_sampling = dataclasses.replace(
            self.sampling, num_samples=p.num_samples_per_prompt
        )
        self.kl_ctl = (
            controllers.AdaptiveKLController(p.kl_coef, p.target_kl, p.kl_horizon)
            if p.adaptive_kl
            else controllers.FixedKLController(p.kl_coef)
        )
        self.score_moments = controllers.RunningMoments()
        self.ref_nll = controllers.RefNLLConstraint(p.ref_nll_limit, p.ref_nll_lr)
        # nonfinite_in_a_row, sft_eval, member_norm, best, alarms, ptx_order: the bookkeeping
        ppo_checkpoint.init_bookkeeping(self)
        self.kl_alarm = p.kl_alarm or (2 * p.target_kl if p.adaptive_kl else 0.0)
        self.ema = engines.ShardEMA(self.actor.module, p.ema_beta) if p.ema_beta > 0 else None

    # ------------------------------------------------------------ forward helpers
    def micro_slices(self, n: int, mb: int = 0):
        """Rows in slices of `mb` (0: the training micro-batch, clamped to a rank's mini-batch);
        scoring forwards take `forward_rows` (ppo.forward_micro_batch_size, resolved at set-up)."""
        mb = mb or self.sizes.micro_batch_size_per_gpu
        return [slice(i, i + mb) for i in range(0, n, mb)]

    def _logits_logprobs(self, model, seq, mask, width):
        """Response logits (B, R, V) and log-probs (B, R) of the distribution the sampler drew from
        (logits / temperature, EOS blocked before min_new_tokens): pi_old, pi and the reference all
        come from here, so ratio, KL and entropy are those of the sampling distribution."""
        logits = model(input_ids=seq, attention_mask=mask, position_ids=position_ids(mask)).logits
        logits = ppo_math.sampling_logits(
            logits[:, width - 1 : -1],
            self.sampling.temperature,
            self.tokenizer.eos_token_id,
            self.sampling.min_new_tokens,
        )
        return logits, ppo_math.logprobs_from_logits(logits, seq[:, width:])

    @staticmethod
    def _values(model, seq, mask, width):
        """Critic values before each response token (B, R), and at the prompt's last token (B,)."""
        v = engines.forward(model, token_values, seq, mask, position_ids(mask))
        return v[:, width - 1 : -1], v[:, width - 1]

    # ------------------------------------------------------------ 1. generation
    @torch.no_grad()
    @engines.native_linear()  # no gradients: PyTorch's own linear (engines.py)
    def generate(self, batch: list[dict], seed: int, params: SamplingParams) -> Experience:
        prompts = data.collate_prompts(batch, self.tokenizer.pad_token_id)
        ids = prompts["input_ids"].to(collectives.device())
        prompt_mask = prompts["attention_mask"].to(collectives.device())
        width = ids.shape[1]
        n = params.num_samples  # rows come out prompt-major: a prompt's n samples are adjacent
        mask = prompt_mask.repeat_interleave(n, 0)
        # a group lives on one rank
        groups = torch.arange(len(batch), device=ids.device).repeat_interleave(n)
        with self.generator.generation_mode() as model:
            torch.manual_seed(seed)
            seq = self.generator.generate(ids, prompt_mask, params)
            resp_mask = response_mask(seq[:, width:], self.tokenizer.eos_token_id)
            full_mask = torch.cat([mask, resp_mask], dim=1)
            slices = self.micro_slices(len(seq), self.forward_rows)
            old_logprobs = torch.cat(
                [self._logits_logprobs(model, seq[s], full_mask[s], width)[1] for s in slices]
            )
        texts = [
            self.tokenizer.decode(seq[i, width:][resp_mask[i].bool()], skip_special_tokens=True)
            for i in range(len(seq))
        ]
        return Experience(
            seq,
            full_mask,
            resp_mask,
            old_logprobs * resp_mask,
            width,
            [x for x in prompts["prompts"] for _ in range(n)],
            group_ids=groups,
            responses=texts,
        )

    # ------------------------------------------------------------ 2. scoring
    @torch.no_grad()
    @engines.native_linear()  # no gradients: PyTorch's own linear (engines.py)
    def score(self, exp: Experience) -> Experience:
        seq, mask, w = exp.sequences, exp.attention_mask, exp.prompt_width
        slices = self.micro_slices(len(seq), self.forward_rows)
        ref_lp = [self._logits_logprobs(self.ref, seq[s], mask[s], w)[1] for s in slices]
        values, prompt_values = [], []
        if self.critic is not None:  # from its plain copy (ppo.critic_scoring), else the engine
            copy = self.critic_copy
            with copy.materialise() if copy else contextlib.nullcontext(self.critic) as critic:
                for s in slices:
                    v, v0 = self._values(critic, seq[s], mask[s], w)
                    values.append(v)
                    prompt_values.append(v0)
        rm_scores = ppo_reward.reward_model_scores(self, exp) if self.rewards else None
        fn_scores = (
            seq.new_tensor(ppo_reward.call_user_fn(self.reward_fn, exp), dtype=torch.float32)
            if self.reward_fn
            else None
        )
        m = exp.response_mask
        exp = dataclasses.replace(
            exp,
            ref_logprobs=torch.cat(ref_lp) * m,
            rm_scores=rm_scores,
            fn_scores=fn_scores,
            old_values=torch.cat(values) * m if values else None,
            prompt_values=torch.cat(prompt_values) if values else None,
        )
        return dataclasses.replace(exp, scores=ppo_reward.combine(self, exp))

    # ------------------------------------------------------------ 3. rewards and advantages
    @torch.no_grad()
    def advantages(self, exp: Experience) -> Experience:
        p, scores = self.p, exp.scores
        if p.score_norm == "running":
            all_scores = collectives.all_reduce_sum(
                torch.zeros(self.d.world_size, len(scores), device=scores.device).index_copy(
                    0, torch.tensor([self.d.rank], device=scores.device), scores[None]
                )
            )
            self.score_moments.update(all_scores.flatten())
            scores = (scores - self.score_moments.mean) / max(self.score_moments.std, 1e-6)
        # A group lives on one rank (generate), so group baselines are local; whitening is global.
        rewards, adv, ret = ppo_core.rewards_and_advantages(
            p, exp, scores, self.kl_ctl.value, self.ref_nll.value, _global_whiten
        )
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
        stats: list[dict[str, float]] = []  # per mini-batch, all ranks
        g = torch.Generator().manual_seed(seed)
        stop = False
        for _ in range(p.num_ppo_epochs):
            order = torch.randperm(len(exp.sequences), generator=g)
            for start in range(0, len(order), sizes.mini_per_rank):
                idx = order[start : start + sizes.mini_per_rank].to(exp.sequences.device)
                stats.append(self._mini_batch(exp, idx).all_reduced())
                if p.early_stop_kl and stats[-1]["approx_kl"] > p.early_stop_kl:
                    stop = True
                    break
            if stop:
                break
        out = {k: sum(mb[k] for mb in stats) / len(stats) for k in stats[0]}
        out["early_stopped"] = float(stop)
        return out

    def _mini_batch(self, exp: Experience, idx: torch.Tensor) -> UpdateStats:
        """One optimizer step of the actor (and critic) on the rollout rows `idx`, micro-batch by
        micro-batch."""
        p, w, world = self.p, exp.prompt_width, self.d.world_size
        mb_mask = exp.response_mask[idx]
        num_tokens = collectives.all_reduce_sum(mb_mask.sum().float()).clamp(min=1)
        agg = ppo_core.loss_aggregation(p, num_tokens, self.cfg.data.max_response_len)
        stats = UpdateStats.tracking(
            critic=self.critic is not None,
            kl_loss=p.kl_penalty == "loss",
            dual_clip=bool(p.dual_clip),
            ptx=bool(self.ptx),
        )
        if self.ptx:
            ptx_batches, ptx_tokens = ppo_setup.ptx_micro_batches(self)
        steps_before = self.actor.global_steps
        for j, s in enumerate(self.micro_slices(len(idx))):
            rows = idx[s]
            seq, mask, m = exp.sequences[rows], exp.attention_mask[rows], exp.response_mask[rows]
            share = m.sum() / num_tokens  # this micro-batch's share of the global mini-batch tokens
            logits, logprobs = self._logits_logprobs(self.actor, seq, mask, w)
            actor_loss, parts = ppo_core.actor_loss(
                p,
                logits,
                logprobs,
                exp.old_logprobs[rows],
                exp.advantages[rows],
                m,
                agg,
                exp.ref_logprobs[rows] if p.kl_penalty == "loss" else None,
                self.kl_ctl.value,
            )
            if "kl_loss" in parts:
                stats.add("kl_loss", parts["kl_loss"].item())
            if self.ptx:  # PPO-ptx (InstructGPT, eq. 2): + gamma x LM loss over the global count
                b = ptx_batches[j]
                ptx_loss = (
                    causal_lm_loss(self.actor, b["input_ids"], b["attention_mask"], b["labels"])[0]
                    / ptx_tokens
                )
                actor_loss = actor_loss + p.ptx_coef * ptx_loss
                stats.add("ptx_loss", ptx_loss.item())
            v_loss, v_stats = self._value_loss(exp, rows, seq, mask, m, num_tokens)
            losses = [actor_loss] if v_loss is None else [actor_loss, v_loss]
            # stop before a non-finite loss reaches the weights (every rank stops together)
            if not collectives.finite_on_every_rank(*losses):
                raise TrainingHalted(NONFINITE_LOSS)
            # DeepSpeed averages gradients over ranks: x world turns that into the global sum.
            self.actor.backward(actor_loss * world, scale_wrt_gas=False)
            self.actor.step()
            if v_loss is not None:
                self.critic.backward(p.vf_coef * v_loss * world, scale_wrt_gas=False)
                self.critic.step()
                stats.add("value_loss", v_loss.item())
            stats.add("policy_loss", parts["policy_loss"].item())
            stats.add("entropy", parts["entropy"].item())
            stats.add_token_stats({**parts["token_stats"], **v_stats}, share.item())
        if self.ema is not None:
            assert self.actor.global_steps == steps_before + 1, "a mini-batch is one optimizer step"
            self.ema.update()
        return stats

    def _value_loss(self, exp: Experience, rows, seq, mask, m, num_tokens) -> tuple:
        """The critic's clipped value loss on a micro-batch and its stats; (None, {}) without a
        critic."""
        if self.critic is None:
            return None, {}
        values, _ = self._values(self.critic, seq, mask, exp.prompt_width)
        return ppo_math.value_loss(
            values,
            exp.old_values[rows],
            exp.returns[rows],
            m,
            num_tokens,
            self.p.value_clip or None,
        )

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
        if collectives.finite_on_every_rank(exp.advantages, exp.returns):
            with timer("training"):
                train = {f"ppo/{k}": v for k, v in self.update(exp, seed).items()}
            self.nonfinite_in_a_row = 0
        else:
            train = {"ppo/skipped_nonfinite": 1.0}
            self.nonfinite_in_a_row += 1
            log.warning("iteration %d: non-finite rewards or advantages; update skipped.", step)
            if self.nonfinite_in_a_row >= self.p.max_nonfinite_skips:
                raise TrainingHalted(
                    f"PPO stopped: {self.nonfinite_in_a_row} iterations in a row had "
                    f"non-finite rewards or advantages (see metrics.jsonl)."
                )
        metrics = {**ppo_eval.rollout_metrics(self, exp), **train}
        metrics.update(ppo_eval.kl_alarm(self, step, metrics["rollout/kl_to_ref"]))
        self.kl_ctl.update(
            metrics["rollout/kl_to_ref"], self.p.rollout_batch_size * self.p.num_samples_per_prompt
        )
        metrics["ppo/kl_coef"] = self.kl_ctl.value
        if self.p.ref_nll_limit:
            metrics.update(ppo_eval.ref_nll_alarm(self, step, metrics["rollout/ref_nll"]))
            self.ref_nll.update(metrics["rollout/ref_nll"])
            metrics["ppo/ref_nll_coef"] = self.ref_nll.value
        metrics.update(ppo_eval.engine_and_time_metrics(self, exp, timer))
        return metrics

    # ------------------------------------------------------------ evaluation and checkpoints
    def evaluate(self, step: int, first: dict | None = None) -> dict:
        """Held-out evaluation (ppo_eval.evaluate), its alarms and model_best, logged with samples.
        `first`: the step-0 evaluation's metrics (None: this is it)."""
        metrics, samples = ppo_eval.evaluate(self, step)
        first = metrics if first is None else first  # None: this is the step-0 evaluation
        metrics.update(ppo_eval.after_evaluation(self, step, metrics, first))
        self.logger.log(step, metrics)
        self.logger.text("samples", ppo_eval.samples_text(samples), step)
        return metrics


def run(ctx: StageContext) -> dict:
    """Train the actor with PPO; save `<stage_dir>/model` (the final policy)."""
    p, d = ctx.cfg.ppo, ctx.dist
    trainer = PPOTrainer(ctx)
    per_rank = trainer.sizes.prompts_per_rank
    order = PromptOrder(len(trainer.prompts), ctx.cfg.seed)
    evaluating = p.eval_steps > 0  # 0: no evaluation; `first` and `last_eval` stay empty
    if ctx.resume is None:
        start, first, metrics = 0, {}, {}
        if evaluating:
            first = trainer.evaluate(0)
        else:
            ppo_eval.calibrate(trainer)
        last_eval = first
    else:
        start, first, last_eval, metrics = ppo_checkpoint.resume(trainer, ctx, order)
    bar = progress(p.num_iterations, "ppo", d.is_main, initial=start)
    for step in range(start + 1, p.num_iterations + 1):
        chosen = order.take(p.rollout_batch_size)
        batch = [trainer.prompts[i] for i in chosen[d.rank * per_rank : (d.rank + 1) * per_rank]]
        metrics = trainer.iteration(step, batch)
        if step % p.logging_steps == 0 or step == p.num_iterations:
            trainer.logger.log(step, metrics)
        if evaluating and (step % p.eval_steps == 0 or step == p.num_iterations):
            last_eval = trainer.evaluate(step, first)
        bar.update(1)
        bar.set_postfix(
            score=f"{metrics['rollout/score_mean']:.3f}", kl=f"{metrics['rollout/kl_to_ref']:.3f}"
        )
        ppo_checkpoint.checkpoint(trainer, ctx, step, first, last_eval, metrics, order)
    bar.close()
    ppo_checkpoint.save(trainer)
    trainer.logger.close()
    return ppo_eval.stage_result(trainer, ctx, first, last_eval, metrics)
