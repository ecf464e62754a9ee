"""Shared argument handling for stage entry points (``--config FILE`` plus ``key=value`` overrides)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from discl_ray.config import ConfigError, ExperimentConfig, load_config
from discl_ray.errors import DisclError, ServiceLost
from discl_ray.runtime import logs
from discl_ray.runtime.context import StageContext

DEFAULT_CONFIG = "configs/toy/digits_lt.yaml"


def stage_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """An argparse parser with the options every stage shares."""
    p = argparse.ArgumentParser(prog=f"discl {prog}", description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", "-c", default=None,
                   help=f"experiment YAML (default: the toy world, {DEFAULT_CONFIG})")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides, e.g. training.epochs=3 generation.seeds=[0,1]")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def resolve_config(args: argparse.Namespace) -> ExperimentConfig:
    """Load the config named by ``args`` (or the packaged toy default)."""
    path = args.config
    if path is None:
        from pathlib import Path

        here = Path(DEFAULT_CONFIG)
        if not here.is_file():
            here = Path(__file__).resolve().parents[2] / DEFAULT_CONFIG
        path = str(here)
    return load_config(path, args.overrides)


def run_stage(argv: list[str] | None, prog: str, description: str,
              body: Callable[[StageContext, argparse.Namespace], int],
              extra_args: Callable[[argparse.ArgumentParser], None] | None = None) -> int:
    """Parse args, load + validate config (fails before any cluster work), open the stage's context (the run's
    locations, Ray address and MLflow URI, resolved once here) and run ``body(ctx, args)``."""
    parser = stage_parser(prog, description)
    if extra_args:
        extra_args(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = resolve_config(args)
    except ConfigError as err:
        print(f"discl {prog}: {err}", file=sys.stderr)
        return err.exit_code
    logs.setup(args.verbose, cfg.run_root)
    try:
        ctx = StageContext.open(cfg, prog)
        return int(body(ctx, args) or 0)
    except ServiceLost as err:
        # The server answered the preflight but went away during the run: the stage's outputs are written
        # (parquet, checkpoints); rerunning resumes them and only logs again.
        print(f"discl {prog}: {err}; the outputs written so far are kept: rerun once the server is back",
              file=sys.stderr)
        return err.exit_code
    except DisclError as err:
        # A user error (exit 2: bad config, missing input, busy stage). Only the project's own errors are one
        # line: anything else (a bug inside numpy or pyarrow) keeps its traceback.
        print(f"discl {prog}: {err}", file=sys.stderr)
        return err.exit_code


def preflight(ctx: StageContext, prog: str | None = None) -> None:
    """The stage's driver-side input checks (``discl_ray.cli.preflight``), notes printed; call before cluster work.

    A failed check raises ``PreflightError`` (a ``UserError``), which ``run_stage`` turns into one line and exit
    status 2."""
    from discl_ray.cli.preflight import check

    prog = prog or ctx.stage
    for note in check(ctx, prog):
        print(f"discl {prog}: note: {note}", file=sys.stderr)
