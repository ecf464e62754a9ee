"""The canonical dataset rows are shared through the dataset's store (issue 27): experiments on one dataset
(Table 1's rows, ablations, sweep configs) build the rows once; the others get them without the loader.

Behavioural proofs that the loader did not run: the dataset root is moved away before the second experiment
materializes (the loader would fail on it), and a changed spec fails there until the root is back."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from fakes import fake_imagenet_lt
from s3_fixtures import moto_s3

from discl_ray.config import load_config
from discl_ray.data import (
    MARKER,
    ROWS_FILE,
    ROWS_META,
    VIEW_META,
    gc_rows,
    materialize,
    read_rows,
    rows_identity,
    rows_key,
)
from discl_ray.data.loaders.common import DatasetError
from discl_ray.generation.store import rows_root
from discl_ray.runtime.cluster import RunPaths

REPO = Path(__file__).resolve().parent.parent


def _cfg(config: str, runs, root: Path, *extra: str):
    return load_config(REPO / config, [f"dataset.root={root}", f"run_root={runs}", "dataset.embed_images=true",
                                       *extra])


def _view(cfg) -> dict:
    return json.loads((RunPaths.from_config(cfg).dataset / VIEW_META).read_text())


def _key_dirs(cfg) -> list[str]:
    return sorted(p.name for p in Path(rows_root(cfg).path).iterdir() if not p.name.startswith(("_", ".")))


def test_second_experiment_reuses_the_rows_without_the_loader(tmp_path, caplog):
    root = fake_imagenet_lt(tmp_path / "inlt")
    runs = tmp_path / "runs"
    a = _cfg("configs/imagenet_lt/discl_d2s.yaml", runs, root)
    b = _cfg("configs/imagenet_lt/baseline_bs.yaml", runs, root)
    assert a.experiment != b.experiment and a.dataset == b.dataset
    with caplog.at_level(logging.INFO, logger="discl_ray.data"):
        out_a = materialize(a)
    assert not [r for r in caplog.records if "reused" in r.getMessage()]      # the first says nothing new
    assert _view(a)["reused"] is False
    away = tmp_path / "moved-away"
    root.rename(away)                       # the loader cannot run now: the second must not need it
    with caplog.at_level(logging.INFO, logger="discl_ray.data"):
        out_b = materialize(b)
    assert out_b == runs / b.experiment / "dataset"
    said = [r.getMessage() for r in caplog.records if "reused" in r.getMessage()]
    assert len(said) == 1 and "the loader did not run" in said[0], said
    assert _view(b)["reused"] is True and _view(b)["key"] == _view(a)["key"]
    fa, fb = out_a / ROWS_FILE, out_b / ROWS_FILE
    assert fa.read_bytes() == fb.read_bytes()
    store_file = Path(rows_root(a).path, _view(a)["key"], ROWS_FILE)
    assert os.stat(fa).st_ino == os.stat(fb).st_ino == os.stat(store_file).st_ino     # hard links, one copy
    assert json.loads((out_b / MARKER).read_text()) == b.dataset.model_dump(mode="json")
    assert read_rows(b).num_rows == read_rows(a).num_rows > 0
    assert materialize(b) == out_b and os.stat(fb).st_ino == os.stat(store_file).st_ino   # current: a no-op

    # A changed spec is another key: the loader runs (and fails while the root is away: the proof that the
    # second experiment above did not run it), then new rows.
    c = _cfg("configs/imagenet_lt/discl_d2s.yaml", runs, root, "experiment=c_small", "dataset.max_per_class=2")
    with pytest.raises(DatasetError):
        materialize(c)
    away.rename(root)
    materialize(c)
    assert _view(c)["reused"] is False and _view(c)["key"] != _view(a)["key"]
    assert read_rows(c).num_rows < read_rows(a).num_rows
    assert len(_key_dirs(a)) == 2

    # gc: keys some experiment's dataset/ names stay; drop c and its key goes (a dry run only counts).
    c_rows = _view(c)["rows"]
    shutil.rmtree(runs / "c_small")
    (Path(rows_root(a).path) / ".deadbeef.0.partial").mkdir()     # what a killed writer leaves
    dry = gc_rows(runs, rows_root(a), "imagenet_lt", dry_run=True)
    assert dry["row_keys_dropped"] == 1 and len(_key_dirs(a)) == 2
    report = gc_rows(runs, rows_root(a), "imagenet_lt")
    assert report["row_keys_kept"] == 1 and report["row_keys_dropped"] == 1
    assert report["rows_dropped"] == c_rows > 0
    assert sorted(report["row_experiments"]) == sorted([a.experiment, b.experiment])
    assert _key_dirs(a) == [_view(a)["key"]]
    assert not list(Path(rows_root(a).path).glob(".*.partial"))
    # a dataset/ written before the store (marker only) keeps the key of its spec
    kept = _view(b)["key"]
    (runs / b.experiment / "dataset" / VIEW_META).unlink()
    shutil.rmtree(runs / a.experiment)
    assert gc_rows(runs, rows_root(a), "imagenet_lt")["row_keys_kept"] == 1 and _key_dirs(a) == [kept]
    assert read_rows(b).num_rows > 0                     # a view without the file is trusted by its spec


def test_unfinished_key_is_never_trusted(tmp_path):
    """A key without ``_rows.json`` (a writer killed on an object store, or a hand-made folder) is rebuilt."""
    root = fake_imagenet_lt(tmp_path / "inlt", counts=(4, 2))
    runs = tmp_path / "runs"
    a = _cfg("configs/imagenet_lt/discl_d2s.yaml", runs, root)
    ident, _ = rows_identity(a, RunPaths.from_config(a))
    key = Path(rows_root(a).path, rows_key(ident))
    key.mkdir(parents=True)
    (key / ROWS_FILE).write_bytes(b"half a parquet file")
    materialize(a)
    assert _view(a)["reused"] is False and (key / ROWS_META).is_file()
    assert pq.read_table(key / ROWS_FILE).num_rows == read_rows(a).num_rows > 0


def test_rows_a_fixture_wrote_after_a_materialize_are_kept(tmp_path):
    """A test fixture or bench that writes ``dataset/`` rows and a marker for its own spec (no
    ``_dataset_rows.json`` of that spec) keeps its rows, as before the store."""
    import pyarrow as pa

    from discl_ray.data import CANONICAL_SCHEMA

    root = fake_imagenet_lt(tmp_path / "inlt", counts=(4, 2))
    a = _cfg("configs/imagenet_lt/discl_d2s.yaml", tmp_path / "runs", root)
    out = materialize(a)
    b = _cfg("configs/imagenet_lt/discl_d2s.yaml", tmp_path / "runs", root, "dataset.max_per_class=1")
    rows = pa.table({"image_id": ["x"], "image": [b"png"], "path": [None], "label": [0], "class_name": ["goldfish"],
                     "split": ["train"], "domain": [""]}).cast(CANONICAL_SCHEMA)
    (out / ROWS_FILE).unlink()
    pq.write_table(rows, out / ROWS_FILE)
    (out / MARKER).write_text(json.dumps(b.dataset.model_dump(mode="json")))
    assert read_rows(b)["image_id"].to_pylist() == ["x"]


def _fake_world(cache: Path, weights: bytes) -> None:
    """The files a built clean toy world's generator folder holds (only their bytes matter to the key)."""
    from discl_ray.toyworld import generator_dir

    g = generator_dir(cache, "clean")
    (g / "unet").mkdir(parents=True, exist_ok=True)
    (g / "model_index.json").write_text('{"_class_name": "StableDiffusionImg2ImgPipeline"}')
    (g / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(weights)


def test_toy_rows_are_keyed_by_the_digits_and_spec_not_the_world(tmp_path):
    """Toy rows are drawn from scikit-learn's digits and the spec alone: a second experiment reuses them, and a
    world rebuilt under the same name (other weights) still reuses them (its spectrum is keyed by the weights)."""
    runs = tmp_path / "runs"
    args = [f"run_root={runs}", "dataset.toy.n_max=12", "dataset.toy.test_per_class=3", "dataset.imbalance_ratio=4"]
    a = load_config(REPO / "configs/toy/digits_lt.yaml", args)
    b = load_config(REPO / "configs/toy/digits_lt.yaml", [*args, "experiment=toy_lt_bs",
                                                         "training.loss=balanced_softmax"])
    cache = RunPaths.from_config(a).cache
    _fake_world(cache, b"weights v1")
    materialize(a)
    materialize(b)
    assert _view(a)["reused"] is False and _view(b)["reused"] is True and _view(a)["key"] == _view(b)["key"]
    first = _view(a)["key"]
    _fake_world(cache, b"weights v2")               # `discl world --force`: same name, other weights
    materialize(b, force=True)
    assert _view(b)["key"] == first
    assert (runs / a.experiment / "dataset" / ROWS_FILE).read_bytes() == \
        (runs / b.experiment / "dataset" / ROWS_FILE).read_bytes()
    c = load_config(REPO / "configs/toy/digits_lt.yaml", [*args, "experiment=toy_lt_r8", "dataset.imbalance_ratio=8"])
    materialize(c)
    assert _view(c)["reused"] is False and _view(c)["key"] != first        # another spec: other rows


BUCKET = "discl-rows"


@pytest.fixture()
def s3(monkeypatch):
    with moto_s3(monkeypatch, BUCKET) as client:
        yield client


def test_rows_are_shared_on_object_storage(tmp_path, s3):
    root = fake_imagenet_lt(tmp_path / "inlt", counts=(4, 2))
    runs = f"s3://{BUCKET}/runs"
    a = _cfg("configs/imagenet_lt/discl_d2s.yaml", runs, root, f"cache_dir={tmp_path / 'cache'}")
    b = _cfg("configs/imagenet_lt/baseline_bs.yaml", runs, root, f"cache_dir={tmp_path / 'cache'}")
    materialize(a)
    root.rename(tmp_path / "away")
    materialize(b)

    def view(cfg):
        return json.loads(RunPaths.from_config(cfg).store("dataset", VIEW_META).read_text())

    assert view(a)["reused"] is False and view(b)["reused"] is True
    key = view(a)["key"]
    objects = {o["Key"]: o for o in s3.list_objects_v2(Bucket=BUCKET)["Contents"]}
    store = f"runs/_spectra/imagenet_lt/rows/{key}/{ROWS_FILE}"
    for exp in (a.experiment, b.experiment):
        copy = s3.get_object(Bucket=BUCKET, Key=f"runs/{exp}/dataset/{ROWS_FILE}")["Body"].read()
        assert copy == s3.get_object(Bucket=BUCKET, Key=store)["Body"].read()
        assert f"runs/{exp}/dataset/{MARKER}" in objects
    assert not [k for k in objects if k.endswith(("_lease.json", ".tmp"))]
    assert read_rows(b).num_rows == read_rows(a).num_rows > 0
