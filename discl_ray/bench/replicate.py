"""`discl bench replicate`: the paper's ablations at toy scale (Tables 1-4 and 5 style), per world and task.

Runs the toy pipeline (world → prompts → mine → generate → score, all cached and resumable) and trains every
arm × seed with the same trainer a user runs (`discl train`), then prints mean ± std tables and the paper's key
contrasts as PAIRED differences (same seed in both arms) with 95 % t-intervals.

Seeds (``--vary``): ``data`` (default) makes seed s a new draw of everything random: the task's split and
long-tail sample (``dataset.seed``; the world the toy models were trained on stays ``dataset.toy.world_seed``),
hence mining, the spectrum's noise (``generation.seeds``) and training (``training.seed``); each data seed has
its own experiment (``<experiment>_d<s>``), so caches never mix. ``training`` varies ``training.seed`` only
(one shared data path: the ± is training noise). Key-contrast arms run ``--seeds`` (default 5), the others
``--other-seeds`` (default: the first 3).

Every finished run's metrics are kept as ``<run_root>/replicate/<world>/<task>/<run>.json``, its name holding
the arm, the seed and :func:`run_key` (a hash of the resolved config and the code that trains): a rerun reuses
a result only when nothing that made it has changed, and any change reruns the arm. ``--collect`` trains
nothing and tabulates the finished runs; ``--json PATH`` writes, per world and task, each arm's per-seed
metrics, mean ± std and the paired contrasts.
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
# The paper's key contrasts: (task, A, B, metric column, key); the table reports A − B paired by seed. The arms of
# the key ones (DisCL vs baseline, diverse→specific vs all-level and vs specific→diverse, adaptive vs
# diverse→specific on LT, adaptive vs random on LQ) run every seed of --seeds, the other arms --other-seeds.
CONTRASTS: list[tuple[str, str, str, str, bool]] = [
    ("digits_lt", "diverse→specific", "CE", "few", True),
    ("digits_lt", "diverse→specific", "CE", "overall", True),
    ("digits_lt", "diverse→specific", "all-level", "few", True),
    ("digits_lt", "diverse→specific", "specific→diverse", "few", True),
    ("digits_lt", "BS + diverse→specific", "BS", "few", False),
    ("digits_lt", "adaptive", "diverse→specific", "few", True),
    ("digits_lq", "adaptive", "FLYP fine-tune", "OOD F1", True),
    ("digits_lq", "adaptive", "FLYP fine-tune", "ID F1", True),
    ("digits_lq", "adaptive", "random", "OOD F1", True),
    ("digits_lq", "adaptive", "random", "ID F1", True),
    ("digits_lq", "text-only (λ=0)", "FLYP fine-tune", "OOD F1", False),
]
# The paper's A − B for each contrast (percentage points), from its tables: Table 1 (ImageNet-LT, ResNet-10, CE:
# few 4.40 / overall 35.80; all-level few 19.17; specific→diverse 18.36; adaptive 16.78; diverse→specific few
# 23.64 / overall 39.82; BS 19.29 and BS + DisCL 21.36) and Table 5 (iWildCam, ViT-B/16, macro-F1 OOD / ID:
# FLYP 35.5 / 52.2, text-only 34.2, random 35.9 / 52.1, adaptive 38.2 / 54.3).
PAPER: dict[tuple[str, str, str, str], tuple[float, str]] = {
    ("digits_lt", "diverse→specific", "CE", "few"): (23.64 - 4.40, "Table 1: 23.64 − 4.40"),
    ("digits_lt", "diverse→specific", "CE", "overall"): (39.82 - 35.80, "Table 1: 39.82 − 35.80"),
    ("digits_lt", "diverse→specific", "all-level", "few"): (23.64 - 19.17, "Table 1: 23.64 − 19.17"),
    ("digits_lt", "diverse→specific", "specific→diverse", "few"): (23.64 - 18.36, "Table 1: 23.64 − 18.36"),
    ("digits_lt", "BS + diverse→specific", "BS", "few"): (21.36 - 19.29, "Table 1: 21.36 − 19.29"),
    ("digits_lt", "adaptive", "diverse→specific", "few"): (16.78 - 23.64, "Table 1: 16.78 − 23.64"),
    ("digits_lq", "adaptive", "FLYP fine-tune", "OOD F1"): (38.2 - 35.5, "Table 5: 38.2 − 35.5"),
    ("digits_lq", "adaptive", "FLYP fine-tune", "ID F1"): (54.3 - 52.2, "Table 5: 54.3 − 52.2"),
    ("digits_lq", "adaptive", "random", "OOD F1"): (38.2 - 35.9, "Table 5: 38.2 − 35.9"),
    ("digits_lq", "adaptive", "random", "ID F1"): (54.3 - 52.1, "Table 5: 54.3 − 52.1"),
    ("digits_lq", "text-only (λ=0)", "FLYP fine-tune", "OOD F1"): (34.2 - 35.5, "Table 5: 34.2 − 35.5"),
}
ALPHA = 0.05        # family-wise error rate of the Holm column (one family per world: every contrast that ran)
POWER = 0.80        # the power the seed counts aim for, at the paper's effect size
# Per-run fields kept besides the numeric metrics: each epoch's λ and, on adaptive epochs, the gain per λ on V.
KEEP_LISTS = ("lam_history", "gain_history")
KEY_ARMS: dict[str, set[str]] = {}
for _task, _a, _b, _col, _key in CONTRASTS:
    if _key:
        KEY_ARMS.setdefault(_task, set()).update((_a, _b))
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


def _finished(rows: dict[str, list[dict]], arm: str) -> list[dict]:
    """The arm's runs that produced metrics (not failed, not missing from a --collect)."""
    return [r for r in rows.get(arm, []) if "error" not in r and not r.get("missing")]


def _percent(v: float) -> float:
    """Accuracies and F1 are stored as fractions; the tables show percent."""
    return v * (100.0 if abs(v) <= 1.0 else 1.0)


def table(rows: dict[str, list[dict]], arms, cols) -> str:
    head = "| arm | n | " + " | ".join(c for c, _ in cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 2)]
    for name, over in arms:
        res = _finished(rows, name)
        cells = [_fmt([_metric(r, key, over) for r in res]) for _, key in cols]
        lines.append(f"| {name} | {len(res)} | " + " | ".join(cells) + " |")
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
        return out | {"mean": mean, "std": None, "ci95": None, "p": None}
    std = statistics.stdev(diffs)
    half = float(stats.t.ppf(0.975, len(diffs) - 1)) * std / math.sqrt(len(diffs))
    se = std / math.sqrt(len(diffs))
    p = 1.0 if se == 0 and mean == 0 else 0.0 if se == 0 else float(2 * stats.t.sf(abs(mean) / se, len(diffs) - 1))
    return out | {"mean": mean, "std": std, "ci95": [mean - half, mean + half], "p": p}


def t_interval(mean: float, std: float, n: int, level: float) -> list[float]:
    from scipy import stats

    half = float(stats.t.ppf(1 - (1 - level) / 2, n - 1)) * std / math.sqrt(n)
    return [mean - half, mean + half]


def holm(items: list[dict], alpha: float = ALPHA, family: int | None = None) -> list[dict]:
    """Holm's step-down correction over ``items`` (one family): each gets ``p_holm`` (the adjusted p-value),
    ``holm_level`` (the confidence level Holm tests it at: 1 − α/(m − rank + 1), rank by raw p) with
    ``ci_holm`` (the paired t-interval at that level), and ``decided`` (p_holm < α). m is ``family`` when
    larger than the number of items with a p-value (contrasts of the family that did not run count as p = 1,
    which only makes the correction more conservative); items without a p-value (n < 2) stay undecided."""
    tested = sorted((c for c in items if c.get("p") is not None), key=lambda c: c["p"])
    m, running = max(len(tested), family or 0), 0.0
    for rank, c in enumerate(tested):
        running = max(running, min(1.0, (m - rank) * c["p"]))
        c["p_holm"] = running
        c["holm_level"] = 1 - alpha / (m - rank)
        c["ci_holm"] = t_interval(c["mean"], c["std"], c["n"], c["holm_level"])
        c["decided"] = running < alpha
    for c in items:
        if c.get("p") is None:
            c.update(p_holm=None, holm_level=None, ci_holm=None, decided=False)
    return items


def seeds_for_power(effect: float, sd: float, alpha: float = ALPHA, power: float = POWER,
                    n_max: int = 1000) -> int | None:
    """Fewest paired seeds whose two-sided paired t-test at ``alpha`` detects a true mean difference ``effect``
    with per-seed SD ``sd`` with probability ≥ ``power`` (noncentral t); None above ``n_max``."""
    from scipy import stats

    if not sd or not effect:
        return None if not effect else 2
    for n in range(2, n_max + 1):
        crit = float(stats.t.ppf(1 - alpha / 2, n - 1))
        nc = abs(effect) / (sd / math.sqrt(n))
        if float(stats.nct.sf(crit, n - 1, nc) + stats.nct.cdf(-crit, n - 1, nc)) >= power:
            return n
    return None


def annotate(items: list[dict], alpha: float = ALPHA, family: int | None = None) -> list[dict]:
    """The paper's number and sign per contrast, Holm over the family (``family`` contrasts, at least those
    given), and the seeds a test of the paper's effect size needs given the measured per-seed SD (raw α, and
    α/m: Holm's first step)."""
    holm(items, alpha, family)
    m = max(1, sum(c.get("p") is not None for c in items), family or 0)
    for c in items:
        paper, source = PAPER.get((c["task"], c["a"], c["b"], c["metric"]), (None, None))
        c["paper"], c["paper_source"] = paper, source
        c["agrees_with_paper_sign"] = (None if paper is None or c["mean"] is None or c["mean"] == 0
                                       else (c["mean"] > 0) == (paper > 0))
        c["seeds_for_paper_effect"] = (None if paper is None or not c.get("std") else
                                       {"power": POWER, "alpha": alpha, "sd": c["std"], "effect": paper,
                                        "n_raw": seeds_for_power(paper, c["std"], alpha),
                                        "n_holm_first_step": seeds_for_power(paper, c["std"], alpha / m)})
    return items


def _per_seed(rows: dict[str, list[dict]], arm: str, col: str, arms, cols) -> dict[int, float]:
    key = dict(cols)[col]
    over = dict(arms).get(arm, [])
    out = {}
    for r in _finished(rows, arm):
        v = _metric(r, key, over)
        if v is not None and not math.isnan(v):
            out[int(r["seed"])] = _percent(v)
    return out


def contrasts(out: dict) -> list[dict]:
    """Every key contrast whose two arms ran, as paired differences (percentage points)."""
    res = []
    for task, a, b, col, key in CONTRASTS:
        rows = out.get(task)
        if not rows or a not in rows or b not in rows:
            continue
        arms, cols = (LT_ARMS, LT_COLS) if task == "digits_lt" else (LQ_ARMS, LQ_COLS)
        d = paired_difference(_per_seed(rows, a, col, arms, cols), _per_seed(rows, b, col, arms, cols))
        if not d["n"]:
            continue
        res.append({"task": task, "a": a, "b": b, "metric": col, "key": key} | d)
    return res


def contrast_table(items: list[dict]) -> str:
    """Raw 95 % intervals and, after :func:`annotate`, the Holm column, the paper's number and sign, and the
    seeds a test of the paper's effect needs at the measured SD."""
    full = any("p_holm" in c for c in items)
    head = "| task | contrast (A − B) | metric | n | mean diff | 95 % CI |"
    if full:
        head += " Holm p | Holm CI | decided | paper | same sign | seeds for paper's effect |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for c in items:
        mean = "n/a" if c["mean"] is None else f"{c['mean']:+.1f}"
        ci = "n/a" if not c["ci95"] else f"[{c['ci95'][0]:+.1f}, {c['ci95'][1]:+.1f}]"
        row = f"| {c['task']} | {c['a']} − {c['b']} | {c['metric']} | {c['n']} | {mean} | {ci} |"
        if full:
            hp = "n/a" if c.get("p_holm") is None else f"{c['p_holm']:.3f}"
            hci = "n/a" if not c.get("ci_holm") else f"[{c['ci_holm'][0]:+.1f}, {c['ci_holm'][1]:+.1f}]"
            paper = "n/a" if c.get("paper") is None else f"{c['paper']:+.2f} ({c['paper_source']})"
            sign = {True: "yes", False: "no", None: "n/a"}[c.get("agrees_with_paper_sign")]
            need = c.get("seeds_for_paper_effect") or {}
            seeds = f"{need.get('n_raw')} (Holm: {need.get('n_holm_first_step')})" if need else "n/a"
            row += f" {hp} | {hci} | {'yes' if c.get('decided') else 'no'} | {paper} | {sign} | {seeds} |"
        lines.append(row)
    return "\n".join(lines)


def code_version() -> str:
    """A digest of the package's Python sources that make a run (the bench drivers excluded: what they pass is
    in the resolved config): any such code change makes new run keys."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.blake2b(digest_size=8)
    for f in sorted(root.rglob("*.py")):
        rel = f.relative_to(root)
        if rel.parts[0] == "bench":
            continue
        h.update(str(rel).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def run_key(cfg, code: str | None = None) -> str:
    """8 hex digits naming the resolved config (run_root and tracking excluded: where, not what) and the code."""
    data = cfg.model_dump(mode="json")
    data.pop("run_root", None)
    data.pop("tracking", None)
    text = json.dumps(data, sort_keys=True, default=str) + "|" + (code or code_version())
    return hashlib.blake2b(text.encode(), digest_size=4).hexdigest()


def _prepare(config: str, common: list[str], world_gates: bool = False) -> None:
    """Cached data path up to the filtered spectrum (each stage resumes or reuses its output). The toy world's
    quality gates run only with ``world_gates`` (`discl world` checks them; minutes on a loaded machine)."""
    from jobs import generate, mine, prompts, score, world

    for stage in (world, prompts, mine, generate, score):
        extra = ["--no-gates"] if stage is world and not world_gates else []
        rc = stage.main(["--config", config, *extra, *common])
        if stage is world and rc == 1:   # a missed quality gate: models exist; the tables say what they show
            print("WARNING: a toy-world quality gate failed (see above); going on with the cached models")
        elif rc:
            raise SystemExit(f"bench replicate: {stage.__name__} failed ({rc})")


def run_name(arm: str, seed: int) -> str:
    """ASCII run name of an (arm, seed): Ray Train names files and actors after it."""
    slug = arm.replace("λ", "lam").replace("→", "-to-").replace("+", "plus")
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", slug).strip("_") + f"_seed{seed}"


def data_overrides(base, seed: int, vary: str) -> list[str]:
    """What seed ``seed`` changes in the data path (``vary=data``): the task's split and sample, the spectrum's
    noise, and its own experiment (so its cached stages never mix with another seed's); nothing for
    ``vary=training``. The world (the toy models' training split) stays the base config's."""
    if vary == "training":
        return []
    n = len(base.generation.seeds)
    world = base.dataset.toy.world_seed if base.dataset.toy.world_seed is not None else base.dataset.seed
    return [f"experiment={base.experiment}_d{seed}", f"dataset.seed={seed}", f"dataset.toy.world_seed={world}",
            "generation.seeds=[" + ",".join(str(seed * n + i) for i in range(n)) + "]"]


def arm_seeds(task: str, arm: str, seeds: list[int], other_seeds: list[int]) -> list[int]:
    """Key-contrast arms run every seed of ``seeds``; the others ``other_seeds``."""
    return list(seeds) if arm in KEY_ARMS.get(task, set()) else list(other_seeds)


def result_path(cache_root: Path, world: str, task: str, name: str) -> Path:
    return cache_root / world / task / f"{name}.json"


def run_task(config: str, arms, seeds: list[int], common: list[str], experiment: str,
             concurrent: int = 2, *, task: str = "digits_lt", world: str = "clean", vary: str = "data",
             other_seeds: list[int] | None = None, cache_root: Path | None = None,
             collect: bool = False, world_gates: bool = False) -> dict[str, list[dict]]:
    """Every arm × seed through ``fit`` (``concurrent`` runs share the Ray cluster at once, one CPU each), a
    finished run's metrics read back from its result file instead; ``collect`` trains nothing."""
    from concurrent.futures import ThreadPoolExecutor

    from discl_ray.config import load_config

    other_seeds = list(seeds[:3]) if other_seeds is None else other_seeds
    cache_root = Path(cache_root or Path(common_value(common, "run_root") or "runs") / "replicate")
    base = load_config(config, common)
    code = code_version()
    plan = []       # (arm, overrides, seed, cfg, name, path)
    for name, over in arms:
        for seed in arm_seeds(task, name, seeds, other_seeds):
            data_over = data_overrides(base, seed, vary)
            cfg = load_config(config, [*common, *data_over, *over, f"training.seed={seed}",
                                       f"tracking.experiment_name={experiment}"])
            # One run name per (arm, seed, config, code): a rerun resumes or reuses only a run made the same way.
            rname = f"{run_name(name, seed)}_{run_key(cfg, code)}"
            plan.append((name, seed, data_over, cfg, rname, result_path(cache_root, world, task, rname)))

    def cached(path: Path) -> dict | None:
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    todo = [p for p in plan if cached(p[5]) is None]
    if collect:
        todo = []
    for data_over in sorted({tuple(p[2]) for p in todo}):   # the data path of every data seed that still trains
        _prepare(config, [*common, *data_over], world_gates)

    def one(item) -> dict:
        from discl_ray.training import fit

        name, seed, _data_over, cfg, rname, path = item
        start = time.perf_counter()
        result = fit(cfg, run_name=rname)
        result = {k: v for k, v in result.items() if isinstance(v, (int, float)) or k in KEEP_LISTS}
        result |= {"seed": seed, "seconds": round(time.perf_counter() - start, 1), "run": rname,
                   "experiment": cfg.experiment}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        tmp.replace(path)
        print(f"  {name:24s} seed {seed}: " + ", ".join(f"{k}={v:.3f}" for k, v in result.items()
                                                       if k.startswith("final_test")), flush=True)
        return result

    def guarded(item) -> dict:
        try:
            return one(item)
        except Exception as err:  # one failed run must not lose the others' rows; main() exits 1
            print(f"  {item[0]:24s} seed {item[1]}: FAILED: {type(err).__name__}: {err}", flush=True)
            return {"seed": item[1], "error": f"{type(err).__name__}: {err}"}

    with ThreadPoolExecutor(max_workers=max(1, concurrent)) as pool:
        fresh = dict(zip([p[4] for p in todo], pool.map(guarded, todo)))
    rows: dict[str, list[dict]] = {}
    for name, seed, _d, _cfg, rname, path in plan:
        result = fresh.get(rname) or cached(path)
        if result is None:
            result = {"seed": seed, "missing": True}
        rows.setdefault(name, []).append(result)
    return rows


def common_value(common: list[str], key: str) -> str | None:
    """The last ``key=value`` of ``common`` for ``key``."""
    found = None
    for item in common:
        k, _, v = item.partition("=")
        if k == key:
            found = v
    return found


def _readable_lams(run: dict) -> dict:
    """A run's ``lam_history`` with the trainer's markers spelt out (strict JSON has no NaN): "all" = every
    level mixed (all-level), "real" = a real-only epoch; λ values stay numbers."""
    if "lam_history" not in run:
        return run
    marks = ["all" if isinstance(v, float) and math.isnan(v) else "real" if v == -1.0 else v
             for v in run["lam_history"]]
    return run | {"lam_history": marks}


def summarize(rows: dict[str, list[dict]], arms, cols) -> dict:
    """Per arm: its overrides, seeds, per-seed metrics (percent) and mean ± std per column."""
    out = {}
    for name, over in arms:
        res = _finished(rows, name)
        per_col = {col: [_percent(v) for v in (_metric(r, key, over) for r in res)
                         if v is not None and not math.isnan(v)] for col, key in cols}
        out[name] = {
            "overrides": over, "seeds": [int(r["seed"]) for r in res], "n": len(res),
            "mean": {c: (statistics.fmean(v) if v else None) for c, v in per_col.items()},
            "std": {c: (statistics.stdev(v) if len(v) > 1 else None) for c, v in per_col.items()},
            "per_seed": {c: v for c, v in per_col.items()},
            "missing_seeds": [int(r["seed"]) for r in rows.get(name, []) if r.get("missing")],
            "failed_seeds": [int(r["seed"]) for r in rows.get(name, []) if "error" in r],
            "runs": [_readable_lams(r) for r in res],
        }
    return out


TASKS = {"lt": ("digits_lt", LT_ARMS, LT_COLS, "toy_replicate_lt"),
         "lq": ("digits_lq", LQ_ARMS, LQ_COLS, "toy_replicate_lq")}
WORLDS = {"clean": {"lt": "digits_lt.yaml", "lq": "digits_lq.yaml"},
          "gap": {"lt": "digits_lt_gap.yaml", "lq": "digits_lq_gap.yaml"}}
TITLES = {"digits_lt": "digits-LT (top-1 %, mean ± std over seeds; balanced test split)",
          "digits_lq": "digits-LQ (macro-F1 %, mean ± std over seeds)"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="discl bench replicate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worlds", nargs="+", choices=tuple(WORLDS), default=["clean"],
                   help="toy worlds: clean (configs/toy/digits_*.yaml) and gap (configs/toy/digits_*_gap.yaml)")
    p.add_argument("--tasks", nargs="+", choices=tuple(TASKS), default=["lt", "lq"])
    p.add_argument("--vary", choices=("data", "training"), default="data",
                   help="what a seed varies: data = the task's split, mining, spectrum and training (each data "
                        "seed its own experiment); training = training randomness only (default: data)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4],
                   help="seeds of the key-contrast arms (default 0-4)")
    p.add_argument("--other-seeds", type=int, nargs="+", default=None,
                   help="seeds of the other arms (default: the first 3 of --seeds)")
    p.add_argument("--arms", nargs="+", default=None, metavar="NAME",
                   help="only these arms (names as in the tables, e.g. CE 'diverse→specific')")
    p.add_argument("--run-root", default="runs")
    p.add_argument("--concurrent", type=int, default=2,
                   help="training runs at once (each Ray Train run holds one CPU; default 2)")
    p.add_argument("--world-gates", action="store_true",
                   help="run the toy world's quality gates before training (default: `discl world` checks them)")
    p.add_argument("--collect", action="store_true",
                   help="train nothing: tables and JSON from the finished runs of the current config and code")
    p.add_argument("--json", default=None, help="write, per world and task, every arm's per-seed metrics, "
                                                "mean ± std and the paired contrasts here")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args(argv)
    other_seeds = args.other_seeds if args.other_seeds is not None else args.seeds[:3]
    all_names = {a for _, arms, _, _ in TASKS.values() for a, _ in arms}
    unknown = sorted(set(args.arms or []) - all_names)
    if unknown:
        print(f"discl bench replicate: unknown --arms {unknown}; valid: {sorted(all_names)}", file=sys.stderr)
        return 2
    root = Path(__file__).resolve().parents[2] / "configs" / "toy"
    for world in args.worlds:
        for t in args.tasks:
            if not (root / WORLDS[world][t]).is_file():
                print(f"discl bench replicate: --worlds {world}: its {t} config configs/toy/{WORLDS[world][t]} "
                      f"does not exist (valid worlds here: "
                      f"{[w for w in WORLDS if all((root / f).is_file() for f in WORLDS[w].values())]})",
                      file=sys.stderr)
                return 2
    common = [f"run_root={args.run_root}", *args.overrides]
    cache_root = Path(args.run_root) / "replicate" / args.vary
    out: dict = {"vary": args.vary, "seeds": args.seeds, "other_seeds": other_seeds, "overrides": args.overrides,
                 "code": code_version(), "alpha": ALPHA, "power": POWER,
                 "contrast_fields": "mean/std/ci95/p: raw paired t over seeds; p_holm/holm_level/ci_holm/decided: "
                                    "Holm over the world's contrasts; paper/paper_source/agrees_with_paper_sign: "
                                    "the paper's A − B; seeds_for_paper_effect: paired seeds for power "
                                    f"{POWER} at the paper's effect and the measured SD", "worlds": {}}
    t0 = time.perf_counter()
    for world in args.worlds:
        wout = out["worlds"].setdefault(world, {})
        for t in args.tasks:
            task, arms, cols, experiment = TASKS[t]
            arms = [a for a in arms if not args.arms or a[0] in args.arms]
            if not arms:
                continue
            extra = LQ_EXTRA if t == "lq" else []
            rows = run_task(str(root / WORLDS[world][t]), arms, args.seeds, [*common, *extra],
                            f"{experiment}_{world}", args.concurrent, task=task, world=world, vary=args.vary,
                            other_seeds=other_seeds, cache_root=cache_root, collect=args.collect,
                            world_gates=args.world_gates)
            wout[task] = {"config": f"configs/toy/{WORLDS[world][t]}", "arms": summarize(rows, arms, cols),
                          "contrasts": contrasts({task: rows})}
            print(f"\n[{world} world] {TITLES[task]}\n")
            print(table(rows, arms, cols))
        # One Holm family per world: every contrast CONTRASTS defines for the tasks run (those that did not run,
        # e.g. with --arms, count as p = 1: the correction a full run would apply, never a weaker one).
        m = sum(1 for c in CONTRASTS if c[0] in wout)
        family = annotate([c for tout in wout.values() for c in tout["contrasts"]], family=m)
        out.setdefault("holm_family_size", {})[world] = m
        if family:
            print(f"\n[{world} world] paired differences (A − B, same seed; percentage points): raw 95 % "
                  f"t-interval; Holm over the world's {m} contrasts "
                  f"(FWER {ALPHA}); the paper's A − B; seeds a paired t-test needs for the paper's effect at "
                  f"power {POWER:.0%} given the measured SD\n")
            print(contrast_table(family))
    out["seconds"] = round(time.perf_counter() - t0, 1)
    print(f"\n{out['seconds']:.0f} s in all")
    failed = [f"{world} {task}: {arm} seed {s}" for world, w in out["worlds"].items() for task, tout in w.items()
              for arm, a in tout["arms"].items() for s in a["failed_seeds"]]
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1, default=str, ensure_ascii=False))
    if failed:
        print("bench replicate: failed runs (rerun the same command to retry only them):\n  " + "\n  ".join(failed),
              file=sys.stderr)
        return 1
    return 0
