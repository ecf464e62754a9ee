"""Tiny random-weight stand-ins of a config's model families, for ``discl rehearse`` (no download).

* the generator: a miniature of the configured diffusers img2img family (SDXL refiner: ``text_encoder_2``
  only, aesthetic-score conditioning; other names: an SD-style pipeline), saved with ``save_pretrained``;
* each open_clip model (the filter, and the CLIP a run fine-tunes): the same architecture family and patch
  size as the configured one (``ViT-B-32`` → a 1-layer, 16-wide ViT with 32-pixel patches and an 8-wide
  text tower over CLIP's own 49,408-token vocabulary), registered as ``<name>-rehearsal`` from its JSON with
  seeded random weights;
* the ResNet-10 classifier: the same network (BasicBlock × [1, 1, 1, 1]) at an 8-channel first stage
  (``training.resnet_width``).

Each is a few MB at most (the generator ~2 MB of weights plus CLIP's tokenizer files, a CLIP under 2 MB, a
ResNet-10 0.3 MB), so a training checkpoint with its optimizer state is a few MB, not the tens of MB the
32-wide stand-ins and the full-width ResNet-10 wrote to the run's storage.

They are written to the rehearsal's own folder on the run's storage (``<run_root>/<exp>/rehearsal/models/``),
so every node loads them the way it loads real weights from object storage: one node-local copy each.
The stand-ins are the same bytes every time (fixed seeds), so a rerun reuses what it generated.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from discl_ray.runtime.storage import Storage

SUFFIX = "-rehearsal"
# ResNet-10 at an 8-channel first stage (8, 16, 32, 64): ~78k parameters, a ~1 MB checkpoint (the real one: 64)
RESNET_WIDTH = 8


def is_sdxl_name(model: str) -> bool:
    return "xl" in model.lower()


def clip_standin_config(model: str) -> dict:
    """An open_clip architecture of ``model``'s family at toy size (its patch size and tokenizer kept)."""
    import open_clip

    real = open_clip.get_model_config(model) or {}
    patch = int((real.get("vision_cfg") or {}).get("patch_size") or 16)
    # The text tower's 49,408-token embedding is most of the bytes (vocab × width × 4): width 8 keeps the model
    # under 2 MB and a training checkpoint (model + Adam's two moments) near 5 MB.
    return {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 2 * patch, "layers": 1, "width": 16, "head_width": 8, "patch_size": patch},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 8, "heads": 2, "layers": 1},
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

    if is_sdxl_name(model):   # channels 8/16 and an 8-wide text encoder: ~2 MB of weights (tokenizer files aside)
        return build_tiny_sdxl(out_dir, seed=seed, width=8, text_width=8)
    return build_tiny_sd(out_dir, seed=seed)


def upload_dir(local: Path, dest: "Storage") -> None:
    """Copy a local folder to ``dest`` (any storage), file by file."""
    for path in sorted(p for p in Path(local).rglob("*") if p.is_file()):
        dest.join(*path.relative_to(local).parts).write_bytes(path.read_bytes())


def build_standins(cfg, dest: "Storage", built: Optional[dict[str, dict[str, str]]] = None) -> dict[str, str]:
    """Write stand-ins for ``cfg``'s generator, filter CLIP and (CLIP backbone) trainer CLIP under ``dest``;
    returns the config overrides that point the stages at them. ``built`` (model → its overrides), shared by
    the configs of one rehearsal, keeps a model that an upstream config already wrote from being built and
    uploaded again."""
    built = {} if built is None else built
    overrides: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="discl-standins-") as tmp:
        root = Path(tmp)
        key = f"generator:{cfg.generation.model}"
        if key not in built:
            gen_dir = build_generator(cfg.generation.model, root / "generator")
            upload_dir(gen_dir, dest.join("generator"))
            built[key] = {"generation.model": str(dest.join("generator"))}
        overrides.update(built[key])

        def clip(model: str) -> dict[str, str]:
            if f"clip:{model}" not in built:
                name, js, pt = build_clip(model, root / "clip" / model)
                upload_dir(root / "clip" / model, dest.join("clip"))
                built[f"clip:{model}"] = {"model": name, "model_config_path": str(dest.join("clip", js.name)),
                                          "pretrained": str(dest.join("clip", pt.name))}
            return built[f"clip:{model}"]

        overrides.update({f"scoring.{k}": v for k, v in clip(cfg.scoring.model).items()})
        if cfg.training.backbone == "clip" and cfg.training.clip.model:
            overrides.update({f"training.clip.{k}": v for k, v in clip(cfg.training.clip.model).items()})
    if cfg.training.backbone == "resnet10":
        overrides["training.resnet_width"] = str(RESNET_WIDTH)
    return overrides
