"""Spectrum generation on tiny random SD and SDXL img2img pipelines (real diffusers, real Ray Data)."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pytest
import torch
from gen_fixtures import source_images, tiny_sd_dir, tiny_sdxl_dir, write_experiment
from PIL import Image

from discl_ray.config import ConfigError, load_config
from discl_ray.generation.actor import SpectrumGenerator
from discl_ray.generation.engine import SpectrumEngine, WorkItem, output_key, steps_for
from discl_ray.generation.output import encode_rows, part_name
from discl_ray.generation.pipeline import fix_aesthetics_flag, is_sdxl, load_img2img
from discl_ray.generation.plan import plan_sources, prepare_sources, read_inputs
from discl_ray.runtime.io import read_parquet_dir

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen-models")
    return {"sd": tiny_sd_dir(root), "sdxl": tiny_sdxl_dir(root)}


def _keys(cfg, sources):
    return {output_key(s, lam, seed) for s in sources for lam in cfg.generation.lams if lam < 1
            for seed in cfg.generation.seeds}


def _items(n_sources=2, lams=(0.0, 0.5, 0.9), seeds=(0, 1, 2, 3)):
    imgs = [Image.fromarray(a) for a in source_images(n_sources)]
    return [WorkItem(output_key(f"s{i}", lam, s), f"s{i}", lam, s, f"a photo of the digit {i}", imgs[i])
            for i in range(n_sources) for lam in lams for s in seeds]


def test_config_rejects_bad_lams_and_empty_seeds():
    with pytest.raises(ConfigError, match=r"generation\.lams.*\[0, 1\]"):
        load_config(data={"generation": {"lams": [0.0, 1.5]}, "training": {"strategy": "none"}})
    with pytest.raises(ConfigError, match=r"generation\.seeds"):
        load_config(data={"generation": {"seeds": []}})
    with pytest.raises(ConfigError, match=r"0 denoising steps.*0\.95"):
        load_config(data={"generation": {"lams": [0.0, 0.95], "steps": 10}, "training": {"strategy": "none"}})
    with pytest.raises(ConfigError, match=r"generation\.dtype"):
        load_config(data={"generation": {"dtype": "float8"}})


def test_loader_fixes_sdxl_aesthetics_flag(models):
    pipe = load_img2img(str(models["sdxl"]), "cpu", "float16", "ddim")
    assert is_sdxl(pipe) and pipe.unet.dtype == torch.float32          # half types become float32 on CPU
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    pipe.register_to_config(requires_aesthetics_score=False)            # a checkpoint saved with the wrong flag
    fix_aesthetics_flag(pipe)
    assert pipe.config.requires_aesthetics_score is True
    with pytest.raises(ValueError, match="scheduler.*valid: ddim"):
        load_img2img(str(models["sdxl"]), "cpu", "float32", "nope")


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_engine_every_key_and_step_count(models, kind):
    """All (source, λ, seed) outputs, λ = 0.9 included; executed steps = Σ int(steps × (1 − λ))."""
    pipe = load_img2img(str(models[kind]), "cpu", "float32", "ddim")
    engine = SpectrumEngine(pipe, steps=10, guidance_scale=3.0, batch_size=8)
    items = _items(lams=(0.0, 0.9), seeds=(0, 1))
    images = engine.generate(items)
    assert len(images) == len(items) and all(im.size == (32, 32) for im in images)
    assert engine.steps_run == sum(steps_for(10, it.lam) for it in items) == 2 * 2 * (10 + 1)
    assert engine.calls == 2                                  # one call per λ: both sources and seeds batched
    assert len(engine._prompts) == 2                          # each prompt encoded once
    arrays = [np.asarray(im, dtype=np.int16) for im in images]
    assert np.abs(arrays[0] - arrays[1]).mean() > 1           # seeds differ


def test_determinism_across_batch_sizes(models):
    """Same key → same noise; float64 gives identical bits for batch 1 vs 4, float32 within one level."""
    items = _items(n_sources=1, lams=(0.0, 0.5), seeds=(0, 1, 2, 3))[1:]
    pipe64 = load_img2img(str(models["sd"]), "cpu", "float64", "ddim")
    a = SpectrumEngine(pipe64, steps=2, guidance_scale=3.0, batch_size=1).generate(items)
    b = SpectrumEngine(pipe64, steps=2, guidance_scale=3.0, batch_size=4).generate(items[::-1])[::-1]
    for x, y in zip(a, b):
        assert np.array_equal(np.asarray(x), np.asarray(y))
    pipe32 = load_img2img(str(models["sd"]), "cpu", "float32", "ddim")
    c = SpectrumEngine(pipe32, steps=2, guidance_scale=3.0, batch_size=1).generate(items)
    d = SpectrumEngine(pipe32, steps=2, guidance_scale=3.0, batch_size=4).generate(items)
    e = SpectrumEngine(pipe32, steps=2, guidance_scale=3.0, batch_size=4).generate(items)
    for x, y, z in zip(c, d, e):
        x, y, z = (np.asarray(v, dtype=np.int16) for v in (x, y, z))
        assert np.array_equal(y, z)                           # same layout: bit-identical run to run
        assert np.abs(x - y).max() <= 1 and (x == y).mean() > 0.99


def test_generator_actor_class_rows(models, tmp_path):
    """The callable class fans prepared sources out into their missing keys (in-process, SDXL), passing
    error rows on; the CPU encoder turns its raw pixels into PNG (or lossless WebP) rows."""
    cfg = write_experiment(tmp_path / "runs", models["sdxl"], n_sources=2, corrupt=True)
    hard, rows, prompts = read_inputs(cfg)
    prep = prepare_sources(plan_sources(hard, rows, prompts), [0.0, 0.9], [0, 1], skip={"src0|l0.000|s0"})
    assert prep.num_rows == 3 and prep["lams"][0].as_py() == [0.0, 0.9, 0.9]     # one row per source
    gen = SpectrumGenerator(cfg.generation.model_dump(mode="json"), threads=1)
    raw = gen(prep)
    assert raw.num_rows == 3 * 4 - 1 and gen.device == "cpu"
    out = encode_rows(raw)
    webp = encode_rows(raw, "webp")
    assert set(webp["format"].to_pylist()) == {"webp"}
    a, b = (Image.open(io.BytesIO(t["image"][0].as_py())) for t in (out, webp))
    assert np.array_equal(np.asarray(a), np.asarray(b))                          # lossless
    assert part_name(["x", "y"]) == part_name(["y", "x"]) != part_name(["x"])
    ok = out.filter(pa.compute.equal(out["error"], ""))
    assert ok.num_rows == 2 * 4 - 1
    assert set(out.filter(pa.compute.not_equal(out["error"], ""))["source_image_id"].to_pylist()) == {"bad0"}
    img = Image.open(io.BytesIO(ok["image"][0].as_py()))
    assert img.size == (32, 32) and ok["width"][0].as_py() == 32 and ok["generator"][0].as_py() == str(models["sdxl"])
    prompt = ok.filter(pa.compute.equal(ok["source_image_id"], "src1"))["prompt"][0].as_py()
    assert prompt == "a photo of the digit one"


def _job_cfg(tmp_path, models):
    return write_experiment(tmp_path / "runs", models["sd"], n_sources=3, corrupt=True, missing=True,
                            lams=[0.0, 0.9, 1.0], overrides={"rows_per_block": 4})


def _check_complete(cfg, tmp_path, summary, first):
    """Exactly the full key set, no duplicates, the rest generated now, bad sources as error rows."""
    out_dir = tmp_path / "runs" / "gt" / "generate" / "spectrum"
    full = _keys(cfg, ["src0", "src1", "src2"])
    table = read_parquet_dir(out_dir)
    ids = table["image_id"].to_pylist()
    assert len(ids) == len(set(ids)) and set(ids) == full
    assert summary["skipped"] == len(first) and summary["generated"] == len(full) - len(first)
    assert summary["failed"] == 2 * 2 * 2                       # corrupt + missing source, every key
    errors = read_parquet_dir(tmp_path / "runs" / "gt" / "generate" / "errors")
    reasons = dict(zip(errors["source_image_id"].to_pylist(), errors["reason"].to_pylist()))
    assert "cannot decode" in reasons["bad0"] and "missing" in reasons["gone0"]
    return full, table


def test_job_on_ray_resumes_and_records_errors(models, tmp_path, ray_local):
    """Ray Data job on top of an earlier run's part file: only missing keys are made; bad sources become
    error rows; the grid, summary and MLflow run are written; other settings cannot resume."""
    from discl_ray.generation.job import run_generate, source_digests
    from discl_ray.generation.output import encode_and_write
    from discl_ray.generation.store import settings_digest, store_root
    from discl_ray.runtime.cluster import RunPaths
    from discl_ray.runtime.lease import LEASE, StageBusy

    cfg = _job_cfg(tmp_path, models)
    hard, rows, prompts = read_inputs(cfg)
    sources = plan_sources(hard, rows, prompts)
    prep = prepare_sources(sources.slice(0, 1), [0.0, 0.9], [0, 1])
    out_dir = tmp_path / "runs" / "gt" / "generate" / "spectrum"
    # an earlier block, written into the store the way the workers write it
    receipt = encode_and_write(SpectrumGenerator(cfg.generation.model_dump(mode="json"), threads=1)(prep),
                               str(out_dir), str(out_dir.parent / "errors"), store_dir=str(store_root(cfg)),
                               settings=settings_digest(cfg.generation, RunPaths.from_config(cfg).cache),
                               source_digests=source_digests(sources, None))
    first = read_parquet_dir(out_dir)["image_id"].to_pylist()
    assert receipt["generated"][0].as_py() == len(first) == 4
    lease = tmp_path / "runs" / "gt" / "generate" / LEASE              # a live writer holds the stage
    lease.write_text(json.dumps({"host": __import__("socket").gethostname(), "pid": 1, "run": "other",
                                 "heartbeat": __import__("time").time()}))
    with pytest.raises(StageBusy, match="being written by another"):
        run_generate(cfg)
    lease.unlink()
    (out_dir / ".part-dead.parquet.1234.tmp").write_bytes(b"half a file")     # a killed writer's leftover

    summary = run_generate(cfg)
    full, table = _check_complete(cfg, tmp_path, summary, first)
    assert not list(out_dir.glob("*.tmp")) and not lease.exists()
    assert summary["actors"] and all(a["device"] == "cpu" and a["node_id"] for a in summary["actors"])
    assert summary["bytes_per_output"] > 0 and set(table["format"].to_pylist()) == {"png"}
    row = table.filter(pa.compute.equal(table["image_id"], "src1|l0.900|s1")).to_pylist()[0]
    assert (row["lam"], row["seed"], row["steps"], row["guidance_scale"]) == (0.9, 1, 10, 3.0)
    assert json.loads((tmp_path / "runs" / "gt" / "generate" / "summary.json").read_text())["failed"] == 8
    grid = Image.open(tmp_path / "runs" / "gt" / "generate" / "spectrum_grid.png")
    # real + 2 λ × 2 seeds, 2 sources; 32 px images shown at 96 px (×3, nearest), λ groups set apart
    # columns at x = 0 | 104, 202 | 306, 404 (cell 96 + gap 2, +6 between groups); label row 20 px
    assert grid.size == (404 + 96, 20 + 2 * 98)

    tracked = cfg.model_copy(deep=True)                           # nothing left: no duplicates appear
    tracked.tracking.enabled = True
    tracked.tracking.tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    again = run_generate(tracked)
    assert again["generated"] == 0 and again["skipped"] == again["reused"] == len(full)
    assert read_parquet_dir(out_dir).num_rows == len(full)

    other = cfg.model_copy(deep=True)         # other settings: other keys, all made again; the view follows
    other.generation.steps = 20
    redo = run_generate(other)
    assert redo["generated"] == len(full) and redo["reused"] == 0 and redo["store_digest"] != again["store_digest"]
    assert set(read_parquet_dir(out_dir)["steps"].to_pylist()) == {20}
    back = run_generate(cfg)                  # and back: the store still holds the first settings' outputs
    assert back["generated"] == 0 and back["store_digest"] == again["store_digest"]
    assert set(read_parquet_dir(out_dir)["steps"].to_pylist()) == {10}

    import mlflow

    runs = mlflow.search_runs(experiment_names=["gt"], output_format="list")
    assert len(runs) == 1 and runs[0].data.metrics["skipped"] == len(full)
    arts = {a.path for a in mlflow.MlflowClient().list_artifacts(runs[0].info.run_id)}
    assert {"spectrum_grid.png", "generate_summary.json"} <= arts


def test_shared_noise_is_one_trajectory_per_source_and_seed(models, tmp_path):
    """generation.shared_noise (the authors' choice): the noise seed ignores λ and is recorded per row; the
    default draws independent noise per λ; a spectrum is never resumed in the other mode."""
    from discl_ray.generation.engine import noise_seed
    from discl_ray.generation.plan import check_existing
    from discl_ray.runtime.io import write_parquet_part

    assert noise_seed("s0", 0.0, 3, shared=True) == noise_seed("s0", 0.5, 3, shared=True)
    assert noise_seed("s0", 0.0, 3, shared=True) != noise_seed("s0", 0.0, 4, shared=True)
    assert noise_seed("s0", 0.0, 3) != noise_seed("s0", 0.5, 3)
    items = _items(n_sources=1, lams=(0.0,), seeds=(0, 1))
    pipe = load_img2img(str(models["sd"]), "cpu", "float32", "ddim")
    own = SpectrumEngine(pipe, steps=2, guidance_scale=3.0, batch_size=2).generate(items)
    shared = SpectrumEngine(pipe, steps=2, guidance_scale=3.0, batch_size=2, shared_noise=True).generate(items)
    assert not np.array_equal(np.asarray(own[0]), np.asarray(shared[0]))   # other noise → other image at λ = 0

    cfg = write_experiment(tmp_path / "runs", models["sd"], n_sources=1)
    gen_cfg = cfg.generation.model_copy(update={"shared_noise": True, "lams": [0.0, 0.5], "seeds": [0]})
    hard, rows, prompts = read_inputs(cfg)
    prep = prepare_sources(plan_sources(hard, rows, prompts), [0.0, 0.5], [0], skip=set())
    out = encode_rows(SpectrumGenerator(gen_cfg.model_dump(mode="json"), threads=1)(prep))
    assert len(set(out["noise_seed"].to_pylist())) == 1                    # both λ of (src, seed 0): one seed
    spectrum = tmp_path / "spectrum"
    write_parquet_part(out.drop_columns(["error"]), spectrum)
    check_existing(spectrum, gen_cfg)                                      # same mode: resumes
    with pytest.raises(ValueError, match="generation.shared_noise=True"):
        check_existing(spectrum, gen_cfg.model_copy(update={"shared_noise": False}))
