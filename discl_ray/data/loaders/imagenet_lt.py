"""ImageNet-LT (Liu et al., 2019) from its split files.

Layout under ``dataset.root`` (the ImageNet image folders plus the three ImageNet-LT lists)::

    ImageNet_LT_train.txt    "train/n01440764/n01440764_10026.JPEG 0" per line (115,846 lines)
    ImageNet_LT_val.txt      20 images per class held out of ImageNet train (model selection)
    ImageNet_LT_test.txt     50 per class = the ImageNet validation set (reporting only)
    classnames.txt           optional: 1,000 lines, line i naming label i (else open_clip's ImageNet names)
    train/…, val/…           the images, at the paths the lists name (relative to the root)

Paths stay relative to the root in the rows (``discl_ray.runtime.io.load_image(path=…, root=cfg.root)`` reads
them); ``dataset.embed_images`` stores PNG bytes instead. The image id is the listed path, so an image
listed in two files (a leak between splits) is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa

from discl_ray.data.loaders.common import (
    DatasetError,
    default_names,
    finish,
    read_class_names,
    require_file,
    require_root,
)

if TYPE_CHECKING:
    from discl_ray.config import DatasetConfig

SPLIT_FILES = {"train": "ImageNet_LT_train.txt", "val": "ImageNet_LT_val.txt", "test": "ImageNet_LT_test.txt"}
CLASSNAMES_FILE = "classnames.txt"


def imagenet_names(num_classes: int) -> dict[int, str]:
    """Readable names without a classnames.txt: open_clip's curated ImageNet class names, in the standard label
    order (CLIP's zero-shot list, so prompts read "a photo of tench", not "a photo of class_0")."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    names = default_names(range(num_classes))
    names.update({i: IMAGENET_CLASSNAMES[i] for i in range(min(num_classes, len(IMAGENET_CLASSNAMES)))})
    return names


def parse_split_file(path: Path) -> list[tuple[str, int]]:
    """``(relative_path, label)`` per non-blank line of a "path label" list; bad lines raise with their number."""
    rows = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        text = line.strip()
        if not text:
            continue
        parts = text.rsplit(None, 1)
        if len(parts) != 2:
            raise DatasetError(f"{path}:{lineno}: expected 'relative/path label', got {text!r}")
        rel, raw = parts
        try:
            label = int(raw)
        except ValueError:
            raise DatasetError(f"{path}:{lineno}: label must be a non-negative integer, got {raw!r}") from None
        if label < 0:
            raise DatasetError(f"{path}:{lineno}: label must be a non-negative integer, got {label}")
        rows.append((rel, label))
    if not rows:
        raise DatasetError(f"{path}: no 'relative/path label' lines")
    return rows


def load(cfg: "DatasetConfig") -> pa.Table:
    """Canonical rows of ImageNet-LT: train / val / test from the three split files."""
    root = require_root(cfg)
    listed = {split: parse_split_file(require_file(root, name, f"ImageNet-LT {split} list ('path label' lines)"))
              for split, name in SPLIT_FILES.items()}
    labels = sorted({y for rows in listed.values() for _, y in rows})
    num_classes = labels[-1] + 1
    train_labels = {y for _, y in listed["train"]}
    unseen = sorted(set(labels) - train_labels)
    if unseen:
        raise DatasetError(f"{root / SPLIT_FILES['train']}: labels {unseen[:10]} appear in val/test but never in train")
    names_file = root / CLASSNAMES_FILE
    if names_file.is_file():
        names = dict(enumerate(read_class_names(names_file, num_classes)))
    else:
        names = imagenet_names(num_classes)
    cols: dict[str, list] = {k: [] for k in ("image_id", "path", "label", "class_name", "split")}
    for split, rows in listed.items():
        for rel, y in rows:
            cols["image_id"].append(rel)
            cols["path"].append(rel)
            cols["label"].append(y)
            cols["class_name"].append(names[y])
            cols["split"].append(split)
    return finish(cfg, root, cols)
