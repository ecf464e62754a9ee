"""`discl bench scaling`: how busy Ray Data keeps K simulated GPUs (K = 1…8) on this machine.

A stand-in generator actor holds a simulated GPU — one unit of a custom ``sim_gpu`` resource, with a
fractional CPU — and "computes" each batch by sleeping a fixed time (a GPU kernel does not use the host
CPU either). The pipeline is the real job's shape: a CPU fan-out step (one work row per key, payload bytes
like a source PNG) → ``map_batches(actor, ActorPoolStrategy(K, K), resources={"sim_gpu": 1})`` → the
driver consuming result blocks. Utilisation = simulated busy time / (K × wall time), reported both end
to end (actor start included), over the run's span (first batch start → last batch end, which still
counts actors that started late) and per actor (each actor's first batch start → its last batch end:
once an actor holds its model, how busy does Ray Data keep it).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa


class SimGPUGenerator:
    """Holds one simulated GPU; each batch takes ``batch_s`` seconds of (sleeping) device time."""

    def __init__(self, batch_s: float, load_s: float, out_bytes: int):
        time.sleep(load_s)                     # model load
        self.batch_s = batch_s
        self.payload = os.urandom(out_bytes)
        self.pid = os.getpid()

    def __call__(self, batch: pa.Table) -> pa.Table:
        start = time.time()
        time.sleep(self.batch_s)
        end = time.time()
        n = batch.num_rows
        return pa.table({"key": batch["key"], "image": [self.payload] * n, "actor": [self.pid] * n,
                         "start": [start] * n, "end": [end] * n})


def fan_out(batch: pa.Table, per_source: int, in_bytes: int) -> pa.Table:
    """One work row per (source, λ, seed) with a source-sized payload, like the real fan-out."""
    keys = [f"{s}|{j}" for s in batch["source"].to_pylist() for j in range(per_source)]
    payload = b"\0" * in_bytes
    return pa.table({"key": keys, "source": [payload] * len(keys)})


def run_k(k: int, batches_per_gpu: int, batch_size: int, batch_s: float, load_s: float, per_source: int,
          in_bytes: int, out_bytes: int) -> dict:
    import ray

    n_rows = k * batches_per_gpu * batch_size
    n_sources = int(np.ceil(n_rows / per_source))
    ds = ray.data.from_items([{"source": f"s{i}"} for i in range(n_sources)], override_num_blocks=max(1, 2 * k))
    ds = ds.map_batches(fan_out, batch_size=None, batch_format="pyarrow", num_cpus=0.1,
                        fn_kwargs=dict(per_source=per_source, in_bytes=in_bytes))
    ds = ds.limit(n_rows)
    ds = ds.map_batches(SimGPUGenerator, batch_size=batch_size, batch_format="pyarrow",
                        fn_constructor_kwargs=dict(batch_s=batch_s, load_s=load_s, out_bytes=out_bytes),
                        compute=ray.data.ActorPoolStrategy(min_size=k, max_size=k), num_cpus=0.1,
                        resources={"sim_gpu": 1})
    t0 = time.time()
    spans, rows = {}, 0
    for b in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        rows += b.num_rows
        for a, s, e in zip(b["actor"].to_pylist(), b["start"].to_pylist(), b["end"].to_pylist()):
            spans[(a, s)] = e
    wall = time.time() - t0
    busy = sum(e - s for (_a, s), e in spans.items())
    first = min(s for _a, s in spans)
    last = max(spans.values())
    steady = last - first
    per_actor: dict[int, list[float]] = {}
    for (a, st), e in spans.items():
        lo, hi = per_actor.get(a, [st, e])
        per_actor[a] = [min(lo, st), max(hi, e)]
    active = sum(hi - lo for lo, hi in per_actor.values())
    return {"k": k, "rows": rows, "batches": len(spans), "actors_used": len({a for a, _ in spans}),
            "wall_s": round(wall, 3), "busy_s": round(busy, 3),
            "util_end_to_end": round(busy / (k * wall), 3), "util_steady": round(busy / (k * steady), 3),
            "util_per_actor": round(busy / active, 3),
            "rows_per_s": round(rows / wall, 2), "ideal_rows_per_s": round(k * batch_size / batch_s, 2)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="discl bench scaling", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default=None)
    p.add_argument("--max-k", type=int, default=8)
    p.add_argument("--batches-per-gpu", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=16, help="outputs per simulated GPU batch")
    p.add_argument("--batch-s", type=float, default=0.25, help="simulated device seconds per batch")
    p.add_argument("--load-s", type=float, default=1.0, help="simulated model load per actor")
    p.add_argument("--in-bytes", type=int, default=200_000, help="source payload per work row")
    p.add_argument("--out-bytes", type=int, default=200_000, help="PNG payload per output row")
    args = p.parse_args(argv)

    import ray

    os.environ.setdefault("RAY_worker_niceness", "0")      # see bench/generate.py: shared-machine fairness
    from discl_ray.runtime.cluster import init_local_ray

    init_local_ray(num_cpus=2, resources={"sim_gpu": args.max_k}, include_dashboard=False, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    results = []
    print(f"{'K':>3}{'wall s':>9}{'busy s':>9}{'util e2e':>10}{'util span':>11}{'util/actor':>12}"
          f"{'rows/s':>9}{'ideal':>8}")
    for k in range(1, args.max_k + 1):
        r = run_k(k, args.batches_per_gpu, args.batch_size, args.batch_s, args.load_s, 48,
                  args.in_bytes, args.out_bytes)
        results.append(r)
        print(f"{k:>3}{r['wall_s']:>9.2f}{r['busy_s']:>9.2f}{r['util_end_to_end']:>10.2f}"
              f"{r['util_steady']:>11.2f}{r['util_per_actor']:>12.2f}{r['rows_per_s']:>9.1f}"
              f"{r['ideal_rows_per_s']:>8.1f}")
    ray.shutdown()
    out = {"params": vars(args), "results": results,
           "machine": "2 CPU cores shared with other sessions, no GPU; sim_gpu custom resource"}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0
