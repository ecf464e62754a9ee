"""`discl submit` against a real local Ray head (127.0.0.1, token auth) started and stopped by the test."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from discl_ray.cli.submit import EXCLUDES, entrypoint, runtime_env

REPO = Path(__file__).resolve().parent.parent


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _wait_port(port: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {proc.returncode}: {proc.stdout.read()}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"Ray dashboard did not open port {port}")


@pytest.fixture()
def ray_head():
    """A 1-CPU Ray head on 127.0.0.1 with its own short temp dir; stopped (process group) afterwards.

    ``ray stop`` is not used: it would stop every Ray cluster on this shared machine."""
    temp = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: unix socket paths are limited
    gcs, dash, client, agent, metrics = _free_ports(5)
    # The head runs this virtualenv's Python, as a cluster image would run its own: 'python' in a job's
    # entry point must be the one with the project's dependencies.
    env = {**os.environ, "RAY_AUTH_MODE": "token",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", f"--port={gcs}",
           "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
           f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
           f"--metrics-export-port={metrics}", "--num-cpus=1", "--include-dashboard=true", f"--temp-dir={temp}"]
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        _wait_port(dash, proc)
        yield f"http://127.0.0.1:{dash}"
    finally:
        # SIGTERM lets raylet/GCS exit cleanly; the blocking `ray start` parent ignores it, hence the KILL.
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=3)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        # Ray daemons that left our process group still hold the temp dir open: end those (by pid) too.
        out = subprocess.run(["pgrep", "-f", temp], capture_output=True, text=True).stdout.split()
        for pid in map(int, out):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(temp, ignore_errors=True)


def test_entrypoint_and_runtime_env(tmp_path):
    cmd, env = entrypoint("train", str(REPO / "configs/toy/digits_lt.yaml"), ["training.epochs=1"], REPO)
    assert cmd == "python -m discl_ray.cli train --config configs/toy/digits_lt.yaml training.epochs=1"
    assert env == {}
    outside = tmp_path / "c.yaml"
    outside.write_text(f"experiment: ext\nrun_root: {tmp_path}\n")
    cmd, env = entrypoint("prompts", str(outside), ["dataset.seed=3"], REPO)
    assert cmd == "python -m discl_ray.cli.submit prompts"
    assert "experiment: ext" in env["DISCL_CONFIG_YAML"] and "seed: 3" in env["DISCL_CONFIG_YAML"]
    with pytest.raises(ValueError, match="cannot be submitted; choose from: world, mine"):
        entrypoint("ui", None, [], REPO)
    # one command for a whole pipeline: the stage names follow `pipeline`, overrides after them
    cmd, _ = entrypoint("pipeline", str(REPO / "configs/toy/digits_lt.yaml"), ["training.epochs=1"], REPO,
                        ["mine", "prompts"])
    assert cmd == ("python -m discl_ray.cli pipeline mine prompts --config configs/toy/digits_lt.yaml "
                   "training.epochs=1")
    cmd, _ = entrypoint("pipeline", str(outside), [], REPO, ["prompts"])
    assert cmd == "python -m discl_ray.cli.submit pipeline prompts"
    with pytest.raises(ValueError, match="unknown 'mind'; choose from: world, mine"):
        entrypoint("pipeline", None, [], REPO, ["mind"])
    with pytest.raises(ValueError, match="takes key=value overrides only"):
        entrypoint("train", None, [], REPO, ["mine"])
    renv = runtime_env(REPO, {"A": "1"})
    assert renv["working_dir"] == str(REPO) and renv["env_vars"]["A"] == "1"
    assert {"/runs/", "/.venv/", "/data/"} <= set(renv["excludes"]) and renv["excludes"] == EXCLUDES


def test_submit_bad_config_submits_nothing(tmp_path, capsys, monkeypatch):
    from jobs.submit import main

    assert main(["train", "--address", "http://127.0.0.1:1", "training.strategy=sideways"]) == 2
    assert "training.strategy" in capsys.readouterr().err
    # A workstation head (loopback Ray address): a loopback MLflow server is the right one, so the checks pass
    # and the client goes on to the (absent) job server; a remote head's refusal is in tests/test_rehearse.py.
    assert main(["train", "--address", "http://127.0.0.1:1", "tracking.tracking_uri=http://127.0.0.1:5000"]) == 2
    assert "cannot reach the Ray job server at http://127.0.0.1:1" in capsys.readouterr().err
    # A client-side sqlite store is refused before anything is submitted, even on a workstation head.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///runs/mlflow.db")
    assert main(["train", "--address", "http://127.0.0.1:1"]) == 2
    assert "MLFLOW_TRACKING_URI=sqlite:///runs/mlflow.db is a store only one process" in capsys.readouterr().err


def test_submit_prompts_stage_succeeds(ray_head, tmp_path, capsys, monkeypatch):
    from jobs.submit import main

    monkeypatch.chdir(REPO)
    run_root = tmp_path / "runs"
    cfg = tmp_path / "job.yaml"
    cfg.write_text(f"base: {REPO / 'configs/toy/digits_lt.yaml'}\nexperiment: jobtest\nrun_root: {run_root}\n")
    rc = main(["prompts", "--address", ray_head, "--config", str(cfg), "prompts.template=a drawing of {name}"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "submitted prompts as job " in out and out.rstrip().endswith("SUCCEEDED")
    assert "prompts for 10 classes" in out  # the job's own log line, streamed back
    import pyarrow.parquet as pq

    files = sorted((run_root / "jobtest" / "prompts").glob("*.parquet"))
    assert files, "the job wrote no prompt table"
    table = pq.read_table(files[0])
    assert table.num_rows == 10
    assert table["gen_prompts"][0].as_py()[0].startswith("a drawing of")
    # A failing job makes the command fail: 'world' needs models this run root does not have ... use a
    # stage whose config is valid but whose work fails on the cluster: report on an empty store.
    rc = main(["report", "--address", ray_head, "--config", str(cfg)])
    assert rc == 1
    assert capsys.readouterr().out.rstrip().endswith("FAILED")
