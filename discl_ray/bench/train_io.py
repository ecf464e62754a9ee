"""`discl bench train-io`: what a streamed curriculum epoch reads, how it mixes, and how fast it runs.

Writes an experiment of realistic shape (scaled to the machine; ``--sources``, ``--real``): real rows stored
CLASS BY CLASS (embedded 224² JPEG), a spectrum of sources × 5 λ × 2 seeds of 224² JPEG hive-partitioned by λ
(``lam=<value>/part-*.parquet``), scores with ~85 % of the rows kept. Image tables are written as the project
writes them (``runtime.storage.parquet_write_options``: row groups of at most ``--row-group-rows`` rows and
~``--row-group-bytes``, no image statistics).
Then, for one curriculum epoch at λ with ``--world`` ranks (each rank's stream run in turn on this node's
Ray Data, as a Train worker would run it; the rank's rows from ``StreamedImages.plan``, as in
``training/loop.py``):

- ``read_amplification``: bytes the read tasks took from storage (``/proc/self/io`` rchar in each task,
  summed over ranks) ÷ encoded bytes of the rows the epoch trained on;
- ``read_amplification_adaptive``: the same with the adaptive probe (V decoded once, rank 0; the random real
  set D streamed by every rank) added to both sides;
- ``mixed_batch_share``: share of the streamed epoch's global batches (the ranks' k-th batches together: what
  one DDP step averages) holding real and synthetic rows;
- ``class_entropy_ratio``: mean per-global-batch class entropy, stream ÷ cache path (the cache's seeded
  permutation);
- ``stream_over_cache_samples_per_s``: samples/s of the epoch (images → small CNN step at
  ``training.image_size``), stream ÷ cache, the median over ``--repeats`` pairs of epochs timed alternately
  (the cache's one-time decode at load and the readers' start with the run not counted; torch warmed up
  first; the loop's torch threads as a Train worker sets them, ``training.cpus_per_worker``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

LAMS = (0.1, 0.3, 0.5, 0.7, 0.9)
CLASSES = 10


def write_experiment(cfg, n_real: int, n_sources: int, row_group_bytes: int, row_group_rows: int,
                     seed: int = 0) -> dict:
    import pyarrow.parquet as pq

    from discl_ray.bench.train_memory import _jpeg
    from discl_ray.data import CANONICAL_SCHEMA
    from discl_ray.runtime.cluster import RunPaths
    from discl_ray.runtime.storage import parquet_write_options

    paths = RunPaths.from_config(cfg)
    done = paths.exp / "_bench_io.json"
    key = {"n_real": n_real, "n_sources": n_sources, "row_group_bytes": row_group_bytes,
           "row_group_rows": row_group_rows}
    if done.is_file() and json.loads(done.read_text()).get("key") == key:
        return json.loads(done.read_text())
    rng = np.random.default_rng(seed)
    paths.dataset.mkdir(parents=True, exist_ok=True)
    size = {}
    # Real training rows class by class (the hard case for a sequential reader), then val.
    labels = np.sort(rng.integers(0, CLASSES, n_real))
    ids = [f"train-{c}-{i:06d}" for i, c in enumerate(labels)]
    val_labels = np.arange(200) % CLASSES
    all_ids = ids + [f"val-{i:04d}" for i in range(200)]
    all_labels = np.concatenate([labels, val_labels])
    imgs = [_jpeg(rng, int(c)) for c in all_labels]
    size.update({i: len(b) for i, b in zip(all_ids, imgs)})
    n = len(all_ids)
    table = pa.table({"image_id": all_ids, "image": imgs, "path": [None] * n, "label": all_labels,
                      "class_name": [f"class{c}" for c in all_labels],
                      "split": ["train"] * n_real + ["val"] * 200, "domain": [""] * n}).cast(CANONICAL_SCHEMA)
    pq.write_table(table, paths.dataset / "rows-00000.parquet", **parquet_write_options(table, row_group_bytes,
                                                                                         row_group_rows))
    (paths.dataset / "_dataset_config.json").write_text(json.dumps(cfg.dataset.model_dump(mode="json"), indent=1,
                                                                   sort_keys=True))
    hard_pos = np.sort(rng.choice(n_real, n_sources, replace=False))
    hard = [(ids[k], int(labels[k])) for k in hard_pos]
    mine = paths.stage("mine")
    mine.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"image_id": [h[0] for h in hard], "label": [h[1] for h in hard],
                             "class_name": [f"class{h[1]}" for h in hard], "group": ["few"] * len(hard),
                             "reason": ["confidence"] * len(hard), "score": [float("nan")] * len(hard)}),
                   mine / "part-0.parquet")
    spec_dir, score_dir = paths.stage("generate", "spectrum"), paths.stage("score", "scores")
    score_dir.mkdir(parents=True, exist_ok=True)
    scores = {k: [] for k in ("image_id", "source_image_id", "label", "lam", "seed", "clip_text_cos")}
    for lam in LAMS:
        spec = {k: [] for k in ("image_id", "source_image_id", "label", "seed", "image")}
        for src, c in hard:
            for s in (0, 1):
                iid = f"{src}|l{lam:.3f}|s{s}"
                img = _jpeg(rng, c)
                size[iid] = len(img)
                for k, v in (("image_id", iid), ("source_image_id", src), ("label", c), ("seed", s), ("image", img)):
                    spec[k].append(v)
                for k, v in (("image_id", iid), ("source_image_id", src), ("label", c), ("lam", lam), ("seed", s),
                             ("clip_text_cos", float(rng.uniform(0.25, 0.9)))):
                    scores[k].append(v)
        d = spec_dir / f"lam={lam}"
        d.mkdir(parents=True, exist_ok=True)
        spec = pa.table(spec)
        pq.write_table(spec, d / "part-0.parquet", **parquet_write_options(spec, row_group_bytes, row_group_rows))
    pq.write_table(pa.table(scores), score_dir / "part-0.parquet")
    info = {"key": key, "sizes": size}
    done.write_text(json.dumps(info))
    return info


def _entropy(labels: np.ndarray) -> float:
    p = np.bincount(labels) / len(labels)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def _train_pass(images, model, opt, pool, pipe, rows: np.ndarray, batch: int, seed: int) -> tuple[float, int]:
    import torch

    sizes = [min(batch, len(rows) - k) for k in range(0, len(rows), batch)]
    t0, n = time.perf_counter(), 0
    for x, sel in images.batches(rows, sizes, True, seed):
        loss = torch.nn.functional.cross_entropy(model(pipe.normalise(x)), torch.as_tensor(pool.labels[sel]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        n += len(sel)
    return time.perf_counter() - t0, n


def run(root: Path, n_real: int, n_sources: int, row_group_bytes: int, row_group_rows: int, world: int,
        lam: float, overrides: list[str], repeats: int = 3, prepared: bool = False) -> dict:
    import pyarrow.parquet as pq
    import torch

    from discl_ray.config import load_config
    from discl_ray.runtime.io import stable_seed
    from discl_ray.training import data as D
    from discl_ray.training.images import CachedImages, StreamedImages
    from discl_ray.training.models import build_model
    from discl_ray.training.transforms import build_pipeline

    cfg = load_config(None, [
        f"run_root={root}", "experiment=io", "dataset.name=digits_lt", "dataset.image_size=224",
        "training.task=low_quality", "training.backbone=small_cnn", "training.image_size=32",
        f"generation.lams={list(LAMS)}", f"training.lams={list(LAMS) + [1.0]}", "scoring.threshold=0.35",
        "training.strategy=adaptive", "training.batch_size=128", "training.image_cache_mb=0",
        "training.random_real_size=1000", "training.guidance_val_size=100", "tracking.enabled=false",
        "training.data_cpus=2", *overrides])
    # The training loop's threads as a Train worker sets them (training/loop.py: ``cpus_per_worker``, 1 by
    # default), so the stream's reader actors have the CPUs a worker leaves them, as in a run.
    threads = max(1, int(cfg.training.cpus_per_worker))
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    info = write_experiment(cfg, n_real, n_sources, row_group_bytes, row_group_rows)
    write_s = time.perf_counter() - t0
    sizes = info["sizes"]
    layout = {}
    for name, uri in D.stage_uris(cfg).items():      # the image tables' row groups and footers
        for f in D.lam_files(uri, None):
            with f.fs.open_input_file(f.path) as fh:
                md = pq.ParquetFile(fh).metadata
            layout[f.path.rsplit("/", 2)[-2] if name == "syn" else name] = {
                "row_groups": md.num_row_groups, "rows_per_group": md.row_group(0).num_rows,
                "footer_bytes": md.serialized_size, "file_bytes": f.info().size}
    pool = D.load_pool(cfg)
    pipe = build_pipeline(cfg)
    v = D.choose_guidance_val(cfg, pool, np.random.default_rng(stable_seed("V", cfg.training.seed)))
    uris = D.stage_uris(cfg)
    prepare_s = None
    if prepared:
        # training.prepared_images: the real rows streamed from their copy at the training resolution
        # (written here as `discl train` writes it; timed apart, once per dataset and resolution)
        from discl_ray.runtime.cluster import RunPaths
        from discl_ray.training.prepared import prepare_real_images

        t0 = time.perf_counter()
        uris["real"] = prepare_real_images(cfg, RunPaths.from_config(cfg), pipe)
        prepare_s = time.perf_counter() - t0
        copy = pq.read_table(uris["real"], columns=["image_id", "image"])
        sizes = dict(sizes, **{i: len(b) for i, b in zip(copy["image_id"].to_pylist(),
                                                          copy["image"].to_pylist())})
    t0 = time.perf_counter()
    streamed = StreamedImages(pool, pipe, cfg, uris)
    index_s = time.perf_counter() - t0
    idx = D.epoch_indices(cfg, pool, lam, np.random.default_rng(1))
    batch = max(1, cfg.training.batch_size // world)

    def nbytes(rows) -> int:
        return int(sum(sizes[i] for i in pool.image_id[rows]))

    def model():
        torch.manual_seed(0)
        net = build_model("small_cnn", pool.num_classes, cfg=cfg)
        return net, torch.optim.SGD(net.parameters(), lr=0.01)

    # torch's first steps in a process (allocator, kernels) are slower: one untimed pass over random batches
    # first, so neither path's timed epoch pays them (the streamed one runs first).
    net, opt = model()
    warm = torch.randint(0, 256, (batch, 3, pipe.size, pipe.size), dtype=torch.uint8)
    for _ in range(8):
        loss = torch.nn.functional.cross_entropy(net(pipe.normalise(warm)), torch.as_tensor(pool.labels[:batch]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    # Streamed epoch: each rank's plan, then its stream (the ranks one after the other on this node).
    net, opt = model()
    out: dict = {"epoch_rows": int(len(idx)), "lam": lam, "world": world, "index_s": index_s, "write_s": write_s,
                 "torch_threads": threads, "prepared": prepared, "prepare_s": prepare_s,
                 "layout": layout, "index_bytes_read": streamed.index_bytes_read}
    read, used, s_time, s_n, s_ranks = 0, 0, 0.0, 0, []
    for r in range(world):
        rows = streamed.plan(idx, np.random.default_rng(7), r, world)
        s_ranks.append(rows)
        streamed.bytes_read = 0
        dt, n = _train_pass(streamed, net, opt, pool, pipe, rows, batch, 5)
        read += streamed.bytes_read
        used += nbytes(rows)
        s_time, s_n = s_time + dt, s_n + n
    out.update(read_amplification=read / used, epoch_bytes_read=read, epoch_bytes_used=used,
               stream_samples_per_s=s_n / s_time)
    # Adaptive probe: V decoded once (rank 0), the random real set D streamed on every rank.
    v_rows = np.concatenate(list(v.values()))
    streamed.bytes_read = 0
    streamed.held(v_rows)
    p_read, p_used = streamed.bytes_read, nbytes(v_rows)
    v_read, v_used = p_read, p_used
    d_all = pool.train_real
    d = np.random.default_rng(3).choice(d_all, size=min(cfg.training.random_real_size, len(d_all)), replace=False)
    for r in range(world):
        rows = streamed.plan(d, np.random.default_rng(9), r, world)
        streamed.bytes_read = 0
        _train_pass(streamed, net, opt, pool, pipe, rows, batch, 6)
        p_read += streamed.bytes_read
        p_used += nbytes(rows)
    out.update(read_amplification_adaptive=(read + p_read) / (used + p_used), probe_bytes_read=p_read,
               probe_bytes_used=p_used, v_bytes_read=v_read, v_bytes_used=v_used,
               d_bytes_read=p_read - v_read, d_bytes_used=p_used - v_used,
               # a later curriculum epoch: V is already held (decoded once per run), only D is read
               read_amplification_adaptive_later=(read + p_read - v_read) / (used + p_used - v_used),
               # the run's one-time indexing (footers + id columns, read before the first epoch) counted too
               read_amplification_adaptive_with_index=(read + p_read + out["index_bytes_read"]) / (used + p_used))
    # Cache path: the same epoch through decoded images (the loop's seeded permutation per rank).
    cache = CachedImages(pool, pipe, cfg, D.image_tables(cfg, pool))
    net, opt = model()
    c_time, c_n, c_ranks = 0.0, 0, []
    for r in range(world):
        rows = D.shard(np.random.default_rng(7).permutation(idx), r, world)
        c_ranks.append(rows)
        dt, n = _train_pass(cache, net, opt, pool, pipe, rows, batch, 5)
        c_time, c_n = c_time + dt, c_n + n
    out["cache_samples_per_s"] = c_n / c_time
    # More epochs of each path, alternating (stream, cache, stream, cache, …): one epoch here is a few seconds,
    # so one pair moves with the machine by ±10 %; the ratio reported is the median over the pairs.
    pairs = [(out["stream_samples_per_s"], out["cache_samples_per_s"])]
    for k in range(1, repeats):
        s_t, s_c = 0.0, 0
        for rows in s_ranks:
            dt, n = _train_pass(streamed, net, opt, pool, pipe, rows, batch, 5 + k)
            s_t, s_c = s_t + dt, s_c + n
        c_t, c_c = 0.0, 0
        for rows in c_ranks:
            dt, n = _train_pass(cache, net, opt, pool, pipe, rows, batch, 5 + k)
            c_t, c_c = c_t + dt, c_c + n
        pairs.append((s_c / s_t, c_c / c_t))
    out["pairs_samples_per_s"] = [list(p) for p in pairs]

    def global_batches(ranks):   # step k's global batch: every rank's k-th batch (what one DDP step averages)
        return [np.concatenate([x[k:k + batch] for x in ranks]) for k in range(0, len(ranks[0]), batch)]

    s_batches, c_batches = global_batches(s_ranks), global_batches(c_ranks)
    out["same_epoch_rows"] = sorted(np.concatenate(s_batches).tolist()) == sorted(np.concatenate(c_batches).tolist())
    is_syn = pool.split == "syn"
    out["mixed_batch_share"] = float(np.mean([is_syn[b].any() and (~is_syn[b]).any() for b in s_batches]))
    out["cache_mixed_batch_share"] = float(np.mean([is_syn[b].any() and (~is_syn[b]).any() for b in c_batches]))
    h_s = float(np.mean([_entropy(pool.labels[b]) for b in s_batches]))
    h_c = float(np.mean([_entropy(pool.labels[b]) for b in c_batches]))
    out.update(class_entropy_stream=h_s, class_entropy_cache=h_c, class_entropy_ratio=h_s / h_c,
               stream_over_cache_first_epoch=out["stream_samples_per_s"] / out["cache_samples_per_s"],
               stream_over_cache_samples_per_s=float(np.median([a / b for a, b in pairs])))
    return out


TARGETS = {"read_amplification": ("<=", 1.5), "read_amplification_adaptive": ("<=", 2.0),
           "mixed_batch_share": (">=", 0.9), "class_entropy_ratio": (">=", 0.9),
           "stream_over_cache_samples_per_s": (">=", 0.7)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="discl bench train-io", description=__doc__.splitlines()[0])
    p.add_argument("--real", type=int, default=4000, help="real training rows (stored class by class)")
    p.add_argument("--sources", type=int, default=400, help="hard sources (× 5 λ × 2 seeds spectrum rows)")
    p.add_argument("--row-group-bytes", type=int, default=None,
                   help="target bytes per row group of the image tables (default: the project's writers')")
    p.add_argument("--row-group-rows", type=int, default=None,
                   help="most rows per row group of the image tables (default: the project's writers')")
    p.add_argument("--world", type=int, default=2, help="ranks the epoch is split over")
    p.add_argument("--lam", type=float, default=0.5, help="the curriculum epoch's λ")
    p.add_argument("--repeats", type=int, default=3,
                   help="stream and cache epochs timed, alternating; samples/s ratio = median over the pairs")
    p.add_argument("--prepared", action="store_true",
                   help="stream the real rows from their copy at the training resolution "
                        "(training.prepared_images); its one-time writing is timed apart (prepare_s)")
    p.add_argument("--run-root", default=None, help="where the parquet goes (reused when the shape matches)")
    p.add_argument("--json", default=None, metavar="PATH", help="write the numbers as JSON")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args(argv)

    import ray

    from discl_ray.runtime.cluster import init_local_ray

    root = Path(args.run_root or Path(tempfile.gettempdir()) / "discl-bench-train-io")
    if not ray.is_initialized():
        init_local_ray(num_cpus=os.cpu_count() or 2, include_dashboard=False, log_to_driver=False)
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.execution_options.preserve_order = True
    from discl_ray.runtime.storage import IMAGE_ROW_GROUP_BYTES, IMAGE_ROW_GROUP_ROWS

    group_bytes = args.row_group_bytes or IMAGE_ROW_GROUP_BYTES
    group_rows = args.row_group_rows or IMAGE_ROW_GROUP_ROWS
    if args.repeats < 1:
        print("discl bench train-io: --repeats must be at least 1", file=sys.stderr)
        return 2
    out = run(root, args.real, args.sources, group_bytes, group_rows, args.world, args.lam, args.overrides,
              args.repeats, args.prepared)
    out["workload"] = {"real_rows": args.real, "sources": args.sources, "lams": list(LAMS), "seeds": 2,
                       "image": "224x224 JPEG", "row_group_bytes": group_bytes, "row_group_rows": group_rows,
                       "world": args.world}
    out["load_avg_1m"] = os.getloadavg()[0]
    ok = True
    for key, (op, target) in TARGETS.items():
        met = out[key] <= target if op == "<=" else out[key] >= target
        ok &= met
        print(f"{key:<34} {out[key]:8.3f}  (target {op} {target}: {'met' if met else 'NOT met'})")
    print(f"read_amplification_adaptive in a later curriculum epoch (V held): "
          f"{out['read_amplification_adaptive_later']:.3f}")
    print("V: {:.2f} MB read for {:.2f} MB; D: {:.2f} MB read for {:.2f} MB; layout: {}".format(
        out["v_bytes_read"] / 1e6, out["v_bytes_used"] / 1e6, out["d_bytes_read"] / 1e6, out["d_bytes_used"] / 1e6,
        ", ".join(f"{k} {v['row_groups']}×{v['rows_per_group']} rows (footer {v['footer_bytes'] / 1024:.1f} KiB)"
                  for k, v in out["layout"].items())))
    print("indexing (once per run, footers + id columns): {:.2f} MB read; first epoch with it: {:.3f}".format(
        out["index_bytes_read"] / 1e6, out["read_amplification_adaptive_with_index"]))
    print("stream ÷ cache samples/s per pair of epochs (stream, cache): " + ", ".join(
        f"{a / b:.3f} ({a:.0f}, {b:.0f})" for a, b in out["pairs_samples_per_s"]))
    if args.prepared:
        print(f"real rows streamed from the prepared copy (written once in {out['prepare_s']:.1f} s)")
    print(f"stream {out['stream_samples_per_s']:.0f} samples/s, cache {out['cache_samples_per_s']:.0f} samples/s; "
          f"epoch rows {out['epoch_rows']}; same epoch rows: {out['same_epoch_rows']}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
