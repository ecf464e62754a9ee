"""`discl pipeline STAGE [STAGE ...] [--config FILE] [key=value ...]`: run stages in order in one process.

Every stage gets the same --config and overrides. The first stage that exits non-zero (or raises) stops the
pipeline with a line naming it and its exit code; the stages after it do not run.

Why one command: a RayJob's entrypoint is pasted unquoted into `ray job submit -- <entrypoint>` by KubeRay,
so `mine && prompts` would run `prompts` in the submitter pod, not on the cluster. `discl pipeline mine
prompts ...` is one command with no shell syntax, and the stages share one Ray connection and one driver.
"""

from __future__ import annotations

import importlib
import sys
import time

# Stages of the data path. Not: pipeline itself, submit (it targets another cluster), ui (serves forever),
# quickstart and bench (their own drivers).
STAGES = ("world", "mine", "prompts", "generate", "score", "train", "sweep", "report")

USAGE = "usage: discl pipeline STAGE [STAGE ...] [--config FILE] [-v] [key=value ...]"


def split_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """Split argv into stage names and the arguments every stage receives (--config, -v, key=value)."""
    stages: list[str] = []
    shared: list[str] = []
    it = iter(argv)
    for arg in it:
        if arg in ("--config", "-c"):
            value = next(it, None)
            if value is None:
                raise ValueError(f"{arg} needs a file")
            shared += [arg, value]
        elif arg.startswith("--config=") or arg in ("-v", "--verbose"):
            shared.append(arg)
        elif arg.startswith("-"):
            raise ValueError(f"unknown option {arg!r}")
        elif "=" in arg:
            shared.append(arg)
        else:
            stages.append(arg)
    return stages, shared


def _validate(stages: list[str], shared: list[str]) -> None:
    """Reject bad stage names and a bad config before the first stage starts (no cluster work yet)."""
    if not stages:
        raise ValueError("name at least one stage")
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage {unknown[0]!r}; choose from: {', '.join(STAGES)}")
    from discl_ray.cli_common import resolve_config, stage_parser

    resolve_config(stage_parser("pipeline", "").parse_args(shared))


def run(stages: list[str], shared: list[str]) -> int:
    """Run ``stages`` in order with ``shared`` arguments; return 0 or the failed stage's exit code."""
    from discl_ray.cli import COMMANDS

    start = time.monotonic()
    for i, name in enumerate(stages, 1):
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
    from discl_ray.config import ConfigError

    try:
        stages, shared = split_args(argv)
        _validate(stages, shared)
    except (ValueError, ConfigError) as err:
        print(f"discl pipeline: {err}\n{USAGE}", file=sys.stderr)
        return 2
    return run(stages, shared)
