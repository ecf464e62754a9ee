"""Images for the rows a rank trains or evaluates on: a bounded in-memory cache, or a Ray Data stream.

The epoch's rows are chosen from metadata only (``data.py``); this module turns a list of pool rows into
batches of uint8 images (3, size, size) plus their rows. Two implementations of one interface:

- :class:`CachedImages` — every row the run can touch is decoded once into memory. Used only when that
  fits ``training.image_cache_mb`` (estimated before decoding): small datasets such as the toy world keep
  the speed of indexing a tensor. Undecodable images are dropped from the pool at load, as before.
- :class:`StreamedImages` — per call, a Ray Data pipeline: ``read_parquet`` of the image columns with the
  rows' ``image_id`` pushed down as a row filter, decode + ``base`` + ``augment`` in CPU ``map_batches``
  tasks (``training.data_cpus`` each), ``iter_torch_batches`` with prefetch and a seeded local shuffle
  buffer. The worker holds a few batches, never the dataset. An undecodable image is dropped from its
  batch and counted; :func:`fixed_batches` then pads the batch with rows of the same epoch so that every
  rank takes the same number of steps of the same size (DDP and the FLYP all-gather need that).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Optional

import numpy as np
import torch

from discl_ray.io import ImageLoadError, load_image, stable_seed
from discl_ray.training.transforms import InputPipeline

log = logging.getLogger(__name__)


def _decode_one(pipe: InputPipeline, data, path, root) -> Optional[np.ndarray]:
    try:
        return pipe.base(load_image(data, path, root=root))
    except ImageLoadError as err:
        log.warning("skipping undecodable image: %s", err)
        return None


class CachedImages:
    """Base images of every pool row, decoded once (uint8); augment per batch."""

    def __init__(self, pool, pipe: InputPipeline, cfg, tables: dict):
        self.pipe, self.pool = pipe, pool
        arrays: list[Optional[np.ndarray]] = [None] * len(pool.image_id)
        row_of = {iid: i for i, iid in enumerate(pool.image_id)}
        for name, table in tables.items():
            root = cfg.dataset.root if name == "real" else None
            ids = table.column("image_id").to_pylist()
            data = table.column("image").to_pylist()
            paths = table.column("path").to_pylist() if "path" in table.column_names else [None] * len(ids)
            for iid, b, p in zip(ids, data, paths):
                if iid in row_of:
                    arrays[row_of[iid]] = _decode_one(pipe, b, p, root)
        ok = np.array([a is not None for a in arrays], dtype=bool)
        self.n_bad_images = int((~ok).sum())
        self.keep = ok                        # the caller drops the bad rows from the pool (same on every rank)
        kept = [a for a in arrays if a is not None]
        # Toy: one stacked tensor, a batch is one index operation (the speed the toy world relies on).
        self.stacked = (torch.from_numpy(np.stack([a.transpose(2, 0, 1) for a in kept])) if pipe.kind == "toy"
                        and kept else None)
        self.arrays = kept

    def batches(self, rows: np.ndarray, sizes: list[int], train: bool, seed: int) -> Iterator[tuple]:
        start = 0
        for n in sizes:
            sel = rows[start:start + n]
            start += n
            if self.stacked is not None:
                x = self.stacked[torch.as_tensor(sel)]
            else:
                x = torch.from_numpy(np.stack([
                    self.pipe.augment(self.arrays[i], train, stable_seed(seed, self.pool.image_id[i]))
                    for i in sel]))
            yield x, sel

    def eval_batches(self, rows: np.ndarray, batch: int) -> Iterator[tuple]:
        sizes = [min(batch, len(rows) - k) for k in range(0, len(rows), batch)]
        return self.batches(rows, sizes, False, 0)


def _decode_batch(batch: dict, pipe: InputPipeline, train: bool, seed: int, root) -> dict:
    """Ray Data map: bytes/paths → augmented uint8 (B, 3, S, S) + ok flag (bad rows get zeros)."""
    ids = batch["image_id"]
    data = batch["image"]
    paths = batch["path"] if "path" in batch else [None] * len(ids)
    out = np.zeros((len(ids), 3, pipe.size, pipe.size), dtype=np.uint8)
    ok = np.zeros(len(ids), dtype=bool)
    for k, (iid, b, p) in enumerate(zip(ids, data, paths)):
        arr = _decode_one(pipe, b, p, root)
        if arr is not None:
            out[k] = pipe.augment(arr, train, stable_seed(seed, str(iid)))
            ok[k] = True
    return {"image_id": np.asarray(ids, dtype=object), "pixels": out, "ok": ok}


def _collate_fn():
    from ray.data.collate_fn import NumpyBatchCollateFn

    class Collate(NumpyBatchCollateFn):
        """uint8 pixels as a CPU tensor (moved to the device by the loop), ids and flags as numpy."""

        def __call__(self, batch: dict) -> tuple:
            return torch.from_numpy(batch["pixels"]), batch["image_id"], batch["ok"]

    return Collate()


class StreamedImages:
    """Ray Data stream of the requested rows (see module docstring); the pool holds no image."""

    def __init__(self, pool, pipe: InputPipeline, cfg, uris: dict):
        self.pool, self.pipe, self.cfg, self.uris = pool, pipe, cfg, uris
        self.tc = cfg.training
        self.row_of = {iid: i for i, iid in enumerate(pool.image_id)}
        self.bad: set = set()

    @property
    def n_bad_images(self) -> int:
        return len(self.bad)

    def _dataset(self, rows: np.ndarray, train: bool, seed: int):
        import ray.data
        from ray.data.expressions import col

        parts = []
        is_syn = self.pool.split[rows] == "syn"
        for name, mask in (("real", ~is_syn), ("syn", is_syn)):
            ids = self.pool.image_id[rows[mask]].tolist()
            if not ids:
                continue
            cols = ["image_id", "image", "path"] if name == "real" else ["image_id", "image"]
            ds = ray.data.read_parquet(self.uris[name], columns=cols, num_cpus=self.tc.data_cpus)
            # image_id pushed down to the parquet scan: only this rank's rows reach the decode tasks.
            ds = ds.filter(expr=col("image_id").is_in(ids))
            root = self.cfg.dataset.root if name == "real" else None
            parts.append(ds.map_batches(_decode_batch, fn_kwargs=dict(pipe=self.pipe, train=train, seed=seed,
                                                                      root=root),
                                        batch_format="numpy", batch_size=32, num_cpus=self.tc.data_cpus))
        return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]

    def stream(self, rows: np.ndarray, batch: int, train: bool, seed: int) -> Iterator[tuple]:
        """(uint8 images, pool rows) of ``rows`` in stream order; undecodable images dropped and counted."""
        if len(rows) == 0:
            return
        ds = self._dataset(np.asarray(rows), train, seed)
        shuffle = self.tc.shuffle_buffer if train and self.tc.shuffle_buffer > 1 else None
        for x, ids, ok in ds.iter_torch_batches(batch_size=batch, prefetch_batches=self.tc.prefetch_batches,
                                                local_shuffle_buffer_size=shuffle,
                                                local_shuffle_seed=seed % (2**31) if shuffle else None,
                                                collate_fn=_collate_fn()):
            if not ok.all():
                self.bad.update(str(i) for i in ids[~ok])
                x, ids = x[torch.as_tensor(ok)], ids[ok]
            yield x, np.array([self.row_of[str(i)] for i in ids], dtype=np.int64)

    def batches(self, rows: np.ndarray, sizes: list[int], train: bool, seed: int) -> Iterator[tuple]:
        return fixed_batches(self.stream(rows, max(sizes, default=1), train, seed), sizes)

    def eval_batches(self, rows: np.ndarray, batch: int) -> Iterator[tuple]:
        # No padding at eval: a dropped image is simply not scored.
        return self.stream(rows, batch, False, 0)


def fixed_batches(stream: Iterator[tuple], sizes: list[int]) -> Iterator[tuple]:
    """Re-cut a stream of (images, rows) into batches of exactly ``sizes``; when the stream runs short
    (dropped images), pad with rows already seen this epoch, so all ranks step in lock-step."""
    buf_x: list[torch.Tensor] = []
    buf_r: list[np.ndarray] = []
    have = 0
    seen_x: Optional[torch.Tensor] = None
    seen_r: Optional[np.ndarray] = None
    it = iter(stream)
    for n in sizes:
        while have < n:
            nxt = next(it, None)
            if nxt is None:
                break
            buf_x.append(nxt[0])
            buf_r.append(nxt[1])
            have += len(nxt[1])
        if have == 0 and seen_x is None:
            return                                  # nothing decodable at all
        x = torch.cat(buf_x) if buf_x else seen_x[:0]
        r = np.concatenate(buf_r) if buf_r else seen_r[:0]
        out_x, out_r = x[:n], r[:n]
        buf_x, buf_r = ([x[n:]], [r[n:]]) if len(r) > n else ([], [])
        have = max(0, len(r) - n)
        if len(out_r) < n:                           # pad from this epoch's rows
            pool_x = torch.cat([out_x, seen_x]) if seen_x is not None else out_x
            pool_r = np.concatenate([out_r, seen_r]) if seen_r is not None else out_r
            pick = np.arange(n - len(out_r)) % len(pool_r)
            out_x = torch.cat([out_x, pool_x[torch.as_tensor(pick)]])
            out_r = np.concatenate([out_r, pool_r[pick]])
        seen_x, seen_r = out_x, out_r
        yield out_x, out_r


def build_images(pool, pipe: InputPipeline, cfg, uris: dict, tables_loader) -> tuple[object, Optional[np.ndarray]]:
    """Cache when the decoded pool fits ``training.image_cache_mb``, else stream. Returns (images, keep mask
    for the pool or None). ``tables_loader()`` reads the image columns (cache path only)."""
    est = estimate_cache_bytes(pipe, len(pool.image_id))
    if est <= cfg.training.image_cache_mb * 2**20:
        log.info("image cache: %d rows, ~%.0f MiB decoded", len(pool.image_id), est / 2**20)
        cache = CachedImages(pool, pipe, cfg, tables_loader())
        return cache, cache.keep
    log.info("streaming images through Ray Data (%d rows, ~%.0f MiB decoded > cache cap %d MiB)",
             len(pool.image_id), est / 2**20, cfg.training.image_cache_mb)
    return StreamedImages(pool, pipe, cfg, uris), None


def estimate_cache_bytes(pipe: InputPipeline, n_rows: int) -> int:
    """Decoded bytes of the cache: toy = size² squares; others = the base image (shorter side ``resize``,
    4:3 assumed)."""
    per = 3 * pipe.size * pipe.size if pipe.kind == "toy" else 3 * pipe.resize * round(pipe.resize * 4 / 3)
    return per * n_rows


def will_stream(cfg) -> bool:
    """Whether the workers will stream (driver-side estimate from the row counts; no image is read)."""
    import pyarrow.dataset as ds

    from discl_ray.training.data import stage_uris
    from discl_ray.training.transforms import pipeline_kind

    tc = cfg.training
    n = 0
    for name, uri in stage_uris(cfg).items():
        if name == "syn" and tc.strategy == "none":
            continue
        try:
            n += ds.dataset(uri, format="parquet").count_rows()
        except (FileNotFoundError, OSError):
            continue
    size = tc.image_size or cfg.dataset.image_size
    kind = pipeline_kind(tc)
    pipe = InputPipeline(kind, size, size if kind != "resnet" else tc.resize_size or round(size * 256 / 224))
    return estimate_cache_bytes(pipe, n) > tc.image_cache_mb * 2**20
