"""`discl bench generate`: the authors' generation loop vs ours, in-process and on Ray Data.

Same tiny random SD-style img2img checkpoint, same work (sources × λ × seeds, same prompts, same
per-key generators), three ways, in one run:

  (a) authors' way — one pipeline call per (source, λ, seed): prompt re-encoded and image re-encoded
      by the VAE every call, batch of one;
  (b) ours in-process — ``SpectrumGenerator`` (batched seeds and sources per λ, cached prompt
      embeddings, one VAE encode per source) called directly on the job's blocks, then the PNG encoder;
  (c) ours on Ray Data — the job's own pipeline (prepare CPU tasks → one ``SpectrumGenerator`` actor →
      encode + write CPU tasks, the workers writing the parts), timed end to end including the actor's
      start and model load.

Then the driver's peak RSS of a real ``run_generate`` (its own process, joined to the same cluster) at 1×
and 4× the outputs: workers write, the driver only counts receipts, so it must not grow (ratio ≤ 1.3).
``--shape tiny|sdxl-refiner --device cuda`` runs :mod:`discl_ray.bench.generate_shape` instead.

(a) and (b) include their model load. (c) also pays what only a separate process pays — Ray Data's
start, a new worker process and its torch/diffusers imports (~10 s here) — so c/b is also reported
after model load (each timed from the moment its model was ready), the part that grows with the work.
Ray workers run at nice 15 by default; on this shared machine that alone starved (c), so the benchmark
starts Ray with ``RAY_worker_niceness=0`` (same priority as (a) and (b)) unless the variable is set.
Prints outputs/s, b/a, c/b, and denoising steps expected (Σ int(steps × (1 − λ))) vs executed.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from discl_ray.generation.engine import steps_for
from discl_ray.generation.plan import fan_out, plan_sources, spectrum_lams
from discl_ray.runtime.io import png_bytes

LAMS = [0.0, 0.1, 0.3, 0.5, 0.7, 0.9]


def _inputs(n_sources: int, size: int) -> tuple[pa.Table, pa.Table, pa.Table]:
    rng = np.random.default_rng(0)
    ids = [f"src{i}" for i in range(n_sources)]
    imgs = [png_bytes(np.kron(rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8),
                              np.ones((8, 8, 1), np.uint8))) for _ in ids]
    labels = [i % 2 for i in range(n_sources)]
    rows = pa.table({"image_id": ids, "image": imgs, "path": pa.array([None] * n_sources, pa.string()),
                     "label": pa.array(labels, pa.int64())})
    hard = pa.table({"image_id": ids, "label": pa.array(labels, pa.int64()),
                     "class_name": [f"c{x}" for x in labels]})
    prompts = pa.table({"label": pa.array([0, 1], pa.int64()),
                        "gen_prompts": [["a photo of the digit zero", "a drawing of the digit zero"],
                                        ["a photo of the digit one"]]})
    return hard, rows, prompts


def run_authors(model: str, work: pa.Table, gen) -> tuple[float, int]:
    """(a): one call per output, prompt string and PIL image, batch of one."""
    import io

    import torch
    from PIL import Image

    from discl_ray.generation.engine import noise_seed, strength_of
    from discl_ray.generation.pipeline import load_img2img

    t0 = time.perf_counter()
    pipe = load_img2img(model, "cpu", "float32", gen.scheduler)
    steps = 0

    def count(_p, _i, _t, kw):
        nonlocal steps
        steps += 1
        return kw

    for r in work.to_pylist():
        img = Image.open(io.BytesIO(r["source"])).convert("RGB")
        g = torch.Generator("cpu").manual_seed(noise_seed(r["source_image_id"], r["lam"], r["seed"]))
        with torch.inference_mode():
            out = pipe(prompt=r["prompt"], image=img, strength=strength_of(r["lam"]), num_inference_steps=gen.steps,
                       guidance_scale=gen.guidance_scale, generator=g, callback_on_step_end=count).images[0]
        png_bytes(out)
    return time.perf_counter() - t0, steps


def run_ours(sources: pa.Table, gen) -> tuple[float, float, int, pa.Table]:
    """(b): the actor class in-process, fed the job's blocks of prepared sources, then the CPU encoder.

    Returns (end-to-end seconds, seconds after the model was loaded, steps run, spectrum rows)."""
    from discl_ray.generation.actor import SpectrumGenerator
    from discl_ray.generation.output import encode_rows
    from discl_ray.generation.plan import block_sources, prepare_sources

    t0 = time.time()
    actor = SpectrumGenerator(gen.model_dump(mode="json"), threads=1)
    ready = time.time()
    k = block_sources(gen)
    outs = []
    for i in range(0, sources.num_rows, k):
        prep = prepare_sources(sources.slice(i, k), spectrum_lams(gen), list(gen.seeds))
        outs.append(encode_rows(actor(prep)))
    end = time.time()
    return end - t0, end - ready, actor.steps_run, pa.concat_tables(outs)


class TimedGenerator:
    """``SpectrumGenerator`` that also reports when its model was ready (for steady-state timing): the time
    travels in the rows' actor description, which the writer returns to the driver in its receipts."""

    def __init__(self, *args, **kwargs):
        from discl_ray.generation.actor import SpectrumGenerator

        self.inner = SpectrumGenerator(*args, **kwargs)
        self.inner.actor = json.dumps({"ready_at": time.time()})

    def __call__(self, batch: pa.Table) -> pa.Table:
        return self.inner(batch)


def run_ray(cfg, sources: pa.Table) -> tuple[float, float, int, int]:
    """(c): the job's Ray Data pipeline with one generator actor, workers writing the parts (end-to-end and
    after model load; also outputs and bytes written)."""
    from discl_ray.generation.job import build_dataset

    t0 = time.time()
    receipts = list(build_dataset(cfg, sources, set(), generator_cls=TimedGenerator).iter_rows())
    end = time.time()
    ready = min(json.loads(a)["ready_at"] for r in receipts for a in r["actors"])
    return end - t0, end - ready, sum(r["generated"] for r in receipts), sum(r["bytes"] for r in receipts)


RSS_CHILD = """
import json, resource, sys
from discl_ray.config import load_config
from discl_ray.generation.job import run_generate
cfg = load_config(data=json.loads(sys.argv[1]))
s = run_generate(cfg)
print(json.dumps({"generated": s["generated"], "rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def write_inputs(cfg, n_sources: int, size: int) -> None:
    """The dataset, mine and prompts tables of a bench experiment, as the upstream stages write them."""
    from discl_ray.data import CANONICAL_SCHEMA
    from discl_ray.runtime.cluster import RunPaths
    from discl_ray.runtime.io import write_parquet_part

    hard, rows, prompts = _inputs(n_sources, size)
    paths = RunPaths.from_config(cfg)
    n = rows.num_rows
    canon = rows.append_column("class_name", pa.array([f"c{x}" for x in rows["label"].to_pylist()]))
    canon = canon.append_column("split", pa.array(["train"] * n)).append_column("domain", pa.array([""] * n))
    write_parquet_part(canon.select(CANONICAL_SCHEMA.names).cast(CANONICAL_SCHEMA), paths.store("dataset"), "rows")
    paths.store("dataset", "_dataset_config.json").write_text(json.dumps(cfg.dataset.model_dump(mode="json"),
                                                                         indent=1, sort_keys=True))
    hard = hard.append_column("group", pa.array(["few"] * n)).append_column("reason", pa.array(["frequency"] * n))
    write_parquet_part(hard.append_column("score", pa.array([float("nan")] * n)), paths.store("mine"))
    prompts = prompts.append_column("class_name", pa.array(["c0", "c1"])).append_column(
        "clip_prompt", pa.array(["c0", "c1"]))
    write_parquet_part(prompts, paths.store("prompts"))


def driver_rss(data: dict, n_sources: int, size: int, address: str) -> tuple[int, int]:
    """(outputs, peak RSS KiB) of a real `run_generate` driver process joined to this cluster."""
    import subprocess
    import sys

    from discl_ray.config import load_config

    data = json.loads(json.dumps(data))
    data["run_root"] = f"{data['run_root']}-rss{n_sources}"
    data["ray"] = {"address": address}
    write_inputs(load_config(data=data), n_sources, size)
    out = subprocess.run([sys.executable, "-c", RSS_CHILD, json.dumps(data)], capture_output=True, text=True,
                         timeout=3600, env={**os.environ, "PYTHONPATH": os.pathsep.join(
                             filter(None, [str(Path.cwd()), os.environ.get("PYTHONPATH")]))})
    if out.returncode:
        raise RuntimeError(f"RSS driver failed: {out.stderr[-3000:]}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    return res["generated"], res["rss_kib"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="discl bench generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default=None, help="write the numbers here")
    p.add_argument("--model", default=None, help="img2img checkpoint (default: a tiny random SD built now)")
    p.add_argument("--sources", type=int, default=20)
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rss-sources", type=int, default=10, help="sources of the 1x driver-RSS run (4x: 4 times as many)")
    p.add_argument("--shape", default=None, choices=["tiny", "sdxl-refiner"],
                   help="instead: throughput and TFLOP/s of the UNet+VAE architecture (random weights, no download)")
    p.add_argument("--device", default="cpu", help="device for --shape (cuda for sdxl-refiner)")
    args = p.parse_known_args(argv)[0]
    if args.shape:
        from discl_ray.bench.generate_shape import main as shape_main

        return shape_main(argv)

    import ray
    import torch

    from discl_ray.config import load_config
    from discl_ray.generation.tiny import build_tiny_sd

    torch.set_num_threads(1)
    tmp = tempfile.mkdtemp(prefix="bench-gen-")
    model = args.model or str(build_tiny_sd(Path(tmp) / "tiny-sd"))
    per_source = len(LAMS) * args.seeds
    data = {"experiment": "bench", "run_root": str(Path(tmp) / "runs"), "training": {"strategy": "none"},
            "tracking": {"enabled": False},
            "generation": {"model": model, "lams": LAMS, "seeds": list(range(args.seeds)), "steps": args.steps,
                           "guidance_scale": 10.0, "device": "cpu", "dtype": "float32",
                           "batch_size": args.batch_size, "rows_per_block": per_source * 2,
                           "actors_max": 1, "num_gpus_per_actor": 0, "num_cpus_per_actor": 1}}
    cfg = load_config(data=data)
    gen = cfg.generation
    sources = plan_sources(*_inputs(args.sources, args.size))
    work = fan_out(sources, spectrum_lams(gen), list(gen.seeds))
    n = work.num_rows
    expected = sum(steps_for(gen.steps, lam) for lam in work["lam"].to_pylist())

    t_a, steps_a = run_authors(model, work, gen)
    t_b, t_b_loaded, steps_b, out_b = run_ours(sources, gen)
    # Ray starts workers at nice 15; on a machine shared with nice-0 processes that alone starves (c).
    # Same priority for all three modes (a dedicated GPU node has no competitors, so no difference there).
    os.environ.setdefault("RAY_worker_niceness", "0")
    if not ray.is_initialized():
        from discl_ray.runtime.cluster import init_local_ray

        init_local_ray(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    t_c, t_c_loaded, n_c, bytes_c = run_ray(cfg, sources)
    from discl_ray.runtime.cluster import RunPaths
    from discl_ray.runtime.io import read_parquet_dir

    out_c = read_parquet_dir(RunPaths.from_config(cfg).store("generate", "spectrum"))
    same = sorted(out_b["image_id"].to_pylist()) == sorted(out_c["image_id"].to_pylist())
    by_key = dict(zip(out_b["image_id"].to_pylist(), out_b["image"].to_pylist()))
    identical = sum(by_key.get(k) == v for k, v in zip(out_c["image_id"].to_pylist(), out_c["image"].to_pylist()))
    # Driver memory of the real job at 1x and 4x outputs (a separate driver process joined to this cluster).
    rss_data = json.loads(json.dumps(data))
    rss_data["generation"].update(seeds=[0, 1], steps=10)     # 10 steps: λ = 0.9 still runs one
    address = ray.get_runtime_context().gcs_address
    n1, rss1 = driver_rss(rss_data, args.rss_sources, args.size, address)
    n4, rss4 = driver_rss(rss_data, 4 * args.rss_sources, args.size, address)
    res = {"outputs": n, "sources": args.sources, "lams": LAMS, "seeds": args.seeds, "steps": gen.steps,
           "batch_size": gen.batch_size, "size": args.size,
           "a_s": round(t_a, 3), "b_s": round(t_b, 3), "c_s": round(t_c, 3),
           "a_outputs_per_s": round(n / t_a, 3), "b_outputs_per_s": round(n / t_b, 3),
           "c_outputs_per_s": round(n / t_c, 3), "b_over_a": round(t_a / t_b, 3), "c_over_b": round(t_b / t_c, 3),
           "b_loaded_s": round(t_b_loaded, 3), "c_loaded_s": round(t_c_loaded, 3),
           "c_over_b_after_load": round(t_b_loaded / t_c_loaded, 3),
           "b_start_s": round(t_b - t_b_loaded, 3), "c_start_s": round(t_c - t_c_loaded, 3),
           "steps_expected": expected, "steps_run": steps_b, "steps_run_a": steps_a,
           "same_keys_b_c": same, "identical_png_b_c": identical,
           "bytes_per_output": round(bytes_c / n_c, 1) if n_c else 0.0, "format": gen.image_format,
           "driver_outputs_1x": n1, "driver_outputs_4x": n4, "driver_peak_rss_mib_1x": round(rss1 / 1024, 1),
           "driver_peak_rss_mib_4x": round(rss4 / 1024, 1), "driver_rss_ratio": round(rss4 / rss1, 3),
           "machine": "2 CPU cores shared with other sessions, no GPU, torch threads 1"}
    print(f"{'mode':<34}{'seconds':>9}{'outputs/s':>11}")
    for label, key in (("(a) authors: one call per output", "a"), ("(b) ours in-process", "b"),
                       ("(c) ours on Ray Data, 1 actor", "c")):
        print(f"{label:<34}{res[key + '_s']:>9.2f}{res[key + '_outputs_per_s']:>11.2f}")
    print(f"b/a = {res['b_over_a']:.2f} (target ≥ 2.0)   c/b = {res['c_over_b']:.2f} (target ≥ 0.8)")
    print(f"after model load: b {t_b_loaded:.2f} s, c {t_c_loaded:.2f} s, c/b = {res['c_over_b_after_load']:.2f}; "
          f"one-time start: b {res['b_start_s']:.2f} s (model load), c {res['c_start_s']:.2f} s "
          "(Ray Data start, worker process, imports, model load)")
    print(f"denoising steps: expected Σ int(steps × (1 − λ)) = {expected}, run (b) = {steps_b}, run (a) = {steps_a}")
    print(f"same keys b/c: {same}; identical PNGs b vs c: {identical}/{n}; "
          f"bytes per output ({gen.image_format}): {res['bytes_per_output']:.0f}")
    print(f"driver peak RSS: {res['driver_peak_rss_mib_1x']:.0f} MiB at {n1} outputs, "
          f"{res['driver_peak_rss_mib_4x']:.0f} MiB at {n4}: ratio {res['driver_rss_ratio']:.2f} (target ≤ 1.3)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=1))
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    return 0
