"""CIFAR-100-LT (Cao et al., 2019): an exponentially imbalanced subsample of CIFAR-100's training set.

Layout under ``dataset.root`` (the "python version" archive, extracted)::

    cifar-100-python/train   pickle: {b'data': uint8 (50000, 3072), b'fine_labels': [int], ...}
    cifar-100-python/test    same keys, 10,000 images (the balanced test split, reporting only)
    cifar-100-python/meta    pickle: {b'fine_label_names': [bytes] (100 names)}

Class ``c`` keeps ``n_c = ⌊n_max · r^(−c/(C−1))⌋`` training images (r = ``dataset.imbalance_ratio``, the
paper uses 50 and 100; n_max = images per class in the pickle = 500), exactly the standard recipe, so
totals are 10,847 (r = 100) and 12,608 (r = 50). Which images a class keeps is a seeded draw.

Validation (model selection must never see test): ``VAL_PER_CLASS`` images per class drawn from the
training images the subsample left unused, so train stays the standard LT set and val never overlaps
it. The head class keeps all of its images at n_max = 500 and therefore has no val images (nor any class
whose unused pool is smaller than the quota); ``docs/datasets.md`` records this choice.

The pickles are read with :class:`RestrictedUnpickler`, which only rebuilds plain containers, bytes and
numpy arrays: a pickle naming any other global (``os.system``, ``builtins.eval``, …) is refused with a
DatasetError before anything runs. Images are embedded as PNG bytes (there are no image files).
"""

from __future__ import annotations

import os
import pickle
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from discl_ray.data.loaders.common import DatasetError, balanced_holdout, canonical_table, require_file, require_root
from discl_ray.runtime.io import png_bytes

if TYPE_CHECKING:
    from discl_ray.config import DatasetConfig

SUBDIR = "cifar-100-python"
VAL_PER_CLASS = 10

# Globals a CIFAR pickle needs: numpy array reconstruction (old and new module paths, protocol 2 and 5)
# and the bytes helper protocol-2 pickles written by Python 3 use. Nothing else is ever imported.
_ALLOWED_GLOBALS = frozenset({
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
})


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals in ``_ALLOWED_GLOBALS`` (plain data and numpy arrays)."""

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed in a CIFAR pickle")


def restricted_load(path: Path) -> dict:
    """Unpickle a CIFAR batch safely (bytes keys, Python-2 strings kept as bytes)."""
    try:
        with open(path, "rb") as fh:
            obj = RestrictedUnpickler(fh, encoding="bytes").load()
    except pickle.UnpicklingError as err:
        raise DatasetError(f"{path}: refused to unpickle: {err} (expected a plain CIFAR-100 batch)") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as err:
        raise DatasetError(f"{path}: not a readable CIFAR-100 pickle ({type(err).__name__}: {err})") from None
    if not isinstance(obj, dict):
        raise DatasetError(f"{path}: expected a dict, got {type(obj).__name__}")
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in obj.items()}


def lt_counts(num_classes: int, n_max: int, ratio: float) -> list[int]:
    """Images kept per class: ``int(n_max · (1/r)^(c/(C−1)))`` (the reference implementation's expression)."""
    if num_classes < 2:
        return [n_max] * num_classes
    return [int(n_max * (1.0 / ratio) ** (c / (num_classes - 1.0))) for c in range(num_classes)]


def _batch(path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 32, 32, 3), fine labels int64 (N,)) of one batch, with its shape checked."""
    obj = restricted_load(path)
    missing = [k for k in ("data", "fine_labels") if k not in obj]
    if missing:
        raise DatasetError(f"{path}: missing keys {missing}; expected 'data' and 'fine_labels'")
    data, labels = obj["data"], np.asarray(obj["fine_labels"])
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        shape = getattr(data, "shape", None)
        raise DatasetError(f"{path}: 'data' must be a uint8 array of shape (N, 3072); got "
                           f"{type(data).__name__} {getattr(data, 'dtype', '')} {shape}")
    if labels.shape != (len(data),) or labels.dtype.kind not in "iu":
        raise DatasetError(f"{path}: 'fine_labels' must hold {len(data)} integers")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DatasetError(f"{path}: fine labels must lie in [0, {num_classes}); got {labels.min()}..{labels.max()}")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels.astype(np.int64)


def load(cfg: "DatasetConfig") -> pa.Table:
    """Canonical rows of CIFAR-100-LT: LT train, held-out val, full balanced test (PNG bytes embedded)."""
    root = require_root(cfg)
    base = Path(SUBDIR)
    meta = restricted_load(require_file(root, str(base / "meta"), "the CIFAR-100 'meta' pickle"))
    names = meta.get("fine_label_names")
    if not isinstance(names, list) or not names:
        raise DatasetError(f"{root / base / 'meta'}: expected key 'fine_label_names' with a list of names")
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    num_classes = len(names)
    x_train, y_train = _batch(require_file(root, str(base / "train"), "the CIFAR-100 'train' pickle"), num_classes)
    x_test, y_test = _batch(require_file(root, str(base / "test"), "the CIFAR-100 'test' pickle"), num_classes)

    per_class = np.bincount(y_train, minlength=num_classes)
    if per_class.min() == 0:
        raise DatasetError(f"{root / base / 'train'}: class {int(per_class.argmin())} has no training images")
    counts = lt_counts(num_classes, int(per_class.min()), cfg.imbalance_ratio)
    rng = np.random.default_rng(cfg.seed)
    keep = np.sort(np.concatenate([rng.permutation(np.flatnonzero(y_train == c))[:n] for c, n in enumerate(counts)]))
    unused = np.setdiff1d(np.arange(len(y_train)), keep)
    val_per_class = int(getattr(cfg, "val_per_class", None) or VAL_PER_CLASS)
    val = balanced_holdout(y_train, val_per_class, seed=cfg.seed + 1, candidates=unused)

    ids, labels, splits, arrays = [], [], [], []
    for split, idx, x, y, prefix in (("train", keep, x_train, y_train, "train"), ("val", val, x_train, y_train, "train"),
                                     ("test", np.arange(len(y_test)), x_test, y_test, "test")):
        ids += [f"cifar100/{prefix}/{int(i)}" for i in idx]
        labels += y[idx].tolist()
        splits += [split] * len(idx)
        arrays += list(x[idx])
    # zlib releases the GIL: a few threads encode the ~22k PNGs (the bulk of this loader's time) in parallel.
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        images = list(pool.map(png_bytes, arrays, chunksize=256))
    return canonical_table(ids, labels, [names[y] for y in labels], splits, image=images)
