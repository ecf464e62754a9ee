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


def _slow_health_server(delays: list[float]):
    """An HTTP server on loopback whose n-th /health answer waits delays[n] seconds (the last delay repeats)."""
    import http.server
    import threading
    import time

    calls = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 — http.server's name
            calls.append(self.path)
            time.sleep(delays[min(len(calls), len(delays)) - 1])
            try:
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"OK")
            except OSError:      # the client gave up on this answer
                pass

        def log_message(self, *args):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, calls


def test_a_busy_tracking_server_is_asked_again_not_declared_lost():
    # A cold or busy server (the workstation rehearsal's, with three jobs on two cores) takes the connection but
    # answers after the first request's timeout: the check asks again, as MLflow's client would, and passes.
    srv, calls = _slow_health_server([3.0, 0.0])
    try:
        check_reachable(f"http://127.0.0.1:{srv.server_address[1]}", timeout=1.0, patience=30)
        assert len(calls) == 2
    finally:
        srv.shutdown()
    # one that never answers within the patience is declared lost, naming the timeout
    srv, calls = _slow_health_server([5.0])
    try:
        with pytest.raises(TrackingUnavailable, match="timed out"):
            check_reachable(f"http://127.0.0.1:{srv.server_address[1]}", timeout=0.5, patience=2)
        assert 2 <= len(calls) <= 4
    finally:
        srv.shutdown()


def test_nothing_listening_fails_at_once_whatever_the_patience():
    import time

    port = _free_port()
    t0 = time.monotonic()
    with pytest.raises(TrackingUnavailable, match=f"127.0.0.1:{port}.*refused"):
        check_reachable(f"http://127.0.0.1:{port}", patience=120)
    assert time.monotonic() - t0 < 5
