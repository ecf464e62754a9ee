"""`discl generate`: hard samples × λ × seeds → spectrum parquet, on Ray Data with a generator actor pool.

    sources (driver: join hard table, rows, prompts; drop sources whose keys are all written)
      → fan_out          CPU tasks: decode/resize each source once, one work row per missing key
      → SpectrumGenerator actor pool (ActorPoolStrategy, num_gpus per actor): batched img2img
      → driver           streams result blocks and writes each as a new parquet part (atomic rename)

Resumable by construction: keys already in ``spectrum/`` are never planned again, every streamed block
becomes its own part file, so a run killed midway keeps what it wrote and the rerun makes exactly the
rest. Failed keys go to ``errors/`` (and are retried by the next run).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Optional

import pyarrow as pa
import pyarrow.compute as pc

from discl_ray.generation.actor import SpectrumGenerator
from discl_ray.generation.engine import output_key, steps_for
from discl_ray.generation.grid import spectrum_grid
from discl_ray.generation.plan import (
    ERRORS_SCHEMA,
    SPECTRUM_SCHEMA,
    check_existing,
    done_keys,
    fan_out,
    load_source,
    plan_sources,
    read_inputs,
    spectrum_lams,
)
from discl_ray.io import ImageLoadError, write_parquet_part
from discl_ray.runtime import RunPaths, init_ray, resolve_device

if TYPE_CHECKING:
    from discl_ray.config import ExperimentConfig

log = logging.getLogger(__name__)


def pending_sources(sources: pa.Table, lams: list[float], seeds: list[int], done: set[str]) -> tuple[pa.Table, int]:
    """(sources with at least one missing key, number of planned keys already written)."""
    keep, skipped = [], 0
    for sid in sources["source_image_id"].to_pylist():
        n_done = sum(output_key(sid, lam, s) in done for lam in lams for s in seeds)
        skipped += n_done
        keep.append(n_done < len(lams) * len(seeds))
    return sources.filter(pa.array(keep, pa.bool_())), skipped


def build_dataset(cfg: "ExperimentConfig", sources: pa.Table, done: set[str], generator_cls=SpectrumGenerator):
    """The lazy Ray Data pipeline: sources → fan_out (CPU) → SpectrumGenerator actor pool.

    ``generator_cls`` lets a benchmark swap in an instrumented subclass; the job always uses the default."""
    import ray

    gen = cfg.generation
    paths = RunPaths.from_config(cfg)
    lams = spectrum_lams(gen)
    device = resolve_device(gen.device)
    num_gpus = gen.num_gpus_per_actor if device != "cpu" else 0
    if num_gpus:
        have = ray.cluster_resources().get("GPU", 0)
        if have < num_gpus * gen.actors_min:
            raise ValueError(f"generation.num_gpus_per_actor={num_gpus} × actors_min={gen.actors_min} needs "
                             f"{num_gpus * gen.actors_min} GPUs; the cluster has {have} "
                             "(use generation.device=cpu and num_gpus_per_actor=0 on CPU-only machines)")
    per_source = max(1, len(lams) * len(gen.seeds))
    src_per_block = max(1, gen.rows_per_block // per_source)
    blocks = [sources.slice(i, src_per_block) for i in range(0, sources.num_rows, src_per_block)]
    ids = set(sources["source_image_id"].to_pylist())
    skip = {k for k in done if k.rsplit("|", 2)[0] in ids}
    ds = ray.data.from_arrow(blocks)
    ds = ds.map_batches(fan_out, batch_size=None, batch_format="pyarrow", num_cpus=0.25,
                        fn_kwargs=dict(lams=lams, seeds=list(gen.seeds), skip=skip, root=cfg.dataset.root,
                                       width=gen.width, height=gen.height))
    threads = max(1, int(gen.num_cpus_per_actor))
    return ds.map_batches(generator_cls, batch_size=gen.rows_per_block, batch_format="pyarrow",
                          fn_constructor_kwargs=dict(generation=gen.model_dump(mode="json"),
                                                     cache_dir=str(paths.cache), threads=threads),
                          compute=ray.data.ActorPoolStrategy(min_size=gen.actors_min, max_size=gen.actors_max),
                          num_gpus=num_gpus, num_cpus=gen.num_cpus_per_actor)


def write_outputs(batch: pa.Table, paths: RunPaths) -> tuple[int, int]:
    """Split one result block into spectrum rows and error rows; each becomes a new part file."""
    ok = pc.equal(batch["error"], "")
    good = batch.filter(ok).select(SPECTRUM_SCHEMA.names).cast(SPECTRUM_SCHEMA)
    bad = batch.filter(pc.invert(ok))
    if good.num_rows:
        write_parquet_part(good, paths.stage("generate", "spectrum"))
    if bad.num_rows:
        errors = pa.table({"key": bad["image_id"], "source_image_id": bad["source_image_id"],
                           "reason": bad["error"]}, schema=ERRORS_SCHEMA)
        write_parquet_part(errors, paths.stage("generate", "errors"))
    return good.num_rows, bad.num_rows


def run_generate(cfg: "ExperimentConfig", on_part: Optional[Callable[[int, int], None]] = None) -> dict:
    """Generate every missing spectrum key; returns (and writes) the run summary."""
    gen = cfg.generation
    paths = RunPaths.from_config(cfg)
    out_dir = paths.stage("generate", "spectrum")
    lams = spectrum_lams(gen)
    hard, rows, prompts = read_inputs(cfg)
    sources = plan_sources(hard, rows, prompts)
    check_existing(out_dir, gen)
    done = done_keys(out_dir)
    todo, skipped = pending_sources(sources, lams, list(gen.seeds), done)
    planned = sources.num_rows * len(lams) * len(gen.seeds)
    log.info("generate: %d sources × %d λ × %d seeds = %d keys; %d already written", sources.num_rows,
             len(lams), len(gen.seeds), planned, skipped)
    t0 = time.perf_counter()
    generated = failed = 0
    if todo.num_rows:
        init_ray(cfg)
        for batch in build_dataset(cfg, todo, done).iter_batches(batch_size=None, batch_format="pyarrow"):
            g, f = write_outputs(batch, paths)
            generated += g
            failed += f
            if on_part:
                on_part(generated, failed)
    wall = time.perf_counter() - t0
    summary = {"planned": planned, "generated": generated, "skipped": skipped, "failed": failed,
               "wall_s": round(wall, 3), "outputs_per_s": round(generated / wall, 3) if wall and generated else 0.0,
               "steps_expected": sum(steps_for(gen.steps, lam) for lam in lams) * len(gen.seeds) * sources.num_rows,
               "model": gen.model, "lams": lams, "seeds": list(gen.seeds),
               "spectrum_dir": str(out_dir), "errors_dir": str(paths.stage("generate", "errors"))}
    grid_path = write_grid(cfg, sources, lams)
    summary["grid"] = str(grid_path) if grid_path else None
    paths.stage("generate").mkdir(parents=True, exist_ok=True)
    (paths.stage("generate") / "summary.json").write_text(json.dumps(summary, indent=1))
    if cfg.tracking.enabled:
        log_to_mlflow(cfg, summary, grid_path)
    return summary


def write_grid(cfg: "ExperimentConfig", sources: pa.Table, lams: list[float]):
    """Render ``generate/spectrum_grid.png`` for the first ``grid_sources`` loadable sources."""
    import io

    from PIL import Image

    gen = cfg.generation
    paths = RunPaths.from_config(cfg)
    real = {}
    for row in sources.to_pylist():
        if len(real) >= gen.grid_sources or row["error"]:
            continue
        try:
            data = load_source(row["image"], row["path"], cfg.dataset.root, gen.width, gen.height)
        except ImageLoadError:
            continue
        real[row["source_image_id"]] = Image.open(io.BytesIO(data)).convert("RGB")
    grid = spectrum_grid(paths.stage("generate", "spectrum"), real, lams, list(gen.seeds),
                         gen.grid_sources, gen.grid_seeds)
    if grid is None:
        return None
    path = paths.stage("generate", "spectrum_grid.png")
    grid.save(path)
    return path


def log_to_mlflow(cfg: "ExperimentConfig", summary: dict, grid_path) -> None:
    import mlflow

    from discl_ray import tracking

    with tracking.run(cfg, "generate"):
        mlflow.log_metrics({k: float(summary[k]) for k in ("planned", "generated", "skipped", "failed",
                                                           "wall_s", "outputs_per_s")})
        mlflow.log_dict(summary, "generate_summary.json")
        if grid_path:
            mlflow.log_artifact(str(grid_path))
