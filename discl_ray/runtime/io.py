"""Small shared I/O helpers: image encoding, image loading, stable hashing, parquet directories (any storage)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
from PIL import Image, UnidentifiedImageError

from discl_ray.errors import UserError
from discl_ray.runtime.storage import Storage, as_storage, local_or_storage


class ImageLoadError(UserError, RuntimeError):
    """A source image is missing or cannot be decoded."""


def png_bytes(image: Image.Image | np.ndarray) -> bytes:
    """Encode a PIL image or HxW[xC] uint8 array as PNG bytes."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


IMAGE_FORMATS = {"png": "PNG", "webp": "WEBP", "jpeg": "JPEG"}


def encode_image(image: Image.Image | np.ndarray, fmt: str = "png", quality: int = 95) -> bytes:
    """Encode as ``png`` (default), lossless ``webp`` or ``jpeg`` (``quality``) bytes."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if fmt not in IMAGE_FORMATS:
        raise UserError(f"unknown image format {fmt!r}; valid: {', '.join(IMAGE_FORMATS)}")
    kwargs = {"lossless": True} if fmt == "webp" else {"quality": quality} if fmt == "jpeg" else {}
    buf = io.BytesIO()
    image.save(buf, format=IMAGE_FORMATS[fmt], **kwargs)
    return buf.getvalue()


def load_image(image: Optional[bytes] = None, path: Optional[str] = None, root: Optional[str] = None,
               mode: str = "RGB") -> Image.Image:
    """Decode PNG/JPEG/WebP bytes, or read ``path`` (relative to ``root``; either may be a URI), as PIL."""
    from discl_ray.runtime.storage import is_uri

    try:
        if image is not None:
            img = Image.open(io.BytesIO(image))
        elif path:
            if is_uri(path) or (root and is_uri(root) and not os.path.isabs(path)):
                where = as_storage(path if is_uri(path) else f"{str(root).rstrip('/')}/{path}")
                if not where.is_file():
                    raise ImageLoadError(f"image file not found: {where}")
                img = Image.open(io.BytesIO(where.read_bytes()))
            else:
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


def write_parquet_part(table: pa.Table, directory: "str | Path | Storage", prefix: str = "part",
                       name: Optional[str] = None) -> "Path | Storage":
    """Write ``table`` as a new file in ``directory`` atomically. Never clobbers a random name.

    ``name`` (without ``.parquet``) makes the file name deterministic, so a rerun that writes the same
    content overwrites the same file instead of adding a duplicate."""
    d = as_storage(directory)
    target = d.join(f"{name or prefix + '-' + uuid.uuid4().hex[:12]}.parquet")
    target.write_parquet(table)
    return local_or_storage(target)


def parquet_files(directory: "str | Path | Storage") -> list:
    """The finished parquet files of a directory (temp/hidden files ignored), sorted by name.

    Paths for a local directory, :class:`~discl_ray.runtime.storage.Storage` items for an object store."""
    return [local_or_storage(f) for f in as_storage(directory).parquet_files()]


def read_parquet_dir(directory: "str | Path | Storage", columns: Optional[Iterable[str]] = None) -> pa.Table:
    """Read every finished parquet file of a directory as one table (empty dir → FileNotFoundError)."""
    return as_storage(directory).read_parquet_dir(columns)


def replace_parquet_dir(table: pa.Table, directory: "str | Path | Storage", prefix: str = "part") -> "Path | Storage":
    """Write a whole stage output as ``<prefix>.parquet`` (atomically replacing it), then drop any other
    files of that directory. The fixed name means a rerun leaves the same file set behind."""
    d = as_storage(directory)
    old = [f for f in d.parquet_files() if f.name != f"{prefix}.parquet"]
    path = write_parquet_part(table, d, prefix, name=prefix)
    for f in old:
        f.delete()
    return path


class MergeFileError(UserError):
    """A results file that new results were to be merged into cannot be used; the message is one line."""


def read_json_to_merge(path: "str | Path") -> dict:
    """The JSON object an earlier run wrote to ``path``, for a command that merges its new results into it
    (``{}`` when there is no file yet). Anything else there stops the command before its work, with one line
    (:class:`MergeFileError`): an empty file (as ``mktemp`` leaves it), text that is not JSON, JSON that is not
    an object, a folder, an unreadable file. Nothing is overwritten that this command did not write."""
    p = Path(path)
    if not p.exists():
        return {}
    if p.is_dir():
        raise MergeFileError(f"{p} is a folder, not a results file; name a file")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise MergeFileError(f"cannot read {p} ({type(err).__name__}: {err})") from None
    if not text.strip():
        raise MergeFileError(f"{p} is empty, not the results of an earlier run to merge into; "
                             "remove it or name a file that does not exist yet")
    try:
        data = json.loads(text)
    except ValueError as err:
        raise MergeFileError(f"{p} is not JSON ({err}); remove it or name a file that does not exist yet") from None
    if not isinstance(data, dict):
        raise MergeFileError(f"{p} holds a JSON {type(data).__name__}, not the object of results this command "
                             "merges into; remove it or name a file that does not exist yet")
    return data
