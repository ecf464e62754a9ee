"""The toy world's camera looks: deterministic per image, far from the world's look, readable digits."""

from __future__ import annotations

import numpy as np
import pytest

from discl_ray.config import load_config
from discl_ray.data import toy
from discl_ray.data.looks import apply_look, random_look


def test_paper_look_is_deterministic_per_key_and_changes_the_domain():
    x, _ = toy.task_arrays(0, 32)
    a = apply_look(x[:6], "paper", 3, keys=[10, 11, 12, 13, 14, 15])
    b = apply_look(x[[2, 3]], "paper", 3, keys=[12, 13])
    assert np.array_equal(a[2:4], b)                     # same key → same pixels, whatever the batch
    assert a.dtype == np.uint8 and a.shape == x[:6].shape
    # world digits are white on black; paper is bright with dark ink: the background corner flips brightness
    assert x[:6, 2, 2].mean() < 40 and a[:, 2, 2].mean() > 120
    # the ink still follows the digit: stroke pixels are darker than background pixels in every image
    for src, im in zip(x[:6], a):
        stroke = src[..., 0] > 160
        assert im[stroke].mean() < im[~stroke].mean() - 40
    assert np.array_equal(apply_look(x[:3], "clean", 0), x[:3])
    with pytest.raises(ValueError, match="choose from: clean, blueprint, paper"):
        apply_look(x[:1], "sepia", 0)


def test_blueprint_look_keeps_the_polarity_and_changes_the_colours():
    x, _ = toy.task_arrays(0, 32)
    a = apply_look(x[:6], "blueprint", 3, keys=[10, 11, 12, 13, 14, 15])
    assert np.array_equal(a[2:4], apply_look(x[[2, 3]], "blueprint", 3, keys=[12, 13]))
    assert a.dtype == np.uint8 and a.shape == x[:6].shape
    for src, im in zip(x[:6], a):
        stroke, ground = src[..., 0] > 160, src[..., 0] < 20
        assert im[stroke].mean() > im[ground].mean() + 60          # light lines on a darker sheet, as in the world
        r, g, b = im[ground].reshape(-1, 3).mean(0)
        assert b > r + 60 and b > 90                               # … but the sheet is blue, never the world's black


def test_random_look_covers_colours():
    x, _ = toy.task_arrays(0, 32)
    outs = np.stack([random_look(x[0], np.random.default_rng(i)) for i in range(20)])
    assert outs.reshape(20, -1, 3).mean(1).std(0).min() > 30     # background colour varies per draw and channel


@pytest.mark.parametrize("look", ["blueprint", "paper"])
def test_digits_lt_with_a_look_keeps_ids_and_labels(look):
    clean = toy.load_digits_lt(load_config("configs/toy/digits_lt.yaml").dataset)
    gap = toy.load_digits_lt(load_config("configs/toy/digits_lt.yaml", [f"dataset.toy.look={look}"]).dataset)
    assert clean["image_id"].to_pylist() == gap["image_id"].to_pylist()
    assert clean["label"].to_pylist() == gap["label"].to_pylist()
    assert clean["image"][0].as_py() != gap["image"][0].as_py()
    lq = toy.load_digits_lq(load_config("configs/toy/digits_lq.yaml", [f"dataset.toy.look={look}"]).dataset)
    assert lq.num_rows == toy.load_digits_lq(load_config("configs/toy/digits_lq.yaml").dataset).num_rows
