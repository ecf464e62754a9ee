"""Builders for generation tests (plain functions so any test module can import them).

* ``tiny_sd_dir`` / ``tiny_sdxl_dir`` — random miniature img2img checkpoints saved with save_pretrained
  (the builders live in ``discl_ray.generation.tiny`` so the benchmark can use them too);
* ``write_experiment`` — a run root holding canonical rows, a hard-sample table and a prompts table, as
  the dataset/mine/prompts stages would write them, optionally with a corrupt and a missing source.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa

from discl_ray.generation.tiny import build_tiny_sd, build_tiny_sdxl
from discl_ray.runtime.io import png_bytes, write_parquet_part

__all__ = ["build_tiny_sd", "build_tiny_sdxl", "tiny_sd_dir", "tiny_sdxl_dir", "write_experiment",
           "source_images"]


def tiny_sd_dir(root: Path) -> Path:
    return build_tiny_sd(Path(root) / "tiny-sd")


def tiny_sdxl_dir(root: Path) -> Path:
    return build_tiny_sdxl(Path(root) / "tiny-sdxl")


def source_images(n: int, size: int = 32, seed: int = 0) -> list[np.ndarray]:
    """Blocky random RGB images (uint8), distinct per index."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        small = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
        out.append(np.kron(small, np.ones((8, 8, 1), dtype=np.uint8)))
    return out


def write_experiment(run_root: Path, model: str, n_sources: int = 3, corrupt: bool = False,
                     missing: bool = False, lams: Optional[list] = None, seeds: Optional[list] = None,
                     overrides: Optional[dict] = None):
    """Write dataset/mine/prompts tables under ``run_root`` and return the validated config.

    Sources are ``src0..`` (labels alternate 0/1); ``corrupt`` adds ``bad0`` whose bytes are not an image,
    ``missing`` adds a hard id ``gone0`` that is not in the dataset."""
    from discl_ray.config import load_config
    from discl_ray.runtime.cluster import RunPaths

    gen = dict(model=str(model), lams=lams or [0.0, 0.5, 0.9], seeds=seeds or [0, 1], steps=10,
               guidance_scale=3.0, device="cpu", dtype="float32", batch_size=4, rows_per_block=8,
               num_gpus_per_actor=0, num_cpus_per_actor=1, grid_sources=2, grid_seeds=2)
    gen.update(overrides or {})
    cfg = load_config(data={"experiment": "gt", "run_root": str(run_root), "generation": gen,
                            "training": {"strategy": "none"}, "tracking": {"enabled": False},
                            "ray": {"num_cpus": 2}})
    paths = RunPaths.from_config(cfg)
    ids, images, labels = [], [], []
    for i, img in enumerate(source_images(n_sources)):
        ids.append(f"src{i}")
        images.append(png_bytes(img))
        labels.append(i % 2)
    if corrupt:
        ids.append("bad0")
        images.append(b"not a png at all")
        labels.append(1)
    names = {0: "zero", 1: "one"}
    n = len(ids)
    rows = pa.table({"image_id": ids, "image": images, "path": [None] * n, "label": labels,
                     "class_name": [names[x] for x in labels], "split": ["train"] * n, "domain": [""] * n})
    from discl_ray.data import CANONICAL_SCHEMA

    write_parquet_part(rows.cast(CANONICAL_SCHEMA), paths.dataset, prefix="rows")
    (paths.dataset / "_dataset_config.json").write_text(json.dumps(cfg.dataset.model_dump(mode="json"),
                                                                   indent=1, sort_keys=True))
    hard_ids = ids + (["gone0"] if missing else [])
    hard_labels = labels + ([0] if missing else [])
    m = len(hard_ids)
    hard = pa.table({"image_id": hard_ids, "label": pa.array(hard_labels, pa.int64()),
                     "class_name": [names[x] for x in hard_labels], "group": ["few"] * m,
                     "reason": ["frequency"] * m, "score": [float("nan")] * m})
    write_parquet_part(hard, paths.stage("mine"))
    prompts = pa.table({"label": pa.array([0, 1], pa.int64()), "class_name": ["zero", "one"],
                        "display_name": ["zero", "one"],
                        "clip_prompt": ["a photo of the digit zero", "a photo of the digit one"],
                        "gen_prompts": [["a photo of the digit zero", "a drawing of the digit zero"],
                                        ["a photo of the digit one"]]})
    write_parquet_part(prompts, paths.stage("prompts"))
    return cfg
