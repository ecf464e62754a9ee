"""`discl rehearse --config FILE [--classes N] [--per-class N] [--plan] [key=value ...]`: the config's whole
pipeline in miniature (upstream experiments included) on the cluster, storage and MLflow it names.

One line per stage (what ran, on which nodes, GPUs held, objects written, MLflow runs) and
``<run_root>/<experiment>_rehearsal/rehearsal.json``; exit 0 only when every stage passed, 2 for a bad config
(before any cluster work). ``discl submit rehearse --config FILE …`` runs it as a Ray job.
"""

from __future__ import annotations

import logging
import sys

from discl_ray.errors import UserError


def main(argv: list[str] | None = None) -> int:
    from discl_ray.experiment import rehearse

    argv = list(sys.argv[1:] if argv is None else argv)
    config, overrides, classes, per_class, plan_only = rehearse.main_args(argv)
    verbose = "-v" in argv or "--verbose" in argv
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        steps = rehearse.plan(config, overrides, classes, per_class)
    except UserError as err:
        print(f"discl rehearse: {err}", file=sys.stderr)
        return 2
    if plan_only:
        print(rehearse.describe(steps))
        return 0
    return rehearse.run(config, overrides, classes, per_class)
