"""Shared fixtures: a local Ray cluster per test session, small run roots."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray starts workers at nice 15 by default; on a busy 2-core machine they starve behind the test process.
os.environ.setdefault("RAY_worker_niceness", "0")
# Every cluster the tests start advertises 127.0.0.1 (Ray reads this once, at import; 0 = loopback on Linux).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# MLflow retries a failed HTTP request 7 times with exponential backoff (~4 minutes) before it gives up. The
# tests that stop a tracking server want that failure in seconds; set before the local cluster starts so its
# workers inherit it (sqlite stores, which every other test uses, never retry over HTTP).
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", "0")


@pytest.fixture(scope="session")
def ray_local():
    """A 2-CPU local Ray cluster shared by the session's tests (stopped at the end)."""
    import ray

    from discl_ray.runtime import pin_loopback

    if not ray.is_initialized():
        pin_loopback()
        # address="local": this session's own cluster, never one that another test process started
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def ray_private():
    """A fresh 2-CPU local cluster: address="local" never joins another cluster found on the machine."""
    import ray

    if ray.is_initialized():
        yield ray
        return
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture()
def run_root(tmp_path):
    """A fresh run root for one test."""
    return tmp_path / "runs"


@pytest.fixture(autouse=True)
def _isolate_mlflow_env():
    """``mlflow.set_tracking_uri`` exports MLFLOW_TRACKING_URI; keep one test's store out of the next."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before
