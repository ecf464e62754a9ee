"""Images for the rows a rank trains or evaluates on: a bounded in-memory cache, or a stream read by Ray actors.

The epoch's rows are chosen from metadata only (``data.py``); this module turns a list of pool rows into
batches of uint8 images (3, size, size) plus their rows. Two implementations of one interface:

- :class:`CachedImages` — every row the run can touch is decoded once into memory. Used only when that
  fits ``training.image_cache_mb`` (estimated before decoding): small datasets such as the toy world keep
  the speed of indexing a tensor. Undecodable images are dropped from the pool at load, as before.
- :class:`StreamedImages` — per call, a stream over storage units (parquet row groups) in the epoch's
  seeded unit order, read by the rank's reader actors (``ceil(training.data_cpus)`` processes started once
  per run, holding the pipeline and the parquet footers read when the rows were indexed): each read task
  takes a chunk of ≥ 256 wanted rows' units, opens each file once, reads only its row groups' ``image_id,
  image[, path]`` column chunks, keeps the wanted rows and decodes + ``base`` + ``augment`` s them; the
  worker re-emits them in the planned order (seeded unit order + a shuffle buffer simulated on metadata, so
  real and synthetic rows interleave and the same seed gives the same batches). Each unit is read once per
  epoch, and only units holding the epoch's rows (one λ of a λ-partitioned spectrum). The worker holds the
  buffer and the chunks in flight, never the dataset. An undecodable image is dropped from its
  batch and counted; :func:`fixed_batches` then pads the batch with rows of the same epoch so that every
  rank takes the same number of steps of the same size (DDP and the FLYP all-gather need that).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from typing import Optional

import numpy as np
import torch

from discl_ray.runtime.io import stable_seed
from discl_ray.training.decode import decode_base as _decode_one
from discl_ray.training.transforms import InputPipeline

log = logging.getLogger(__name__)

CHUNK_ROWS = 256          # wanted rows per read task of the stream (fewer, longer tasks; bounded memory)


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
    """Stream of the requested rows read by reader actors (see module docstring); the pool holds no image.

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
        self.index_bytes_read = 0                # bytes indexing read (footers + id columns; once per run)
        self.unit = np.full(len(pool.image_id), -1, dtype=np.int64)
        self.units: list[tuple[str, str, int]] = []     # (table name, file URI, row group)
        self.meta: dict = {}                             # file URI -> its parquet footer (read once, here)
        self._readers: Optional[list] = None
        self._index_units()
        self._reader_pool()           # started (and waited for) with the run, not inside an epoch

    def _index_units(self) -> None:
        """Map every pool row to its (file, row group): reads the ``image_id`` column only (no image bytes);
        spectrum files of λ levels the pool does not hold are skipped by their ``lam=`` partition."""
        import pyarrow.parquet as pq

        from discl_ray.training.data import lam_files

        syn = self.pool.split == "syn"
        mixed: list[str] = []                        # spectrum files whose row groups mix λ levels
        for name in ("real", "syn"):
            mask = syn if name == "syn" else ~syn
            if not mask.any():
                continue
            lams = sorted(set(np.round(self.pool.lam[mask], 6).tolist())) if name == "syn" else None
            for f in lam_files(self.uris[name], lams):
                before = _rchar()
                with f.fs.open_input_file(f.path) as fh:
                    pf = pq.ParquetFile(fh)
                    # the id column of every row group in one call (coalesced: one read, not one per group)
                    ids = pf.read(columns=["image_id"]).column(0).to_pylist()
                self.index_bytes_read += _rchar() - before
                self.meta[str(f)] = pf.metadata
                ends = np.cumsum([pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)])
                for rg in range(pf.num_row_groups):
                    rows = [self.row_of.get(i) for i in ids[int(ends[rg - 1]) if rg else 0:int(ends[rg])]]
                    rows = np.array([r for r in rows if r is not None and self.unit[r] < 0
                                     and (self.pool.split[r] == "syn") == (name == "syn")], dtype=np.int64)
                    if len(rows):
                        self.unit[rows] = len(self.units)
                        self.units.append((name, str(f), rg))
                        if name == "syn" and len(set(np.round(self.pool.lam[rows], 6).tolist())) > 1:
                            mixed.append(str(f))
        if mixed:
            log.warning("%d spectrum file(s) mix λ levels (written before the spectrum store, e.g. %s): every "
                        "streamed epoch reads all their λ levels' images; run `discl generate` for this experiment "
                        "again (it regenerates them into the store, one part per λ)", len(set(mixed)), mixed[0])
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

    def _chunks(self, rows: np.ndarray) -> list[list[tuple]]:
        """Read tasks of ``rows``: the units in order of first use, cut into runs of at least
        ``CHUNK_ROWS`` wanted rows (a file opened once per run, few tasks per epoch); each unit with the ids
        wanted from it."""
        units = self.unit[rows]
        _, first = np.unique(units, return_index=True)
        by_unit = np.argsort(units, kind="stable")          # rows grouped by unit (one sort, not a scan per unit)
        starts = np.searchsorted(units[by_unit], units[np.sort(first)])
        ends = np.searchsorted(units[by_unit], units[np.sort(first)], side="right")
        chunks: list[list[tuple]] = []
        cur: list[tuple] = []
        n = 0
        for u, a, b in zip(units[np.sort(first)], starts, ends):
            name, uri, rg = self.units[u]
            ids = self.pool.image_id[rows[by_unit[a:b]]].tolist()
            cur.append((name, uri, int(rg), ids))
            n += len(ids)
            if n >= CHUNK_ROWS:
                chunks.append(cur)
                cur, n = [], 0
        if cur:
            chunks.append(cur)
        return chunks

    def _reader_pool(self) -> list:
        """The rank's reader actors, started once per run (not per epoch): each holds the pipeline and the
        parquet footers read at indexing, so a read task reads only its row groups' column chunks."""
        if self._readers is None:
            import ray
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
            n = max(1, math.ceil(self.tc.data_cpus - 1e-9))     # decode processes per rank
            # num_cpus=0: the actors live as long as the run; a CPU reservation held that long would take
            # the CPUs training.data_cpus leaves free for every rank's reads (trainer.check_data_cpus).
            actor = ray.remote(num_cpus=0, scheduling_strategy=here)(UnitReader)
            meta = ray.put(self.meta)
            self._readers = [actor.remote(self.pipe, self.cfg.dataset.root, meta) for _ in range(n)]
            ray.get([r.ready.remote() for r in self._readers])
        return self._readers

    def _read_chunks(self, rows: np.ndarray, train: bool, seed: int) -> Iterator[dict]:
        """Chunk results in order; at most ``prefetch_batches + 1`` chunks per reader in flight (bounded
        memory; reads overlap training)."""
        import ray

        readers = self._reader_pool()
        chunks = self._chunks(rows)
        depth = len(readers) * (self.tc.prefetch_batches + 1)
        pending: list = []
        for k, chunk in enumerate(chunks):
            pending.append(readers[k % len(readers)].read.remote(chunk, train, seed))
            if len(pending) >= depth:
                yield ray.get(pending.pop(0))
        while pending:
            yield ray.get(pending.pop(0))

    def stream(self, rows: np.ndarray, batch: int, train: bool, seed: int) -> Iterator[tuple]:
        """(uint8 images, pool rows) of ``rows`` in exactly that order (rows of no unit and undecodable images
        are dropped and counted); the worker holds the rows read but not yet due (≤ the shuffle buffer plus
        the chunks in flight)."""
        rows = np.asarray(rows, dtype=np.int64)
        rows = rows[self.unit[rows] >= 0]
        if len(rows) == 0:
            return
        ready: dict[int, Optional[torch.Tensor]] = {}
        # a row may be due more than once (FLYP's captions pair an image with each of its captions): it is
        # read once and held until its last occurrence
        due = dict(zip(*(a.tolist() for a in np.unique(rows, return_counts=True))))
        k = 0
        out_x: list[torch.Tensor] = []
        out_r: list[int] = []
        for blk in self._read_chunks(rows, train, seed):
            self.bytes_read += int(blk["bytes_read"])
            for iid, px, ok in zip(blk["image_id"], blk["pixels"], blk["ok"]):
                r = self.row_of[str(iid)]
                ready[r] = torch.from_numpy(px.copy()) if ok else None
                if not ok:
                    self.bad.add(str(iid))
            while k < len(rows) and int(rows[k]) in ready:
                due[int(rows[k])] -= 1
                x = ready[int(rows[k])] if due[int(rows[k])] else ready.pop(int(rows[k]))
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


class UnitReader:
    """A reader actor (one or more per rank, started once per run): reads chunks of storage units."""

    def __init__(self, pipe: InputPipeline, root, meta: dict):
        self.pipe, self.root, self.meta = pipe, root, meta

    def ready(self) -> bool:
        """Warm the actor before the run's first epoch: what a read task imports on first use (parquet, the
        storage layer, PIL's JPEG codec, and pandas, which pyarrow's ``take`` imports lazily: ≈ 1.3-1.8 s per
        reader on two cores, paid inside the first epoch before; issue 26's bench) and the transforms built,
        by one ``take`` and one small JPEG decoded through the pipeline."""
        import io

        import pyarrow as pa
        import pyarrow.parquet  # noqa: F401 (imported here, once, not in the first read task)
        from PIL import Image

        from discl_ray.runtime.storage import as_storage  # noqa: F401

        pa.chunked_array([[b""]]).take([0])
        buf = io.BytesIO()
        Image.new("RGB", (2 * self.pipe.resize, 2 * self.pipe.resize)).save(buf, format="JPEG")
        arr = _decode_one(self.pipe, buf.getvalue(), None, None)
        self.pipe.augment(arr, True, 0)
        self.pipe.augment(arr, False)
        return True

    def read(self, chunk: list, train: bool, seed: int) -> dict:
        return read_units(chunk, self.pipe, train, seed, self.root, self.meta)


def read_units(chunk: list, pipe: InputPipeline, train: bool, seed: int, root, meta: dict) -> dict:
    """Read a chunk of storage units ((table, file URI, row group, wanted ids), …): each file opened once
    with its footer as read at indexing (``meta``; no footer read per epoch), only its row groups' ``image_id,
    image[, path]`` column chunks read; the wanted rows decoded + ``base`` + ``augment`` ed to uint8
    (B, 3, S, S). ``bytes_read`` counts what the task read from storage (/proc rchar)."""
    import pyarrow.parquet as pq

    from discl_ray.runtime.storage import as_storage

    ids_out, px_out, ok_out = [], [], []
    n_read = 0
    by_file: dict = {}
    for name, uri, rg, wanted in chunk:
        by_file.setdefault(str(uri), (str(name), [], set()))
        by_file[str(uri)][1].append(int(rg))
        by_file[str(uri)][2].update(wanted)
    for uri, (name, rgs, want) in by_file.items():
        before = _rchar()
        f = as_storage(uri)
        with f.fs.open_input_file(f.path) as fh:
            pf = pq.ParquetFile(fh, metadata=meta.get(uri))
            cols = [c for c in ("image_id", "image", "path") if c in pf.schema_arrow.names]
            # One call for the file's row groups: pre-buffering coalesces adjacent column chunks into few
            # large reads (one request per run of row groups on an object store, not one per row group).
            t = pf.read_row_groups(sorted(rgs), columns=cols)
        n_read += _rchar() - before
        ids = t.column("image_id").to_pylist()
        keep = [k for k, i in enumerate(ids) if i in want]
        data = t.column("image").take(keep).to_pylist() if "image" in cols else [None] * len(keep)
        paths = t.column("path").take(keep).to_pylist() if "path" in cols else [None] * len(keep)
        real_root = root if name == "real" else None
        for k, b, p in zip(keep, data, paths):
            before = _rchar()
            arr = _decode_one(pipe, b, p, real_root)
            n_read += _rchar() - before if p and b is None else 0
            ids_out.append(ids[k])
            ok_out.append(arr is not None)
            px_out.append(pipe.augment(arr, train, stable_seed(seed, str(ids[k]))) if arr is not None
                          else np.zeros((3, pipe.size, pipe.size), np.uint8))
    n = len(ids_out)
    return {"image_id": ids_out,
            "pixels": np.stack(px_out) if n else np.zeros((0, 3, pipe.size, pipe.size), np.uint8),
            "ok": ok_out, "bytes_read": n_read}


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
    log.info("streaming images through reader actors (%d rows, ~%.0f MiB decoded > cache cap %d MiB)",
             len(pool.image_id), est / 2**20, cfg.training.image_cache_mb)
    return StreamedImages(pool, pipe, cfg, uris), None


def estimate_cache_bytes(pipe: InputPipeline, n_rows: int) -> int:
    """Decoded bytes of the cache: toy = size² squares; others = the base image (shorter side ``resize``,
    4:3 assumed)."""
    per = 3 * pipe.size * pipe.size if pipe.kind == "toy" else 3 * pipe.resize * round(pipe.resize * 4 / 3)
    return per * n_rows


def will_stream(cfg, paths=None) -> bool:
    """Whether the workers will stream (driver-side estimate from the row counts; no image is read; ``paths``:
    the run's locations when the caller has them)."""
    import pyarrow.dataset as ds

    from discl_ray.training.data import stage_uris
    from discl_ray.training.transforms import pipeline_kind

    tc = cfg.training
    n = 0
    for name, uri in stage_uris(cfg, paths).items():
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

    uris = stage_uris(cfg)
    if cfg.training.prepared_images and estimate_cache_bytes(pipe, len(pool.image_id)) > \
            cfg.training.image_cache_mb * 2**20:
        from discl_ray.runtime.cluster import RunPaths
        from discl_ray.training.prepared import prepared_uri

        # the stream reads the real images from the copy the driver prepared at the training resolution
        uris = dict(uris, real=prepared_uri(cfg, RunPaths.from_config(cfg), pipe))
    images, keep = build_images(pool, pipe, cfg, uris, lambda: image_tables(cfg, pool))
    if keep is not None:
        pool = pool.subset(keep)
        pool.tail_labels = tail_labels(cfg, pool)
        images.pool = pool
    return pool, images
