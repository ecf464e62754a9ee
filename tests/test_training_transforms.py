"""The input pipeline per backbone on real photographs (scikit-learn's bundled JPEGs): eval output equals the
reference transform (torchvision's ResNet recipe, open_clip's own preprocess), training augmentation is
random but seeded, and the cached and the Ray Data streamed paths give the same eval images."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from discl_ray.config import load_config
from discl_ray.training.images import open_images
from discl_ray.training.transforms import IMAGENET_MEAN, IMAGENET_STD, build_pipeline


@pytest.fixture(scope="module")
def photos():
    from sklearn.datasets import load_sample_image

    return [Image.fromarray(load_sample_image(name)) for name in ("china.jpg", "flower.jpg")]   # 640×427


def cfg_for(*extra):
    return load_config(None, ["dataset.image_size=32", *extra])


def test_resnet_eval_is_resize_256_center_crop_224_imagenet_norm(photos):
    from torchvision import transforms as T

    pipe = build_pipeline(cfg_for("training.backbone=resnet10", "training.image_size=224"))
    assert (pipe.kind, pipe.size, pipe.resize) == ("resnet", 224, 256)
    ref = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    for img in photos:
        out = pipe(img, train=False)
        assert out.shape == (3, 224, 224)
        assert torch.allclose(out, ref(img), atol=1e-5)
        # The cache holds the base image: shorter side 256, aspect kept.
        base = pipe.base(img)
        assert min(base.shape[:2]) == 256 and base.shape[1] > base.shape[0]


def test_resnet_train_augmentation_is_random_seeded_and_configurable(photos):
    pipe = build_pipeline(cfg_for("training.backbone=resnet10", "training.image_size=224"))
    img = photos[0]
    a, b, c = pipe(img, train=True, seed=1), pipe(img, train=True, seed=1), pipe(img, train=True, seed=2)
    assert a.shape == (3, 224, 224)
    assert torch.equal(a, b)                       # a re-run epoch repeats its augmentation
    assert not torch.equal(a, c)                   # different crops/flips/jitter per seed
    assert not torch.allclose(a, pipe(img, train=False), atol=0.1)
    # Colour jitter is part of the recipe and can be switched off: same crop, different colours.
    plain = build_pipeline(cfg_for("training.backbone=resnet10", "training.image_size=224",
                                   "training.color_jitter=0"))
    p1 = plain(img, train=True, seed=1)
    assert p1.shape == a.shape and not torch.allclose(p1, a, atol=1e-3)
    # Normalised with ImageNet statistics: roughly zero-centred, not in [0, 1].
    assert p1.min() < -0.5 and p1.max() > 1.0
    with pytest.raises(Exception, match="crop_scale"):
        cfg_for("training.crop_scale=[0.5,0.1]")


def test_clip_pipeline_is_the_models_own_preprocess(photos, tmp_path):
    import open_clip

    arch = {"embed_dim": 16, "vision_cfg": {"image_size": 48, "layers": 1, "width": 32, "head_width": 16,
                                            "patch_size": 8},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    path = tmp_path / "discl-tf-clip.json"
    path.write_text(json.dumps(arch))
    open_clip.add_model_config(str(path))
    # Non-default statistics prove the pipeline reads the model's own preprocess configuration.
    model, train_ref, eval_ref = open_clip.create_model_and_transforms(
        "discl-tf-clip", pretrained=None, image_mean=(0.3, 0.4, 0.5), image_std=(0.2, 0.25, 0.3))
    pipe = build_pipeline(cfg_for("training.backbone=clip"), model)
    assert (pipe.kind, pipe.size) == ("clip", 48) and pipe.mean == (0.3, 0.4, 0.5)
    for img in photos:
        assert torch.allclose(pipe(img, train=False), eval_ref(img), atol=1e-5)
    torch.manual_seed(5)
    ref = train_ref(photos[1])
    ours = pipe(photos[1], train=True, seed=5)
    assert ours.shape == ref.shape == (3, 48, 48)
    assert torch.equal(ours, pipe(photos[1], train=True, seed=5))


def test_toy_pipeline_keeps_the_square_resize_in_unit_range(photos):
    pipe = build_pipeline(cfg_for("training.backbone=small_cnn", "training.image_size=32"))
    out = pipe(photos[0], train=True, seed=3)
    ref = torch.from_numpy(np.array(photos[0].resize((32, 32), Image.BILINEAR))).permute(2, 0, 1).float() / 255
    assert torch.equal(out, ref) and torch.equal(out, pipe(photos[0], train=False))


def test_streamed_and_cached_images_agree(ray_local, run_root, photos):
    """The same rows through the in-memory cache and through Ray Data (read with the ids pushed down,
    decode + augment in map_batches): identical eval tensors; an undecodable image is dropped and counted."""
    import pyarrow as pa

    from discl_ray.runtime.io import png_bytes
    from discl_ray.training import data as D
    from discl_ray.training.fixture import write_fixture

    cfg = load_config(None, [f"run_root={run_root}", "experiment=tf", "dataset.image_size=16", "mining.few_max=10",
                             "mining.many_min=30", "generation.lams=[0.0,0.5]", "training.lams=[0.0,0.5,1.0]",
                             "scoring.threshold=0.3", "training.backbone=resnet10", "training.image_size=24",
                             "training.image_cache_mb=0"])
    write_fixture(cfg, corrupt=1)
    # Swap two rows' images for real photographs (non-square), so crops and resizes matter.
    from discl_ray.runtime.cluster import RunPaths
    from discl_ray.runtime.io import read_parquet_dir, replace_parquet_dir

    ds_dir = RunPaths.from_config(cfg).dataset
    table = read_parquet_dir(ds_dir)
    images = table["image"].to_pylist()
    ids = table["image_id"].to_pylist()
    for k, name in ((ids.index("val-0-0000"), 0), (ids.index("val-1-0000"), 1)):
        images[k] = png_bytes(np.asarray(photos[name].resize((64, 43))))
    replace_parquet_dir(table.set_column(table.schema.get_field_index("image"), "image",
                                         pa.array(images, pa.binary())), ds_dir, prefix="rows")
    pipe = build_pipeline(cfg)
    streamed_pool, streamed = open_images(cfg, D.load_pool(cfg), pipe)
    assert type(streamed).__name__ == "StreamedImages"
    cached_pool, cached = open_images(cfg.model_copy(update={"training": cfg.training.model_copy(
        update={"image_cache_mb": 64})}), D.load_pool(cfg), pipe)
    assert type(cached).__name__ == "CachedImages" and cached_pool.n_bad_images == 1

    def by_id(pool, images, rows):
        out = {}
        for x, r in images.eval_batches(rows, 8):
            out.update({pool.image_id[i]: x[k] for k, i in enumerate(r)})
        return out

    a = by_id(streamed_pool, streamed, streamed_pool.split_idx("val"))
    b = by_id(cached_pool, cached, cached_pool.split_idx("val"))
    assert set(a) == set(b) and len(a) == 20
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert a["val-0-0000"].shape == (3, 24, 24)
    # Training rows through the stream: every planned row once, the corrupt one dropped and counted.
    train = streamed_pool.train_real
    read = [i for _x, r in streamed.stream(train, 16, True, 7) for i in r]
    assert sorted(read) == sorted(set(read)) and len(read) == len(train) - 1
    assert streamed.n_bad_images == 1
