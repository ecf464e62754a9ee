"""`discl train`: curriculum training on Ray Train V2 with a λ selector actor (paper Algorithms 1 and 2).

    discl train --config configs/toy/digits_lt.yaml training.strategy=diverse_to_specific training.epochs=10

Reads the experiment's canonical rows, hard samples and scored spectrum from parquet, applies the trainer's
own CLIP threshold and λ set, trains, selects the checkpoint on validation and prints the test metrics.
Rerunning with the same ``--run-name`` (default: derived from the config) resumes an interrupted run.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from discl_ray.cli.stage import preflight, run_stage
from discl_ray.errors import DisclError


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-name", default=None, help="Ray Train run name (default: from strategy, seed, config hash)")
    p.add_argument("--storage-path", default=None, help="checkpoint storage (default: runs/<experiment>/train)")
    p.add_argument("--parent-run-id", default=None, help="nest the MLflow run under this parent run")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the final metrics (or the --plan) as JSON")
    p.add_argument("--plan", action="store_true", help="print each epoch's λ and row counts; train nothing")


def _body(ctx, args) -> int:
    from discl_ray.cli.preflight import tracking_lost
    from discl_ray.training import fit
    from discl_ray.training.trainer import check_run_name

    if args.plan:
        from discl_ray.training.plan import run_plan

        return run_plan(ctx.cfg, args.json)

    try:
        if args.run_name:
            check_run_name(args.run_name)
        preflight(ctx)  # missing inputs, an empty filtered spectrum, MLflow down: before any Ray work
        metrics = fit(ctx, run_name=args.run_name, storage_path=args.storage_path,
                      mlflow_parent_run_id=args.parent_run_id)
    except DisclError:
        raise  # run_stage prints it as one line
    except Exception as err:  # noqa: BLE001 — a worker's error arrives wrapped by Ray Train
        # The MLflow server going away mid-run fails the workers after MLflow's own retries; say that in one
        # line (the checkpoints are kept: the same command resumes) instead of Ray's nested traceback.
        lost = tracking_lost(ctx)
        if lost is None:
            raise
        print(f"discl train: the run failed ({type(err).__name__}) because the {lost}; its checkpoints are kept: "
              "rerun the same command once the server is back to resume", file=sys.stderr)
        return 1
    width = max(len(k) for k in metrics) if metrics else 0
    for key, val in metrics.items():
        shown = f"{val:.4f}" if isinstance(val, float) and math.isfinite(val) else val
        print(f"{key:<{width}}  {shown}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(metrics, fh, indent=1, default=str)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_stage(argv, "train", __doc__.splitlines()[0], _body, _args)
