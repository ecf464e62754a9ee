"""Training data: load real rows, hard samples and the CLIP-filtered spectrum once, then compose each
epoch's training set by index (Algorithms 1 and 2) without copying images.

The trainer applies its OWN CLIP threshold (``training.threshold``, None → ``scoring.threshold``) and λ set
(``training.lams``) to the full scores table at load, so sweeps over either never regenerate or rescore.
Images are decoded once per worker into a uint8 tensor; undecodable images are dropped and counted
(``n_bad_images``), never fatal.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from discl_ray.io import ImageLoadError, load_image, read_parquet_dir
from discl_ray.training.composition import authors_undersample, limit_per_source, uses_real_hard
from discl_ray.training.schedules import REAL_ONLY

log = logging.getLogger(__name__)

EVAL_SPLITS = ("val", "test", "val_ood", "test_ood")


@dataclass
class Pool:
    """Every image a run can touch, decoded once; epoch sets and eval sets are index arrays into it."""

    images: torch.Tensor                 # (N, 3, S, S) uint8
    labels: np.ndarray                   # (N,) int64
    split: np.ndarray                    # (N,) object: train | val | test | val_ood | test_ood | syn
    lam: np.ndarray                      # (N,) float64: 1.0 for real rows, λ for synthetic rows
    source: np.ndarray                   # (N,) object: own image_id for real rows, source_image_id for synthetic
    hard: np.ndarray                     # (N,) bool: real training row listed in the hard-sample table
    num_classes: int
    class_names: list[str]
    tail_labels: set = field(default_factory=set)
    n_bad_images: int = 0
    heldout_sources: set = field(default_factory=set)   # adaptive: sources whose spectrum forms V

    def where(self, mask: np.ndarray) -> np.ndarray:
        return np.flatnonzero(mask)

    @property
    def train_real(self) -> np.ndarray:
        """Real training rows, minus held-out guidance-validation sources (V ∩ D_all = ∅, Algorithm 2)."""
        held = np.array([s in self.heldout_sources for s in self.source]) if self.heldout_sources else False
        return self.where((self.split == "train") & ~held)

    def split_idx(self, name: str) -> np.ndarray:
        return self.where(self.split == name)

    def syn_idx(self, lam: Optional[float] = None, heldout: bool = False) -> np.ndarray:
        """Synthetic rows (at ``lam`` when given) of training sources, or of the held-out V sources."""
        mask = self.split == "syn"
        if lam is not None:
            mask &= np.isclose(self.lam, lam)
        held = np.array([s in self.heldout_sources for s in self.source], dtype=bool)
        return self.where(mask & (held if heldout else ~held))

    def class_counts(self, idx: np.ndarray) -> np.ndarray:
        return np.bincount(self.labels[idx], minlength=self.num_classes)


def _decode(rows: pa.Table, size: int, root: Optional[str]) -> tuple[list[np.ndarray], list[int]]:
    """Decode every row's image to (3, size, size) uint8; returns arrays and the indices that decoded."""
    from PIL import Image

    images = rows.column("image").to_pylist() if "image" in rows.column_names else [None] * rows.num_rows
    paths = rows.column("path").to_pylist() if "path" in rows.column_names else [None] * rows.num_rows
    out, ok = [], []
    for i, (img_bytes, path) in enumerate(zip(images, paths)):
        try:
            img = load_image(img_bytes, path, root=root)
        except ImageLoadError as err:
            log.warning("skipping undecodable image %d: %s", i, err)
            continue
        if img.size != (size, size):
            img = img.resize((size, size), Image.BILINEAR)
        out.append(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy())
        ok.append(i)
    return out, ok


def _synthetic_rows(cfg, paths, hard_ids: set) -> pa.Table:
    """Spectrum ⋈ scores, filtered by the trainer's threshold and λ set (λ = 1 is never synthetic)."""
    tc = cfg.training
    lams = [v for v in tc.lams if v < 1.0]
    if tc.strategy == "none" or not lams:
        return pa.table({"image": pa.array([], pa.binary()), "label": pa.array([], pa.int64()),
                         "lam": pa.array([], pa.float64()), "source_image_id": pa.array([], pa.string())})
    spec_dir, score_dir = paths.stage("generate", "spectrum"), paths.stage("score", "scores")
    try:
        spec = read_parquet_dir(spec_dir, ["image_id", "source_image_id", "label", "lam", "seed", "image"])
        scores = read_parquet_dir(score_dir, ["image_id", "clip_text_cos"])
    except FileNotFoundError as err:
        raise FileNotFoundError(f"training.strategy={tc.strategy} needs the spectrum and its scores: {err} "
                                "(run discl generate and discl score first)") from None
    threshold = tc.threshold if tc.threshold is not None else cfg.scoring.threshold
    if spec.num_rows == 0 or scores.num_rows == 0:
        raise ValueError(f"training.strategy={tc.strategy}: the spectrum ({spec.num_rows} rows) or its scores "
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


def preflight(cfg) -> None:
    """Fail in the driver, before any worker starts, when an input table the strategy needs is missing."""
    from discl_ray.io import parquet_files
    from discl_ray.runtime import RunPaths

    paths = RunPaths.from_config(cfg)
    needed = [] if cfg.training.strategy == "none" else [("mine", paths.stage("mine"), "discl mine")]
    if cfg.training.strategy != "none" and any(v < 1.0 for v in cfg.training.lams):
        needed += [("spectrum", paths.stage("generate", "spectrum"), "discl generate"),
                   ("scores", paths.stage("score", "scores"), "discl score")]
    missing = [f"{what} ({where}; run {cmd} first)" for what, where, cmd in needed if not parquet_files(where)]
    if missing:
        raise FileNotFoundError(f"training.strategy={cfg.training.strategy} needs: " + "; ".join(missing))


def load_pool(cfg, image_size: Optional[int] = None) -> Pool:
    """Read the experiment's parquet (real rows, hard samples, spectrum + scores) and decode it once."""
    from discl_ray.data import read_rows
    from discl_ray.runtime import RunPaths

    paths = RunPaths.from_config(cfg)
    real = read_rows(cfg, ("train",) + EVAL_SPLITS).sort_by("image_id")
    try:
        hard = read_parquet_dir(paths.stage("mine"), ["image_id", "label"])
        hard_ids = set(hard["image_id"].to_pylist())
    except FileNotFoundError:
        if cfg.training.strategy != "none":
            raise FileNotFoundError(f"training.strategy={cfg.training.strategy} needs the hard-sample table "
                                    f"{paths.stage('mine')} (run discl mine first)") from None
        hard_ids = set()
    syn = _synthetic_rows(cfg, paths, hard_ids)
    return build_pool(cfg, real, hard_ids, syn, image_size)


def build_pool(cfg, real: pa.Table, hard_ids: set, syn: pa.Table, image_size: Optional[int] = None) -> Pool:
    """Assemble a :class:`Pool` from canonical rows, hard ids and filtered synthetic rows (tests call this)."""
    size = image_size or cfg.training.image_size or cfg.dataset.image_size
    r_imgs, r_ok = _decode(real, size, cfg.dataset.root)
    s_imgs, s_ok = _decode(syn, size, None)
    real_ok, syn_ok = real.take(pa.array(r_ok, pa.int64())), syn.take(pa.array(s_ok, pa.int64()))
    labels = np.concatenate([np.asarray(real_ok["label"].to_pylist(), np.int64),
                             np.asarray(syn_ok["label"].to_pylist(), np.int64)])
    ids = real_ok["image_id"].to_pylist()
    split = np.array(real_ok["split"].to_pylist() + ["syn"] * syn_ok.num_rows, dtype=object)
    lam = np.concatenate([np.ones(real_ok.num_rows), np.asarray(syn_ok["lam"].to_pylist(), np.float64)])
    source = np.array(ids + syn_ok["source_image_id"].to_pylist(), dtype=object)
    hard = np.array([i in hard_ids for i in ids] + [False] * syn_ok.num_rows, dtype=bool) & (split == "train")
    names: dict[int, str] = dict(zip(real["label"].to_pylist(), real["class_name"].to_pylist()))
    num_classes = max(names) + 1 if names else 0
    images = torch.from_numpy(np.stack(r_imgs + s_imgs)) if (r_imgs or s_imgs) else torch.zeros(0, 3, size, size,
                                                                                                 dtype=torch.uint8)
    pool = Pool(images=images, labels=labels, split=split, lam=lam, source=source, hard=hard,
                num_classes=num_classes, class_names=[names.get(c, str(c)) for c in range(num_classes)],
                n_bad_images=(real.num_rows - len(r_ok)) + (syn.num_rows - len(s_ok)))
    pool.tail_labels = tail_labels(cfg, pool)
    return pool


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


def choose_guidance_val(cfg, pool: Pool, rng: np.random.Generator) -> dict[float, np.ndarray]:
    """Algorithm 2's guidance-validation set V: per λ, spectrum rows of hard sources held out of training.

    Held-out sources lose their real image and every synthetic row from the training data, so V has zero
    overlap with D_all. Up to ``guidance_val_size`` rows per λ, at most ``guidance_val_fraction`` of sources."""
    tc = cfg.training
    sources = np.array(sorted(set(pool.source[pool.split == "syn"].tolist())), dtype=object)
    if len(sources) < 2:
        raise ValueError(f"adaptive strategy needs synthetic rows of at least 2 hard sources (got {len(sources)}); "
                         "lower training.threshold or generate more")
    per_source = max(1, int(np.max(np.unique(pool.source[pool.split == "syn"], return_counts=True)[1]))
                     // max(1, len([v for v in tc.lams if v < 1.0])))
    n_held = min(math.ceil(tc.guidance_val_size / per_source),
                 max(1, int(tc.guidance_val_fraction * len(sources))))
    pool.heldout_sources = set(rng.permutation(sources)[:n_held].tolist())
    val: dict[float, np.ndarray] = {}
    for lam in tc.lams:
        if lam >= 1.0:
            idx = pool.where((pool.split == "train") & pool.hard
                             & np.array([s in pool.heldout_sources for s in pool.source], dtype=bool))
        else:
            idx = pool.syn_idx(lam, heldout=True)
        if len(idx) > tc.guidance_val_size:
            idx = np.sort(rng.choice(idx, tc.guidance_val_size, replace=False))
        val[float(lam)] = idx
    return val


def shard(idx: np.ndarray, rank: int, world: int) -> np.ndarray:
    """Rank's equal slice of a shuffled index list (the remainder is dropped so every rank runs the same
    number of batches, which DDP's collective backward needs)."""
    per_rank = len(idx) // world
    return idx[rank * per_rank:(rank + 1) * per_rank]
