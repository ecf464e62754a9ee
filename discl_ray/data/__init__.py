"""Canonical dataset rows and the loader registry.

A loader is ``load(cfg: DatasetConfig) -> pyarrow.Table`` returning canonical rows
(``CANONICAL_SCHEMA``). Registry values are ``"module:function"`` strings so that importing the package
does not import every loader's dependencies.

:func:`materialize` builds an experiment's rows once per run root and rows key: experiments on the same
dataset share ``<run_root>/_spectra/<dataset>/rows/<key>/rows.parquet`` (see :func:`rows_identity` for the
key) and get it in their ``dataset/`` as a hard link (a server-side copy on an object store).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa

from discl_ray.runtime.io import read_parquet_dir

if TYPE_CHECKING:
    from discl_ray.config import DatasetConfig, ExperimentConfig
    from discl_ray.runtime.cluster import RunPaths
    from discl_ray.runtime.storage import Storage

log = logging.getLogger(__name__)

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
    return subset_rows(table, cfg.max_classes, cfg.max_per_class, cfg.miniature_groups)


def long_tail_caps(train_counts: dict[int, int], per_class: int, groups: tuple[int, int]) -> dict[int, int]:
    """Training-row caps per class that give the miniature all three frequency groups under ``groups`` =
    (few_max, many_min) (few < few_max <= medium < many_min <= many), or {} when ``per_class`` for every
    class already does (or fewer than three classes, or bounds that leave no room, make it impossible).

    Classes by training count, biggest first: the first third keeps ``per_class``, the next third is capped
    between the bounds, the rest below ``few_max``; a class with fewer rows than its cap only moves down."""
    few_max, many_min = groups

    def group(n: int) -> str:
        return "few" if n < few_max else ("many" if n >= many_min else "medium")

    capped = {c: min(n, per_class) for c, n in train_counts.items()}
    if len({group(n) for n in capped.values()}) == 3 or len(capped) < 3 or per_class < many_min \
            or few_max < 2 or many_min <= few_max:
        return {}
    ranked = sorted(capped, key=lambda c: (-train_counts[c], c))
    k = len(ranked)
    many, medium = -(-k // 3), -(-(k - -(-k // 3)) // 2)
    caps = [per_class] * many + [(few_max + many_min - 1) // 2] * medium + [max(1, few_max // 2)] * (k - many - medium)
    return dict(zip(ranked, caps))


def subset_rows(table: pa.Table, max_classes: int | None, max_per_class: int | None,
                groups: tuple[int, int] | None = None) -> pa.Table:
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
        caps: dict[int, int] = {}
        if groups is not None:
            train_counts: dict[int, int] = {}
            for split, lab in zip(table["split"].to_pylist(), table["label"].to_pylist()):
                if split == "train":
                    train_counts[lab] = train_counts.get(lab, 0) + 1
            caps = long_tail_caps(train_counts, max_per_class, tuple(groups))
        seen: dict[tuple, int] = {}
        mask = []
        for split, lab in zip(table["split"].to_pylist(), table["label"].to_pylist()):
            n = seen.get((split, lab), 0)
            mask.append(n < (caps.get(lab, max_per_class) if split == "train" else max_per_class))
            seen[(split, lab)] = n + 1
        table = table.filter(pa.array(mask))
    return table


# -- the shared rows store ------------------------------------------------------------------------------
ROWS_FORMAT = 1
ROWS_FILE = "rows.parquet"          # the rows of a key (and of the experiment's view)
ROWS_META = "_rows.json"            # in a store key, written last: a key without it is never trusted
MARKER = "_dataset_config.json"     # in <exp>/dataset/: the spec its rows were built for (readers compare it)
VIEW_META = "_dataset_rows.json"    # in <exp>/dataset/: the store key its rows are, and whether they were reused


def _is_toy(name: str) -> bool:
    return LOADERS.get(name, "").startswith("discl_ray.data.toy:")


@lru_cache(maxsize=1)
def _digits_digest() -> str:
    """A digest of scikit-learn's bundled digits (the file ``load_digits`` reads), what every toy row is drawn
    from (read as bytes here: the toy loader imports this package, not the other way round)."""
    from importlib import resources

    data = resources.files("sklearn.datasets.data").joinpath("digits.csv.gz").read_bytes()
    return hashlib.blake2b(data, digest_size=16).hexdigest()


@lru_cache(maxsize=1)
def _layout() -> str:
    """A digest of the parquet layout rows are written in (``parquet_write_options`` of a small- and a
    large-image probe), so a changed row-group policy rebuilds the rows instead of reusing the old layout."""
    from discl_ray.runtime.storage import parquet_write_options

    probes = [pa.table({"image": [b"\0" * n], "label": [0]}) for n in (1 << 10, 1 << 22)]
    return hashlib.blake2b(json.dumps([parquet_write_options(t) for t in probes], sort_keys=True,
                                      default=str).encode(), digest_size=8).hexdigest()


def rows_identity(cfg: "ExperimentConfig", paths: "RunPaths") -> tuple[dict, bool]:
    """Everything that decides the canonical rows (the store key is its digest), and whether it is complete
    here. The ``dataset`` spec (``model_dump``, as in ``_dataset_config.json``), the rows format and the
    parquet layout; for the toy datasets also the digits they are drawn from. A toy world's weights do not
    decide its rows (they are drawn from the digits and the spec alone), so a rebuilt world reuses them; its
    spectrum, which the weights do decide, is keyed by them (the generator identity)."""
    ident: dict = {"format": ROWS_FORMAT, "dataset": cfg.dataset.model_dump(mode="json"), "layout": _layout()}
    if _is_toy(cfg.dataset.name):
        ident["digits"] = _digits_digest()
    return ident, True


def rows_key(ident: dict) -> str:
    return hashlib.blake2b(json.dumps(ident, sort_keys=True).encode(), digest_size=16).hexdigest()


def _read_json(f: "Storage") -> dict | None:
    try:
        data = json.loads(f.read_text())
    except (FileNotFoundError, OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _view_key(out: "Storage") -> tuple[dict | None, str | None]:
    """(the spec of an experiment's ``dataset/`` marker, the store key its rows are). The key is None for a
    view whose ``_dataset_rows.json`` is missing or describes another spec than the marker: rows written
    before the store, or by a test fixture or bench after a materialize."""
    spec = _read_json(out.join(MARKER))
    meta = _read_json(out.join(VIEW_META)) if spec is not None else None
    if meta is None or meta.get("dataset") != spec:
        return spec, None
    return spec, meta.get("key")


def _view_current(out: "Storage", spec: dict, key: str, known: bool) -> bool:
    """The experiment's ``dataset/`` holds the rows of ``spec`` under this key. A view without a key
    (:func:`_view_key`) is trusted by its spec, as before the store; so is one whose key this node cannot
    check (a toy world that is not built here)."""
    have, have_key = _view_key(out)
    return have == spec and (have_key is None or have_key == key or not known)


def _drop_leftovers(root: "Storage", key: str | None = None) -> int:
    """Remove what killed writers left in the local rows store (``.<key>.<id>.partial`` / ``.old``
    folders; all of them, or those of ``key``). Call with the rows lock held."""
    import shutil

    if not root.is_local or not root.is_dir():
        return 0
    n = 0
    for entry in Path(root.path).iterdir():
        name = entry.name
        if name.startswith(".") and name.endswith((".partial", ".old")) and (key is None or
                                                                           name.startswith(f".{key}.")):
            shutil.rmtree(entry, ignore_errors=True)
            n += 1
    return n


def _write_key(root: "Storage", key: str, table: pa.Table, meta: dict) -> None:
    """Write the rows of ``key`` atomically: locally into a hidden folder renamed into place (with
    ``_rows.json`` inside); on an object store the rows, then ``_rows.json`` last (a key without it is
    never trusted, and is rewritten by the next writer)."""
    import os
    import shutil
    import uuid

    import pyarrow.parquet as pq

    from discl_ray.runtime.storage import parquet_write_options

    if root.is_local:
        tag = uuid.uuid4().hex[:12]
        final = Path(root.path, key)
        partial = Path(root.path, f".{key}.{tag}.partial")
        partial.mkdir(parents=True)
        pq.write_table(table, partial / ROWS_FILE, **parquet_write_options(table))
        (partial / ROWS_META).write_text(json.dumps(meta, indent=1, sort_keys=True))
        if final.exists():                                    # force: replace the key whole
            old = Path(root.path, f".{key}.{tag}.old")
            os.rename(final, old)
            os.rename(partial, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(partial, final)
        return
    kdir = root.join(key)
    kdir.join(ROWS_META).delete()
    kdir.join(ROWS_FILE).write_parquet(table)
    kdir.join(ROWS_META).write_text(json.dumps(meta, indent=1, sort_keys=True))


def _ensure_rows(cfg: "ExperimentConfig", root: "Storage", key: str, ident: dict, force: bool) -> bool:
    """Make the store hold the rows of ``key`` (built with the loader under the rows store's writer lock
    when it lacks them, or always with ``force``). Returns True when they were already there."""
    from discl_ray.runtime.content import writer_lock

    done = root.join(key, ROWS_META)
    if not force and done.is_file():
        return True
    with writer_lock(root, f"materialize {cfg.experiment}"):
        if not force and done.is_file():                     # another experiment built them while we waited
            return True
        _drop_leftovers(root)
        table = load_rows(cfg.dataset)
        _write_key(root, key, table, {**ident, "key": key, "rows": table.num_rows, "files": [ROWS_FILE],
                                      "built_by": cfg.experiment})
    return False


def _place(src: "Storage", dst: "Storage") -> None:
    """``dst`` becomes a copy of the immutable ``src``: a hard link on a local run root (a copy across
    filesystems), a server-side copy on an object store; atomic either way."""
    import os
    import shutil

    if src.is_local and dst.is_local:
        dst.parent.mkdir()
        tmp = f"{dst.path}.{os.getpid()}.tmp"
        if os.path.lexists(tmp):
            os.unlink(tmp)
        try:
            os.link(src.path, tmp)
        except OSError:                                       # another filesystem
            shutil.copyfile(src.path, tmp)
        os.replace(tmp, dst.path)
        return
    if not src.is_local and not dst.is_local and type(src.fs) is type(dst.fs):
        try:
            src.fs.copy_file(src.path, dst.path)
            return
        except OSError:                                       # e.g. over a store's single-copy size limit
            pass
    with src.open_input() as fi, dst.open_output() as fo:
        while chunk := fi.read(1 << 24):
            fo.write(chunk)


def _fill_view(kdir: "Storage", out: "Storage", files: list[str]) -> None:
    for name in files:
        _place(kdir.join(name), out.join(name))
    for f in out.parquet_files():
        if f.name not in files:
            f.delete()


def materialize(cfg: "ExperimentConfig", force: bool = False, paths: "RunPaths | None" = None) -> "Path | Storage":
    """The experiment's canonical rows in ``<run_root>/<exp>/dataset/`` (``rows.parquet`` plus the
    ``_dataset_config.json`` marker); a no-op while they are current.

    The rows are built once per run root and rows key (:func:`rows_identity`) into the dataset's store,
    ``<run_root>/_spectra/<dataset>/rows/<key>/``, under the store's writer lock; every other experiment on
    the same dataset (Table 1's rows, ablations, sweep configs) gets them from there without calling the
    loader: hard links on a local run root, server-side copies on an object store. A reuse is logged and
    recorded (``reused: true`` in ``dataset/_dataset_rows.json``). ``force`` rebuilds the key with the loader.

    Works on any storage (local or object store); returns a Path for a local run root. ``paths``: the run's
    locations when the caller has them (a stage's context)."""
    from discl_ray.runtime.cluster import RunPaths
    from discl_ray.runtime.content import rows_root

    paths = paths or RunPaths.from_config(cfg)
    out = paths.store("dataset")
    spec = cfg.dataset.model_dump(mode="json")
    ident, known = rows_identity(cfg, paths)
    key = rows_key(ident)
    if not force and _view_current(out, spec, key, known):
        return paths.dataset
    root = rows_root(cfg, paths)
    out.join(MARKER).delete()                                # the view is not current until the marker is back
    reused = _ensure_rows(cfg, root, key, ident, force)
    kdir = root.join(key)
    meta = _read_json(kdir.join(ROWS_META)) or {}
    try:
        _fill_view(kdir, out, meta.get("files", [ROWS_FILE]))
    except FileNotFoundError:                                # `discl gc` dropped the key just now: build it again
        reused = _ensure_rows(cfg, root, key, ident, force=False)
        meta = _read_json(kdir.join(ROWS_META)) or {}
        _fill_view(kdir, out, meta.get("files", [ROWS_FILE]))
    out.join(VIEW_META).write_text(json.dumps({"key": key, "store": str(root), "rows": meta.get("rows"),
                                               "reused": reused, "built_by": meta.get("built_by"),
                                               "dataset": spec}, indent=1, sort_keys=True))
    out.join(MARKER).write_text(json.dumps(spec, indent=1, sort_keys=True))
    if reused:
        log.info("dataset %s: reused %s canonical rows from %s (built by experiment %s; the loader did not run)",
                 cfg.dataset.name, meta.get("rows"), kdir, meta.get("built_by"))
    return paths.dataset


def gc_rows(run_root: "str | Storage", root: "str | Storage", dataset: str, dry_run: bool = False) -> dict:
    """Drop the rows keys of ``root`` (a dataset's ``_spectra/<dataset>/rows/``) that no experiment under
    ``run_root`` uses: an experiment uses the key its ``dataset/_dataset_rows.json`` names or, for rows
    written before the store (no such file), any key built for its ``_dataset_config.json`` spec. Keys a
    killed writer left unfinished go too. Holds the rows store's writer lock; experiments' views are links
    or copies, so dropping a key never breaks them (a later experiment on that spec rebuilds it)."""
    import posixpath

    import pyarrow.fs as pafs

    from discl_ray.runtime.content import writer_lock
    from discl_ray.runtime.storage import as_storage

    run, root = as_storage(run_root), as_storage(root)
    report: dict = {"rows_store": str(root), "row_experiments": [], "row_keys_kept": 0, "row_keys_dropped": 0,
              "rows_dropped": 0, "dry_run": dry_run}
    if not root.is_dir():
        return report
    with writer_lock(root, "gc"):
        keys: set[str] = set()
        specs: list[dict] = []
        for info in run.fs.get_file_info(pafs.FileSelector(run.path, allow_not_found=True)):
            name = posixpath.basename(info.path)
            if info.type != pafs.FileType.Directory or name.startswith(("_", ".")):
                continue
            view = run.join(name, "dataset")
            spec, key = _view_key(view)
            if key is not None:
                if as_storage((_read_json(view.join(VIEW_META)) or {}).get("store", "")).path != root.path:
                    continue
                keys.add(key)
            elif spec is not None and spec.get("name") == dataset:
                specs.append(spec)
            else:
                continue
            report["row_experiments"].append(name)
        report["row_experiments"].sort()
        if not dry_run:
            _drop_leftovers(root)
        for info in root.fs.get_file_info(pafs.FileSelector(root.path, allow_not_found=True)):
            name = posixpath.basename(info.path)
            if info.type != pafs.FileType.Directory or name.startswith(("_", ".")):
                continue
            meta = _read_json(root.join(name, ROWS_META))
            if meta is not None and (name in keys or meta.get("dataset") in specs):
                report["row_keys_kept"] += 1
                continue
            report["row_keys_dropped"] += 1
            report["rows_dropped"] += int((meta or {}).get("rows") or 0)
            if not dry_run:
                root.join(name).delete()
    return report


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
