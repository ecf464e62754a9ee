"""Backbones: ResNet-10 (paper, long-tail), a small CNN (toy digits), and CLIP with a zero-shot text head.

All take float images as the input pipeline (``transforms.py``) normalises them, shape (B, 3, H, W), and
return class logits; the CLIP classifier also returns (image, caption) embeddings for the FLYP loss when
called with ``flyp_labels``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from discl_ray.errors import UserError

BACKBONES = ("resnet10", "small_cnn", "clip")


def resnet10(num_classes: int, width: int = 64) -> nn.Module:
    """torchvision ResNet with BasicBlock × [1, 1, 1, 1] (the ResNet-10 of the long-tail literature).

    ``width`` is the first stage's channels (stages: w, 2w, 4w, 8w); 64 is torchvision's network itself, a
    smaller one is the same network narrowed (the same state-dict keys), e.g. the rehearsal's stand-in."""
    from torchvision.models.resnet import BasicBlock, ResNet

    net = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=num_classes)
    if width == 64:
        return net
    net.inplanes = width
    net.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
    net.bn1 = nn.BatchNorm2d(width)
    net.layer1 = net._make_layer(BasicBlock, width, 1)
    net.layer2 = net._make_layer(BasicBlock, 2 * width, 1, stride=2)
    net.layer3 = net._make_layer(BasicBlock, 4 * width, 1, stride=2)
    net.layer4 = net._make_layer(BasicBlock, 8 * width, 1, stride=2)
    net.fc = nn.Linear(8 * width, num_classes)
    for m in net.modules():            # torchvision's initialisation
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)
    return net


class SmallCNN(nn.Module):
    """Three conv blocks + linear head: enough for the 16–32 px toy digits, fast on a CPU core."""

    def __init__(self, num_classes: int, width: int = 32):
        super().__init__()

        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                                 nn.MaxPool2d(2))

        self.features = nn.Sequential(block(3, width), block(width, 2 * width), block(2 * width, 4 * width),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class ClipClassifier(nn.Module):
    """open_clip model whose class logits are cosines to the class-prompt text embeddings (zero-shot head).

    Both towers stay trainable (FLYP fine-tunes the text tower too), so the head is recomputed from the
    current text tower at every forward."""

    def __init__(self, clip_model: nn.Module, class_tokens: torch.Tensor,
                 caption_tokens: Optional[torch.Tensor] = None):
        super().__init__()
        self.clip = clip_model
        self.register_buffer("class_tokens", class_tokens, persistent=False)
        # FLYP's own captions (training.flyp_templates, K per class; flyp.py): the FLYP loss contrasts with
        # these, the class head stays the class prompts. Not in the state dict: checkpoints keep one format.
        self.register_buffer("caption_tokens", caption_tokens, persistent=False)
        size = getattr(getattr(clip_model, "visual", None), "image_size", None)
        self.image_size = tuple(size) if isinstance(size, (tuple, list)) else ((size, size) if size else None)

    def _images(self, x: torch.Tensor) -> torch.Tensor:
        # Inputs come normalised at the model's size from the clip input pipeline (its own mean/std);
        # the resize is a guard for another pipeline, not the normal path.
        if self.image_size and tuple(x.shape[-2:]) != self.image_size:
            x = F.interpolate(x, size=self.image_size, mode="bilinear", align_corners=False)
        return x

    def forward(self, x: torch.Tensor, flyp_labels: Optional[torch.Tensor] = None):
        img = self.clip.encode_image(self._images(x))
        captions = self.caption_tokens if flyp_labels is not None and self.caption_tokens is not None else None
        txt = self.clip.encode_text(self.class_tokens if captions is None else captions)
        scale = self.clip.logit_scale.exp()
        if flyp_labels is not None:
            # FLYP: caption i is image i's caption (its class prompt, or with flyp_templates its caption index
            # into caption_tokens): each distinct caption encoded once, then indexed.
            return img, txt[flyp_labels], scale
        return scale * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).t()


# LP-FT's model (training/lpft.py has the schedule that trains it).
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
            raise UserError("training.head=linear trains with cross-entropy; FLYP needs the text tower")
        if self.image_size and tuple(x.shape[-2:]) != tuple(self.image_size):
            x = F.interpolate(x, size=self.image_size, mode="bilinear", align_corners=False)
        return self.head(F.normalize(self.visual(x), dim=-1))


def class_prompts(class_names: Sequence[str], template: str) -> list[str]:
    return [template.format(name=n) for n in class_names]


def build_model(backbone: str, num_classes: int, *, cfg=None, prompts: Optional[Sequence[str]] = None,
                device: str = "cpu", captions: Optional[Sequence[str]] = None) -> nn.Module:
    """The classifier for ``training.backbone``; ``clip`` loads the experiment's open_clip model."""
    if backbone == "resnet10":
        return resnet10(num_classes, cfg.training.resnet_width if cfg is not None else 64)
    if backbone == "small_cnn":
        return SmallCNN(num_classes)
    if backbone == "clip":
        if cfg is None or prompts is None:
            raise UserError("backbone=clip needs the experiment config and one prompt per class")
        # Contract with the scoring stage: load_clip(scoring_cfg, cache_dir, device) -> (model, preprocess, tok).
        from discl_ray.models.clip import load_clip
        from discl_ray.runtime.cluster import RunPaths
        from discl_ray.training.clip_backbone import trainer_clip_config

        # training.clip (paper: ViT-B/16, ViT-L/14), not the filter model; float32 master weights.
        model, _preprocess, tokenizer = load_clip(trainer_clip_config(cfg), RunPaths.from_config(cfg).cache, device)
        clf = ClipClassifier(model.float(), tokenizer(list(prompts)),
                             tokenizer(list(captions)) if captions else None)
        if cfg.training.head == "linear":      # LP-FT: image tower + linear head from the zero-shot weights
            return LinearHeadClip.from_zero_shot(clf)
        return clf
    raise UserError(f"unknown backbone {backbone!r}; valid: {', '.join(BACKBONES)}")


def unwrap(model: nn.Module) -> nn.Module:
    """The bare module under DistributedDataParallel (eval and checkpoints must bypass DDP's hooks)."""
    return model.module if hasattr(model, "module") else model
