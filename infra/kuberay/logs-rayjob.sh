#!/usr/bin/env bash
# Follow a RayJob's driver log from the moment it exists:
#
#   infra/kuberay/logs-rayjob.sh NAME [NAMESPACE] [TIMEOUT_SECONDS]
#
# KubeRay (K8sJobMode) creates the submitter Job, named like the RayJob, only once the job's Ray cluster is
# ready, and its pod runs `ray job logs --follow`. Right after `kubectl apply`, `kubectl logs -f job/NAME`
# therefore prints `Error from server (NotFound)`, and while the pod starts, "container ... is waiting to
# start". This waits for both (up to TIMEOUT_SECONDS, default 30 min), then follows the log; it stops
# early, exit 1, if the RayJob fails before submitting. Exit 124 on timeout, 2 on bad usage; otherwise the
# exit code of `kubectl logs -f`. Waiting for the job's result is wait-rayjob.sh's work, not this script's.
set -uo pipefail

name=${1:-}
ns=${2:-discl}
timeout_s=${3:-1800}
interval=${WAIT_INTERVAL:-5}
if [[ -z "$name" || ! "$timeout_s" =~ ^[0-9]+$ ]]; then
  echo "usage: logs-rayjob.sh NAME [NAMESPACE] [TIMEOUT_SECONDS]" >&2
  exit 2
fi

deadline=$(( $(date +%s) + timeout_s ))
said=""
say() {
  if [[ "$1" != "$said" ]]; then
    echo "logs-rayjob: $1" >&2
    said=$1
  fi
}
until kubectl -n "$ns" logs "job/$name" --tail=1 >/dev/null 2>&1; do
  if kubectl -n "$ns" get job "$name" -o name >/dev/null 2>&1; then
    say "job/$name exists; waiting for its pod to start"
  else
    deploy=$(kubectl -n "$ns" get rayjob "$name" -o 'jsonpath={.status.jobDeploymentStatus}' 2>/dev/null)
    case "$deploy" in
      Failed|ValidationFailed)
        echo "logs-rayjob: rayjob/$name is $deploy before submitting its job:" \
          "kubectl -n $ns describe rayjob $name" >&2
        exit 1
        ;;
    esac
    say "waiting for rayjob/$name's cluster (deployment ${deploy:-New}); KubeRay creates job/$name when it is ready"
  fi
  if (( $(date +%s) >= deadline )); then
    echo "logs-rayjob: no log of job/$name after ${timeout_s} s: kubectl -n $ns describe rayjob $name" >&2
    exit 124
  fi
  sleep "$interval"
done
exec kubectl -n "$ns" logs -f "job/$name"
