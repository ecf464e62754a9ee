"""`discl sweep --config FILE [overrides]`: a Ray Tune sweep over ``sweep.space``, each trial a Train run.

Example (2 strategies × 2 seeds on the toy world)::

    discl sweep --config configs/toy/digits_lt.yaml \\
        'sweep.space={training.strategy: {grid: [none, diverse_to_specific]}, training.seed: {grid: [0, 1]}}'
"""

from __future__ import annotations

import argparse
import sys

from discl_ray.cli.stage import preflight, run_stage
from discl_ray.config import ConfigError
from discl_ray.runtime.context import StageContext


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name", default=None,
                   help="sweep name (default sweep.name or sweep-<UTC time>); an existing sweep of that name resumes")


def _body(ctx: StageContext, args: argparse.Namespace) -> int:
    from discl_ray.runtime.tracking import TrackingUnavailable
    from discl_ray.sweep.tune import grid_size, run_sweep

    cfg = ctx.cfg
    if not cfg.sweep.space:
        print("discl sweep: sweep.space is empty; give it in the config or as an override, e.g. "
              "'sweep.space={training.seed: {grid: [0, 1, 2]}}'", file=sys.stderr)
        return 2
    preflight(ctx)
    print(f"discl sweep: {grid_size(cfg.sweep.space, cfg.sweep.num_samples)} trials over "
          f"{', '.join(cfg.sweep.space)}", flush=True)
    try:
        res = run_sweep(ctx, name=args.name)
    except (TrackingUnavailable, ConfigError) as err:
        print(f"discl sweep: {err}", file=sys.stderr)
        return 2
    print(f"sweep {res.name}: {res.num_trials} trials, {res.num_errors} failed; results in {res.path}")
    if res.parent_run_id:
        print(f"MLflow parent run {res.parent_run_id} (see 'discl ui', 'discl report --parent {res.parent_run_id}')")
    if res.best_params is not None:
        print(f"best {res.best_metric}: {res.best_params}")
    for err in res.results.errors:
        print(f"trial error: {str(err).splitlines()[0] if str(err) else type(err).__name__}", file=sys.stderr)
    return 1 if res.num_errors else 0


def main(argv: list[str] | None = None) -> int:
    return run_stage(argv, "sweep", "Ray Tune sweep over curricula, thresholds, λ sets, losses and seeds; "
                                    "one MLflow child run per trial under a parent sweep run.", _body, _args)
