"""Bad inputs a user can cause: each ends as one ``discl <stage>: …`` line and exit status 2 before any cluster
work, or (when only the data can tell) as error rows while the job completes with a summary. Nothing is lost:
every planned key is either written or listed with its reason."""

from __future__ import annotations

import pyarrow as pa
import pytest
from gen_fixtures import tiny_sd_dir, write_experiment
from reliab_fixtures import deep_update, free_port, lt_experiment, ray_start_tripwire, write_config

from discl_ray.runtime.io import read_parquet_dir, write_parquet_part


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    """A random miniature SD img2img checkpoint (built once per module: ~10 s)."""
    return tiny_sd_dir(tmp_path_factory.mktemp("gen-models"))


def fake_pipeline_dir(root) -> str:
    """A folder that passes for a diffusers pipeline up to loading (the checks that fail first never load it)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "model_index.json").write_text("{}")
    return str(root)


def one_line_error(capsys, stage: str, *needles: str) -> str:
    """The captured stderr is exactly one ``discl <stage>: …`` line holding every needle, no traceback."""
    err = capsys.readouterr().err.strip()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"discl {stage}: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, err)
    return lines[0]


def gen_config(tmp_path, cfg, **generation) -> str:
    data = cfg.model_dump(mode="json")
    data["generation"].update(generation)
    return str(write_config(tmp_path / "gen.yaml", data))


# -- generate ---------------------------------------------------------------------------------------------
def test_generate_model_path_that_does_not_exist(tmp_path, capsys, monkeypatch):
    from jobs.generate import main

    cfg = write_experiment(tmp_path / "runs", model="/nonexistent")
    ray_starts = ray_start_tripwire(monkeypatch)
    assert main(["--config", gen_config(tmp_path, cfg)]) == 2
    one_line_error(capsys, "generate", "generation.model", "/nonexistent", "not a folder")
    assert ray_starts == []                                   # refused before any Ray start (or model load)
    assert not (tmp_path / "runs" / "gt" / "generate").exists()
    # A folder that is not a diffusers pipeline is named as such.
    (tmp_path / "empty-model").mkdir()
    assert main(["--config", gen_config(tmp_path, cfg, model=str(tmp_path / "empty-model"))]) == 2
    one_line_error(capsys, "generate", "model_index.json")


def test_generate_toy_generator_missing(tmp_path, capsys):
    from jobs.generate import main

    cfg = write_experiment(tmp_path / "runs", model="toy")     # cache under this run root: empty
    assert main(["--config", gen_config(tmp_path, cfg)]) == 2
    one_line_error(capsys, "generate", "toy generator", "discl world")


def test_generate_before_mine_and_prompts(tmp_path, capsys):
    from jobs.generate import main

    cfg = write_experiment(tmp_path / "runs", model="/nonexistent")
    exp = tmp_path / "runs" / "gt"
    for f in (exp / "mine").glob("*.parquet"):
        f.unlink()
    assert main(["--config", gen_config(tmp_path, cfg)]) == 2
    one_line_error(capsys, "generate", "mine", "discl mine")
    cfg = write_experiment(tmp_path / "runs2", model="/nonexistent")
    for f in (tmp_path / "runs2" / "gt" / "prompts").glob("*.parquet"):
        f.unlink()
    assert main(["--config", gen_config(tmp_path, cfg)]) == 2
    one_line_error(capsys, "generate", "prompts", "discl prompts")


def test_generate_into_another_models_spectrum(tmp_path, capsys):
    """The stage already holds another model's outputs: one line naming both, no traceback."""
    from discl_ray.generation.plan import SPECTRUM_SCHEMA
    from jobs.generate import main

    model = fake_pipeline_dir(tmp_path / "model")
    cfg = write_experiment(tmp_path / "runs", model=model)
    capsys.readouterr()
    row = {"image_id": "src0|l0.000|s0", "source_image_id": "src0", "label": 0, "class_name": "zero", "lam": 0.0,
           "seed": 0, "prompt": "p", "image": b"", "width": 32, "height": 32, "generator": "some/other-model",
           "steps": 10, "guidance_scale": 3.0}
    write_parquet_part(pa.Table.from_pylist([row], schema=SPECTRUM_SCHEMA), tmp_path / "runs/gt/generate/spectrum")
    assert main(["--config", gen_config(tmp_path, cfg)]) == 2
    one_line_error(capsys, "generate", "already holds outputs", "some/other-model", str(model))


def test_generate_duplicate_hard_ids_with_conflicting_labels(tmp_path, capsys):
    from jobs.generate import main

    cfg = write_experiment(tmp_path / "runs", model=fake_pipeline_dir(tmp_path / "model"))
    mine = tmp_path / "runs" / "gt" / "mine"
    hard = read_parquet_dir(mine)
    clash = hard.slice(0, 1).to_pylist()[0] | {"label": 1 - hard["label"][0].as_py()}
    write_parquet_part(pa.Table.from_pylist([clash], schema=hard.schema), mine)
    assert main(["--config", gen_config(tmp_path, cfg)]) == 2
    one_line_error(capsys, "generate", "conflicting labels", "src0", "discl mine")


def test_generate_error_rows_for_corrupt_png_orphan_class_and_duplicates(tmp_path, tiny_sd, ray_local, capsys):
    """A corrupt PNG source, a class without prompts and a duplicated hard id: the job completes, prints its
    summary, and every planned key is written once or listed in errors/ with its reason."""
    from jobs.generate import main

    cfg = write_experiment(tmp_path / "runs", model=str(tiny_sd), n_sources=4, corrupt=True, lams=[0.0, 0.5],
                           seeds=[0])
    exp = tmp_path / "runs" / "gt"
    hard = read_parquet_dir(exp / "mine")
    write_parquet_part(hard.slice(1, 1), exp / "mine")                 # src1 listed twice, same label
    prompts = read_parquet_dir(exp / "prompts")
    data = cfg.model_dump(mode="json")
    # Label 0 (src0, src2) loses its generation prompts; bad0 (label 1) has prompts but unreadable bytes.
    prompts = prompts.set_column(prompts.schema.get_field_index("gen_prompts"), "gen_prompts",
                                 pa.array([[], ["a photo of the digit one"]], pa.list_(pa.string())))
    for f in (exp / "prompts").glob("*.parquet"):
        f.unlink()
    write_parquet_part(prompts, exp / "prompts")
    assert main(["--config", str(write_config(tmp_path / "g.yaml", data))]) == 0
    captured = capsys.readouterr()
    assert "generated 4, skipped 0 (already written), failed 6 of 10 keys" in captured.out
    assert "1 hard image_ids are listed more than once" in captured.err
    assert "labels [0] have no generation prompts: their 2 hard images become error rows" in captured.err
    spectrum = read_parquet_dir(exp / "generate" / "spectrum")
    errors = read_parquet_dir(exp / "generate" / "errors")
    written = spectrum["image_id"].to_pylist()
    failed = dict(zip(errors["key"].to_pylist(), errors["reason"].to_pylist()))
    assert len(written) == len(set(written)) == 4                      # src1 once, despite the duplicate
    assert sorted({k.split("|")[0] for k in written}) == ["src1", "src3"]
    assert set(failed) & set(written) == set()
    assert sorted(written + list(failed)) == sorted(f"{s}|l{lam:.3f}|s0" for s in ("src0", "src1", "src2", "src3",
                                                                                   "bad0") for lam in (0.0, 0.5))
    assert all("no generation prompts" in failed[f"{s}|l{lam:.3f}|s0"] for s in ("src0", "src2") for lam in (0, .5))
    assert all("cannot decode image" in failed[f"bad0|l{lam:.3f}|s0"] for lam in (0.0, 0.5))
    assert len(errors) == 6                                            # one error row per failed key


# -- score ------------------------------------------------------------------------------------------------
def _score_experiment(tmp_path, **scoring):
    from clip_fixtures import TINY_CLIP, make_tiny_clip

    cfg = write_experiment(tmp_path / "runs", model="g", n_sources=2)
    json_path, weights = make_tiny_clip(tmp_path / "clip")
    data = cfg.model_dump(mode="json")
    data["scoring"].update({"model": TINY_CLIP, "model_config_path": str(json_path), "pretrained": str(weights),
                            "threshold": 0.0, "batch_size": 4} | scoring)
    rows = [{"image_id": f"src{i}|l0.000|s0", "source_image_id": f"src{i}", "label": i % 2,
             "class_name": ["zero", "one"][i % 2], "lam": 0.0, "seed": 0, "prompt": "p",
             "image": read_parquet_dir(tmp_path / "runs/gt/dataset")["image"][i].as_py(), "width": 32, "height": 32,
             "generator": "g", "steps": 10, "guidance_scale": 3.0} for i in range(2)]
    write_parquet_part(pa.Table.from_pylist(rows), tmp_path / "runs/gt/generate/spectrum")
    return write_config(tmp_path / "score.yaml", data), data


def test_score_missing_clip_weights_file(tmp_path, capsys):
    from jobs.score import main

    path, _ = _score_experiment(tmp_path, pretrained=str(tmp_path / "nowhere" / "tiny-clip.pt"))
    assert main(["--config", str(path)]) == 2
    one_line_error(capsys, "score", "scoring.pretrained", "nowhere/tiny-clip.pt", "does not exist")
    assert main(["--config", str(path), "scoring.model=toy-clip", "scoring.model_config_path=null",
                 "scoring.pretrained=null"]) == 2
    one_line_error(capsys, "score", "toy CLIP", "discl world")


def test_score_duplicate_train_ids(tmp_path, capsys):
    from jobs.score import main

    path, _ = _score_experiment(tmp_path)
    ds = tmp_path / "runs" / "gt" / "dataset"
    rows = read_parquet_dir(ds)
    write_parquet_part(rows.slice(0, 1), ds, prefix="rows")            # src0 twice in the train split
    assert main(["--config", str(path)]) == 2
    one_line_error(capsys, "score", "duplicate image_ids")
    assert not (tmp_path / "runs" / "gt" / "score" / "scores").exists()


# -- train ------------------------------------------------------------------------------------------------
def test_train_missing_init_checkpoint(tmp_path, capsys):
    from jobs.train import main

    path, _ = lt_experiment(tmp_path)
    assert main(["--config", str(path), f"training.init_checkpoint={tmp_path / 'gone' / 'model.pt'}"]) == 2
    one_line_error(capsys, "train", "training.init_checkpoint", "gone/model.pt")


def test_train_missing_clip_weights(tmp_path, capsys):
    from clip_fixtures import TINY_CLIP, make_tiny_clip

    from jobs.train import main

    path, _ = lt_experiment(tmp_path)
    json_path, _ = make_tiny_clip(tmp_path / "clip")
    assert main(["--config", str(path), "training.backbone=clip", f"scoring.model={TINY_CLIP}",
                 f"scoring.model_config_path={json_path}", f"scoring.pretrained={tmp_path / 'w' / 'clip.pt'}"]) == 2
    one_line_error(capsys, "train", "scoring.pretrained", "w/clip.pt")


def test_train_empty_filtered_spectrum(tmp_path, capsys):
    """Fixture scores lie in [0.1, 0.9): a 0.95 threshold keeps nothing; the error says so and gives the range."""
    from jobs.train import main

    path, _ = lt_experiment(tmp_path)
    assert main(["--config", str(path), "training.threshold=0.95"]) == 2
    line = one_line_error(capsys, "train", "filtered spectrum is empty", "threshold 0.95", "scores range")
    assert "keeps 0 of" in line
    assert not (tmp_path / "runs" / "fx" / "train").exists()           # no Train run was started


def test_train_adaptive_needs_two_hard_sources(tmp_path, capsys):
    from jobs.train import main

    path, _ = lt_experiment(tmp_path, {"training": {"task": "low_quality", "strategy": "adaptive",
                                                    "lams": [0.5, 0.9, 1.0], "curriculum_epochs": 2,
                                                    "epochs": 3}, "generation": {"lams": [0.5, 0.9]}},
                            low_quality=True, train_counts=(12, 12, 12))
    mine = tmp_path / "runs" / "fx" / "mine"
    hard = read_parquet_dir(mine)
    for f in mine.glob("*.parquet"):
        f.unlink()
    write_parquet_part(hard.slice(0, 1), mine)                          # a single hard source left
    assert main(["--config", str(path), "training.threshold=0.0"]) == 2
    one_line_error(capsys, "train", "adaptive", "at least 2 hard sources", "keeps 1")


def test_train_before_generate_and_score(tmp_path, capsys):
    from jobs.train import main

    path, _ = lt_experiment(tmp_path)
    for f in (tmp_path / "runs" / "fx" / "generate" / "spectrum").glob("*.parquet"):
        f.unlink()
    assert main(["--config", str(path)]) == 2
    one_line_error(capsys, "train", "spectrum", "discl generate")


# -- mine -------------------------------------------------------------------------------------------------
def test_mine_confidence_classifier_missing(tmp_path, capsys):
    from jobs.mine import main

    path, _ = lt_experiment(tmp_path)
    assert main(["--config", str(path), "mining.mode=confidence", "mining.lowest_k=2",
                 "mining.classifier=torchscript", f"mining.classifier_path={tmp_path / 'judge.pt'}"]) == 2
    one_line_error(capsys, "mine", "mining.classifier_path", "judge.pt")
    assert main(["--config", str(path), "mining.mode=confidence", "mining.lowest_k=2", "mining.classifier=toy"]) == 2
    one_line_error(capsys, "mine", "toy judge", "discl world")


# -- an unreachable MLflow server -------------------------------------------------------------------------
@pytest.mark.parametrize("stage", ["train", "generate", "score", "report"])
def test_unreachable_mlflow_fails_before_work(stage, tmp_path, capsys, monkeypatch):
    """Nobody listens on the port: one line naming the URI within seconds, and no stage output written."""
    import importlib

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"http://127.0.0.1:{free_port()}"
    if stage in ("generate", "score"):
        path, _ = _score_experiment(tmp_path)
        data = deep_update(__import__("yaml").safe_load(path.read_text()),
                           {"generation": {"model": fake_pipeline_dir(tmp_path / "model")}})
        path = write_config(path, data)
        for f in (tmp_path / "runs/gt/generate/spectrum").glob("*.parquet"):
            if stage == "generate":
                f.unlink()
        exp = tmp_path / "runs" / "gt"
    else:
        path, _ = lt_experiment(tmp_path)
        exp = tmp_path / "runs" / "fx"
    main = importlib.import_module(f"jobs.{stage}").main
    ray_starts = ray_start_tripwire(monkeypatch)
    assert main(["--config", str(path), f"tracking.tracking_uri={uri}", "tracking.enabled=true"]) == 2
    assert ray_starts == []                                   # refused before the cluster start
    one_line_error(capsys, stage, uri, "cannot be reached")
    out_dir = {"train": "train", "generate": "generate", "score": "score", "report": "report"}[stage]
    assert not (exp / out_dir).exists() or stage == "generate" and not list((exp / out_dir).rglob("*.parquet"))


# -- datasets ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stage", ["prompts", "mine"])
def test_real_dataset_root_missing(stage, tmp_path, capsys):
    import importlib

    main = importlib.import_module(f"jobs.{stage}").main
    args = [f"run_root={tmp_path / 'runs'}", "dataset.name=imagenet_lt", "tracking.enabled=false"]
    assert main(args) == 2
    one_line_error(capsys, stage, "dataset imagenet_lt", "dataset.root is not set")
    assert main([*args, f"dataset.root={tmp_path / 'nowhere'}"]) == 2
    one_line_error(capsys, stage, "nowhere", "is not a directory")
