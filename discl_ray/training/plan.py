"""`discl train --plan`: each epoch's λ and row counts, from metadata only, without training.

The plan runs the trainer's own rules - the selector schedule (``schedules.scheduled_lam``), the epoch
composition (``data.epoch_indices``, tail-ratio undersampling included) and the same seeded generators - on a
:class:`~discl_ray.training.data.Pool` that holds labels, splits and sources but no pixels, so its counts are
the counts a run trains on. Inputs, in order of preference:

* canonical rows (materialized from the dataset; a real dataset must be on disk);
* the hard-sample table (``mine/``); frequency mining is recomputed from the rows when it is missing;
* the CLIP-filtered spectrum (``generate/`` + ``score/``); before generation, the synthetic rows a full
  spectrum would hold (every hard source × λ × seed, before the CLIP filter) and the plan says ``estimated``.

An adaptive run picks λ while it trains: its curriculum epochs list the counts for every candidate λ.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from discl_ray.errors import MissingInput
from discl_ray.runtime.io import read_parquet_dir, stable_seed
from discl_ray.training import data as D
from discl_ray.training.composition import limit_per_source
from discl_ray.training.schedules import ALL_LEVELS, REAL_ONLY, scheduled_lam

FIELDS = ("epoch", "lam", "n_syn", "n_real_tail", "n_real_nontail", "n_total")


@dataclass
class Plan:
    epochs: list[dict[str, Any]]
    estimated: bool            # synthetic counts from the generation plan, before the CLIP filter
    tail_ratio: float          # target tail:non-tail (inf when not undersampling)
    n_real_train: int          # real training rows a real-only epoch can use
    guidance_val: Optional[dict[str, int]] = None   # adaptive: V's rows per λ (equal; kept out of training)


def _hard_ids(cfg, paths, train: pa.Table) -> set:
    try:
        return set(read_parquet_dir(paths.stage("mine"), ["image_id"])["image_id"].to_pylist())
    except FileNotFoundError:
        pass
    if cfg.training.strategy == "none":
        return set()
    if cfg.mining.mode == "frequency":
        from discl_ray.mining.select import mine_frequency

        return set(mine_frequency(train, cfg.mining)["image_id"].to_pylist())
    raise MissingInput(f"mining.mode=confidence: the plan needs the hard-sample table {paths.stage('mine')} "
                            "(run discl mine first)")


def _synthetic_meta(cfg, paths, hard: pa.Table) -> tuple[pa.Table, bool]:
    """(source_image_id, label, lam) of the synthetic rows training would load; True when estimated."""
    tc = cfg.training
    lams = [v for v in tc.lams if v < 1.0]
    empty = pa.table({"source_image_id": pa.array([], pa.string()), "label": pa.array([], pa.int64()),
                      "lam": pa.array([], pa.float64())})
    if tc.strategy == "none" or not lams:
        return empty, False
    try:
        spec = read_parquet_dir(paths.stage("generate", "spectrum"),
                                ["image_id", "source_image_id", "label", "lam", "seed"])
        scores = read_parquet_dir(paths.stage("score", "scores"), ["image_id", "clip_text_cos"])
    except FileNotFoundError:
        spec = None
    ids = pa.array(sorted(hard["image_id"].to_pylist()), pa.string())
    if spec is None or spec.num_rows == 0:
        gen = [v for v in lams if any(math.isclose(v, g) for g in cfg.generation.lams)]
        per = len(cfg.generation.seeds) if tc.syn_per_source is None else min(tc.syn_per_source,
                                                                               len(cfg.generation.seeds))
        n = hard.num_rows * len(gen) * per
        return pa.table({"source_image_id": pa.array(np.repeat(np.array(hard["image_id"].to_pylist(), object),
                                                               len(gen) * per), pa.string()),
                         "label": pa.array(np.repeat(np.array(hard["label"].to_pylist(), np.int64), len(gen) * per), pa.int64()),
                         "lam": pa.array(np.tile(np.repeat(gen, per), hard.num_rows)[:n], pa.float64())}), True
    threshold = tc.threshold if tc.threshold is not None else cfg.scoring.threshold
    joined = spec.join(scores, "image_id", join_type="inner")
    keep = pc.and_(pc.is_in(pc.round(joined["lam"], 6), pa.array([round(v, 6) for v in lams])),
                   pc.greater_equal(joined["clip_text_cos"], threshold))
    keep = pc.and_(keep, pc.is_in(joined["source_image_id"], ids))
    out = limit_per_source(joined.filter(keep), tc.syn_per_source).sort_by("image_id")
    return out.select(["image_id", "source_image_id", "label", "lam"]), False


def metadata_pool(cfg) -> tuple[D.Pool, bool]:
    """A pixel-free :class:`Pool` of the experiment (real train rows + synthetic rows) and the estimate flag."""
    from discl_ray.data import read_rows
    from discl_ray.runtime.cluster import RunPaths

    paths = RunPaths.from_config(cfg)
    real = read_rows(cfg, ("train",)).sort_by("image_id")
    hard_ids = _hard_ids(cfg, paths, real)
    hard = real.filter(pc.is_in(real["image_id"], pa.array(sorted(hard_ids), pa.string())))
    syn, estimated = _synthetic_meta(cfg, paths, hard)
    ids = real["image_id"].to_pylist()
    labels = np.concatenate([np.asarray(real["label"].to_pylist(), np.int64),
                             np.asarray(syn["label"].to_pylist(), np.int64)])
    split = np.array(["train"] * real.num_rows + ["syn"] * syn.num_rows, dtype=object)
    names = dict(zip(real["label"].to_pylist(), real["class_name"].to_pylist()))
    num_classes = max(names) + 1 if names else 0
    syn_ids = syn["image_id"].to_pylist() if "image_id" in syn.column_names else [None] * syn.num_rows
    pool = D.Pool(image_id=np.array(ids + syn_ids, dtype=object), labels=labels, split=split,
                  lam=np.concatenate([np.ones(real.num_rows), np.asarray(syn["lam"].to_pylist(), np.float64)]),
                  source=np.array(ids + syn["source_image_id"].to_pylist(), dtype=object),
                  hard=np.array([i in hard_ids for i in ids] + [False] * syn.num_rows, dtype=bool),
                  num_classes=num_classes, class_names=[names.get(c, str(c)) for c in range(num_classes)])
    pool.tail_labels = D.tail_labels(cfg, pool)
    return pool, estimated


def _counts(cfg, pool: D.Pool, idx: np.ndarray) -> dict[str, int]:
    is_syn = pool.split[idx] == "syn"
    # Long-tail: tail = the tail classes; low-quality: the real hard images (there are no tail classes).
    if cfg.training.task == "long_tail":
        tail = np.isin(pool.labels[idx], sorted(pool.tail_labels))
    else:
        tail = pool.hard[idx]
    return {"n_syn": int(is_syn.sum()), "n_real_tail": int((~is_syn & tail).sum()),
            "n_real_nontail": int((~is_syn & ~tail).sum()), "n_total": int(len(idx))}


def _lam_out(lam: float) -> Optional[float]:
    return None if lam == REAL_ONLY or math.isnan(lam) else float(lam)


def build_plan(cfg) -> Plan:
    """Every epoch of ``cfg``'s run: λ, stage and row counts (see module docstring)."""
    tc = cfg.training
    pool, estimated = metadata_pool(cfg)
    rng_for = lambda *parts: np.random.default_rng(stable_seed(tc.seed, *parts))  # noqa: E731 - as Worker._rng
    v_sizes = None
    if tc.strategy == "adaptive":
        val = D.choose_guidance_val(cfg, pool, np.random.default_rng(stable_seed("V", tc.seed)))
        v_sizes = {f"{lam:g}": int(len(idx)) for lam, idx in val.items()}
    epochs = []
    for epoch in range(tc.epochs):
        row: dict[str, Any] = {"epoch": epoch}
        if tc.strategy == "adaptive" and epoch < tc.curriculum_epochs:
            cands = {}
            for lam in tc.lams:
                cands[f"{lam:g}"] = _counts(cfg, pool, D.epoch_indices(cfg, pool, float(lam), rng_for("epoch-set", epoch)))
            # λ is chosen while training: the row shows the largest candidate (the epoch's upper bound).
            row.update(lam=None, stage="adaptive", candidates=cands,
                       **max(cands.values(), key=lambda c: c["n_total"]))
        else:
            lam = scheduled_lam(tc.strategy, epoch, epochs=tc.epochs, curriculum_epochs=tc.curriculum_epochs,
                                lams=tc.lams, fixed_lam=tc.fixed_lam, seed=tc.seed) if tc.strategy != "adaptive" \
                else REAL_ONLY
            stage = "real_only" if lam == REAL_ONLY else "all_levels" if math.isnan(lam) else "curriculum"
            row.update(lam=_lam_out(lam), stage=stage,
                       **_counts(cfg, pool, D.epoch_indices(cfg, pool, lam, rng_for("epoch-set", epoch))))
        epochs.append(row)
    ratio = D.target_tail_ratio(cfg, pool) if tc.task == "long_tail" and tc.keep_tail_ratio else math.inf
    return Plan(epochs=epochs, estimated=estimated, tail_ratio=ratio, n_real_train=int(len(pool.train_real)),
                guidance_val=v_sizes)


def format_plan(cfg, plan: Plan) -> str:
    tc = cfg.training
    head = (f"plan: {cfg.experiment} strategy={tc.strategy} epochs={tc.epochs} E_CL={tc.curriculum_epochs} "
            f"real training rows={plan.n_real_train}")
    if math.isfinite(plan.tail_ratio):
        head += f" tail ratio={plan.tail_ratio:.3f} ({tc.tail_ratio_rule}, stages: {tc.tail_ratio_stages})"
    lines = [head]
    if plan.guidance_val:
        sizes = ", ".join(f"λ={k}: {v}" for k, v in plan.guidance_val.items())
        lines.append(f"guidance-validation set V (kept out of training; the originals at λ=1): {sizes}; "
                     f"random-real probe set D: {min(tc.random_real_size, plan.n_real_train)} rows per "
                     "curriculum epoch")
    if plan.estimated:
        lines.append("synthetic counts are estimated: hard images × λ × seeds before the CLIP filter "
                     "(run discl generate and discl score for exact counts)")
    lines.append(f"{'epoch':>5} {'lam':>6} {'stage':<10} {'n_syn':>8} {'real_tail':>9} {'real_nontail':>12} "
                 f"{'total':>8}")
    for e in plan.epochs:
        lam = "-" if e["lam"] is None else f"{e['lam']:g}"
        lines.append(f"{e['epoch']:>5} {lam:>6} {e['stage']:<10} {e['n_syn']:>8} {e['n_real_tail']:>9} "
                     f"{e['n_real_nontail']:>12} {e['n_total']:>8}")
        for lam_c, c in e.get("candidates", {}).items():
            lines.append(f"{'':>5} {lam_c:>6} {'candidate':<10} {c['n_syn']:>8} {c['n_real_tail']:>9} "
                         f"{c['n_real_nontail']:>12} {c['n_total']:>8}")
    return "\n".join(lines)


def write_plan_json(plan: Plan, path: str | Path) -> Path:
    """The list of epochs ``{epoch, lam, n_syn, n_real_tail, n_real_nontail, n_total}`` (+ stage, candidates)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(plan.epochs, indent=1))
    return path


def run_plan(cfg, json_path: Optional[str] = None) -> int:
    """The CLI body of ``discl train --plan``: print the plan (and write it as JSON); 2 on bad input."""
    import sys

    from discl_ray.data.loaders import DatasetError

    try:
        plan = build_plan(cfg)
    except (FileNotFoundError, ValueError, DatasetError) as err:
        print(f"discl train: {err}", file=sys.stderr)
        return 2
    print(format_plan(cfg, plan))
    if cfg.training.init_from:       # Algorithm 1 starts from the baseline: say whether it exists yet
        from discl_ray.training.init_from import resolve_checkpoint

        try:
            print(f"starts from {cfg.training.init_from}: {resolve_checkpoint(cfg, cfg.training.init_from)}")
        except (FileNotFoundError, ValueError) as err:
            print(f"starts from {cfg.training.init_from}: not available yet ({err})")
    if json_path:
        print(f"wrote {write_plan_json(plan, json_path)}")
    return 0


__all__ = ["ALL_LEVELS", "FIELDS", "Plan", "build_plan", "format_plan", "metadata_pool", "run_plan", "write_plan_json"]
