"""One content-addressed spectrum store per dataset, shared by every experiment, table row and sweep trial.

Location: ``<run_root>/_spectra/<dataset.name>/`` (:func:`store_root`)::

    _spectra/<dataset>/images/lam=<λ>/part-<digest>.parquet   generated images, hive-partitioned by λ
    _spectra/<dataset>/scores/part-<digest>.parquet           CLIP scores
    _spectra/<dataset>/_writer.lock                           one writer at a time (see :func:`writer_lock`)
    _spectra/<dataset>/rows/<rows key>/rows.parquet           canonical dataset rows (``discl_ray.data.materialize``)

**Image keys.** Every generated output has a content key (:func:`image_key`): a digest of the settings digest
(:func:`settings_digest`: the generator's identity — a digest of its weight and config files, not its name —
plus scheduler, steps, guidance, size, dtype, noise mode, negative prompt, aesthetic scores, image format),
the source image's bytes digest, the source id (it seeds the noise), the prompt, λ and the seed. A store part
holds rows of one λ and is named by a digest of its sorted keys, so a rewrite of the same work replaces the
same file; each write is atomic. Rows keep the stage's schema (``plan.SPECTRUM_SCHEMA``) plus ``key``.

**Score keys** (:func:`score_key`): the CLIP model's identity (a digest of its architecture and weight
files), the image key and the filter prompt. Score parts hold ``score_key``, ``image_key`` and the scores.

**Manifests.** Each experiment records the keys it uses in ``<exp>/generate/manifest.parquet``
(``MANIFEST_SCHEMA``: image_id, key, source_image_id, lam, seed, part — the part's path relative to the
store root) and ``<exp>/generate/manifest.json`` (store URI, store digest = digest of the sorted keys,
settings digest, number of keys). ``<exp>/generate/spectrum/`` stays what the later stages read: the store
parts the experiment uses, hard-linked when local (copied on object stores), and a filtered part where a
store part also holds keys the experiment does not use. A reader that wants one λ straight from the store
calls :func:`spectrum_parts` and keeps the rows whose ``key`` is in the manifest.

Concurrency: a writer holds :func:`writer_lock` from planning to the last part, so two experiments started
together never generate a key twice — the second waits, then finds the keys written and reuses them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import posixpath
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from discl_ray.errors import MissingInput
from discl_ray.runtime.content import (  # noqa: F401 (the store's shared primitives, re-exported)
    LOCK_WAIT_S,
    ROWS_DIR,
    STORE_DIR,
    _h,
    files_digest,
    rows_root,
    store_root,
    writer_lock,
)
from discl_ray.runtime.storage import Storage, as_storage

if TYPE_CHECKING:
    from discl_ray.config import ExperimentConfig, GenerationConfig, ScoringConfig
    from discl_ray.runtime.cluster import RunPaths

log = logging.getLogger(__name__)

FORMAT = 1
MANIFEST = "manifest.parquet"
MANIFEST_META = "manifest.json"
MANIFEST_SCHEMA = pa.schema([("image_id", pa.string()), ("key", pa.string()), ("source_image_id", pa.string()),
                             ("lam", pa.float64()), ("seed", pa.int64()), ("part", pa.string())])
STORE_SCORE_SCHEMA = pa.schema([("score_key", pa.string()), ("image_key", pa.string()),
                                ("clip_text_cos", pa.float64()), ("clip_image_cos", pa.float64()),
                                ("clip_score", pa.float64()), ("clip_model", pa.string())])


def lam_dir(lam: float) -> str:
    """The hive partition folder of a λ: ``lam=0.3`` (``lam=0.0`` for λ = 0)."""
    return f"lam={round(float(lam), 6)!r}"


def lam_partitioning():
    """The typed hive partitioning to read ``images/`` with ``pyarrow.dataset`` (the files hold ``lam`` too,
    so an untyped ``"hive"`` partitioning fails to merge the string partition with the float column)."""
    import pyarrow.dataset as ds

    return ds.partitioning(pa.schema([("lam", pa.float64())]), flavor="hive")


# -- identities ---------------------------------------------------------------------------------------------
def generator_identity(model: str, cache: Optional[Path]) -> str:
    """The generator's identity: a digest of its local weight and config files (the toy worlds' included),
    or ``hub:<id>`` / the URI for a checkpoint that is not a local folder."""
    from discl_ray.generation.pipeline import resolve_model

    path = resolve_model(model, cache)
    if Path(path).exists():
        return "files:" + files_digest(path, cache)
    return f"ref:{path}"


def settings_digest(gen: "GenerationConfig", cache: Optional[Path]) -> str:
    """Everything besides (source, prompt, λ, seed) that decides an output's pixels and bytes."""
    fields = {"generator": generator_identity(gen.model, cache), "scheduler": gen.scheduler, "steps": gen.steps,
              "guidance_scale": float(gen.guidance_scale), "width": gen.width, "height": gen.height,
              "dtype": gen.dtype, "shared_noise": gen.shared_noise, "negative_prompt": gen.negative_prompt,
              "aesthetic_score": float(gen.aesthetic_score),
              "negative_aesthetic_score": float(gen.negative_aesthetic_score),
              "image_format": gen.image_format,
              "jpeg_quality": gen.jpeg_quality if gen.image_format == "jpeg" else None}
    return _h(json.dumps(fields, sort_keys=True))


def source_digest(image: Optional[bytes], path: Optional[str], root: Optional[str]) -> str:
    """The digest of a source image's bytes (``""`` when it cannot be read: its keys will fail anyway)."""
    if image is not None:
        return hashlib.blake2b(image, digest_size=16).hexdigest()
    if not path:
        return ""
    full = path if (root is None or os.path.isabs(path) or "://" in path) else os.path.join(root, path)
    try:
        return hashlib.blake2b(as_storage(full).read_bytes(), digest_size=16).hexdigest()
    except (OSError, FileNotFoundError):
        return ""


def image_key(settings: str, source_id: str, source_dig: str, prompt: str, lam: float, seed: int) -> str:
    """The content key of one output (see the module docstring)."""
    return _h(settings, source_id, source_dig, prompt, round(float(lam), 6), int(seed))


def clip_identity(scoring: "ScoringConfig", cache: Path) -> str:
    """The CLIP model's identity: its architecture name plus digests of its architecture and weight files."""
    from discl_ray.models.clip import resolve_clip_source

    config_path, pretrained = resolve_clip_source(scoring, cache)
    parts = [scoring.model]
    for p in (config_path, pretrained):
        parts.append(files_digest(p, cache) if p and Path(p).exists() else str(p))
    return _h(*parts)


def score_key(clip_id: str, img_key: str, prompt: str) -> str:
    return _h(clip_id, img_key, prompt)


# -- the store ----------------------------------------------------------------------------------------------
def _image_parts(store: "str | Storage") -> list[Storage]:
    return as_storage(store).join("images").ls(".parquet", recursive=True)


def store_index(store: "str | Storage") -> pa.Table:
    """(key, part) of every image in the store; ``part`` is relative to the store root."""
    store = as_storage(store)
    keys, parts = [], []
    for f in _image_parts(store):
        col = pq.read_table(f.path, columns=["key"], filesystem=f.fs)["key"]
        keys.append(col)
        parts.append(pa.array([posixpath.relpath(f.path, store.path)] * len(col), pa.string()))
    if not keys:
        return pa.table({"key": pa.array([], pa.string()), "part": pa.array([], pa.string())})
    return pa.table({"key": pa.chunked_array([c for k in keys for c in k.chunks], pa.string()),
                     "part": pa.chunked_array(parts, pa.string())})


def write_image_parts(table: pa.Table, store: "str | Storage") -> list[str]:
    """Write spectrum rows (with ``key``) as one atomic part per λ: ``images/lam=<λ>/part-<digest of keys>``."""
    store = as_storage(store)
    written = []
    for lam in sorted(set(table["lam"].to_pylist())):
        sub = table.filter(pc.equal(table["lam"], lam))
        name = "part-" + _h(*sorted(sub["key"].to_pylist()))
        target = store.join("images", lam_dir(lam), f"{name}.parquet")
        target.write_parquet(sub)
        written.append(posixpath.relpath(target.path, store.path))
    return written


# -- manifests and the experiment's view ----------------------------------------------------------------
def keys_digest(keys: Iterable[str]) -> str:
    return _h(*sorted(keys))


def write_manifest(generate_dir: "str | Storage", store: "str | Storage", manifest: pa.Table, settings: str) -> dict:
    """Write ``manifest.parquet`` + ``manifest.json`` into the experiment's ``generate/`` folder."""
    gdir, store = as_storage(generate_dir), as_storage(store)
    manifest = manifest.cast(MANIFEST_SCHEMA).sort_by([("lam", "ascending"), ("image_id", "ascending")])
    gdir.join(MANIFEST).write_parquet(manifest)
    meta = {"format": FORMAT, "store": str(store), "store_digest": keys_digest(manifest["key"].to_pylist()),
            "settings_digest": settings, "keys": manifest.num_rows,
            "lams": sorted(set(manifest["lam"].to_pylist()))}
    gdir.join(MANIFEST_META).write_text(json.dumps(meta, indent=1))
    return meta


def read_manifest(generate_dir: "str | Storage") -> tuple[dict, pa.Table]:
    """(manifest.json, manifest.parquet) of an experiment's ``generate/`` folder (FileNotFoundError if none)."""
    gdir = as_storage(generate_dir)
    meta = gdir.join(MANIFEST_META)
    if not meta.is_file():
        raise MissingInput(f"no spectrum manifest in {gdir}; run `discl generate` first")
    f = gdir.join(MANIFEST)
    return json.loads(meta.read_text()), pq.read_table(f.path, filesystem=f.fs)


def spectrum_parts(generate_dir: "str | Storage", lam: Optional[float] = None) -> list[str]:
    """URIs of the store parts an experiment uses (all λ, or one λ), sorted. Parts may hold keys of other
    experiments: keep the rows whose ``key`` is in the manifest (``read_manifest``)."""
    meta, manifest = read_manifest(generate_dir)
    if lam is not None:
        manifest = manifest.filter(pc.equal(manifest["lam"], round(float(lam), 6)))
    store = as_storage(meta["store"])
    return [str(store.join(p)) for p in sorted(set(manifest["part"].to_pylist()))]


def _link_or_copy(src: Storage, dst: Storage) -> None:
    if src.is_local and dst.is_local:
        dst.parent.mkdir()
        tmp = f"{dst.path}.{os.getpid()}.tmp"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        try:
            os.link(src.path, tmp)
        except OSError:  # another filesystem: copy
            dst.write_bytes(src.read_bytes())
            return
        os.replace(tmp, dst.path)
        return
    dst.write_bytes(src.read_bytes())


def link_parts(store: "str | Storage", parts: list[str], view_dir: "str | Storage") -> None:
    """Link (copy on object stores) whole store parts into an experiment's view folder."""
    store, view = as_storage(store), as_storage(view_dir)
    for part in parts:
        _link_or_copy(store.join(part), view.join(posixpath.basename(part)))


def build_view(store: "str | Storage", manifest: pa.Table, view_dir: "str | Storage") -> int:
    """Make ``view_dir`` (``<exp>/generate/spectrum``) hold exactly the manifest's rows: whole store parts
    linked (copied on object stores), partly used ones as a filtered part. Returns the number of files."""
    store, view = as_storage(store), as_storage(view_dir)
    want: set[str] = set()
    used = manifest.group_by("part").aggregate([("key", "list")])
    for part, keys in zip(used["part"].to_pylist(), used["key_list"].to_pylist()):
        src = store.join(part)
        have = pq.read_table(src.path, columns=["key"], filesystem=src.fs)["key"]
        name = posixpath.basename(part)
        if len(have) == len(keys) and set(have.to_pylist()) == set(keys):
            dst = view.join(name)
            if not dst.is_file():
                _link_or_copy(src, dst)
        else:
            rows = pq.read_table(src.path, filesystem=src.fs)
            rows = rows.filter(pc.is_in(rows["key"], value_set=pa.array(keys, pa.string())))
            name = "part-" + _h(*sorted(keys)) + ".parquet"
            dst = view.join(name)
            if not dst.is_file():
                dst.write_parquet(rows)
        want.add(name)
    for f in view.parquet_files():
        if f.name not in want:
            f.delete()
    return len(want)


# -- garbage collection -------------------------------------------------------------------------------------
def used_keys(run_root: "str | Storage", store: "str | Storage") -> tuple[set[str], set[str], list[str]]:
    """(image keys, score keys, experiments) that the experiments under ``run_root`` use from ``store``."""
    root, store = as_storage(run_root), as_storage(store)
    keys: set[str] = set()
    scores: set[str] = set()
    exps = []
    for info in root.fs.get_file_info(pafs.FileSelector(root.path, allow_not_found=True)):
        if info.type != pafs.FileType.Directory:
            continue
        name = posixpath.basename(info.path)
        if name.startswith(("_", ".")):
            continue
        gdir = root.join(name, "generate")
        try:
            meta, manifest = read_manifest(gdir)
        except FileNotFoundError:
            continue
        if as_storage(meta["store"]).path != store.path:
            continue
        exps.append(name)
        keys.update(manifest["key"].to_pylist())
        sk = root.join(name, "score", "score_keys.parquet")
        if sk.is_file():
            scores.update(pq.read_table(sk.path, columns=["score_key"], filesystem=sk.fs)["score_key"].to_pylist())
    return keys, scores, exps


def gc_store(run_root: "str | Storage", store: "str | Storage", dry_run: bool = False) -> dict:
    """Drop store keys that no experiment under ``run_root`` uses (image rows, then their scores).

    Image parts none of whose keys is used are deleted (a part that is partly used stays whole: experiments'
    manifests name it); score rows are kept while an experiment uses them or their image is still stored.
    Holds the writer lock, so it never races a ``discl generate`` on the same store."""
    store = as_storage(store)
    with writer_lock(store, "gc"):
        keep, keep_scores, exps = used_keys(run_root, store)
        keep_arr = pa.array(sorted(keep), pa.string())
        dropped = kept = files = 0
        for f in _image_parts(store):
            col = pq.read_table(f.path, columns=["key"], filesystem=f.fs)["key"]
            n_keep = pc.sum(pc.is_in(col, value_set=keep_arr)).as_py() or 0
            if n_keep:
                kept += len(col)
                continue
            dropped += len(col)
            files += 1
            if not dry_run:
                f.delete()
        s_dropped = 0
        for f in store.join("scores").parquet_files():
            table = pq.read_table(f.path, filesystem=f.fs)
            mask = pc.or_(pc.is_in(table["score_key"], value_set=pa.array(sorted(keep_scores), pa.string())),
                          pc.is_in(table["image_key"], value_set=keep_arr))
            n_keep = pc.sum(mask).as_py() or 0
            if n_keep == table.num_rows:
                continue
            s_dropped += table.num_rows - n_keep
            if dry_run:
                continue
            if n_keep:
                sub = table.filter(mask)
                store.join("scores", "part-" + _h(*sorted(sub["score_key"].to_pylist())) + ".parquet").write_parquet(sub)
            f.delete()
    return {"store": str(store), "experiments": exps, "images_kept": kept, "images_dropped": dropped,
            "image_parts_dropped": files, "scores_dropped": s_dropped, "dry_run": dry_run}


def store_input(cfg: "ExperimentConfig", paths: "Optional[RunPaths]" = None) -> Optional[tuple[Any, dict[str, str]]]:
    """``(mlflow Dataset, tags)`` naming the spectrum store the experiment uses, from its manifest
    (this module's format): source = the store, digest = the store digest (a digest of the keys the
    experiment uses), so runs on the same spectrum show the same digest. None without a manifest."""
    import mlflow.data

    from discl_ray.runtime.cluster import RunPaths

    try:
        meta, manifest = read_manifest((paths or RunPaths.from_config(cfg)).store("generate"))
    except FileNotFoundError:
        return None
    frame = manifest.select(["image_id", "key", "source_image_id", "lam", "seed"]).to_pandas()
    ds = mlflow.data.from_pandas(frame, source=meta["store"], name=f"{cfg.dataset.name}-spectrum-store",
                                 digest=meta["store_digest"])
    return ds, {"spectrum_store": meta["store"], "spectrum_store_digest": meta["store_digest"],
                "settings_digest": meta["settings_digest"]}


def log_store_input(cfg: "ExperimentConfig", stage: str, paths: "Optional[RunPaths]" = None) -> bool:
    """Log :func:`store_input` to the active MLflow run of a generate, score, train or sweep stage (a
    baseline's train run reads no spectrum: nothing)."""
    import logging

    import mlflow

    from discl_ray.runtime.tracking import DATASET_STAGES

    if stage in DATASET_STAGES and cfg.training.strategy == "none":
        return False
    try:
        found = store_input(cfg, paths)
        if found is None:
            return False
        mlflow.log_input(found[0], context="spectrum", tags=found[1])
        return True
    except Exception as err:  # noqa: BLE001 - bookkeeping never stops the stage it describes
        logging.getLogger(__name__).warning("could not log the spectrum store input to MLflow: %s", err)
        return False
