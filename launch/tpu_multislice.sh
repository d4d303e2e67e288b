#!/usr/bin/env bash
# Run one bifrost command on every host of several Cloud TPU slices joined over the data-center network (DCN).
#
#   TPU_PREFIX=bifrost NUM_SLICES=2 ZONE=us-east5-a launch/tpu_multislice.sh setup
#   TPU_PREFIX=bifrost NUM_SLICES=2 ZONE=us-east5-a launch/tpu_multislice.sh run -- \
#       bifrost train --config configs/mllm.py --workdir gs://my-bucket/runs/mllm --config.mesh.dcn_data=2
#
# The slices are TPU VMs named ${TPU_PREFIX}-0 ... ${TPU_PREFIX}-$((NUM_SLICES-1)), e.g. made by
#   gcloud compute tpus queued-resources create ${TPU_PREFIX} --node-count 2 --node-prefix ${TPU_PREFIX} \
#       --accelerator-type v5p-128 --runtime-version v2-alpha-tpuv5 --zone ZONE
# (queued resources name the nodes ${TPU_PREFIX}-0, -1, ...). Every slice runs the command through
# launch/tpu_pod.sh with the Megascale variables libtpu uses to join the slices:
#   MEGASCALE_COORDINATOR_ADDRESS=<worker 0 of slice 0>:MEGASCALE_PORT, MEGASCALE_NUM_SLICES, MEGASCALE_SLICE_ID,
#   MEGASCALE_PORT (default 8080).
# The config's mesh must span the slices: config.mesh.dcn_data (or dcn_fsdp) = NUM_SLICES (see launch/README.md).
# Logs: LOG_DIR/RUN_ID/slice-<j>/worker-<n>.log. Environment as tpu_pod.sh (ZONE, PROJECT, REMOTE_DIR, RUN_ID,
# NUM_WORKERS, EXTRA_ENV, DRY_RUN=1), plus COORDINATOR_IP to skip asking gcloud for slice 0's first worker.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
usage() { sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; }

: "${MEGASCALE_PORT:=8080}"
: "${RUN_ID:=$(date +%Y%m%d-%H%M%S)}"
export RUN_ID

require_env() {
  local v
  for v in "$@"; do
    if [[ -z "${!v:-}" ]]; then echo "tpu_multislice.sh: set $v" >&2; exit 2; fi
  done
}

coordinator_ip() {
  if [[ -n "${COORDINATOR_IP:-}" ]]; then echo "$COORDINATOR_IP"; return; fi
  if [[ "${DRY_RUN:-0}" == "1" ]]; then echo "COORDINATOR_IP"; return; fi
  gcloud compute tpus tpu-vm describe "${TPU_PREFIX}-0" --zone "$ZONE" ${PROJECT:+--project "$PROJECT"} \
    --format='value(networkEndpoints[0].ipAddress)'
}

main() {
  local action=${1:-}
  [[ $# -gt 0 ]] && shift
  case "$action" in
    setup)
      require_env TPU_PREFIX NUM_SLICES ZONE
      local j
      for ((j = 0; j < NUM_SLICES; j++)); do TPU_NAME="${TPU_PREFIX}-$j" "$here/tpu_pod.sh" setup; done
      ;;
    run)
      require_env TPU_PREFIX NUM_SLICES ZONE
      [[ "${1:-}" == "--" ]] && shift
      if [[ $# -eq 0 ]]; then echo "tpu_multislice.sh run: give the command after --" >&2; exit 2; fi
      local coord j status=0 pids=()
      coord=$(coordinator_ip)
      echo "tpu_multislice.sh: run $RUN_ID on ${NUM_SLICES} slices ${TPU_PREFIX}-*, coordinator $coord" >&2
      for ((j = 0; j < NUM_SLICES; j++)); do
        local megascale="MEGASCALE_COORDINATOR_ADDRESS=${coord}:${MEGASCALE_PORT} MEGASCALE_NUM_SLICES=${NUM_SLICES}"
        megascale+=" MEGASCALE_SLICE_ID=$j MEGASCALE_PORT=${MEGASCALE_PORT}"
        TPU_NAME="${TPU_PREFIX}-$j" LOG_DIR="${LOG_DIR:-logs/$TPU_PREFIX}/slice-$j" \
          EXTRA_ENV="${megascale}${EXTRA_ENV:+ $EXTRA_ENV}" "$here/tpu_pod.sh" run -- "$@" &
        pids+=($!)
      done
      for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
      return "$status"
      ;;
    -h|--help|help|"") usage ;;
    *) echo "tpu_multislice.sh: unknown action '$action' (setup | run -- CMD...)" >&2; exit 2 ;;
  esac
}

main "$@"
