"""A copy of the real images prepared once at the training resolution (``training.prepared_images``, issue 26).

A streamed epoch decodes every real image it trains on; a 224² JPEG costs ≈ 0.28 ms at its reduced DCT scale
where the same image stored at the training's base size (32² on the toy bench) costs ≈ 0.1 ms, and an
ImageNet-size JPEG far more. With ``training.prepared_images`` the train driver writes, before the workers
start, each canonical rows file again with every decodable image decoded, ``base``-resized (the pipeline's own
deterministic first step: the toy square, ResNet's shorter side ``resize``) and encoded as JPEG quality
:data:`QUALITY` without chroma subsampling (4:4:4: PIL's default 4:2:0 moved a noisy 16² image by 50 grey levels
on average, 4:4:4 by 3); every other column is kept. It runs as a Ray Data job, one row per rows file (a file is read,
converted and written by one task; Ray Data retries a lost task), into
``<run_root>/<experiment>/prepared/<kind>-<resize>/`` under the rows file's own name, then a
``_prepared.json`` manifest keyed by the rows files (name and size), the pipeline and the quality: a later run
with the same key reuses the copy; a changed dataset or resolution writes it again. An image that cannot be
decoded keeps its original bytes or path, so the stream drops and counts it as before.

The workers' stream reads the prepared files instead of the originals; the cache path (small datasets, decoded
once in memory) keeps the originals. The copy is lossy once more (JPEG at quality 95, 4:4:4, of the base image): with
it, streamed pixels are close to, not equal to, the cache's.
"""

from __future__ import annotations

import io
import json
import logging
import time
from typing import Optional

log = logging.getLogger(__name__)

QUALITY = 95
MANIFEST = "_prepared.json"


def prepared_store(cfg, paths, pipe):
    """Where the copy for ``pipe`` lives (a :class:`~discl_ray.runtime.storage.Storage`)."""
    return paths.store("prepared", f"{pipe.kind}-{pipe.resize}")


def _key(paths, pipe) -> dict:
    from discl_ray.runtime.storage import as_storage
    from discl_ray.training.data import stage_files

    files = stage_files(as_storage(paths.dataset))
    return {"files": sorted([f.name, f.info().size] for f in files), "kind": pipe.kind, "resize": pipe.resize,
            "size": pipe.size, "quality": QUALITY, "subsampling": "4:4:4"}


def _current(out, key: dict) -> Optional[dict]:
    m = out.join(MANIFEST)
    try:
        manifest = json.loads(m.read_text())
    except (FileNotFoundError, OSError, ValueError):
        return None
    return manifest if manifest.get("key") == key else None


def prepared_uri(cfg, paths, pipe) -> str:
    """The copy's URI for the workers; a clear error when the driver has not prepared it (or it is stale)."""
    from discl_ray.errors import MissingInput

    out = prepared_store(cfg, paths, pipe)
    if _current(out, _key(paths, pipe)) is None:
        raise MissingInput(f"training.prepared_images: no current prepared copy in {out} (discl train writes it "
                           "before the workers start; run it through discl train or set "
                           "training.prepared_images=false)")
    return str(out)


def convert_file(row: dict, pipe, root, out_uri: str) -> dict:
    """One rows file → its prepared copy (a Ray Data row: ``{"file": URI}``); returns the counts."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from discl_ray.runtime.storage import as_storage
    from discl_ray.training.decode import decode_base

    src = as_storage(row["file"])
    with src.fs.open_input_file(src.path) as fh:
        table = pq.read_table(fh)
    images = table.column("image").to_pylist()
    paths = table.column("path").to_pylist() if "path" in table.column_names else [None] * len(images)
    new_images, new_paths, bad = [], [], 0
    for data, path in zip(images, paths):
        arr = decode_base(pipe, data, path, root) if (data is not None or path) else None
        if arr is None:                       # undecodable: kept as it was, the stream drops and counts it
            new_images.append(data)
            new_paths.append(path)
            bad += 1
            continue
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=QUALITY, subsampling=0)   # 4:4:4
        new_images.append(buf.getvalue())
        new_paths.append(None)
    image_field = table.schema.field("image")
    table = table.set_column(table.column_names.index("image"), image_field,
                             pa.array(new_images, type=image_field.type))
    if "path" in table.column_names:
        path_field = table.schema.field("path")
        table = table.set_column(table.column_names.index("path"), path_field,
                                 pa.array(new_paths, type=path_field.type))
    as_storage(out_uri).join(src.name).write_parquet(table)
    return {"file": src.name, "rows": table.num_rows, "bad": bad,
            "bytes_in": src.info().size}


def prepare_real_images(cfg, paths, pipe=None) -> str:
    """Write (or find current) the prepared copy of the experiment's real images; returns its URI. Ray must be
    initialised (the driver's cluster)."""
    import ray.data

    from discl_ray.runtime.storage import as_storage
    from discl_ray.training.data import stage_files
    from discl_ray.training.transforms import build_pipeline

    pipe = pipe or build_pipeline(cfg)
    out = prepared_store(cfg, paths, pipe)
    key = _key(paths, pipe)
    if _current(out, key) is not None:
        return str(out)
    t0 = time.perf_counter()
    files = [str(f) for f in stage_files(as_storage(paths.dataset))]
    out.mkdir()
    out.join(MANIFEST).delete()
    root = cfg.dataset.root
    out_uri = str(out)
    done = ray.data.from_items([{"file": f} for f in files]).map(
        convert_file, fn_kwargs={"pipe": pipe, "root": root, "out_uri": out_uri}, num_cpus=1,
        concurrency=max(1, min(len(files), int(ray.cluster_resources().get("CPU", 1))))).take_all()
    counts = {"rows": sum(d["rows"] for d in done), "bad": sum(d["bad"] for d in done),
              "bytes_in": sum(d["bytes_in"] for d in done),
              "bytes_out": sum(out.join(d["file"]).info().size for d in done)}
    out.join(MANIFEST).write_text(json.dumps({"key": key, **counts, "seconds": round(time.perf_counter() - t0, 2)},
                                             indent=1))
    log.info("prepared %d real images at %s %d px in %.1f s: %.1f MB → %.1f MB (%s)", counts["rows"], pipe.kind,
             pipe.resize, time.perf_counter() - t0, counts["bytes_in"] / 1e6, counts["bytes_out"] / 1e6, out)
    return out_uri
