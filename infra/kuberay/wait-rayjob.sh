#!/usr/bin/env bash
# Wait until a RayJob has finished; exit 0 only when its Ray job SUCCEEDED, 1 when it failed or stopped,
# 2 on bad usage, 124 on timeout. Prints each status change.
#
#   infra/kuberay/wait-rayjob.sh NAME [NAMESPACE] [TIMEOUT_SECONDS]
#
# `kubectl wait --for=jsonpath=...=SUCCEEDED` alone would hang until its timeout when the job fails, so this
# waits for a terminal jobDeploymentStatus (Complete / Failed / ValidationFailed) and then reads jobStatus.
set -euo pipefail

name=${1:-}
ns=${2:-discl}
timeout_s=${3:-172800}
interval=${WAIT_INTERVAL:-30}
if [[ -z "$name" || ! "$timeout_s" =~ ^[0-9]+$ ]]; then
  echo "usage: wait-rayjob.sh NAME [NAMESPACE] [TIMEOUT_SECONDS]" >&2
  exit 2
fi

deadline=$(( $(date +%s) + timeout_s ))
last=""
hinted=""
while :; do
  status=$(kubectl -n "$ns" get rayjob "$name" \
    -o 'jsonpath={.status.jobDeploymentStatus}/{.status.jobStatus}/{.status.reason}')
  deploy=${status%%/*}
  rest=${status#*/}
  job=${rest%%/*}
  reason=${rest#*/}
  if [[ "$status" != "$last" ]]; then
    echo "rayjob/$name: deployment=${deploy:-New} job=${job:-NEW}${reason:+ reason=$reason}"
    last=$status
  fi
  case "$deploy" in
    Complete|Failed|ValidationFailed)
      if [[ "$job" == "SUCCEEDED" ]]; then
        exit 0
      fi
      echo "rayjob/$name did not succeed (job status ${job:-none}); its driver log:" \
        "kubectl -n $ns logs job/$name" >&2
      exit 1
      ;;
    Suspended)  # keep waiting: it may have just been resumed
      if [[ "$status" != "$hinted" ]]; then
        echo "rayjob/$name is suspended; start it with:" \
          "kubectl -n $ns patch rayjob $name --type merge -p '{\"spec\":{\"suspend\":false}}'" >&2
        hinted=$status
      fi
      ;;
  esac
  if (( $(date +%s) >= deadline )); then
    echo "rayjob/$name: still ${deploy:-New} after ${timeout_s} s" >&2
    exit 124
  fi
  sleep "$interval"
done
