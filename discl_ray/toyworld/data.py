"""World (training) and held-out (evaluation) digits for the toy models, as float tensors.

The toy models train on the world split only; their quality gates are measured on the task half, which
they never see (the downstream stages use it, but measuring a gate on it trains nothing)."""

from __future__ import annotations

import numpy as np
import torch

from discl_ray.toyworld import DIGIT_NAMES

# Captions for CLIP and the generator: the DisCL prompt is ``a photo of {name}`` with display name
# ``the digit seven``, so that exact phrase is one of the templates.
TEMPLATES = ("a photo of the digit {}.", "a photo of the digit {}", "a picture of the number {}.",
             "a handwritten {}.", "the digit {}.", "a blurry photo of the digit {}.")


def caption(label: int, template: str = "a photo of the digit {}") -> str:
    return template.format(DIGIT_NAMES[int(label)])


def prompt(label: int) -> str:
    """The prompt the DisCL generation stage sends for a digit (``a photo of {name}``, name = the digit N)."""
    return f"a photo of the digit {DIGIT_NAMES[int(label)]}"


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, S, S, 3) → float (N, 3, S, S) in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)


def world(seed: int = 0, image_size: int = 32, world_fraction: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """The world split (training data of every toy model)."""
    from discl_ray.data.toy import world_arrays

    x, y = world_arrays(seed=seed, image_size=image_size, world_fraction=world_fraction)
    return to_tensor(x), torch.from_numpy(y).long()


def heldout(seed: int = 0, image_size: int = 32, world_fraction: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """The task half of the digits (never trained on here): where the gates are measured."""
    from discl_ray.data import toy

    x, y = toy.task_arrays(seed, image_size, world_fraction)
    return to_tensor(x), torch.from_numpy(y).long()
