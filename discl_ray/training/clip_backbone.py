"""The CLIP a run fine-tunes and the captions it learns from, kept apart from the filter model.

The paper filters the spectrum with ViT-B/32 (Table 8) but fine-tunes ViT-B/16 and ViT-L/14 on iWildCam
(Tables 4-5), so ``training.clip`` names the trainer's own architecture and weights; unset, it falls back to
``scoring`` (the toy world trains the one CLIP it has). FLYP captions and the zero-shot head read
"a photo of {common name} in the wild" through ``prompts.name_map``, exactly as generation and filtering do.
"""

from __future__ import annotations

from collections.abc import Sequence


def trainer_clip_config(cfg):
    """A ``ScoringConfig`` describing the CLIP to fine-tune (float32 master weights), for ``load_clip``."""
    c = cfg.training.clip
    update = {"dtype": "float32"}
    if c.model is not None:
        update.update(model=c.model, pretrained=c.pretrained, model_config_path=c.model_config_path)
    return cfg.scoring.model_copy(update=update)


def caption_prompts(cfg, class_names: Sequence[str]) -> list[str]:
    """One caption per class: ``prompts.clip_template`` with the display (common) name of each class."""
    from discl_ray.prompts.templates import display_names

    return [cfg.prompts.clip_template.format(name=n) for n in display_names(class_names, cfg.prompts)]


def flyp_captions(cfg, class_names: Sequence[str]) -> list[str] | None:
    """FLYP's own captions (``training.flyp_templates``, K per class, template-major; ``training/flyp.py``) with
    the display names, or None when the run trains on one caption per class."""
    from discl_ray.prompts.templates import display_names
    from discl_ray.training.flyp import caption_texts

    templates = cfg.training.flyp_templates
    return caption_texts(templates, display_names(class_names, cfg.prompts)) if templates else None
