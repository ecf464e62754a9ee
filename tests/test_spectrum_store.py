"""The content-addressed spectrum store: keys, concurrent generate runs on one store, reused CLIP scores, gc.

Real Ray, real diffusers (a tiny SD checkpoint built locally), real open_clip (a tiny CLIP built locally).
"""

from __future__ import annotations

import json
import os
import posixpath
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml
from gen_fixtures import tiny_sd_dir, write_experiment

from discl_ray.config import load_config
from discl_ray.generation import store as st
from discl_ray.runtime.cluster import RunPaths
from discl_ray.runtime.io import read_parquet_dir

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_sd_dir(tmp_path_factory.mktemp("store-models"))


def _experiment(root: Path, model: Path):
    # 2 sources × 2 λ × 1 seed; float64 on the CPU: bytes independent of how work is split
    return write_experiment(root, model, n_sources=2, lams=[0.0, 0.5], seeds=[0],
                            overrides={"steps": 2, "dtype": "float64", "batch_size": 1, "rows_per_block": 2})


def _twin(cfg, name: str):
    """The same inputs under another experiment name (same run root, same dataset, so the same store)."""
    paths = RunPaths.from_config(cfg)
    shutil.copytree(paths.exp, paths.root / name, ignore=shutil.ignore_patterns("generate", "score"))
    return cfg.model_copy(update={"experiment": name})


def test_keys_cover_what_decides_the_pixels(model, tmp_path):
    cfg = _experiment(tmp_path / "runs", model)
    cache = RunPaths.from_config(cfg).cache
    base = st.settings_digest(cfg.generation, cache)
    for change in ({"guidance_scale": 4.0}, {"steps": 3}, {"scheduler": "euler"}, {"width": 16},
                   {"dtype": "float32"}, {"shared_noise": True}, {"negative_prompt": "blurry"}):
        assert st.settings_digest(cfg.generation.model_copy(update=change), cache) != base, change
    # same name, other weights (a rebuilt world): another identity
    copy = tmp_path / "copy"
    shutil.copytree(model, copy)
    same = cfg.generation.model_copy(update={"model": str(copy)})
    before = st.settings_digest(same, cache)
    weights = sorted(copy.rglob("*.safetensors"))[0]
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert st.settings_digest(same, cache) != before
    k = st.image_key(base, "s", "d", "p", 0.3, 0)
    assert len({k, st.image_key(base, "s", "d2", "p", 0.3, 0), st.image_key(base, "s", "d", "q", 0.3, 0),
                st.image_key(base, "s", "d", "p", 0.5, 0), st.image_key(base, "s", "d", "p", 0.3, 1),
                st.image_key(base, "t", "d", "p", 0.3, 0)}) == 6
    assert st.lam_dir(0.0) == "lam=0.0" and st.lam_dir(0.3) == "lam=0.3"


def _generate_cmd(cfg, path: Path, address: str) -> list[str]:
    data = cfg.model_dump(mode="json")
    data["ray"] = {"address": address}
    path.write_text(yaml.safe_dump(data))
    return [sys.executable, "-m", "discl_ray.cli", "generate", "-v", "--config", str(path)]  # -v: INFO on stderr


def test_two_generate_runs_on_one_store_started_together(model, tmp_path, ray_local):
    """Two experiments' `discl generate` started at once: every key written exactly once, bytes identical to
    a single run; the one that waited reuses everything; each experiment's view and manifest are complete."""
    from discl_ray.generation.job import run_generate

    a = _experiment(tmp_path / "runs", model)
    b = _twin(a, "gt-b")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env.pop("MLFLOW_TRACKING_URI", None)
    address = ray_local.get_runtime_context().gcs_address
    store = st.store_root(a)
    # The test holds the store's writer lock while both drivers start, and lets go only once both are
    # blocked on it: they then race for the lock at the same instant (not one after the other).
    logs: list[list[str]] = [[], []]
    waiting = [threading.Event(), threading.Event()]

    def pump(proc, buf, event):
        for line in proc.stderr:
            buf.append(line)
            if "waiting for another run writing the spectrum store" in line:
                event.set()

    with st.writer_lock(store, "test"):
        procs = [subprocess.Popen(_generate_cmd(c, tmp_path / f"{c.experiment}.yaml", address), env=env,
                                  cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                 for c in (a, b)]
        pumps = [threading.Thread(target=pump, args=(p, buf, ev), daemon=True)
                 for p, buf, ev in zip(procs, logs, waiting)]
        for t in pumps:
            t.start()
        for _p, ev, buf in zip(procs, waiting, logs):
            assert ev.wait(240), "".join(buf)[-3000:]                               # both wait for the lock
    for p, t, buf in zip(procs, pumps, logs):
        assert p.wait(timeout=300) == 0, "".join(buf)[-3000:]
        t.join(10)
    sums = [json.loads((RunPaths.from_config(c).stage("generate", "summary.json")).read_text()) for c in (a, b)]
    assert sorted(s["generated"] for s in sums) == [0, 4] and sorted(s["reused"] for s in sums) == [0, 4]
    assert sums[0]["store_digest"] == sums[1]["store_digest"] and sums[0]["store"] == sums[1]["store"]

    parts = st._image_parts(store)
    assert {p.parent.name for p in parts} == {"lam=0.0", "lam=0.5"}
    rows = pa.concat_tables([pq.read_table(p.path) for p in parts])
    assert rows.num_rows == pc.count_distinct(rows["key"]).as_py() == 4          # every key exactly once

    single = _experiment(tmp_path / "single", model)                             # one run alone
    assert run_generate(single)["generated"] == 4
    want = read_parquet_dir(RunPaths.from_config(single).stage("generate", "spectrum"))
    assert rows.sort_by("key").equals(want.sort_by("key"))                       # every column, every row
    single_store = st.store_root(single)
    files = {posixpath.relpath(p.path, store.path): Path(p.path).read_bytes() for p in parts}
    alone = {posixpath.relpath(p.path, single_store.path): Path(p.path).read_bytes()
             for p in st._image_parts(single_store)}
    assert files == alone                                                        # same part files, same bytes
    for c in (a, b):
        view = read_parquet_dir(RunPaths.from_config(c).stage("generate", "spectrum"))
        assert sorted(view["image_id"].to_pylist()) == sorted(want["image_id"].to_pylist())
        meta, manifest = st.read_manifest(RunPaths.from_config(c).store("generate"))
        assert manifest.num_rows == 4 and meta["keys"] == 4
        lam5 = st.spectrum_parts(RunPaths.from_config(c).store("generate"), lam=0.5)
        assert lam5 and all("/lam=0.5/" in u for u in lam5)
        got = pa.concat_tables([pq.read_table(u) for u in lam5])
        assert set(got["lam"].to_pylist()) == {0.5}

    # A sweep over thresholds, λ sets and losses once the spectrum exists: nothing is generated (no Ray work).
    for i, change in enumerate([{"scoring": {"threshold": 0.9}}, {"training": {"loss": "balanced_softmax"}},
                                {"training": {"lams": [0.5, 1.0]}, "generation": {"lams": [0.5]}},
                                {"generation": {"lams": [0.0]}, "scoring": {"threshold": 0.1}}]):
        trial = _twin(a, f"sweep-{i}")
        data = trial.model_dump(mode="json")
        for section, values in change.items():
            data[section].update(values)
        s = run_generate(load_config(data=data))
        n = 2 if "lams" in change.get("generation", {}) else 4
        assert (s["generated"], s["reused"], s["planned"]) == (0, n, n), change


def _clip_cfg(root: Path, cfg, clip_json: Path, weights: Path, name: str):
    from clip_fixtures import TINY_CLIP

    data = cfg.model_dump(mode="json")
    data["experiment"] = name
    data["scoring"] = {"model": TINY_CLIP, "model_config_path": str(clip_json), "pretrained": str(weights),
                       "threshold": 0.0, "batch_size": 4, "write_every": 4, "device": "cpu", "num_gpus_per_actor": 0}
    return load_config(data=data)


def test_scores_are_reused_across_experiments_and_gc_drops_unused_keys(model, tmp_path, ray_local):
    """A second experiment on the same spectrum reuses the first one's CLIP scores (no CLIP work); `gc`
    keeps what manifests use and drops the rest."""
    from clip_fixtures import make_tiny_clip

    from discl_ray.generation.job import run_generate
    from discl_ray.scoring.job import run_score

    a = _experiment(tmp_path / "runs", model)
    clip_json, weights = make_tiny_clip(tmp_path / "clip")
    a = _clip_cfg(tmp_path, a, clip_json, weights, "gt")
    run_generate(a)
    first = run_score(a)
    s1 = json.loads(first.summary_path.read_text())
    assert s1["scored"] == 4 and s1["reused"] == 0

    b = _clip_cfg(tmp_path, _twin(a, "gt-b"), clip_json, weights, "gt-b")
    assert run_generate(b)["generated"] == 0
    second = run_score(b)
    s2 = json.loads(second.summary_path.read_text())
    assert s2["reused"] == 4 and s2["scored"] == 0 and s2["total"] == 4
    sa = read_parquet_dir(RunPaths.from_config(a).stage("score", "scores")).sort_by("image_id")
    sb = read_parquet_dir(RunPaths.from_config(b).stage("score", "scores")).sort_by("image_id")
    assert sa.equals(sb)

    # another guidance scale: other keys; `gc` keeps both experiments' keys, then drops a removed one's
    c = _twin(a, "gt-c")
    c = c.model_copy(update={"generation": c.generation.model_copy(update={"guidance_scale": 5.0})})
    assert run_generate(c)["generated"] == 4
    store = st.store_root(a)
    report = st.gc_store(RunPaths.from_config(a).root, store)
    assert report["images_dropped"] == 0 and sorted(report["experiments"]) == ["gt", "gt-b", "gt-c"]
    shutil.rmtree(RunPaths.from_config(c).exp)
    dry = st.gc_store(RunPaths.from_config(a).root, store, dry_run=True)
    assert dry["images_dropped"] == 4 and len(st.store_index(store)) == 8
    done = st.gc_store(RunPaths.from_config(a).root, store)
    assert done["images_dropped"] == 4 and len(st.store_index(store)) == 4
    assert run_generate(b)["generated"] == 0                                    # what is used survives


def test_mlflow_runs_name_the_spectrum_store_and_its_digest(tmp_path, monkeypatch):
    """generate, score and a curriculum's train run log (``log_store_input``, called in each stage's run) an input `<dataset>-spectrum-store` whose source is the
    store and whose digest is the manifest's store digest; a baseline's train run does not."""
    from mlflow import MlflowClient

    from discl_ray.runtime import tracking

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config(REPO / "configs" / "toy" / "digits_lt.yaml",
                      [f"run_root={tmp_path / 'runs'}", "experiment=named"])
    store = st.store_root(cfg)
    manifest = pa.table({"image_id": ["a", "b"], "key": ["k1", "k2"], "source_image_id": ["s", "s"],
                         "lam": [0.0, 0.5], "seed": [0, 0], "part": ["images/lam=0.0/p", "images/lam=0.5/p"]})
    meta = st.write_manifest(RunPaths.from_config(cfg).store("generate"), store, manifest, "settings")
    baseline = cfg.model_copy(update={"training": cfg.training.model_copy(update={"strategy": "none"})})
    ids = {}
    for stage, c in (("generate", cfg), ("score", cfg), ("train", cfg), ("baseline", baseline)):
        name = "train" if stage == "baseline" else stage
        with tracking.run(c, name) as active:      # as the stages do: log_store_input inside their run
            assert st.log_store_input(c, name) is (stage != "baseline")
            ids[stage] = active.info.run_id
    client = MlflowClient(tracking_uri=tracking.tracking_uri(cfg))
    for stage, run_id in ids.items():
        inputs = {d.dataset.name: d for d in client.get_run(run_id).inputs.dataset_inputs}
        if stage == "baseline":
            assert "digits_lt-spectrum-store" not in inputs
            continue
        got = inputs["digits_lt-spectrum-store"]
        tags = {t.key: t.value for t in got.tags}
        assert got.dataset.digest == meta["store_digest"] == st.keys_digest(["k1", "k2"]), stage
        assert str(store) in got.dataset.source and tags["spectrum_store_digest"] == meta["store_digest"]
        assert tags["mlflow.data.context"] == "spectrum" and tags["spectrum_store"] == str(store)
