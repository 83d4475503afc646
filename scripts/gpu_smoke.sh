#!/usr/bin/env bash
# GPU smoke test: the GPU path end to end on ONE GPU, meant to finish in under 10 minutes.
#
#   bash scripts/gpu_smoke.sh            # from the repository root, on a machine with a CUDA GPU
#
# Steps (each must pass; the summary goes to $RLHF_SMOKE_DIR/gpu_smoke.json):
#   1. bf16-ema   the tiny pipeline (SFT -> RM -> PPO) in bf16 with an EMA of the actor
#   2. stop       the tiny pipeline in bf16, SIGUSR1 during PPO: exit 75 with a checkpoint,
#                 then the same command resumes and completes with a gap-free step axis
#   3. fp16       the tiny pipeline in fp16 (dynamic loss scaling)
#   4. wide       hidden 4096, MLP 14336, 4 layers, exactly 256 new tokens, 2 PPO iterations:
#                 records time/generation, perf/tokens_per_second, memory/accelerator_peak_gb
#                 (needs about 40 GB of GPU memory; RLHF_SMOKE_WIDE_ARGS adds options, e.g.
#                 "--ppo.actor_lora_rank 8 --ppo.critic_lora_rank 8" on a smaller GPU)
#   5. bench      launch/bench.py --smoke
#
# Without a CUDA GPU it prints "SKIPPED: <reason>" and exits 0 (RLHF_REQUIRE_GPU=1: exit 1).
# Environment: PYTHON (default python), RLHF_SMOKE_DIR (default: a new temporary folder),
# RLHF_SMOKE_WIDE_ARGS (extra options of step 4).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python}

reason=$("$PYTHON" - <<'PY' 2>&1
try:
    import torch
except Exception as e:  # noqa: BLE001
    print(f"torch does not import ({e})")
else:
    if not torch.cuda.is_available():
        print(f"no CUDA GPU (torch {torch.__version__}, torch.cuda.is_available() is False)")
PY
)
if [ -n "$reason" ]; then
    echo "SKIPPED: scripts/gpu_smoke.sh needs a CUDA GPU: $reason"
    [ "${RLHF_REQUIRE_GPU:-0}" = 1 ] && exit 1
    exit 0
fi

out=${RLHF_SMOKE_DIR:-$(mktemp -d -t rlhf-gpu-smoke-XXXXXX)}
mkdir -p "$out"
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}   # one GPU
tiny=(--config launch/configs/tiny.yaml)
results=()
started=$(date +%s)
log() { echo "[gpu-smoke $(date '+%T')] $*"; }
port() { "$PYTHON" -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"; }
ppo() { deepspeed --num_gpus 1 --master_port "$(port)" launch/ppo.py "$@"; }

step() {  # step <name> <command ...>: run, time, record
    local name=$1; shift
    local t0; t0=$(date +%s)
    log "step $name: $*"
    "$@" > "$out/$name.log" 2>&1
    local rc=$?
    local dt=$(( $(date +%s) - t0 ))
    if [ "$rc" -eq 0 ]; then log "step $name passed in ${dt}s"; else log "step $name FAILED (exit $rc) after ${dt}s: see $out/$name.log"; tail -30 "$out/$name.log"; fi
    results+=("{\"step\": \"$name\", \"exit\": $rc, \"seconds\": $dt}")
    return "$rc"
}

has_model_ema() { ppo "$@" && [ -d "$out/bf16-ema/ppo/model_ema" ]; }

stop_and_resume() {  # SIGUSR1 once PPO has logged an iteration; exit 75; rerun completes
    local dir=$out/stop
    "$PYTHON" launch/ppo.py "${tiny[@]}" --output_dir "$dir" --model.dtype bf16 &
    local pid=$!
    for _ in $(seq 600); do
        grep -q '"step": 1,' "$dir/ppo/metrics.jsonl" 2>/dev/null && break
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.5
    done
    kill -USR1 "$pid" 2>/dev/null
    wait "$pid"; local rc=$?
    [ "$rc" -eq 75 ] || { echo "expected exit 75 after SIGUSR1, got $rc"; return 1; }
    "$PYTHON" launch/ppo.py "${tiny[@]}" --output_dir "$dir" --model.dtype bf16 || return 1
    "$PYTHON" - "$dir/ppo/metrics.jsonl" <<'PY'
import json, sys
steps = sorted({json.loads(line)["step"] for line in open(sys.argv[1]) if line.strip()})
assert steps == list(range(steps[0], steps[-1] + 1)), f"step axis has a gap: {steps}"
print("resumed; PPO steps", steps)
PY
}

wide() {
    # shellcheck disable=SC2086
    ppo "${tiny[@]}" --output_dir "$out/wide" --model.dtype bf16 --model.hidden_size 4096 \
        --model.intermediate_size 14336 --model.num_hidden_layers 4 --model.num_attention_heads 32 \
        --data.max_response_len 256 --ppo.min_new_tokens 256 --ppo.num_iterations 2 --ppo.eval_steps 100 \
        --sft.max_steps 2 --reward.max_steps 2 --task.num_eval 8 ${RLHF_SMOKE_WIDE_ARGS:-} || return 1
    "$PYTHON" - "$out/wide/ppo/metrics.jsonl" "$out/wide.json" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
last = [r for r in rows if "time/generation" in r][-1]
keys = ("time/generation", "perf/tokens_per_second", "memory/accelerator_peak_gb", "rollout/response_length_mean")
missing = [k for k in keys if k not in last]
assert not missing, f"metrics.jsonl lacks {missing}"
figures = {k: last[k] for k in keys}
json.dump(figures, open(sys.argv[2], "w"), indent=1)
print("wide-layer run:", figures)
PY
}

step bf16-ema has_model_ema "${tiny[@]}" --output_dir "$out/bf16-ema" --model.dtype bf16 --ppo.ema_beta 0.9
step stop stop_and_resume
step fp16 ppo "${tiny[@]}" --output_dir "$out/fp16" --model.dtype fp16
step wide wide
step bench deepspeed --num_gpus 1 --master_port "$(port)" launch/bench.py --smoke --json "$out/bench.json"

total=$(( $(date +%s) - started ))
failed=$(printf '%s\n' "${results[@]}" | grep -vc '"exit": 0,')
wide_json=$(cat "$out/wide.json" 2>/dev/null || echo null)
printf '{"seconds": %d, "failed": %d, "steps": [%s], "wide": %s}\n' "$total" "$failed" \
    "$(IFS=,; echo "${results[*]}")" "$wide_json" > "$out/gpu_smoke.json"
log "total ${total}s (target: under 600 s); $failed step(s) failed; summary $out/gpu_smoke.json"
[ "$total" -le 600 ] || log "WARNING: slower than the 10-minute target"
[ "$failed" -eq 0 ]
