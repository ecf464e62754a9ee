"""End-to-end: the real Ray Train V2 trainer on crafted parquet tables, 2 workers, MLflow in sqlite, and a
worker killed mid-epoch (a real process exit) that the run survives with an unbroken λ history."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
import time

import pytest

from discl_ray.config import load_config
from discl_ray.training import fit
from discl_ray.training.fixture import write_fixture
from discl_ray.training.schedules import REAL_ONLY, schedule


def lt_config(run_root, *extra):
    return load_config(None, [
        f"run_root={run_root}", "experiment=fx", "dataset.image_size=16", "mining.few_max=10",
        "mining.many_min=30", "generation.lams=[0.0,0.5,0.9]", "training.lams=[0.0,0.5,1.0]",
        "scoring.threshold=0.3", "training.backbone=small_cnn", "training.strategy=diverse_to_specific",
        "training.epochs=4", "training.curriculum_epochs=3", "training.cpus_per_worker=0.5",
        "training.batch_size=16", "training.lr=0.003", f"tracking.tracking_uri=sqlite:///{run_root}/mlflow.db",
        *extra])


def mlflow_runs(run_root):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{run_root}/mlflow.db")
    return mlflow, mlflow.MlflowClient(), mlflow.search_runs(search_all_experiments=True)


def run_lt(ray_local, run_root, tmp_path, fault_epoch=None, *extra):
    """A 2-worker long-tail run on the fixture; optionally rank 1 exits for real in the middle of an epoch."""
    from discl_ray.training import build_trainer

    cfg = lt_config(run_root, "training.num_workers=2", "training.max_failures=2", *extra)
    write_fixture(cfg, corrupt=1)
    marker = tmp_path / "killed.txt"
    fault = {"epoch": fault_epoch, "marker": str(marker), "rank": 1} if fault_epoch is not None else None
    trainer, selector = build_trainer(cfg, run_name="e2e", fault=fault)
    try:
        result = trainer.fit()
        history = ray_local.get(selector.get_history.remote())
    finally:
        ray_local.kill(selector)
    assert result.error is None
    assert marker.exists() == (fault_epoch is not None)
    return result.metrics, history


def check_run(run_root, final, history):
    expected = schedule("diverse_to_specific", epochs=4, curriculum_epochs=3, lams=[0.0, 0.5, 1.0])
    assert expected == [0.0, 0.5, 1.0, REAL_ONLY]
    assert final["lam_history"] == expected                             # no gap, no duplicate
    assert [h["epoch"] for h in history] == [0, 1, 2, 3]
    # Group accuracies are counts over the fixture's 8 test rows per class (many = classes 0-1, medium = 2,
    # few = 3-4), and the overall accuracy is their row-weighted mean: numbers read off one confusion matrix.
    group_rows = {"many": 16, "medium": 8, "few": 16}
    for g, n in group_rows.items():
        hits = final[f"final_test_{g}_acc"] * n
        assert abs(hits - round(hits)) < 1e-6, (g, final[f"final_test_{g}_acc"])
    assert final["final_test_acc"] == pytest.approx(
        sum(final[f"final_test_{g}_acc"] * n for g, n in group_rows.items()) / 40)
    assert final["n_bad_images"] == 1                                   # the corrupt row was skipped
    assert final["final_test_acc"] > 0.3                                # 5 classes: well above chance
    assert final["select_metric"] == "val_acc" and 0 <= final["best_epoch"] < 4
    assert final["val_acc"] == final["best_val_acc"]                    # the selected epoch's validation score

    mlflow, client, runs = mlflow_runs(run_root)
    assert len(runs) == 1                                               # a restarted rank 0 reopens its run
    run = runs.iloc[0]
    assert run.status == "FINISHED"
    assert run["params.training.strategy"] == "diverse_to_specific"
    lam_steps = [(m.step, m.value) for m in client.get_metric_history(run.run_id, "lam")]
    assert sorted(lam_steps) == list(enumerate(expected))               # one λ per epoch, each once
    assert len(client.get_metric_history(run.run_id, "val_acc")) == 4
    assert run["metrics.final_test_acc"] == pytest.approx(final["final_test_acc"])
    arts = {a.path for a in client.list_artifacts(run.run_id)}
    assert {"config.yaml", "lam_schedule.png", "confusion_test.png", "checkpoint"} <= arts


def test_two_workers_finish_and_log_to_mlflow(ray_local, run_root, tmp_path):
    # Checkpoints at epochs 0, 1 and 3: epoch 2 reaches MLflow with epoch 3's checkpoint, each epoch once.
    final, history = run_lt(ray_local, run_root, tmp_path, None, "training.checkpoint_every=2")
    assert final["resumed_at_epoch"] == 0
    check_run(run_root, final, history)
    # Validation is sharded over the two ranks (each scores its half, the confusion counts are summed): the
    # selected model, scored here on the whole val split in one process, gets the validation accuracy the run
    # selected it by. A rank-0-only count (half the split) or a double count would not.
    from discl_ray.training import data as D
    from discl_ray.training.checkpointing import load_model_state
    from discl_ray.training.images import open_images
    from discl_ray.training.metrics import accuracy, confusion
    from discl_ray.training.models import build_model
    from discl_ray.training.transforms import build_pipeline

    mlflow, client, runs = mlflow_runs(run_root)
    weights = client.download_artifacts(runs.iloc[0].run_id, "checkpoint/model.pt", str(tmp_path))
    cfg = lt_config(run_root, "training.num_workers=2")
    pool = D.load_pool(cfg)
    net = build_model("small_cnn", pool.num_classes, cfg=cfg)
    net.load_state_dict(load_model_state(weights))
    pool, images = open_images(cfg, pool, build_pipeline(cfg))
    val = pool.split_idx("val")
    cm = confusion(net, pool, images, val, batch=cfg.training.eval_batch_size)
    assert cm.sum() == len(val) and accuracy(cm) == pytest.approx(final["val_acc"])


@pytest.mark.slow
def test_killed_worker_resumes_with_unbroken_lam_history(ray_local, run_root, tmp_path):
    """Rank 1 exits (os._exit) in the middle of epoch 2; FailureConfig restarts the group from the last
    checkpoint with the selector's history restored (~1 min here: a second worker-group start)."""
    final, history = run_lt(ray_local, run_root, tmp_path, fault_epoch=2)
    assert 1 <= final["resumed_at_epoch"] <= 2                          # restarted from a checkpoint, not 0
    check_run(run_root, final, history)
    # Rerunning a finished run (same name and storage) returns its result and logs nothing twice.
    again = fit(lt_config(run_root, "training.num_workers=2"), run_name="e2e")
    assert again["final_test_acc"] == final["final_test_acc"] and again["lam_history"] == final["lam_history"]
    check_run(run_root, again, history)


@pytest.mark.slow
def test_adaptive_low_quality_logs_gains_and_f1(ray_local, run_root):
    cfg = load_config(None, [
        f"run_root={run_root}", "experiment=lq", "dataset.image_size=16", "generation.lams=[0.5,0.7,0.9]",
        "training.lams=[0.5,0.9,1.0]", "scoring.threshold=0.2", "training.backbone=small_cnn",
        "training.task=low_quality", "training.strategy=adaptive", "training.epochs=3",
        "training.curriculum_epochs=2", "training.cpus_per_worker=0.5", "training.batch_size=16",
        "training.guidance_val_size=8", "training.random_real_size=16", "training.probe_steps=2",
        "tracking.enabled=false"])
    write_fixture(cfg, low_quality=True, train_counts=(12, 12, 12))
    final = fit(cfg, run_name="lq-adaptive")
    assert final["select_metric"] == "val_f1"
    assert 0 <= final["final_test_id_f1"] <= 1 and 0 <= final["final_test_ood_f1"] <= 1
    lams = final["lam_history"]
    assert len(lams) == 3 and lams[2] == REAL_ONLY and all(v in (0.5, 0.9, 1.0) for v in lams[:2])
    assert not (run_root / "mlflow.db").exists()                        # tracking.enabled=false respected


@pytest.mark.slow
def test_checkpoint_every_resume_matches_uninterrupted_run(ray_local, run_root, tmp_path):
    """checkpoint_every=3 (checkpoints after epochs 0, 2, 5, 6): the worker exits in the middle of epoch 4,
    the run resumes from epoch 2's checkpoint and re-runs epochs 3-4, and ends exactly as a run that was
    never interrupted; MLflow holds every epoch once, with the values of the uninterrupted run."""
    from discl_ray.training import build_trainer
    from discl_ray.training.checkpointing import read_state
    from discl_ray.training.trainer import run_trainer

    cfg = lt_config(run_root, "training.epochs=7", "training.curriculum_epochs=5", "training.checkpoint_every=3",
                    "training.strategy=random")
    write_fixture(cfg)
    marker = tmp_path / "killed.txt"
    results = {}
    for name, fault in (("straight", None), ("resumed", {"epoch": 4, "marker": str(marker), "rank": 0})):
        result = run_trainer(*build_trainer(cfg, run_name=name, fault=fault))
        results[name] = (result.metrics, read_state(result.checkpoint)["metrics"])
    assert marker.exists()
    (straight, straight_hist), (resumed, resumed_hist) = results["straight"], results["resumed"]
    # Checkpoints: the scheduled epochs 0, 2, 5, 6 and every epoch that improved validation (the selected
    # model lives in storage); the run resumes after the last one before the failure in epoch 4.
    best, improved = -1.0, set()
    for h in straight_hist:
        if h["val_acc"] > best:
            best, _ = h["val_acc"], improved.add(h["epoch"])
    last = max(e for e in {0, 2} | improved if e < 4)
    assert straight["resumed_at_epoch"] == 0 and resumed["resumed_at_epoch"] == last + 1
    assert resumed["lam_history"] == straight["lam_history"] == schedule(
        "random", epochs=7, curriculum_epochs=5, lams=[0.0, 0.5, 1.0], seed=0)
    for key in ("best_epoch", "best_val_acc", "final_test_acc", "final_test_few_acc"):
        assert resumed[key] == straight[key], key
    assert [h["epoch"] for h in resumed_hist] == list(range(7))
    for key in ("lam", "n_train", "train_loss", "val_acc"):
        assert [h[key] for h in resumed_hist] == [h[key] for h in straight_hist], key

    mlflow, client, runs = mlflow_runs(run_root)
    assert sorted(runs["tags.run_name"]) == ["resumed", "straight"]           # one MLflow run per run
    ids = dict(zip(runs["tags.run_name"], runs["run_id"]))
    for key in ("epoch", "lam", "train_loss", "val_acc"):
        points = {name: sorted((m.step, m.value) for m in client.get_metric_history(ids[name], key))
                  for name in ids}
        assert [s for s, _ in points["resumed"]] == list(range(7)), key      # no duplicate, no gap
        assert points["resumed"] == points["straight"], key


DRIVER = textwrap.dedent("""
    import sys, ray
    from discl_ray.config import load_config
    from discl_ray.training import fit
    cfg = load_config(None, sys.argv[2:])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    print("FINAL", fit(cfg, run_name="driver-kill", storage_path=sys.argv[1]))
""")


@pytest.mark.slow
def test_killed_driver_resumes_from_last_checkpoint(run_root, tmp_path):
    """Kill the driver process after its first checkpoint; the same run name + storage path continues.

    The local cluster outlives its killed driver by a second or two and keeps training meanwhile: the run is
    long enough (30 epochs of a few tenths of a second) not to finish in that time."""
    overrides = [f"run_root={run_root}", "experiment=fx", "dataset.image_size=16", "mining.few_max=10",
                 "mining.many_min=30", "generation.lams=[0.0,0.5]", "training.lams=[0.0,0.5,1.0]",
                 "scoring.threshold=0.3", "training.backbone=small_cnn", "training.epochs=30",
                 "training.curriculum_epochs=20", "training.strategy=random", "training.cpus_per_worker=0.5",
                 "training.batch_size=16", "tracking.enabled=false"]
    cfg = load_config(None, overrides)
    write_fixture(cfg)
    storage = tmp_path / "storage"
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    proc = subprocess.Popen([sys.executable, str(script), str(storage), *overrides])
    try:
        deadline = time.time() + 400
        while time.time() < deadline and len(list(storage.glob("driver-kill/checkpoint_*"))) < 2:
            time.sleep(0.5)
        assert proc.poll() is None, "the first driver finished before it could be killed"
    finally:
        proc.kill()
        proc.wait()
    done = len(list(storage.glob("driver-kill/checkpoint_*")))
    out = subprocess.run([sys.executable, str(script), str(storage), *overrides], capture_output=True, text=True,
                         timeout=500)
    assert out.returncode == 0, out.stderr[-3000:]
    final = eval(out.stdout.split("FINAL", 1)[1].strip(), {"nan": math.nan})
    assert final["lam_history"] == schedule("random", epochs=30, curriculum_epochs=20, lams=[0.0, 0.5, 1.0])
    assert done >= 2
    assert 1 <= final["resumed_at_epoch"] < 30                          # continued, not started over


@pytest.mark.slow
def test_clip_flyp_with_wise_ft(ray_local, run_root, tmp_path):
    """CLIP backbone through the scoring stage's loader (tiny custom open_clip), FLYP loss, WiSE-FT per α."""
    arch = {"embed_dim": 16, "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "head_width": 16,
                                            "patch_size": 8},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    path = tmp_path / "discl-e2e-clip.json"
    path.write_text(__import__("json").dumps(arch))
    cfg = load_config(None, [
        f"run_root={run_root}", "experiment=lqclip", "dataset.image_size=16", "generation.lams=[0.5,0.9]",
        "training.lams=[0.5,0.9,1.0]", "scoring.threshold=0.2", "scoring.model=discl-e2e-clip",
        f"scoring.model_config_path={path}", "scoring.pretrained=null", "training.backbone=clip",
        "training.loss=flyp", "training.wise_alphas=[0.0,0.5,1.0]", "training.task=low_quality",
        "training.strategy=easy_to_hard", "training.epochs=2", "training.curriculum_epochs=1",
        "training.cpus_per_worker=0.5", "training.batch_size=16", "training.lr=0.0005", "tracking.enabled=false"])
    write_fixture(cfg, low_quality=True, train_counts=(10, 10, 10))
    final = fit(cfg, run_name="clip-flyp")
    # α is chosen on ID validation; only the chosen α has test numbers.
    vals = {a: final[f"final_wise_val_{a}"] for a in ("0.0", "0.5", "1.0")}
    assert final["wise_alpha"] == float(max(sorted(vals, reverse=True), key=vals.get))
    assert final["final_wise_val_1.0"] == pytest.approx(final["best_val_f1"])   # α = 1: the selected model
    if final["wise_alpha"] == 1.0:
        assert final["final_wise_test_id_f1"] == pytest.approx(final["final_test_id_f1"])
    assert math.isfinite(final["final_wise_test_id_f1"]) and math.isfinite(final["final_wise_test_ood_f1"])
    assert not any(k.startswith("final_wise_0") or k.startswith("final_wise_1") for k in final)
    assert final["lam_history"] == [0.5, REAL_ONLY]


@pytest.mark.gpu
def test_gpu_worker_trains(ray_local, run_root):
    """One GPU worker (needs a CUDA device in the Ray cluster)."""
    cfg = lt_config(run_root, "training.gpus_per_worker=1", "tracking.enabled=false")
    write_fixture(cfg)
    final = fit(cfg, run_name="gpu")
    assert final["lam_history"] == [0.0, 0.5, 1.0, REAL_ONLY] and final["final_test_acc"] > 0.3


@pytest.mark.parametrize("address", [None, "127.0.0.1:6390"])
def test_preemption_watcher_off_only_on_a_cluster_the_driver_started(ray_local, run_root, monkeypatch, address):
    """Ray Train's preemption watcher (cloud nodes being reclaimed) is switched off for a cluster this driver
    started itself and left at Ray's default on a joined one (ray.address); a value the user set wins."""
    import os

    from discl_ray.training import build_trainer
    from discl_ray.training.trainer import PREEMPTION_WATCHER_ENV

    monkeypatch.delenv(PREEMPTION_WATCHER_ENV, raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = lt_config(run_root, *([f"ray.address={address}"] if address else []))
    _, selector = build_trainer(cfg, run_name=f"pw-{bool(address)}")     # builds, trains nothing
    ray_local.kill(selector)
    assert os.environ.get(PREEMPTION_WATCHER_ENV) == (None if address else "0")
    monkeypatch.setenv(PREEMPTION_WATCHER_ENV, "1")
    _, selector = build_trainer(cfg, run_name=f"pw-user-{bool(address)}")
    ray_local.kill(selector)
    assert os.environ[PREEMPTION_WATCHER_ENV] == "1"


def test_fixture_tables_match_the_stages_schemas(tmp_path):
    """The trainer fixtures' spectrum and scores are the tables the generate and score stages write, column for
    column and type for type (``format``, ``noise_seed`` included): a stage adding a column fails here until the
    fixture writes it too, so the trainer is never tested on a table no stage produces."""
    import pyarrow.parquet as pq

    from discl_ray.generation.engine import noise_seed
    from discl_ray.generation.plan import SPECTRUM_SCHEMA
    from discl_ray.runtime.cluster import RunPaths
    from discl_ray.runtime.io import read_parquet_dir
    from discl_ray.scoring.embed import SCORE_COLUMNS

    cfg = lt_config(tmp_path / "runs")
    write_fixture(cfg, train_counts=(12, 4), val_per_class=2)
    paths = RunPaths.from_config(cfg)
    spectrum = read_parquet_dir(paths.stage("generate", "spectrum"))
    assert spectrum.num_rows > 0
    assert spectrum.schema.remove_metadata().equals(SPECTRUM_SCHEMA), spectrum.schema
    assert set(spectrum["format"].to_pylist()) == {"png"}
    row = spectrum.slice(0, 1).to_pylist()[0]
    assert row["noise_seed"] == noise_seed(row["source_image_id"], row["lam"], row["seed"],
                                           cfg.generation.shared_noise)
    scores_dir = paths.stage("score", "scores")
    scores = pq.read_schema(next(iter(sorted(scores_dir.glob("*.parquet")))))
    assert scores.names == SCORE_COLUMNS
    # the score stage's types (scoring/job.py casts to these)
    assert [str(t) for t in scores.types] == ["string", "string", "int64", "double", "int64", "double", "double",
                                              "double", "string"]
