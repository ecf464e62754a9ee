"""Images for the rows a rank trains or evaluates on: a bounded in-memory cache, or a Ray Data stream.

The epoch's rows are chosen from metadata only (``data.py``); this module turns a list of pool rows into
batches of uint8 images (3, size, size) plus their rows. Two implementations of one interface:

- :class:`CachedImages` — every row the run can touch is decoded once into memory. Used only when that
  fits ``training.image_cache_mb`` (estimated before decoding): small datasets such as the toy world keep
  the speed of indexing a tensor. Undecodable images are dropped from the pool at load, as before.
- :class:`StreamedImages` — per call, a Ray Data pipeline over storage units (parquet row groups) in the
  epoch's seeded unit order: each CPU ``map_batches`` task (``training.data_cpus``) reads one row group's
  ``image_id, image[, path]``, keeps the wanted rows and decodes + ``base`` + ``augment`` s them; the worker
  re-emits them in the planned order (seeded unit order + a shuffle buffer simulated on metadata, so real
  and synthetic rows interleave and the same seed gives the same batches). Each unit is read once per
  epoch, and only units holding the epoch's rows (one λ of a λ-partitioned spectrum). The worker holds the
  buffer and a few blocks, never the dataset. An undecodable image is dropped from its
  batch and counted; :func:`fixed_batches` then pads the batch with rows of the same epoch so that every
  rank takes the same number of steps of the same size (DDP and the FLYP all-gather need that).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Optional

import numpy as np
import torch

from discl_ray.runtime.io import ImageLoadError, load_image, stable_seed
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


class StreamedImages:
    """Ray Data stream of the requested rows (see module docstring); the pool holds no image.

    Rows are read by storage unit (a parquet row group): :meth:`plan` orders an epoch's rows unit by unit in
    a seeded unit order (real and synthetic units interleaved) and mixes them with a seeded buffer of
    ``training.shuffle_buffer`` rows, simulated on metadata; the stream reads the units in that order (each
    unit once per epoch, only its needed rows decoded) and the worker re-emits the rows in the planned
    order, holding at most the buffer. The batches are therefore a pure function of (metadata, seed)."""

    def __init__(self, pool, pipe: InputPipeline, cfg, uris: dict):
        self.pool, self.pipe, self.cfg, self.uris = pool, pipe, cfg, uris
        self.tc = cfg.training
        self.row_of = {iid: i for i, iid in enumerate(pool.image_id)}
        self.bad: set = set()
        self.bytes_read = 0                      # bytes the read tasks took from storage (/proc rchar)
        self.unit = np.full(len(pool.image_id), -1, dtype=np.int64)
        self.units: list[tuple[str, str, int]] = []     # (table name, file URI, row group)
        self._index_units()

    def _index_units(self) -> None:
        """Map every pool row to its (file, row group): reads the ``image_id`` column only (no image bytes);
        spectrum files of λ levels the pool does not hold are skipped by their ``lam=`` partition."""
        import pyarrow.parquet as pq

        from discl_ray.training.data import lam_files

        syn = self.pool.split == "syn"
        for name in ("real", "syn"):
            mask = syn if name == "syn" else ~syn
            if not mask.any():
                continue
            lams = sorted(set(np.round(self.pool.lam[mask], 6).tolist())) if name == "syn" else None
            for f in lam_files(self.uris[name], lams):
                with f.fs.open_input_file(f.path) as fh:
                    pf = pq.ParquetFile(fh)
                    for rg in range(pf.num_row_groups):
                        rows = [self.row_of.get(i) for i in pf.read_row_group(rg, columns=["image_id"])
                                .column(0).to_pylist()]
                        rows = np.array([r for r in rows if r is not None and self.unit[r] < 0
                                         and (self.pool.split[r] == "syn") == (name == "syn")], dtype=np.int64)
                        if len(rows):
                            self.unit[rows] = len(self.units)
                            self.units.append((name, str(f), rg))
        missing = int((self.unit < 0).sum())
        if missing:
            log.warning("%d pool rows have no stored image (dropped when streamed)", missing)

    @property
    def n_bad_images(self) -> int:
        return len(self.bad)

    def plan(self, idx: np.ndarray, rng: np.random.Generator, rank: int, world: int) -> np.ndarray:
        """This rank's rows of an epoch over ``idx``, in training order (see class docstring).

        The rows dropped to give every rank an equal count are the same as the cache path's (the tail of one
        seeded permutation), so both paths train on the same epoch rows. Ranks take contiguous runs of the
        unit order, so a unit is read by one rank (two at a cut)."""
        perm = rng.permutation(np.asarray(idx, dtype=np.int64))
        per_rank = len(perm) // world
        rows = np.sort(perm[:per_rank * world])
        units = self.unit[rows]
        order = rng.permutation(np.unique(units))
        pos = np.empty(int(units.max()) + 1 if len(units) else 0, dtype=np.int64)
        pos[order] = np.arange(len(order))
        within = rng.random(len(rows))
        flat = rows[np.lexsort((within, pos[units]))]
        mine = flat[rank * per_rank:(rank + 1) * per_rank]
        return buffer_shuffle(mine, self.tc.shuffle_buffer, rng)

    def _dataset(self, rows: np.ndarray, train: bool, seed: int):
        import ray.data

        # Units in order of first use; the rows wanted from each.
        units = self.unit[rows]
        _, first = np.unique(units, return_index=True)
        items = []
        for u in units[np.sort(first)]:
            name, uri, rg = self.units[u]
            ids = self.pool.image_id[rows[units == u]].tolist()
            items.append({"table": name, "uri": uri, "rg": int(rg), "ids": "\n".join(ids)})
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        return ds.map_batches(_read_units, fn_kwargs=dict(pipe=self.pipe, train=train, seed=seed,
                                                          root=self.cfg.dataset.root),
                              batch_format="numpy", batch_size=1, num_cpus=self.tc.data_cpus)

    def stream(self, rows: np.ndarray, batch: int, train: bool, seed: int) -> Iterator[tuple]:
        """(uint8 images, pool rows) of ``rows`` in exactly that order (rows of no unit and undecodable images
        are dropped and counted); the worker holds the rows read but not yet due (≤ the shuffle buffer)."""
        rows = np.asarray(rows, dtype=np.int64)
        rows = rows[self.unit[rows] >= 0]
        if len(rows) == 0:
            return
        ds = self._dataset(rows, train, seed)
        ready: dict[int, Optional[torch.Tensor]] = {}
        k = 0
        out_x: list[torch.Tensor] = []
        out_r: list[int] = []
        for blk in ds.iter_batches(batch_size=None, prefetch_batches=self.tc.prefetch_batches,
                                   batch_format="numpy"):
            self.bytes_read += int(blk["bytes_read"].sum())
            for iid, px, ok in zip(blk["image_id"], blk["pixels"], blk["ok"]):
                r = self.row_of[str(iid)]
                ready[r] = torch.from_numpy(px.copy()) if ok else None
                if not ok:
                    self.bad.add(str(iid))
            while k < len(rows) and int(rows[k]) in ready:
                x = ready.pop(int(rows[k]))
                if x is not None:
                    out_x.append(x)
                    out_r.append(int(rows[k]))
                k += 1
                if len(out_r) == batch:
                    yield torch.stack(out_x), np.array(out_r, dtype=np.int64)
                    out_x, out_r = [], []
        if out_r:
            yield torch.stack(out_x), np.array(out_r, dtype=np.int64)

    def batches(self, rows: np.ndarray, sizes: list[int], train: bool, seed: int) -> Iterator[tuple]:
        return fixed_batches(self.stream(rows, max(sizes, default=1), train, seed), sizes)

    def eval_batches(self, rows: np.ndarray, batch: int) -> Iterator[tuple]:
        # Storage order (each unit read once); no padding at eval: a dropped image is simply not scored.
        rows = np.asarray(rows, dtype=np.int64)
        return self.stream(rows[np.argsort(self.unit[rows], kind="stable")], batch, False, 0)

    def held(self, rows: np.ndarray) -> "HeldImages":
        """Eval images of ``rows`` decoded once and kept (the adaptive guidance-validation set V: small)."""
        return HeldImages(self, rows)


class HeldImages:
    """A small set of eval images kept in memory (e.g. V, scored twice per adaptive epoch)."""

    def __init__(self, source: StreamedImages, rows: np.ndarray):
        self.pipe = source.pipe
        self.x: dict[int, torch.Tensor] = {}
        for x, r in source.eval_batches(np.unique(np.asarray(rows, dtype=np.int64)), 256):
            self.x.update({int(i): xi for i, xi in zip(r, x)})

    def eval_batches(self, rows: np.ndarray, batch: int) -> Iterator[tuple]:
        rows = np.array([r for r in np.asarray(rows, dtype=np.int64) if int(r) in self.x], dtype=np.int64)
        for k in range(0, len(rows), batch):
            sel = rows[k:k + batch]
            yield torch.stack([self.x[int(r)] for r in sel]), sel


def buffer_shuffle(rows: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """The order a seeded shuffle buffer of ``size`` rows gives ``rows`` (fill, then emit a random held row
    per incoming one; drain at random). Row k of the output only needs inputs up to k + size."""
    if size <= 1 or len(rows) <= 1:
        return np.asarray(rows, dtype=np.int64)
    buf = list(rows[:size])
    out = []
    picks = rng.integers(0, 2**62, len(rows))
    for j, r in enumerate(rows[size:]):
        p = int(picks[j] % len(buf))
        out.append(buf[p])
        buf[p] = r
    out.extend(rng.permutation(np.asarray(buf, dtype=np.int64)).tolist())
    return np.asarray(out, dtype=np.int64)


def _rchar() -> int:
    try:
        for line in open("/proc/self/io"):
            if line.startswith("rchar:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _read_units(batch: dict, pipe: InputPipeline, train: bool, seed: int, root) -> dict:
    """Ray Data map over storage units: read one parquet row group's ids and images (or paths), keep the
    wanted rows, decode + base + augment them to uint8 (B, 3, S, S); ``bytes_read`` counts the task's reads."""
    import pyarrow.parquet as pq

    from discl_ray.runtime.storage import as_storage

    ids_out, px_out, ok_out, read_out = [], [], [], []
    for name, uri, rg, wanted in zip(batch["table"], batch["uri"], batch["rg"], batch["ids"]):
        start = len(read_out)
        before = _rchar()
        want = set(str(wanted).split("\n"))
        f = as_storage(str(uri))
        with f.fs.open_input_file(f.path) as fh:
            pf = pq.ParquetFile(fh)
            cols = [c for c in ("image_id", "image", "path") if c in pf.schema_arrow.names]
            t = pf.read_row_group(int(rg), columns=cols)
        n_read = _rchar() - before
        ids = t.column("image_id").to_pylist()
        keep = [k for k, i in enumerate(ids) if i in want]
        data = t.column("image").take(keep).to_pylist() if "image" in cols else [None] * len(keep)
        paths = t.column("path").take(keep).to_pylist() if "path" in cols else [None] * len(keep)
        real_root = root if str(name) == "real" else None
        for k, b, p in zip(keep, data, paths):
            before = _rchar()
            arr = _decode_one(pipe, b, p, real_root)
            n_read += _rchar() - before if p and b is None else 0
            ids_out.append(ids[k])
            ok_out.append(arr is not None)
            px_out.append(pipe.augment(arr, train, stable_seed(seed, str(ids[k]))) if arr is not None
                          else np.zeros((3, pipe.size, pipe.size), np.uint8))
            read_out.append(0)
        if len(read_out) > start:
            read_out[start] = n_read
    n = len(ids_out)
    return {"image_id": np.asarray(ids_out, dtype=object),
            "pixels": np.stack(px_out) if n else np.zeros((0, 3, pipe.size, pipe.size), np.uint8),
            "ok": np.asarray(ok_out, dtype=bool), "bytes_read": np.asarray(read_out, dtype=np.int64)}


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


def open_images(cfg, pool, pipe):
    """(pool, images): the cache (bad rows dropped from the pool) or the stream; see ``images.py``."""
    from discl_ray.training.data import image_tables, stage_uris, tail_labels

    images, keep = build_images(pool, pipe, cfg, stage_uris(cfg), lambda: image_tables(cfg, pool))
    if keep is not None:
        pool = pool.subset(keep)
        pool.tail_labels = tail_labels(cfg, pool)
        images.pool = pool
    return pool, images
