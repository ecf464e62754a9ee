"""A worker node lost mid-stage on a loopback multi-node Ray cluster (issue 29): spot preemption, a GPU fault,
an OOM-killed raylet. ``ray.cluster_utils.Cluster`` starts a head that holds no CPU (so every task, actor and
Train worker runs on the worker node, as on a GPU cluster whose head only coordinates) and one worker node;
the test removes that node with everything on it (raylet, object store, workers: ``allow_graceful=False``)
once the stage is half done, adds a fresh node, and checks the stage ends exactly as an uninterrupted run.

The stage runs as its own process through the CLI, joining the cluster with ``ray.address``, as a job does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.compute as pc
import pytest
import yaml
from gen_fixtures import tiny_sd_dir, write_experiment

from discl_ray.runtime.io import parquet_files, read_parquet_dir

# 100-150 s each on 2 cores (a multi-node cluster, a node removed and re-added): over the default suite's
# budget beside the rest, so they run in `make test-slow` (docs/reliability.md).
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
FAST_FAILURE_DETECTION = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500,
                          "health_check_timeout_ms": 500, "health_check_failure_threshold": 3}


def cli(stage: str, cfg_path: Path, *args: str, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.Popen([sys.executable, "-m", "discl_ray.cli", stage, "--config", str(cfg_path), *args],
                            env=env, cwd=REPO, stdout=open(log, "wb"), stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, log: Path, timeout: float = 300) -> str:
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return log.read_text(errors="replace")


@pytest.fixture()
def loopback_cluster():
    """A head with no CPU and one 2-CPU worker node, all on 127.0.0.1; yields (cluster, worker node)."""
    assert os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == "0", "conftest pins Ray to loopback"
    from ray.cluster_utils import Cluster

    # A lost node is declared dead after health_check_failure_threshold missed checks (Ray's defaults: 5 × 3 s,
    # plus a grace period); the same rule, faster, so the test waits seconds instead of half a minute.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                            "_system_config": FAST_FAILURE_DETECTION})
    try:
        node = cluster.add_node(num_cpus=2)
        cluster.wait_for_nodes()
        assert cluster.head_node.node_ip_address == node.node_ip_address == "127.0.0.1"
        yield cluster, node
    finally:
        cluster.shutdown()


def replace_node(cluster, node) -> object:
    """Remove ``node`` at once (its raylet, object store and workers die; no drain), then add a fresh one."""
    cluster.remove_node(node, allow_graceful=False)
    new = cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    return new


# -- generate ----------------------------------------------------------------------------------------------
def _gen_experiment(root: Path, model: Path):
    # 5 sources × 2 λ × 2 seeds, one source per block: the run writes 5 parts one by one. float64 on the CPU
    # is bit-identical whatever the batch layout, so the bytes can be compared with an uninterrupted run.
    return write_experiment(root, model, n_sources=5, lams=[0.0, 0.5], seeds=[0, 1],
                            overrides={"steps": 2, "dtype": "float64", "batch_size": 1, "rows_per_block": 4})


def uninterrupted_spectrum(cfg) -> dict[str, bytes]:
    """image_id → encoded image of an uninterrupted run: the stage's own steps (plan, prepare, the generator
    actor's class, encode) run in this process, without Ray — the rows the Ray path gives (tests/test_generation.py)."""
    from discl_ray.generation.actor import SpectrumGenerator
    from discl_ray.generation.output import encode_rows
    from discl_ray.generation.plan import plan_sources, prepare_sources, read_inputs, spectrum_lams

    gen = cfg.generation
    sources = plan_sources(*read_inputs(cfg))
    prepared = prepare_sources(sources, spectrum_lams(gen), list(gen.seeds), root=cfg.dataset.root,
                               width=gen.width, height=gen.height)
    rows = encode_rows(SpectrumGenerator(gen.model_dump(mode="json"))(prepared), gen.image_format)
    assert set(rows["error"].to_pylist()) == {""}
    return dict(zip(rows["image_id"].to_pylist(), rows["image"].to_pylist()))


def test_node_loss_mid_generate(tmp_path, loopback_cluster):
    cluster, node = loopback_cluster
    model = tiny_sd_dir(tmp_path / "models")
    cfg = _gen_experiment(tmp_path / "lost", model)
    data = cfg.model_dump(mode="json")
    data["ray"] = {"address": cluster.address}
    cfg_path = tmp_path / "job.yaml"
    cfg_path.write_text(yaml.safe_dump(data))
    out_dir = tmp_path / "lost" / "gt" / "generate" / "spectrum"
    log = tmp_path / "driver.log"
    proc = cli("generate", cfg_path, log=log)
    deadline = time.monotonic() + 300
    while not parquet_files(out_dir) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the stage ended before the node could be lost:\n" + log.read_text()[-3000:]
    written = len(read_parquet_dir(out_dir))
    replace_node(cluster, node)
    out = finish(proc, log)
    assert proc.returncode == 0, out[-4000:]
    assert 0 < written < 20, "the node must be lost mid-stage"
    summary = json.loads((tmp_path / "lost" / "gt" / "generate" / "summary.json").read_text())
    assert summary["generated"] == 20 and summary["failed"] == 0, summary   # one run, every key made once

    got = read_parquet_dir(out_dir)
    assert got.num_rows == pc.count_distinct(got["image_id"]).as_py() == 20  # every key exactly once
    want = uninterrupted_spectrum(_gen_experiment(tmp_path / "ref", model))
    assert sorted(got["image_id"].to_pylist()) == sorted(want)
    assert all(want[k] == v for k, v in zip(got["image_id"].to_pylist(), got["image"].to_pylist()))
    assert not list((tmp_path / "lost").rglob("*.tmp"))


# -- a 2-worker streamed training ----------------------------------------------------------------------------
def metric_points(client, run, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))


def test_node_loss_mid_streamed_training(tmp_path, loopback_cluster, ray_local, monkeypatch):
    """Two Ray Train workers stream their images through Ray Data (image cache off), `max_failures: 2`. Once
    epoch 1 is in MLflow the node holding both workers (and the stream's read tasks) is lost; a fresh node
    comes up and the run restarts from its last checkpoint. It ends exactly as an uninterrupted run with the
    same seed (run in this process, on the test session's one-node cluster): λ history, the selected epoch,
    every test metric, and each epoch once in MLflow with the same values."""
    from reliab_fixtures import lt_experiment, mlflow_server
    from test_faults import epochs_logged, mlflow_run

    from jobs.train import main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cluster, node = loopback_cluster
    epochs = 5
    with mlflow_server(tmp_path / "server") as (uri, _server):
        path, data = lt_experiment(tmp_path, {
            "training": {"num_workers": 2, "epochs": epochs, "curriculum_epochs": 3, "strategy": "random",
                         "batch_size": 8, "image_cache_mb": 0, "max_failures": 2},
            "tracking": {"tracking_uri": uri}})
        exp = data["experiment"]
        assert main(["--config", str(path), "--run-name", "straight", "--json", str(tmp_path / "straight.json")]) == 0
        joined = tmp_path / "joined.yaml"
        joined.write_text(yaml.safe_dump({**data, "ray": {"address": cluster.address}}))
        log = tmp_path / "driver.log"
        proc = cli("train", joined, "--run-name", "lost", "--json", str(tmp_path / "lost.json"), log=log)
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline and epochs_logged(uri, exp, "lost") < 2:
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before the node could be lost:\n" + log.read_text()[-3000:]
        replace_node(cluster, node)
        out = finish(proc, log)
        assert proc.returncode == 0, out[-4000:]
        client, run_s = mlflow_run(uri, exp, "straight")
        _, run_l = mlflow_run(uri, exp, "lost")
        assert run_l.info.status == "FINISHED"
        for key in ("epoch", "lam", "n_train", "train_loss", "val_acc"):
            lost = metric_points(client, run_l, key)
            assert [s for s, _ in lost] == list(range(epochs)), key            # each epoch once: no gap, no repeat
            assert lost == metric_points(client, run_s, key), key
    straight = json.loads((tmp_path / "straight.json").read_text())
    resumed = json.loads((tmp_path / "lost.json").read_text())
    assert 1 <= resumed["resumed_at_epoch"] < epochs                           # from a checkpoint, not from 0
    assert resumed["lam_history"] == straight["lam_history"] and len(resumed["lam_history"]) == epochs
    for key in ("best_epoch", "best_val_acc", "final_test_acc", "final_test_few_acc", "final_test_many_acc"):
        assert resumed[key] == straight[key], key
