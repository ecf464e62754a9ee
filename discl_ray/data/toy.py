"""The built-in toy world: scikit-learn's bundled 8×8 digits, upsampled, split deterministically by seed.

* ``world``  — about half of the digits, kept for pre-training the toy generator, CLIP and judge classifier
  (stands in for internet-scale pre-training; never used by the downstream tasks).
* ``digits_lt`` — a long-tailed training set over the task half (n_c = n_max · r^(−c/(C−1)), class 0 the head),
  with balanced val (model selection) and test (reporting) splits.
* ``digits_lq`` — low-quality digits: each task image gets one corruption style (its domain); ID styles make the
  train / val / test splits, unseen OOD styles make ``test_ood``.
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
from PIL import Image, ImageFilter

from discl_ray.data.looks import apply_look
from discl_ray.errors import UserError
from discl_ray.runtime.io import png_bytes

if TYPE_CHECKING:
    from discl_ray.config import DatasetConfig

NUM_CLASSES = 10
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@lru_cache(maxsize=4)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images.astype(np.float32) / 16.0, d.target.astype(np.int64)


def _split_indices(seed: int, world_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Stratified world/task split of the 1,797 digits (sorted indices)."""
    _, y = _digits()
    rng = np.random.default_rng(seed)
    world, task = [], []
    for c in range(NUM_CLASSES):
        idx = rng.permutation(np.flatnonzero(y == c))
        k = int(round(len(idx) * world_fraction))
        world.append(idx[:k])
        task.append(idx[k:])
    return np.sort(np.concatenate(world)), np.sort(np.concatenate(task))


def upsample(images: np.ndarray, size: int) -> np.ndarray:
    """(N, 8, 8) floats in [0, 1] → (N, size, size, 3) uint8, bilinear, gray replicated to RGB."""
    out = np.empty((len(images), size, size, 3), dtype=np.uint8)
    for i, im in enumerate(images):
        pil = Image.fromarray((im * 255).round().astype(np.uint8), mode="L").resize((size, size), Image.BILINEAR)
        out[i] = np.repeat(np.asarray(pil)[..., None], 3, axis=2)
    return out


def world_arrays(seed: int = 0, image_size: int = 32, world_fraction: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """The world split as (images uint8 (N, S, S, 3), labels int64 (N,))."""
    x, y = _digits()
    world, _ = _split_indices(seed, world_fraction)
    return upsample(x[world], image_size), y[world]


def task_arrays(seed: int = 0, image_size: int = 32, world_fraction: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """The task half (everything not in the world split) as (images uint8 (N, S, S, 3), labels int64 (N,))."""
    x, y = _digits()
    _, task = _split_indices(seed, world_fraction)
    return upsample(x[task], image_size), y[task]


def lt_counts(n_max: int, ratio: float, num_classes: int = NUM_CLASSES) -> list[int]:
    """Exponential long-tail profile n_c = round(n_max · ratio^(−c/(C−1))), at least 1.

    Rounded (not floored as in CIFAR-LT) so that the tiny toy tail keeps n_max / n_min close to ``ratio``."""
    return [max(1, round(n_max * ratio ** (-c / (num_classes - 1)))) for c in range(num_classes)]


def _rows(ids, images, labels, split, domains) -> dict[str, list]:
    return {
        "image_id": list(ids),
        "image": [png_bytes(im) for im in images],
        "path": [None] * len(ids),
        "label": [int(v) for v in labels],
        "class_name": [DIGIT_NAMES[int(v)] for v in labels],
        "split": [split] * len(ids),
        "domain": list(domains),
    }


def _table(parts: list[dict[str, list]]) -> pa.Table:
    cols = {k: sum((p[k] for p in parts), []) for k in parts[0]}
    from discl_ray.data import CANONICAL_SCHEMA

    return pa.table(cols, schema=CANONICAL_SCHEMA)


def partition_seed(cfg: "DatasetConfig") -> int:
    """Seed of the world/task partition: ``toy.world_seed`` when set, else ``dataset.seed``."""
    return cfg.seed if cfg.toy.world_seed is None else cfg.toy.world_seed


def load_world(cfg: "DatasetConfig") -> pa.Table:
    """Canonical rows of the world split (split = 'world')."""
    x, y = _digits()
    world, _ = _split_indices(partition_seed(cfg), cfg.toy.world_fraction)
    ims = upsample(x[world], cfg.image_size)
    return _table([_rows([f"digits-{i}" for i in world], ims, y[world], "world", [""] * len(world))])


def load_digits_lt(cfg: "DatasetConfig") -> pa.Table:
    """digits-LT: long-tailed train, balanced val and test, from the task half."""
    t = cfg.toy
    x, y = _digits()
    _, task = _split_indices(partition_seed(cfg), t.world_fraction)
    rng = np.random.default_rng(cfg.seed + 1)
    counts = lt_counts(t.n_max, cfg.imbalance_ratio)
    parts = {"train": [], "val": [], "test": []}
    for c in range(NUM_CLASSES):
        idx = rng.permutation(task[y[task] == c])
        need = t.test_per_class + t.val_per_class + counts[c]
        if len(idx) < need:
            raise UserError(f"digits_lt: class {c} has {len(idx)} task images but test_per_class + val_per_class + "
                             f"n_c = {need}; lower dataset.toy.n_max or the per-class split sizes")
        parts["test"].append(idx[: t.test_per_class])
        parts["val"].append(idx[t.test_per_class: t.test_per_class + t.val_per_class])
        parts["train"].append(idx[t.test_per_class + t.val_per_class: need])
    tables = []
    for split, chunks in parts.items():
        ids = np.sort(np.concatenate(chunks))
        ims = apply_look(upsample(x[ids], cfg.image_size), t.look, cfg.seed + 3, ids)
        tables.append(_rows([f"digits-{i}" for i in ids], ims, y[ids], split, [""] * len(ids)))
    return _table(tables)


def corrupt(image: np.ndarray, style: str, severity: float, rng: np.random.Generator) -> np.ndarray:
    """Apply one corruption style to an (S, S, 3) uint8 image; ``severity`` in [0, 1]."""
    img = image.astype(np.float32)
    size = image.shape[0]
    if style == "clean":
        out = img
    elif style == "blur":
        pil = Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius=0.5 + 2.5 * severity))
        out = np.asarray(pil, dtype=np.float32)
    elif style == "noise":
        out = img + rng.normal(0, 20 + 100 * severity, size=img.shape[:2])[..., None]
    elif style == "occlusion":
        side = max(2, int(size * (0.25 + 0.3 * severity)))
        y0, x0 = rng.integers(0, size - side + 1, size=2)
        out = img.copy()
        out[y0:y0 + side, x0:x0 + side] = rng.uniform(0, 255)
    elif style == "low_contrast":
        factor = 1.0 - 0.85 * severity
        out = 128 + (img - 128) * factor
    elif style == "pixelate":
        small = max(3, int(size / (2 + 6 * severity)))
        pil = Image.fromarray(image).resize((small, small), Image.BILINEAR).resize((size, size), Image.NEAREST)
        out = np.asarray(pil, dtype=np.float32)
    else:
        raise UserError(f"unknown corruption style {style!r}")
    return np.clip(out, 0, 255).round().astype(np.uint8)


def load_digits_lq(cfg: "DatasetConfig") -> pa.Table:
    """digits-LQ: corrupted digits; ID styles → train/val/test, OOD styles → test_ood."""
    t = cfg.toy
    x, y = _digits()
    _, task = _split_indices(partition_seed(cfg), t.world_fraction)
    rng = np.random.default_rng(cfg.seed + 2)
    clean = upsample(x, cfg.image_size)
    if t.look != "clean":            # the camera look first, then each image's corruption style
        clean[task] = apply_look(clean[task], t.look, cfg.seed + 3, task)
    parts = []
    for c in range(NUM_CLASSES):
        idx = rng.permutation(task[y[task] == c])
        ood, rest = idx[: t.lq_ood_per_class], idx[t.lq_ood_per_class:]
        test, val, train = (rest[: t.test_per_class // 2], rest[t.test_per_class // 2: t.test_per_class // 2
                            + t.val_per_class], rest[t.test_per_class // 2 + t.val_per_class:])
        for split, ids, styles in (("train", train, t.id_styles), ("val", val, t.id_styles),
                                   ("test", test, t.id_styles), ("test_ood", ood, t.ood_styles)):
            doms = [styles[int(k)] for k in rng.integers(0, len(styles), size=len(ids))]
            ims = [corrupt(clean[i], s, t.severity, rng) for i, s in zip(ids, doms)]
            parts.append(_rows([f"digitslq-{i}" for i in ids], ims, y[ids], split, doms))
    table = _table(parts)
    order = sorted(range(table.num_rows), key=lambda i: (table["split"][i].as_py(), table["image_id"][i].as_py()))
    return table.take(order)
