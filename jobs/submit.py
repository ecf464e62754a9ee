"""`discl submit STAGE --address URL [--config FILE] [key=value ...]`: run a stage as a Ray job and follow it.

Prints the submission id, streams the job's logs, and exits 0 only when the job SUCCEEDED. Ctrl-C stops
following, not the job (``ray job stop ID`` does that).
"""

from __future__ import annotations

import argparse
import os
import sys

from discl_ray.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="discl submit", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", help="stage to run (e.g. generate, score, train, sweep, report)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS"),
                   help="Ray dashboard address, e.g. http://127.0.0.1:8265 (default: $RAY_ADDRESS)")
    p.add_argument("--config", "-c", default=None, help="experiment YAML (default: the toy world)")
    p.add_argument("--working-dir", default=".", help="tree uploaded as the job's working dir (default: .)")
    p.add_argument("--submission-id", default=None, help="job id (default: Ray picks one)")
    p.add_argument("--num-cpus", type=float, default=None, help="CPUs reserved for the entry point")
    p.add_argument("--num-gpus", type=float, default=None, help="GPUs reserved for the entry point")
    p.add_argument("--no-wait", action="store_true", help="print the id and return without following")
    p.add_argument("--no-auth", action="store_true", help="cluster runs without token auth (not recommended)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    if not args.address:
        print("discl submit: --address (or RAY_ADDRESS) is required, e.g. http://127.0.0.1:8265", file=sys.stderr)
        return 2
    if args.no_auth:
        os.environ["RAY_AUTH_MODE"] = "disabled"
    from discl_ray.cli.submit import follow, submit_stage

    # `discl submit pipeline mine prompts generate key=value`: bare words are the pipeline's stages.
    stage_args = [o for o in args.overrides if "=" not in o]
    overrides = [o for o in args.overrides if "=" in o]
    try:
        job_id = submit_stage(args.stage, args.address, config=args.config, overrides=overrides,
                              stage_args=stage_args, working_dir=args.working_dir, submission_id=args.submission_id,
                              num_cpus=args.num_cpus, num_gpus=args.num_gpus)
    except UserError as err:
        print(f"discl submit: {err}", file=sys.stderr)
        return 2
    except ConnectionError as err:
        print(f"discl submit: cannot reach the Ray job server at {args.address}: {err}", file=sys.stderr)
        return 2
    print(f"submitted {args.stage} as job {job_id} to {args.address}", flush=True)
    if args.no_wait:
        return 0
    try:
        status = follow(job_id, args.address)
    except KeyboardInterrupt:
        print(f"\nstopped following; job {job_id} keeps running (ray job stop {job_id})", file=sys.stderr)
        return 130
    print(f"job {job_id}: {status}", flush=True)
    return 0 if status == "SUCCEEDED" else 1
