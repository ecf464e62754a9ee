"""Streamed training input (issue 26): a streamed epoch trains on the same rows as the cache path, mixed as
well (real and synthetic rows interleaved, per-batch class entropy), in an order that is a pure function of
(metadata, seed); an epoch at λ reads only λ's files of a λ-partitioned spectrum; the spectrum's metadata is
read without image bytes; the adaptive guidance-validation set V is decoded once."""

from __future__ import annotations

import logging
import math
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from discl_ray.config import load_config
from discl_ray.training import data as D
from discl_ray.training.fixture import write_fixture
from discl_ray.training.images import CachedImages, StreamedImages, buffer_shuffle
from discl_ray.training.transforms import build_pipeline

LAMS = [0.0, 0.5]


def io_config(run_root, *extra):
    return load_config(None, [
        f"run_root={run_root}", "experiment=io", "dataset.image_size=16", "mining.few_max=100",
        "mining.many_min=200", f"generation.lams={LAMS}", "training.lams=[0.0,0.5,1.0]",
        "scoring.threshold=0.2", "training.backbone=small_cnn", "training.strategy=diverse_to_specific",
        "training.task=low_quality", "training.batch_size=16", "training.image_cache_mb=0",
        "training.shuffle_buffer=64", "tracking.enabled=false", *extra])


def layout(cfg, *, keep_lam_column: bool) -> None:
    """Real rows stored class by class in row groups of 8; the spectrum hive-partitioned by λ."""
    from discl_ray.runtime.cluster import RunPaths

    paths = RunPaths.from_config(cfg)
    real = pq.read_table(paths.dataset).sort_by([("label", "ascending"), ("image_id", "ascending")])
    for f in paths.dataset.glob("*.parquet"):
        f.unlink()
    pq.write_table(real, paths.dataset / "rows-0.parquet", row_group_size=8)
    spec_dir = paths.stage("generate", "spectrum")
    spec = pq.read_table(spec_dir)
    shutil.rmtree(spec_dir)
    for lam in LAMS:
        part = spec.filter(pa.compute.equal(spec["lam"], lam))
        if not keep_lam_column:
            part = part.drop_columns(["lam"])
        d = spec_dir / f"lam={lam}"
        d.mkdir(parents=True)
        pq.write_table(part, d / "part-0.parquet", row_group_size=8)


def entropy(labels: np.ndarray) -> float:
    p = np.bincount(labels) / len(labels)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def mixing(pool, batches: list[np.ndarray]) -> tuple[float, float]:
    mixed = np.mean([(pool.split[b] == "syn").any() and (pool.split[b] != "syn").any() for b in batches])
    return float(mixed), float(np.mean([entropy(pool.labels[b]) for b in batches]))


@pytest.mark.parametrize("keep_lam_column", [True, False])
def test_spectrum_metadata_read_by_lam_without_image_bytes(run_root, keep_lam_column):
    cfg = io_config(run_root, "training.lams=[0.5,1.0]")
    write_fixture(cfg, train_counts=(30, 30, 30), val_per_class=4, test_per_class=4)
    layout(cfg, keep_lam_column=keep_lam_column)
    pool = D.load_pool(cfg)
    syn = pool.split == "syn"
    assert syn.any() and np.allclose(pool.lam[syn], 0.5)
    assert D.lam_files(D.stage_uris(cfg)["syn"], [0.5]) and all(
        "lam=0.5" in f.path for f in D.lam_files(D.stage_uris(cfg)["syn"], [0.5]))


def test_stream_plan_matches_cache_rows_and_mixing(ray_local, run_root):
    import ray

    def _modules(actor) -> list[str]:      # run inside a reader actor (pickled by value: defined in the test)
        import sys

        return sorted(sys.modules)

    cfg = io_config(run_root)
    write_fixture(cfg, train_counts=(40, 40, 40, 40), val_per_class=4, test_per_class=4)
    layout(cfg, keep_lam_column=False)
    pool = D.load_pool(cfg)
    pipe = build_pipeline(cfg)
    streamed = StreamedImages(pool, pipe, cfg, D.stage_uris(cfg))
    cache = CachedImages(pool, pipe, cfg, D.image_tables(cfg, pool))
    assert cache.keep.all()
    idx = D.epoch_indices(cfg, pool, 0.5, np.random.default_rng(1))
    world, batch = 2, 8
    per_rank = len(idx) // world

    def cache_slices(seed):
        # As in training/loop.py: every rank draws the same permutation from the same seeded generator.
        return [D.shard(np.random.default_rng(seed).permutation(idx), r, world) for r in range(world)]

    def stream_slices(seed):
        rng = [np.random.default_rng(seed) for _ in range(world)]
        return [streamed.plan(idx, rng[r], r, world) for r in range(world)]

    c, s = cache_slices(7), stream_slices(7)
    assert all(len(x) == per_rank for x in c + s)
    # Same epoch rows (the same remainder dropped), each row on exactly one rank.
    assert sorted(np.concatenate(s).tolist()) == sorted(np.concatenate(c).tolist())
    # Each storage unit is read by one rank, except at most world − 1 units cut between ranks.
    units = [set(streamed.unit[x].tolist()) for x in s]
    assert len(units[0] & units[1]) <= world - 1
    # Comparable mixing: batches hold real and synthetic rows, and nearly as many classes as the cache's.
    cut = [x[k:k + batch] for x in s for k in range(0, len(x), batch)]
    ref = [x[k:k + batch] for x in c for k in range(0, len(x), batch)]
    (m_s, h_s), (m_c, h_c) = mixing(pool, cut), mixing(pool, ref)
    assert m_s >= 0.75 * m_c and h_s >= 0.8 * h_c, (m_s, m_c, h_s, h_c)
    # Same seed → same plan; another seed → another order.
    assert all(np.array_equal(a, b) for a, b in zip(s, stream_slices(7)))
    assert not np.array_equal(s[0], stream_slices(8)[0])

    # The stream yields exactly the planned rows, in order, and the same pixels on a rerun.
    sizes = [min(batch, per_rank - k) for k in range(0, per_rank, batch)]
    modules_before = [set(ray.get(r.__ray_call__.remote(_modules))) for r in streamed._readers]
    got = [(x.clone(), r) for x, r in streamed.batches(s[0], sizes, True, 5)]
    # The readers were warmed when the run started: the first epoch's read tasks import nothing (pyarrow's
    # `take` used to import pandas inside the first epoch, ≈ 1.5 s per reader on two cores).
    assert [set(ray.get(r.__ray_call__.remote(_modules))) - b
            for r, b in zip(streamed._readers, modules_before)] == [set()] * len(streamed._readers)
    assert np.array_equal(np.concatenate([r for _, r in got]), s[0])
    again = list(streamed.batches(s[0], sizes, True, 5))
    assert all(np.array_equal(r1, r2) and bool((x1 == x2).all()) for (x1, r1), (x2, r2) in zip(got, again))
    # Eval pixels equal the cache's (the same base transform).
    val = pool.split_idx("val")
    ev = {int(r): x for xb, rb in streamed.eval_batches(val, 5) for x, r in zip(xb, rb)}
    ce = {int(r): x for xb, rb in cache.eval_batches(val, 5) for x, r in zip(xb, rb)}
    assert ev.keys() == ce.keys() and all(bool((ev[k] == ce[k]).all()) for k in ev)
    # Bytes read for one rank's epoch: its units only (the other λ's partition untouched).
    streamed.bytes_read = 0
    list(streamed.batches(s[0], sizes, True, 5))
    assert streamed.bytes_read > 0
    # ... and only their row groups: the footers were read once, at indexing (not once per unit). A file's
    # row groups are read in one call, so the small columns between the wanted chunks may come along (one
    # read per run of row groups on an object store); a footer re-read per unit would add more than the slack.
    groups, footers = 0, 0
    for u in set(streamed.unit[s[0]].tolist()):
        _, uri, rg = streamed.units[u]
        md = streamed.meta[uri].row_group(rg)
        groups += sum(md.column(c).total_compressed_size for c in range(md.num_columns))
        footers += streamed.meta[uri].serialized_size
    assert streamed.bytes_read <= 1.05 * groups + 4096 < streamed.bytes_read + footers, (
        streamed.bytes_read, groups, footers)
    held = streamed.held(val)
    assert sorted(held.x) == sorted(ev) and all(bool((held.x[k] == ev[k]).all()) for k in ev)
    # Indexing read the footers and the id columns in one call per file, not the files: pyarrow coalesces
    # the id chunks across holes ≤ 8 KiB, so with these tiny images some image bytes come along.
    ids = sum(md.row_group(g).column(md.schema.names.index("image_id")).total_compressed_size
              for md in streamed.meta.values() for g in range(md.num_row_groups))
    images = sum(md.row_group(g).column(md.schema.names.index("image")).total_compressed_size
                 for md in streamed.meta.values() for g in range(md.num_row_groups))
    footers = sum(md.serialized_size for md in streamed.meta.values())
    assert ids + footers < streamed.index_bytes_read < 0.75 * (ids + footers + images), (
        streamed.index_bytes_read, ids, footers, images)

def test_image_tables_are_written_in_row_groups_a_sparse_read_can_afford(tmp_path):
    """The writers' image tables: row groups of at most IMAGE_ROW_GROUP_ROWS rows of small images, ~1 MiB of
    large ones, no image statistics or dictionary. A sparse read (a quarter of the rows at random, as Algorithm
    2's V takes of a λ part) then reads a fraction of the file, while a full read stays one coalesced pass."""
    from discl_ray.runtime.io import stable_seed
    from discl_ray.runtime.storage import IMAGE_ROW_GROUP_BYTES, IMAGE_ROW_GROUP_ROWS, as_storage

    rng = np.random.default_rng(0)

    def table(n, size):
        return pa.table({"image_id": [f"i{k:05d}" for k in range(n)], "label": np.arange(n) % 3,
                         "image": [rng.bytes(size) for _ in range(n)]})

    small, large = as_storage(tmp_path / "small.parquet"), as_storage(tmp_path / "large.parquet")
    small.write_parquet(table(2000, 3000))
    large.write_parquet(table(24, 300_000))
    md = pq.ParquetFile(tmp_path / "small.parquet").metadata
    assert md.num_row_groups == math.ceil(2000 / IMAGE_ROW_GROUP_ROWS)
    img = md.schema.names.index("image")
    assert not md.row_group(0).column(img).is_stats_set
    assert "PLAIN_DICTIONARY" not in md.row_group(0).column(img).encodings
    assert md.row_group(0).column(0).is_stats_set            # the other columns keep their statistics
    big = pq.ParquetFile(tmp_path / "large.parquet").metadata
    assert big.row_group(0).num_rows == IMAGE_ROW_GROUP_BYTES // 300_000 < IMAGE_ROW_GROUP_ROWS
    # V's draw from a λ part (rows in source order, 2 seeds per source): a quarter of the sources, one seed
    # each. The row groups holding them are read (~1 − 0.75^4 of the file at 8 rows), not the whole file as
    # with ~1 MiB groups of these 3 KB images (349 rows each).
    draw = np.random.default_rng(stable_seed("V", 0))
    want = 2 * np.sort(draw.choice(1000, 250, replace=False)) + draw.integers(0, 2, 250)
    groups = sorted(set((want // IMAGE_ROW_GROUP_ROWS).tolist()))
    size = (tmp_path / "small.parquet").stat().st_size
    read = sum(md.row_group(g).column(c).total_compressed_size for g in groups for c in range(md.num_columns))
    assert read < 0.8 * size, (read, size)
    got = pq.ParquetFile(tmp_path / "small.parquet").read_row_groups(groups, columns=["image_id", "image"])
    assert set(np.array([f"i{k:05d}" for k in want])) <= set(got.column("image_id").to_pylist())


def test_buffer_shuffle_is_a_seeded_permutation_with_bounded_lookahead():
    rows = np.arange(1000)
    out = buffer_shuffle(rows, 64, np.random.default_rng(3))
    assert sorted(out.tolist()) == rows.tolist()
    assert np.array_equal(out, buffer_shuffle(rows, 64, np.random.default_rng(3)))
    # Output k only needs inputs up to k + 64 (what the streamed worker holds).
    assert all(v <= k + 64 for k, v in enumerate(out.tolist()))
    assert not math.isclose(float(np.corrcoef(np.arange(1000), out)[0, 1]), 1.0)


def test_stream_warns_once_on_a_spectrum_whose_files_mix_lam_levels(ray_local, run_root, caplog):
    """A spectrum written before the spectrum store (files mixing λ levels; the trainer fixture writes one)
    gets one warning line naming what to do; a spectrum stored by λ gets none."""
    cfg = io_config(run_root)
    write_fixture(cfg, train_counts=(20, 20), val_per_class=2, test_per_class=2)

    def warnings() -> list[str]:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="discl_ray.training.images"):
            StreamedImages(D.load_pool(cfg), build_pipeline(cfg), cfg, D.stage_uris(cfg))
        return [r.getMessage() for r in caplog.records if "mix λ levels" in r.getMessage()]

    flat = warnings()
    assert len(flat) == 1 and "discl generate" in flat[0] and "\n" not in flat[0], flat
    layout(cfg, keep_lam_column=True)
    assert warnings() == []
