"""`discl pipeline STAGE [STAGE ...] [--config FILE] [key=value ...]`: run stages in order in one process.

Every stage gets the same --config and overrides. The first stage that exits non-zero (or raises) stops the
pipeline with a line naming it and its exit code; the stages after it do not run.

Upstream experiments: a config whose stages read another experiment's trained model (``training.init_from``,
``mining.classifier: trained_run``) has that experiment in its pipeline. Before the first stage that needs it,
the pipeline looks for its finished run (run folder, then MLflow) and, when there is none, trains it with the
config file beside this one that defines it (``baseline_*.yaml``), with the same storage/cluster/tracking
overrides; ``--no-upstream`` only checks and stops with the command to run.

Why one command: a RayJob's entrypoint is pasted unquoted into `ray job submit -- <entrypoint>` by KubeRay,
so `mine && prompts` would run `prompts` in the submitter pod, not on the cluster. `discl pipeline mine
prompts ...` is one command with no shell syntax, and the stages share one Ray connection and one driver.
"""

from __future__ import annotations

import importlib
import sys
import time
from pathlib import Path

from discl_ray.errors import UserError

# Stages of the data path. Not: pipeline itself, submit (it targets another cluster), ui (serves forever),
# quickstart and bench (their own drivers).
STAGES = ("world", "mine", "prompts", "generate", "score", "train", "sweep", "report")

USAGE = "usage: discl pipeline STAGE [STAGE ...] [--config FILE] [--no-upstream] [-v] [key=value ...]"


def split_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """Split argv into stage names and the arguments every stage receives (--config, -v, key=value)."""
    stages: list[str] = []
    shared: list[str] = []
    it = iter(argv)
    for arg in it:
        if arg in ("--config", "-c"):
            value = next(it, None)
            if value is None:
                raise UserError(f"{arg} needs a file")
            shared += [arg, value]
        elif arg.startswith("--config=") or arg in ("-v", "--verbose", "--no-upstream"):
            shared.append(arg)
        elif arg.startswith("-"):
            raise UserError(f"unknown option {arg!r}")
        elif "=" in arg:
            shared.append(arg)
        else:
            stages.append(arg)
    return stages, shared


def _validate(stages: list[str], shared: list[str]):
    """Reject bad stage names and a bad config before the first stage starts (no cluster work yet); returns
    ``(cfg, args)``."""
    if not stages:
        raise UserError("name at least one stage")
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise UserError(f"unknown stage {unknown[0]!r}; choose from: {', '.join(STAGES)}")
    from discl_ray.cli.stage import resolve_config, stage_parser

    args = stage_parser("pipeline", "").parse_args([a for a in shared if a != "--no-upstream"])
    return resolve_config(args), args


def ensure_upstream(name: str, cfg, args, train: bool = True) -> int:
    """Before stage ``name``: find (or, with ``train``, train) every upstream experiment it reads. 0 = ready."""
    from discl_ray.experiment.upstream import is_trained, upstream_of, upstream_overrides

    for up in upstream_of(cfg, args.config):
        if name not in up.stages or is_trained(cfg, up.experiment):
            continue
        if up.config is None:
            print(f"discl pipeline: {up.setting}={up.experiment}: no finished run, and no config in "
                  f"{Path(args.config or '.').parent} defines experiment {up.name!r}; train it first "
                  f"(discl train --config <its config> experiment={up.name})", file=sys.stderr, flush=True)
            return 2
        argv = ["--config", str(up.config), *upstream_overrides(list(args.overrides))]
        if not train:
            print(f"discl pipeline: {up.setting}={up.experiment} has no finished run; train it first: "
                  f"discl train {' '.join(argv)}", file=sys.stderr, flush=True)
            return 2
        print(f"discl pipeline: {name} reads {up.setting}={up.experiment}, which has no finished run: "
              f"training it ({up.config.name})", flush=True)
        from jobs.train import main as train_main

        t0 = time.monotonic()
        rc = int(train_main(argv) or 0)
        if rc != 0:
            print(f"discl pipeline: upstream {up.name} ({up.config.name}) failed with code {rc}",
                  file=sys.stderr, flush=True)
            return rc
        print(f"discl pipeline: upstream {up.name} done in {time.monotonic() - t0:.1f} s", flush=True)
    return 0


def run(stages: list[str], shared: list[str], cfg=None, args=None) -> int:
    """Run ``stages`` in order with ``shared`` arguments; return 0 or the failed stage's exit code."""
    from discl_ray.cli import COMMANDS

    start = time.monotonic()
    train_upstream = "--no-upstream" not in shared
    shared = [a for a in shared if a != "--no-upstream"]
    for i, name in enumerate(stages, 1):
        if cfg is not None:
            rc = ensure_upstream(name, cfg, args, train=train_upstream)
            if rc != 0:
                _failed(stages, i, f"could not start: its upstream experiment is missing (code {rc})")
                return rc
        print(f"discl pipeline: [{i}/{len(stages)}] {name}", flush=True)
        t0 = time.monotonic()
        module = importlib.import_module(COMMANDS[name][0])
        try:
            rc = module.main(list(shared))
        except SystemExit as stop:  # argparse inside a stage exits; keep its code
            rc = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        except BaseException:
            _failed(stages, i, "raised an exception (traceback below)")
            raise
        rc = int(rc or 0)
        if rc != 0:
            _failed(stages, i, f"exited with code {rc}")
            return rc
        print(f"discl pipeline: [{i}/{len(stages)}] {name} done in {time.monotonic() - t0:.1f} s", flush=True)
    print(f"discl pipeline: {len(stages)} stage(s) done in {time.monotonic() - start:.1f} s: "
          f"{' '.join(stages)}", flush=True)
    return 0


def _failed(stages: list[str], i: int, what: str) -> None:
    rest = " ".join(stages[i:]) or "none"
    print(f"discl pipeline: stage {stages[i - 1]!r} ({i}/{len(stages)}) {what}; not run: {rest}",
          file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(f"{USAGE}\n\n{__doc__}\nstages: {', '.join(STAGES)}")
        return 0

    try:
        stages, shared = split_args(argv)
        cfg, args = _validate(stages, shared)
    except UserError as err:
        print(f"discl pipeline: {err}\n{USAGE}", file=sys.stderr)
        return 2
    return run(stages, shared, cfg, args)
