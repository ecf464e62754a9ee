"""Shared helpers for the real-dataset loaders: errors, file checks, canonical tables, hold-outs, embedding.

Loaders fail early and readably: every problem with a dataset root raises :class:`DatasetError` naming the
file and what was expected (a missing split file, a bad line with its number, a json without the keys a
COCO-style file must have). Images themselves are *not* opened while loading (ImageNet-LT alone has
186k of them) unless ``cfg.embed_images`` asks for PNG bytes; unreadable images then keep their path and
null bytes, so the stage that decodes them records an error row instead of the job dying here.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np
import pyarrow as pa

from discl_ray.errors import UserError
from discl_ray.runtime.io import ImageLoadError, load_image, png_bytes

if TYPE_CHECKING:
    from discl_ray.config import DatasetConfig

log = logging.getLogger(__name__)

VALID_SPLITS = ("train", "val", "test", "val_ood", "test_ood")


class DatasetError(UserError):
    """A dataset root is missing or malformed; the message names the file and what was expected."""


def require_root(cfg: "DatasetConfig") -> Path:
    """``cfg.root`` as an existing directory, or a DatasetError saying what the loader needs."""
    if not cfg.root:
        raise DatasetError(f"dataset.root is not set: the {cfg.name} loader needs the directory holding its files "
                           f"(see docs/datasets.md)")
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"dataset.root {str(root)!r} for {cfg.name} is not a directory")
    return root


def require_file(root: Path, rel: str, what: str) -> Path:
    """``root/rel`` as an existing file, else a DatasetError naming it and its role."""
    path = root / rel
    if not path.is_file():
        raise DatasetError(f"{path}: file not found; expected {what}")
    return path


def canonical_table(image_id: Sequence[str], label: Sequence[int], class_name: Sequence[str],
                    split: Sequence[str], path: Optional[Sequence[Optional[str]]] = None,
                    image: Optional[Sequence[Optional[bytes]]] = None,
                    domain: Optional[Sequence[str]] = None) -> pa.Table:
    """Build a table in ``CANONICAL_SCHEMA`` from equal-length columns (missing ones become null / "")."""
    from discl_ray.data import CANONICAL_SCHEMA

    n = len(image_id)
    for name, col in (("label", label), ("class_name", class_name), ("split", split), ("path", path),
                      ("image", image), ("domain", domain)):
        if col is not None and len(col) != n:
            raise ValueError(f"canonical_table: column {name} has {len(col)} values for {n} image ids")
    bad = sorted(set(split) - set(VALID_SPLITS))
    if bad:
        raise ValueError(f"canonical_table: unknown split(s) {bad}; valid: {list(VALID_SPLITS)}")
    if len(set(image_id)) != n:
        seen: set[str] = set()
        dup = next(i for i in image_id if i in seen or seen.add(i))
        raise DatasetError(f"image_id {dup!r} occurs more than once (an image listed twice in the split files?)")
    return pa.table({
        "image_id": pa.array(image_id, pa.string()),
        "image": pa.array(image if image is not None else [None] * n, pa.binary()),
        "path": pa.array(path if path is not None else [None] * n, pa.string()),
        "label": pa.array(np.asarray(label, dtype=np.int64), pa.int64()),
        "class_name": pa.array(class_name, pa.string()),
        "split": pa.array(split, pa.string()),
        "domain": pa.array(domain if domain is not None else [""] * n, pa.string()),
    }, schema=CANONICAL_SCHEMA)


def balanced_holdout(labels: Sequence[int] | np.ndarray, per_class: int, seed: int,
                     candidates: Optional[np.ndarray] = None, min_keep: int = 0) -> np.ndarray:
    """Indices of a seeded, class-balanced hold-out: ``per_class`` per class drawn from ``candidates``.

    ``candidates`` (default: all indices) is the pool; a class contributes only if its pool keeps at least
    ``min_keep`` indices after giving ``per_class`` (so hold-outs never wipe out a rare class). Returns sorted
    indices. The draw depends only on (labels, candidates, per_class, seed), never on dict/hash order.
    """
    labels = np.asarray(labels, dtype=np.int64)
    pool = np.arange(len(labels)) if candidates is None else np.sort(np.asarray(candidates, dtype=np.int64))
    if per_class <= 0 or len(pool) == 0:
        return np.empty(0, dtype=np.int64)
    rng = np.random.default_rng(seed)
    # Group the pool by class in one stable sort (O(n log n)); a per-class scan is O(n · classes) and
    # takes minutes on iNat-2018's 437k images × 8,142 classes.
    pool = pool[np.argsort(labels[pool], kind="stable")]
    classes, starts = np.unique(labels[pool], return_index=True)
    bounds = np.append(starts, len(pool))
    chosen = []
    for k in range(len(classes)):
        idx = pool[bounds[k]:bounds[k + 1]]
        if len(idx) - per_class < min_keep:
            continue
        chosen.append(rng.permutation(idx)[:per_class])
    return np.sort(np.concatenate(chosen)) if chosen else np.empty(0, dtype=np.int64)


def read_class_names(path: Path, num_classes: int) -> list[str]:
    """One class name per line (label = line index); blank trailing lines ignored."""
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    while names and not names[-1]:
        names.pop()
    if len(names) < num_classes:
        raise DatasetError(f"{path}: {len(names)} class names for {num_classes} labels; "
                           "expected one name per line, line i naming label i")
    empty = [i + 1 for i, n in enumerate(names[:num_classes]) if not n]
    if empty:
        raise DatasetError(f"{path}: empty class name on line {empty[0]}")
    return names[:num_classes]


def default_names(labels: Iterable[int]) -> dict[int, str]:
    """``class_<id>`` names for loaders without a name file."""
    return {int(y): f"class_{int(y)}" for y in labels}


def _png_of_file(full: Path) -> Optional[bytes]:
    try:
        return png_bytes(load_image(path=str(full)))
    except ImageLoadError as err:
        log.warning("embed_images: %s", err)
        return None


def embed_files(paths: Sequence[str], root: Path, threads: int = 4) -> list[Optional[bytes]]:
    """PNG bytes of each root-relative file (None where missing or undecodable), read with a few threads."""
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        out = list(pool.map(_png_of_file, (root / p for p in paths)))
    bad = sum(b is None for b in out)
    if bad:
        log.warning("embed_images: %d of %d images could not be read; their rows keep the path only", bad, len(out))
    return out


def finish(cfg: "DatasetConfig", root: Path, cols: Mapping[str, list]) -> pa.Table:
    """Canonical table from path-based columns, embedding PNG bytes when ``cfg.embed_images``."""
    image = embed_files(cols["path"], root) if cfg.embed_images else None
    return canonical_table(cols["image_id"], cols["label"], cols["class_name"], cols["split"],
                           path=cols["path"], image=image, domain=cols.get("domain"))
