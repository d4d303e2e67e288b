#!/usr/bin/env bash
# Multi-node GPU training without SLURM: one process per node, coordinated through plain environment variables.
#
# Fan out over ssh from one machine (the repository at the same path on every host, its venv installed):
#   HOSTS="gpu-node-0 gpu-node-1" launch/gpu_multinode.sh -- bifrost train --config configs/mllm.py --workdir /nfs/runs/mllm
# or start it yourself on every node with its rank:
#   NODE_RANK=0 NUM_NODES=2 COORDINATOR=gpu-node-0:12355 launch/gpu_multinode.sh -- bifrost train ...
#   NODE_RANK=1 NUM_NODES=2 COORDINATOR=gpu-node-0:12355 launch/gpu_multinode.sh -- bifrost train ...
#
# Each process gets BIFROST_COORDINATOR, BIFROST_NUM_PROCESSES and BIFROST_PROCESS_ID (read by
# bifrost_jax.parallel.mesh.initialize_distributed). With HOSTS, node i of the list is process i, the first host is
# the coordinator (port BIFROST_PORT, default 12355), logs go to LOG_DIR/<host>.log (default logs/multinode-<time>)
# and the exit code is the first failure. REMOTE_DIR: the repository path on the hosts (default: this one).
# DRY_RUN=1 prints the commands instead of running them.
set -euo pipefail

: "${BIFROST_PORT:=12355}"
[[ "${1:-}" == "--" ]] && shift
if [[ $# -eq 0 ]]; then echo "gpu_multinode.sh: give the command after --" >&2; exit 2; fi
root=$(cd "$(dirname "$0")/.." && pwd)
: "${REMOTE_DIR:=$root}"

run_cmd() {
  if [[ "${DRY_RUN:-0}" == "1" ]]; then local line; printf -v line ' %q' "$@"; printf '+%s\n' "$line"; else "$@"; fi
}

if [[ -n "${HOSTS:-}" ]]; then
  read -r -a hosts <<< "$HOSTS"
  n=${#hosts[@]}
  coordinator="${COORDINATOR:-${hosts[0]}:${BIFROST_PORT}}"
  log_dir="${LOG_DIR:-logs/multinode-$(date +%Y%m%d-%H%M%S)}"
  run_cmd mkdir -p "$log_dir"
  words=$(printf ' %q' "$@")
  pids=()
  for ((i = 0; i < n; i++)); do
    remote="cd $(printf '%q' "$REMOTE_DIR") && export BIFROST_COORDINATOR=${coordinator} BIFROST_NUM_PROCESSES=${n}"
    remote+=" BIFROST_PROCESS_ID=${i} PYTHONUNBUFFERED=1 PATH=$(printf '%q' "$REMOTE_DIR")/.venv/bin:\$PATH &&${words}"
    if [[ "${DRY_RUN:-0}" == "1" ]]; then
      run_cmd ssh "${hosts[$i]}" "$remote"
    else
      ssh "${hosts[$i]}" "$remote" > "$log_dir/${hosts[$i]}.log" 2>&1 &
      pids+=($!)
    fi
  done
  status=0
  for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
  [[ "${DRY_RUN:-0}" == "1" ]] || echo "logs in $log_dir" >&2
  exit "$status"
fi

: "${NODE_RANK:?gpu_multinode.sh: set HOSTS (fan out over ssh) or NODE_RANK, NUM_NODES and COORDINATOR}"
: "${NUM_NODES:?gpu_multinode.sh: set NUM_NODES}"
: "${COORDINATOR:?gpu_multinode.sh: set COORDINATOR=host:port (the rank-0 node)}"
export BIFROST_COORDINATOR="$COORDINATOR" BIFROST_NUM_PROCESSES="$NUM_NODES" BIFROST_PROCESS_ID="$NODE_RANK"
export PATH="$REMOTE_DIR/.venv/bin:$PATH" PYTHONUNBUFFERED=1
if [[ "${DRY_RUN:-0}" == "1" ]]; then
  echo "BIFROST_COORDINATOR=$BIFROST_COORDINATOR BIFROST_NUM_PROCESSES=$BIFROST_NUM_PROCESSES BIFROST_PROCESS_ID=$BIFROST_PROCESS_ID"
fi
run_cmd "$@"
