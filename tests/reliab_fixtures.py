"""Helpers shared by the fault and bad-input tests: small experiments on disk, free ports, a real MLflow server.

Everything goes through the public entry points (``jobs.<stage>.main(argv)``) and the MLflow client, so the
tests keep their meaning whatever the training or generation internals become.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent

# A 5-class long-tail experiment small enough for a few seconds of Ray Train on one CPU.
LT_DATA = {
    "experiment": "fx", "dataset": {"image_size": 16}, "mining": {"few_max": 10, "many_min": 30},
    "generation": {"lams": [0.0, 0.5, 0.9]}, "scoring": {"threshold": 0.3},
    "training": {"lams": [0.0, 0.5, 1.0], "backbone": "small_cnn", "strategy": "diverse_to_specific",
                 "epochs": 4, "curriculum_epochs": 3, "cpus_per_worker": 0.5, "batch_size": 16, "lr": 0.003,
                 "max_failures": 2},
    "tracking": {"log_checkpoint": False},
}


def deep_update(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_update(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def write_config(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def lt_experiment(tmp_path: Path, over: dict | None = None, **fixture) -> tuple[Path, dict]:
    """Config file + upstream tables (rows, hard samples, spectrum, scores) as the stages write them.

    ``fixture`` goes to ``write_fixture`` (train_counts, low_quality, corrupt, …)."""
    from discl_ray.config import load_config
    from discl_ray.training.fixture import write_fixture

    run_root = tmp_path / "runs"
    data = deep_update(LT_DATA, {"run_root": str(run_root),
                                 "tracking": {"tracking_uri": f"sqlite:///{run_root / 'mlflow.db'}"}})
    data = deep_update(data, over or {})
    path = write_config(tmp_path / "exp.yaml", data)
    write_fixture(load_config(path), **fixture)
    return path, data


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def mlflow_server(root: Path, port: int | None = None) -> Iterator[tuple[str, subprocess.Popen]]:
    """A real ``mlflow server`` on 127.0.0.1 (sqlite store under ``root``, kept across restarts on the same
    ``port``) for the duration of the block; yields (uri, proc)."""
    from discl_ray.runtime.tracking import ui_command, wait_until_up

    root.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    cmd = ui_command(f"sqlite:///{root / 'server.db'}", port=port, artifacts=str(root / "artifacts"))
    log = open(root / "server.log", "ab")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(uri + "/health", timeout=120, proc=proc)
        yield uri, proc
    finally:
        stop_server(proc)
        log.close()


def stop_server(proc: subprocess.Popen) -> None:
    """Stop the server and every process it started (its own session: the workers die with it)."""
    import os
    import signal

    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


FAST_FAILURE_DETECTION = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500,
                          "health_check_timeout_ms": 500, "health_check_failure_threshold": 3}


def stage_process(stage: str, cfg_path: Path, *args: str, log: Path) -> subprocess.Popen:
    """``discl <stage> --config cfg_path ARGS`` as its own process (output to ``log``), as a job runs it."""
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


def python() -> str:
    return sys.executable


def ray_start_tripwire(monkeypatch) -> list:
    """Record every attempt to start (or join) a Ray cluster through the project's one entry point.

    ``init_ray`` looks up ``runtime._init_ray`` at call time, so this catches a stage that reaches its cluster
    start even when the test session's Ray is already up (``init_ray`` would return at once then). A test
    asserts the list is empty: proof of "no Ray start" that does not depend on how fast the machine is."""
    from discl_ray.runtime import cluster as runtime

    calls: list = []

    def refuse(cfg, **kwargs):
        calls.append(getattr(cfg, "experiment", cfg))
        raise RuntimeError("a Ray start was attempted where none may happen")

    monkeypatch.setattr(runtime, "_init_ray", refuse)
    return calls
