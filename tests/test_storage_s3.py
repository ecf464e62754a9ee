"""The stages on object storage: `run_root=s3://bucket/prefix` against an S3-compatible server on loopback.

moto's server speaks the S3 HTTP API; pyarrow (and so every stage and Ray worker) reaches it through the
standard ``AWS_ENDPOINT_URL`` and dummy keys. The toy world's digits-LT dataset, a tiny random img2img
model and a tiny CLIP (no downloads) go through mine, prompts, generate, score and train; every output
must be listed under the bucket and nothing under a local folder named ``s3:``; a rerun adds no object.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from clip_fixtures import TINY_CLIP, make_tiny_clip
from gen_fixtures import tiny_sd_dir
from s3_fixtures import moto_s3

REPO = Path(__file__).resolve().parent.parent
BUCKET = "discl-test"


@pytest.fixture()
def s3(monkeypatch):
    with moto_s3(monkeypatch, BUCKET) as client:
        yield client


def _objects(client) -> dict[str, str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
    return {o["Key"]: o["ETag"] for page in pages for o in page.get("Contents", [])}


# One driver process runs the Ray stages through their CLI entry points, one after the other: its embedded
# Ray cluster (and the workers, which inherit the AWS_* variables) starts once, not once per stage.
DRIVER = """
import json, sys
from discl_ray.cli import main
argv = json.loads(sys.argv[1])
for stage in sys.argv[2:]:
    try:
        rc = main([stage, *argv])
    except Exception as err:  # report and go on: the stages after a failed train still matter
        print(f"{stage} raised {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        rc = 1
    print(f"STAGE {stage} rc={rc}", flush=True)
"""


def _cli(stages: list[str], tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    argv = ["--config", str(REPO / "configs/toy/digits_lt.yaml"), *overrides]
    return subprocess.run([sys.executable, "-c", DRIVER, json.dumps(argv), *stages],
                          capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)


def test_stages_on_s3_then_rerun_adds_nothing(tmp_path, s3):
    model = tiny_sd_dir(tmp_path / "models")
    clip_json, clip_weights = make_tiny_clip(tmp_path / "clip")
    # Model paths are URIs too: the img2img folder and the CLIP weights live in the bucket.
    for f in model.rglob("*"):
        if f.is_file():
            s3.upload_file(str(f), BUCKET, f"models/tiny-sd/{f.relative_to(model).as_posix()}")
    s3.upload_file(str(clip_weights), BUCKET, "models/tiny-clip.pt")
    clip_weights = f"s3://{BUCKET}/models/tiny-clip.pt"
    common = [f"run_root=s3://{BUCKET}/runs", f"cache_dir={tmp_path / 'cache'}", "tracking.enabled=false",
              "ray.num_cpus=2",
              f"generation.model=s3://{BUCKET}/models/tiny-sd", "generation.lams=[0.0, 0.5]", "generation.seeds=[0]", "generation.steps=2",
              "generation.batch_size=8", "generation.grid_sources=2",
              f"scoring.model={TINY_CLIP}", f"scoring.model_config_path={clip_json}",
              f"scoring.pretrained={clip_weights}", "scoring.threshold=-1.0", "training.lams=[0.0, 0.5, 1.0]"]
    from jobs.mine import main as mine
    from jobs.prompts import main as prompts

    argv = ["--config", str(REPO / "configs/toy/digits_lt.yaml"), *common]
    assert mine(argv) == 0 and prompts(argv) == 0                   # no Ray: in this process
    train_args = ["training.epochs=2", "training.curriculum_epochs=1", "training.cpus_per_worker=0.5",
                  "training.checkpoint_every=1"]
    res = _cli(["generate", "score", "train"], tmp_path, *common, *train_args)   # workers get the AWS env
    for stage in ("generate", "score"):
        assert f"STAGE {stage} rc=0" in res.stdout, res.stdout[-1000:] + res.stderr[-3000:]
    local = [p for p in (tmp_path / "s3:").rglob("*") if p.is_file() and "train" not in p.parts]
    assert not local, local                                      # never a local folder named after the URI
    prefix = "runs/toy_lt/"
    trained = _objects(s3)
    first = {k: v for k, v in trained.items() if not k.startswith(prefix + "train/")}
    for expected in ("dataset/rows.parquet", "dataset/_dataset_config.json", "mine/hard.parquet",
                     "mine/summary.json", "prompts/prompts.parquet", "generate/summary.json",
                     "generate/spectrum_grid.png", "score/summary.json", "score/kept/kept.parquet",
                     "score/hist_clip_text_cos.png"):
        assert prefix + expected in first, sorted(first)
    spectrum = [k for k in first if k.startswith(prefix + "generate/spectrum/part-")]
    scores = [k for k in first if k.startswith(prefix + "score/scores/part-")]
    assert spectrum and scores and not any(k.endswith((".tmp", "_lease.json")) for k in first)
    gen = json.loads(s3.get_object(Bucket=BUCKET, Key=prefix + "generate/summary.json")["Body"].read())
    scored = json.loads(s3.get_object(Bucket=BUCKET, Key=prefix + "score/summary.json")["Body"].read())
    assert gen["generated"] == gen["planned"] > 0 and scored["total"] == gen["planned"]
    assert len(list((tmp_path / "cache" / "models").glob("*/.complete"))) == 2   # one node-local copy each

    from jobs.generate import main as generate
    from jobs.score import main as score

    # The rerun adds nothing (everything is written, so no stage needs Ray: all four run in this process).
    assert mine(argv) == 0 and prompts(argv) == 0 and generate(argv) == 0 and score(argv) == 0
    again = _objects(s3)
    assert set(again) == set(trained)
    assert {k: again[k] for k in spectrum + scores} == {k: first[k] for k in spectrum + scores}

    # train on the bucket too: its Ray Train checkpoints land under the run root's train/ prefix
    assert "STAGE train rc=0" in res.stdout, res.stdout[-1000:] + res.stderr[-3000:]
    assert any(k.startswith(prefix + "train/") and "checkpoint_" in k for k in trained), sorted(trained)
    assert not (tmp_path / "s3:").exists()
