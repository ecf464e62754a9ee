"""Real faults in the default suite: a Train worker process killed with SIGKILL mid-run, the node holding a
streamed training lost, the `discl train` driver killed (and its MLflow server restarted) and rerun, the
`discl sweep` driver killed with SIGKILL and resubmitted, the MLflow server stopped while a training logs to it.

The training faults share one uninterrupted run (the ``straight`` fixture) that each faulted run must equal.

Every fault hits a real process (found among this test's own descendants, never by name machine-wide), and
every outcome is read through the public entry points and the MLflow client.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import psutil
import pytest
import yaml
from reliab_fixtures import finish, loopback_cluster, lt_experiment, mlflow_server, stage_process  # noqa: F401

REAL_ONLY = -1.0
EPOCHS = 10           # epochs take well under a second: enough of them that a fault lands mid-run
# Two workers streaming their images through their reader actors (image cache off), max_failures 2 (LT_DATA).
TRAIN = {"num_workers": 2, "epochs": EPOCHS, "curriculum_epochs": 3, "strategy": "random", "batch_size": 8,
         "image_cache_mb": 0}
FINAL = ("best_epoch", "best_val_acc", "final_test_acc", "final_test_few_acc", "final_test_many_acc")


def own_processes(marker: str, root_pid: int | None = None) -> list[psutil.Process]:
    """Descendants of ``root_pid`` (default: this process) whose command line holds ``marker``."""
    out = []
    for p in psutil.Process(root_pid or os.getpid()).children(recursive=True):
        try:
            if marker in " ".join(p.cmdline()):
                out.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


def _is_agent(p: psutil.Process) -> bool:
    try:
        return p.name() in ("ray::DashboardAgent", "ray::RuntimeEnvAgent")
    except psutil.NoSuchProcess:
        return False


def mlflow_run(uri: str, experiment: str, run_name: str):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return client, None
    runs = client.search_runs([exp.experiment_id], f"tags.mlflow.runName = '{run_name}'")
    return client, (runs[0] if runs else None)


def epochs_logged(uri: str, experiment: str, run_name: str) -> int:
    client, run = mlflow_run(uri, experiment, run_name)
    return len(client.get_metric_history(run.info.run_id, "epoch")) if run else 0


@pytest.fixture(scope="module")
def straight(tmp_path_factory, ray_local):
    """The uninterrupted run every training fault here is compared with: ``TRAIN`` (2 workers) with seed 0 on
    the session's cluster, tracked in its own sqlite store. Returns (result JSON, tracking URI, experiment)."""
    import json

    from jobs.train import main

    root = tmp_path_factory.mktemp("straight")
    path, data = lt_experiment(root, {"training": TRAIN})
    assert main(["--config", str(path), "--run-name", "straight", "--json", str(root / "straight.json")]) == 0
    return json.loads((root / "straight.json").read_text()), data["tracking"]["tracking_uri"], data["experiment"]


def assert_equals_straight(straight, result: dict, uri: str, run_name: str, experiment: str = "fx"):
    """``result`` (a resumed run's JSON) and its MLflow run end exactly as the uninterrupted run: λ history,
    selected epoch, test metrics, and every epoch once in MLflow with the same values."""
    want, s_uri, s_exp = straight
    assert 1 <= result["resumed_at_epoch"] < EPOCHS                  # restarted from a checkpoint, not from 0
    assert result["lam_history"] == want["lam_history"]
    assert len(result["lam_history"]) == EPOCHS and result["lam_history"][3:] == [REAL_ONLY] * (EPOCHS - 3)
    for key in FINAL:
        assert result[key] == want[key], key
    s_client, run_s = mlflow_run(s_uri, s_exp, "straight")
    client, run = mlflow_run(uri, experiment, run_name)
    assert run.info.status == "FINISHED"
    for key in ("epoch", "lam", "n_train", "train_loss", "val_acc"):
        got = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        assert [s for s, _ in got] == list(range(EPOCHS)), key      # each epoch once: no gap, no duplicate
        assert got == sorted((m.step, m.value) for m in s_client.get_metric_history(run_s.info.run_id, key)), key
    return client, run


# -- a Train worker killed mid-run ------------------------------------------------------------------------
def test_killed_train_worker_resumes_from_last_checkpoint(tmp_path, ray_local, straight):
    """Two workers. Once epoch 1 is in MLflow (so epoch 0's checkpoint is registered) one worker process gets
    SIGKILL; FailureConfig restarts the group from the last checkpoint. The run ends exactly as an
    uninterrupted run with the same seed: λ history, every epoch's metrics in MLflow (each once), the
    selected epoch and the test metrics (every random draw of an epoch is seeded by (seed, epoch), and the
    restored checkpoint holds model, optimizer and selector state)."""
    import json

    from jobs.train import main

    path, data = lt_experiment(tmp_path, {"training": TRAIN})
    uri, exp = data["tracking"]["tracking_uri"], data["experiment"]
    before = {p.pid for p in own_processes("RayTrainWorker")}
    killed: list[int] = []

    def kill_a_worker():
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and not killed:
            if epochs_logged(uri, exp, "killed") >= 2:
                workers = [p for p in own_processes("RayTrainWorker") if p.pid not in before]
                if workers:
                    workers[-1].send_signal(signal.SIGKILL)
                    killed.append(workers[-1].pid)
                    return
            time.sleep(0.1)

    watcher = threading.Thread(target=kill_a_worker, daemon=True)
    watcher.start()
    assert main(["--config", str(path), "--run-name", "killed", "--json", str(tmp_path / "killed.json")]) == 0
    watcher.join(timeout=5)
    assert killed, "no Train worker was found to kill before the run finished"
    assert straight[0]["resumed_at_epoch"] == 0
    assert_equals_straight(straight, json.loads((tmp_path / "killed.json").read_text()), uri, "killed")


# -- the node holding a streamed training lost ------------------------------------------------------------
@pytest.mark.slow  # over the default suite's 15-minute budget beside the workstation rehearsal (issue 29): make test-slow
def test_node_loss_mid_streamed_training(tmp_path, loopback_cluster, straight, monkeypatch):  # noqa: F811
    """`discl train` joins a loopback multi-node cluster (a head without CPUs and one worker node: every Train
    worker and reader actor runs on that node) and logs to a real `mlflow server` (a joined cluster needs one).
    Once epoch 1 is in MLflow the worker node is removed with everything on it (raylet, object store, workers,
    readers: no drain) and a fresh node joins (a replacement, or an autoscaler's). The run restarts from its
    last checkpoint on the fresh node and ends equal to the uninterrupted run."""
    import json

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cluster, node = loopback_cluster
    path, data = lt_experiment(tmp_path, {"training": TRAIN})
    exp = data["experiment"]
    with mlflow_server(tmp_path / "server") as (uri, _server):
        joined = tmp_path / "joined.yaml"
        joined.write_text(yaml.safe_dump({**data, "tracking": {**data["tracking"], "tracking_uri": uri},
                                          "ray": {"address": cluster.address}}))
        log = tmp_path / "driver.log"
        proc = stage_process("train", joined, "--run-name", "lost", "--json", str(tmp_path / "lost.json"), log=log)
        try:
            deadline = time.monotonic() + 300
            while proc.poll() is None and time.monotonic() < deadline and epochs_logged(uri, exp, "lost") < 2:
                time.sleep(0.1)
            assert proc.poll() is None, "the run ended before the node could be lost:\n" + log.read_text()[-3000:]
            cluster.remove_node(node, allow_graceful=False)
            fresh = cluster.add_node(num_cpus=2)     # Ray detects the loss (shortened health check) meanwhile
            cluster.wait_for_nodes()
            assert fresh.node_ip_address == "127.0.0.1"
        finally:
            out = finish(proc, log)
        assert proc.returncode == 0, out[-4000:]
        assert_equals_straight(straight, json.loads((tmp_path / "lost.json").read_text()), uri, "lost")


# -- the `discl train` driver killed and rerun through the CLI ---------------------------------------------
@pytest.mark.slow  # over the default suite's 15-minute budget beside the workstation rehearsal (issue 29): make test-slow
def test_killed_cli_train_driver_rerun_matches_uninterrupted_run(tmp_path, ray_local, straight, monkeypatch):
    """`discl train` runs as its own process (its own local Ray cluster) logging to a real `mlflow server`.

    1. Once epoch 0 is in MLflow the server is stopped and started again on the same port and store: MLflow's
       HTTP retries (here 7, exponential backoff: about half a minute) ride out the restart, and the run goes
       on logging into the same MLflow run.
    2. Once a further epoch is in MLflow the driver gets SIGKILL. Rerunning the same command (same run name and
       storage) continues from the last checkpoint and the same MLflow run, and ends equal to an uninterrupted
       run.
    3. Rerunning the finished run returns its result and logs nothing: no new metric point, no new checkpoint,
       the MLflow run untouched."""
    import json

    from discl_ray.cli import main as discl

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    temp_dir = os.path.join(tempfile.gettempdir(), f"dk-{os.getpid()}")     # short: Ray's socket paths
    path, data = lt_experiment(tmp_path, {"training": TRAIN, "ray": {"num_cpus": 2, "temp_dir": temp_dir}})
    exp, server_root = data["experiment"], tmp_path / "server"
    # The driver's cluster inherits these: the retries of MLflow's own client, longer than a server restart.
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", MLFLOW_HTTP_REQUEST_MAX_RETRIES="7",
               MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="1", PYTHONPATH=os.pathsep.join(
                   filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")])))
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    with mlflow_server(server_root) as (uri, server):
        port = int(uri.rsplit(":", 1)[1])
        train = ["train", "--config", str(path), f"tracking.tracking_uri={uri}"]
        log = open(tmp_path / "driver.log", "wb")
        proc = subprocess.Popen([sys.executable, "-m", "discl_ray.cli", *train, "--run-name", "killed"], env=env,
                                stdout=log, stderr=subprocess.STDOUT)
        restarted = contextlib.ExitStack()
        try:
            deadline = time.monotonic() + 600

            def wait_epochs(n: int) -> int:
                while time.monotonic() < deadline and proc.poll() is None:
                    got = epochs_logged(uri, exp, "killed")
                    if got >= n:
                        return got
                    time.sleep(0.1)
                raise AssertionError("the run ended before its fault:\n"
                                     + (tmp_path / "driver.log").read_text()[-3000:])

            at_stop = wait_epochs(1)
            _, run_before = mlflow_run(uri, exp, "killed")
            from reliab_fixtures import stop_server

            stop_server(server)
            restarted.enter_context(mlflow_server(server_root, port=port))     # the same address and store
            wait_epochs(at_stop + 1)                                             # logging again after the restart
            cluster = psutil.Process(proc.pid).children(recursive=True)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            agents = [p for p in cluster if _is_agent(p)]        # see the sweep test: agents outlive their raylet
            _, alive = psutil.wait_procs([p for p in cluster if p not in agents], timeout=30)
            for p in alive + agents:
                with contextlib.suppress(psutil.NoSuchProcess):
                    p.kill()
            client, killed = mlflow_run(uri, exp, "killed")
            assert killed.info.run_id == run_before.info.run_id            # one MLflow run across the restart
            assert killed.info.status == "RUNNING" and epochs_logged(uri, exp, "killed") < EPOCHS   # killed mid-run

            assert discl([*train, "--run-name", "killed", "--json", str(tmp_path / "rerun.json")]) == 0
            resumed = json.loads((tmp_path / "rerun.json").read_text())
            _, run_k = assert_equals_straight(straight, resumed, uri, "killed")
            assert run_k.info.run_id == killed.info.run_id                 # the same MLflow run, continued
            runs = client.search_runs([client.get_experiment_by_name(exp).experiment_id],
                                      "tags.mlflow.runName = 'killed'")
            assert [r.info.run_id for r in runs] == [killed.info.run_id]
            histories = {key: len(client.get_metric_history(run_k.info.run_id, key))
                         for key in ("epoch", "lam", "n_train", "train_loss", "val_acc")}

            ckpts = tmp_path / "runs" / "fx" / "train" / "killed"
            before = sorted(p.name for p in ckpts.glob("checkpoint_*"))
            assert discl([*train, "--run-name", "killed", "--json", str(tmp_path / "again.json")]) == 0
            again = json.loads((tmp_path / "again.json").read_text())
            for key in (*FINAL, "lam_history"):
                assert again[key] == resumed[key], key
            assert sorted(p.name for p in ckpts.glob("checkpoint_*")) == before    # nothing trained again
            final = client.get_run(killed.info.run_id)
            assert final.info.end_time == run_k.info.end_time and final.data.metrics == run_k.data.metrics
            for key, n in histories.items():
                assert len(client.get_metric_history(final.info.run_id, key)) == n, key   # nothing logged
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
            restarted.close()
            shutil.rmtree(data["ray"]["temp_dir"], ignore_errors=True)


# -- the sweep driver killed and resubmitted --------------------------------------------------------------
def test_killed_sweep_driver_resubmitted(tmp_path, ray_local, capsys):
    """`discl sweep` (2 trials, one at a time) runs as its own process with its own Ray cluster; it gets
    SIGKILL once the first trial has finished and the second has started. Resubmitting the same command (here
    in-process, on the shared cluster: a real Tune run in the default suite) finishes the sweep: the finished
    trial is not trained again, the interrupted one completes, and MLflow holds one parent with exactly one
    finished child per trial, each epoch logged once."""
    import mlflow

    from jobs.sweep import main

    space = {"training.seed": {"grid": [0, 1]}}
    path, data = lt_experiment(tmp_path, {
        "training": {"epochs": 2, "curriculum_epochs": 1, "max_failures": 0},
        "sweep": {"space": space, "max_concurrent_trials": 1, "trial_cpus": 0.1},
        "ray": {"num_cpus": 2, "temp_dir": os.path.join(tempfile.gettempdir(), f"dr-{os.getpid()}")}})
    uri, exp_name = data["tracking"]["tracking_uri"], data["experiment"]
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", PYTHONPATH=os.pathsep.join(
        filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")])))
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "discl_ray.cli", "sweep", "--config", str(path), "--name", "s"]
    log = open(tmp_path / "driver.log", "wb")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    client = mlflow.MlflowClient(tracking_uri=uri)
    children: list = []
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None:
            exp = client.get_experiment_by_name(exp_name)
            runs = client.search_runs([exp.experiment_id], "tags.stage = 'train'") if exp else []
            if any(r.info.status == "FINISHED" for r in runs) and len(runs) == 2:
                children = runs
                break
            time.sleep(0.3)
        assert proc.poll() is None, "the sweep finished before it could be killed:\n" + \
            (tmp_path / "driver.log").read_text()[-3000:]
        assert children, (tmp_path / "driver.log").read_text()[-3000:]
        cluster = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        # Its Ray cluster (gcs, raylet, workers) dies with it; wait so no old worker logs after the resubmission.
        # Ray's dashboard and runtime-env agents outlive their raylet for longer than that (measured: both still
        # up 30 s later), and they never log a trial: they are not waited for, only killed with any stragglers.
        agents = [p for p in cluster if _is_agent(p)]
        _, alive = psutil.wait_procs([p for p in cluster if p not in agents], timeout=30)
        for p in alive + agents:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
        shutil.rmtree(data["ray"]["temp_dir"], ignore_errors=True)
    finished = next(r for r in children if r.info.status == "FINISHED")
    ckpts = tmp_path / "runs" / "fx" / "sweep" / "s" / "trials" / finished.info.run_name
    ckpts_before = sorted(p.name for p in ckpts.glob("checkpoint_*"))
    assert ckpts_before

    capsys.readouterr()
    assert main(["--config", str(path), "--name", "s"]) == 0
    assert "sweep s: 2 trials, 0 failed" in capsys.readouterr().out
    # The finished trial is not trained again: no new checkpoint, its MLflow child untouched.
    assert sorted(p.name for p in ckpts.glob("checkpoint_*")) == ckpts_before
    again = client.get_run(finished.info.run_id)
    assert again.info.end_time == finished.info.end_time and again.data.metrics == finished.data.metrics
    exp = client.get_experiment_by_name(exp_name)
    parents = client.search_runs([exp.experiment_id], "tags.stage = 'sweep'")
    assert len(parents) == 1
    kids = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'")
    assert len(kids) == 2, [(k.info.run_name, k.info.status) for k in kids]
    assert sorted(k.data.params["training.seed"] for k in kids) == ["0", "1"]
    assert all(k.info.status == "FINISHED" for k in kids)
    assert finished.info.run_id in {k.info.run_id for k in kids}
    # The interrupted trial either reopened its child (it had a checkpoint) or replaced it: then the old child,
    # left RUNNING by the killed driver, is deleted and points at its replacement.
    interrupted = next(r for r in children if r.info.run_id != finished.info.run_id)
    from mlflow.entities import ViewType

    deleted = client.search_runs([exp.experiment_id], run_view_type=ViewType.DELETED_ONLY)
    if interrupted.info.run_id in {k.info.run_id for k in kids}:
        assert not deleted
    else:
        (old,) = deleted
        assert old.info.run_id == interrupted.info.run_id and old.info.status == "KILLED"
        replacement = next(k for k in kids if k.info.run_name == interrupted.info.run_name)
        assert old.data.tags["discl.superseded_by"] == replacement.info.run_id
    for kid in kids:
        hist = client.get_metric_history(kid.info.run_id, "epoch")
        assert sorted(m.step for m in hist) == [0, 1], kid.info.run_name      # each epoch once
    assert parents[0].data.metrics["num_trials"] == 2 and parents[0].data.metrics["num_errors"] == 0


# -- the MLflow server stopped mid-run ---------------------------------------------------------------------
def test_mlflow_server_stopped_mid_training(tmp_path, ray_local, capsys, monkeypatch):
    """Choice (docs/reliability.md): the run fails with one line naming the server's URI, exit status 1, and
    its checkpoints are kept (resuming from them is what the killed-worker and killed-driver tests prove).

    With `max_failures: 1` the failure goes through Ray Train's restart path: the worker group is started a
    second time (a new worker process) and fails at its reachability check, then the run ends with the line.
    MLflow's HTTP retries (MLFLOW_HTTP_REQUEST_MAX_RETRIES, default 7 with exponential backoff: minutes) are
    set low for the local cluster in conftest.py so the failure surfaces in seconds."""
    from jobs.train import main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    path, data = lt_experiment(tmp_path, {"training": {"epochs": 30, "curriculum_epochs": 20, "max_failures": 1,
                                                       "strategy": "random"}})
    before = {p.pid for p in own_processes("RayTrainWorker")}
    workers: set[int] = set()
    with mlflow_server(tmp_path / "server") as (uri, server):
        stopped: list[float] = []
        done = threading.Event()

        def stop_when_logging():
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline and not done.is_set():
                # every Train worker process the run starts (the first one dies soon after the server stops)
                workers.update(p.pid for p in own_processes("RayTrainWorker") if p.pid not in before)
                try:
                    if not stopped and epochs_logged(uri, "fx", "srv") >= 1:
                        from reliab_fixtures import stop_server

                        stopped.append(time.monotonic())
                        stop_server(server)              # SIGTERM, then wait for it (and its workers) to exit
                except Exception:  # noqa: BLE001 — the server is still starting the run
                    pass
                time.sleep(0.1)

        watcher = threading.Thread(target=stop_when_logging, daemon=True)
        watcher.start()
        rc = main(["--config", str(path), "--run-name", "srv", f"tracking.tracking_uri={uri}"])
        done.set()
        watcher.join(timeout=60)
        assert stopped, "the server was never stopped"
    err = capsys.readouterr().err
    assert rc == 1, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("discl train: ")]
    assert len(lines) == 1 and uri in lines[0] and "cannot be reached" in lines[0], err[-3000:]
    assert "rerun the same command" in lines[0]
    assert len(workers) == 2, f"the worker group was not restarted once (max_failures: 1): {sorted(workers)}"
    assert list((tmp_path / "runs" / "fx" / "train" / "srv").glob("checkpoint_*")), "checkpoints were not kept"
