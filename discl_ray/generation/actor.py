"""The generator stage of the Ray Data pipeline: a callable class that loads the pipeline once.

``SpectrumGenerator`` follows the usual Ray Data GPU-stage shape: ``__init__`` loads the model (once per
actor), ``__call__(batch)`` turns work rows into spectrum rows. The same class runs in-process (tests,
benchmark mode b) and in an ``ActorPoolStrategy`` pool, so both paths produce identical rows.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Optional

import pyarrow as pa

from discl_ray.generation.engine import SpectrumEngine, WorkItem
from discl_ray.generation.plan import SPECTRUM_SCHEMA
from discl_ray.io import png_bytes

log = logging.getLogger(__name__)

OUTPUT_SCHEMA = SPECTRUM_SCHEMA.append(pa.field("error", pa.string()))


class SpectrumGenerator:
    """Work rows (``plan.WORK_SCHEMA``) → spectrum rows plus an ``error`` column ("" = generated)."""

    def __init__(self, generation: dict, cache_dir: Optional[str] = None, threads: Optional[int] = None):
        import torch

        from discl_ray.config import GenerationConfig

        if threads:
            torch.set_num_threads(threads)
        self.gen = GenerationConfig.model_validate(generation)
        self.engine = SpectrumEngine.from_config(self.gen, Path(cache_dir) if cache_dir else None)

    @property
    def steps_run(self) -> int:
        return self.engine.steps_run

    def __call__(self, batch: pa.Table) -> pa.Table:
        from PIL import Image

        rows = batch.to_pylist()
        todo = [i for i, r in enumerate(rows) if not r["error"]]
        errors = {i: rows[i]["error"] for i in range(len(rows)) if rows[i]["error"]}
        decoded: dict[str, Image.Image] = {}
        items = []
        for i in todo:
            r = rows[i]
            img = decoded.get(r["source_image_id"])
            if img is None:
                img = Image.open(io.BytesIO(r["source"])).convert("RGB")
                decoded[r["source_image_id"]] = img
            items.append(WorkItem(r["key"], r["source_image_id"], r["lam"], r["seed"], r["prompt"], img))
        images = self._generate(items, errors, todo)
        self.engine.clear_latents()
        out: dict[str, list] = {k: [] for k in OUTPUT_SCHEMA.names}
        for i, r in enumerate(rows):
            img = images.get(i)
            out["image_id"].append(r["key"])
            out["source_image_id"].append(r["source_image_id"])
            out["label"].append(r["label"])
            out["class_name"].append(r["class_name"])
            out["lam"].append(r["lam"])
            out["seed"].append(r["seed"])
            out["prompt"].append(r["prompt"])
            out["image"].append(png_bytes(img) if img is not None else None)
            out["width"].append(img.width if img is not None else None)
            out["height"].append(img.height if img is not None else None)
            out["generator"].append(self.gen.model)
            out["steps"].append(self.gen.steps)
            out["guidance_scale"].append(self.gen.guidance_scale)
            out["error"].append("" if img is not None else errors.get(i, "not generated"))
        return pa.table(out, schema=OUTPUT_SCHEMA)

    def _generate(self, items: list[WorkItem], errors: dict[int, str], todo: list[int]) -> dict:
        """Batched generation; a failing batch is retried item by item so one bad input fails alone."""
        try:
            return dict(zip(todo, self.engine.generate(items)))
        except Exception as err:  # noqa: BLE001 — isolate the failing item, keep the job going
            log.warning("batch of %d failed (%s); retrying one by one", len(items), err)
        done = {}
        for i, it in zip(todo, items):
            try:
                done[i] = self.engine.generate([it])[0]
            except Exception as err:  # noqa: BLE001
                errors[i] = f"generation failed: {type(err).__name__}: {err}"[:500]
        return done
