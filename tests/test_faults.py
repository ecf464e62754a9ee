"""Real faults in the default suite: a Train worker process killed with SIGKILL mid-run, the `discl sweep` driver
killed with SIGKILL and resubmitted, the MLflow server stopped while a training logs to it.

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
import threading
import time

import psutil
from reliab_fixtures import lt_experiment, mlflow_server

REAL_ONLY = -1.0


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


# -- a Train worker killed mid-run ------------------------------------------------------------------------
def test_killed_train_worker_resumes_from_last_checkpoint(tmp_path, ray_local):
    """Two workers, 5 epochs. Once epoch 1 is in MLflow (so epoch 0's checkpoint is registered) one worker
    process gets SIGKILL; FailureConfig restarts the group from the last checkpoint. The run ends exactly as
    an uninterrupted run with the same seed: λ history, every epoch's metrics in MLflow (each once), the
    selected epoch and the test metrics (every random draw of an epoch is seeded by (seed, epoch), and the
    restored checkpoint holds model, optimizer and selector state)."""
    from jobs.train import main

    path, data = lt_experiment(tmp_path, {"training": {"num_workers": 2, "epochs": 5, "curriculum_epochs": 3,
                                                       "strategy": "random", "batch_size": 8}})
    uri, exp = data["tracking"]["tracking_uri"], data["experiment"]
    assert main(["--config", str(path), "--run-name", "straight", "--json", str(tmp_path / "straight.json")]) == 0
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
            time.sleep(0.2)

    watcher = threading.Thread(target=kill_a_worker, daemon=True)
    watcher.start()
    assert main(["--config", str(path), "--run-name", "killed", "--json", str(tmp_path / "killed.json")]) == 0
    watcher.join(timeout=5)
    assert killed, "no Train worker was found to kill before the run finished"

    import json

    straight = json.loads((tmp_path / "straight.json").read_text())
    resumed = json.loads((tmp_path / "killed.json").read_text())
    assert straight["resumed_at_epoch"] == 0
    assert 1 <= resumed["resumed_at_epoch"] <= 4                     # restarted from a checkpoint, not from 0
    assert resumed["lam_history"] == straight["lam_history"]
    assert len(resumed["lam_history"]) == 5 and resumed["lam_history"][3:] == [REAL_ONLY, REAL_ONLY]
    for key in ("best_epoch", "best_val_acc", "final_test_acc", "final_test_few_acc", "final_test_many_acc"):
        assert resumed[key] == straight[key], key
    client, run_s = mlflow_run(uri, exp, "straight")
    _, run_k = mlflow_run(uri, exp, "killed")
    assert run_k.info.status == "FINISHED"
    for key in ("epoch", "lam", "n_train", "train_loss", "val_acc"):
        points = {name: sorted((m.step, m.value) for m in client.get_metric_history(r.info.run_id, key))
                  for name, r in (("straight", run_s), ("killed", run_k))}
        assert [s for s, _ in points["killed"]] == list(range(5)), key   # each epoch once: no gap, no duplicate
        assert points["killed"] == points["straight"], key


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
        "ray": {"num_cpus": 2, "temp_dir": f"/tmp/dr-{os.getpid()}"}})
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

    MLflow's HTTP retries (MLFLOW_HTTP_REQUEST_MAX_RETRIES, default 7 with exponential backoff: minutes) are
    set low for the local cluster in conftest.py so the failure surfaces in seconds."""
    from jobs.train import main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    path, data = lt_experiment(tmp_path, {"training": {"epochs": 30, "curriculum_epochs": 20, "max_failures": 0,
                                                       "strategy": "random"}})
    with mlflow_server(tmp_path / "server") as (uri, server):
        stopped: list[float] = []

        def stop_when_logging():
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                try:
                    if epochs_logged(uri, "fx", "srv") >= 1:
                        from reliab_fixtures import stop_server

                        stopped.append(time.monotonic())
                        stop_server(server)              # SIGTERM, then wait for it (and its workers) to exit
                        return
                except Exception:  # noqa: BLE001 — the server is still starting the run
                    pass
                time.sleep(0.3)

        watcher = threading.Thread(target=stop_when_logging, daemon=True)
        watcher.start()
        rc = main(["--config", str(path), "--run-name", "srv", f"tracking.tracking_uri={uri}"])
        watcher.join(timeout=60)
        assert stopped, "the server was never stopped"
    err = capsys.readouterr().err
    assert rc == 1, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("discl train: ")]
    assert len(lines) == 1 and uri in lines[0] and "cannot be reached" in lines[0], err[-3000:]
    assert "rerun the same command" in lines[0]
    assert list((tmp_path / "runs" / "fx" / "train" / "srv").glob("checkpoint_*")), "checkpoints were not kept"
