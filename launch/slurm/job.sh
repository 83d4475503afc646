#!/usr/bin/env bash
# The batch side of launch/slurm/*.sbatch (runs on the job's first node):
#   job.sh <launcher, e.g. ppo.py> [launcher arguments ...]
# One DeepSpeed launcher per node via srun (node.sh), rendezvous on the first node, per-node logs,
# and a requeue when the ranks stopped with a checkpoint (exit 75) after a stop signal.
#
# Environment (all optional):
#   RLHF_PROCS_PER_NODE  ranks per node; default: the GPUs SLURM gave the node
#                        (SLURM_GPUS_ON_NODE, else SLURM_GPUS_PER_NODE), else 1 (a CPU node)
#   MASTER_ADDR          rendezvous address; default: the first node's NodeAddr (scontrol show node)
#   MASTER_PORT          rendezvous port; default: 20000 + job id % 40000 (differs between jobs)
#   RLHF_SLURM_LOG_DIR   per-node logs go to $RLHF_SLURM_LOG_DIR/<job id>/; default:
#                        $SLURM_SUBMIT_DIR/logs/slurm
#   RLHF_SLURM_REQUEUE   1 (default): requeue the job when the ranks stopped with a checkpoint
#                        after a stop signal (exit 75); 0: just exit 75
#   PYTHON               the interpreter with deepspeed and this package; default: python on PATH
#   TORCH_NCCL_ASYNC_ERROR_HANDLING  default 1 (a failed collective aborts instead of hanging);
#                        NCCL_* / GLOO_* settings (interfaces, IB adapters) pass through and are logged
set -uo pipefail

log() { echo "[rlhf-slurm $(date '+%F %T')] $*"; }

if [ $# -lt 1 ] || [ -z "${SLURM_JOB_ID:-}" ]; then
    echo "usage (inside a SLURM job): job.sh <sft.py|reward.py|ppo.py> [launcher arguments ...]" >&2
    exit 2
fi
script=$1; shift
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
[ -f "$repo/launch/$script" ] || { log "no launcher $repo/launch/$script"; exit 2; }

# ---- the allocation: nodes, ranks per node, rendezvous
nodes=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | paste -sd, -)
nnodes=$(echo "$nodes" | tr , '\n' | wc -l)
first=${nodes%%,*}
if [ -n "${RLHF_PROCS_PER_NODE:-}" ]; then
    procs=$RLHF_PROCS_PER_NODE
elif [ -n "${SLURM_GPUS_ON_NODE:-}" ] && [ "${SLURM_GPUS_ON_NODE}" -gt 0 ] 2>/dev/null; then
    procs=$SLURM_GPUS_ON_NODE
elif [ -n "${SLURM_GPUS_PER_NODE:-}" ]; then
    procs=${SLURM_GPUS_PER_NODE##*:}          # "4" or "a100:4"
else
    procs=1                                   # a CPU node
fi
case $procs in ''|*[!0-9]*|0) log "bad ranks per node '$procs' (RLHF_PROCS_PER_NODE)"; exit 2;; esac
if [ -z "${MASTER_ADDR:-}" ]; then
    MASTER_ADDR=$(scontrol show node "$first" | grep -o 'NodeAddr=[^ ]*' | head -1 | cut -d= -f2)
    MASTER_ADDR=${MASTER_ADDR:-$first}
fi
MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 40000))}
attempt=${SLURM_RESTART_COUNT:-0}
log_dir=${RLHF_SLURM_LOG_DIR:-${SLURM_SUBMIT_DIR:-$PWD}/logs/slurm}/$SLURM_JOB_ID
mkdir -p "$log_dir"
export RLHF_NODES=$nodes RLHF_PROCS_PER_NODE=$procs MASTER_ADDR MASTER_PORT
# A failed or timed-out NCCL collective aborts its rank instead of hanging (a dead node then ends
# the job after the launcher's --dist_timeout_minutes, not at the time limit). Yours wins if set.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
network=$(env | grep -E '^(NCCL|GLOO|TORCH_NCCL)_' | sort | paste -sd' ' -)

log "job $SLURM_JOB_ID attempt $attempt: launch/$script on $nnodes node(s) ($nodes) x $procs rank(s);" \
    "rendezvous $MASTER_ADDR:$MASTER_PORT; per-node logs $log_dir/attempt$attempt-node*.log"
log "network settings: ${network:-none} (see docs/slurm.md, GPU clusters (NCCL): NCCL_SOCKET_IFNAME, NCCL_IB_HCA, ...)"

# ---- stop signals
# SIGUSR1 to this shell (`#SBATCH --signal=B:USR1@N`, `scancel -b -s USR1`): forward it to every
# task of the job's steps; each rank finishes its step, writes a checkpoint and exits 75.
# (`--signal=USR1@N` without B: reaches the ranks directly; node.sh keeps the launcher alive.)
# SIGTERM (scancel, scontrol requeue, preemption, the time limit): SLURM signals the ranks itself
# and decides what happens next; this script then does not requeue.
terminated=
on_usr1() { log "SIGUSR1: asking every rank to checkpoint and stop"; scancel --signal=USR1 "$SLURM_JOB_ID"; }
on_term() { log "SIGTERM: SLURM is ending this attempt; the ranks checkpoint and stop"; terminated=1; }
trap on_usr1 USR1
trap on_term TERM

srun_args=(--nodes="$nnodes" --ntasks="$nnodes" --ntasks-per-node=1 --kill-on-bad-exit=0 --wait=600
           --output="$log_dir/attempt$attempt-node%n.log")
if [ -z "${SLURM_CPUS_PER_TASK:-}" ] && [ -n "${SLURM_CPUS_ON_NODE:-}" ]; then
    srun_args+=(--cpus-per-task="$SLURM_CPUS_ON_NODE")   # the launcher and its ranks get the node's CPUs
fi
srun "${srun_args[@]}" bash "$repo/launch/slurm/node.sh" "$repo/launch/$script" "$@" &
srun_pid=$!
while kill -0 "$srun_pid" 2>/dev/null; do wait "$srun_pid"; done   # a trapped signal ends a wait early
wait "$srun_pid"; rc=$?

if [ "$rc" -eq 75 ]; then
    if [ -n "$terminated" ]; then
        log "stopped with a checkpoint (exit 75) after SIGTERM: not requeueing (SLURM decides)"
    elif [ "${RLHF_SLURM_REQUEUE:-1}" = 1 ]; then
        log "stopped with a checkpoint (exit 75): requeueing job $SLURM_JOB_ID; the next attempt resumes"
        scontrol requeue "$SLURM_JOB_ID" || log "scontrol requeue failed: resubmit to resume"
    else
        log "stopped with a checkpoint (exit 75); RLHF_SLURM_REQUEUE=0: resubmit to resume"
    fi
else
    log "launch/$script finished with exit code $rc"
fi
exit "$rc"
