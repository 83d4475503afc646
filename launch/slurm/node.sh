#!/usr/bin/env bash
# One node of a SLURM job (started by job.sh through srun, one task per node): DeepSpeed's per-node
# launcher, `python -m deepspeed.launcher.launch` (what the `deepspeed` runner starts on each node
# over ssh), with the node rank from SLURM. No ssh or pdsh.
#   node.sh <launcher path> [launcher arguments ...]
# Needs RLHF_NODES (comma list), RLHF_PROCS_PER_NODE, MASTER_ADDR, MASTER_PORT (set by job.sh).
set -euo pipefail
script=$1; shift
# SLURM signals every process of a step. The ranks catch SIGUSR1 (checkpoint, exit 75); the
# launcher has no handler and would die of it, so it ignores it (the ranks install their own).
trap '' USR1
PYTHON=${PYTHON:-python}
node_rank=${SLURM_NODEID:?not in a SLURM step}
world_info=$("$PYTHON" - <<'PY'
import base64, json, os
nodes = os.environ["RLHF_NODES"].split(",")
procs = int(os.environ["RLHF_PROCS_PER_NODE"])
local = list(range(procs))
visible = [x for x in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if x]
if len(visible) >= procs and all(x.isdigit() for x in visible):
    local = [int(x) for x in visible[:procs]]  # the GPUs SLURM gave this node
info = {n: (local if i == int(os.environ["SLURM_NODEID"]) else list(range(procs)))
        for i, n in enumerate(nodes)}
print(base64.urlsafe_b64encode(json.dumps(info).encode()).decode())
PY
)
echo "[rlhf-slurm $(date '+%F %T')] node ${SLURMD_NODENAME:-$(hostname)} ($(hostname)): node rank" \
     "$node_rank of ${SLURM_NNODES:-?}, $RLHF_PROCS_PER_NODE rank(s), rendezvous $MASTER_ADDR:$MASTER_PORT," \
     "attempt ${SLURM_RESTART_COUNT:-0}"
exec "$PYTHON" -u -m deepspeed.launcher.launch --world_info="$world_info" --node_rank="$node_rank" \
    --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" "$script" "$@"
