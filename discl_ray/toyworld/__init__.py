"""The built-in toy world: a tiny text-conditioned img2img generator and a tiny open_clip model,
trained on the digits world split and cached under ``<cache_dir>/toyworld/``."""

from __future__ import annotations

from pathlib import Path

TOY_GENERATOR = "toy"          # generation.model value selecting the cached toy generator
TOY_CLIP = "toy-clip"          # scoring.model value selecting the cached toy CLIP
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def toy_dir(cache: Path) -> Path:
    return Path(cache) / "toyworld"


def generator_dir(cache: Path) -> Path:
    """diffusers folder loadable with the same img2img loader as real checkpoints."""
    return toy_dir(cache) / "generator"


def clip_files(cache: Path) -> tuple[Path, Path]:
    """(open_clip architecture JSON named ``toy-clip.json``, state-dict weights ``toy-clip.pt``)."""
    d = toy_dir(cache) / "clip"
    return d / f"{TOY_CLIP}.json", d / f"{TOY_CLIP}.pt"


def classifier_file(cache: Path) -> Path:
    """TorchScript digit classifier trained on the world split (quality gates, confidence mining).

    Input: float tensor (B, 3, H, W) in [0, 1] at the toy image size; output: logits (B, 10)."""
    return toy_dir(cache) / "classifier.pt"
