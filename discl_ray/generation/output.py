"""The CPU stage after the generator: encode pixels and write each block as a part file, on the workers.

``encode_and_write`` runs as a Ray Data CPU ``map_batches`` (one call per block). It encodes the raw RGB
pixels (``generation.image_format``: png by default, lossless webp, or jpeg; recorded per row in ``format``),
splits the block into spectrum rows and error rows, and writes them straight to storage — the driver only
sees a one-row receipt per block, so its memory does not grow with the number of outputs.

File names are deterministic: ``part-<hash of the block's sorted keys>.parquet``. A block that is written
twice (a retried task, a rerun of identical work) overwrites the same file instead of adding duplicates;
a block that was not written when a run died is planned again from the keys that are missing.
Each write is atomic (temp file + rename locally, a single PUT on an object store).
"""

from __future__ import annotations

import hashlib
import json
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from discl_ray.generation.plan import ERRORS_SCHEMA, SPECTRUM_SCHEMA
from discl_ray.runtime.io import encode_image
from discl_ray.runtime.storage import as_storage

RECEIPT_SCHEMA = pa.schema([("part", pa.string()), ("generated", pa.int64()), ("failed", pa.int64()),
                            ("bytes", pa.int64()), ("actors", pa.list_(pa.string()))])


def part_name(keys: list[str]) -> str:
    """``part-<16 hex>`` from the sorted keys of a block (same keys → same file name)."""
    digest = hashlib.blake2b("\n".join(sorted(keys)).encode(), digest_size=8).hexdigest()
    return f"part-{digest}"


def encode_rows(raw: pa.Table, fmt: str = "png", quality: int = 95) -> pa.Table:
    """Raw generator rows (``actor.RAW_SCHEMA``) → spectrum rows with encoded images (+ ``error``)."""
    images = []
    for px, w, h in zip(raw["pixels"].to_pylist(), raw["width"].to_pylist(), raw["height"].to_pylist()):
        if px is None:
            images.append(None)
            continue
        images.append(encode_image(np.frombuffer(px, dtype=np.uint8).reshape(h, w, 3), fmt, quality))
    n = raw.num_rows
    table = raw.drop_columns(["pixels", "actor"])
    table = table.append_column("image", pa.array(images, pa.binary()))
    table = table.append_column("format", pa.array([fmt] * n, pa.string()))
    return table


def encode_and_write(raw: pa.Table, spectrum_dir: str, errors_dir: str, fmt: str = "png", quality: int = 95,
                     store_dir: Optional[str] = None, settings: str = "",
                     source_digests: Optional[dict[str, str]] = None) -> pa.Table:
    """Encode one block and write its spectrum and error rows; returns a one-row receipt.

    With ``store_dir`` (what ``discl generate`` does) the rows get their content ``key`` and go to the spectrum
    store as one part per λ (``store.write_image_parts``), each then linked into ``spectrum_dir`` (the
    experiment's view); without it they are written to ``spectrum_dir`` directly."""
    table = encode_rows(raw, fmt, quality)
    name = part_name(table["image_id"].to_pylist())
    ok = pc.equal(table["error"], "")
    good = table.filter(ok).select(SPECTRUM_SCHEMA.names).cast(SPECTRUM_SCHEMA)
    bad = table.filter(pc.invert(ok))
    # Errors first: a crash between the two writes leaves the keys missing from spectrum/, so they are retried.
    if bad.num_rows:
        errors = pa.table({"key": bad["image_id"], "source_image_id": bad["source_image_id"],
                           "reason": bad["error"]}, schema=ERRORS_SCHEMA)
        as_storage(errors_dir).join(f"{name}.parquet").write_parquet(errors)
    if good.num_rows and store_dir:
        from discl_ray.generation.store import image_key, link_parts, write_image_parts

        digests = source_digests or {}
        keys = [image_key(settings, sid, digests.get(sid, ""), prompt, lam, seed) for sid, prompt, lam, seed in zip(
            good["source_image_id"].to_pylist(), good["prompt"].to_pylist(), good["lam"].to_pylist(),
            good["seed"].to_pylist())]
        good = good.append_column("key", pa.array(keys, pa.string()))
        link_parts(store_dir, write_image_parts(good, store_dir), spectrum_dir)
    elif good.num_rows:
        as_storage(spectrum_dir).join(f"{name}.parquet").write_parquet(good)
    actors = sorted({a for a in raw["actor"].to_pylist() if a})
    nbytes = int(sum(len(b) for b in good["image"].to_pylist() if b))
    return pa.table({"part": [name], "generated": [good.num_rows], "failed": [bad.num_rows], "bytes": [nbytes],
                     "actors": [actors]}, schema=RECEIPT_SCHEMA)


def merge_actors(receipts: list[list[str]]) -> list[dict]:
    """Unique actors from receipts' ``actors`` lists, as dicts sorted by node then actor id."""
    seen = {a for lst in receipts for a in lst}
    return sorted((json.loads(a) for a in seen), key=lambda d: (d.get("node_id", ""), d.get("actor_id", "")))
