"""Seconds per PPO step of TRL 1.12's PPOTrainer (trl.experimental.ppo) under accelerate + DeepSpeed
ZeRO-3 on the CPU (gloo), on exactly launch/bench.py's workload, to be measured beside it.

Run from the repository root with the TRL venv (python -m venv --system-site-packages /work/trlenv
&& /work/trlenv/bin/pip install --no-deps "trl==1.12.*"; the system's torch, transformers,
deepspeed, accelerate and datasets are used as they are):

    # TRL=/work/trlenv/bin/python; from the repository root:
    # tiny workload (bench.py --smoke's: 2 layers, width 64, vocab 512, 4 prompts, 8 new tokens)
    OMP_NUM_THREADS=1 PYTHONPATH=$PWD $TRL -m accelerate.commands.launch \
        --config_file scripts/trl/accelerate_zero3.yaml --num_processes 2 \
        scripts/bench_trl.py --smoke --threads 1
    OMP_NUM_THREADS=2 PYTHONPATH=$PWD $TRL -m accelerate.commands.launch \
        --config_file scripts/trl/accelerate_zero3.yaml --num_processes 1 \
        scripts/bench_trl.py --smoke --threads 2
    # full workload (bench.py's), 2 processes x 1 thread and 1 process x 2 threads
    OMP_NUM_THREADS=1 PYTHONPATH=$PWD $TRL -m accelerate.commands.launch \
        --config_file scripts/trl/accelerate_zero3.yaml --num_processes 2 \
        scripts/bench_trl.py --threads 1 --json trl_2x1.json
    OMP_NUM_THREADS=2 PYTHONPATH=$PWD $TRL -m accelerate.commands.launch \
        --config_file scripts/trl/accelerate_zero3.yaml --num_processes 1 \
        scripts/bench_trl.py --threads 2 --json trl_1x2.json

(The venv has no `accelerate` executable of its own -- accelerate comes from the system site
packages -- so the launcher is run as a module of the venv's python, which makes the workers
the venv's python too. Prefix `taskset -c 1` to pin everything to one core.) Rank 0 prints one
JSON line at the end (and writes it to --json PATH):
s_per_step (each step as long as its slowest rank), median, per-phase medians (generation /
scoring / training / other), optimizer steps per PPO step, response-length checks, versions, the
workload and TRL's options.

The models: launch/bench.py's `write_fixtures` (imported, not copied) writes the word-level
tokenizer, the Llama policy folder and the Llama scalar (LlamaForSequenceClassification, 1 label)
folder with seed 0, and the prompts JSONL. Every rank writes its own copy into its own temporary
folder (deterministic: identical bytes), which avoids a collective before accelerate is set up.
TRL gets the four models of our benchmark: policy = policy folder, reference = a second load of
the policy folder, value model = scalar folder, reward model = scalar folder (the same weights as
our critic and reward model: our critic starts from the reward model).

How the workload maps to TRL's options (R = prompts / ranks: rollout rows a rank; M = mini_batch /
ranks: rows a rank contributes to one optimizer step; m = min(micro_batch, M): rows a rank forwards
at once in training):

    ours                                   TRL 1.12 PPOConfig / setup
    16 prompts per iteration (all ranks)   one PPO step = one dataloader batch of
                                           local_batch_size = per_device_train_batch_size *
                                           gradient_accumulation_steps = R rows a rank;
                                           total_episodes = 16 * (warmup + repeats), so
                                           num_total_batches = warmup + repeats
    32 prompt tokens incl. BOS             the same prompts, tokenized by the same tokenizer
                                           (its post-processor adds BOS): 32 tokens, no padding
    64 new tokens exactly (min = max)      response_length=64; stop_token=None and
                                           stop_token_id=None (TRL then sets the policy's
                                           generation_config.eos_token_id = None, so `generate`
                                           never stops early and no truncation happens);
                                           missing_eos_penalty=None. Checked every step: every
                                           generated row has exactly 64 response tokens.
    mini-batch 8 rows per optimizer step   gradient_accumulation_steps = M / m (1 on 2 ranks,
      over all ranks                         2 on 1 rank) and num_mini_batches = R / m, so each
    micro-batch 4 rows per rank per           TRL "mini-batch" is one forward/backward of m rows
      forward                                and DeepSpeed steps every M / m of them: 16 / 8 = 2
                                           optimizer steps per PPO step of 8 rows over all
                                           ranks, in forwards of 4 rows a rank (checked: the
                                           engine's global_steps advance by 2 a PPO step).
                                           per_device_train_batch_size = R / GA (8 on both rank
                                           counts) only sizes the rollout; TRL's micro loop
                                           slices the m-row mini-batch with it, so training
                                           forwards are m = 4 rows. (accelerate fills the
                                           DeepSpeed train_micro_batch_size_per_gpu "auto" from
                                           the dataloader's R rows; DeepSpeed does not slice
                                           batches, the value is bookkeeping; its GA is M / m.)
    one PPO epoch                          num_ppo_epochs=1
    generation: all R prompts of a rank    local_rollout_forward_batch_size = R: generation in
      at once; pi_old, ref, critic,          one batch of R rows a rank, as ours; TRL uses the same
      reward forwards in micro-batches       option for its scoring forwards, so ref / value /
      of 4 rows                              reward forwards are R rows (ours: 4): same FLOPs,
                                           larger batches
    fp32                                   bf16=False, fp16=False (PPOConfig defaults bf16=True)
                                           and bf16/fp16 disabled in scripts/trl/ds_zero3.json
    no gradient checkpointing              gradient_checkpointing=False (PPOConfig defaults True)
    ZeRO-3 (ds_configs/zero3_train.json)   scripts/trl/ds_zero3.json: the same zero_optimization
                                           section (no overlap, 5e7 buckets, persistence 1e4),
                                           batch sizes and gradient_clipping "auto" (filled by
                                           transformers from the PPOConfig: max_grad_norm 1.0 =
                                           our gradient_clipping 1.0); zero3_init_flag: true
                                           (models built partitioned)
    ref and reward model "auto" placement  TRL's prepare_deepspeed: each a ZeRO-3 inference engine
                                           (partitioned over ranks, parameters gathered per layer
                                           in every forward; with TRL's own smaller bucket and
                                           persistence sizes from the hidden size)
    generation with the actor              ds3_gather_for_generation=True (default): TRL gathers
      materialised                           the whole policy+value wrapper for generation
    temperature 1.0                        temperature=1.0 (PPOConfig default 0.7; compute-neutral)
    kl_coef, clip, vf_coef, lr ...         TRL defaults (kl_coef 0.05, cliprange 0.2, vf_coef 0.1,
                                           cliprange_value 0.2, gamma 1, lam 0.95, lr 3e-6 linear
                                           decay, AdamW from TrainingArguments); compute-neutral
    seed 0                                 seed=0
    2 ranks x 1 thread / 1 rank x 2        accelerate launch --num_processes 2 / 1, OMP_NUM_THREADS
      threads                                and torch.set_num_threads(--threads) in every process;
                                           DeepSpeed's CPU accelerator picks gloo (no oneCCL here)
    the same 16 prompts every iteration    train_dataset = the 16 prompts repeated warmup +
                                           repeats + 1 times; TRL's DataLoader shuffles
                                           (shuffle=True is hard-coded), so a step's rows are
                                           drawn from copies of our prompts: every row is 32
                                           tokens, so the compute is the same, but a step's
                                           prompt set differs from ours (a prompt may appear
                                           twice in a step). Why the copies: see the problems.
    other                                  num_sample_generations=0 (TRL's debug sample
                                           generations off), report_to none, save_strategy no,
                                           logging_steps=1, disable_tqdm

What could not be matched (TRL's design, no option for it):
  - pi_old: TRL takes the rollout log-probs from generate's output_scores (no extra forward);
    ours runs a separate actor forward for pi_old. TRL's generation phase does less work.
  - Policy and value are ONE DeepSpeed engine (PolicyAndValueWrapper) with one optimizer and one
    loss pg_loss + vf_coef * vf_loss: one backward, one ZeRO-3 step per mini-batch for both; ours
    has two engines (actor, critic), two backwards and two steps. Same FLOPs, fewer collectives /
    engine calls in TRL.
  - The generation gather (unwrap_model_for_generation) gathers the value model's parameters too,
    not only the policy's.
  - transformers' `generate` turns on synced_gpus under ZeRO-3 with more than one rank (a small
    all-reduce per decoded token); TRL's generate call gives no way to turn it off. Ours does not
    sync (all responses have the same length, so both decode the same 64 steps).
  - Scoring forwards are R rows a rank (one option for generation and scoring chunks), ours 4.
  - TRL computes the entropy of every training micro-batch (softmax over the vocabulary, no
    grad) for its statistics; ours with entropy_coef 0 as well (stats) -- roughly comparable.
  - TRL masks a response token equal to the pad id (0) as padding (its `forward` derives the
    attention mask from `!= pad`); ours attends it. A sampled pad is rare (vocab 8000); counted
    and reported as sampled_pad_tokens. EOS (id 2) may be sampled mid-response in TRL (not
    suppressed, not a stop token); ours blocks EOS through min_new_tokens. Neither changes shapes.
  - Timing: ours times `PPOTrainer.iteration` per call, ranks synchronised by a barrier before
    each; here a step is the wall time between TRL's consecutive on_step_end callbacks (the first
    from on_train_begin), which include TRL's per-step metric gathers, lr-scheduler step,
    gc.collect() and empty_cache() calls.

Phases (cheap wrappers around names in trl.experimental.ppo.ppo_trainer): generation = inside
unwrap_model_for_generation (gather of the ZeRO-3 parameters, batch_generation, release);
scoring = from there to the first training forward (ref / value / reward forwards, log-probs,
rewards, GAE, whitening); training = from the first training forward to the step's end
(forward, backward, optimizer steps, TRL's metrics).

Problems met on CPU + ZeRO-3 and how they are solved (documented options only):
  - PPOConfig's bf16=True default: bf16=False (and the DeepSpeed file disables bf16 / fp16).
  - PPOConfig's gradient_checkpointing=True default: gradient_checkpointing=False.
  - num_sample_generations (default 10) would run extra generations: 0.
  - accelerate counted a DeepSpeed launch on the CPU as ONE process: TrainingArguments builds the
    first PartialState without a backend, DeepSpeed then joins both ranks (gloo) but accelerate,
    its backend being None, sets num_processes = 1 (so TRL's world_size, batch sizes and metric
    gathers were wrong: "ProcessGroupGloo::allgather: invalid output tensor list"). Fixed with
    ddp_backend="gloo" (TrainingArguments), which accelerate passes on.
  - "train_batch_size": "auto" in the DeepSpeed file was filled as per_device * GA (without the
    world size) and failed DeepSpeed's batch assertion on 2 ranks; the key is left out, so
    DeepSpeed computes it from the micro-batch size, GA (both "auto") and the world size.
  - With gradient_accumulation_steps > 1 (the 1-rank run) and a one-batch epoch, accelerate's
    sync_with_dataloader (on by default; TRL builds its Accelerator with only
    gradient_accumulation_steps, so TrainingArguments' accelerator_config cannot turn it off)
    made every micro-batch a gradient-accumulation boundary: 4 optimizer steps of 4 rows per PPO
    step instead of 2 of 8. Fixed by the dataset copies above (no measured step is a dataloader's
    last batch); the script reports the engine's optimizer steps per PPO step (must be 2).
  - TRL's per-step training statistics (ratio, clipfrac, ...) are indexed by (mini-batch,
    gradient-accumulation index) and assume GA micro-batches per mini-batch; with this mapping
    only index 0 is filled when GA = 2, so e.g. val/ratio logs 0.5 on 1 rank. Logging only.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.metadata
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from statistics import median

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "launch"))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="bench.py's tiny SMOKE workload")
    p.add_argument(
        "--threads", type=int, help="torch threads per process (default: OMP_NUM_THREADS or 1)"
    )
    p.add_argument("--warmup", type=int, default=1, help="unmeasured PPO steps first (default 1)")
    p.add_argument("--repeats", type=int, default=3, help="measured PPO steps (default 3)")
    p.add_argument("--json", metavar="PATH", help="also write the result to this file (rank 0)")
    return p.parse_args(argv)


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    threads = args.threads or int(os.environ.get("OMP_NUM_THREADS", "1"))
    import torch

    torch.set_num_threads(threads)

    from bench import write_fixtures  # launch/bench.py (needs `pipeline` on PYTHONPATH)
    from bench_lib import SMOKE, Workload
    from datasets import Dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        TrainerCallback,
    )
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as trl_ppo

    w = SMOKE if args.smoke else Workload()
    w = dataclasses.replace(w, warmup=args.warmup, repeats=args.repeats)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    R, M = w.prompts // world, w.mini_batch // world
    m = max(1, min(w.micro_batch, M))
    assert R * world == w.prompts and M * world == w.mini_batch and M % m == 0 and R % M == 0
    ga, num_mini_batches = M // m, R // m
    per_device = R // ga
    steps = w.warmup + w.repeats

    # every rank its own identical fixtures (seed 0), before any ZeRO-3 config exists
    folder = Path(tempfile.mkdtemp(prefix="bench-trl-"))
    paths = write_fixtures(folder, w)

    config = PPOConfig(
        output_dir=str(folder / "out"),
        seed=0,
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=ga,
        num_mini_batches=num_mini_batches,
        local_rollout_forward_batch_size=R,
        total_episodes=w.prompts * steps,
        response_length=w.new_tokens,
        stop_token=None,
        stop_token_id=None,
        missing_eos_penalty=None,
        temperature=1.0,
        num_ppo_epochs=1,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        num_sample_generations=0,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        per_device_eval_batch_size=1,
        # accelerate's PartialState without a device backend treats a DeepSpeed launch on the CPU
        # as one process (backend None -> num_processes 1) although DeepSpeed joined 2 ranks
        ddp_backend="gloo",
    )
    # after PPOConfig (it registers the ZeRO-3 config): models are built partitioned (zero.Init)
    tok = AutoTokenizer.from_pretrained(paths["policy"])
    policy = AutoModelForCausalLM.from_pretrained(paths["policy"])
    ref = AutoModelForCausalLM.from_pretrained(paths["policy"])
    value = AutoModelForSequenceClassification.from_pretrained(paths["reward"], num_labels=1)
    reward = AutoModelForSequenceClassification.from_pretrained(paths["reward"], num_labels=1)
    prompts = [json.loads(x)["prompt"] for x in Path(paths["prompts"]).read_text().splitlines()]
    ids = [tok(p)["input_ids"] for p in prompts]
    assert all(len(x) == w.prompt_len for x in ids), {len(x) for x in ids}
    # copies of the prompts, one more than the steps run: accelerate's Accelerator (built by TRL
    # with only gradient_accumulation_steps, so sync_with_dataloader=True) forces a gradient sync,
    # i.e. a DeepSpeed optimizer step, on every micro-batch of a dataloader's last batch; with a
    # one-batch epoch every PPO step would be a last batch and take M / m times too many steps.
    dataset = Dataset.from_dict({"input_ids": ids * (steps + 1)})

    # ---- cheap phase timing: wrap names the trainer's module looks up at call time
    marks: list[dict] = []
    checks = {"rows": 0, "short_rows": 0, "sampled_pad_tokens": 0, "sampled_eos_tokens": 0}
    orig_unwrap, orig_forward, orig_batch_gen = (
        trl_ppo.unwrap_model_for_generation,
        trl_ppo.forward,
        trl_ppo.batch_generation,
    )
    holder: dict = {}

    @contextlib.contextmanager
    def unwrap(*a, **k):
        marks.append({"gen_start": time.perf_counter()})
        with orig_unwrap(*a, **k) as model:
            yield model
        marks[-1]["gen_end"] = time.perf_counter()

    def forward(model, *a, **k):
        if model is holder.get("model") and marks and "train_start" not in marks[-1]:
            marks[-1]["train_start"] = time.perf_counter()
        return orig_forward(model, *a, **k)

    def batch_generation(model, queries, *a, **k):
        qr, logits = orig_batch_gen(model, queries, *a, **k)
        resp = qr[:, queries.shape[1] :]
        checks["rows"] += len(qr)
        checks["short_rows"] += int(resp.shape[1] != w.new_tokens) * len(qr)
        checks["sampled_pad_tokens"] += int((resp == tok.pad_token_id).sum())
        checks["sampled_eos_tokens"] += int((resp == tok.eos_token_id).sum())
        return qr, logits

    trl_ppo.unwrap_model_for_generation, trl_ppo.forward, trl_ppo.batch_generation = (
        unwrap,
        forward,
        batch_generation,
    )

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.ends: list[float] = []
            self.global_steps: list[int] = []

        def on_train_begin(self, *a, **k):
            self.ends.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            self.ends.append(time.perf_counter())
            self.global_steps.append(int(getattr(holder["model"], "global_steps", -1)))

    timer = StepTimer()
    trainer = PPOTrainer(
        args=config,
        processing_class=tok,
        model=policy,
        ref_model=ref,
        reward_model=reward,
        value_model=value,
        train_dataset=dataset,
        eval_dataset=dataset,
        callbacks=[timer],
    )
    holder["model"] = trainer.model
    acc = trainer.accelerator

    def partitioned(module) -> bool:  # every parameter a ZeRO-3 partition
        return all(hasattr(q, "ds_id") for q in module.parameters())

    zero3 = {
        "policy+value engine": partitioned(trainer.model.module),
        "ref engine": partitioned(trainer.ref_model.module),
        "reward engine": partitioned(trainer.reward_model.module),
    }
    assert all(zero3.values()), zero3
    engine = trainer.model  # the policy+value DeepSpeedEngine
    setup = {
        "zero_stage": engine.zero_optimization_stage(),
        "param_dtype": str(next(engine.module.parameters()).dtype),
        "ds_train_batch_size": engine.train_batch_size(),
        "ds_micro_batch_per_rank": engine.train_micro_batch_size_per_gpu(),
        "ds_gradient_accumulation_steps": engine.gradient_accumulation_steps(),
        "ds_gradient_clipping": engine.gradient_clipping(),
        "optimizer": type(engine.optimizer).__name__
        + f"({type(getattr(engine.optimizer, 'optimizer', None)).__name__})",
        "gradient_checkpointing": bool(engine.module.policy.is_gradient_checkpointing),
        "dist_backend": torch.distributed.get_backend(),
        "world_size": torch.distributed.get_world_size(),
    }
    trainer.train()

    walls = [b - a for a, b in zip(timer.ends, timer.ends[1:])]
    phases = []
    for i, mk in enumerate(marks):
        phases.append(
            {
                "generation": mk["gen_end"] - mk["gen_start"],
                "scoring": mk["train_start"] - mk["gen_end"],
                "training": timer.ends[i + 1] - mk["train_start"],
                # from the previous step's end to generation: TRL's del / empty_cache /
                # gc.collect after on_step_end and the next dataloader batch
                "other": mk["gen_start"] - timer.ends[i],
            }
        )
    opt_steps = [b - a for a, b in zip([0] + timer.global_steps, timer.global_steps)]
    mine = {"walls": walls, "phases": phases, "checks": checks, "opt_steps": opt_steps}
    from accelerate.utils import gather_object

    everyone = gather_object([mine])
    shutil.rmtree(folder, ignore_errors=True)
    if not acc.is_main_process:
        return None

    def slowest(get):  # per step the slowest rank, measured steps only
        per_step = [max(get(r)[i] for r in everyone) for i in range(steps)]
        return per_step[w.warmup :]

    s_per_step = slowest(lambda r: r["walls"])
    phase_s = {
        k: median(slowest(lambda r, k=k: [p[k] for p in r["phases"]]))
        for k in ("generation", "scoring", "training", "other")
    }
    total_checks = {k: sum(r["checks"][k] for r in everyone) for k in checks}
    assert total_checks["short_rows"] == 0, total_checks
    out = {
        "system": f"trl {importlib.metadata.version('trl')} PPOTrainer + ZeRO-3",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "smoke": args.smoke,
        "ranks": acc.num_processes,
        "threads": threads,
        "torch_threads": torch.get_num_threads(),
        "s_per_step": s_per_step,
        "median": median(s_per_step),
        "phases_median_s": phase_s,
        "warmup_s": [max(r["walls"][i] for r in everyone) for i in range(w.warmup)],
        "optimizer_steps_per_ppo_step": everyone[0]["opt_steps"],
        "response_checks": total_checks,
        "zero3_partitioned": zero3,
        "setup": setup,
        "trl_options": {
            "per_device_train_batch_size": per_device,
            "gradient_accumulation_steps": ga,
            "num_mini_batches": num_mini_batches,
            "local_rollout_forward_batch_size": R,
            "local_mini_batch_size": config.local_mini_batch_size,
            "mini_batch_size": config.mini_batch_size,
            "batch_size": config.batch_size,
            "response_length": w.new_tokens,
            "num_ppo_epochs": 1,
            "total_episodes": config.total_episodes,
        },
        "workload": dataclasses.asdict(w),
        "versions": {
            p: importlib.metadata.version(p)
            for p in ("trl", "torch", "transformers", "deepspeed", "accelerate")
        },
        "machine": {
            "platform": platform.platform(),
            "cores": os.cpu_count(),
            "affinity": sorted(os.sched_getaffinity(0)),
        },
    }
    line = json.dumps(out)
    print(line, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
