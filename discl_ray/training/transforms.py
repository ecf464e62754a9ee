"""The input pipeline per backbone, in one place: decode → base → augment (CPU) → normalise (on the device).

- ``resnet`` (the long-tail recipe the paper follows from LDMLR): train = RandomResizedCrop(size, scale) +
  horizontal flip + colour jitter (``training.color_jitter``, 0 = off); eval = Resize(resize) +
  CenterCrop(size); ImageNet mean/std.
- ``clip``: the open_clip model's own preprocess (its ``preprocess_cfg``: size, mean/std, interpolation,
  resize mode) — open_clip's train transform (RandomResizedCrop, scale 0.9–1) and its eval transform.
- ``toy`` (the small CNN of the digits world): a square resize to ``size`` for train and eval, no
  augmentation, pixels scaled to [0, 1] — what the toy world has always used.

Split in three so that both image paths (``images.py``: the bounded in-memory cache and the Ray Data
stream) run the same code:

1. ``base(PIL) -> uint8 HWC``: deterministic, what the cache holds — the toy square resize, or a resize of
   the shorter side to ``resize`` (the first step of the eval transform, so eval output is unchanged);
2. ``augment(uint8 HWC, train, seed) -> uint8 (3, size, size)``: per-sample crops/flips/jitter, seeded per
   (run seed, epoch, image) so a re-run epoch repeats its augmentation;
3. ``normalise(uint8 batch on device) -> float``: ``/255`` then (x − mean)/std, on the GPU when there is
   one, so only uint8 crosses the host-device link.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from discl_ray.errors import UserError

KINDS = ("toy", "resnet", "clip")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_DEFAULT_KIND = {"small_cnn": "toy", "resnet10": "resnet", "clip": "clip"}


@dataclass(frozen=True)
class InputPipeline:
    """A picklable description of the transforms (shipped to Ray Data tasks, built lazily there)."""

    kind: str
    size: int                                   # model input side
    resize: int                                 # shorter side of the stored (base) image; toy: square side
    mean: tuple = (0.0, 0.0, 0.0)
    std: tuple = (1.0, 1.0, 1.0)
    color_jitter: float = 0.0
    crop_scale: tuple = (0.08, 1.0)
    clip_cfg: Optional[dict] = None             # open_clip PreprocessCfg fields (clip only)
    _cache: dict = field(default_factory=dict, compare=False, repr=False)

    def __getstate__(self):
        # Built transforms stay in the process that built them; a Ray task rebuilds its own.
        return {k: v for k, v in self.__dict__.items() if k != "_cache"}

    def __setstate__(self, state):
        self.__dict__.update(state, _cache={})

    # -- 1. base ---------------------------------------------------------------------------------
    def base(self, img) -> np.ndarray:
        """Deterministic resize of a decoded RGB PIL image; uint8 (H, W, 3)."""
        from PIL import Image

        if self.kind == "toy":
            if img.size != (self.size, self.size):
                img = img.resize((self.size, self.size), Image.BILINEAR)
            return np.asarray(img, dtype=np.uint8)
        if min(img.size) != self.resize:
            # The eval transform's own first step (ResNet: Resize(resize); CLIP: open_clip's Resize(size,
            # bicubic)), so the eval Resize after it is a no-op and eval output equals the reference transform.
            img = self._tf("resize")(img)
        return np.asarray(img, dtype=np.uint8)

    # -- 2. augment ------------------------------------------------------------------------------
    def augment(self, arr: np.ndarray, train: bool, seed: Optional[int] = None) -> np.ndarray:
        """uint8 (3, size, size) from a base image; ``seed`` fixes the random crop/flip/jitter of one sample."""
        if self.kind == "toy":
            return np.ascontiguousarray(arr.transpose(2, 0, 1))
        from PIL import Image

        if train and seed is not None:
            torch.manual_seed(seed)
        out = self._tf("train" if train else "eval")(Image.fromarray(arr))
        return np.ascontiguousarray(np.asarray(out, dtype=np.uint8).transpose(2, 0, 1))

    def _tf(self, which: str):
        """The torchvision / open_clip PIL transform ``which`` (built once per process)."""
        if which not in self._cache:
            self._cache[which] = self._build(which)
        return self._cache[which]

    def _build(self, which: str):
        from torchvision import transforms as T

        if self.kind == "clip":
            from open_clip.transform import PreprocessCfg, image_transform_v2

            full = image_transform_v2(PreprocessCfg(**self.clip_cfg), is_train=(which == "train"))
            # open_clip's own steps up to ToTensor; ToTensor (/255) and Normalize run in ``normalise``.
            steps = [t for t in full.transforms if not isinstance(t, (T.ToTensor, T.Normalize))]
            if which == "resize":
                steps = [t for t in steps if isinstance(t, T.Resize)]
            return T.Compose(steps)
        if which == "resize":
            return T.Resize(self.resize, antialias=True)
        if which == "train":
            steps = [T.RandomResizedCrop(self.size, scale=tuple(self.crop_scale), antialias=True),
                     T.RandomHorizontalFlip()]
            if self.color_jitter > 0:
                j = self.color_jitter
                steps.append(T.ColorJitter(brightness=j, contrast=j, saturation=j))
            return T.Compose(steps)
        return T.Compose([T.Resize(self.resize, antialias=True), T.CenterCrop(self.size)])

    # -- 3. normalise ----------------------------------------------------------------------------
    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, size, size) on the device → float32 normalised; for the convnets' pipelines (toy, resnet)
        in channels-last memory whatever the batch's layout. The layout decides the kernels torch picks: on CPU
        the small CNN's max-pool and batch-norm ran ≈ 10× and 3× slower on NCHW batches (the stream's) than on
        the NHWC ones the toy cache happened to stack (issue 26's train-io bench), and channels-last is what
        convolutions want on CUDA tensor cores too. The CLIP ViT's batches keep their layout."""
        x = x.float().div_(255.0)
        if self.kind != "clip" and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.kind == "toy":
            return x
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return x.sub_(mean).div_(std)

    def __call__(self, img, train: bool = False, seed: Optional[int] = None) -> torch.Tensor:
        """Whole pipeline for one PIL image (tests, one-offs): float (3, size, size) on the CPU."""
        return self.normalise(torch.from_numpy(self.augment(self.base(img), train, seed))[None])[0]


def pipeline_kind(tc) -> str:
    return _DEFAULT_KIND[tc.backbone] if tc.input_pipeline == "auto" else tc.input_pipeline


def build_pipeline(cfg, clip_model=None) -> InputPipeline:
    """The pipeline of ``cfg.training`` (``clip_model``: the open_clip model whose preprocess is used)."""
    tc = cfg.training
    kind = pipeline_kind(tc)
    size = tc.image_size or cfg.dataset.image_size
    if kind == "toy":
        return InputPipeline("toy", size, size)
    if kind == "resnet":
        resize = tc.resize_size or round(size * 256 / 224)
        return InputPipeline("resnet", size, resize, IMAGENET_MEAN, IMAGENET_STD, tc.color_jitter,
                             tuple(tc.crop_scale))
    if clip_model is None:
        raise UserError("training.input_pipeline=clip needs the open_clip model (training.backbone=clip)")
    from open_clip import get_model_preprocess_cfg
    from open_clip.transform import PreprocessCfg

    pcfg = PreprocessCfg(**get_model_preprocess_cfg(clip_model))
    clip_cfg = {k: getattr(pcfg, k) for k in ("size", "mode", "mean", "std", "interpolation", "resize_mode",
                                              "fill_color")}
    side = pcfg.size if isinstance(pcfg.size, int) else max(pcfg.size)
    return InputPipeline("clip", side, side, tuple(pcfg.mean), tuple(pcfg.std), clip_cfg=clip_cfg)
