"""Losses (cross-entropy, Balanced Softmax, FLYP) and WiSE-FT weight interpolation.

- Balanced Softmax (Ren et al., 2020): softmax over ``logits + log π_y`` where π is the class prior of the
  *training* labels; at test time the plain logits are used, which undoes the long-tail prior.
- FLYP (Goyal et al., 2023): fine-tune CLIP like it was pre-trained — symmetric InfoNCE between the
  batch's image embeddings and the embeddings of each image's class-prompt caption.
- WiSE-FT (Wortsman et al., 2022): θ_α = (1 − α)·θ_zero-shot + α·θ_fine-tuned.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from discl_ray.errors import UserError

LOSSES = ("ce", "balanced_softmax", "flyp")


def log_class_prior(counts: Sequence[int] | torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """log π_c from per-class training counts (classes with no rows get log(eps), never −inf)."""
    c = torch.as_tensor(counts, dtype=torch.float64).clamp_min(0)
    if c.sum() <= 0:
        raise ValueError("class counts sum to zero: no training rows")
    return torch.log((c / c.sum()).clamp_min(eps)).float()


def balanced_softmax_loss(logits: torch.Tensor, labels: torch.Tensor, log_prior: torch.Tensor,
                          reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of ``logits + log_prior`` (Balanced Softmax)."""
    if log_prior.shape != (logits.shape[-1],):
        raise ValueError(f"log_prior has shape {tuple(log_prior.shape)}, expected ({logits.shape[-1]},)")
    return F.cross_entropy(logits + log_prior.to(logits), labels, reduction=reduction)


def flyp_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor | float,
              ) -> torch.Tensor:
    """Symmetric InfoNCE: row i of the image batch is paired with caption i (both L2-normalised here)."""
    if image_features.shape != text_features.shape:
        raise ValueError(f"image features {tuple(image_features.shape)} and text features "
                         f"{tuple(text_features.shape)} must pair one caption per image")
    img = F.normalize(image_features, dim=-1)
    txt = F.normalize(text_features, dim=-1)
    logits = torch.as_tensor(logit_scale).to(img) * img @ txt.t()
    target = torch.arange(img.shape[0], device=img.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


def classification_loss(name: str, logits: torch.Tensor, labels: torch.Tensor,
                        log_prior: torch.Tensor | None = None) -> torch.Tensor:
    """CE or Balanced Softmax on class logits (FLYP is computed from embeddings by the model)."""
    if name == "ce":
        return F.cross_entropy(logits, labels)
    if name == "balanced_softmax":
        if log_prior is None:
            raise UserError("loss=balanced_softmax needs the log class prior of the training set")
        return balanced_softmax_loss(logits, labels, log_prior)
    raise UserError(f"unknown classification loss {name!r}; valid: ce, balanced_softmax")


def wise_interpolate(zero_shot: Mapping[str, torch.Tensor], fine_tuned: Mapping[str, torch.Tensor],
                     alpha: float) -> dict[str, torch.Tensor]:
    """WiSE-FT weights: (1 − α)·zero-shot + α·fine-tuned; integer buffers come from the fine-tuned side."""
    if not 0.0 <= alpha <= 1.0:
        raise UserError(f"WiSE-FT alpha must lie in [0, 1]; got {alpha}")
    if set(zero_shot) != set(fine_tuned):
        diff = sorted(set(zero_shot) ^ set(fine_tuned))[:5]
        raise ValueError(f"WiSE-FT: state dicts differ in keys, e.g. {diff}")
    out = {}
    for key, ft in fine_tuned.items():
        zs = zero_shot[key]
        if ft.is_floating_point():
            out[key] = ((1.0 - alpha) * zs.to(ft) + alpha * ft).to(ft.dtype)
        else:
            out[key] = ft.clone()
    return out
