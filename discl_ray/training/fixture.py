"""A small self-contained experiment on disk for trainer tests and ``discl bench train``.

Writes, under ``run_root/<experiment>/``, exactly what the upstream stages produce (docs/architecture.md):
canonical rows (``dataset/`` plus the materialize marker, so ``read_rows`` reuses them), the hard-sample
table (``mine/``), the spectrum (``generate/spectrum/``) and its scores (``score/scores/``). Images are
class prototypes plus noise, so a small CNN learns them in a few epochs; synthetic rows at λ interpolate
between a class prototype (λ = 0, "text only") and their source image (λ → 1), like img2img.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa

from discl_ray.runtime.io import png_bytes, replace_parquet_dir


def _img(rng: np.random.Generator, proto: np.ndarray, noise: float) -> np.ndarray:
    return np.clip(proto + rng.normal(0, noise, proto.shape), 0, 255).astype(np.uint8)


def write_fixture(cfg, *, train_counts: Sequence[int] = (40, 30, 20, 6, 4), val_per_class: int = 4,
                  test_per_class: int = 8, seeds: Sequence[int] = (0, 1), size: int = 16, noise: float = 40.0,
                  low_quality: bool = False, corrupt: int = 0, seed: int = 0) -> Path:
    """Write the tables for ``cfg`` (its experiment, run_root, dataset, generation.lams); returns the exp dir.

    Hard rows: the tail classes (counts < ``cfg.mining.few_max``) or, with ``low_quality``, the noisiest
    third of every class. ``corrupt`` training rows get undecodable image bytes (error-row handling)."""
    from discl_ray.generation.engine import noise_seed
    from discl_ray.runtime.cluster import RunPaths

    rng = np.random.default_rng(seed)
    n_cls = len(train_counts)
    protos = rng.uniform(0, 255, (n_cls, size, size, 3))
    rows: dict[str, list] = {k: [] for k in ("image_id", "image", "path", "label", "class_name", "split", "domain")}
    hard: dict[str, list] = {k: [] for k in ("image_id", "label", "class_name", "group", "reason", "score")}
    images: dict[str, np.ndarray] = {}
    splits = [("train", list(train_counts)), ("val", [val_per_class] * n_cls), ("test", [test_per_class] * n_cls)]
    if low_quality:
        splits.append(("test_ood", [test_per_class] * n_cls))
    for split, counts in splits:
        for c, n in enumerate(counts):
            for i in range(n):
                extra = 2.0 if split == "test_ood" else (1.6 if low_quality and i % 3 == 0 else 1.0)
                arr = _img(rng, protos[c], noise * extra)
                iid = f"{split}-{c}-{i:04d}"
                data = png_bytes(arr)
                if split == "train" and corrupt and i == 0 and c < corrupt:
                    data = b"not a png"
                rows["image_id"].append(iid)
                rows["image"].append(data)
                rows["path"].append(None)
                rows["label"].append(c)
                rows["class_name"].append(f"class{c}")
                rows["split"].append(split)
                rows["domain"].append("ood" if split == "test_ood" else "")
                images[iid] = arr
                is_hard = (split == "train" and (i % 3 == 0 if low_quality else n < cfg.mining.few_max))
                if is_hard:
                    hard["image_id"].append(iid)
                    hard["label"].append(c)
                    hard["class_name"].append(f"class{c}")
                    hard["group"].append("few")
                    hard["reason"].append("confidence" if low_quality else "frequency")
                    hard["score"].append(float("nan"))
    paths = RunPaths.from_config(cfg)
    from discl_ray.data import CANONICAL_SCHEMA

    replace_parquet_dir(pa.table(rows).cast(CANONICAL_SCHEMA), paths.dataset, prefix="rows")
    (paths.dataset / "_dataset_config.json").write_text(
        json.dumps(cfg.dataset.model_dump(mode="json"), indent=1, sort_keys=True))
    replace_parquet_dir(pa.table(hard, schema=pa.schema([("image_id", pa.string()), ("label", pa.int64()),
                                                        ("class_name", pa.string()), ("group", pa.string()),
                                                        ("reason", pa.string()), ("score", pa.float64())])),
                        paths.stage("mine"))
    spec: dict[str, list] = {k: [] for k in ("image_id", "source_image_id", "label", "class_name", "lam", "seed",
                                             "prompt", "image", "width", "height", "generator", "steps",
                                             "guidance_scale", "format", "noise_seed")}
    scores: dict[str, list] = {k: [] for k in ("image_id", "source_image_id", "label", "lam", "seed",
                                               "clip_text_cos", "clip_image_cos", "clip_score", "clip_model")}
    for src, c in zip(hard["image_id"], hard["label"]):
        for lam in cfg.generation.lams:
            for s in seeds:
                r = np.random.default_rng([seed, int(lam * 1000), s, len(spec["image_id"])])
                arr = _img(r, lam * images[src] + (1 - lam) * protos[c], noise * 0.7)
                iid = f"{src}|l{lam:.3f}|s{s}"
                text_cos = float(r.uniform(0.1, 0.9))
                spec_row = dict(image_id=iid, source_image_id=src, label=c, class_name=f"class{c}", lam=float(lam),
                                seed=s, prompt=f"a photo of class{c}", image=png_bytes(arr), width=size,
                                height=size, generator="fixture", steps=10, guidance_scale=10.0, format="png",
                                noise_seed=noise_seed(src, float(lam), s, cfg.generation.shared_noise))
                for k, v in spec_row.items():
                    spec[k].append(v)
                for k, v in dict(image_id=iid, source_image_id=src, label=c, lam=float(lam), seed=s,
                                 clip_text_cos=text_cos, clip_image_cos=float(lam), clip_score=2.5 * text_cos,
                                 clip_model="fixture").items():
                    scores[k].append(v)
    from discl_ray.generation.plan import SPECTRUM_SCHEMA

    replace_parquet_dir(pa.table(spec).select(SPECTRUM_SCHEMA.names).cast(SPECTRUM_SCHEMA),
                        paths.stage("generate", "spectrum"))
    replace_parquet_dir(pa.table(scores), paths.stage("score", "scores"))
    return paths.exp
