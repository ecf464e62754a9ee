"""Camera looks for the toy world's gap variant: the task's real digits live in another domain than the
"internet" the toy generator and CLIP were trained on.

The world split is white strokes on black. The ``blueprint`` look (the gap world's task look) is white lines on
textured blueprint-blue paper under a slightly soft, noisy, vignetted camera: λ = 0 generations (the text decides)
come out as world-style digits, far from the task's images, while high-λ generations keep the source's look. The
``paper`` look (dark ink on textured, tinted paper) inverts the world's polarity as well: img2img at λ ≈ 0.7 then
blends a white-on-black digit with a dark-on-light one and the digit is lost (docs/toyworld.md, "Gap variant"),
so it is kept as a harder look, not the gap world's. ``random_look`` draws from a
broad family of looks (any background, any stroke colour): the generator's autoencoder trains on it so that,
like Stable Diffusion's VAE, it can reproduce any look, while the UNet's prior stays the world's.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter

from discl_ray.errors import UserError

LOOKS = ("clean", "blueprint", "paper")


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency texture in [0, 1]: a coarse random grid upsampled bicubically."""
    grid = (rng.random((cells, cells)) * 255).astype(np.uint8)
    up = Image.fromarray(grid, mode="L").resize((size, size), Image.BICUBIC)
    return np.asarray(up, dtype=np.float32) / 255.0


def compose(stroke: np.ndarray, background: np.ndarray, ink: np.ndarray) -> np.ndarray:
    """Alpha-blend ``ink`` (3,) over ``background`` (S, S, 3) with the digit's intensity (S, S) in [0, 1]."""
    a = stroke[..., None]
    return background * (1.0 - a) + ink[None, None, :] * a


def _camera(out: np.ndarray, rng: np.random.Generator, vignette: float, blur: float, noise: float) -> np.ndarray:
    """A task look's camera on a composed float image: vignetting (corners ``1 − vignette / 2`` as bright), a
    Gaussian blur of radius ``blur`` to ``blur + 0.4`` px, sensor noise of std ``noise``; uint8 out."""
    size = out.shape[0]
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1) - 0.5
    out = out * (1.0 - vignette * (xx ** 2 + yy ** 2))[..., None]
    out = np.clip(out, 0, 255).astype(np.uint8)
    out = np.asarray(Image.fromarray(out).filter(ImageFilter.GaussianBlur(blur + 0.4 * rng.random())), np.float32)
    out += rng.normal(0, noise, out.shape)
    return np.clip(out, 0, 255).round().astype(np.uint8)


def paper_look(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Dark-blue ink on warm textured paper, thickened strokes, soft focus, sensor noise, vignetting."""
    size = image.shape[0]
    gray = Image.fromarray(image[..., 0] if image.ndim == 3 else image, mode="L")
    width = int(rng.integers(0, 2))                                  # stroke width varies from image to image
    if width:
        gray = gray.filter(ImageFilter.MaxFilter(3))
    stroke = np.asarray(gray, dtype=np.float32) / 255.0
    paper = np.array([222.0, 205.0, 170.0]) + rng.normal(0, 6, size=3)
    tex = _smooth_noise(rng, size, 5)[..., None] * 40.0 - 20.0 + rng.normal(0, 4, (size, size, 1))
    background = paper[None, None, :] + tex
    ink = np.array([30.0, 40.0, 110.0]) + rng.normal(0, 8, size=3)
    return _camera(compose(stroke, background, ink), rng, vignette=0.9, blur=0.4, noise=6.0)   # corners ≈ 55 %


def blueprint_look(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """White lines on blueprint-blue textured paper, soft focus, mild sensor noise, vignetting: the world's
    polarity (light strokes on a darker ground) in colours and textures its prior never drew."""
    size = image.shape[0]
    stroke = (image[..., 0] if image.ndim == 3 else image).astype(np.float32) / 255.0
    sheet = np.array([40.0, 90.0, 170.0]) + rng.normal(0, 8, size=3)
    tex = _smooth_noise(rng, size, 5)[..., None] * 40.0 - 20.0
    ink = np.array([235.0, 240.0, 250.0]) + rng.normal(0, 6, size=3)
    return _camera(compose(stroke, sheet[None, None, :] + tex, ink), rng, vignette=0.7, blur=0.3, noise=3.0)  # corners ≈ 65 %


_LOOK_FNS = {"blueprint": blueprint_look, "paper": paper_look}


def random_look(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Any look: random background colour and texture, random stroke colour (the autoencoder's training set)."""
    size = image.shape[0]
    stroke = (image[..., 0] if image.ndim == 3 else image).astype(np.float32) / 255.0
    bg = rng.uniform(0, 255, size=3)
    tex = (_smooth_noise(rng, size, int(rng.integers(2, 8)))[..., None] - 0.5) * rng.uniform(0, 120)
    ink = rng.uniform(0, 255, size=3)
    out = compose(stroke, bg[None, None, :] + tex, ink) + rng.normal(0, rng.uniform(0, 10), (size, size, 1))
    return np.clip(out, 0, 255).round().astype(np.uint8)


def internet_look(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``random_look`` under a random camera: sometimes thicker strokes, vignetting of any strength, soft focus
    and per-channel sensor noise. The gap world's "internet" (its VAE, CLIP image tower, judge and the UNet's
    low-noise denoising train on it): every effect of the task looks occurs, but never a task look's
    colours and effects together as a domain."""
    size = image.shape[0]
    gray = image[..., 0] if image.ndim == 3 else image
    if rng.random() < 0.5:
        gray = np.asarray(Image.fromarray(gray, mode="L").filter(ImageFilter.MaxFilter(3)))
    out = random_look(gray, rng).astype(np.float32)
    if rng.random() < 0.5:
        yy, xx = np.mgrid[0:size, 0:size] / (size - 1) - 0.5
        out *= (1.0 - rng.uniform(0, 0.9) * (xx ** 2 + yy ** 2))[..., None]
    if rng.random() < 0.5:
        pil = Image.fromarray(np.clip(out, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(rng.uniform(0.2, 1.0)))
        out = np.asarray(pil, np.float32)
    out += rng.normal(0, rng.uniform(0, 10), out.shape)
    return np.clip(out, 0, 255).round().astype(np.uint8)


def apply_look(images: np.ndarray, look: str, seed: int, keys=None) -> np.ndarray:
    """``look`` applied to every (S, S, 3) uint8 image; image i's draw is seeded by (seed, keys[i]), so an image
    looks the same whichever split or batch it lands in (``keys`` default: positions)."""
    if look == "clean":
        return images
    if look not in _LOOK_FNS:
        raise UserError(f"unknown toy look {look!r}; choose from: {', '.join(LOOKS)}")
    fn = _LOOK_FNS[look]
    keys = range(len(images)) if keys is None else keys
    return np.stack([fn(im, np.random.default_rng([seed, int(k)])) for k, im in zip(keys, images)])
