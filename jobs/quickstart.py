"""`discl quickstart`: the whole DisCL method on the built-in toy world.

world (the models shipped with the package; `discl world --force` retrains them) → digits-LT: prompts → mine
→ generate → score → train CE baseline and DisCL diverse→specific → digits-LQ: prompts → mine → generate →
score → train the FLYP fine-tuning baseline and DisCL adaptive → report. Every step is the same stage command
a user runs by hand (printed with it). All stages share one Ray session, started once for the whole quickstart;
once the world is there, the two tasks run side by side (each task's steps in order, its two trainings at the
same time), so one task's one-core steps (spectrum, CLIP filter, mining) fill the core the other leaves idle.
``--sequential`` runs one task, and one training, after the other.

The console shows one line per step (its command, time and result), the gates and the result tables; each
stage's full output goes to ``<run-root>/logs/quickstart.log`` (what Ray's C++ core in this process prints
too) and Ray's worker logs stay in Ray's session folder. ``--verbose`` prints everything as the stages run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Overrides of the smoke profile: the same path through every stage in well under a minute of compute.
SMOKE = {
    "generation": ["generation.seeds=[0,1]", "generation.steps=10"],
    "training": ["training.epochs=2", "training.curriculum_epochs=1", "training.steps_per_epoch=4",
                 "training.random_real_size=32", "training.guidance_val_size=8", "training.probe_steps=2",
                 # two-epoch trainings on a few images: keep every synthetic row whatever its score
                 "training.threshold=-1.0"],
}
TASKS = (
    ("digits_lt.yaml", "digits-LT", [("CE baseline", ["training.strategy=none"]),
                                     ("DisCL diverse→specific", ["training.strategy=diverse_to_specific"])]),
    ("digits_lq.yaml", "digits-LQ", [("FLYP fine-tuning baseline", ["training.strategy=none"]),
                                     ("DisCL adaptive", ["training.strategy=adaptive"])]),
)
HEADLINE = {"long_tail": (("many", "final_test_many_acc"), ("medium", "final_test_medium_acc"),
                          ("few", "final_test_few_acc"), ("overall", "final_test_acc")),
            "low_quality": (("OOD F1", "final_test_ood_f1"), ("ID F1", "final_test_id_f1"))}


def _arm_id(overrides: list[str]) -> str:
    """``training.strategy=none`` → ``none`` (the file name of that arm's metrics)."""
    return overrides[0].split("=", 1)[1]


def _config(name: str) -> str:
    local = Path("configs/toy") / name
    return str(local if local.is_file() else ROOT / "configs" / "toy" / name)


class Console:
    """The quickstart's own lines go to the terminal; stage output (stdout) goes to the log file unless verbose."""

    def __init__(self, stream, total_steps: int):
        self.out, self.total, self.done = stream, total_steps, 0
        self.lock = threading.Lock()

    def line(self, text: str = "") -> None:
        with self.lock:
            print(text, file=self.out, flush=True)

    def step(self, title: str, took: float, rc: int, result: str = "") -> None:
        mark = "ok" if rc == 0 else f"exit {rc}"
        with self.lock:
            self.done += 1
            print(f"[{self.done:2d}/{self.total}] {title:<38} {took:6.1f} s  {mark}{'  ' + result if result else ''}",
                  file=self.out, flush=True)


def _run_stage(command: str, argv: list[str]) -> tuple[int, float]:
    import importlib

    from discl_ray.cli import COMMANDS

    start = time.perf_counter()
    rc = int(importlib.import_module(COMMANDS[command][0]).main(argv) or 0)
    return rc, time.perf_counter() - start


def _check(console: Console, title: str, rc: int, tolerate: tuple[int, ...]) -> None:
    if rc in tolerate and rc:
        console.line(f"  WARNING: '{title}' exited {rc}; continuing (details in the log)")
    elif rc != 0:
        raise SystemExit(f"discl quickstart: step '{title}' failed with exit code {rc} (details in the log)")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _result(command: str, exp_dir: Path, argv: list[str]) -> str:
    """One short phrase on what a step produced, read from the files it wrote."""
    if command == "mine":
        s = _read_json(exp_dir / "mine" / "summary.json")
        return f"{s['hard_images']} hard of {s['train_images']} training images" if s else ""
    if command == "generate":
        s = _read_json(exp_dir / "generate" / "summary.json")
        return f"{s['generated'] + s['skipped']} images ({s['failed']} failed)" if s else ""
    if command == "score":
        s = _read_json(exp_dir / "score" / "summary.json")
        return f"kept {s['kept']} of {s['total']} (CLIP ≥ {s.get('threshold', '?')})" if s else ""
    if command == "train" and "--json" in argv:
        m = _read_json(Path(argv[argv.index("--json") + 1]))
        for cols in HEADLINE.values():
            if all(k in m for _, k in cols):
                return ", ".join(f"{label} {100 * float(m[k]):.1f}" for label, k in cols)
    return ""


def _world_lines(cache: Path) -> list[str]:
    from discl_ray.toyworld.train import read_manifest

    man = read_manifest(cache) or {}
    g = man.get("gates") or {}
    src = "shipped weights" if man.get("source") == "shipped" else "trained here"
    out = [f"  toy world: {src}" + (f", code {man['code_version'].get('toyworld_sha256', '?')}"
                                    if man.get("code_version") else "")]
    if "clip" in g:
        out.append(f"  [{'PASS' if g['clip']['passed'] else 'FAIL'}] CLIP zero-shot {100 * g['clip']['zero_shot_acc']:.1f} %"
                   f" (≥ {100 * g['clip']['min_acc']:.0f} %); judge held-out {100 * g['classifier']['heldout_acc']:.1f} %")
    if "generator" in g:
        c = g["generator"]
        out.append(f"  [{'PASS' if c['passed'] else 'FAIL'}] generator λ=0 recognised {100 * c['lam0_acc']:.0f} %"
                   f" (≥ {100 * c['min_lam0_acc']:.0f} %), by λ " + " ".join(f"{v:.2f}" for v in c["acc_by_lam"].values()))
    if not g:
        out.append("  gates not run (--no-gates)")
    return out


def _cluster_cpus(cfg, extra: list[str]) -> list[str]:
    """The override giving the quickstart's own cluster twice the configured CPUs (all the machine's by
    default), unless the user set ``ray.num_cpus``: the two tasks then run side by side (a training's worker
    holds a CPU, a generator or CLIP actor one, their read/write tasks a quarter) without either waiting
    for the other's CPUs, while the OS shares the real cores."""
    if any(o.startswith("ray.num_cpus=") for o in extra):
        return []
    return [f"ray.num_cpus={2 * (cfg.ray.num_cpus or os.cpu_count() or 1)}"]


def run(profile: str, run_root: str, extra: list[str], sequential: bool = False, verbose: bool = False) -> int:
    from discl_ray.config import load_config
    from discl_ray.runtime import logs
    from discl_ray.runtime.cluster import RunPaths, init_ray
    from discl_ray.toyworld import ship

    t0 = time.perf_counter()
    log_path = logs.setup(verbose, run_root)
    common = [f"run_root={run_root}"] + extra + (["--verbose"] if verbose else [])
    gen = SMOKE["generation"] if profile == "smoke" else []
    trn = SMOKE["training"] if profile == "smoke" else []
    lt_cfg = load_config(_config("digits_lt.yaml"), [f"run_root={run_root}", *extra])
    root = RunPaths.from_config(lt_cfg).root
    if not (lt_cfg.ray.address or os.environ.get("RAY_ADDRESS")):
        # One machine: Ray's processes talk over loopback, not the machine's network address.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        # Ray Train's controller takes one reported result per poll of its workers, every 2 s by default, and a
        # worker's report blocks until then (a queue of one): the toy's sub-second epochs, each reported, would
        # wait ~2 s apiece (40 epochs ≈ 80 s of a digits-LT training). Poll at the pace of the toy's epochs.
        os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    # The cluster this process starts for every stage (a joined cluster keeps its size).
    cluster_cfg = lt_cfg if lt_cfg.ray.address or os.environ.get("RAY_ADDRESS") or sequential else \
        load_config(_config("digits_lt.yaml"), [f"run_root={run_root}", *extra, *_cluster_cpus(lt_cfg, extra)])
    console = Console(sys.stdout, 1 + 6 * len(TASKS) + len(TASKS))
    timings: list[tuple[str, float]] = []
    stage_log = log_path.parent / "quickstart.log"
    console.line(f"discl quickstart ({profile} profile): the DisCL method on the toy digits world")
    console.line(f"  stage output: {stage_log}" + ("" if verbose else "  (--verbose prints it here)"))

    sink = contextlib.nullcontext() if verbose else open(stage_log, "a", encoding="utf-8")  # noqa: SIM115
    # Stage output to the log: Python's stdout, and what native code writes to descriptor 2 (Ray's C++ core logs
    # there, outside Python's logging); Python's stderr (warnings, errors) stays on the console.
    with sink as fh, (contextlib.nullcontext() if verbose else contextlib.redirect_stdout(fh)), \
            logs.native_stderr_to(fh):
        def step(title: str, command: str, argv: list[str], tolerate: tuple[int, ...] = (), exp: str = "",
                 meanwhile=None) -> None:
            if fh is not None:
                print(f"\n=== {title}\n$ discl {command} {shlex.join(argv)}", flush=True)
            console.line(f"$ discl {command} {shlex.join(a for a in argv if a not in common)}")
            if meanwhile is None:
                rc, took = _run_stage(command, argv)
            else:       # the stage in a thread, ``meanwhile`` in the main thread (Ray wants to start there)
                with ThreadPoolExecutor(max_workers=1) as pool:
                    running = pool.submit(_run_stage, command, argv)
                    meanwhile()
                    rc, took = running.result()
            timings.append((title, took))
            console.step(title, took, rc, _result(command, root / exp, argv) if rc == 0 else "")
            _check(console, title, rc, tolerate)

        def together(steps: list[tuple[str, list[str]]], exp: str, task: str) -> None:
            for title, argv in steps:
                if fh is not None:
                    print(f"\n=== {title} (at the same time as the other arm)\n$ discl train {shlex.join(argv)}",
                          flush=True)
                console.line(f"$ discl train {shlex.join(a for a in argv if a not in common)}   (at the same time)")
            start = time.perf_counter()
            with ThreadPoolExecutor(max_workers=len(steps)) as pool:
                results = list(pool.map(lambda s: _run_stage("train", s[1]), steps))
            for (title, argv), (rc, took) in zip(steps, results):
                timings.append((title, took))
                console.step(title, took, rc, _result("train", root / exp, argv) if rc == 0 else "")
            timings.append((f"  ({task}: both trainings, wall clock)", time.perf_counter() - start))
            for (title, _), (rc, _) in zip(steps, results):
                _check(console, title, rc, ())

        console.line("\n== toy world models")
        world_args = ["--config", _config("base.yaml"), *common]
        if profile == "smoke":      # the shipped models without their gates; a few training steps without them
            world_args += ["--no-gates"] + ([] if ship.read_manifest() else ["--budget-s", "20"])
        # Exit 1 = a quality gate missed: the models exist and the method still runs, so say so and go on.
        # One Ray session for every stage (the stages find it up and use it). With --sequential it starts while the
        # world loads; the cluster of twice the CPUs starts after the world's gates: started beside them, the
        # gates (torch on both cores in this process) took twice the CPU time (two full runs each, docs/benchmarks.md).
        step("toy world", "world", world_args, tolerate=(1,),
             meanwhile=(lambda: init_ray(cluster_cfg)) if cluster_cfg is lt_cfg else None)
        init_ray(cluster_cfg)
        for line in _world_lines(RunPaths.from_config(lt_cfg).cache):
            console.line(line)

        def task_steps(cfg_name: str, task: str, arms) -> None:
            exp = load_config(_config(cfg_name), [f"run_root={run_root}", *extra]).experiment
            console.line(f"\n== {task} (experiment {exp})" + ("" if sequential else ", beside the other task"))
            base = ["--config", _config(cfg_name), *common]
            step(f"{task}: prompts", "prompts", base, exp=exp)
            step(f"{task}: hard samples", "mine", base, exp=exp)
            step(f"{task}: spectrum", "generate", base + gen, exp=exp)
            step(f"{task}: CLIP filter", "score", base, exp=exp)
            out = root / exp / "quickstart"
            out.mkdir(parents=True, exist_ok=True)
            trainings = [(f"{task}: train {arm}", base + trn + over + ["--json", str(out / f"{_arm_id(over)}.json")])
                         for arm, over in arms]
            if sequential:
                for title, argv in trainings:
                    step(title, "train", argv, exp=exp)
            else:
                together(trainings, exp, task)

        if sequential:
            for task_args in TASKS:
                task_steps(*task_args)
        else:
            start = time.perf_counter()
            with ThreadPoolExecutor(max_workers=len(TASKS)) as pool:
                running = [pool.submit(task_steps, *task_args) for task_args in TASKS]
                for done in running:
                    done.result()          # a failed step's SystemExit, once both tasks have stopped
            timings.append(("  (both tasks, wall clock)", time.perf_counter() - start))
        reports = []
        for cfg_name, _, _ in TASKS:
            exp = load_config(_config(cfg_name), [f"run_root={run_root}", *extra]).experiment
            step(f"report {exp}", "report", ["--config", _config(cfg_name), *common], exp=exp)
            reports.append(root / exp / "report")
        for folder in reports:
            md = folder / "report.md"
            console.line("\n" + (md.read_text().strip() if md.is_file() else f"(no report in {folder})"))
            pngs = sorted(p.name for p in folder.glob("*.png"))
            console.line(f"plots: {folder}/ ({', '.join(pngs)})")
        total = time.perf_counter() - t0
        console.line("\n== timings")
        for title, took in timings:
            console.line(f"  {took:7.1f} s  {title}")
        console.line(f"  {total:7.1f} s  total ({profile} profile)")
        console.line(f"\nlogs: {log_path.parent}/ (Ray workers: {root / '.ray' / 'session_latest' / 'logs'} "
                     "or Ray's default temp folder)")
        console.line(f"Compare the runs in the MLflow UI:  discl ui run_root={run_root}   (or: make mlflow-ui)")
        # Ray's last words (its worker-pool notes, deduplicated lines) are printed when it stops: stop it while
        # the stage output still goes to the log (the console lines above go to the terminal either way).
        import ray

        if ray.is_initialized():
            ray.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="discl quickstart", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", choices=("full", "smoke"), default="full",
                   help="full: the toy replication settings; smoke: the same path with tiny budgets (tests)")
    p.add_argument("--run-root", default="runs", help="where outputs, toy models and MLflow go (default runs/)")
    p.add_argument("--sequential", action="store_true",
                   help="one task after the other, and a task's two trainings one after the other (default: the "
                        "two tasks side by side, each task's trainings at the same time)")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="print every stage's output, Ray's worker logs and library logs as they come")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="extra overrides for every stage")
    args = p.parse_args(argv)
    try:
        return run(args.profile, args.run_root, args.overrides, args.sequential, args.verbose)
    except SystemExit as err:
        print(err, file=sys.stderr)
        return 1
