"""The project's one way to load and use an open_clip model, offline.

Scoring (this package), mining's zero-shot confidence and the trainer's FLYP fine-tuning all call
:func:`load_clip`, so a config that names a model (a built-in architecture plus a pretrained tag, a custom
architecture JSON plus a local weights file, or the cached toy-world CLIP) means the same weights
everywhere. Nothing here downloads unless ``scoring.pretrained`` is an open_clip tag whose weights are
not cached yet (real clusters); tests and the toy world register their own tiny architecture.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from discl_ray.errors import MissingInput, UserError

if TYPE_CHECKING:
    from PIL import Image

    from discl_ray.config import ScoringConfig

log = logging.getLogger(__name__)

# open_clip precision names for the config's dtype (CPU always runs float32: half matmuls are slow there).
_PRECISION = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
# The schema's default tag; it names OpenAI weights that do not exist for the toy CLIP.
_DEFAULT_TAG = "openai"


def resolve_clip_source(scoring_cfg: "ScoringConfig", cache_dir: Path) -> tuple[str | None, str | None]:
    """``(model_config_path, pretrained)`` after the toy-world shortcut.

    ``model == "toy-clip"`` (``"toy-gap-clip"``: the gap world's) with no ``model_config_path`` uses the cached
    toy architecture JSON, and with ``pretrained`` unset (or left at the default ``openai`` tag) the cached
    toy state dict.
    """
    from discl_ray.toyworld import CLIPS, clip_files

    config_path, pretrained = scoring_cfg.model_config_path, scoring_cfg.pretrained
    if scoring_cfg.model in CLIPS:
        variant = CLIPS[scoring_cfg.model]
        toy_json, toy_weights = clip_files(Path(cache_dir), variant)
        if config_path is None:
            config_path = str(toy_json)
        if pretrained in (None, _DEFAULT_TAG):
            pretrained = str(toy_weights)
        for what, path in (("architecture", config_path), ("weights", pretrained)):
            if not Path(path).is_file():
                how = "discl world" if variant == "clean" else f"discl world --variant {variant}"
                raise MissingInput(f"toy CLIP {what} not found at {path}; train the toy world first "
                                        f"({how}) or set scoring.model_config_path / scoring.pretrained")
    from discl_ray.runtime.storage import is_uri, local_copy

    # Weights or an architecture file on object storage: one node-local copy, loaded like a local file.
    config_path = str(local_copy(config_path, cache_dir)) if is_uri(config_path) else config_path
    pretrained = str(local_copy(pretrained, cache_dir)) if is_uri(pretrained) else pretrained
    return config_path, pretrained


def clip_model_id(scoring_cfg: "ScoringConfig", cache_dir: Path | None = None) -> str:
    """A short, stable name of the scoring model for the ``clip_model`` column (``arch/weights``)."""
    pretrained = scoring_cfg.pretrained
    if cache_dir is not None:
        try:
            pretrained = resolve_clip_source(scoring_cfg, cache_dir)[1]
        except FileNotFoundError:
            pass
    if pretrained and (os.path.sep in pretrained or Path(pretrained).is_file()):
        pretrained = Path(pretrained).name  # a weights file: its name, not the machine's path
    return f"{scoring_cfg.model}/{pretrained or 'random-init'}"


def register_model_config(path: str | Path, model: str) -> None:
    """Register a custom architecture JSON (file or folder) and check it defines ``model``."""
    import open_clip

    path = Path(path)
    if not path.exists():
        raise MissingInput(f"scoring.model_config_path: {path} does not exist")
    open_clip.add_model_config(path)
    if model not in open_clip.list_models():
        registered = sorted(p.stem for p in ([path] if path.is_file() else path.glob("*.json")))
        raise UserError(f"scoring.model {model!r} is not defined by scoring.model_config_path {path} "
                         f"(the JSON file stem names the architecture; that path registers: {registered})")


def load_clip(scoring_cfg: "ScoringConfig", cache_dir: Path, device: str = "cpu") -> tuple[Any, Callable, Any]:
    """``(model, preprocess, tokenizer)``: an eval-mode open_clip model on ``device``.

    ``preprocess`` is open_clip's validation transform (PIL image → CHW float tensor); ``tokenizer`` maps a
    list of strings to token ids. On CUDA the weights use ``scoring.dtype``; on CPU always float32.
    """
    import open_clip

    config_path, pretrained = resolve_clip_source(scoring_cfg, cache_dir)
    if config_path:
        register_model_config(config_path, scoring_cfg.model)
    elif scoring_cfg.model not in open_clip.list_models():
        raise UserError(f"scoring.model {scoring_cfg.model!r} is not an open_clip architecture; set "
                         f"scoring.model_config_path to its JSON or choose one of: "
                         f"{', '.join(open_clip.list_models()[:20])}, …")
    precision = _PRECISION[scoring_cfg.dtype] if str(device).startswith("cuda") else "fp32"
    model, _, preprocess = open_clip.create_model_and_transforms(
        scoring_cfg.model, pretrained=pretrained or None, precision=precision, device=device)
    model.eval()
    tokenizer = open_clip.get_tokenizer(scoring_cfg.model)
    log.info("loaded CLIP %s on %s (%s)", clip_model_id(scoring_cfg, cache_dir), device, precision)
    return model, preprocess, tokenizer


def _device_dtype(model) -> tuple[torch.device, torch.dtype]:
    param = next(model.visual.parameters())
    return param.device, param.dtype


@torch.no_grad()
def encode_texts(model, tokenizer, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """L2-normalised text embeddings, ``(len(texts), D)`` float32 on the model's device."""
    device, _ = _device_dtype(model)
    out = []
    for start in range(0, len(texts), batch_size):
        tokens = tokenizer(list(texts[start:start + batch_size])).to(device)
        out.append(model.encode_text(tokens, normalize=True).float())
    if not out:
        raise ValueError("encode_texts: no texts given")
    return torch.cat(out)


@torch.no_grad()
def encode_images(model, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """L2-normalised image embeddings of preprocessed images ``(B, 3, H, W)``, float32 on the model's device."""
    device, dtype = _device_dtype(model)
    out = []
    for start in range(0, images.shape[0], batch_size):
        chunk = images[start:start + batch_size].to(device=device, dtype=dtype)
        out.append(model.encode_image(chunk, normalize=True).float())
    if not out:
        raise ValueError("encode_images: no images given")
    return torch.cat(out)


def preprocess_images(preprocess: Callable, images: Sequence["Image.Image"]) -> torch.Tensor:
    """Stack open_clip's transform of each PIL image into one ``(B, 3, H, W)`` batch."""
    return torch.stack([preprocess(img) for img in images])


@torch.no_grad()
def zero_shot_probs(model, tokenizer, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Class probabilities ``(B, len(prompts))``: softmax over prompts of logit_scale·cosine (CLIP zero-shot)."""
    image_emb = encode_images(model, images)
    text_emb = encode_texts(model, tokenizer, prompts)
    logits = model.logit_scale.exp().float() * image_emb @ text_emb.T
    return logits.softmax(dim=-1)
