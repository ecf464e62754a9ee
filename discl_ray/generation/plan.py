"""Planning a spectrum run: which (source, λ, seed) keys to make, and the cheap CPU preparation step.

Inputs are the hard-sample table (``<exp>/mine/``), the canonical training rows (image bytes or path) and
the prompts table (``<exp>/prompts/``). ``plan_sources`` joins them into one row per hard source;
``prepare_sources`` (a Ray Data CPU ``map_batches`` step) validates, decodes and resizes each source once
and lists the (λ, seed) keys still missing for it. The generator actor fans a source out into its keys
itself, so a source image travels once, not once per key. Sources that cannot be loaded carry an
``error`` reason, so their keys flow to the error table instead of stopping the job.
``fan_out`` (one row per key) remains for the benchmark's one-call-per-output baseline.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import pyarrow as pa

from discl_ray.errors import MissingInput, UserError
from discl_ray.generation.engine import output_key
from discl_ray.runtime.io import ImageLoadError, load_image, parquet_files, png_bytes, read_parquet_dir, stable_seed

if TYPE_CHECKING:
    from discl_ray.config import ExperimentConfig, GenerationConfig
    from discl_ray.runtime.cluster import RunPaths
    from discl_ray.runtime.storage import Storage

SPECTRUM_SCHEMA = pa.schema([
    ("image_id", pa.string()), ("source_image_id", pa.string()), ("label", pa.int64()),
    ("class_name", pa.string()), ("lam", pa.float64()), ("seed", pa.int64()), ("prompt", pa.string()),
    ("image", pa.binary()), ("width", pa.int64()), ("height", pa.int64()), ("generator", pa.string()),
    ("steps", pa.int64()), ("guidance_scale", pa.float64()), ("format", pa.string()),
    ("noise_seed", pa.int64()),          # the torch seed of the image's noise (generation.shared_noise)
])
ERRORS_SCHEMA = pa.schema([("key", pa.string()), ("source_image_id", pa.string()), ("reason", pa.string())])
SOURCES_SCHEMA = pa.schema([
    ("source_image_id", pa.string()), ("label", pa.int64()), ("class_name", pa.string()),
    ("image", pa.binary()), ("path", pa.string()), ("gen_prompts", pa.list_(pa.string())),
    ("error", pa.string()),
])
# Work rows: one output image to make (``source`` = resized PNG bytes; ``error`` != "" = cannot be made).
WORK_SCHEMA = pa.schema([
    ("key", pa.string()), ("source_image_id", pa.string()), ("label", pa.int64()), ("class_name", pa.string()),
    ("lam", pa.float64()), ("seed", pa.int64()), ("prompt", pa.string()), ("source", pa.binary()),
    ("error", pa.string()),
])


# Prepared sources: one row per source with its resized PNG and the (λ, seed) pairs still to make.
PREP_SCHEMA = pa.schema([
    ("source_image_id", pa.string()), ("label", pa.int64()), ("class_name", pa.string()),
    ("source", pa.binary()), ("gen_prompts", pa.list_(pa.string())), ("lams", pa.list_(pa.float64())),
    ("seeds", pa.list_(pa.int64())), ("error", pa.string()),
])


def spectrum_lams(gen: "GenerationConfig") -> list[float]:
    """The λ levels to generate: the configured ones minus λ = 1 (the real image itself)."""
    return [float(lam) for lam in gen.lams if lam < 1.0]


def pick_prompt(gen_prompts: list[str], source_image_id: str, seed: int) -> str:
    """The prompt of an output: a stable choice among the class's prompts per (source, seed)."""
    return gen_prompts[stable_seed(source_image_id, int(seed)) % len(gen_prompts)]


def done_keys(directory: "str | Path | Storage") -> set[str]:
    """Keys already written to a spectrum directory (finished part files only)."""
    if not parquet_files(directory):
        return set()
    return set(read_parquet_dir(directory, columns=["image_id"])["image_id"].to_pylist())


MANIFEST_KEYS_SCHEMA = pa.schema([("image_id", pa.string()), ("key", pa.string()), ("source_image_id", pa.string()),
                                  ("lam", pa.float64()), ("seed", pa.int64())])


def planned_keys(sources: pa.Table, lams: list[float], seeds: list[int], settings: str,
                 digests: dict[str, str]) -> pa.Table:
    """Every (source, λ, seed) output of the plan with its image_id and content key (``store.image_key``).

    The prompt in the key is the one the generator will use (:func:`pick_prompt`)."""
    from discl_ray.generation.store import image_key

    out: dict[str, list] = {k: [] for k in MANIFEST_KEYS_SCHEMA.names}
    for sid, gp in zip(sources["source_image_id"].to_pylist(), sources["gen_prompts"].to_pylist()):
        for lam in lams:
            for seed in seeds:
                prompt = pick_prompt(gp, sid, seed) if gp else ""
                out["image_id"].append(output_key(sid, lam, seed))
                out["key"].append(image_key(settings, sid, digests.get(sid, ""), prompt, lam, seed))
                out["source_image_id"].append(sid)
                out["lam"].append(round(float(lam), 6))
                out["seed"].append(int(seed))
    return pa.table(out, schema=MANIFEST_KEYS_SCHEMA)


def block_sources(gen: "GenerationConfig") -> int:
    """Sources per block: a block holds whole sources (a multiple of |Λ|·|seeds| outputs), at least
    ``rows_per_block`` outputs and at least 4 pipeline batches, so actors never get ragged tails."""
    per_source = max(1, len(spectrum_lams(gen)) * len(gen.seeds))
    want = max(gen.rows_per_block, 4 * gen.batch_size)
    return max(1, -(-want // per_source))


def _pending(batch: pa.Table, lams, seeds, skip, root, width, height):
    """(row, missing (λ, seed) pairs, resized source PNG or None, error) for each source with a missing key;
    each source is decoded once, an undecodable one carries its error instead."""
    skip = skip if isinstance(skip, (set, frozenset)) else set(skip)
    for row in batch.to_pylist():
        sid = row["source_image_id"]
        todo = [(lam, seed) for lam in lams for seed in seeds if output_key(sid, lam, seed) not in skip]
        if not todo:
            continue
        error, source = row["error"] or "", None
        if not error:
            try:
                source = load_source(row["image"], row["path"], root, width, height)
            except ImageLoadError as err:
                error = str(err)
        yield row, todo, source, error


def prepare_sources(batch: pa.Table, lams: list[float], seeds: list[int], skip: Iterable[str] = (),
                    root: Optional[str] = None, width: Optional[int] = None,
                    height: Optional[int] = None) -> pa.Table:
    """Sources → one row per source with a missing key: resized PNG (decoded once) + its missing (λ, seed)."""
    out: dict[str, list] = {k: [] for k in PREP_SCHEMA.names}
    for row, todo, source, error in _pending(batch, lams, seeds, skip, root, width, height):
        sid = row["source_image_id"]
        out["source_image_id"].append(sid)
        out["label"].append(row["label"])
        out["class_name"].append(row["class_name"])
        out["source"].append(source)
        out["gen_prompts"].append(row["gen_prompts"] or [])
        out["lams"].append([float(t[0]) for t in todo])
        out["seeds"].append([int(t[1]) for t in todo])
        out["error"].append(error)
    return pa.table(out, schema=PREP_SCHEMA)


def check_existing(directory: str | Path, gen: "GenerationConfig") -> None:
    """Refuse to resume into a spectrum written with another model, step count or guidance scale.

    Keys name only (source, λ, seed), so mixing settings would silently skip keys made differently.
    A folder that is a spectrum store view (``manifest.json`` beside it) is always fine: ``discl generate``
    rebuilds it from the store, whose keys cover every setting."""
    from discl_ray.runtime.storage import as_storage

    if not parquet_files(directory) or as_storage(directory).parent.join("manifest.json").is_file():
        return
    table = read_parquet_dir(directory, columns=["generator", "steps", "guidance_scale"])
    found = {(g, s, w) for g, s, w in zip(table["generator"].to_pylist(), table["steps"].to_pylist(),
                                          table["guidance_scale"].to_pylist())}
    want = (gen.model, gen.steps, float(gen.guidance_scale))
    other = sorted(f for f in found if f != want)
    if other:
        raise UserError(f"{directory} already holds outputs made with (generation.model, steps, guidance_scale) = "
                         f"{other}, not {want}; use another experiment name or remove that directory")
    _check_noise(directory, gen)


def _check_noise(directory, gen: "GenerationConfig") -> None:
    """Refuse to mix noise modes: rows whose recorded noise seed is not what ``generation.shared_noise`` gives
    (rows written before the column existed count as per-key noise)."""
    from discl_ray.generation.engine import noise_seed

    cols = ["source_image_id", "lam", "seed", "noise_seed"]
    try:
        table = read_parquet_dir(directory, columns=cols)
    except (KeyError, ValueError):
        table = None
    rows = table.to_pylist()[:1000] if table is not None and "noise_seed" in table.column_names else []
    for r in rows:
        if r["noise_seed"] is None:
            r["noise_seed"] = noise_seed(r["source_image_id"], r["lam"], r["seed"], shared=False)
        if r["noise_seed"] != noise_seed(r["source_image_id"], r["lam"], r["seed"], shared=gen.shared_noise):
            raise UserError(f"{directory} already holds outputs made with generation.shared_noise="
                             f"{not gen.shared_noise}; use another experiment name or remove that directory")


def plan_sources(hard: pa.Table, rows: pa.Table, prompts: pa.Table) -> pa.Table:
    """One row per hard source with its image bytes/path and its class's generation prompts.

    A hard id missing from the canonical rows, or a class without prompts, gets an ``error`` reason."""
    by_id = {iid: i for i, iid in enumerate(rows["image_id"].to_pylist())}
    prompt_of = dict(zip(prompts["label"].to_pylist(), prompts["gen_prompts"].to_pylist()))
    images, paths = rows["image"], rows["path"]
    out: dict[str, list] = {k: [] for k in SOURCES_SCHEMA.names}
    seen = set()
    for iid, label, name in zip(hard["image_id"].to_pylist(), hard["label"].to_pylist(),
                                hard["class_name"].to_pylist()):
        if iid in seen:
            continue
        seen.add(iid)
        i = by_id.get(iid)
        gp = [p for p in (prompt_of.get(label) or []) if p]
        error = ""
        if i is None:
            error = "missing: source image_id not in the dataset's train split"
        elif not gp:
            error = f"no generation prompts for label {label} in the prompts table"
        out["source_image_id"].append(iid)
        out["label"].append(int(label))
        out["class_name"].append(name)
        out["image"].append(images[i].as_py() if i is not None else None)
        out["path"].append(paths[i].as_py() if i is not None else None)
        out["gen_prompts"].append(gp)
        out["error"].append(error)
    return pa.table(out, schema=SOURCES_SCHEMA)


def load_source(image: Optional[bytes], path: Optional[str], root: Optional[str],
                width: Optional[int], height: Optional[int]) -> bytes:
    """Decode one source (bytes or path), resize to the configured size, return RGB PNG bytes."""
    from PIL import Image

    img = load_image(image, path, root)
    if width or height:
        size = (width or img.width, height or img.height)
        if img.size != size:
            img = img.resize(size, Image.BICUBIC)
    return png_bytes(img)


def fan_out(batch: pa.Table, lams: list[float], seeds: list[int], skip: Iterable[str] = (),
            root: Optional[str] = None, width: Optional[int] = None, height: Optional[int] = None) -> pa.Table:
    """Sources → one work row per (λ, seed) key not in ``skip``; each source is decoded once."""
    out: dict[str, list] = {k: [] for k in WORK_SCHEMA.names}
    for row, todo, source, error in _pending(batch, lams, seeds, skip, root, width, height):
        sid = row["source_image_id"]
        for lam, seed in todo:
            out["key"].append(output_key(sid, lam, seed))
            out["source_image_id"].append(sid)
            out["label"].append(row["label"])
            out["class_name"].append(row["class_name"])
            out["lam"].append(lam)
            out["seed"].append(seed)
            out["prompt"].append(pick_prompt(row["gen_prompts"], sid, seed) if row["gen_prompts"] else "")
            out["source"].append(source)
            out["error"].append(error)
    return pa.table(out, schema=WORK_SCHEMA)


def read_inputs(cfg: "ExperimentConfig", paths: "Optional[RunPaths]" = None) -> tuple[pa.Table, pa.Table, pa.Table]:
    """(hard samples, canonical train rows, prompts) of the experiment; clear errors when a stage is missing.
    ``paths``: the run's locations when the caller has them (the stage's context)."""
    from discl_ray.data import read_rows
    from discl_ray.runtime.cluster import RunPaths

    paths = paths or RunPaths.from_config(cfg)
    tables = []
    for stage, cmd in (("mine", "discl mine"), ("prompts", "discl prompts")):
        try:
            tables.append(read_parquet_dir(paths.store(stage)))
        except FileNotFoundError:
            raise MissingInput(f"no {stage} table at {paths.store(stage)}; run `{cmd}` first") from None
    hard, prompts = tables
    return hard, read_rows(cfg, splits=("train",), paths=paths), prompts
