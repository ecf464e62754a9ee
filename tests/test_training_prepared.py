"""``training.prepared_images`` (issue 26): the real images written once at the training resolution by a Ray Data
job, reused while current, read by the stream instead of the originals; a stale or missing copy is refused."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from discl_ray.config import load_config
from discl_ray.errors import MissingInput
from discl_ray.runtime.cluster import RunPaths
from discl_ray.training import data as D
from discl_ray.training.decode import decode_base
from discl_ray.training.fixture import write_fixture
from discl_ray.training.images import StreamedImages, open_images
from discl_ray.training.prepared import MANIFEST, prepare_real_images
from discl_ray.training.transforms import build_pipeline


def prep_config(run_root, *extra):
    return load_config(None, [
        f"run_root={run_root}", "experiment=prep", "dataset.image_size=24", "mining.few_max=10",
        "mining.many_min=30", "generation.lams=[0.0,0.5]", "training.lams=[0.0,0.5,1.0]", "scoring.threshold=0.2",
        "training.backbone=small_cnn", "training.strategy=diverse_to_specific", "training.epochs=2",
        "training.curriculum_epochs=1", "training.batch_size=16", "training.image_cache_mb=0",
        "training.image_size=16", "training.prepared_images=true", "tracking.enabled=false", *extra])


def test_prepared_copy_is_written_once_reused_and_streamed(ray_local, run_root):
    cfg = prep_config(run_root)
    write_fixture(cfg, train_counts=(20, 20, 5), val_per_class=4, test_per_class=4, size=24, corrupt=1)
    paths = RunPaths.from_config(cfg)
    pipe = build_pipeline(cfg)
    # The workers refuse to stream without the copy (the driver writes it; a worker never does).
    with pytest.raises(MissingInput, match="training.prepared_images"):
        open_images(cfg, D.load_pool(cfg), pipe)

    uri = prepare_real_images(cfg, paths)
    out = Path(uri)
    assert out.name == "toy-16" and out.parent.name == "prepared"
    manifest = json.loads((out / MANIFEST).read_text())
    src = pq.read_table(paths.dataset).sort_by("image_id")
    dst = pq.read_table(uri).sort_by("image_id")
    assert manifest["rows"] == src.num_rows == dst.num_rows and manifest["bad"] == 1
    # Every column but the image is kept; each decodable image is a 16² JPEG whose pixels are the original's
    # base image up to JPEG's loss; the undecodable one keeps its bytes (the stream drops and counts it).
    for col in ("image_id", "label", "class_name", "split", "domain"):
        assert dst[col].equals(src[col]), col
    diffs, kept_bad = [], 0
    for a, b in zip(src["image"].to_pylist(), dst["image"].to_pylist()):
        ref = decode_base(pipe, a, None, None)
        if ref is None:
            assert b == a
            kept_bad += 1
            continue
        img = Image.open(io.BytesIO(b))
        assert img.format == "JPEG" and img.size == (16, 16)
        diffs.append(np.abs(decode_base(pipe, b, None, None).astype(int) - ref.astype(int)).mean())
    assert kept_bad == 1 and max(diffs) < 6, max(diffs)      # grey levels (noisy 24² → 16² images)
    assert manifest["bytes_out"] < manifest["bytes_in"]

    # Current: a second call writes nothing.
    stamp = (out / MANIFEST).stat().st_mtime_ns
    files = {f.name: f.stat().st_mtime_ns for f in out.glob("*.parquet")}
    assert prepare_real_images(cfg, paths) == uri
    assert (out / MANIFEST).stat().st_mtime_ns == stamp
    assert {f.name: f.stat().st_mtime_ns for f in out.glob("*.parquet")} == files

    # The stream reads the real rows from the copy, every one of them (the bad one dropped and counted).
    pool, images = open_images(cfg, D.load_pool(cfg), pipe)
    assert isinstance(images, StreamedImages)
    real_units = [u for u in images.units if u[0] == "real"]
    assert real_units and all(u[1].startswith(uri) for u in real_units)
    train = pool.split_idx("train")
    got = np.concatenate([r for _, r in images.eval_batches(train, 8)])
    assert len(got) == len(train) - 1 and images.n_bad_images == 1

    # Another training resolution needs its own copy: the workers refuse the 16² one.
    cfg8 = prep_config(run_root, "training.image_size=8")
    with pytest.raises(MissingInput, match="no current prepared copy"):
        open_images(cfg8, D.load_pool(cfg8), build_pipeline(cfg8))


def test_discl_train_prepares_the_copy_before_its_workers_stream(ray_local, run_root):
    from discl_ray.training.trainer import fit

    cfg = prep_config(run_root, "training.num_workers=1", "training.cpus_per_worker=0.5")
    write_fixture(cfg, train_counts=(20, 20, 5), val_per_class=4, test_per_class=4, size=24)
    final = fit(cfg, run_name="prep")
    manifest = RunPaths.from_config(cfg).stage("prepared", "toy-16", MANIFEST)
    assert json.loads(Path(manifest).read_text())["bad"] == 0
    assert len(final["lam_history"]) == 2 and final["n_bad_images"] == 0
    assert any(k.startswith("final_test") for k in final), final


def test_prepared_images_with_the_clip_pipeline_is_refused_naming_the_field():
    with pytest.raises(ValueError, match="training.prepared_images supports the toy and resnet"):
        load_config(None, ["training.backbone=clip", "training.prepared_images=true"])
