"""`discl generate`: hard samples × λ × seeds → spectrum parquet, on Ray Data with a generator actor pool.

    sources (driver: join hard table, rows, prompts; drop sources whose keys are all written; cut into
             blocks of whole sources, ≥ rows_per_block outputs and ≥ 4 batches each)
      → prepare_sources   CPU tasks: decode/resize each source once, list its missing (λ, seed) keys
      → SpectrumGenerator actor pool (fixed size, num_gpus_per_actor GPUs whenever device != cpu; the
                          actor resolves `auto` itself): fans each source out, batched img2img, raw pixels
      → encode_and_write  CPU tasks: PNG/WebP/JPEG, then each block written by the worker as
                          spectrum/part-<hash of its keys>.parquet (+ errors/); the driver gets receipts

Resumable by construction: keys already in ``spectrum/`` are never planned again and a block is one
atomic file named by its keys, so a run killed midway keeps what it wrote and the rerun makes exactly the
rest, byte for byte. A lease file stops a second concurrent run of the stage.
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
from discl_ray.generation.output import encode_and_write, merge_actors
from discl_ray.generation.plan import (
    block_sources,
    load_source,
    plan_sources,
    planned_keys,
    prepare_sources,
    read_inputs,
    spectrum_lams,
)
from discl_ray.generation.store import (
    MANIFEST,
    build_view,
    settings_digest,
    source_digest,
    store_index,
    store_root,
    write_manifest,
    writer_lock,
)
from discl_ray.runtime.cluster import actor_gpus
from discl_ray.runtime.context import StageContext
from discl_ray.runtime.io import ImageLoadError
from discl_ray.runtime.lease import StageLease

if TYPE_CHECKING:
    from discl_ray.config import ExperimentConfig
    from discl_ray.runtime.cluster import RunPaths

log = logging.getLogger(__name__)


def pending_sources(sources: pa.Table, lams: list[float], seeds: list[int], done: set[str]) -> tuple[pa.Table, int]:
    """(sources with at least one missing key, number of planned keys already written)."""
    keep, skipped = [], 0
    for sid in sources["source_image_id"].to_pylist():
        n_done = sum(output_key(sid, lam, s) in done for lam in lams for s in seeds)
        skipped += n_done
        keep.append(n_done < len(lams) * len(seeds))
    return sources.filter(pa.array(keep, pa.bool_())), skipped


def build_dataset(cfg: "ExperimentConfig", sources: pa.Table, done: set[str], generator_cls=SpectrumGenerator,
                  write: bool = True, store_args: Optional[dict] = None, ctx: Optional[StageContext] = None):
    """The lazy Ray Data pipeline: sources → prepare (CPU) → generator actor pool → encode + write (CPU).

    ``write=False`` stops after the generator (raw pixel rows; the benchmark's mode c without storage);
    ``generator_cls`` lets a benchmark swap in an instrumented subclass; the job always uses the default.
    ``store_args`` (``store_dir``, ``settings``, ``source_digests``): where and under which keys the written
    rows go in the spectrum store (default: this config's store, keys computed here). ``ctx``: the stage's
    context (opened for ``cfg`` when not given)."""
    import ray

    ctx = ctx or StageContext.open(cfg, "generate")
    gen = cfg.generation
    paths = ctx.paths
    lams = spectrum_lams(gen)
    num_gpus = actor_gpus(cfg, gen.device, gen.num_gpus_per_actor, "generation", address=ctx.address)
    sources = sources.sort_by("source_image_id")
    per_block = block_sources(gen)
    blocks = [sources.slice(i, per_block) for i in range(0, sources.num_rows, per_block)]
    ids = set(sources["source_image_id"].to_pylist())
    skip = {k for k in done if k.rsplit("|", 2)[0] in ids}
    ds = ray.data.from_arrow(blocks)
    ds = ds.map_batches(prepare_sources, batch_size=None, batch_format="pyarrow", num_cpus=0.25,
                        fn_kwargs=dict(lams=lams, seeds=list(gen.seeds), skip=skip, root=cfg.dataset.root,
                                       width=gen.width, height=gen.height))
    threads = max(1, int(gen.num_cpus_per_actor))
    size = gen.actors_max if gen.actors_min is None else gen.actors_min
    # One batch = one block of whole sources (Ray Data requires an explicit batch size for GPU stages).
    ds = ds.map_batches(generator_cls, batch_size=per_block, batch_format="pyarrow",
                        fn_constructor_kwargs=dict(generation=gen.model_dump(mode="json"),
                                                   cache_dir=str(paths.cache), threads=threads),
                        compute=ray.data.ActorPoolStrategy(min_size=size, max_size=gen.actors_max),
                        num_gpus=num_gpus, num_cpus=gen.num_cpus_per_actor)
    if not write:
        return ds
    if store_args is None:
        store_args = dict(store_dir=str(store_root(cfg, paths)), settings=settings_digest(gen, paths.cache),
                          source_digests=source_digests(sources, cfg.dataset.root))
    return ds.map_batches(encode_and_write, batch_size=None, batch_format="pyarrow", num_cpus=0.25,
                          fn_kwargs=dict(spectrum_dir=str(paths.store("generate", "spectrum")),
                                         errors_dir=str(paths.store("generate", "errors")),
                                         fmt=gen.image_format, quality=gen.jpeg_quality, **store_args))


def source_digests(sources: pa.Table, root: Optional[str]) -> dict[str, str]:
    """source_image_id → digest of the source image's bytes (part of every key of its outputs)."""
    return {sid: source_digest(img, path, root) for sid, img, path in zip(
        sources["source_image_id"].to_pylist(), sources["image"].to_pylist(), sources["path"].to_pylist())}


def run_generate(ctx: "StageContext | ExperimentConfig", on_part: Optional[Callable[[int, int], None]] = None) -> dict:
    """Generate every spectrum key the store lacks; write the experiment's manifest and view; returns (and
    writes) the run summary. ``ctx``: the stage's context (a bare config opens one: its tracking settings
    are checked there, before any work)."""
    ctx = StageContext.of(ctx, "generate")
    cfg, paths = ctx.cfg, ctx.paths
    gen = cfg.generation
    stage = ctx.out()
    out_dir = ctx.out("spectrum")
    store = store_root(cfg, paths)
    lams = spectrum_lams(gen)
    hard, rows, prompts = read_inputs(cfg, paths)
    sources = plan_sources(hard, rows, prompts)
    del rows
    settings = settings_digest(gen, paths.cache)
    digests = source_digests(sources, cfg.dataset.root)
    wanted = planned_keys(sources, lams, list(gen.seeds), settings, digests)
    with StageLease(stage, "generate"):
        with writer_lock(store, f"generate {cfg.experiment}"):
            have = wanted.join(store_index(store), "key", join_type="inner")
            done = set(have["image_id"].to_pylist())
            todo, reused = pending_sources(sources, lams, list(gen.seeds), done)
            planned = wanted.num_rows
            log.info("generate: %d sources × %d λ × %d seeds = %d keys; %d already in the store %s",
                     sources.num_rows, len(lams), len(gen.seeds), planned, reused, store)
            t0 = time.perf_counter()
            generated = failed = nbytes = 0
            actors: list[list[str]] = []
            if todo.num_rows:
                ctx.init_ray()
                store_args = dict(store_dir=str(store), settings=settings, source_digests=digests)
                for receipt in build_dataset(cfg, todo, done, store_args=store_args, ctx=ctx).iter_rows():
                    generated += receipt["generated"]
                    failed += receipt["failed"]
                    nbytes += receipt["bytes"]
                    actors.append(receipt["actors"])
                    if on_part:
                        on_part(generated, failed)
            wall = time.perf_counter() - t0
            manifest = wanted.join(store_index(store), "key", join_type="inner") if generated else have
            manifest = _one_part_per_key(manifest)
            meta = write_manifest(stage, store, manifest, settings)  # under the lock: `discl gc` sees it
        build_view(store, manifest, out_dir)
        summary = {"planned": planned, "generated": generated, "reused": reused, "skipped": reused,
                   "failed": failed, "wall_s": round(wall, 3),
                   "outputs_per_s": round(generated / wall, 3) if wall and generated else 0.0,
                   "bytes_written": nbytes, "bytes_per_output": round(nbytes / generated, 1) if generated else 0.0,
                   "steps_expected": sum(steps_for(gen.steps, lam) for lam in lams) * len(gen.seeds) * sources.num_rows,
                   "model": gen.model, "lams": lams, "seeds": list(gen.seeds), "format": gen.image_format,
                   "actors": merge_actors(actors),
                   "store": meta["store"], "store_digest": meta["store_digest"], "settings_digest": settings,
                   "manifest": str(stage.join(MANIFEST)),
                   "spectrum_dir": str(out_dir), "errors_dir": str(ctx.out("errors"))}
        log.info("generate: generated %d, reused %d from the store, failed %d", generated, reused, failed)
        grid_path = write_grid(cfg, sources, lams, paths)
        summary["grid"] = str(grid_path) if grid_path else None
        stage.join("summary.json").write_text(json.dumps(summary, indent=1))
    if cfg.tracking.enabled:
        log_to_mlflow(ctx, summary, grid_path)
    return summary


def _one_part_per_key(manifest: pa.Table) -> pa.Table:
    """A key written twice (never under the writer lock; defensive) is read from one part only."""
    if manifest.num_rows == pc.count_distinct(manifest["key"]).as_py():
        return manifest
    manifest = manifest.sort_by([("key", "ascending"), ("part", "ascending")])
    keys = manifest["key"].to_pylist()
    first = [i == 0 or keys[i] != keys[i - 1] for i in range(len(keys))]
    return manifest.filter(pa.array(first, pa.bool_()))


def write_grid(cfg: "ExperimentConfig", sources: pa.Table, lams: list[float], paths: "RunPaths"):
    """Render ``generate/spectrum_grid.png`` for the first ``grid_sources`` loadable sources."""
    import io

    from PIL import Image

    gen = cfg.generation
    real = {}
    for row in sources.to_pylist():
        if len(real) >= gen.grid_sources or row["error"]:
            continue
        try:
            data = load_source(row["image"], row["path"], cfg.dataset.root, gen.width, gen.height)
        except ImageLoadError:
            continue
        real[row["source_image_id"]] = Image.open(io.BytesIO(data)).convert("RGB")
    grid = spectrum_grid(paths.store("generate", "spectrum"), real, lams, list(gen.seeds),
                         gen.grid_sources, gen.grid_seeds)
    if grid is None:
        return None
    path = paths.store("generate", "spectrum_grid.png")
    buf = io.BytesIO()
    grid.save(buf, format="PNG")
    path.write_bytes(buf.getvalue())
    return path


def log_to_mlflow(ctx: StageContext, summary: dict, grid_path) -> None:
    import io

    import mlflow
    from PIL import Image

    from discl_ray.generation.store import log_store_input
    from discl_ray.runtime import tracking

    with tracking.run(ctx.cfg, "generate", uri=ctx.tracking_uri, paths=ctx.paths):
        log_store_input(ctx.cfg, "generate", ctx.paths)
        mlflow.log_metrics({k: float(summary[k]) for k in ("planned", "generated", "reused", "skipped", "failed",
                                                           "wall_s", "outputs_per_s")})
        mlflow.log_params({"spectrum_store": summary["store"], "spectrum_store_digest": summary["store_digest"]})
        mlflow.log_dict(summary, "generate_summary.json")
        if grid_path:
            mlflow.log_image(Image.open(io.BytesIO(grid_path.read_bytes())), "spectrum_grid.png")
