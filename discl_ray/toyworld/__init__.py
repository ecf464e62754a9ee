"""The built-in toy world: a tiny text-conditioned img2img generator and a tiny open_clip model,
trained on the digits world split and cached under ``<cache_dir>/toyworld/``.

Two variants (docs/toyworld.md): ``clean`` (the default; the task's digits look like the world's) and
``gap`` (cached under ``<cache_dir>/toyworld-gap/``; the task's digits wear a camera look the generator's
prior never drew, see ``discl_ray.toyworld.gap``). Configs pick a variant's models by name:
``generation.model`` ``toy`` / ``toy-gap``, ``scoring.model`` ``toy-clip`` / ``toy-gap-clip``,
``mining.classifier`` ``toy`` / ``toy-gap``."""

from __future__ import annotations

from pathlib import Path

from discl_ray.data.toy import DIGIT_NAMES  # noqa: F401  (the world's class names, defined with its data)
from discl_ray.errors import UserError

TOY_GENERATOR = "toy"          # generation.model value selecting the cached toy generator
TOY_CLIP = "toy-clip"          # scoring.model value selecting the cached toy CLIP
TOY_GAP_GENERATOR = "toy-gap"  # … the gap world's generator
TOY_GAP_CLIP = "toy-gap-clip"  # … the gap world's CLIP
VARIANTS = ("clean", "gap")

# Model names → the world variant whose cached model they load.
GENERATORS = {TOY_GENERATOR: "clean", TOY_GAP_GENERATOR: "gap"}
CLIPS = {TOY_CLIP: "clean", TOY_GAP_CLIP: "gap"}
CLASSIFIERS = {"toy": "clean", "toy-gap": "gap"}      # mining.classifier values: the world's judge


def _check(variant: str) -> str:
    if variant not in VARIANTS:
        raise UserError(f"unknown toy world variant {variant!r}; choose from: {', '.join(VARIANTS)}")
    return variant


def toy_dir(cache: Path, variant: str = "clean") -> Path:
    return Path(cache) / ("toyworld" if _check(variant) == "clean" else f"toyworld-{variant}")


def generator_dir(cache: Path, variant: str = "clean") -> Path:
    """diffusers folder loadable with the same img2img loader as real checkpoints."""
    return toy_dir(cache, variant) / "generator"


def clip_name(variant: str = "clean") -> str:
    """The open_clip architecture name (= the JSON file's stem) of a variant's CLIP."""
    return TOY_CLIP if _check(variant) == "clean" else TOY_GAP_CLIP


def clip_files(cache: Path, variant: str = "clean") -> tuple[Path, Path]:
    """(open_clip architecture JSON named ``<name>.json``, state-dict weights ``<name>.pt``);
    name ``toy-clip`` (clean) or ``toy-gap-clip`` (gap)."""
    d = toy_dir(cache, variant) / "clip"
    name = clip_name(variant)
    return d / f"{name}.json", d / f"{name}.pt"


def classifier_file(cache: Path, variant: str = "clean") -> Path:
    """TorchScript digit classifier trained on the world split (quality gates, confidence mining).

    Input: float tensor (B, 3, H, W) in [0, 1] at the toy image size; output: logits (B, 10)."""
    return toy_dir(cache, variant) / "classifier.pt"


def variants_named(cfg) -> set[str]:
    """The toy world variants whose models an ``ExperimentConfig`` names (generation, scoring, mining,
    and the trainer's own CLIP)."""
    named = {GENERATORS.get(cfg.generation.model), CLIPS.get(cfg.scoring.model)}
    if cfg.training.clip.model is not None:
        named.add(CLIPS.get(cfg.training.clip.model))
    if cfg.mining.mode == "confidence":
        named.add(CLASSIFIERS.get(cfg.mining.classifier))
    return {v for v in named if v}
