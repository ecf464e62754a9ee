"""Training data: the METADATA of every row a run can touch (ids, labels, splits, λ, sources, hard flags —
no image bytes), and each epoch's training set composed by index from it (Algorithms 1 and 2).

The trainer applies its OWN CLIP threshold (``training.threshold``, None → ``scoring.threshold``) and λ set
(``training.lams``) to the full scores table at load, so sweeps over either never regenerate or rescore.
Every rank reads the same small tables and derives the same epoch sets from seeded generators; the images
of a rank's rows come from ``images.py`` (a bounded cache or a Ray Data stream). Tables are read with
pyarrow.dataset from the stage directory's URI (a local path or e.g. ``s3://…``), only the columns needed.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from discl_ray.errors import MissingInput, UserError
from discl_ray.training.composition import authors_undersample, limit_per_source, uses_real_hard
from discl_ray.training.schedules import REAL_ONLY

log = logging.getLogger(__name__)

EVAL_SPLITS = ("val", "test", "val_ood", "test_ood")
REAL_META = ["image_id", "label", "class_name", "split"]


@dataclass
class Pool:
    """Every row a run can touch, as metadata; epoch sets and eval sets are index arrays into it."""

    image_id: np.ndarray                 # (N,) object: the row's id in its table (canonical or spectrum)
    labels: np.ndarray                   # (N,) int64
    split: np.ndarray                    # (N,) object: train | val | test | val_ood | test_ood | syn
    lam: np.ndarray                      # (N,) float64: 1.0 for real rows, λ for synthetic rows
    source: np.ndarray                   # (N,) object: own image_id for real rows, source_image_id for synthetic
    hard: np.ndarray                     # (N,) bool: real training row listed in the hard-sample table
    num_classes: int
    class_names: list[str]
    tail_labels: set = field(default_factory=set)
    n_bad_images: int = 0
    heldout_sources: set = field(default_factory=set)   # adaptive: the hard sources V's rows come from
    heldout_rows: Optional[np.ndarray] = None          # adaptive: V's rows (indices), the only rows kept out

    def _held(self) -> np.ndarray:
        held = np.zeros(len(self.labels), dtype=bool)
        if self.heldout_rows is not None:
            held[self.heldout_rows] = True
        return held

    def where(self, mask: np.ndarray) -> np.ndarray:
        return np.flatnonzero(mask)

    def subset(self, keep: np.ndarray) -> "Pool":
        """The pool without the rows where ``keep`` is False (undecodable images found by the cache)."""
        return replace(self, image_id=self.image_id[keep], labels=self.labels[keep], split=self.split[keep],
                       lam=self.lam[keep], source=self.source[keep], hard=self.hard[keep],
                       n_bad_images=self.n_bad_images + int((~keep).sum()))

    @property
    def train_real(self) -> np.ndarray:
        """Real training rows, minus the guidance-validation set's rows (V ∩ D_all = ∅, Algorithm 2)."""
        return self.where((self.split == "train") & ~self._held())

    def split_idx(self, name: str) -> np.ndarray:
        return self.where(self.split == name)

    def syn_idx(self, lam: Optional[float] = None, heldout: bool = False) -> np.ndarray:
        """Synthetic rows (at ``lam`` when given) outside V (training), or in V (``heldout``)."""
        mask = self.split == "syn"
        if lam is not None:
            mask &= np.isclose(self.lam, lam)
        held = self._held()
        return self.where(mask & (held if heldout else ~held))

    def class_counts(self, idx: np.ndarray) -> np.ndarray:
        return np.bincount(self.labels[idx], minlength=self.num_classes)


def read_table(uri: str, columns: list[str], filter=None) -> pa.Table:
    """Columns of a stage directory (local path or URI) as one table: its finished ``*.parquet`` files only
    (a stage's ``summary.json``, hidden and temporary files are skipped)."""
    from discl_ray.runtime.storage import as_storage

    d = as_storage(uri)
    try:
        files = stage_files(d)
    except (FileNotFoundError, OSError) as err:
        raise MissingInput(f"no parquet files in {uri} ({err})") from None
    if not files:
        raise MissingInput(f"no parquet files in {uri}")
    dataset = stage_dataset(d, files)
    return dataset.to_table(columns=[c for c in columns if c in dataset.schema.names], filter=filter)


LAM_PARTITIONING = pa.schema([("lam", pa.float64())])


def stage_files(d) -> list:
    """A stage directory's finished parquet files: its own, plus those under ``lam=<value>/`` partitions."""
    out = []
    for f in d.ls(".parquet", recursive=True):
        rel = f.path[len(d.path):].strip("/").split("/")
        if len(rel) == 1 or (len(rel) == 2 and rel[0].startswith("lam=")):
            out.append(f)
    return out


def lam_filter(lams: list[float]):
    """``lam`` within 1e-6 of one of ``lams`` (stored λ may carry float noise); prunes by partition and stats."""
    import pyarrow.dataset as ds

    expr = None
    for v in lams:
        term = (ds.field("lam") >= float(v) - 1e-6) & (ds.field("lam") <= float(v) + 1e-6)
        expr = term if expr is None else expr | term
    return expr


def stage_dataset(d, files):
    """pyarrow dataset of a stage directory's parquet files; a spectrum hive-partitioned by λ
    (``lam=<value>/part-*.parquet``) gets its ``lam`` column from the paths, so a ``lam`` filter prunes whole
    files, and row groups by their statistics in either layout."""
    import pyarrow.dataset as ds

    paths = [f.path for f in files]
    if any("/lam=" in p for p in paths):
        part = ds.partitioning(LAM_PARTITIONING, flavor="hive")
        return ds.dataset(paths, filesystem=d.fs, format="parquet", partitioning=part,
                          partition_base_dir=d.path)
    return ds.dataset(paths, filesystem=d.fs, format="parquet")


def lam_files(uri: str, lams: Optional[list[float]] = None) -> list:
    """Parquet files of a stage directory (recursive); with ``lams``, the files of a λ-partitioned table whose
    ``lam=<value>`` directory is not one of them are left out (a flat table keeps every file)."""
    from discl_ray.runtime.storage import as_storage

    files = stage_files(as_storage(uri))
    if lams is None:
        return files
    want = {round(float(v), 6) for v in lams}
    out = []
    for f in files:
        part = [seg for seg in f.path.split("/") if seg.startswith("lam=")]
        if not part or round(float(part[-1][4:]), 6) in want:
            out.append(f)
    return out


def stage_uris(cfg, paths=None) -> dict[str, str]:
    """Where the images of real and synthetic rows live (the canonical rows and the spectrum)."""
    from discl_ray.runtime.cluster import RunPaths

    paths = paths or RunPaths.from_config(cfg)
    return {"real": str(paths.dataset), "syn": str(paths.stage("generate", "spectrum"))}


def _synthetic_rows(cfg, paths, hard_ids: set) -> pa.Table:
    """Spectrum ⋈ scores, filtered by the trainer's threshold and λ set (λ = 1 is never synthetic)."""
    tc = cfg.training
    lams = [v for v in tc.lams if v < 1.0]
    if tc.strategy == "none" or not lams:
        return pa.table({"image_id": pa.array([], pa.string()), "label": pa.array([], pa.int64()),
                         "lam": pa.array([], pa.float64()), "source_image_id": pa.array([], pa.string())})
    spec_dir, score_dir = str(paths.stage("generate", "spectrum")), str(paths.stage("score", "scores"))
    try:
        # Metadata columns only (never the image bytes); the λ filter prunes a partitioned spectrum's files
        # and, in either layout, row groups whose lam statistics miss the set.
        spec = read_table(spec_dir, ["image_id", "source_image_id", "label", "lam", "seed"],
                          filter=lam_filter(lams))
        scores = read_table(score_dir, ["image_id", "clip_text_cos"])
    except FileNotFoundError as err:
        raise MissingInput(f"training.strategy={tc.strategy} needs the spectrum and its scores: {err} "
                                "(run discl generate and discl score first)") from None
    threshold = tc.threshold if tc.threshold is not None else cfg.scoring.threshold
    if spec.num_rows == 0 or scores.num_rows == 0:
        raise UserError(f"training.strategy={tc.strategy}: the spectrum ({spec.num_rows} rows) or its scores "
                         f"({scores.num_rows} rows) are empty; nothing synthetic to train on")
    joined = spec.join(scores, "image_id", join_type="inner")
    lam_col = pc.round(joined["lam"], 6)
    keep = pc.and_(pc.is_in(lam_col, pa.array([round(v, 6) for v in lams])),
                   pc.greater_equal(joined["clip_text_cos"], threshold))
    keep = pc.and_(keep, pc.is_in(joined["source_image_id"], pa.array(sorted(hard_ids), pa.string())))
    out = limit_per_source(joined.filter(keep), tc.syn_per_source).sort_by("image_id")
    log.info("spectrum: %d of %d scored rows kept (threshold %.3f, λ in %s)", out.num_rows, joined.num_rows,
             threshold, lams)
    return out


def preflight(cfg, paths=None) -> None:
    """Fail in the driver, before any worker starts, when an input table the strategy needs is missing
    (``paths``: the run's locations when the caller has them)."""
    from discl_ray.runtime.cluster import RunPaths
    from discl_ray.runtime.io import parquet_files

    paths = paths or RunPaths.from_config(cfg)
    needed = [] if cfg.training.strategy == "none" else [("mine", paths.stage("mine"), "discl mine")]
    if cfg.training.strategy != "none" and any(v < 1.0 for v in cfg.training.lams):
        needed += [("spectrum", paths.stage("generate", "spectrum"), "discl generate"),
                   ("scores", paths.stage("score", "scores"), "discl score")]
    missing = [f"{what} ({where}; run {cmd} first)" for what, where, cmd in needed if not parquet_files(where)]
    if missing:
        raise MissingInput(f"training.strategy={cfg.training.strategy} needs: " + "; ".join(missing))


def load_pool(cfg, image_size: Optional[int] = None) -> Pool:
    """Read the metadata of the experiment's parquet (real rows, hard samples, spectrum + scores)."""
    import pyarrow.dataset as ds

    from discl_ray.data import materialize
    from discl_ray.runtime.cluster import RunPaths

    paths = RunPaths.from_config(cfg)
    materialize(cfg)
    real = read_table(str(paths.dataset), REAL_META,
                      filter=ds.field("split").isin(list(("train",) + EVAL_SPLITS))).sort_by("image_id")
    try:
        hard_ids = set(read_table(str(paths.stage("mine")), ["image_id"])["image_id"].to_pylist())
    except FileNotFoundError:
        if cfg.training.strategy != "none":
            raise MissingInput(f"training.strategy={cfg.training.strategy} needs the hard-sample table "
                                    f"{paths.stage('mine')} (run discl mine first)") from None
        hard_ids = set()
    syn = _synthetic_rows(cfg, paths, hard_ids)
    return build_pool(cfg, real, hard_ids, syn)


def build_pool(cfg, real: pa.Table, hard_ids: set, syn: pa.Table, image_size: Optional[int] = None) -> Pool:
    """Assemble a :class:`Pool` from canonical rows, hard ids and filtered synthetic rows (metadata only)."""
    ids = real["image_id"].to_pylist()
    labels = np.concatenate([np.asarray(real["label"].to_pylist(), np.int64),
                             np.asarray(syn["label"].to_pylist(), np.int64)])
    split = np.array(real["split"].to_pylist() + ["syn"] * syn.num_rows, dtype=object)
    lam = np.concatenate([np.ones(real.num_rows), np.asarray(syn["lam"].to_pylist(), np.float64)])
    source = np.array(ids + syn["source_image_id"].to_pylist(), dtype=object)
    image_id = np.array(ids + syn["image_id"].to_pylist(), dtype=object)
    hard = np.array([i in hard_ids for i in ids] + [False] * syn.num_rows, dtype=bool) & (split == "train")
    names: dict[int, str] = dict(zip(real["label"].to_pylist(), real["class_name"].to_pylist()))
    num_classes = max(names) + 1 if names else 0
    pool = Pool(image_id=image_id, labels=labels, split=split, lam=lam, source=source, hard=hard,
                num_classes=num_classes, class_names=[names.get(c, str(c)) for c in range(num_classes)])
    pool.tail_labels = tail_labels(cfg, pool)
    return pool


def image_tables(cfg, pool: Pool) -> dict[str, pa.Table]:
    """The image columns of the pool's rows (the in-memory cache path only; small datasets)."""
    import pyarrow.dataset as ds

    uris = stage_uris(cfg)
    syn = pool.split == "syn"
    out = {"real": read_table(uris["real"], ["image_id", "image", "path"],
                              filter=ds.field("image_id").isin(pool.image_id[~syn].tolist()))}
    if syn.any():
        out["syn"] = read_table(uris["syn"], ["image_id", "image"],
                                filter=ds.field("image_id").isin(pool.image_id[syn].tolist()))
    return out


def class_groups(cfg, counts: np.ndarray) -> dict[int, str]:
    """many / medium / few per class from training counts (mining.few_max, mining.many_min)."""
    few, many = cfg.mining.few_max, cfg.mining.many_min
    return {c: ("few" if n < few else "many" if n >= many else "medium") for c, n in enumerate(counts)}


def tail_labels(cfg, pool: Pool) -> set:
    """Tail classes: labels of the hard rows (frequency mining), else the 'few' group by training counts."""
    hard_labels = set(pool.labels[pool.hard].tolist())
    if hard_labels:
        return hard_labels
    groups = class_groups(cfg, pool.class_counts(pool.split_idx("train")))
    return {c for c, g in groups.items() if g == "few"}


def target_tail_ratio(cfg, pool: Pool) -> float:
    """Tail : non-tail sample ratio kept at every stage (A.3.1).

    The paper keeps it at "the proportion of tail classes ... in the original data (13.6%)": for ImageNet-LT
    136 of 1000 classes are few-shot, so the computed default is #tail classes / #classes; set
    ``training.tail_ratio`` to use another value."""
    if cfg.training.tail_ratio is not None:
        return float(cfg.training.tail_ratio)
    present = np.flatnonzero(pool.class_counts(pool.split_idx("train")) > 0)
    if not len(present) or not pool.tail_labels:
        return math.inf
    return len(pool.tail_labels & set(present.tolist())) / len(present)


def undersample_to_ratio(tail: np.ndarray, nontail: np.ndarray, ratio: float, rng: np.random.Generator,
                         keep_first: Optional[np.ndarray] = None) -> np.ndarray:
    """Subsample so that |tail| / |non-tail| == ``ratio`` (rounded), undersampling non-tail rows.

    When there are too few non-tail rows for that (ratio already below target), tail rows are subsampled
    instead, keeping ``keep_first`` (the real hard images) before synthetic ones."""
    if not math.isfinite(ratio) or ratio <= 0 or len(tail) == 0 or len(nontail) == 0:
        return np.concatenate([tail, nontail])
    want_nontail = int(round(len(tail) / ratio))
    if want_nontail <= len(nontail):
        nontail = rng.choice(nontail, size=max(want_nontail, 1), replace=False)
    else:
        want_tail = max(1, int(round(ratio * len(nontail))))
        first = np.intersect1d(tail, keep_first) if keep_first is not None else np.array([], np.int64)
        rest = np.setdiff1d(tail, first)
        first = rng.permutation(first)[:want_tail]
        tail = np.concatenate([first, rng.choice(rest, size=want_tail - len(first), replace=False)])
    return np.concatenate([tail, nontail]).astype(np.int64)


def epoch_indices(cfg, pool: Pool, lam: float, rng: np.random.Generator) -> np.ndarray:
    """Training rows of one epoch at λ (REAL_ONLY = −1, NaN = all levels), sorted and de-duplicated."""
    task, tc = cfg.training.task, cfg.training
    train = pool.train_real
    hard = train[pool.hard[train]]
    nonhard = train[~pool.hard[train]]
    if lam == REAL_ONLY:
        # Algorithm 1 lines 7-9 (D_nh ∪ D_h) and Algorithm 2 lines 11-12 (D_all): all real training rows.
        chosen = train
    else:
        if math.isnan(lam):          # all_level: every λ of the set mixed
            syn = pool.syn_idx()
            if 1.0 in tc.lams:
                syn = np.concatenate([syn, hard])
        elif lam >= 1.0:             # λ = 1: the real hard images are the "spectrum" at this level
            syn = hard
        else:
            syn = pool.syn_idx(lam)
        if task == "long_tail":
            # Algorithm 1 line 4: D_e = S_λ ∪ D_nh ∪ D_h (D_h optional via training.use_real_hard; fixed-λ and
            # text-only stages never take it, §5).
            parts = [syn, nonhard] + ([hard] if uses_real_hard(tc) else [])
        else:
            # Algorithm 2 line 8: D_e = S_λ ∪ D_nh.
            parts = [syn, nonhard]
        chosen = np.unique(np.concatenate(parts).astype(np.int64))
    chosen = np.unique(chosen.astype(np.int64))
    if task == "long_tail" and tc.keep_tail_ratio and (tc.tail_ratio_stages == "all" or lam != REAL_ONLY):
        is_tail = np.isin(pool.labels[chosen], sorted(pool.tail_labels))
        if tc.tail_ratio_rule == "authors":
            chosen = np.sort(authors_undersample(chosen[is_tail], chosen[~is_tail], target_tail_ratio(cfg, pool),
                                                 tc.authors_nontail_keep, rng, keep_first=hard))
        else:
            chosen = np.sort(undersample_to_ratio(chosen[is_tail], chosen[~is_tail], target_tail_ratio(cfg, pool),
                                                  rng, keep_first=hard))
    return chosen


def guidance_val_sources(cfg, pool: Pool, rng: np.random.Generator) -> set:
    """The hard sources V is drawn from: their real images are V at λ = 1, one synthetic sibling per λ < 1.

    Rule (``docs/fidelity.md``, "Guidance-validation set"): a source qualifies when it has a synthetic row at
    every λ < 1 of ``training.lams`` (so every level of V has one row per source: equal sizes). Class ``c``
    with ``n_c`` real hard training images gives at most ``min(⌊guidance_val_fraction · n_c⌋, n_c − 1)`` of
    them, so V never takes all of a class's real hard images (a class with one keeps it), and in all at most
    ``guidance_val_size`` sources (= rows per λ), taken round-robin over the classes so V spans them. When
    every class's share rounds down to zero, one source of the class with the most hard images (≥ 2) is held
    out, so V is never empty when it can be filled. The paper's |V| = 2,000 per λ on iWildCam (8,260 hard
    images) binds through the share cap (25 %); small data binds through the share too."""
    tc = cfg.training
    syn_lams = sorted({float(v) for v in tc.lams if v < 1.0})
    syn = pool.split == "syn"
    covered = None
    for lam in syn_lams:
        at = set(pool.source[syn & np.isclose(pool.lam, lam)].astype(str).tolist())
        covered = at if covered is None else covered & at
    covered = covered or set()
    if len(covered) < 2:
        raise UserError(f"adaptive strategy needs at least 2 hard sources with synthetic rows at every λ < 1 of "
                         f"training.lams (got {len(covered)}); lower training.threshold or generate more")
    hard_real = pool.where(pool.hard & (pool.split == "train"))
    label_of = dict(zip(pool.source[hard_real].tolist(), pool.labels[hard_real].tolist()))
    n_hard = np.bincount(pool.labels[hard_real], minlength=pool.num_classes)
    per_class: dict[int, list] = {}
    for src in sorted(covered & set(label_of)):
        per_class.setdefault(int(label_of[src]), []).append(src)
    allowed = {c: min(int(math.floor(tc.guidance_val_fraction * n_hard[c] + 1e-9)), int(n_hard[c]) - 1, len(srcs))
               for c, srcs in per_class.items()}
    if not any(allowed.values()):
        fillable = [c for c, srcs in per_class.items() if n_hard[c] >= 2 and srcs]
        if not fillable:
            raise UserError("adaptive strategy: no class has 2 or more hard images with synthetic rows, so a "
                             "guidance-validation set would take a class's only hard image; mine more hard "
                             "samples or use a non-adaptive training.strategy")
        top = max(fillable, key=lambda c: (n_hard[c], -c))
        allowed[top] = 1
    queues = {c: list(rng.permutation(np.array(per_class[c], dtype=object))[:k]) for c, k in allowed.items() if k}
    order = [int(c) for c in rng.permutation(np.array(sorted(queues)))]
    held: list = []
    while len(held) < tc.guidance_val_size and any(queues.values()):
        for c in order:
            if queues[c] and len(held) < tc.guidance_val_size:
                held.append(queues[c].pop(0))
    return set(held)


def choose_guidance_val(cfg, pool: Pool, rng: np.random.Generator) -> dict[float, np.ndarray]:
    """Algorithm 2's guidance-validation set V: per λ, the same number of spectrum rows, none in training.

    For the sources of :func:`guidance_val_sources`, V at λ = 1 holds their real (original) images and V at
    each λ < 1 one of their synthetic rows at that λ, drawn at random among its seeds: every level has one
    row per source, so the per-λ gains are means over equally many, paired images. Exactly V's rows leave
    the training data (``Pool.heldout_rows``): V ∩ D_all = ∅, and a source's other synthetic rows still
    train."""
    tc = cfg.training
    sources = guidance_val_sources(cfg, pool, rng)
    order = sorted(sources)
    val: dict[float, np.ndarray] = {}
    for lam in sorted({float(v) for v in tc.lams}):
        if lam >= 1.0:
            cand = pool.where((pool.split == "train") & pool.hard)
        else:
            cand = pool.where((pool.split == "syn") & np.isclose(pool.lam, lam))
        by_source: dict = {}
        for i in cand:
            by_source.setdefault(pool.source[i], []).append(int(i))
        val[lam] = np.array(sorted(int(rng.choice(by_source[s])) for s in order), dtype=np.int64)
    pool.heldout_sources = set(sources)
    pool.heldout_rows = np.unique(np.concatenate(list(val.values()))) if val else np.array([], np.int64)
    return val


def shard(idx: np.ndarray, rank: int, world: int) -> np.ndarray:
    """Rank's equal slice of a shuffled index list (the remainder is dropped so every rank runs the same
    number of batches, which DDP's collective backward needs)."""
    per_rank = len(idx) // world
    return idx[rank * per_rank:(rank + 1) * per_rank]
