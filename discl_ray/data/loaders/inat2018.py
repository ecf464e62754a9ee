"""iNaturalist-2018 (Van Horn et al., 2018) from its COCO-style annotation files.

Layout under ``dataset.root``::

    train2018.json     {"images": [{"id", "file_name"}], "annotations": [{"image_id", "category_id"}],
                        "categories": [{"id", "name"?}]}
    val2018.json       same keys; 3 images per class — the paper's (balanced) *test* split
    categories.json    optional: [{"id", "name"}] — names when the annotation files carry none
    train_val2018/…    the images, at each ``file_name`` (relative to the root)

Labels are the category ids mapped to 0..K−1 in id order (the identity for iNat-2018, whose ids already are
0..8141). Class names come from ``categories.json``, else the files' own categories, else ``class_<id>``.

Validation: ``VAL_PER_CLASS`` (1) training image per class is held out — seeded, balanced — but only from
classes that keep at least ``MIN_TRAIN_KEEP`` (2) training images, so the rarest classes (2 images in
iNat-2018) are never emptied, and never from a class the hold-out would move across a group boundary of the
standard split (Liu et al. 2019: many > 100, few < 20 training images; a class of exactly 101 or 20 images
keeps them all), so every class keeps the many/medium/few group it has in the standard split, and the
frequency-mined hard set (the few classes) is the standard split's classes; ``val2018.json`` is reported on as
``test`` and never used for selection.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from discl_ray.data.loaders.common import DatasetError, balanced_holdout, finish, require_file, require_root

if TYPE_CHECKING:
    from discl_ray.config import DatasetConfig

TRAIN_FILE, TEST_FILE, CATEGORIES_FILE = "train2018.json", "val2018.json", "categories.json"
VAL_PER_CLASS = 1
MIN_TRAIN_KEEP = 2
STANDARD_MANY_MIN, STANDARD_FEW_MAX = 101, 20   # many ≥ 101, few < 20 training images (Liu et al. 2019)


def group_of(n: int) -> str:
    return "many" if n >= STANDARD_MANY_MIN else "few" if n < STANDARD_FEW_MAX else "medium"


def holdout_candidates(train_labels: np.ndarray, per_class: int) -> np.ndarray:
    """Training indices a validation hold-out may draw from: those of classes whose group stays the same with
    ``per_class`` images fewer."""
    counts = np.bincount(train_labels)
    keep = np.array([group_of(int(n)) == group_of(int(n) - per_class) for n in counts], dtype=bool)
    return np.flatnonzero(keep[train_labels]) if len(train_labels) else np.empty(0, np.int64)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DatasetError(f"{path}: not valid JSON ({err})") from None


def _records(path: Path, data, key: str, fields: tuple[str, ...]) -> list[dict]:
    """``data[key]`` as a list of dicts each holding ``fields``; errors name the file, key and entry."""
    if not isinstance(data, dict) or key not in data:
        raise DatasetError(f"{path}: missing key {key!r}; expected a COCO-style object with 'images', "
                           "'annotations' and 'categories'")
    items = data[key]
    if not isinstance(items, list):
        raise DatasetError(f"{path}: {key!r} must be a list")
    for i, item in enumerate(items):
        missing = [f for f in fields if not isinstance(item, dict) or f not in item]
        if missing:
            raise DatasetError(f"{path}: {key}[{i}] lacks {missing}; each entry needs {list(fields)}")
    return items


def read_coco(path: Path) -> tuple[list[tuple[str, int]], dict[int, str]]:
    """``[(file_name, category_id)]`` in image order plus ``{category_id: name}`` from one annotation file."""
    data = _read_json(path)
    images = _records(path, data, "images", ("id", "file_name"))
    anns = _records(path, data, "annotations", ("image_id", "category_id"))
    cats = _records(path, data, "categories", ("id",))
    by_image: dict = {}
    for i, ann in enumerate(anns):
        if ann["image_id"] in by_image:
            raise DatasetError(f"{path}: annotations[{i}] is a second label for image {ann['image_id']!r}; "
                               "expected one category per image")
        by_image[ann["image_id"]] = int(ann["category_id"])
    names = {int(c["id"]): str(c["name"]) for c in cats if c.get("name")}
    known = {int(c["id"]) for c in cats}
    rows = []
    for img in images:
        if img["id"] not in by_image:
            raise DatasetError(f"{path}: image {img['id']!r} ({img['file_name']}) has no annotation")
        cat = by_image[img["id"]]
        if known and cat not in known:
            raise DatasetError(f"{path}: image {img['id']!r} has category_id {cat}, which 'categories' does not list")
        rows.append((str(img["file_name"]), cat))
    if not rows:
        raise DatasetError(f"{path}: no images")
    return rows, names


def load(cfg: "DatasetConfig") -> pa.Table:
    """Canonical rows of iNaturalist-2018: train (minus a small val hold-out), val, test (= val2018)."""
    root = require_root(cfg)
    train, train_names = read_coco(require_file(root, TRAIN_FILE, "the iNat-2018 training annotations (COCO json)"))
    test, test_names = read_coco(require_file(root, TEST_FILE, "the iNat-2018 validation annotations (COCO json)"))
    names = {**test_names, **train_names}
    cat_file = root / CATEGORIES_FILE
    if cat_file.is_file():
        cats = _read_json(cat_file)
        if not isinstance(cats, list):
            raise DatasetError(f"{cat_file}: expected a list of {{'id', 'name'}} objects")
        names.update({int(c["id"]): str(c["name"]) for c in cats if isinstance(c, dict) and "id" in c and "name" in c})
    cat_ids = sorted({c for _, c in train} | {c for _, c in test})
    label_of = {c: i for i, c in enumerate(cat_ids)}
    unseen = sorted({c for _, c in test} - {c for _, c in train})
    if unseen:
        raise DatasetError(f"{root / TEST_FILE}: categories {unseen[:10]} have no training images")

    train_labels = np.array([label_of[c] for _, c in train], dtype=np.int64)
    per_class = int(getattr(cfg, "val_per_class", None) or VAL_PER_CLASS)
    val = set(balanced_holdout(train_labels, per_class, seed=cfg.seed, min_keep=MIN_TRAIN_KEEP,
                               candidates=holdout_candidates(train_labels, per_class)).tolist())
    cols: dict[str, list] = {k: [] for k in ("image_id", "path", "label", "class_name", "split")}
    for split_rows, is_train in ((train, True), (test, False)):
        for i, (rel, cat) in enumerate(split_rows):
            cols["image_id"].append(rel)
            cols["path"].append(rel)
            cols["label"].append(label_of[cat])
            cols["class_name"].append(names.get(cat, f"class_{cat}"))
            cols["split"].append(("val" if i in val else "train") if is_train else "test")
    return finish(cfg, root, cols)
