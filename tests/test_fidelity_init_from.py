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


# One baseline trained by the real trainer (Ray Train, 2 epochs of a tiny CNN on the toy fixture), shared by the
# module: the tests copy its run folder under the experiment names they need. Its final checkpoint is what every
# finished run leaves (checkpoint_final_a0/state.pt with ``final`` and the selected model as ``model``).
COMMON = ["dataset.image_size=16", "mining.few_max=10", "mining.many_min=30", "generation.lams=[0.0,0.5]",
          "training.lams=[0.0,0.5,1.0]", "training.backbone=small_cnn", "training.batch_size=32",
          "training.cpus_per_worker=0.5", "tracking.enabled=false", "ray.num_cpus=2"]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, ray_private):
    """(config, run folder) of a finished baseline run ``tiny_ce/ce`` trained by ``discl_ray.training.fit``."""
    from discl_ray.training import fit
    from discl_ray.training.fixture import write_fixture

    root = tmp_path_factory.mktemp("baseline") / "runs"
    cfg = load_config(None, [f"run_root={root}", *COMMON, "experiment=tiny_ce", "training.strategy=none",
                             "training.epochs=2", "training.curriculum_epochs=0", "training.steps_per_epoch=2"])
    write_fixture(cfg)
    fit(cfg, run_name="ce")
    return cfg, root / "tiny_ce" / "train" / "ce"


def _copy_run(run_dir: Path, run_root: Path, exp: str, name: str, final: bool = True) -> Path:
    dest = run_root / exp / "train" / name
    shutil.copytree(run_dir, dest, ignore=None if final else shutil.ignore_patterns("checkpoint_final_*"))
    return dest


def _final_state(run_dir: Path) -> dict:
    (final,) = sorted(run_dir.glob("checkpoint_final_*"))
    return torch.load(final / "state.pt", map_location="cpu", weights_only=False)


def test_the_trainer_writes_the_selected_model_as_model(baseline):
    """What init_from reads is what the trainer writes: the final checkpoint's ``model`` is the best epoch's."""
    _, run_dir = baseline
    state = _final_state(run_dir)
    assert state["final"]["best_epoch"] in (0, 1) and "best_model" not in state
    best = run_dir / f"checkpoint_epoch{state['final']['best_epoch']:04d}_a0" / "state.pt"
    chosen = torch.load(best, map_location="cpu", weights_only=False)["model"]   # kept: ranked best
    assert all(torch.equal(state["model"][k], chosen[k]) for k in chosen)


def test_resolves_the_baseline_best_checkpoint(tmp_path, baseline):
    _, run_dir = baseline
    root = tmp_path / "runs"
    dest = _copy_run(run_dir, root, "imagenet_lt_ce", "train-none-s0-abc")
    cfg = load_config(REPO / "configs/imagenet_lt/discl_d2s.yaml", [f"run_root={root}", "tracking.enabled=false"])
    assert cfg.training.init_from == "imagenet_lt_ce"           # the shipped DisCL config names the CE baseline
    resolved = resolve_init_from(cfg)
    assert resolved.training.init_from is None
    assert resolved.training.init_checkpoint == str(dest / "checkpoint_final_a0")
    assert resolve_init_from(resolved) is resolved              # idempotent (sweeps call fit per trial)
    state = ckpt.load_model_state(resolved.training.init_checkpoint)
    want = _final_state(run_dir)["model"]
    assert state.keys() == want.keys() and all(torch.equal(state[k], want[k]) for k in want)


def test_clear_errors(tmp_path, baseline):
    _, run_dir = baseline
    root = tmp_path / "runs"
    cfg = load_config(REPO / "configs/inat2018/discl_d2s.yaml", [f"run_root={root}", "tracking.enabled=false"])
    with pytest.raises(FileNotFoundError, match=r"inat2018_ce.*train it first"):
        resolve_init_from(cfg)
    _copy_run(run_dir, root, "inat2018_ce", "unfinished", final=False)       # killed before its last epoch
    with pytest.raises(FileNotFoundError, match="inat2018_ce"):
        resolve_init_from(cfg)
    _copy_run(run_dir, root, "inat2018_ce", "a")
    _copy_run(run_dir, root, "inat2018_ce", "b")
    with pytest.raises(ValueError, match="name one: inat2018_ce/a, inat2018_ce/b"):
        resolve_init_from(cfg)
    assert Path(resolve_checkpoint(cfg, "inat2018_ce/b")).parent.name == "b"
    with pytest.raises(ValueError, match="experiment"):
        resolve_checkpoint(cfg, "a/b/c")


def test_mining_classifier_finds_the_baseline_in_its_run_folder(tmp_path, baseline):
    """``mining.classifier: trained_run`` with tracking off: the classifier is the run folder's selected model."""
    from discl_ray.data import class_names, read_rows
    from discl_ray.mining.hard_set import TrainedRunClassifier, check_fits

    base_cfg, run_dir = baseline
    cfg = load_config(None, [f"run_root={base_cfg.run_root}", *COMMON, "experiment=tiny_discl",
                             "mining.mode=confidence", "mining.classifier=trained_run",
                             "mining.classifier_from=tiny_ce", "mining.target_count=5"])
    by_label = class_names(read_rows(base_cfg))
    names = [by_label[c] for c in sorted(by_label)]
    check_fits(cfg, names)                                       # found, and it fits this config's model
    clf = TrainedRunClassifier(cfg, names)
    want = _final_state(run_dir)["model"]
    assert all(torch.equal(v, want[k]) for k, v in clf.net.state_dict().items())
    p = clf.probs(torch.rand(4, 3, 16, 16), [0, 1, 2, 3])
    assert p.shape == (4,) and ((p > 0) & (p < 1)).all()


def test_streamed_run_checks_cpus_only_where_they_can_be_known(baseline, monkeypatch, caplog):
    """check_data_cpus: the embedded cluster's CPUs are all it will ever have (refuse a run that would hang);
    a joined cluster may grow (a GPU group at zero has no CPUs until the autoscaler sees the workers' demand)."""
    import ray

    from discl_ray.training.trainer import build_trainer, check_data_cpus

    base_cfg, _ = baseline
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    over = [f"run_root={base_cfg.run_root}", *COMMON, "experiment=tiny_ce", "training.strategy=none",
            "training.num_workers=2", "training.cpus_per_worker=1", "training.image_cache_mb=0"]
    local = load_config(None, over)
    with pytest.raises(ValueError, match="training.data_cpus"):
        check_data_cpus(local, 2.0)
    with pytest.raises(ValueError, match="training.data_cpus"):
        build_trainer(local, run_name="cpus")                    # the embedded 2-CPU cluster: certain to hang
    joined = load_config(None, [*over, f"ray.address={ray.get_runtime_context().gcs_address}"])
    with caplog.at_level("WARNING", logger="discl_ray.training.trainer"):
        assert check_data_cpus(joined, 0.0, joined=True)        # nothing up yet: warn, go on
        trainer, selector = build_trainer(joined, run_name="cpus")
    ray.kill(selector)
    assert trainer is not None and "autoscaler" in caplog.text
    assert not check_data_cpus(local.model_copy(update={"training": local.training.model_copy(
        update={"cpus_per_worker": 0.5})}), 2.0)                 # 2 x 0.5 + 0.25 fits: no complaint


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


def test_resolves_from_an_object_store_run_root(tmp_path, monkeypatch, baseline):
    """run_root on S3 (a moto server on 127.0.0.1): init_checkpoint is the final checkpoint's URI, which a Ray
    worker reads through discl_ray.runtime.storage where it runs; nothing lands in the driver's node-local cache."""
    import boto3
    import ray
    from moto.server import ThreadedMotoServer

    _, run_dir = baseline
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "test",
               "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
        for key, val in env.items():
            monkeypatch.setenv(key, val)
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket="runs")
        for f in run_dir.rglob("*"):
            if f.is_file():
                s3.upload_file(str(f), "runs", f"exp/inat2018_ce/train/ce/{f.relative_to(run_dir).as_posix()}")
        cfg = load_config(REPO / "configs/inat2018/discl_d2s.yaml", ["run_root=s3://runs/exp", "tracking.enabled=false",
                                                                     f"cache_dir={tmp_path / 'cache'}"])
        uri = resolve_init_from(cfg).training.init_checkpoint
        assert uri == "s3://runs/exp/inat2018_ce/train/ce/checkpoint_final_a0"
        assert not (tmp_path / "cache").exists()                 # no copy in the driver's node-local cache
        want = _final_state(run_dir)["model"]

        @ray.remote(num_cpus=0.1, runtime_env={"env_vars": env})
        def load(path):
            from discl_ray.training.checkpointing import load_model_state

            return load_model_state(path)

        state = ray.get(load.remote(uri), timeout=120)          # a Ray worker, the way Train workers load it
        assert state.keys() == want.keys() and all(torch.equal(state[k], want[k]) for k in want)
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
