"""Tiny random-weight stand-ins of a config's model families, for ``discl rehearse`` (no download).

* the generator: a miniature of the configured diffusers img2img family (SDXL refiner: ``text_encoder_2``
  only, aesthetic-score conditioning; other names: an SD-style pipeline), saved with ``save_pretrained``;
* each open_clip model (the filter, and the CLIP a run fine-tunes): the same architecture family and patch
  size as the configured one (``ViT-B-32`` → a 1-layer, 32-wide ViT with 32-pixel patches), registered as
  ``<name>-rehearsal`` from its JSON with seeded random weights.

They are written to the rehearsal's own folder on the run's storage (``<run_root>/<exp>/rehearsal/models/``),
so every node loads them the way it loads real weights from object storage: one node-local copy each.
The stand-ins are the same bytes every time (fixed seeds), so a rerun reuses what it generated.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from discl_ray.runtime.storage import Storage

SUFFIX = "-rehearsal"


def is_sdxl_name(model: str) -> bool:
    return "xl" in model.lower()


def clip_standin_config(model: str) -> dict:
    """An open_clip architecture of ``model``'s family at toy size (its patch size and tokenizer kept)."""
    import open_clip

    real = open_clip.get_model_config(model) or {}
    patch = int((real.get("vision_cfg") or {}).get("patch_size") or 16)
    return {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 2 * patch, "layers": 1, "width": 32, "head_width": 16, "patch_size": patch},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }


def build_clip(model: str, out_dir: Path, seed: int = 0) -> tuple[str, Path, Path]:
    """``(name, json, weights)`` of the stand-in for open_clip ``model``."""
    import logging

    import open_clip
    import torch

    name = f"{model}{SUFFIX}"
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, weights = out_dir / f"{name}.json", out_dir / f"{name}.pt"
    json_path.write_text(json.dumps(clip_standin_config(model)))
    open_clip.add_model_config(json_path)
    torch.manual_seed(seed)
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)            # "no pretrained weights": random on purpose
    try:
        net = open_clip.create_model(name, pretrained=None)
    finally:
        logging.disable(previous)
    torch.save(net.state_dict(), weights)
    return name, json_path, weights


def build_generator(model: str, out_dir: Path, seed: int = 0) -> Path:
    from discl_ray.generation.tiny import build_tiny_sd, build_tiny_sdxl

    return build_tiny_sdxl(out_dir, seed=seed) if is_sdxl_name(model) else build_tiny_sd(out_dir, seed=seed)


def upload_dir(local: Path, dest: "Storage") -> None:
    """Copy a local folder to ``dest`` (any storage), file by file."""
    for path in sorted(p for p in Path(local).rglob("*") if p.is_file()):
        dest.join(*path.relative_to(local).parts).write_bytes(path.read_bytes())


def build_standins(cfg, dest: "Storage") -> dict[str, str]:
    """Write stand-ins for ``cfg``'s generator, filter CLIP and (CLIP backbone) trainer CLIP under ``dest``;
    returns the config overrides that point the stages at them."""
    overrides: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="discl-standins-") as tmp:
        root = Path(tmp)
        gen_dir = build_generator(cfg.generation.model, root / "generator")
        upload_dir(gen_dir, dest.join("generator"))
        overrides["generation.model"] = str(dest.join("generator"))
        name, js, pt = build_clip(cfg.scoring.model, root / "clip")
        overrides.update({"scoring.model": name, "scoring.model_config_path": str(dest.join("clip", js.name)),
                          "scoring.pretrained": str(dest.join("clip", pt.name))})
        clip = cfg.training.clip
        if cfg.training.backbone == "clip" and clip.model and clip.model != cfg.scoring.model:
            name2, js2, pt2 = build_clip(clip.model, root / "clip")
            overrides.update({"training.clip.model": name2,
                              "training.clip.model_config_path": str(dest.join("clip", js2.name)),
                              "training.clip.pretrained": str(dest.join("clip", pt2.name))})
        elif cfg.training.backbone == "clip" and clip.model:
            overrides.update({"training.clip.model": name,
                              "training.clip.model_config_path": overrides["scoring.model_config_path"],
                              "training.clip.pretrained": overrides["scoring.pretrained"]})
        upload_dir(root / "clip", dest.join("clip"))
    return overrides
