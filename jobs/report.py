"""`discl report --experiment NAME [--out DIR]`: paper-style tables and plots from MLflow runs."""

from __future__ import annotations

import argparse
import sys

from discl_ray.cli.stage import run_stage
from discl_ray.runtime.context import StageContext


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--experiment", "-e", default=None,
                   help="MLflow experiment to report (default: tracking.experiment_name or experiment)")
    p.add_argument("--out", default=None, help="output folder (default: <run_root>/<experiment>/report)")
    p.add_argument("--parent", default=None, help="only the child runs of this sweep (parent run id)")
    p.add_argument("--no-log", action="store_true", help="do not log the report as an MLflow run")


def _body(ctx: StageContext, args: argparse.Namespace) -> int:
    from discl_ray.report.tables import write_report
    from discl_ray.runtime.tracking import TrackingUnavailable, check_reachable

    cfg = ctx.cfg
    uri = ctx.tracking_uri
    try:
        check_reachable(uri)
    except TrackingUnavailable as err:
        print(f"discl report: {err}", file=sys.stderr)
        return 2
    experiment = args.experiment or cfg.tracking.experiment_name or cfg.experiment
    out = args.out or ctx.paths.root / experiment / "report"   # a folder or an s3:// URI
    result = write_report(uri, experiment, out, parent_run_id=args.parent, log_to_mlflow=not args.no_log)
    print(result["markdown"])
    print(f"wrote {len(result['files'])} files to {out}"
          + (f"; MLflow report run {result['run_id']}" if result["run_id"] else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_stage(argv, "report", "Paper-style tables (mean ± std over seeds) and plots from MLflow runs.",
                     _body, _args)
