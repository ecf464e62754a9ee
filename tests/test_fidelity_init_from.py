"""`training.init_from`: DisCL fine-tunes the CE baseline's best-on-validation model (Algorithm 1, A.4)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from discl_ray.config import load_config
from discl_ray.training import checkpointing as ckpt
from discl_ray.training.init_from import resolve_checkpoint, resolve_init_from
from discl_ray.training.models import resnet10

REPO = Path(__file__).resolve().parents[1]


def _finished_run(run_root: Path, exp: str, run: str, seed: int, final: bool = True) -> dict:
    """A run directory as Ray Train leaves it: checkpoint_<time>/state.pt written by checkpointing.save."""
    torch.manual_seed(seed)
    net = resnet10(5)
    best = ckpt.cpu_state(net)
    torch.manual_seed(seed + 100)
    last = resnet10(5)                      # the last epoch's weights differ from the selected ones
    for i, state in enumerate([{}, {"final": {"best_epoch": 1}} if final else {}]):
        c = ckpt.save(last, None, epoch=i, best={"value": 0.5, "epoch": 1}, best_model=best, **state)
        dest = run_root / exp / "train" / run / f"checkpoint_2026-12-02_00-00-0{i}.000000"
        shutil.copytree(c.path, dest)
        ckpt.cleanup(c)
    return best


def test_resolves_the_baseline_best_checkpoint(tmp_path):
    root = tmp_path / "runs"
    best = _finished_run(root, "imagenet_lt_ce", "train-none-s0-abc", seed=1)
    cfg = load_config(REPO / "configs/imagenet_lt/discl_d2s.yaml", [f"run_root={root}", "tracking.enabled=false"])
    assert cfg.training.init_from == "imagenet_lt_ce"           # the shipped DisCL config names the CE baseline
    resolved = resolve_init_from(cfg)
    assert resolved.training.init_from is None and "imagenet_lt_ce/train/train-none-s0-abc" in resolved.training.init_checkpoint
    assert resolve_init_from(resolved) is resolved              # idempotent (sweeps call fit per trial)
    state = ckpt.load_model_state(resolved.training.init_checkpoint)
    assert all(torch.equal(state[k], best[k]) for k in best)    # the best-on-validation model, not the last epoch
    net = resnet10(5)
    net.load_state_dict(state)


def test_clear_errors(tmp_path):
    root = tmp_path / "runs"
    cfg = load_config(REPO / "configs/inat2018/discl_d2s.yaml", [f"run_root={root}", "tracking.enabled=false"])
    with pytest.raises(FileNotFoundError, match=r"inat2018_ce.*train it first"):
        resolve_init_from(cfg)
    _finished_run(root, "inat2018_ce", "unfinished", seed=0, final=False)       # killed before its last epoch
    with pytest.raises(FileNotFoundError, match="inat2018_ce"):
        resolve_init_from(cfg)
    _finished_run(root, "inat2018_ce", "a", seed=0)
    _finished_run(root, "inat2018_ce", "b", seed=1)
    with pytest.raises(ValueError, match="name one: inat2018_ce/a, inat2018_ce/b"):
        resolve_init_from(cfg)
    assert resolve_checkpoint(cfg, "inat2018_ce/b").parent.name == "b"
    with pytest.raises(ValueError, match="experiment"):
        resolve_checkpoint(cfg, "a/b/c")


def test_resolves_through_mlflow_when_the_run_dir_is_gone(tmp_path):
    import mlflow

    root = tmp_path / "runs"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    net = resnet10(3)
    model = ckpt.save_model_file(net, tmp_path / "art" / "model.pt")
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("cifar100_lt_r100_ce")
    with mlflow.start_run(tags={"stage": "train", "run_name": "base-s0"}):
        mlflow.log_metric("best_epoch", 3)
        mlflow.log_artifacts(str(model.parent), artifact_path="checkpoint")
    cfg = load_config(REPO / "configs/cifar100_lt/discl_d2s_r100.yaml", [f"run_root={root}", f"tracking.tracking_uri={uri}"])
    path = resolve_init_from(cfg).training.init_checkpoint
    assert path.endswith("model.pt") and str(root) in path
    state = ckpt.load_model_state(path)
    assert torch.equal(state["fc.weight"], net.state_dict()["fc.weight"])


def test_resolves_from_an_object_store_run_root(tmp_path, monkeypatch):
    """run_root on S3 (a moto server on 127.0.0.1): the selected model is copied into the local cache."""
    pytest.importorskip("moto")
    import socket

    import boto3
    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        for key, val in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
                         "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}.items():
            monkeypatch.setenv(key, val)
        best = _finished_run(tmp_path / "local", "inat2018_ce", "ce", seed=2)
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket="runs")
        for f in (tmp_path / "local").rglob("state.pt"):
            s3.upload_file(str(f), "runs", f"exp/{f.relative_to(tmp_path / 'local')}")
        cfg = load_config(REPO / "configs/inat2018/discl_d2s.yaml", ["run_root=s3://runs/exp", "tracking.enabled=false",
                                                                     f"cache_dir={tmp_path / 'cache'}"])
        path = resolve_checkpoint(cfg, cfg.training.init_from)
        assert path == tmp_path / "cache" / "init_from" / "inat2018_ce" / "ce" / "model.pt"
        state = ckpt.load_model_state(str(path))
        assert all(torch.equal(state[k], best[k]) for k in best)
    finally:
        server.stop()


def test_cli_fails_before_training_when_the_baseline_is_missing(tmp_path, capsys):
    from jobs.train import main

    code = main(["--config", str(REPO / "configs/imagenet_lt/discl_d2s.yaml"), f"run_root={tmp_path}",
                 "tracking.enabled=false"])
    assert code == 2 and "discl train: training.init_from" in capsys.readouterr().err


@pytest.mark.slow
def test_discl_run_starts_from_a_trained_baseline(tmp_path, ray_private):
    """The whole chain on Ray Train: baseline run -> DisCL run named after it (weights carried over)."""
    from discl_ray.training import fit
    from discl_ray.training.fixture import write_fixture

    common = [f"run_root={tmp_path}", "dataset.image_size=16", "mining.few_max=10", "mining.many_min=30",
              "generation.lams=[0.0,0.5]", "training.lams=[0.0,0.5,1.0]", "training.backbone=small_cnn",
              "training.batch_size=32", "training.cpus_per_worker=0.5", "tracking.enabled=false", "ray.num_cpus=2"]
    base = load_config(None, common + ["experiment=lt_ce", "training.strategy=none", "training.epochs=2",
                                       "training.curriculum_epochs=0"])
    write_fixture(base)
    fit(base, run_name="ce")
    discl = load_config(None, common + ["experiment=lt_ce", "training.init_from=lt_ce/ce", "training.epochs=2",
                                        "training.curriculum_epochs=1"])
    metrics = fit(discl, run_name="discl")
    assert metrics["best_epoch"] in (0, 1)
