"""Toy-world datasets: split sizes, determinism, the long tail of digits-LT and the domains of digits-LQ."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from discl_ray.config import load_config
from discl_ray.data import CANONICAL_SCHEMA, load_rows
from discl_ray.data.toy import corrupt, lt_counts, world_arrays
from discl_ray.runtime.io import load_image


def _rows(*overrides):
    return load_rows(load_config(overrides=list(overrides)).dataset)


def test_world_split_is_half_and_disjoint_from_tasks():
    world = _rows("dataset.name=digits_world")
    lt = _rows("dataset.name=digits_lt")
    assert world.schema == CANONICAL_SCHEMA
    assert 880 <= world.num_rows <= 910
    assert set(world["split"].to_pylist()) == {"world"}
    assert not set(world["image_id"].to_pylist()) & set(lt["image_id"].to_pylist())
    x, y = world_arrays()
    assert x.shape == (world.num_rows, 32, 32, 3) and x.dtype == np.uint8
    assert sorted(Counter(y.tolist()).values())[0] >= 85


def test_digits_lt_long_tail_and_balanced_eval():
    t = _rows("dataset.name=digits_lt", "dataset.imbalance_ratio=25", "dataset.toy.n_max=50")
    by_split = Counter(t["split"].to_pylist())
    counts = Counter(lbl for lbl, s in zip(t["label"].to_pylist(), t["split"].to_pylist()) if s == "train")
    expected = lt_counts(50, 25)
    assert [counts[c] for c in range(10)] == expected
    assert expected[0] == 50 and expected[-1] == 2
    assert expected == sorted(expected, reverse=True)
    assert by_split["test"] == 300 and by_split["val"] == 50
    for split in ("test", "val"):
        per = Counter(lbl for lbl, s in zip(t["label"].to_pylist(), t["split"].to_pylist()) if s == split)
        assert len(set(per.values())) == 1
    assert len(set(t["image_id"].to_pylist())) == t.num_rows


def test_digits_lt_is_deterministic_by_seed():
    a, b = _rows("dataset.name=digits_lt"), _rows("dataset.name=digits_lt")
    c = _rows("dataset.name=digits_lt", "dataset.seed=1")
    assert a.equals(b)
    assert a["image_id"].to_pylist() != c["image_id"].to_pylist()


def test_digits_lq_domains():
    t = _rows("dataset.name=digits_lq")
    doms = {s: set() for s in ("train", "val", "test", "test_ood")}
    for s, d in zip(t["split"].to_pylist(), t["domain"].to_pylist()):
        doms[s].add(d)
    assert doms["train"] == {"blur", "noise", "occlusion"}
    assert doms["val"] <= doms["train"] and doms["test"] <= doms["train"]
    assert doms["test_ood"] == {"low_contrast", "pixelate"}
    img = load_image(t["image"][0].as_py())
    assert img.size == (32, 32) and img.mode == "RGB"


def test_corruptions_change_images_and_bad_style_fails():
    x, _ = world_arrays()
    rng = np.random.default_rng(0)
    for style in ("blur", "noise", "occlusion", "low_contrast", "pixelate"):
        out = corrupt(x[0], style, 0.6, rng)
        assert out.shape == x[0].shape and out.dtype == np.uint8
        assert np.abs(out.astype(int) - x[0].astype(int)).mean() > 1.0, style
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt(x[0], "fog", 0.5, rng)


def test_too_large_head_is_a_clear_error():
    with pytest.raises(ValueError, match="n_max"):
        _rows("dataset.name=digits_lt", "dataset.toy.n_max=80")
