"""iWildCam through the real WILDS reader on a tiny fake of the ``iwildcam_v2.0`` layout; macro-F1 vs WILDS."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from discl_ray.config import DatasetConfig
from discl_ray.data import CANONICAL_SCHEMA, load_rows
from discl_ray.data.loaders import DatasetError, class_groups
from discl_ray.data.loaders.iwildcam import COMMON_NAMES_PATH, common_name, macro_f1
from discl_ray.runtime.io import load_image

NAMES = ["empty", "tayassu pecari", "dasyprocta punctata", "zzz unmapped beast"]
# (wilds split, label, location): train at locations 0-1, ID val/test there too, OOD at locations 2-3.
PLAN = ([("train", y, y % 2) for y in (0, 1, 1, 1, 2, 2, 3)] + [("id_val", 1, 0), ("id_val", 2, 1)]
        + [("id_test", 0, 1), ("id_test", 3, 0)] + [("val", 2, 2), ("val", 1, 2)]
        + [("test", 3, 3), ("test", 0, 3), ("test", 1, 3)])


def _iwildcam_root(tmp_path):
    root = tmp_path / "wilds"
    data = root / "iwildcam_v2.0"
    (data / "train").mkdir(parents=True)
    (data / "RELEASE_v2.0.txt").write_text("v2.0\n")
    with open(data / "categories.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["y", "category_id", "name"])
        for y, name in enumerate(NAMES):
            w.writerow([y, 100 + y, name])
    with open(data / "metadata.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["", "split", "location", "image_id", "filename", "y", "location_remapped",
                    "sequence_remapped", "datetime"])
        for i, (split, y, loc) in enumerate(PLAN):
            name = f"img{i:03d}.jpg"
            w.writerow([i, split, 500 + loc, f"id{i}", name, y, loc, i, f"2013-06-0{1 + i % 9} 10:1{i % 10}:00.000"])
            Image.fromarray(np.full((5, 7, 3), 30 * y, np.uint8)).save(data / "train" / name)
    return root


def test_iwildcam_splits_domains_names(tmp_path):
    root = _iwildcam_root(tmp_path)
    table = load_rows(DatasetConfig(name="iwildcam", root=str(root)))
    assert table.schema == CANONICAL_SCHEMA and table.num_rows == len(PLAN)
    rows = table.to_pylist()
    expect_split = {"train": "train", "id_val": "val", "id_test": "test", "val": "val_ood", "test": "test_ood"}
    for row, (split, y, loc) in zip(rows, PLAN):
        assert row["split"] == expect_split[split]
        assert row["label"] == y and row["class_name"] == NAMES[y]
        assert row["domain"] == f"location_{loc}"
        img = np.asarray(load_image(path=row["path"], root=str(root)))
        assert img.shape == (5, 7, 3) and img[0, 0, 0] == 30 * y
    ood_domains = {r["domain"] for r in rows if r["split"].endswith("_ood")}
    id_domains = {r["domain"] for r in rows if r["split"] in ("train", "val", "test")}
    assert ood_domains == {"location_2", "location_3"} and not ood_domains & id_domains
    train = [r["label"] for r in rows if r["split"] == "train"]
    assert class_groups(train, few_max=2, many_min=3) == {0: "few", 1: "many", 2: "medium", 3: "few"}


def test_iwildcam_embed_images(tmp_path):
    root = _iwildcam_root(tmp_path)
    table = load_rows(DatasetConfig(name="iwildcam", root=str(root), embed_images=True))
    assert table["image"].null_count == 0
    assert np.asarray(load_image(table["image"][1].as_py()))[0, 0, 0] == 30


def test_iwildcam_common_names():
    assert common_name("tayassu pecari") == "white-lipped peccary"
    assert common_name("Tayassu Pecari") == "white-lipped peccary"
    assert common_name("zzz unmapped beast") == "zzz unmapped beast"
    shipped = json.loads(COMMON_NAMES_PATH.read_text())
    assert len(shipped) > 150 and all(k == k.lower() and v for k, v in shipped.items())


def test_iwildcam_malformed(tmp_path):
    root = _iwildcam_root(tmp_path)
    data = root / "iwildcam_v2.0"
    text = (data / "metadata.csv").read_text()
    (data / "metadata.csv").write_text(text.replace(",datetime", ",when", 1))
    with pytest.raises(DatasetError, match=r"metadata.csv: missing columns \['datetime'\]"):
        load_rows(DatasetConfig(name="iwildcam", root=str(root)))
    (data / "metadata.csv").write_text(text.replace("id_val", "holdout", 1))
    with pytest.raises(DatasetError, match=r"metadata.csv: WILDS could not read it \(KeyError"):
        load_rows(DatasetConfig(name="iwildcam", root=str(root)))
    (data / "metadata.csv").write_text(text)
    (data / "categories.csv").write_text("y,category_id,name\n0,100,empty\n1,101,tayassu pecari\n")
    with pytest.raises(DatasetError, match=r"categories.csv: no name for labels \[2, 3\]"):
        load_rows(DatasetConfig(name="iwildcam", root=str(root)))
    os.remove(data / "RELEASE_v2.0.txt")
    with pytest.raises(DatasetError, match=r"RELEASE_v2.0.txt: file not found; expected the WILDS"):
        load_rows(DatasetConfig(name="iwildcam", root=str(root)))


def test_macro_f1_matches_wilds_metric():
    from sklearn.metrics import f1_score
    from wilds.common.metrics.all_metrics import F1

    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 12, 300)
    y_pred = np.where(rng.random(300) < 0.6, y_true, rng.integers(0, 15, 300))  # also predicts absent labels
    wilds = F1(average="macro").compute(torch.tensor(y_pred), torch.tensor(y_true))
    ours = macro_f1(y_true, y_pred)
    assert ours == pytest.approx(float(next(iter(wilds.values()))), abs=1e-6)  # WILDS returns float32
    assert ours == pytest.approx(f1_score(y_true, y_pred, average="macro", labels=np.unique(y_true)), abs=1e-12)
    assert macro_f1([0, 0, 1], [0, 0, 1]) == 1.0
    assert macro_f1([0, 1], [1, 0]) == 0.0
    assert macro_f1([0, 0, 1, 1], [0, 0, 0, 1]) == pytest.approx((0.8 + 2 / 3) / 2)
    with pytest.raises(ValueError, match="y_true has 2 labels, y_pred 1"):
        macro_f1([0, 1], [0])
