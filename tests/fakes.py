"""Small fakes of the real datasets' on-disk layouts, big enough for a rehearsal of their shipped configs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from PIL import Image


def _image(path: Path, label: int, i: int, size: int = 24) -> None:
    """A distinct image per (label, i): a class colour plus seeded noise (JPEG or PNG by suffix)."""
    rng = np.random.default_rng(1000 * label + i)
    base = np.array([(70 * label) % 256, (130 * label + 40) % 256, (50 * label + 90) % 256], np.float32)
    arr = np.clip(base + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


# Training images per class: many (≥ 12), medium and few under the rehearsal's scaled boundaries (12 / 6).
IMAGENET_COUNTS = (14, 12, 8, 5, 3, 2)


def fake_imagenet_lt(root: Path, counts=IMAGENET_COUNTS, val_per_class: int = 2, test_per_class: int = 3) -> Path:
    """``ImageNet_LT_{train,val,test}.txt`` + image folders + ``classnames.txt`` (docs/datasets.md)."""
    root = Path(root)
    lines: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for c, n in enumerate(counts):
        lines["train"] += [f"train/n{c:08d}/img_{c}_{i}.JPEG {c}" for i in range(n)]
        lines["val"] += [f"train/n{c:08d}/val_{c}_{i}.JPEG {c}" for i in range(val_per_class)]
        lines["test"] += [f"val/ILSVRC_{c}_{i}.JPEG {c}" for i in range(test_per_class)]
    for split, ls in lines.items():
        root.mkdir(parents=True, exist_ok=True)
        (root / f"ImageNet_LT_{split}.txt").write_text("\n".join(ls) + "\n")
        for j, line in enumerate(ls):
            rel, label = line.split()
            _image(root / rel, int(label), j + 100 * ("train", "val", "test").index(split))
    names = ["goldfish", "tree frog", "red fox", "snail", "banjo", "lighthouse", "tabby cat", "kite"]
    (root / "classnames.txt").write_text("\n".join(names[: len(counts)]) + "\n")
    return root


IWILDCAM_NAMES = ["empty", "tayassu pecari", "dasyprocta punctata", "cuniculus paca", "meleagris ocellata"]


def fake_iwildcam(root: Path, train_per_class: int = 10, eval_per_class: int = 3) -> Path:
    """The WILDS ``iwildcam_v2.0`` layout: train/ID val/ID test at locations 0-1, OOD val/test at 2-3."""
    root = Path(root)
    data = root / "iwildcam_v2.0"
    (data / "train").mkdir(parents=True, exist_ok=True)
    (data / "RELEASE_v2.0.txt").write_text("v2.0\n")
    with open(data / "categories.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["y", "category_id", "name"])
        for y, name in enumerate(IWILDCAM_NAMES):
            w.writerow([y, 100 + y, name])
    plan = []
    for y in range(len(IWILDCAM_NAMES)):
        plan += [("train", y, i % 2) for i in range(train_per_class)]
        plan += [("id_val", y, i % 2) for i in range(eval_per_class)]
        plan += [("id_test", y, i % 2) for i in range(eval_per_class)]
        plan += [("val", y, 2) for _ in range(eval_per_class)]
        plan += [("test", y, 3) for _ in range(eval_per_class)]
    with open(data / "metadata.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["", "split", "location", "image_id", "filename", "y", "location_remapped",
                    "sequence_remapped", "datetime"])
        for i, (split, y, loc) in enumerate(plan):
            name = f"img{i:04d}.jpg"
            w.writerow([i, split, 500 + loc, f"id{i}", name, y, loc, i,
                        f"2013-06-{1 + i % 28:02d} 10:{i % 60:02d}:00.000"])
            _image(data / "train" / name, y, i)
    return root


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


CIFAR_NAMES = ["apple", "aquarium_fish", "baby", "bear", "beaver"]


def fake_cifar100(root: Path, train_per_class: int = 100, test_per_class: int = 3) -> Path:
    """``cifar-100-python/{train,test,meta}`` pickles (the loader cuts the long tail itself: with 100 images per
    class every class keeps at least one at imbalance ratio 100)."""
    import pickle

    root = Path(root)
    base = root / "cifar-100-python"
    base.mkdir(parents=True, exist_ok=True)
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        labels = np.repeat(np.arange(len(CIFAR_NAMES)), per_class)
        rng = np.random.default_rng(len(split))
        colour = np.array([[(70 * c) % 256, (130 * c + 40) % 256, (50 * c + 90) % 256] for c in labels], np.float32)
        pix = np.clip(colour[:, :, None] + rng.normal(0, 40, (len(labels), 3, 1024)), 0, 255).astype(np.uint8)
        batch = {b"data": pix.reshape(len(labels), 3072), b"fine_labels": labels.tolist(),
                 b"coarse_labels": [0] * len(labels), b"filenames": [f"{i}.png".encode() for i in range(len(labels))],
                 b"batch_label": split.encode()}
        (base / split).write_bytes(pickle.dumps(batch, protocol=2))
    meta = {b"fine_label_names": [n.encode() for n in CIFAR_NAMES], b"coarse_label_names": [b"x"]}
    (base / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    return root


def fake_inat2018(root: Path, counts=IMAGENET_COUNTS, test_per_class: int = 3) -> Path:
    """``train2018.json`` / ``val2018.json`` (COCO style) + ``categories.json`` + the image files."""
    root = Path(root)
    cats = [{"id": 10 + c, "name": f"Species {c}"} for c in range(len(counts))]

    def coco(per_class, prefix: str) -> dict:
        images, anns, k = [], [], 0
        for c, n in enumerate(per_class):
            for _ in range(n):
                rel = f"train_val2018/Plantae/{10 + c}/{prefix}{k}.jpg"
                _image(root / rel, c, k + (0 if prefix == "tr" else 500))
                images.append({"id": 1000 + k, "file_name": rel})
                anns.append({"id": k, "image_id": 1000 + k, "category_id": 10 + c})
                k += 1
        return {"images": images, "annotations": anns, "categories": cats, "info": {}}

    root.mkdir(parents=True, exist_ok=True)
    (root / "train2018.json").write_text(json.dumps(coco(counts, "tr")))
    (root / "val2018.json").write_text(json.dumps(coco([test_per_class] * len(counts), "va")))
    (root / "categories.json").write_text(json.dumps(cats))
    return root
