"""Balanced Softmax formula, FLYP symmetric InfoNCE on a tiny real open_clip model, WiSE-FT endpoints."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from discl_ray.training.losses import (
    balanced_softmax_loss,
    classification_loss,
    flyp_loss,
    log_class_prior,
    wise_interpolate,
)
from discl_ray.training.models import ClipClassifier, SmallCNN, resnet10

torch.set_num_threads(1)


def test_balanced_softmax_matches_formula():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
    labels = torch.tensor([0, 2])
    counts = [90, 9, 1]
    prior = log_class_prior(counts)
    assert torch.allclose(prior, torch.log(torch.tensor([0.9, 0.09, 0.01])))
    expected = 0.0
    for z, y in zip(logits.tolist(), labels.tolist()):
        adj = [zi + math.log(c / 100) for zi, c in zip(z, counts)]
        expected += -(adj[y] - math.log(sum(math.exp(a) for a in adj)))
    got = balanced_softmax_loss(logits, labels, prior)
    assert got.item() == pytest.approx(expected / 2, rel=1e-6)
    # With a uniform prior it is plain cross-entropy; a tail label costs more under the skewed prior.
    assert balanced_softmax_loss(logits, labels, log_class_prior([5, 5, 5])).item() == pytest.approx(
        F.cross_entropy(logits, labels).item(), rel=1e-6)
    assert got.item() > F.cross_entropy(logits, labels).item()
    with pytest.raises(ValueError, match="needs the log class prior"):
        classification_loss("balanced_softmax", logits, labels)
    with pytest.raises(ValueError, match="shape"):
        balanced_softmax_loss(logits, labels, prior[:2])


def test_flyp_loss_is_symmetric_infonce():
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    scale = 10.0
    li = F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).t() * scale
    target = torch.arange(6)
    manual = 0.5 * (F.cross_entropy(li, target) + F.cross_entropy(li.t(), target))
    assert flyp_loss(img, txt, scale).item() == pytest.approx(manual.item(), rel=1e-6)
    assert flyp_loss(img, txt, scale).item() == pytest.approx(flyp_loss(txt, img, scale).item(), rel=1e-6)
    # Perfectly aligned pairs at a high temperature give a near-zero loss; shuffled pairs a large one.
    assert flyp_loss(img, img, 100.0).item() < 1e-3
    assert flyp_loss(img, img[torch.tensor([1, 0, 3, 2, 5, 4])], 100.0).item() > 1.0


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A real open_clip model from a custom tiny architecture (random weights, no download)."""
    import open_clip

    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "head_width": 16,
                                           "patch_size": 8},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    d = tmp_path_factory.mktemp("clipcfg")
    (d / "discl-test-tiny-clip.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(str(d / "discl-test-tiny-clip.json"))
    torch.manual_seed(0)
    model = open_clip.create_model("discl-test-tiny-clip", pretrained=None)
    tok = open_clip.get_tokenizer("discl-test-tiny-clip")
    return model, tok


def test_flyp_on_open_clip_classifier_trains_both_towers(tiny_clip):
    model, tok = tiny_clip
    clf = ClipClassifier(model, tok([f"a photo of the digit {n}" for n in ("zero", "one", "two")]))
    x = torch.rand(4, 3, 16, 16)
    y = torch.tensor([0, 1, 2, 1])
    logits = clf(x)
    assert logits.shape == (4, 3)
    img, txt, scale = clf(x, flyp_labels=y)
    assert img.shape == txt.shape == (4, 16)
    assert torch.allclose(txt[1], txt[3])             # same class -> same caption embedding
    loss = flyp_loss(img, txt, scale)
    loss.backward()
    vis = next(model.visual.parameters()).grad
    text = model.token_embedding.weight.grad
    assert vis is not None and vis.abs().sum() > 0 and text is not None and text.abs().sum() > 0


def test_wise_ft_endpoints_and_midpoint():
    torch.manual_seed(1)
    a, b = SmallCNN(3), SmallCNN(3)
    with torch.no_grad():
        for p in b.parameters():
            p.add_(1.0)
        b.features[0][1].num_batches_tracked.fill_(7)
    za, fb = a.state_dict(), b.state_dict()
    w0, w1, wh = (wise_interpolate(za, fb, al) for al in (0.0, 1.0, 0.5))
    ints = [k for k in za if not za[k].is_floating_point()]
    assert ints and not torch.equal(za[ints[0]], fb[ints[0]])       # the integer buffers really differ
    for k in za:
        if za[k].is_floating_point():
            assert torch.equal(w0[k], za[k]) and torch.equal(w1[k], fb[k])
            assert torch.allclose(wh[k], (za[k] + fb[k]) / 2)
        else:
            # Integer buffers (BatchNorm's num_batches_tracked) are not interpolated: at every α they come
            # from the fine-tuned side, unchanged in dtype.
            for w in (w0, wh, w1):
                assert torch.equal(w[k], fb[k]) and w[k].dtype == fb[k].dtype
    with pytest.raises(ValueError, match="alpha"):
        wise_interpolate(za, fb, 1.5)
    with pytest.raises(ValueError, match="differ in keys"):
        wise_interpolate(za, resnet10(3).state_dict(), 0.5)


def test_backbone_shapes():
    torch.manual_seed(0)
    assert SmallCNN(10)(torch.rand(2, 3, 16, 16)).shape == (2, 10)
    net = resnet10(7)
    assert net(torch.rand(2, 3, 32, 32)).shape == (2, 7)
    assert sum(1 for m in net.modules() if type(m).__name__ == "BasicBlock") == 4
