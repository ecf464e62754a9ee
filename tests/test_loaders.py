"""Real-dataset loaders on tiny fakes of their on-disk layouts: counts, labels, splits, groups, errors."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
from PIL import Image

from discl_ray.config import DatasetConfig
from discl_ray.data import CANONICAL_SCHEMA, get_loader, load_rows
from discl_ray.data.loaders import DatasetError, class_groups
from discl_ray.data.loaders.cifar100_lt import lt_counts
from discl_ray.data.loaders.common import balanced_holdout
from discl_ray.runtime.io import load_image


def _counts(table, split):
    rows = [y for y, s in zip(table["label"].to_pylist(), table["split"].to_pylist()) if s == split]
    return np.bincount(rows) if rows else np.array([])


def _img(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((6, 6, 3), value, np.uint8)).save(path)


# ---------------------------------------------------------------- groups


def test_class_groups_boundaries():
    labels = [0] * 100 + [1] * 99 + [2] * 20 + [3] * 19 + [4]
    groups = class_groups(labels, few_max=20, many_min=100, classes=range(6))
    assert groups == {0: "many", 1: "medium", 2: "medium", 3: "few", 4: "few", 5: "few"}
    assert class_groups([7, 7, 7], few_max=2, many_min=3) == {7: "many"}
    with pytest.raises(ValueError, match="few_max"):
        class_groups([0], few_max=5, many_min=5)


def test_balanced_holdout_is_balanced_seeded_and_respects_pools():
    labels = np.array([2, 0, 1, 0, 2, 2, 0, 1, 2, 0, 3])  # counts: 0→4, 1→2, 2→4, 3→1
    out = balanced_holdout(labels, per_class=2, seed=0, min_keep=1)
    assert np.bincount(labels[out], minlength=4).tolist() == [2, 0, 2, 0]  # class 1 would be emptied, 3 too small
    assert out.tolist() == sorted(out.tolist())
    assert balanced_holdout(labels, 2, seed=0, min_keep=1).tolist() == out.tolist()
    draws = {tuple(balanced_holdout(labels, 2, seed=s).tolist()) for s in range(8)}
    assert len(draws) > 1
    pool = np.array([0, 1, 2, 3, 4, 7])
    held = balanced_holdout(labels, per_class=1, seed=1, candidates=pool)
    assert set(held.tolist()) <= set(pool.tolist()) and np.bincount(labels[held]).tolist() == [1, 1, 1]
    assert balanced_holdout(labels, per_class=0, seed=0).size == 0


# ---------------------------------------------------------------- ImageNet-LT


def _imagenet_root(tmp_path):
    root = tmp_path / "inlt"
    counts = {0: 6, 1: 3, 2: 1}  # train images per class
    lines = {"train": [], "val": [], "test": []}
    for c, n in counts.items():
        for i in range(n):
            lines["train"].append(f"train/n{c:08d}/img_{c}_{i}.JPEG {c}")
        lines["val"].append(f"train/n{c:08d}/val_{c}.JPEG {c}")
        lines["test"] += [f"val/ILSVRC_{c}_{i}.JPEG {c}" for i in range(2)]
    for split, ls in lines.items():
        (root / f"ImageNet_LT_{split}.txt").parent.mkdir(parents=True, exist_ok=True)
        (root / f"ImageNet_LT_{split}.txt").write_text("\n".join(ls) + "\n\n")
        for line in ls:
            _img(root / line.split()[0], 40 * int(line.split()[1]))
    return root


def test_imagenet_lt_rows_and_groups(tmp_path):
    root = _imagenet_root(tmp_path)
    table = load_rows(DatasetConfig(name="imagenet_lt", root=str(root)))
    assert table.schema == CANONICAL_SCHEMA
    assert table.num_rows == 10 + 3 + 6
    assert _counts(table, "train").tolist() == [6, 3, 1]
    assert _counts(table, "val").tolist() == [1, 1, 1]
    assert _counts(table, "test").tolist() == [2, 2, 2]
    assert set(table["class_name"].to_pylist()) == {"tench", "goldfish", "great white shark"}   # open_clip's names
    assert table["image"].null_count == table.num_rows
    row = table.slice(0, 1).to_pylist()[0]
    assert row["path"] == "train/n00000000/img_0_0.JPEG" and row["domain"] == ""
    assert load_image(path=row["path"], root=str(root)).size == (6, 6)
    train = [y for y, s in zip(table["label"].to_pylist(), table["split"].to_pylist()) if s == "train"]
    assert class_groups(train, few_max=2, many_min=5) == {0: "many", 1: "medium", 2: "few"}


def test_imagenet_lt_classnames_and_embedding(tmp_path):
    root = _imagenet_root(tmp_path)
    (root / "classnames.txt").write_text("tench\ngoldfish\ngreat white shark\n")
    os.remove(root / "train/n00000001/img_1_2.JPEG")  # a missing image must not kill the load
    table = get_loader("imagenet_lt")(DatasetConfig(name="imagenet_lt", root=str(root), embed_images=True))
    names = dict(zip(table["label"].to_pylist(), table["class_name"].to_pylist()))
    assert names == {0: "tench", 1: "goldfish", 2: "great white shark"}
    assert table["image"].null_count == 1
    rows = table.to_pylist()
    first = next(r for r in rows if r["image"] is not None and r["label"] == 2)
    assert np.asarray(load_image(first["image"]))[0, 0].tolist() == [80, 80, 80]
    missing = next(r for r in rows if r["image"] is None)
    assert missing["path"] == "train/n00000001/img_1_2.JPEG"


@pytest.mark.parametrize("content, match", [
    ("train/a.JPEG 0\ntrain/b.JPEG\n", r"ImageNet_LT_train.txt:2: expected 'relative/path label'"),
    ("train/a.JPEG zero\n", r"ImageNet_LT_train.txt:1: label must be a non-negative integer, got 'zero'"),
    ("\n", r"no 'relative/path label' lines"),
])
def test_imagenet_lt_malformed(tmp_path, content, match):
    root = _imagenet_root(tmp_path)
    (root / "ImageNet_LT_train.txt").write_text(content)
    with pytest.raises(DatasetError, match=match):
        load_rows(DatasetConfig(name="imagenet_lt", root=str(root)))


def test_imagenet_lt_missing_files(tmp_path):
    with pytest.raises(DatasetError, match="dataset.root is not set"):
        load_rows(DatasetConfig(name="imagenet_lt"))
    with pytest.raises(DatasetError, match="is not a directory"):
        load_rows(DatasetConfig(name="imagenet_lt", root=str(tmp_path / "nope")))
    root = _imagenet_root(tmp_path)
    os.remove(root / "ImageNet_LT_val.txt")
    with pytest.raises(DatasetError, match=r"ImageNet_LT_val.txt: file not found; expected ImageNet-LT val list"):
        load_rows(DatasetConfig(name="imagenet_lt", root=str(root)))
    (root / "ImageNet_LT_val.txt").write_text("train/x.JPEG 0\ntrain/n00000000/img_0_0.JPEG 0\n")
    with pytest.raises(DatasetError, match="occurs more than once"):
        load_rows(DatasetConfig(name="imagenet_lt", root=str(root)))
    (root / "ImageNet_LT_val.txt").write_text("train/x.JPEG 0\n")
    (root / "classnames.txt").write_text("tench\n")
    with pytest.raises(DatasetError, match=r"classnames.txt: 1 class names for 3 labels"):
        load_rows(DatasetConfig(name="imagenet_lt", root=str(root)))


# ---------------------------------------------------------------- CIFAR-100-LT

CIFAR_CLASSES, CIFAR_PER_CLASS = 10, 40


def _cifar_root(tmp_path, protocol=2):
    root = tmp_path / "cifar"
    base = root / "cifar-100-python"
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, per_class in (("train", CIFAR_PER_CLASS), ("test", 3)):
        labels = np.repeat(np.arange(CIFAR_CLASSES), per_class)
        rng.shuffle(labels)
        data = np.zeros((len(labels), 3072), np.uint8)
        data[:, :1024] = labels[:, None] * 20  # red channel encodes the class
        batch = {b"data": data, b"fine_labels": labels.tolist(), b"coarse_labels": [0] * len(labels),
                 b"filenames": [f"{i}.png".encode() for i in range(len(labels))], b"batch_label": name.encode()}
        (base / name).write_bytes(pickle.dumps(batch, protocol=protocol))
    meta = {b"fine_label_names": [f"thing{c}".encode() for c in range(CIFAR_CLASSES)], b"coarse_label_names": [b"x"]}
    (base / "meta").write_bytes(pickle.dumps(meta, protocol=protocol))
    return root


def test_lt_counts_match_the_standard_totals():
    for ratio, total in ((100, 10847), (50, 12608)):
        counts = lt_counts(100, 500, ratio)
        assert counts[0] == 500 and counts[-1] == 500 // ratio and sum(counts) == total
        assert counts == [int(np.floor(500 * ratio ** (-c / 99) + 1e-9)) for c in range(100)]


@pytest.mark.parametrize("protocol", [2, 5])
def test_cifar100_lt_counts_splits_pixels(tmp_path, protocol):
    root = _cifar_root(tmp_path, protocol)
    cfg = DatasetConfig(name="cifar100_lt", root=str(root), imbalance_ratio=10, seed=3)
    table = load_rows(cfg)
    expected = [int(np.floor(CIFAR_PER_CLASS * 10 ** (-c / 9) + 1e-9)) for c in range(CIFAR_CLASSES)]
    assert _counts(table, "train").tolist() == expected == lt_counts(CIFAR_CLASSES, CIFAR_PER_CLASS, 10)
    val = _counts(table, "val")
    unused = [CIFAR_PER_CLASS - n for n in expected]
    assert [int(v) for v in np.pad(val, (0, CIFAR_CLASSES - len(val)))] == [10 if u >= 10 else 0 for u in unused]
    assert _counts(table, "test").tolist() == [3] * CIFAR_CLASSES
    ids = table["image_id"].to_pylist()
    assert len(set(ids)) == len(ids)  # val never overlaps train
    assert table["path"].null_count == table.num_rows and table["image"].null_count == 0
    for row in table.slice(0, 20).to_pylist():
        img = np.asarray(load_image(row["image"]))
        assert img.shape == (32, 32, 3) and img[0, 0].tolist() == [20 * row["label"], 0, 0]
        assert row["class_name"] == f"thing{row['label']}"
    again = load_rows(cfg)
    assert again["image_id"].to_pylist() == ids
    other = load_rows(cfg.model_copy(update={"seed": 4}))
    assert other["image_id"].to_pylist() != ids


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_cifar100_lt_refuses_malicious_pickle(tmp_path):
    root = _cifar_root(tmp_path)
    marker = tmp_path / "pwned"
    (root / "cifar-100-python/meta").write_bytes(pickle.dumps({b"fine_label_names": [_Evil(marker)]}, protocol=2))
    with pytest.raises(DatasetError, match=r"meta: refused to unpickle: global '(posix|os|nt)\.system' is not allowed"):
        load_rows(DatasetConfig(name="cifar100_lt", root=str(root)))
    assert not marker.exists()


def test_cifar100_lt_malformed(tmp_path):
    root = _cifar_root(tmp_path)
    (root / "cifar-100-python/test").write_bytes(pickle.dumps({b"data": np.zeros((2, 10), np.uint8),
                                                               b"fine_labels": [0, 1]}))
    with pytest.raises(DatasetError, match=r"test: 'data' must be a uint8 array of shape \(N, 3072\)"):
        load_rows(DatasetConfig(name="cifar100_lt", root=str(root)))
    (root / "cifar-100-python/test").write_bytes(b"not a pickle at all")
    with pytest.raises(DatasetError, match="test: (refused|not a readable)"):
        load_rows(DatasetConfig(name="cifar100_lt", root=str(root)))
    os.remove(root / "cifar-100-python/train")
    with pytest.raises(DatasetError, match=r"cifar-100-python/train: file not found"):
        load_rows(DatasetConfig(name="cifar100_lt", root=str(root)))


# ---------------------------------------------------------------- iNaturalist-2018


def _inat_root(tmp_path, train_counts=(5, 3, 2, 1), test_per_class=2):
    root = tmp_path / "inat"
    root.mkdir()
    cats = [{"id": 10 + c, "name": f"Species {c}"} for c in range(len(train_counts))]

    def coco(counts, prefix):
        images, anns, k = [], [], 0
        for c, n in enumerate(counts):
            for _ in range(n):
                images.append({"id": 1000 + k, "file_name": f"train_val2018/Plantae/{10 + c}/{prefix}{k}.jpg"})
                anns.append({"id": k, "image_id": 1000 + k, "category_id": 10 + c})
                k += 1
        return {"images": images, "annotations": anns, "categories": cats, "info": {}}

    (root / "train2018.json").write_text(json.dumps(coco(train_counts, "tr")))
    (root / "val2018.json").write_text(json.dumps(coco([test_per_class] * len(train_counts), "va")))
    return root


def test_inat2018_splits_labels_val_holdout(tmp_path):
    root = _inat_root(tmp_path)
    table = load_rows(DatasetConfig(name="inat2018", root=str(root), seed=1))
    assert table.schema == CANONICAL_SCHEMA
    # one val image per class, only where 2 training images remain: classes 0 and 1 (5 → 4, 3 → 2)
    assert _counts(table, "train").tolist() == [4, 2, 2, 1]
    assert _counts(table, "val").tolist() == [1, 1]
    assert _counts(table, "test").tolist() == [2, 2, 2, 2]
    names = dict(zip(table["label"].to_pylist(), table["class_name"].to_pylist()))
    assert names == {c: f"Species {c}" for c in range(4)}  # category ids 10..13 → labels 0..3
    assert all(p.startswith("train_val2018/Plantae/") for p in table["path"].to_pylist())
    train = [y for y, s in zip(table["label"].to_pylist(), table["split"].to_pylist()) if s != "test"]
    assert class_groups(train, few_max=2, many_min=5) == {0: "many", 1: "medium", 2: "medium", 3: "few"}


def test_inat2018_val_holdout_keeps_the_standard_groups(tmp_path):
    """A class of exactly 101 (many) or 20 (medium) images would cross a Liu et al. boundary with one image
    held out: it keeps all of them; every other class still gives one, and each class's group is the one the
    full training split gives it."""
    from discl_ray.data.loaders.inat2018 import group_of

    counts = (102, 101, 100, 21, 20, 19, 3, 2)
    root = _inat_root(tmp_path, train_counts=counts, test_per_class=1)
    table = load_rows(DatasetConfig(name="inat2018", root=str(root), seed=0))
    assert _counts(table, "val").tolist() == [1, 0, 1, 1, 0, 1, 1]             # class 7 (2 images) keeps both
    train = _counts(table, "train").tolist()
    assert train == [101, 101, 99, 20, 20, 18, 2, 2]
    assert [group_of(n) for n in train] == [group_of(n) for n in counts]
    groups = class_groups([y for y, s in zip(table["label"].to_pylist(), table["split"].to_pylist()) if s == "train"],
                          few_max=20, many_min=101)
    assert [groups[c] for c in range(len(counts))] == ["many", "many", "medium", "medium", "medium", "few", "few", "few"]


def test_inat2018_malformed(tmp_path):
    root = _inat_root(tmp_path)
    data = json.loads((root / "val2018.json").read_text())
    del data["annotations"]
    (root / "val2018.json").write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"val2018.json: missing key 'annotations'"):
        load_rows(DatasetConfig(name="inat2018", root=str(root)))
    data = json.loads((root / "train2018.json").read_text())
    del data["images"][2]["file_name"]
    (root / "train2018.json").write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"train2018.json: images\[2\] lacks \['file_name'\]"):
        load_rows(DatasetConfig(name="inat2018", root=str(root)))
    (root / "train2018.json").write_text("{not json")
    with pytest.raises(DatasetError, match="train2018.json: not valid JSON"):
        load_rows(DatasetConfig(name="inat2018", root=str(root)))


def test_shipped_config_materializes_a_fake_root(tmp_path):
    """configs/imagenet_lt + a fake root → runs/<exp>/dataset parquet readable by split (the stage contract)."""
    from pathlib import Path

    from discl_ray.config import load_config
    from discl_ray.data import materialize, read_rows

    root = _imagenet_root(tmp_path)
    config = Path(__file__).resolve().parents[1] / "configs/imagenet_lt/discl_d2s.yaml"
    cfg = load_config(config, [f"dataset.root={root}", f"run_root={tmp_path / 'runs'}"])
    out = materialize(cfg)
    assert out == tmp_path / "runs" / "imagenet_lt_ce_discl_d2s" / "dataset"
    train = read_rows(cfg, splits=("train",))
    assert train.num_rows == 10 and set(train["split"].to_pylist()) == {"train"}
    groups = class_groups(train["label"].to_pylist(), cfg.mining.few_max, cfg.mining.many_min)
    assert set(groups.values()) == {"few"}  # 6, 3, 1 images: all below the paper's 20
