"""Canonical dataset rows and the loader registry.

A loader is ``load(cfg: DatasetConfig) -> pyarrow.Table`` returning canonical rows
(``CANONICAL_SCHEMA``). Registry values are ``"module:function"`` strings so that importing the package
does not import every loader's dependencies.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa

from discl_ray.runtime.io import read_parquet_dir, replace_parquet_dir

if TYPE_CHECKING:
    from discl_ray.config import DatasetConfig, ExperimentConfig
    from discl_ray.runtime.cluster import RunPaths
    from discl_ray.runtime.storage import Storage

CANONICAL_SCHEMA = pa.schema([
    ("image_id", pa.string()),
    ("image", pa.binary()),
    ("path", pa.string()),
    ("label", pa.int64()),
    ("class_name", pa.string()),
    ("split", pa.string()),
    ("domain", pa.string()),
])

SPLITS = ("world", "train", "val", "test", "val_ood", "test_ood")

LOADERS: dict[str, str] = {
    "digits_world": "discl_ray.data.toy:load_world",
    "digits_lt": "discl_ray.data.toy:load_digits_lt",
    "digits_lq": "discl_ray.data.toy:load_digits_lq",
    "imagenet_lt": "discl_ray.data.loaders.imagenet_lt:load",
    "cifar100_lt": "discl_ray.data.loaders.cifar100_lt:load",
    "inat2018": "discl_ray.data.loaders.inat2018:load",
    "iwildcam": "discl_ray.data.loaders.iwildcam:load",
}


def get_loader(name: str) -> Callable[["DatasetConfig"], pa.Table]:
    """The loader function registered as ``name``; unknown names list the valid ones."""
    if name not in LOADERS:
        raise KeyError(f"unknown dataset {name!r}; valid: {', '.join(sorted(LOADERS))}")
    module, func = LOADERS[name].split(":")
    return getattr(importlib.import_module(module), func)


def load_rows(cfg: "DatasetConfig") -> pa.Table:
    """Build the canonical table for ``cfg`` (no caching), cut to ``max_classes`` / ``max_per_class``."""
    table = get_loader(cfg.name)(cfg)
    table = table.select(CANONICAL_SCHEMA.names).cast(CANONICAL_SCHEMA)
    return subset_rows(table, cfg.max_classes, cfg.max_per_class)


def subset_rows(table: pa.Table, max_classes: int | None, max_per_class: int | None) -> pa.Table:
    """A miniature of ``table`` with the same splits: the ``max_classes`` classes with the most training rows
    (ties: lower label), renumbered 0..K-1 in label order, and at most ``max_per_class`` rows per class and
    split (the first by image_id). Deterministic; the identity when both are None."""
    import pyarrow.compute as pc

    if max_classes is None and max_per_class is None:
        return table
    labels = table["label"].to_numpy()
    if max_classes is not None:
        train = labels[pc.equal(table["split"], "train").to_numpy(zero_copy_only=False)]
        counts: dict[int, int] = {}
        for lab in train.tolist():
            counts[lab] = counts.get(lab, 0) + 1
        ranked = sorted(set(labels.tolist()), key=lambda c: (-counts.get(c, 0), c))[:max_classes]
        keep = sorted(ranked)
        table = table.filter(pc.is_in(table["label"], pa.array(keep, pa.int64())))
        remap = {old: new for new, old in enumerate(keep)}
        table = table.set_column(table.schema.get_field_index("label"), "label",
                                 pa.array([remap[v] for v in table["label"].to_pylist()], pa.int64()))
    if max_per_class is not None:
        table = table.sort_by([("split", "ascending"), ("label", "ascending"), ("image_id", "ascending")])
        seen: dict[tuple, int] = {}
        mask = []
        for split, lab in zip(table["split"].to_pylist(), table["label"].to_pylist()):
            n = seen.get((split, lab), 0)
            mask.append(n < max_per_class)
            seen[(split, lab)] = n + 1
        table = table.filter(pa.array(mask))
    return table


def materialize(cfg: "ExperimentConfig", force: bool = False, paths: "RunPaths | None" = None) -> "Path | Storage":
    """Write the experiment's canonical rows to ``runs/<exp>/dataset/`` once; reuse while the config matches.

    Works on any storage (local or object store); returns a Path for a local run root. ``paths``: the run's
    locations when the caller has them (a stage's context)."""
    from discl_ray.runtime.cluster import RunPaths

    paths = paths or RunPaths.from_config(cfg)
    out = paths.store("dataset")
    marker = out.join("_dataset_config.json")
    spec = cfg.dataset.model_dump(mode="json")
    if not force and marker.is_file() and json.loads(marker.read_text()) == spec:
        return paths.dataset
    table = load_rows(cfg.dataset)
    replace_parquet_dir(table, out, prefix="rows")
    marker.write_text(json.dumps(spec, indent=1, sort_keys=True))
    return paths.dataset


def read_rows(cfg: "ExperimentConfig", splits: tuple[str, ...] | None = None,
              paths: "RunPaths | None" = None) -> pa.Table:
    """Canonical rows of the experiment (materialized on first use), optionally filtered by split."""
    import pyarrow.compute as pc

    table = read_parquet_dir(materialize(cfg, paths=paths))
    if splits is not None:
        table = table.filter(pc.is_in(table["split"], pa.array(list(splits))))
    return table


def class_names(table: pa.Table) -> dict[int, str]:
    """label → class_name of a canonical table."""
    labels = table["label"].to_pylist()
    names = table["class_name"].to_pylist()
    return dict(sorted(zip(labels, names)))
