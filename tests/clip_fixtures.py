"""Tiny open_clip models built in the test, no downloads: plain functions other tests import.

    json_path, weights_path = make_tiny_clip(tmp_path)
    cfg.scoring = ScoringConfig(model=TINY_CLIP, model_config_path=str(json_path), pretrained=str(weights_path))

The architecture keeps open_clip's 49,408-token vocabulary so its bundled BPE tokenizer works offline;
everything else is as small as open_clip allows (about 1.6M parameters, nearly all token embeddings).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

TINY_CLIP = "tiny-clip"
TINY_CLIP_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def make_tiny_clip(tmp_dir: str | Path, name: str = TINY_CLIP, seed: int = 0) -> tuple[Path, Path]:
    """Write ``<name>.json`` (open_clip architecture) and ``<name>.pt`` (random weights, fixed seed)."""
    import open_clip
    import torch

    tmp_dir = Path(tmp_dir)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    json_path, weights_path = tmp_dir / f"{name}.json", tmp_dir / f"{name}.pt"
    json_path.write_text(json.dumps(TINY_CLIP_CONFIG))
    if not weights_path.is_file():
        open_clip.add_model_config(json_path)
        torch.manual_seed(seed)
        import logging

        previous = logging.root.manager.disable
        logging.disable(logging.WARNING)       # open_clip's "random init" warning: a fixture, not the CLI under test
        try:
            model = open_clip.create_model(name, pretrained=None)
        finally:
            logging.disable(previous)
        torch.save(model.state_dict(), weights_path)
    return json_path, weights_path


def make_toy_clip_cache(cache_dir: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """Place a tiny CLIP where ``discl_ray.toyworld.clip_files(cache_dir)`` expects the toy-world CLIP."""
    from discl_ray.toyworld import TOY_CLIP, clip_files

    json_path, _ = clip_files(Path(cache_dir))
    return make_tiny_clip(json_path.parent, name=TOY_CLIP, seed=seed)


def digit_image(label: int, variant: int = 0, size: int = 16) -> np.ndarray:
    """A deterministic RGB uint8 image that differs by label and variant (stand-in for a digit)."""
    rng = np.random.default_rng(1000 * label + variant)
    img = rng.integers(0, 255, size=(size, size, 3), dtype=np.uint8)
    img[label % size, :, :] = 255
    return img
