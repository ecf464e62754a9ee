"""`discl bench replicate`: the paper's ablations at toy scale (Tables 1-4 and 5 style), 3 seeds each.

Runs the toy pipeline once per task (world → prompts → mine → generate → score, all cached and resumable), then
trains every arm × seed with the same trainer a user runs (`discl train`), and prints mean ± std tables and the
paper's key contrasts as PAIRED differences (same seed in both arms) with 95 % t-intervals.
``--json PATH`` writes every row's per-seed metrics and the contrasts.

Runs are named after the arm, the seed and a hash of the resolved config and the package's code
(:func:`run_key`), so rerunning the bench reuses a finished run only when nothing that made it has changed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import statistics
import sys
import time
from pathlib import Path

LT_ARMS: list[tuple[str, list[str]]] = [
    ("CE", ["training.strategy=none", "training.loss=ce"]),
    ("BS", ["training.strategy=none", "training.loss=balanced_softmax"]),
    ("text-only (λ=0)", ["training.strategy=text_only"]),
    ("all-level", ["training.strategy=all_level"]),
    ("specific→diverse", ["training.strategy=specific_to_diverse"]),
    ("diverse→specific", ["training.strategy=diverse_to_specific"]),
    ("adaptive", ["training.strategy=adaptive", "training.select_metric=val_acc"]),
    ("BS + diverse→specific", ["training.strategy=diverse_to_specific", "training.loss=balanced_softmax"]),
]
LQ_ARMS: list[tuple[str, list[str]]] = [
    ("FLYP fine-tune", ["training.strategy=none", "training.wise_alphas=[]"]),
    ("FLYP + WE", ["training.strategy=none", "training.wise_alphas=[0.5]"]),
    ("text-only (λ=0)", ["training.strategy=text_only", "training.lams=[0.0]", "training.wise_alphas=[]"]),
    ("all-level", ["training.strategy=all_level", "training.wise_alphas=[]"]),
    ("easy→hard", ["training.strategy=easy_to_hard", "training.wise_alphas=[]"]),
    ("random", ["training.strategy=random", "training.wise_alphas=[]"]),
    ("adaptive", ["training.strategy=adaptive", "training.wise_alphas=[]"]),
    ("adaptive + WE", ["training.strategy=adaptive", "training.wise_alphas=[0.5]"]),
]
# The text-only LQ arm trains on λ = 0, which the quickstart's digits-LQ spectrum does not generate: the
# replication adds it (generation resumes by key, so only the λ = 0 rows are made).
LQ_EXTRA = ["generation.lams=[0.0,0.5,0.7,0.9]"]
# The paper's key contrasts: (task, A, B, metric column); the table reports A − B paired by seed.
CONTRASTS: list[tuple[str, str, str, str]] = [
    ("digits_lt", "diverse→specific", "CE", "few"),
    ("digits_lt", "diverse→specific", "CE", "overall"),
    ("digits_lt", "diverse→specific", "all-level", "few"),
    ("digits_lt", "diverse→specific", "specific→diverse", "few"),
    ("digits_lt", "BS + diverse→specific", "BS", "few"),
    ("digits_lq", "adaptive", "FLYP fine-tune", "OOD F1"),
    ("digits_lq", "adaptive", "random", "OOD F1"),
    ("digits_lq", "adaptive", "random", "ID F1"),
]
LT_COLS = [("few", "final_test_few_acc"), ("medium", "final_test_medium_acc"), ("many", "final_test_many_acc"),
           ("overall", "final_test_acc")]
LQ_COLS = [("OOD F1", "final_test_ood_f1"), ("ID F1", "final_test_id_f1")]


def _fmt(values: list[float]) -> str:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return "n/a"
    scale = 100.0 if max(abs(v) for v in vals) <= 1.0 else 1.0
    mean = statistics.fmean(vals) * scale
    std = statistics.stdev(vals) * scale if len(vals) > 1 else 0.0
    return f"{mean:.1f} ± {std:.1f}"


def _metric(result: dict, key: str, arm_overrides: list[str]) -> float | None:
    if "training.wise_alphas=[0.5]" in arm_overrides:
        wise = key.replace("final_test_", "final_wise_test_")   # the α chosen on validation (one here)
        if wise in result:
            return float(result[wise])
    return float(result[key]) if key in result else None


def table(rows: dict[str, list[dict]], arms, cols) -> str:
    head = "| arm | " + " | ".join(c for c, _ in cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 1)]
    for name, over in arms:
        res = rows.get(name, [])
        cells = [_fmt([_metric(r, key, over) for r in res]) for _, key in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_difference(a: dict[int, float], b: dict[int, float]) -> dict:
    """Mean of ``a[s] − b[s]`` over the seeds both have, its std and 95 % t-interval (n < 2 → no interval)."""
    from scipy import stats

    seeds = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in seeds]
    out: dict = {"seeds": seeds, "n": len(diffs), "diffs": diffs}
    if not diffs:
        return out | {"mean": None, "std": None, "ci95": None}
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return out | {"mean": mean, "std": None, "ci95": None}
    std = statistics.stdev(diffs)
    half = float(stats.t.ppf(0.975, len(diffs) - 1)) * std / math.sqrt(len(diffs))
    return out | {"mean": mean, "std": std, "ci95": [mean - half, mean + half]}


def _per_seed(rows: dict[str, list[dict]], arm: str, col: str, arms, cols) -> dict[int, float]:
    key = dict(cols)[col]
    over = dict(arms).get(arm, [])
    out = {}
    for r in rows.get(arm, []):
        v = _metric(r, key, over)
        if v is not None and not math.isnan(v):
            out[int(r["seed"])] = v * (100.0 if abs(v) <= 1.0 else 1.0)
    return out


def contrasts(out: dict) -> list[dict]:
    """Every key contrast whose two arms ran, as paired differences (percentage points)."""
    res = []
    for task, a, b, col in CONTRASTS:
        rows = out.get(task)
        if not rows or a not in rows or b not in rows:
            continue
        arms, cols = (LT_ARMS, LT_COLS) if task == "digits_lt" else (LQ_ARMS, LQ_COLS)
        d = paired_difference(_per_seed(rows, a, col, arms, cols), _per_seed(rows, b, col, arms, cols))
        res.append({"task": task, "a": a, "b": b, "metric": col} | d)
    return res


def contrast_table(items: list[dict]) -> str:
    lines = ["| task | contrast (A − B) | metric | n | mean diff | 95 % CI |", "|---|---|---|---|---|---|"]
    for c in items:
        mean = "n/a" if c["mean"] is None else f"{c['mean']:+.1f}"
        ci = "n/a" if not c["ci95"] else f"[{c['ci95'][0]:+.1f}, {c['ci95'][1]:+.1f}]"
        lines.append(f"| {c['task']} | {c['a']} − {c['b']} | {c['metric']} | {c['n']} | {mean} | {ci} |")
    return "\n".join(lines)


def code_version() -> str:
    """A digest of the package's Python sources: any code change makes new run keys."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.blake2b(digest_size=8)
    for f in sorted(root.rglob("*.py")):
        h.update(str(f.relative_to(root)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def run_key(cfg, code: str | None = None) -> str:
    """8 hex digits naming the resolved config (run_root and tracking excluded: where, not what) and the code."""
    data = cfg.model_dump(mode="json")
    data.pop("run_root", None)
    data.pop("tracking", None)
    text = json.dumps(data, sort_keys=True, default=str) + "|" + (code or code_version())
    return hashlib.blake2b(text.encode(), digest_size=4).hexdigest()


def _prepare(config: str, common: list[str]) -> None:
    """Cached data path up to the filtered spectrum (each stage resumes or reuses its output)."""
    from jobs import generate, mine, prompts, score, world

    for stage in (world, prompts, mine, generate, score):
        rc = stage.main(["--config", config, *common])
        if stage is world and rc == 1:   # a missed quality gate: models exist; the tables say what they show
            print("WARNING: a toy-world quality gate failed (see above); going on with the cached models")
        elif rc:
            raise SystemExit(f"bench replicate: {stage.__name__} failed ({rc})")


def run_name(arm: str, seed: int) -> str:
    """ASCII run name of an (arm, seed): Ray Train names files and actors after it."""
    slug = arm.replace("λ", "lam").replace("→", "-to-").replace("+", "plus")
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", slug).strip("_") + f"_seed{seed}"


def run_task(config: str, arms, seeds: list[int], common: list[str], experiment: str,
             concurrent: int = 2) -> dict[str, list[dict]]:
    """Every arm × seed through ``fit``; ``concurrent`` runs share the Ray cluster at once (one CPU each)."""
    from concurrent.futures import ThreadPoolExecutor

    from discl_ray.config import load_config
    from discl_ray.training import fit

    _prepare(config, common)
    code = code_version()

    def one(name: str, over: list[str], seed: int) -> dict:
        cfg = load_config(config, [*common, *over, f"training.seed={seed}", f"tracking.experiment_name={experiment}"])
        start = time.perf_counter()
        # One run name per (arm, seed, config, code): a rerun resumes or reuses only a run made the same way.
        result = fit(cfg, run_name=f"{run_name(name, seed)}_{run_key(cfg, code)}")
        result = {k: v for k, v in result.items() if isinstance(v, (int, float))}
        result |= {"seed": seed, "seconds": round(time.perf_counter() - start, 1)}
        print(f"  {name:24s} seed {seed}: " + ", ".join(f"{k}={v:.3f}" for k, v in result.items()
                                                       if k.startswith("final_test")), flush=True)
        return result

    def guarded(job) -> dict:
        try:
            return one(*job)
        except Exception as err:  # one failed run must not lose the others' rows; main() exits 1
            print(f"  {job[0]:24s} seed {job[2]}: FAILED: {type(err).__name__}: {err}", flush=True)
            return {"seed": job[2], "error": f"{type(err).__name__}: {err}"}

    jobs = [(name, over, seed) for name, over in arms for seed in seeds]
    with ThreadPoolExecutor(max_workers=max(1, concurrent)) as pool:
        results = list(pool.map(guarded, jobs))
    rows: dict[str, list[dict]] = {}
    for (name, _, _), result in zip(jobs, results):
        rows.setdefault(name, []).append(result)
    return rows


def main(argv: list[str] | None = None) -> int:
    from discl_ray.cli_common import DEFAULT_CONFIG  # noqa: F401  (packaged configs live beside it)

    p = argparse.ArgumentParser(prog="discl bench replicate", description=__doc__)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--tasks", nargs="+", choices=("lt", "lq"), default=["lt", "lq"])
    p.add_argument("--arms", nargs="+", default=None, metavar="NAME",
                   help="only these arms (names as in the tables, e.g. CE 'diverse→specific')")
    p.add_argument("--run-root", default="runs")
    p.add_argument("--concurrent", type=int, default=2,
                   help="training runs at once (each Ray Train run holds one CPU; default 2)")
    p.add_argument("--json", default=None, help="write per-seed metrics of every row here")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args(argv)
    root = Path(__file__).resolve().parents[2] / "configs" / "toy"
    common = [f"run_root={args.run_root}", *args.overrides]
    out: dict = {"seeds": args.seeds, "overrides": args.overrides}
    lt_arms = [a for a in LT_ARMS if not args.arms or a[0] in args.arms]
    lq_arms = [a for a in LQ_ARMS if not args.arms or a[0] in args.arms]
    t0 = time.perf_counter()
    if "lt" in args.tasks:
        out["digits_lt"] = run_task(str(root / "digits_lt.yaml"), lt_arms, args.seeds, common, "toy_replicate_lt",
                                    args.concurrent)
    if "lq" in args.tasks:
        out["digits_lq"] = run_task(str(root / "digits_lq.yaml"), lq_arms, args.seeds, [*common, *LQ_EXTRA],
                                    "toy_replicate_lq", args.concurrent)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    if "digits_lt" in out:
        print("\ndigits-LT (top-1 %, mean ± std over seeds; balanced test split)\n")
        print(table(out["digits_lt"], lt_arms, LT_COLS))
    if "digits_lq" in out:
        print("\ndigits-LQ (macro-F1 %, mean ± std over seeds)\n")
        print(table(out["digits_lq"], lq_arms, LQ_COLS))
    out["contrasts"] = contrasts(out)
    if out["contrasts"]:
        print("\nPaired differences (A − B, same seed; percentage points, 95 % t-interval)\n")
        print(contrast_table(out["contrasts"]))
    print(f"\n{out['seconds']:.0f} s in all")
    failed = [f"{task}: {arm} seed {r['seed']}" for task in ("digits_lt", "digits_lq") for arm, res in
              out.get(task, {}).items() for r in res if "error" in r]
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1, default=str))
    if failed:
        print("bench replicate: failed runs (rerun the same command to retry only them):\n  " + "\n  ".join(failed),
              file=sys.stderr)
        return 1
    return 0
