"""`discl quickstart`: the whole DisCL method on the built-in toy world.

world (when not cached) → digits-LT: prompts → mine → generate → score → train CE baseline and DisCL
diverse→specific → digits-LQ: prompts → mine → generate → score → train the FLYP fine-tuning baseline and DisCL
adaptive → report. Every step is the same stage command a user runs by hand (see the printed commands).
The two trainings of a task run at the same time (each Ray Train run holds one CPU; ``--sequential`` runs
them one after the other).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Overrides of the smoke profile: the same path through every stage in well under a minute of compute.
SMOKE = {
    "generation": ["generation.seeds=[0,1]", "generation.steps=10"],
    "training": ["training.epochs=2", "training.curriculum_epochs=1", "training.steps_per_epoch=4",
                 "training.random_real_size=32", "training.guidance_val_size=8", "training.probe_steps=2",
                 # smoke-trained toy models score at random: keep every synthetic row
                 "training.threshold=-1.0"],
}


def _config(name: str) -> str:
    local = Path("configs/toy") / name
    return str(local if local.is_file() else ROOT / "configs" / "toy" / name)


def _run_stage(command: str, argv: list[str]) -> tuple[int, float]:
    import importlib

    from discl_ray.cli import COMMANDS

    start = time.perf_counter()
    rc = int(importlib.import_module(COMMANDS[command][0]).main(argv) or 0)
    return rc, time.perf_counter() - start


def _check(title: str, rc: int, tolerate: tuple[int, ...]) -> None:
    if rc in tolerate and rc:
        print(f"WARNING: '{title}' exited {rc}; continuing (see its report above)", flush=True)
    elif rc != 0:
        raise SystemExit(f"discl quickstart: step '{title}' failed with exit code {rc}")


def _step(title: str, command: str, argv: list[str], log: list, tolerate: tuple[int, ...] = ()) -> None:
    print(f"\n=== {title}\n$ discl {command} {shlex.join(argv)}", flush=True)
    rc, took = _run_stage(command, argv)
    log.append((title, round(took, 1), rc))
    _check(title, rc, tolerate)


def _steps_together(steps: list[tuple[str, str, list[str]]], log: list) -> None:
    """Run independent stage commands at once on the shared Ray cluster (threads of this driver)."""
    for title, command, argv in steps:
        print(f"\n=== {title} (concurrently)\n$ discl {command} {shlex.join(argv)}", flush=True)
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=len(steps)) as pool:
        results = list(pool.map(lambda step: _run_stage(*step[1:]), steps))
    for (title, _, _), (rc, took) in zip(steps, results):
        log.append((title, round(took, 1), rc))
    log.append(("  (both, wall clock)", round(time.perf_counter() - start, 1), 0))
    for (title, _, _), (rc, _) in zip(steps, results):
        _check(title, rc, ())


def run(profile: str, run_root: str, extra: list[str], sequential: bool = False) -> int:
    log: list = []
    t0 = time.perf_counter()
    common = [f"run_root={run_root}"] + extra
    gen = SMOKE["generation"] if profile == "smoke" else []
    trn = SMOKE["training"] if profile == "smoke" else []
    world_args = ["--config", _config("base.yaml"), *common] + (["--budget-s", "20", "--no-gates"] if profile == "smoke" else [])
    # Exit 1 = a quality gate missed: the models exist and the method still runs, so say so and go on.
    _step("toy world models (cached after the first run)", "world", world_args, log, tolerate=(1,))
    for cfg_name, task, arms in (
        ("digits_lt.yaml", "digits-LT", [("CE baseline", ["training.strategy=none"]),
                                         ("DisCL diverse→specific", ["training.strategy=diverse_to_specific"])]),
        ("digits_lq.yaml", "digits-LQ", [("FLYP fine-tuning baseline", ["training.strategy=none"]),
                                         ("DisCL adaptive", ["training.strategy=adaptive"])]),
    ):
        base = ["--config", _config(cfg_name), *common]
        _step(f"{task}: prompts", "prompts", base, log)
        _step(f"{task}: hard samples", "mine", base, log)
        _step(f"{task}: spectrum", "generate", base + gen, log)
        _step(f"{task}: CLIP filter", "score", base, log)
        trainings = [(f"{task}: train {arm}", "train", base + trn + over) for arm, over in arms]
        if sequential:
            for title, command, argv in trainings:
                _step(title, command, argv, log)
        else:
            _steps_together(trainings, log)
    for cfg_name in ("digits_lt.yaml", "digits_lq.yaml"):
        _step(f"report {cfg_name[:-5]}", "report", ["--config", _config(cfg_name), *common], log)
    total = time.perf_counter() - t0
    print("\n=== quickstart timings")
    for title, took, _ in log:
        print(f"  {took:7.1f} s  {title}")
    print(f"  {total:7.1f} s  total ({profile} profile)")
    print(f"\nOpen the runs in the MLflow UI:  discl ui run_root={run_root}   (or: make mlflow-ui)")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="discl quickstart", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", choices=("full", "smoke"), default="full",
                   help="full: the toy replication settings; smoke: the same path with tiny budgets (tests)")
    p.add_argument("--run-root", default="runs", help="where outputs, toy models and MLflow go (default runs/)")
    p.add_argument("--sequential", action="store_true",
                   help="train a task's two arms one after the other (default: at the same time)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="extra overrides for every stage")
    args = p.parse_args(argv)
    try:
        return run(args.profile, args.run_root, args.overrides, args.sequential)
    except SystemExit as err:
        print(err, file=sys.stderr)
        return 1
