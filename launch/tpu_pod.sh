#!/usr/bin/env bash
# Run one bifrost command on every host of a Cloud TPU VM slice (a pod: several hosts, one process each).
#
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a launch/tpu_pod.sh setup
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a launch/tpu_pod.sh run -- \
#       bifrost train --config configs/controlnet.py --workdir gs://my-bucket/runs/controlnet
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a launch/tpu_pod.sh logs
#
# setup: copies this checkout to every worker (git archive of HEAD plus uncommitted changes, or a clone of
#        REPO_URL at REPO_REF when REPO_URL is set) and installs it with the TPU extra (what `make install` does,
#        with libtpu instead of the CPU torch):  python3.11 -m venv .venv && .venv/bin/pip install -e '.[tpu]'
# run:   the command after `--` on all workers at once (`--worker=all`), from REMOTE_DIR with the venv first on
#        PATH and BIFROST_DISTRIBUTED=1 (so bifrost calls jax.distributed.initialize(), which finds the other hosts
#        itself on a TPU VM). Every worker tees its output to REMOTE_DIR/logs/RUN_ID/worker-<n>.log; the logs are
#        then fetched into LOG_DIR/RUN_ID/worker-<n>.log here. The exit code is the command's (any worker failing).
# logs:  fetch the logs of RUN_ID (printed by run) again.
#
# Environment: TPU_NAME, ZONE (required); PROJECT; REMOTE_DIR (default bifrost-jax, relative to the home dir);
# LOG_DIR (default logs/$TPU_NAME); RUN_ID (default a timestamp); NUM_WORKERS (default: asked from gcloud);
# REPO_URL / REPO_REF; PYTHON (default python3.11); EXTRA_ENV ("K=V K2=V2" exported on the workers, e.g.
# LIBTPU_INIT_ARGS or XLA_FLAGS); DRY_RUN=1 prints every gcloud command instead of running it.
set -euo pipefail

usage() { sed -n '2,27p' "$0" | sed 's/^# \{0,1\}//'; }

: "${REMOTE_DIR:=bifrost-jax}"
: "${PYTHON:=python3.11}"
RUN_ID_GIVEN=${RUN_ID:-}
: "${RUN_ID:=$(date +%Y%m%d-%H%M%S)}"
: "${REPO_REF:=main}"

run_cmd() {  # print (DRY_RUN=1) or run a command given as words
  if [[ "${DRY_RUN:-0}" == "1" ]]; then
    local line; printf -v line ' %q' "$@"; printf '+%s\n' "$line"  # one write: parallel slices do not interleave
  else
    "$@"
  fi
}

require_env() {
  local v
  for v in "$@"; do
    if [[ -z "${!v:-}" ]]; then echo "tpu_pod.sh: set $v" >&2; exit 2; fi
  done
}

gcloud_tpu() {  # gcloud compute tpus tpu-vm SUBCOMMAND TPU_NAME --zone ZONE [--project P] ARGS...
  local sub=$1; shift
  local args=(gcloud compute tpus tpu-vm "$sub" "$TPU_NAME" --zone "$ZONE")
  [[ -n "${PROJECT:-}" ]] && args+=(--project "$PROJECT")
  run_cmd "${args[@]}" "$@"
}

num_workers() {
  if [[ -n "${NUM_WORKERS:-}" ]]; then echo "$NUM_WORKERS"; return; fi
  if [[ "${DRY_RUN:-0}" == "1" ]]; then echo 1; return; fi
  local ips
  ips=$(gcloud compute tpus tpu-vm describe "$TPU_NAME" --zone "$ZONE" ${PROJECT:+--project "$PROJECT"} \
        --format='value(networkEndpoints[].ipAddress)')
  echo "$ips" | tr ';,' '\n\n' | grep -c .
}

remote_command() {  # the shell line each worker runs for `run`, command words in "$@"
  local cmd env_line=""
  cmd=$(printf ' %q' "$@")
  [[ -n "${EXTRA_ENV:-}" ]] && env_line="export ${EXTRA_ENV}; "
  printf '%s' "cd ~/${REMOTE_DIR} && mkdir -p logs/${RUN_ID} && ${env_line}export BIFROST_DISTRIBUTED=1 " \
    "PATH=\$HOME/${REMOTE_DIR}/.venv/bin:\$PATH PYTHONUNBUFFERED=1; " \
    "W=\$(curl -s -H Metadata-Flavor:Google http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number 2>/dev/null || hostname); " \
    "set -o pipefail; ${cmd# } 2>&1 | tee logs/${RUN_ID}/worker-\$W.log"
}

setup() {
  local install="cd ~/${REMOTE_DIR} && ${PYTHON} -m venv .venv && .venv/bin/pip install -q --upgrade pip && .venv/bin/pip install -q -e '.[tpu]'"
  if [[ -n "${REPO_URL:-}" ]]; then
    gcloud_tpu ssh --worker=all --command \
      "rm -rf ~/${REMOTE_DIR} && git clone -q ${REPO_URL} ~/${REMOTE_DIR} && cd ~/${REMOTE_DIR} && git checkout -q ${REPO_REF} && ${install}"
    return
  fi
  local tarball="${TMPDIR:-/tmp}/bifrost-jax-${RUN_ID}.tar.gz"
  local root
  root=$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)
  # tracked files as they are in the working tree (uncommitted edits included) plus untracked, non-ignored files
  run_cmd bash -c "cd '$root' && { git ls-files -z --cached --others --exclude-standard | tar czf '$tarball' --null --ignore-failed-read -T -; }"
  gcloud_tpu scp "$tarball" "${TPU_NAME}:~/bifrost-jax.tar.gz" --worker=all
  gcloud_tpu ssh --worker=all --command \
    "rm -rf ~/${REMOTE_DIR} && mkdir -p ~/${REMOTE_DIR} && tar xzf ~/bifrost-jax.tar.gz -C ~/${REMOTE_DIR} && ${install}"
}

fetch_logs() {
  local n i dir="${LOG_DIR:-logs/$TPU_NAME}/${RUN_ID}"
  n=$(num_workers)
  run_cmd mkdir -p "$dir"
  for ((i = 0; i < n; i++)); do
    gcloud_tpu scp "${TPU_NAME}:~/${REMOTE_DIR}/logs/${RUN_ID}/worker-$i.log" "$dir/worker-$i.log" --worker="$i" \
      || echo "tpu_pod.sh: no log from worker $i" >&2
  done
  echo "logs in $dir"
}

main() {
  local action=${1:-}
  [[ $# -gt 0 ]] && shift
  case "$action" in
    setup) require_env TPU_NAME ZONE; setup ;;
    run)
      require_env TPU_NAME ZONE
      [[ "${1:-}" == "--" ]] && shift
      if [[ $# -eq 0 ]]; then echo "tpu_pod.sh run: give the command after --" >&2; exit 2; fi
      local status=0
      echo "tpu_pod.sh: run $RUN_ID on $TPU_NAME" >&2
      gcloud_tpu ssh --worker=all --command "$(remote_command "$@")" || status=$?
      fetch_logs || true
      return "$status"
      ;;
    logs)
      require_env TPU_NAME ZONE
      if [[ -z "${RUN_ID_GIVEN}" ]]; then echo "tpu_pod.sh logs: set RUN_ID (printed by run)" >&2; exit 2; fi
      fetch_logs
      ;;
    -h|--help|help|"") usage ;;
    *) echo "tpu_pod.sh: unknown action '$action' (setup | run -- CMD... | logs)" >&2; exit 2 ;;
  esac
}

main "$@"
