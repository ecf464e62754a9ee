#!/usr/bin/env bash
# Wait until a RayJob has finished. Prints each status change. Exit codes:
#   0   its Ray job SUCCEEDED
#   1   it failed or was stopped (the job's driver log: kubectl -n NAMESPACE logs job/NAME)
#   2   bad usage
#   3   kubectl kept failing (WAIT_KUBECTL_RETRIES times in a row): the job's state is unknown, it may
#       still be running; check the cluster connection and rerun this script
#   124 still running after TIMEOUT_SECONDS
#
#   infra/kuberay/wait-rayjob.sh NAME [NAMESPACE] [TIMEOUT_SECONDS]
#
# `kubectl wait --for=jsonpath=...=SUCCEEDED` alone would hang until its timeout when the job fails, so this
# waits for a terminal jobDeploymentStatus (Complete / Failed / ValidationFailed) and then reads jobStatus.
# One failed kubectl call (an API server restart, an expired token being refreshed, a network blip during
# a 48 h wait) is retried, not taken for a failed job.
set -uo pipefail

name=${1:-}
ns=${2:-discl}
timeout_s=${3:-172800}
interval=${WAIT_INTERVAL:-30}
max_errors=${WAIT_KUBECTL_RETRIES:-10}
if [[ -z "$name" || ! "$timeout_s" =~ ^[0-9]+$ || ! "$max_errors" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: wait-rayjob.sh NAME [NAMESPACE] [TIMEOUT_SECONDS]" >&2
  exit 2
fi

errfile=$(mktemp)
trap 'rm -f "$errfile"' EXIT
deadline=$(( $(date +%s) + timeout_s ))
last=""
hinted=""
errors=0
deploy=""
while :; do
  if status=$(kubectl -n "$ns" get rayjob "$name" \
      -o 'jsonpath={.status.jobDeploymentStatus}/{.status.jobStatus}/{.status.reason}' 2>"$errfile"); then
    errors=0
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
  else
    errors=$(( errors + 1 ))
    echo "rayjob/$name: kubectl failed ($errors/$max_errors in a row, retrying): $(head -c 300 "$errfile")" >&2
    if (( errors >= max_errors )); then
      echo "rayjob/$name: giving up after $errors failed kubectl calls; the job's state is unknown" \
        "(it may still be running): kubectl -n $ns get rayjob $name" >&2
      exit 3
    fi
  fi
  if (( $(date +%s) >= deadline )); then
    echo "rayjob/$name: still ${deploy:-New} after ${timeout_s} s" >&2
    exit 124
  fi
  sleep "$interval"
done
