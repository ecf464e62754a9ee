"""The GPU stage of the Ray Data pipeline: a callable class that loads the pipeline once per actor.

``SpectrumGenerator`` follows the usual Ray Data GPU-stage shape: ``__init__`` resolves the device *where
it runs* (``auto`` → CUDA if this actor sees one, else CPU with a log line) and loads the model once;
``__call__(batch)`` takes prepared source rows (``plan.PREP_SCHEMA``), fans each source out into its
missing (λ, seed) keys itself — a source image crosses the object store once, not once per key — and
returns raw RGB pixels. Encoding (PNG/WebP/JPEG) happens in a separate CPU stage
(:mod:`discl_ray.generation.output`), so the GPU never waits for an encoder. The same class runs
in-process (tests, benchmark mode b) and in an ``ActorPoolStrategy`` pool, so both paths give identical rows.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa

from discl_ray.generation.engine import SpectrumEngine, WorkItem, noise_seed, output_key
from discl_ray.generation.plan import SPECTRUM_SCHEMA, pick_prompt

log = logging.getLogger(__name__)

# Raw rows: spectrum columns without the encoded image, plus uint8 HxWx3 pixels, an error reason ("" = made)
# and the JSON description of the actor that made them (node, assigned resources, device).
RAW_SCHEMA = pa.schema([f for f in SPECTRUM_SCHEMA if f.name not in ("image", "format")]
                       + [pa.field("pixels", pa.binary()), pa.field("error", pa.string()),
                          pa.field("actor", pa.string())])


class SpectrumGenerator:
    """Prepared source rows → raw spectrum rows (one per missing key of each source)."""

    def __init__(self, generation: dict, cache_dir: Optional[str] = None, threads: Optional[int] = None):
        import torch

        from discl_ray.config import GenerationConfig
        from discl_ray.runtime.cluster import actor_record, resolve_device

        if threads:
            torch.set_num_threads(threads)
        gen = GenerationConfig.model_validate(generation)
        self.device = resolve_device(gen.device, "generation")
        self.gen = gen.model_copy(update={"device": self.device})
        self.engine = SpectrumEngine.from_config(self.gen, Path(cache_dir) if cache_dir else None)
        self.actor = actor_record(self.device)
        if self.actor:
            log.info("generator actor ready: %s", self.actor)

    @property
    def steps_run(self) -> int:
        return self.engine.steps_run

    def __call__(self, batch: pa.Table) -> pa.Table:
        from PIL import Image

        keys: list[dict] = []          # one dict per output key, in (source, λ, seed) order
        items: list[WorkItem] = []
        item_rows: list[int] = []
        for src in batch.to_pylist():
            sid = src["source_image_id"]
            img = None
            if not src["error"]:
                img = Image.open(io.BytesIO(src["source"])).convert("RGB")
            for lam, seed in zip(src["lams"], src["seeds"]):
                prompt = pick_prompt(src["gen_prompts"], sid, seed) if src["gen_prompts"] else ""
                row = {"image_id": output_key(sid, lam, seed), "source_image_id": sid, "label": src["label"],
                       "class_name": src["class_name"], "lam": float(lam), "seed": int(seed), "prompt": prompt,
                       "error": src["error"] or ""}
                if img is not None:
                    item_rows.append(len(keys))
                    items.append(WorkItem(row["image_id"], sid, float(lam), int(seed), prompt, img))
                keys.append(row)
        images = self._generate(items, keys, item_rows)
        self.engine.clear_latents()
        out: dict[str, list] = {k: [] for k in RAW_SCHEMA.names}
        for i, r in enumerate(keys):
            img = images.get(i)
            for k in ("image_id", "source_image_id", "label", "class_name", "lam", "seed", "prompt"):
                out[k].append(r[k])
            out["pixels"].append(np.asarray(img, dtype=np.uint8).tobytes() if img is not None else None)
            out["width"].append(img.width if img is not None else None)
            out["height"].append(img.height if img is not None else None)
            out["generator"].append(self.gen.model)
            out["steps"].append(self.gen.steps)
            out["guidance_scale"].append(self.gen.guidance_scale)
            out["noise_seed"].append(noise_seed(r["source_image_id"], r["lam"], r["seed"], self.gen.shared_noise))
            out["error"].append("" if img is not None else (r["error"] or "not generated"))
            out["actor"].append(self.actor)
        return pa.table(out, schema=RAW_SCHEMA)

    def _generate(self, items: list[WorkItem], keys: list[dict], rows: list[int]) -> dict:
        """Batched generation; a failing batch is retried item by item so one bad input fails alone."""
        try:
            return dict(zip(rows, self.engine.generate(items)))
        except Exception as err:  # noqa: BLE001 — isolate the failing item, keep the job going
            log.warning("batch of %d failed (%s); retrying one by one", len(items), err)
        done = {}
        for i, it in zip(rows, items):
            try:
                done[i] = self.engine.generate([it])[0]
            except Exception as err:  # noqa: BLE001
                keys[i]["error"] = f"generation failed: {type(err).__name__}: {err}"[:500]
        return done
