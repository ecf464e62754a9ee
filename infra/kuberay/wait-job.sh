#!/usr/bin/env bash
# Wait until a Kubernetes Job (e.g. the dataset download) has finished. Exit codes:
#   0   Complete
#   1   Failed (its last log lines are printed)
#   2   bad usage
#   3   kubectl kept failing (WAIT_KUBECTL_RETRIES times in a row): state unknown
#   124 neither after TIMEOUT_SECONDS (default 5 h: the dataset Job's own deadline is 4 h)
#
#   infra/kuberay/wait-job.sh NAME [NAMESPACE] [TIMEOUT_SECONDS]
#
# `kubectl wait --for=condition=complete` never returns early for a failed Job: it waits out its whole
# --timeout. This returns on either condition.
set -uo pipefail

name=${1:-}
ns=${2:-discl}
timeout_s=${3:-18000}
interval=${WAIT_INTERVAL:-15}
max_errors=${WAIT_KUBECTL_RETRIES:-10}
if [[ -z "$name" || ! "$timeout_s" =~ ^[0-9]+$ || ! "$max_errors" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: wait-job.sh NAME [NAMESPACE] [TIMEOUT_SECONDS]" >&2
  exit 2
fi

errfile=$(mktemp)
trap 'rm -f "$errfile"' EXIT
deadline=$(( $(date +%s) + timeout_s ))
errors=0
last=""
while :; do
  if conditions=$(kubectl -n "$ns" get job "$name" \
      -o 'jsonpath={range .status.conditions[?(@.status=="True")]}{.type}{" "}{end}' 2>"$errfile"); then
    errors=0
    if [[ "$conditions" != "$last" ]]; then
      echo "job/$name: ${conditions:-running}"
      last=$conditions
    fi
    case " $conditions " in
      *" Complete "*)
        exit 0
        ;;
      *" Failed "*)
        echo "job/$name failed; its last log lines (kubectl -n $ns logs job/$name):" >&2
        kubectl -n "$ns" logs "job/$name" --tail=20 >&2 || true
        exit 1
        ;;
    esac
  else
    errors=$(( errors + 1 ))
    echo "job/$name: kubectl failed ($errors/$max_errors in a row, retrying): $(head -c 300 "$errfile")" >&2
    if (( errors >= max_errors )); then
      echo "job/$name: giving up after $errors failed kubectl calls: kubectl -n $ns get job $name" >&2
      exit 3
    fi
  fi
  if (( $(date +%s) >= deadline )); then
    echo "job/$name: not finished after ${timeout_s} s" >&2
    exit 124
  fi
  sleep "$interval"
done
