"""Runtime: one local Ray cluster per driver even when stages start at the same time from threads."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest


def test_concurrent_init_ray_starts_one_cluster(tmp_path):
    # In a fresh process (the suite's own Ray must not be up): three threads call init_ray at once, as the
    # quickstart's concurrent trainings and `bench replicate` do. Without the lock each could start a cluster.
    script = textwrap.dedent(f"""
        import threading, ray
        from discl_ray.config import load_config
        from discl_ray.runtime.cluster import init_ray
        cfg = load_config(data={{"experiment": "t", "run_root": {str(tmp_path / "r")!r},
                                 "ray": {{"num_cpus": 1, "include_dashboard": False}}}})
        barrier = threading.Barrier(3)
        def go():
            barrier.wait()
            init_ray(cfg)
        threads = [threading.Thread(target=go) for _ in range(3)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        print("UP", ray.is_initialized(), "IP", [n["NodeManagerAddress"] for n in ray.nodes()])
        ray.shutdown()
    """)
    # The embedded cluster pins itself to loopback even without the switch in the environment.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "UP True" in out.stdout and "IP ['127.0.0.1']" in out.stdout, out.stdout
    assert (out.stdout + out.stderr).count("Started a local Ray instance") == 1, out.stderr[-3000:]


def test_storage_local_semantics(tmp_path):
    """Storage on a local path: atomic writes, hidden/temp files ignored, pickles as its URI."""
    import pickle

    import pyarrow as pa

    from discl_ray.runtime.io import parquet_files, read_parquet_dir, replace_parquet_dir
    from discl_ray.runtime.storage import Storage, is_uri

    root = Storage.from_uri(str(tmp_path / "a"))
    part = root.join("x", "p1.parquet")
    part.write_parquet(pa.table({"k": [1, 2]}))
    (tmp_path / "a" / "x" / ".p0.parquet.1234.tmp").write_bytes(b"half")     # a killed writer's leftover
    root.join("x", "_lease.json").write_text("{}")
    assert [f.name for f in root.join("x").parquet_files()] == ["p1.parquet"]
    assert read_parquet_dir(root / "x")["k"].to_pylist() == [1, 2]
    assert replace_parquet_dir(pa.table({"k": [3]}), root / "x", prefix="t").name == "t.parquet"
    assert [p.name for p in parquet_files(tmp_path / "a" / "x")] == ["t.parquet"]
    assert pickle.loads(pickle.dumps(root)) == root and str(root) == str(tmp_path / "a") and root.is_local
    assert is_uri("s3://b/p") and is_uri("gs://b/p") and not is_uri("runs") and not is_uri("file:///tmp")
    root.join("x").delete()
    assert not root.join("x").exists()


def test_object_store_run_root_and_tracking_rules(tmp_path, monkeypatch):
    """run_root=s3://… gives Storage stage paths and a local cache; on a cluster tracking must be http(s)."""

    from discl_ray.config import load_config
    from discl_ray.runtime.cluster import RunPaths, TrackingConfigError, tracking_uri
    from discl_ray.runtime.storage import Storage

    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")                  # no region lookup over the network
    monkeypatch.setenv("DISCL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = load_config(data={"experiment": "e", "run_root": "s3://bkt/runs"})
    paths = RunPaths.from_config(cfg)
    stage = paths.stage("generate", "spectrum")
    assert isinstance(stage, Storage) and str(stage) == "s3://bkt/runs/e/generate/spectrum"
    assert stage.path == "bkt/runs/e/generate/spectrum" and paths.cache == (tmp_path / "cache").resolve()
    with pytest.raises(TrackingConfigError, match="run_root is an object store"):
        tracking_uri(cfg)
    local = load_config(data={"experiment": "e", "run_root": str(tmp_path / "r"), "ray": {"address": "auto"}})
    with pytest.raises(TrackingConfigError, match=r"tracking\.tracking_uri .*http\(s\)"):
        tracking_uri(local)
    served = load_config(data={"run_root": str(tmp_path / "r"), "ray": {"address": "auto"},
                               "tracking": {"tracking_uri": "http://mlflow.example:5000"}})
    assert tracking_uri(served) == "http://mlflow.example:5000"
    assert tracking_uri(load_config(data={"run_root": str(tmp_path / "r")})).startswith("sqlite:///")



def test_stage_runs_opened_from_threads_land_in_their_own_experiments(tmp_path, monkeypatch):
    """Stages run side by side in threads of one process (the quickstart's two tasks): each MLflow run lands in
    its own stage's experiment although MLflow's active experiment is process-wide, and runs stay open at once
    (only their opening is serialised)."""
    import threading

    import mlflow

    from discl_ray.config import load_config
    from discl_ray.runtime import tracking

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfgs = {name: load_config(data={"experiment": name, "run_root": str(tmp_path / "r"),
                                    "tracking": {"tracking_uri": uri}}) for name in ("lt", "lq")}
    both_open = threading.Barrier(2, timeout=60)
    opened: dict[str, list[str]] = {"lt": [], "lq": []}

    def stage(name: str) -> None:
        for i in range(3):
            with tracking.run(cfgs[name], "score", run_name=f"{name}-{i}", log_params=False) as active:
                opened[name].append(active.info.run_id)
                both_open.wait()            # the other task's run is open at the same time
                mlflow.log_metric("x", i)   # this thread's run, not the other's

    threads = [threading.Thread(target=stage, args=(n,)) for n in cfgs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    client = mlflow.MlflowClient(tracking_uri=uri)
    for name, ids in opened.items():
        exp = client.get_experiment_by_name(name)
        assert len(ids) == 3
        for i, run_id in enumerate(ids):
            run = client.get_run(run_id)
            assert run.info.experiment_id == exp.experiment_id, (name, run.info.run_name)
            assert run.info.run_name == f"{name}-{i}" and run.data.metrics == {"x": float(i)}
