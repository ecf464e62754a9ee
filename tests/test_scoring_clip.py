"""The shared open_clip loader, embedding helpers, in-process scoring and the report functions (no Ray)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
import torch
from clip_fixtures import TINY_CLIP, digit_image, make_tiny_clip, make_toy_clip_cache
from PIL import Image

from discl_ray.config import ScoringConfig
from discl_ray.models.clip import (
    clip_model_id,
    encode_images,
    encode_texts,
    load_clip,
    preprocess_images,
    zero_shot_probs,
)
from discl_ray.runtime.io import png_bytes
from discl_ray.scoring.embed import clip_score, score_in_process
from discl_ray.scoring.report import filter_scores, keep_mask, plot_histograms, summarize

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    json_path, weights = make_tiny_clip(tmp_path_factory.mktemp("clip"))
    cfg = ScoringConfig(model=TINY_CLIP, model_config_path=str(json_path), pretrained=str(weights))
    model, preprocess, tokenizer = load_clip(cfg, tmp_path_factory.mktemp("cache"))
    return cfg, model, preprocess, tokenizer


def _images(preprocess, n):
    return preprocess_images(preprocess, [Image.fromarray(digit_image(i % 10, i)) for i in range(n)])


def test_embeddings_are_normalised_and_zero_shot_is_a_softmax(tiny):
    _, model, preprocess, tokenizer = tiny
    images = _images(preprocess, 5)
    assert images.shape == (5, 3, 16, 16)
    img, txt = encode_images(model, images), encode_texts(model, tokenizer, ["a photo of one", "a photo of two"])
    assert img.shape == (5, 16) and txt.shape == (2, 16) and img.dtype == torch.float32
    assert torch.allclose(img.norm(dim=-1), torch.ones(5), atol=1e-5)
    assert torch.allclose(txt.norm(dim=-1), torch.ones(2), atol=1e-5)
    prompts = ["a photo of zero", "a photo of one", "a photo of two"]
    probs = zero_shot_probs(model, tokenizer, images, prompts)
    assert probs.shape == (5, 3)
    assert torch.allclose(probs.sum(-1), torch.ones(5), atol=1e-5)
    manual = (model.logit_scale.exp() * img @ encode_texts(model, tokenizer, prompts).T).softmax(-1)
    assert torch.allclose(probs, manual, atol=1e-5)


def test_load_clip_is_deterministic_from_the_weights_file(tiny, tmp_path):
    cfg, model, preprocess, _ = tiny
    again, _, _ = load_clip(cfg, tmp_path)
    images = _images(preprocess, 3)
    assert torch.equal(encode_images(model, images), encode_images(again, images))
    assert clip_model_id(cfg) == f"{TINY_CLIP}/{TINY_CLIP}.pt"


def test_toy_clip_resolves_to_the_toyworld_cache(tmp_path):
    with pytest.raises(FileNotFoundError, match="discl world"):
        load_clip(ScoringConfig(model="toy-clip"), tmp_path)
    make_toy_clip_cache(tmp_path)
    model, preprocess, tokenizer = load_clip(ScoringConfig(model="toy-clip"), tmp_path)
    assert encode_texts(model, tokenizer, ["a photo of the digit seven"]).shape == (1, 16)
    assert clip_model_id(ScoringConfig(model="toy-clip"), tmp_path) == "toy-clip/toy-clip.pt"


def test_unknown_architecture_names_the_field(tmp_path):
    json_path, weights = make_tiny_clip(tmp_path)
    with pytest.raises(ValueError, match="scoring.model 'other-clip'.*registers: \\['tiny-clip'\\]"):
        load_clip(ScoringConfig(model="other-clip", model_config_path=str(json_path)), tmp_path)
    with pytest.raises(ValueError, match="not an open_clip architecture"):
        load_clip(ScoringConfig(model="no-such-arch", pretrained=None), tmp_path)


def _spectrum(n_sources=3, per_source=4):
    sources = {f"src{i}": png_bytes(digit_image(i, 0)) for i in range(n_sources)}
    rows = []
    for i, sid in enumerate(sources):
        for k in range(per_source):
            img = sources[sid] if k == 0 else png_bytes(digit_image(i, 10 + k))
            rows.append({"image_id": f"{sid}|l{k / 10:.3f}|s0", "source_image_id": sid, "label": i % 2,
                         "lam": k / 10, "seed": 0, "image": img})
    return pa.Table.from_pylist(rows), pa.table({"image_id": list(sources), "image": list(sources.values()),
                                                 "path": pa.nulls(n_sources, pa.string())})


class _Counter:
    """Counts how many texts / images reach the encoder (wraps the real methods)."""

    def __init__(self, model):
        self.texts = self.images = 0
        self._text, self._image = model.encode_text, model.encode_image
        model.encode_text, model.encode_image = self.encode_text, self.encode_image

    def encode_text(self, tokens, normalize=False):
        self.texts += tokens.shape[0]
        return self._text(tokens, normalize=normalize)

    def encode_image(self, images, normalize=False):
        self.images += images.shape[0]
        return self._image(images, normalize=normalize)


def test_references_are_encoded_once_and_scores_match_a_direct_computation(tmp_path):
    json_path, weights = make_tiny_clip(tmp_path)
    cfg = ScoringConfig(model=TINY_CLIP, model_config_path=str(json_path), pretrained=str(weights))
    model, preprocess, tokenizer = load_clip(cfg, tmp_path)
    spectrum, sources = _spectrum(n_sources=3, per_source=4)
    prompts = {0: "a photo of zero", 1: "a photo of one"}
    counter = _Counter(model)
    out = score_in_process(model, preprocess, tokenizer, spectrum, sources, prompts, "tiny", batch_size=5)
    assert counter.texts == 2                      # one per class prompt, not one per synthetic row
    assert counter.images == 3 + 12                # one per source (though split over batches) + one per row
    assert out.num_rows == 12 and out["error"].null_count == 12
    text_cos, image_cos = np.array(out["clip_text_cos"]), np.array(out["clip_image_cos"])
    assert np.all((text_cos >= -1) & (text_cos <= 1)) and np.all((image_cos >= -1) & (image_cos <= 1))
    # k = 0 rows reuse the source's own bytes: image–image cosine 1.
    self_rows = np.array([i.endswith("l0.000|s0") for i in out["image_id"].to_pylist()])
    assert np.allclose(image_cos[self_rows], 1.0, atol=1e-5)
    assert not np.allclose(image_cos[~self_rows], 1.0, atol=1e-3)
    # Direct, per-row computation of the same cosines.
    imgs = preprocess_images(preprocess, [Image.open(__import__("io").BytesIO(b)).convert("RGB")
                                          for b in spectrum["image"].to_pylist()])
    emb = encode_images(model, imgs)
    txt = encode_texts(model, tokenizer, [prompts[lbl] for lbl in spectrum["label"].to_pylist()])
    assert np.allclose(text_cos, (emb * txt).sum(-1).numpy(), atol=1e-5)
    assert np.allclose(np.array(out["clip_score"]), 2.5 * np.maximum(text_cos, 0))


def test_unreadable_images_become_errors_not_a_crash(tiny):
    cfg, model, preprocess, tokenizer = tiny
    spectrum, sources = _spectrum(n_sources=2, per_source=2)
    spectrum = spectrum.set_column(5, "image", pa.array([b"not a png", *spectrum["image"].to_pylist()[1:]]))
    sources = sources.set_column(1, "image", pa.array([sources["image"][0].as_py(), b"broken source"]))
    out = score_in_process(model, preprocess, tokenizer, spectrum, sources, {0: "p", 1: "q"}, "m", batch_size=3)
    assert out["error"][0].as_py().startswith("cannot decode image")
    assert np.isnan(out["clip_text_cos"][0].as_py()) and out["error"].null_count == 3
    # src1 cannot be decoded: its rows keep their text score (the filter) but get no image–image cosine.
    assert out["source_error"].to_pylist()[2:] == [out["source_error"][2].as_py()] * 2
    assert "cannot decode image" in out["source_error"][2].as_py()
    assert np.isnan(out["clip_image_cos"].to_pylist()[2:]).all()
    assert not np.isnan(out["clip_text_cos"].to_pylist()[1:]).any()


def test_threshold_filter_is_inclusive_and_exact():
    cos = [0.2999999, 0.3, 0.30000001, float("nan"), -0.5]
    scores = pa.table({"clip_text_cos": pa.array(cos, pa.float64()), "lam": [0.0, 0.0, 0.5, 0.5, 0.5],
                       "label": [0, 1, 0, 1, 1], "clip_image_cos": [0.1, 0.2, 0.3, float("nan"), 0.4]})
    assert keep_mask(scores, 0.3).to_pylist() == [False, True, True, False, False]
    assert filter_scores(scores, np.nextafter(0.3, 1.0)).num_rows == 1
    assert clip_score(np.array([-0.5, 0.0, 0.3])).tolist() == [0.0, 0.0, 2.5 * 0.3]
    summary = summarize(scores, 0.3, "m", {0: "zero", 1: "one"}, n_errors=2)
    assert (summary["total"], summary["kept"], summary["errors"]) == (5, 2, 2)
    assert (summary["per_lam"]["0.000"]["kept"], summary["per_lam"]["0.500"]["kept"]) == (1, 1)
    assert (summary["per_lam"]["0.000"]["total"], summary["per_lam"]["0.500"]["total"]) == (2, 3)
    assert summary["per_class"]["1"] == {"class_name": "one", "total": 3, "kept": 1, "kept_frac": 1 / 3}
    assert summary["per_class"]["0"] == {"class_name": "zero", "total": 2, "kept": 1, "kept_frac": 1 / 2}
    # summary.json is written with json.dumps: the summary must survive a round trip unchanged (no NaN
    # turned into an invalid token, no numpy scalars).
    assert json.loads(json.dumps(summary, allow_nan=False)) == summary


def test_histograms_are_pngs(tmp_path):
    rng = np.random.default_rng(0)
    scores = pa.table({"lam": np.repeat([0.0, 0.1, 0.3, 0.5, 0.7], 20), "clip_text_cos": rng.uniform(-1, 1, 100),
                       "clip_image_cos": rng.uniform(0, 1, 100)})
    paths = plot_histograms(scores, tmp_path, threshold=0.3)
    assert [p.name for p in paths] == ["hist_clip_text_cos.png", "hist_clip_image_cos.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and Image.open(p).size[0] > 300
