"""Decode one stored image and apply the pipeline's deterministic ``base`` resize: what the cache, the stream's
readers and the prepared copy (``prepared.py``) all run, so they see the same pixels."""

from __future__ import annotations

import logging
from typing import Optional

import numpy as np

from discl_ray.runtime.io import ImageLoadError, load_image
from discl_ray.training.transforms import InputPipeline

log = logging.getLogger(__name__)


def decode_base(pipe: InputPipeline, data, path, root) -> Optional[np.ndarray]:
    """Decode + ``base`` one image (both paths run this, so cache and stream give the same pixels). Embedded
    JPEG bytes are decoded at a reduced DCT scale (PIL ``draft``) that still covers the base size, so a 224²
    JPEG for a 32² model is not decoded in full first; other images are decoded in full."""
    try:
        if data is not None:
            img = decode_bytes(data, pipe.resize)
        else:
            img = load_image(data, path, root=root)
        return pipe.base(img)
    except ImageLoadError as err:
        log.warning("skipping undecodable image: %s", err)
        return None


def decode_bytes(data: bytes, side: int):
    import io

    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data))
        if img.format == "JPEG":
            img.draft("RGB", (side, side))      # a scale ≥ side in both dimensions (the base resize follows)
        img.load()
        return img if img.mode == "RGB" else img.convert("RGB")    # convert() of an RGB image is only a copy
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise ImageLoadError(f"cannot decode image ({type(err).__name__}: {err})") from None
