"""`discl sweep`: Ray Tune drives the real trainer (Train V2) over a YAML space; MLflow parent + child runs.

The pipeline's upstream stages are replaced by crafted parquet (toy digits rows, a hard-sample table, a tiny
spectrum with scores) so only Tune, Train and MLflow run here.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from discl_ray.config import ConfigError, load_config, to_flat_dict
from discl_ray.sweep.tune import (
    absolute_paths,
    grid_size,
    max_concurrent,
    resolve_metric,
    to_tune_space,
    trial_config,
    trial_overrides,
)

SPACE = {"training.strategy": {"grid": ["diverse_to_specific", "specific_to_diverse"]}, "training.seed": {"grid": [0, 1]}}


def _cfg_data(run_root, **sweep) -> dict:
    return {
        "experiment": "sweeptest", "run_root": str(run_root),
        "dataset": {"name": "digits_lt", "image_size": 16, "imbalance_ratio": 10,
                    "toy": {"n_max": 20, "val_per_class": 3, "test_per_class": 5}},
        "mining": {"few_max": 5, "many_min": 10},
        "generation": {"lams": [0.0, 0.5]},
        "scoring": {"threshold": 0.2},
        "training": {"backbone": "small_cnn", "epochs": 2, "curriculum_epochs": 2, "lams": [0.0, 0.5, 1.0],
                     "batch_size": 16, "steps_per_epoch": 2, "cpus_per_worker": 0.25, "num_workers": 1,
                     "max_failures": 0, "keep_tail_ratio": False, "random_real_size": 20,
                     "guidance_val_size": 4},
        "sweep": {"space": SPACE, "trial_cpus": 0.1, **sweep},  # 4 trials fit 2 CPUs at once
        "tracking": {"tracking_uri": f"sqlite:///{run_root / 'mlflow.db'}", "log_checkpoint": False},
    }


def _craft_upstream(cfg) -> None:
    """Hard samples = training rows of the 3 rarest classes; spectrum = noisy copies at λ ∈ {0, 0.5}."""
    import pyarrow.compute as pc

    from discl_ray.data import read_rows
    from discl_ray.runtime.cluster import RunPaths
    from discl_ray.runtime.io import load_image, png_bytes, write_parquet_part

    paths = RunPaths.from_config(cfg)
    train = read_rows(cfg, ("train",))
    hard = train.filter(pc.is_in(train["label"], pa.array([7, 8, 9])))
    write_parquet_part(hard.select(["image_id", "label", "class_name"]), paths.stage("mine"))
    rng = np.random.default_rng(0)
    spec, scores = [], []
    for row in hard.to_pylist():
        img = np.asarray(load_image(row["image"]), dtype=np.float32)
        for lam in (0.0, 0.5):
            noisy = np.clip(img * lam + rng.uniform(0, 255, img.shape) * (1 - lam), 0, 255).astype(np.uint8)
            iid = f"{row['image_id']}|l{lam:.3f}|s0"
            spec.append({"image_id": iid, "source_image_id": row["image_id"], "label": row["label"],
                         "lam": lam, "image": png_bytes(noisy)})
            scores.append({"image_id": iid, "clip_text_cos": 0.3})
    write_parquet_part(pa.Table.from_pylist(spec), paths.stage("generate", "spectrum"))
    write_parquet_part(pa.Table.from_pylist(scores), paths.stage("score", "scores"))


def test_space_and_trial_configs(tmp_path):
    base = _cfg_data(tmp_path)
    cfg = load_config(data=base)
    space = to_tune_space(cfg.sweep.space)
    assert space["training.strategy"] == {"grid_search": ["diverse_to_specific", "specific_to_diverse"]}
    assert grid_size(cfg.sweep.space, 3) == 12
    trial = trial_config(base, {"training.strategy": "easy_to_hard", "training.lams": [0.0, 1.0],
                                "training.lr": 0.01})
    assert (trial.training.strategy, trial.training.lams, trial.training.lr) == ("easy_to_hard", [0.0, 1.0], 0.01)
    assert trial_overrides({"training.strategy": "fixed"}) == ['training.strategy="fixed"']
    with pytest.raises(ConfigError, match="training.strategy"):
        trial_config(base, {"training.strategy": "sideways"})
    # Bad space: unknown key and unknown kind are rejected at load, naming the key.
    with pytest.raises(ConfigError, match="training.nope"):
        load_config(data=_cfg_data(tmp_path) | {"sweep": {"space": {"training.nope": {"grid": [1]}}}})
    with pytest.raises(ConfigError, match="sweep.space.training.lr.*grid"):
        load_config(data=_cfg_data(tmp_path) | {"sweep": {"space": {"training.lr": {"normal": [0, 1]}}}})
    lq = load_config(data=base, overrides=["training.task=low_quality"])
    assert resolve_metric(cfg) == "val_acc" and resolve_metric(lq) == "val_f1"


def test_max_concurrent_from_resources(tmp_path):
    cfg = load_config(data=_cfg_data(tmp_path, trial_cpus=0.25),  # a trial: 0.25 driver + 0.5 worker CPU
                      overrides=["training.cpus_per_worker=0.5"])
    assert max_concurrent(cfg, {"CPU": 2.0}) == 2      # (2 - 0.5 reserved) / 0.75
    assert max_concurrent(cfg, {"CPU": 1.0}) == 1
    assert max_concurrent(cfg, {"CPU": 16.0}) == 20
    assert max_concurrent(load_config(data=_cfg_data(tmp_path)), {"CPU": 2.0}) == 4  # 0.1 + 0.25
    gpu = load_config(data=_cfg_data(tmp_path), overrides=["training.gpus_per_worker=1", "training.num_workers=2"])
    assert max_concurrent(gpu, {"CPU": 64.0, "GPU": 4.0}) == 2
    assert max_concurrent(gpu, {"CPU": 64.0}) == 1      # autoscaling cluster: still start one
    fixed = load_config(data=_cfg_data(tmp_path, max_concurrent_trials=3))
    assert max_concurrent(fixed, {"CPU": 1.0}) == 3


def test_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ckpt.pt").write_bytes(b"x")
    data = absolute_paths({"run_root": "runs", "training": {"init_checkpoint": "ckpt.pt"},
                           "generation": {"model": "stabilityai/sdxl"}, "dataset": {"root": "s3://b/x"}})
    assert data["run_root"] == str(tmp_path / "runs")
    assert data["training"]["init_checkpoint"] == str(tmp_path / "ckpt.pt")
    assert data["generation"]["model"] == "stabilityai/sdxl" and data["dataset"]["root"] == "s3://b/x"


@pytest.mark.slow  # ~2-4 min on the shared 2-core machine (4 Train runs); run with -m slow
def test_sweep_2x2_children_under_parent(tmp_path, ray_local, capsys):
    import mlflow

    from jobs.sweep import main

    run_root = tmp_path / "runs"
    cfg_path = tmp_path / "sweep.yaml"
    import yaml

    cfg_path.write_text(yaml.safe_dump(_cfg_data(run_root, name="s1")))
    _craft_upstream(load_config(cfg_path))
    assert main(["--config", str(cfg_path)]) == 0
    out = capsys.readouterr().out
    assert "4 trials, 0 failed" in out

    uri = f"sqlite:///{run_root / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("sweeptest")
    parents = client.search_runs([exp.experiment_id], "tags.stage = 'sweep'")
    assert len(parents) == 1
    parent = parents[0]
    assert parent.data.metrics["num_trials"] == 4 and parent.data.metrics["num_errors"] == 0
    assert json.loads(parent.data.tags["sweep.space"]) == SPACE
    assert parent.data.params["training.epochs"] == "2"
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 4
    combos = sorted((c.data.params["training.strategy"], c.data.params["training.seed"]) for c in children)
    assert combos == [("diverse_to_specific", "0"), ("diverse_to_specific", "1"),
                      ("specific_to_diverse", "0"), ("specific_to_diverse", "1")]
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.tags["dataset"] == "digits_lt"
        assert child.data.tags["strategy"] == child.data.params["training.strategy"]
        assert child.data.params["training.cpus_per_worker"] == "0.25"
        for name in ("epoch", "lam", "train_loss", "val_acc"):
            hist = client.get_metric_history(child.info.run_id, name)
            assert len(hist) == 2, (name, hist)
        lams = [m.value for m in sorted(client.get_metric_history(child.info.run_id, "lam"), key=lambda m: m.step)]
        # The trial's own strategy reached the trainer: diverse→specific walks Λ = {0, .5, 1} upwards,
        # specific→diverse downwards (two curriculum epochs).
        want = [0.0, 0.5] if child.data.params["training.strategy"] == "diverse_to_specific" else [1.0, 0.5]
        assert lams == want
        for name in ("final_test_acc", "final_test_many_acc", "final_test_medium_acc", "final_test_few_acc"):
            assert 0.0 <= child.data.metrics[name] <= 1.0
    assert (run_root / "sweeptest" / "sweep" / "s1" / "trials.csv").is_file()

    # Submitting the same sweep again resumes it: nothing reruns, no second parent, no extra children.
    assert main(["--config", str(cfg_path)]) == 0
    assert "4 trials, 0 failed" in capsys.readouterr().out
    assert len(client.search_runs([exp.experiment_id], "tags.stage = 'sweep'")) == 1
    again = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(c.info.run_id for c in again) == sorted(c.info.run_id for c in children)

    # The report over this sweep equals a recomputation from the children's raw final metrics.
    import statistics

    from discl_ray.report.tables import build_tables

    lt = build_tables(uri, "sweeptest", parent_run_id=parent.info.run_id)["long_tail"]
    assert len(lt) == 2 and set(lt["n"]) == {2}
    for _, row in lt.iterrows():
        mine = [c for c in children if c.data.params["training.strategy"] == row["training.strategy"]]
        vals = [c.data.metrics["final_test_few_acc"] for c in mine]
        assert row["few_mean"] == pytest.approx(statistics.mean(vals))
        assert row["few_std"] == pytest.approx(statistics.stdev(vals))


def test_unreachable_tracking_server_fails_before_any_trial(tmp_path, capsys, monkeypatch):
    import socket

    import yaml

    from jobs.sweep import main

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    data = _cfg_data(tmp_path / "runs") | {"tracking": {"tracking_uri": f"http://127.0.0.1:{port}"}}
    cfg_path = tmp_path / "s.yaml"
    cfg_path.write_text(yaml.safe_dump(data))
    from reliab_fixtures import ray_start_tripwire

    ray_starts = ray_start_tripwire(monkeypatch)
    assert main(["--config", str(cfg_path)]) == 2
    assert ray_starts == []                                          # refused before any Ray start
    err = capsys.readouterr().err
    assert f"http://127.0.0.1:{port}" in err and "cannot be reached" in err
    assert not (tmp_path / "runs" / "sweeptest" / "sweep").exists()  # nothing started


def test_empty_space_is_refused(tmp_path, capsys):
    import yaml

    from jobs.sweep import main

    cfg_path = tmp_path / "s.yaml"
    cfg_path.write_text(yaml.safe_dump(_cfg_data(tmp_path / "runs") | {"sweep": {"space": {}}}))
    assert main(["--config", str(cfg_path)]) == 2
    assert "sweep.space is empty" in capsys.readouterr().err


def test_every_shipped_sweep_config_has_valid_trials():
    """Every grid point of every shipped sweep config is a valid trial config (what `discl sweep` checks first)."""
    from pathlib import Path

    from discl_ray.sweep.tune import _grid_points

    repo = Path(__file__).resolve().parent.parent
    paths = sorted(repo.glob("configs/**/sweep_*.yaml"))
    assert paths
    for path in paths:
        cfg = load_config(path)
        assert cfg.sweep.space, path
        base = cfg.model_dump(mode="json")
        points = _grid_points(cfg.sweep.space)
        assert len(points) * cfg.sweep.num_samples == grid_size(cfg.sweep.space, cfg.sweep.num_samples)
        for params in points:
            flat = to_flat_dict(trial_config(base, params).model_dump())
            for key, val in params.items():
                assert flat[key] == val, (path, key)


@pytest.mark.slow  # ~95 s on the shared 2-core machine (a driver process, Tune and one Train trial)
def test_sweep_on_an_object_store_run_root(tmp_path, monkeypatch):
    """`run_root=s3://…` (moto's S3 server on 127.0.0.1): Tune's experiment state, the trials' checkpoints,
    the parent-run marker and trials.csv go to the bucket through discl_ray.runtime.storage; nothing lands locally.
    The sweep runs in its own driver process (as `discl sweep` does) so its cluster's workers get the S3 env."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import boto3
    import mlflow
    import yaml
    from moto.server import ThreadedMotoServer

    repo = Path(__file__).resolve().parent.parent
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        for key, val in {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "test",
                         "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
                         "AWS_EC2_METADATA_DISABLED": "true"}.items():
            monkeypatch.setenv(key, val)
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket="sweeps")
        work = tmp_path / "work"
        work.mkdir()
        data = _cfg_data(tmp_path, name="s3sweep", space={"training.seed": {"grid": [0]}})
        data["run_root"] = "s3://sweeps/runs"
        data["training"] |= {"epochs": 1, "curriculum_epochs": 1, "steps_per_epoch": 1}
        data["ray"] = {"num_cpus": 2}
        cfg_path = tmp_path / "sweep.yaml"
        cfg_path.write_text(yaml.safe_dump(data))
        _craft_upstream(load_config(cfg_path))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))}
        env.pop("RAY_ADDRESS", None)
        env.pop("MLFLOW_TRACKING_URI", None)
        res = subprocess.run([sys.executable, "-m", "discl_ray.cli", "sweep", "--config", str(cfg_path)],
                             capture_output=True, text=True, timeout=600, env=env, cwd=work)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
        assert "1 trials, 0 failed; results in s3://sweeps/runs/sweeptest/sweep/s3sweep" in res.stdout
        keys = {o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket="sweeps")
                for o in page.get("Contents", [])}
        prefix = "runs/sweeptest/sweep/s3sweep/"
        assert {prefix + "trials.csv", prefix + "mlflow_parent_run.json"} <= keys, sorted(keys)
        assert any(k.startswith(prefix) and "experiment_state" in k for k in keys), sorted(keys)
        assert any(k.startswith(prefix + "trials/") and "checkpoint_final" in k for k in keys), sorted(keys)
        csv = s3.get_object(Bucket="sweeps", Key=prefix + "trials.csv")["Body"].read().decode()
        assert "config/training.seed" in csv.splitlines()[0]
        # never a sweep file in a local folder named after the URI (Ray Train's own local staging of the trial
        # runs, under .../train-like names, is excluded as in test_storage_s3.py)
        local = [p for p in work.rglob("*") if p.is_file() and "s3:" in p.parts and "sweep" in p.parts
                 and "trials" not in p.parts]
        assert not local, local
        client = mlflow.MlflowClient(tracking_uri=data["tracking"]["tracking_uri"])
        (parent,) = client.search_runs([client.get_experiment_by_name("sweeptest").experiment_id],
                                       "tags.stage = 'sweep'")
        assert parent.data.metrics["num_trials"] == 1 and parent.data.metrics["num_errors"] == 0
        assert "trials.csv" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    finally:
        server.stop()


def test_trials_upload_no_weights_to_mlflow_unless_asked(tmp_path):
    from discl_ray.sweep.tune import sweep_base

    cfg = load_config(None, [f"run_root={tmp_path}"])
    assert cfg.tracking.log_checkpoint is None                    # a single run logs its weights (None → yes)
    assert trial_config(sweep_base(cfg, "sqlite:///x.db"), {}).tracking.log_checkpoint is False
    asked = load_config(None, [f"run_root={tmp_path}", "tracking.log_checkpoint=true"])
    assert trial_config(sweep_base(asked, "sqlite:///x.db"), {}).tracking.log_checkpoint is True
