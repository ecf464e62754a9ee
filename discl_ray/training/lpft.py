"""LP-FT (Kumar et al., 2022), a CLIP baseline of Table 5: linear probing, then full fine-tuning.

``training.head=linear`` replaces the text-tower head with a linear layer on normalised image features,
initialised from the zero-shot class embeddings (so epoch 0 starts at zero-shot accuracy, as in WiSE-FT's
linear classifier). For the first ``training.lp_epochs`` epochs only that layer learns, at ``training.lp_lr``;
afterwards every weight does. The text tower is dropped once the head is built: nothing else reads it, and
DDP refuses parameters that never receive a gradient.

Why gradients are dropped instead of ``requires_grad=False``: DDP fixes the set of trainable parameters when
it wraps the model, so the encoder must stay registered for the fine-tuning epochs. Setting its ``.grad`` to
None after the (already all-reduced) backward makes the optimizer skip it - no update, no weight decay.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from discl_ray.training.models import ClipClassifier, unwrap


class LinearHeadClip(nn.Module):
    """CLIP image tower + linear head; takes images normalised by the clip input pipeline (``transforms.py``)
    like every backbone here."""

    def __init__(self, visual: nn.Module, weight: torch.Tensor, bias: torch.Tensor, image_size: Optional[tuple]):
        super().__init__()
        self.visual = visual
        self.head = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            self.head.weight.copy_(weight)
            self.head.bias.copy_(bias)
        self.image_size = image_size

    @property
    def clip(self) -> nn.Module:
        """The open_clip module the input pipeline reads its preprocess from (``build_pipeline(cfg, net.clip)``,
        as for :class:`ClipClassifier`): the image tower, which carries the model's ``preprocess_cfg``."""
        return self.visual

    @classmethod
    def from_zero_shot(cls, clf: ClipClassifier) -> "LinearHeadClip":
        """Head = logit_scale · normalised class-prompt embeddings: the zero-shot classifier as a linear layer."""
        with torch.no_grad():
            txt = F.normalize(clf.clip.encode_text(clf.class_tokens), dim=-1)
            weight = clf.clip.logit_scale.exp() * txt
        return cls(clf.clip.visual, weight, torch.zeros(weight.shape[0]), clf.image_size)

    def forward(self, x: torch.Tensor, flyp_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        if flyp_labels is not None:
            raise ValueError("training.head=linear trains with cross-entropy; FLYP needs the text tower")
        if self.image_size and tuple(x.shape[-2:]) != tuple(self.image_size):
            x = F.interpolate(x, size=self.image_size, mode="bilinear", align_corners=False)
        return self.head(F.normalize(self.visual(x), dim=-1))


def in_linear_probe(tc, epoch: int) -> bool:
    return tc.head == "linear" and epoch < tc.lp_epochs


def epoch_lr(tc, epoch: int, lr: float) -> float:
    """The LR of ``epoch``: ``lp_lr`` (constant) during linear probing, else the schedule's value."""
    if in_linear_probe(tc, epoch) and tc.lp_lr is not None:
        return float(tc.lp_lr)
    return lr


def drop_encoder_grads(model: nn.Module, tc, epoch: int) -> None:
    """During linear probing, clear every gradient but the head's (call after backward, before step)."""
    if not in_linear_probe(tc, epoch):
        return
    for name, p in unwrap(model).named_parameters():
        if not name.startswith("head."):
            p.grad = None
