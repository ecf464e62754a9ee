"""Small shared I/O helpers: PNG bytes, image loading, stable hashing, parquet directories."""

from __future__ import annotations

import hashlib
import io
import os
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError


class ImageLoadError(RuntimeError):
    """A source image is missing or cannot be decoded."""


def png_bytes(image: Image.Image | np.ndarray) -> bytes:
    """Encode a PIL image or HxW[xC] uint8 array as PNG bytes."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def load_image(image: Optional[bytes] = None, path: Optional[str] = None, root: Optional[str] = None,
               mode: str = "RGB") -> Image.Image:
    """Decode PNG/JPEG bytes, or read ``path`` (relative to ``root``), as a PIL image in ``mode``."""
    try:
        if image is not None:
            img = Image.open(io.BytesIO(image))
        elif path:
            full = Path(root, path) if root and not os.path.isabs(path) else Path(path)
            if not full.is_file():
                raise ImageLoadError(f"image file not found: {full}")
            img = Image.open(full)
        else:
            raise ImageLoadError("row has neither image bytes nor a path")
        img.load()
        return img.convert(mode)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise ImageLoadError(f"cannot decode image ({type(err).__name__}: {err})") from None


def stable_seed(*parts: object, bits: int = 63) -> int:
    """A process-independent integer from ``parts`` (never Python's salted ``hash()``)."""
    text = "\x1f".join(repr(p) if not isinstance(p, str) else p for p in parts)
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << bits) - 1)


def write_parquet_part(table: pa.Table, directory: str | Path, prefix: str = "part") -> Path:
    """Write ``table`` as a new file in ``directory`` atomically (temp name, then rename). Never clobbers."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    name = f"{prefix}-{uuid.uuid4().hex[:12]}.parquet"
    tmp = directory / f".{name}.tmp"
    pq.write_table(table, tmp)
    final = directory / name
    os.replace(tmp, final)
    return final


def parquet_files(directory: str | Path) -> list[Path]:
    """The finished parquet files of a directory (temp files ignored), sorted by name."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.glob("*.parquet") if not p.name.startswith("."))


def read_parquet_dir(directory: str | Path, columns: Optional[Iterable[str]] = None) -> pa.Table:
    """Read every finished parquet file of a directory as one table (empty dir → FileNotFoundError)."""
    files = parquet_files(directory)
    if not files:
        raise FileNotFoundError(f"no parquet files in {directory}")
    cols = list(columns) if columns is not None else None
    return pa.concat_tables([pq.read_table(f, columns=cols) for f in files], promote_options="default")


def replace_parquet_dir(table: pa.Table, directory: str | Path, prefix: str = "part") -> Path:
    """Write a whole stage output: new file first, then drop the older files of that directory."""
    old = parquet_files(directory)
    path = write_parquet_part(table, directory, prefix)
    for f in old:
        f.unlink(missing_ok=True)
    return path
