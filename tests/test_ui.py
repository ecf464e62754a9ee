"""`discl ui` serves the MLflow page on 127.0.0.1 over the run's sqlite store; the test stops it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from discl_ray.runtime.tracking import TrackingUnavailable, check_reachable, wait_until_up

REPO = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ui_serves_mlflow_on_loopback(tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    (tmp_path / "runs").mkdir()
    from discl_ray.runtime.tracking import ensure_experiment

    ensure_experiment(uri, "uitest", str(tmp_path / "runs" / "mlartifacts"))
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("uitest")
    with mlflow.start_run(run_name="r1"):
        mlflow.log_metric("val_acc", 0.5)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"experiment: uitest\nrun_root: {tmp_path / 'runs'}\n")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.Popen([sys.executable, "-m", "discl_ray.cli", "ui", "--config", str(cfg), "--port", str(port)],
                            cwd=REPO, env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        wait_until_up(f"http://127.0.0.1:{port}/health", timeout=120, proc=proc)
        page = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10).read().decode()
        assert "mlflow" in page.lower()
        # The server reads the run's store: the experiment logged above is listed by its REST API.
        check_reachable(f"http://127.0.0.1:{port}")
        client = mlflow.MlflowClient(tracking_uri=f"http://127.0.0.1:{port}")
        assert client.get_experiment_by_name("uitest") is not None
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    with pytest.raises(TrackingUnavailable, match=f"127.0.0.1:{port}"):
        check_reachable(f"http://127.0.0.1:{port}", timeout=2)


def test_ui_refuses_http_uri(tmp_path, capsys):
    from jobs.ui import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"run_root: {tmp_path}\ntracking:\n  tracking_uri: http://127.0.0.1:1\n")
    env_uri = os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        assert main(["--config", str(cfg)]) == 2
    finally:
        if env_uri:
            os.environ["MLFLOW_TRACKING_URI"] = env_uri
    assert "already a server" in capsys.readouterr().err
