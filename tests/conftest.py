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

# `make test` runs the suite in TEST_JOBS processes (pytest-xdist). With more busy torch threads than cores,
# torch's OpenMP threads spin while waiting for peers that are descheduled: the shipped-world gates took 148 s
# wall (142 CPU-s) with 2 threads beside two busy processes on 2 cores, 49 s (31 CPU-s) with 1 thread
# (docs/benchmarks.md, "Test suite"). So each test process, and every Ray worker its cluster starts, computes
# on one thread when processes run side by side; alone, the tests that train models use both cores.
PARALLEL = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1
TORCH_THREADS = 1 if PARALLEL else 2
if PARALLEL:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")

# Test files in order of their measured cost, heaviest first (the rest follow in collection order). pytest-xdist
# hands each process whole files in collection order (`--dist loadfile --no-loadscope-reorder`): starting the
# long ones first keeps one process from running the last long file alone while the other idles.
HEAVY_FIRST = ("test_rehearse_workstation.py", "test_faults.py", "test_quickstart.py", "test_world.py", "test_gap_world.py", "test_trainer_paths.py",
               "test_mlflow_faults.py", "test_storage_s3.py", "test_node_loss.py", "test_generate_kill.py", "test_generation.py",
               "test_ui.py", "test_bad_inputs.py", "test_scoring_job.py", "test_training_e2e.py")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Every skipped test by its id and reason, in one section of the output: a skip that depends on the machine
    (no root, no mount namespace, no GPU) is listed in CI's log instead of being counted only."""
    skipped = terminalreporter.stats.get("skipped", [])
    if not skipped:
        return
    terminalreporter.section(f"skipped tests by id ({len(skipped)})")
    for rep in skipped:
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        terminalreporter.write_line(f"SKIPPED {rep.nodeid}: {reason}")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(HEAVY_FIRST)))   # stable: order within a file kept


@pytest.fixture(scope="session")
def torch_threads() -> int:
    """Threads for a test that trains or samples a model in the test process itself (see TORCH_THREADS)."""
    import torch

    torch.set_num_threads(TORCH_THREADS)
    return TORCH_THREADS


@pytest.fixture(scope="session")
def ray_local():
    """A 2-CPU local Ray cluster shared by the session's tests (stopped at the end)."""
    import ray

    from discl_ray.runtime.cluster import pin_loopback

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
