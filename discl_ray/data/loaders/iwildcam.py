"""iWildCam (Beery et al., 2021) through WILDS: ID/OOD splits, camera locations as domains, macro-F1.

Layout under ``dataset.root`` (what ``wilds`` downloads and extracts)::

    iwildcam_v2.0/RELEASE_v2.0.txt   WILDS' version marker (without it WILDS tries to download)
    iwildcam_v2.0/metadata.csv       split, filename, y, location_remapped, sequence_remapped, datetime, …
    iwildcam_v2.0/categories.csv     y, category_id, name (scientific names, lower case)
    iwildcam_v2.0/train/<filename>   every image, whatever its split

The table is read by ``wilds.datasets.IWildCamDataset(root_dir=root, download=False)`` so labels and splits
are exactly WILDS' (its checks on contiguous ids included). Splits map as WILDS defines them: ``train`` →
train, ``id_val`` → val, ``id_test`` → test, ``val`` → val_ood, ``test`` → test_ood; the domain is the
camera location (``location_<n>``). Class names are the scientific names of ``categories.csv``; prompts
use the common names of ``discl_ray/assets/iwildcam_common_names.json`` (:func:`common_name`, falling back
to the scientific name), e.g. "a photo of white-lipped peccary in the wild".
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from discl_ray.data.loaders.common import DatasetError, finish, require_file, require_root

if TYPE_CHECKING:
    from discl_ray.config import DatasetConfig

SUBDIR = "iwildcam_v2.0"
SPLIT_MAP = {"train": "train", "id_val": "val", "id_test": "test", "val": "val_ood", "test": "test_ood"}
METADATA_COLUMNS = ("split", "filename", "y", "location_remapped", "sequence_remapped", "datetime")
COMMON_NAMES_PATH = Path(__file__).resolve().parents[2] / "assets" / "iwildcam_common_names.json"


@lru_cache(maxsize=1)
def common_names() -> dict[str, str]:
    """The shipped scientific → common name map (keys lower case)."""
    return {k.lower(): v for k, v in json.loads(COMMON_NAMES_PATH.read_text(encoding="utf-8")).items()}


def common_name(scientific: str) -> str:
    """Common name of an iWildCam class for prompts; the scientific name itself when the map lacks it."""
    return common_names().get(scientific.strip().lower(), scientific)


def read_categories(path: Path) -> dict[int, str]:
    """``{y: name}`` from WILDS' ``categories.csv`` (columns ``y`` and ``name``)."""
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in ("y", "name") if c not in (reader.fieldnames or [])]
        if missing:
            raise DatasetError(f"{path}: missing columns {missing}; expected at least 'y' and 'name'")
        out = {}
        for lineno, row in enumerate(reader, start=2):
            try:
                out[int(row["y"])] = row["name"].strip()
            except (TypeError, ValueError):
                raise DatasetError(f"{path}:{lineno}: 'y' must be an integer, got {row['y']!r}") from None
    return out


def _check_metadata(path: Path) -> None:
    with open(path, newline="", encoding="utf-8") as fh:
        header = next(csv.reader(fh), [])
    missing = [c for c in METADATA_COLUMNS if c not in header]
    if missing:
        raise DatasetError(f"{path}: missing columns {missing}; WILDS needs {list(METADATA_COLUMNS)}")


def load(cfg: "DatasetConfig") -> pa.Table:
    """Canonical rows of iWildCam: train, val/test (ID) and val_ood/test_ood (OOD), domain = location."""
    root = require_root(cfg)
    require_file(root, f"{SUBDIR}/RELEASE_v2.0.txt", "the WILDS iWildCam v2.0 release marker (any content)")
    meta_path = require_file(root, f"{SUBDIR}/metadata.csv", "WILDS' iWildCam metadata table")
    _check_metadata(meta_path)
    names = read_categories(require_file(root, f"{SUBDIR}/categories.csv", "WILDS' categories table (y, name)"))
    if not (root / SUBDIR / "train").is_dir():
        raise DatasetError(f"{root / SUBDIR / 'train'}: directory not found; WILDS keeps every image there")

    from wilds.datasets.iwildcam_dataset import IWildCamDataset

    try:
        ds = IWildCamDataset(root_dir=str(root), download=False)
    except (KeyError, ValueError, AssertionError, TypeError) as err:
        raise DatasetError(f"{meta_path}: WILDS could not read it ({type(err).__name__}: {err}); expected splits "
                           f"{sorted(SPLIT_MAP)}, contiguous 0..N-1 ids for y / location_remapped / "
                           "sequence_remapped and datetimes like '2013-01-08 08:54:00.000'") from None
    y = ds.y_array.numpy().astype(np.int64)
    location = ds.metadata_array[:, ds.metadata_fields.index("location")].numpy()
    split_of = {v: SPLIT_MAP[k] for k, v in ds.split_dict.items()}
    unnamed = sorted(set(np.unique(y).tolist()) - set(names))
    if unnamed:
        raise DatasetError(f"{root / SUBDIR / 'categories.csv'}: no name for labels {unnamed[:10]}")
    files = [str(f) for f in ds._input_array]
    cols = {
        "image_id": files,
        "path": [f"{SUBDIR}/train/{f}" for f in files],
        "label": y.tolist(),
        "class_name": [names[int(v)] for v in y],
        "split": [split_of[int(s)] for s in ds.split_array],
        "domain": [f"location_{int(loc)}" for loc in location],
    }
    return finish(cfg, root, cols)


def macro_f1(y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray) -> float:
    """Macro-F1 over the labels present in ``y_true`` — WILDS' iWildCam metric (sklearn ``f1_score``
    with ``average='macro', labels=unique(y_true)``); a class never predicted nor hit scores 0."""
    y_true = np.asarray(y_true, dtype=np.int64).ravel()
    y_pred = np.asarray(y_pred, dtype=np.int64).ravel()
    if y_true.shape != y_pred.shape:
        raise ValueError(f"macro_f1: y_true has {y_true.size} labels, y_pred {y_pred.size}")
    if y_true.size == 0:
        raise ValueError("macro_f1: no labels")
    scores = []
    for c in np.unique(y_true):
        tp = np.sum((y_pred == c) & (y_true == c))
        fp = np.sum((y_pred == c) & (y_true != c))
        fn = np.sum((y_pred != c) & (y_true == c))
        denom = 2 * tp + fp + fn
        scores.append(2 * tp / denom if denom else 0.0)
    return float(np.mean(scores))
