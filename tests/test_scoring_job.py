"""`discl score` through Ray Data on a tiny experiment written by the test (real Ray, real open_clip)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml
from clip_fixtures import TINY_CLIP, digit_image, make_tiny_clip

from discl_ray.config import load_config
from discl_ray.runtime.cluster import RunPaths
from discl_ray.runtime.io import parquet_files, png_bytes, read_parquet_dir, write_parquet_part
from discl_ray.scoring.job import run_score

LAMS, SEEDS, N_SOURCES = (0.0, 0.5), (0, 1), 4


def make_experiment(root: Path, threshold: float = 0.0, **scoring) -> tuple[dict, list[str]]:
    """Canonical rows, prompts and a spectrum on disk (as the upstream stages write them); returns the config."""
    json_path, weights = make_tiny_clip(root / "clip")
    data = {"experiment": "t", "run_root": str(root / "runs"), "tracking": {"enabled": False},
            "ray": {"num_cpus": 2},
            "scoring": {"model": TINY_CLIP, "model_config_path": str(json_path), "pretrained": str(weights),
                        "threshold": threshold, "batch_size": 4, "write_every": 8} | scoring}
    cfg = load_config(data=data)
    paths = RunPaths.from_config(cfg)
    sources = {f"train-{i}": png_bytes(digit_image(i % 2, i)) for i in range(N_SOURCES)}
    extra = {"test-0": png_bytes(digit_image(1, 99)), "train-bad": b"corrupt source"}
    canon = pa.table({"image_id": [*sources, *extra], "image": [*sources.values(), *extra.values()],
                      "path": pa.nulls(N_SOURCES + 2, pa.string()), "label": [i % 2 for i in range(N_SOURCES)] + [1, 1],
                      "class_name": [["zero", "one"][i % 2] for i in range(N_SOURCES)] + ["one", "one"],
                      "split": ["train"] * N_SOURCES + ["test", "train"], "domain": [""] * (N_SOURCES + 2)})
    write_parquet_part(canon, paths.dataset, prefix="rows")
    (paths.dataset / "_dataset_config.json").write_text(json.dumps(cfg.dataset.model_dump(mode="json")))
    write_parquet_part(pa.table({"label": [0, 1], "class_name": ["zero", "one"], "display_name": ["zero", "one"],
                                 "clip_prompt": ["a photo of zero", "a photo of one"],
                                 "gen_prompts": [["a photo of zero"], ["a photo of one"]]}), paths.stage("prompts"))
    rows = []
    for i, (sid, src) in enumerate(sources.items()):
        for lam in LAMS:
            for seed in SEEDS:
                # λ = 0.5, seed 0 reuses the source's own pixels: its image–image cosine must be 1.
                img = src if (lam, seed) == (0.5, 0) else png_bytes(digit_image(i % 2, 100 * i + 10 * seed + int(lam * 10)))
                rows.append({"image_id": f"{sid}|l{lam:.3f}|s{seed}", "source_image_id": sid, "label": i % 2,
                             "class_name": ["zero", "one"][i % 2], "lam": lam, "seed": seed, "prompt": "p",
                             "image": img, "width": 16, "height": 16, "generator": "g", "steps": 10,
                             "guidance_scale": 10.0})
    rows[3]["image"] = b"corrupt"   # an unreadable synthetic image → error row
    rows.append(dict(rows[0], image_id="ghost|l0.000|s0", source_image_id="ghost"))  # source not in train split
    rows.append(dict(rows[1], image_id="train-bad|l0.000|s0", source_image_id="train-bad"))  # unreadable source
    spec = pa.Table.from_pylist(rows)
    write_parquet_part(spec.slice(0, 10), paths.stage("generate", "spectrum"))
    write_parquet_part(spec.slice(10), paths.stage("generate", "spectrum"))
    return data, [r["image_id"] for r in rows]


def _scores(cfg) -> pa.Table:
    return read_parquet_dir(RunPaths.from_config(cfg).stage("score", "scores"))


def test_score_job_end_to_end_then_resume(tmp_path, ray_local):
    data, ids = make_experiment(tmp_path)
    cfg = load_config(data=data)
    res = run_score(cfg)
    out = RunPaths.from_config(cfg).stage("score")
    n = len(ids)
    assert (res.scored, res.skipped, res.total) == (n - 1, 0, n - 1)
    scores = _scores(cfg)
    assert sorted(scores["image_id"].to_pylist()) == sorted(i for k, i in enumerate(ids) if k != 3)
    assert scores.column_names == ["image_id", "source_image_id", "label", "lam", "seed", "clip_text_cos",
                                   "clip_image_cos", "clip_score", "clip_model"]
    text_cos = np.array(scores["clip_text_cos"])
    assert np.all(np.abs(text_cos) <= 1) and set(scores["clip_model"].to_pylist()) == {"tiny-clip/tiny-clip.pt"}
    assert np.allclose(np.array(scores["clip_score"]), 2.5 * np.maximum(text_cos, 0))
    by_id = dict(zip(scores["image_id"].to_pylist(), scores["clip_image_cos"].to_pylist()))
    for i in range(N_SOURCES):
        assert by_id[f"train-{i}|l0.500|s0"] == pytest.approx(1.0, abs=1e-6)
    # Every synthetic row joins to its source: a real image cosine unless the source is not in the train split.
    assert np.isnan(by_id.pop("ghost|l0.000|s0")) and np.isnan(by_id.pop("train-bad|l0.000|s0"))
    assert all(-1 <= v <= 1 for v in by_id.values())
    errors = read_parquet_dir(out / "errors")
    assert sorted(errors["image_id"].to_pylist()) == sorted(["ghost", "train-bad", ids[3]])
    reasons = dict(zip(errors["image_id"].to_pylist(), errors["reason"].to_pylist()))
    assert "cannot decode image" in reasons[ids[3]] and reasons["train-bad"].startswith("source image: cannot decode")
    assert "not in the train split" in reasons["ghost"]
    # threshold 0 keeps exactly the non-negative cosines; kept/ holds ids and cosines, not a spectrum copy.
    kept = read_parquet_dir(out / "kept")
    assert kept.num_rows == res.kept == int((text_cos >= 0).sum())
    assert kept.column_names == ["image_id", "lam", "clip_text_cos"] and not (out / "filtered").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["actors"] and all(a["device"] == "cpu" for a in summary["actors"])
    assert summary["total"] == n - 1 and summary["errors"] == 3 and summary["kept"] == res.kept
    assert sum(g["total"] for g in summary["per_lam"].values()) == n - 1
    assert set(summary["per_lam"]) == {"0.000", "0.500"} and set(summary["per_class"]) == {"0", "1"}
    assert [p.name for p in res.histograms] == ["hist_clip_text_cos.png", "hist_clip_image_cos.png"]
    assert all(p.stat().st_size > 1000 for p in res.histograms)

    # Rerun: nothing to do (scored and errored ids are skipped).
    again = run_score(cfg)
    assert (again.scored, again.skipped, again.errors) == (0, n, 0)

    # Interrupted run (one scores part lost) resumed with error retries: the gap is filled exactly, the
    # corrupt row fails again and its error row is replaced, never duplicated.
    parts = parquet_files(out / "scores")
    assert len(parts) >= 2
    lost = pq.read_table(parts[0])["image_id"].to_pylist()
    parts[0].unlink()
    third = run_score(load_config(data=data, overrides=["scoring.retry_errors=true"]))
    # errors: the corrupt row, plus a bad source again if its row was in the lost part.
    assert (third.scored, third.skipped) == (len(lost), n - 1 - len(lost))
    assert third.errors == 1 + ("ghost|l0.000|s0" in lost) + ("train-bad|l0.000|s0" in lost)
    assert sorted(read_parquet_dir(out / "errors")["image_id"].to_pylist()) == sorted(["ghost", "train-bad", ids[3]])
    merged = _scores(cfg)
    assert merged.num_rows == n - 1 and pc.count_distinct(merged["image_id"]).as_py() == n - 1
    new = dict(zip(merged["image_id"].to_pylist(), merged["clip_text_cos"].to_pylist()))
    old = dict(zip(scores["image_id"].to_pylist(), scores["clip_text_cos"].to_pylist()))
    assert all(new[k] == pytest.approx(old[k], abs=1e-6) for k in old)

    # Threshold exactly at one score keeps that row; the next float above drops it (no CLIP work).
    # Use the current scores: rows rescored after the lost part may differ from the first run in the last bits.
    text_cos = np.asarray(merged["clip_text_cos"].to_pylist(), dtype=np.float64)
    pivot = float(np.sort(text_cos)[len(text_cos) // 2])
    at = run_score(load_config(data=data, overrides=[f"scoring.threshold={pivot!r}"]))
    assert at.scored == 0 and at.kept == int((text_cos >= pivot).sum())
    above = run_score(load_config(data=data, overrides=[f"scoring.threshold={float(np.nextafter(pivot, 2.0))!r}"]))
    assert above.kept == at.kept - int((text_cos == pivot).sum())
    assert read_parquet_dir(out / "kept").num_rows == above.kept


def test_cli_scores_and_reports_missing_inputs(tmp_path, ray_local, capsys):
    from jobs.score import main

    data, ids = make_experiment(tmp_path, threshold=1.0)
    cfg_path = tmp_path / "exp.yaml"
    cfg_path.write_text(yaml.safe_dump(data))
    assert main(["--config", str(cfg_path), "scoring.threshold=-1.0"]) == 0
    # Error rows: the corrupt synthetic image (not scored) and the two rows whose source is missing or unreadable
    # (scored against their prompt, no image–image cosine); every scored row is kept at threshold −1.
    n = len(ids) - 1
    assert (f"scored {n} rows (0 already scored, 0 of them reused from the spectrum store; 3 errors); kept {n}/{n} "
            "at clip_text_cos >= -1.0") \
        in capsys.readouterr().out
    out = Path(data["run_root"]) / "t" / "score"
    assert read_parquet_dir(out / "kept").num_rows == len(ids) - 1
    # threshold 1.0 from the file: nothing kept (no CLIP work); this time logged to MLflow (sqlite in run_root).
    assert main(["--config", str(cfg_path), "tracking.enabled=true"]) == 0
    assert json.loads((out / "summary.json").read_text())["kept"] == 0
    assert read_parquet_dir(out / "kept").num_rows == 0
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{Path(data['run_root']).resolve() / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("t").experiment_id])
    assert run.data.tags["stage"] == "score" and run.data.params["scoring.threshold"] == "1.0"
    assert run.data.metrics["kept"] == 0 and run.data.metrics["total"] == len(ids) - 1
    assert "kept_frac_lam_0.500" in run.data.metrics
    logged = {f.path for f in client.list_artifacts(run.info.run_id, "score")}
    assert logged == {"score/summary.json", "score/hist_clip_text_cos.png", "score/hist_clip_image_cos.png"}
    assert main(["--config", str(cfg_path), "experiment=other"]) == 2
    assert "run `discl generate` first" in capsys.readouterr().err
