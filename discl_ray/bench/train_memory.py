"""`discl bench train-memory`: peak RSS per Ray Train worker at N and 10·N training rows (streamed input).

Writes a synthetic experiment of 224×224 JPEG images as parquet (canonical rows, hard samples, spectrum
and scores, exactly the tables the upstream stages write), then trains one epoch through the real trainer
(``build_trainer``: 2 Ray Train workers, the image cache off so every image comes through the reader actors'
stream) at N and at 10·N rows, for a fixed-λ schedule and for the adaptive strategy (whose probe streams
V and D too). Each run reports ``worker_peak_rss_mb``: the largest VmHWM over the Train workers, reset
when the worker starts. Streaming keeps that flat in N; a worker that held the dataset would not.

The classifier is the small CNN at 32² (``training.image_size``): the decode of the 224² JPEGs and their
resize run in the stream's CPU tasks, and the 2-core machine this was written on can train 110,000 images
in minutes only with a small model. ``--pieces`` runs a subset and merges it into the ``--json`` file, so
the benchmark can be run in pieces.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

LAYOUT = 3      # the tables' layout (3: the writers' row groups of ≤ 8 rows, one spectrum part per λ); a change rewrites them

PIECES = ("fixed-n", "fixed-10n", "adaptive-n", "adaptive-10n")
CLASSES = 10
SIZE = 224


def _jpeg(rng: np.random.Generator, label: int) -> bytes:
    """A smooth 224² image (class colour + gradient + mild noise): ~5 KB as JPEG, cheap to store and read."""
    from PIL import Image

    base = np.array([(label * 37) % 256, (label * 91) % 256, (label * 53) % 256], np.float32)
    ramp = np.linspace(-40, 40, SIZE, dtype=np.float32)
    img = base + ramp[None, :, None] * rng.uniform(-1, 1) + ramp[:, None, None] * rng.uniform(-1, 1)
    img = img + rng.normal(0, 6, (SIZE // 8, SIZE // 8, 3)).repeat(8, 0).repeat(8, 1)
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def write_experiment(cfg, n_train: int, n_eval: int = 200, seed: int = 0, part_rows: int = 2000) -> dict:
    """Canonical rows (train / val / test), 2 % of training rows as hard, 2 spectrum rows per hard source."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from discl_ray.data import CANONICAL_SCHEMA
    from discl_ray.runtime.cluster import RunPaths
    from discl_ray.runtime.storage import parquet_write_options

    paths = RunPaths.from_config(cfg)
    marker = paths.dataset / "_dataset_config.json"
    done = paths.exp / "_bench_rows.json"
    if (done.is_file() and json.loads(done.read_text()).get("n_train") == n_train and marker.is_file()
            and json.loads(done.read_text()).get("layout") == LAYOUT):
        return json.loads(done.read_text())
    import shutil

    for d in (paths.dataset, paths.stage("generate", "spectrum")):    # no file of another layout left behind
        shutil.rmtree(d, ignore_errors=True)
    rng = np.random.default_rng(seed)
    rows = [("train", n_train), ("val", n_eval), ("test", n_eval)]
    paths.dataset.mkdir(parents=True, exist_ok=True)
    hard, image_bytes, part = [], 0, 0
    for split, n in rows:
        for start in range(0, n, part_rows):
            k = min(part_rows, n - start)
            labels = rng.integers(0, CLASSES, k)
            ids = [f"{split}-{start + i:07d}" for i in range(k)]
            imgs = [_jpeg(rng, int(c)) for c in labels]
            image_bytes += sum(len(b) for b in imgs)
            table = pa.table({"image_id": ids, "image": imgs, "path": [None] * k, "label": labels,
                              "class_name": [f"class{c}" for c in labels], "split": [split] * k,
                              "domain": [""] * k}).cast(CANONICAL_SCHEMA)
            pq.write_table(table, paths.dataset / f"rows-{part:05d}.parquet", **parquet_write_options(table))
            part += 1
            if split == "train":
                # 2 % hard, at least 2 sources (the adaptive strategy holds some out to form V).
                hard += [(i, int(c)) for j, (i, c) in enumerate(zip(ids, labels))
                         if rng.random() < 0.02 or (start == 0 and j < 2)]
    marker.write_text(json.dumps(cfg.dataset.model_dump(mode="json"), indent=1, sort_keys=True))
    mine = paths.stage("mine")
    mine.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"image_id": [h[0] for h in hard], "label": [h[1] for h in hard],
                             "class_name": [f"class{h[1]}" for h in hard], "group": ["few"] * len(hard),
                             "reason": ["confidence"] * len(hard), "score": [float("nan")] * len(hard)}),
                   mine / "part-0.parquet")
    spec = {k: [] for k in ("image_id", "source_image_id", "label", "lam", "seed", "image")}
    for src, c in hard:
        for lam in (0.5, 0.9):
            spec["image_id"].append(f"{src}|l{lam:.3f}|s0")
            spec["source_image_id"].append(src)
            spec["label"].append(c)
            spec["lam"].append(lam)
            spec["seed"].append(0)
            spec["image"].append(_jpeg(rng, c))
    for d in (paths.stage("generate", "spectrum"), paths.stage("score", "scores")):
        d.mkdir(parents=True, exist_ok=True)
    spec_t = pa.table(spec)
    for lam in (0.5, 0.9):       # one part per λ, as the spectrum store writes it, in the writers' row groups
        part = spec_t.filter(pc.equal(spec_t["lam"], lam))
        d = paths.stage("generate", "spectrum") / f"lam={lam}"
        d.mkdir(parents=True, exist_ok=True)
        pq.write_table(part, d / "part-0.parquet", **parquet_write_options(part))
    n_syn = len(spec["image_id"])
    pq.write_table(pa.table({"image_id": spec["image_id"], "source_image_id": spec["source_image_id"],
                             "label": spec["label"], "lam": spec["lam"], "seed": spec["seed"],
                             "clip_text_cos": rng.uniform(0.3, 0.9, n_syn).tolist()}),
                   paths.stage("score", "scores") / "part-0.parquet")
    info = {"layout": LAYOUT, "n_train": n_train, "n_eval": n_eval, "n_hard": len(hard), "n_spectrum": n_syn,
            "mean_jpeg_bytes": image_bytes / sum(n for _, n in rows)}
    done.write_text(json.dumps(info))
    return info


def run_piece(name: str, n: int, root: Path, overrides: list[str]) -> dict:
    from discl_ray.config import load_config

    strategy = name.split("-")[0]
    exp = f"mem{n}"
    cfg = load_config(None, [
        f"run_root={root}", f"experiment={exp}", "dataset.name=digits_lt", f"dataset.image_size={SIZE}",
        "training.task=low_quality", "training.backbone=small_cnn", "training.image_size=32",
        "generation.lams=[0.5,0.9]", "training.lams=[0.5,0.9,1.0]", "training.epochs=1",
        "training.curriculum_epochs=1",
        "training.strategy=" + ("adaptive" if strategy == "adaptive" else "fixed"),
        "training.fixed_lam=0.5", "scoring.threshold=0.0", "training.batch_size=128",
        "training.eval_batch_size=128", "training.num_workers=2", "training.cpus_per_worker=0.5",
        "training.image_cache_mb=0", "training.random_real_size=2000", "training.guidance_val_size=100",
        "tracking.enabled=false", *overrides])
    t0 = time.perf_counter()
    info = write_experiment(cfg, n)
    write_s = time.perf_counter() - t0
    run = ray_run(cfg, f"{name}-{time.strftime('%H%M%S')}", str(root / exp / "train"))
    h = run["history"][0]
    return {"n_train": n, "worker_peak_rss_mb": run["final"]["worker_peak_rss_mb"],
            "epoch_train_s": h["epoch_train_s"], "epoch_s": h["epoch_train_s"] + h.get("adaptive_probe_s", 0.0)
            + h.get("epoch_val_s", 0.0), "adaptive_probe_s": h.get("adaptive_probe_s", 0.0),
            "n_trained": h["n_train"], "e2e_s": run["e2e_s"], "write_s": write_s, **info}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="discl bench train-memory", description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=5000, help="training rows of the small run (≥ 5000 for the record)")
    p.add_argument("--factor", type=int, default=10, help="the large run has factor × n rows")
    p.add_argument("--pieces", default=",".join(PIECES), help=f"comma list of {', '.join(PIECES)}")
    p.add_argument("--run-root", default=None, help="where the parquet and checkpoints go (reused by pieces)")
    p.add_argument("--json", default=None, metavar="PATH", help="write (and merge earlier pieces into) JSON")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args(argv)
    pieces = [x for x in args.pieces.split(",") if x]
    bad = [x for x in pieces if x not in PIECES]
    if bad:
        print(f"discl bench train-memory: unknown piece(s) {bad}; choose from {', '.join(PIECES)}", file=sys.stderr)
        return 2

    from discl_ray.runtime.io import MergeFileError, read_json_to_merge

    try:      # earlier pieces' numbers; a file that cannot hold them stops the run now, not after the runs
        out: dict = read_json_to_merge(args.json) if args.json else {}
    except MergeFileError as err:
        print(f"discl bench train-memory: --json {err}", file=sys.stderr)
        return 2

    import ray

    root = Path(args.run_root or Path(tempfile.gettempdir()) / "discl-bench-train-memory")
    if not ray.is_initialized():
        from discl_ray.runtime.cluster import init_local_ray

        init_local_ray(num_cpus=os.cpu_count() or 2, include_dashboard=False, log_to_driver=False)
    for name in pieces:
        n = args.n * (args.factor if name.endswith("-10n") else 1)
        out[name] = run_piece(name, n, root, args.overrides)
        out[name]["load_avg_1m"] = os.getloadavg()[0]
        print(f"{name}: {json.dumps(out[name])}", flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=1))
    for prefix, key in (("fixed", "rss_ratio"), ("adaptive", "rss_ratio_adaptive")):
        if f"{prefix}-n" in out and f"{prefix}-10n" in out:
            out[key] = out[f"{prefix}-10n"]["worker_peak_rss_mb"] / out[f"{prefix}-n"]["worker_peak_rss_mb"]
    print(f"{'run':<14} {'rows':>7} {'peak RSS MiB':>13} {'epoch s':>9} {'probe s':>8}")
    for name in PIECES:
        if name in out:
            r = out[name]
            print(f"{name:<14} {r['n_train']:>7} {r['worker_peak_rss_mb']:>13.0f} {r['epoch_s']:>9.1f} "
                  f"{r['adaptive_probe_s']:>8.1f}")
    for key in ("rss_ratio", "rss_ratio_adaptive"):
        if key in out:
            ok = out[key] <= 1.3
            print(f"{key} = {out[key]:.3f} (target <= 1.3: {'met' if ok else 'NOT met'})")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


def ray_run(cfg, name: str, storage: str) -> dict:
    """One Ray Train run of ``cfg``: loop and end-to-end time, samples, the per-epoch history (every train bench)."""
    import time

    from discl_ray.training import build_trainer
    from discl_ray.training.checkpointing import read_state
    from discl_ray.training.trainer import run_trainer

    t0 = time.perf_counter()
    result = run_trainer(*build_trainer(cfg, run_name=name, storage_path=storage))
    m = result.metrics
    history = read_state(result.checkpoint).get("metrics", [])
    return {"loop_s": m["loop_s"], "samples": m["loop_samples"], "samples_per_s": m["loop_samples_per_s"],
            "e2e_s": time.perf_counter() - t0, "history": history, "final": m}
