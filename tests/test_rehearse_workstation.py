"""The real path, as a research team runs it: a workstation cluster started with `ray start` (a CPU head and a
node with a GPU resource), a real `mlflow server` whose artifacts go to an S3-compatible bucket, moto's S3
server, and `discl submit rehearse` of the shipped iWildCam and ImageNet-LT configs on small fakes of their
datasets with `run_root=s3://…` and `MLFLOW_TRACKING_URI` set (docs/cluster.md, "Workstation head").

The Ray processes run with the virtualenv *off* their PATH, as a shell that forgot to activate it would start
them: `discl submit` must give the job the client's interpreter. Every process listens on loopback (the Ray nodes
on 127.0.0.2, see NODE_IP) and is stopped here, by its process group. The two tracked rehearsals are submitted one
after the other (in the default suite since issue 25, where it replaced the `ray.cluster_utils` two-node placement
test, now slow); the tracking-off one is slow.
"""

from __future__ import annotations

import json
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
from fakes import fake_imagenet_lt, fake_iwildcam

from discl_ray.runtime.tracking import wait_until_up

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
BUCKET = "rehearsal"
# The GPU node declares one GPU per rehearsal submitted at once (a workstation with that many cards): the
# jobs run side by side instead of queueing for one GPU.
GPUS = 3
# `ray start` turns 127.0.0.1 (and localhost) into the machine's network address on Linux (Ray's
# resolve_ip_for_localhost), and the switch that stops it (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0) also stops a second
# node from joining. Any other 127.x address is loopback too and is kept as given: the nodes, their GCS and every
# job driver register there (docs/cluster.md, "Workstation head").
NODE_IP = "127.0.0.2"


def _ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _log(tmp: Path, name: str):
    """A process's output goes to a file, never an unread pipe: a full pipe (MLflow's server logs every request,
    `discl submit` tails its job's log) blocks the process on its next line."""
    return open(tmp / f"{name}.log", "w")


def _daemon(cmd: list[str], env: dict, tmp: Path, name: str) -> subprocess.Popen:
    with _log(tmp, name) as out:
        proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=out, stderr=subprocess.STDOUT)
    proc.log = Path(out.name)
    return proc


def _wait_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log = proc.log.read_text()
            raise RuntimeError(f"{what} exited with {proc.returncode}: {log[-3000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"{what} did not open port {port}")


def _stop(proc: subprocess.Popen, marker: str | None = None) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=5)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    if marker:  # Ray daemons that left the process group still hold the temp dir: end those (by pid)
        out = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout.split()
        for pid in map(int, out):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture(scope="module")
def workstation(tmp_path_factory):
    import boto3
    import moto.server as server_mod

    tmp = tmp_path_factory.mktemp("workstation")
    s3 = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    s3.start()
    host, port = s3.get_host_and_port()
    aws = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "MLFLOW_S3_ENDPOINT_URL": f"http://{host}:{port}",
           "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true", "DISCL_CACHE_DIR": str(tmp / "node-cache")}
    client = boto3.client("s3", endpoint_url=aws["AWS_ENDPOINT_URL"], aws_access_key_id="test",
                          aws_secret_access_key="test", region_name="us-east-1")
    client.create_bucket(Bucket=BUCKET)
    procs: list[tuple[subprocess.Popen, str | None]] = []
    temp = tempfile.mkdtemp(prefix="ws", dir="/tmp")   # short: unix socket paths are limited
    try:
        # MLflow: SQL backend, artifacts written by the clients straight to the bucket (infra/README.md).
        ml_port, = _ports(1)
        env = {**os.environ, **aws}
        ml = _daemon([str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{tmp}/mlflow.db",
                      "--default-artifact-root", f"s3://{BUCKET}/mlflow", "--no-serve-artifacts",
                      "--host", "127.0.0.1", "--port", str(ml_port), "--workers", "1"], env, tmp, "mlflow")
        procs.append((ml, None))
        # Ray: the shell's PATH without this virtualenv, loopback node IPs, no Windows/OSX switch (docs).
        path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep)
                               if Path(p).resolve() != BIN.resolve())
        renv = {**{k: v for k, v in os.environ.items()
                   if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "MLFLOW_TRACKING_URI")},
                **aws, "PATH": path, "RAY_AUTH_MODE": "token"}
        gcs, dash, client_port, agent, metrics, agent2, metrics2, nm2, om2 = _ports(9)
        head = _daemon(
            [str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs}", f"--node-ip-address={NODE_IP}",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--ray-client-server-port={client_port}",
             f"--dashboard-agent-listen-port={agent}", f"--metrics-export-port={metrics}", "--num-cpus=2",
             "--num-gpus=0", "--include-dashboard=true", f"--temp-dir={temp}"], renv, tmp, "ray-head")
        procs.append((head, temp))
        _wait_port(dash, head, "ray head")
        node = _daemon(
            [str(BIN / "ray"), "start", "--block", f"--address={NODE_IP}:{gcs}", f"--node-ip-address={NODE_IP}",
             f"--num-cpus={2 * GPUS}", f"--num-gpus={GPUS}", f"--dashboard-agent-listen-port={agent2}",
             f"--metrics-export-port={metrics2}", f"--node-manager-port={nm2}", f"--object-manager-port={om2}",
             # its own temp dir: two nodes on one machine would otherwise share runtime_resources/, and the GPU
             # node's agent deletes a job's working_dir there while the head's driver still runs in it
             f"--temp-dir={temp}/n2"], renv, tmp, "ray-gpu-node")
        procs.append((node, temp))
        _wait_port(ml_port, ml, "mlflow server")
        wait_until_up(f"http://127.0.0.1:{ml_port}/health", timeout=180, proc=ml)   # answering, not just bound
        _wait_for_gpu_node(f"{NODE_IP}:{gcs}", renv)
        yield {"address": f"http://127.0.0.1:{dash}", "mlflow": f"http://127.0.0.1:{ml_port}", "aws": aws,
               "s3": client, "tmp": tmp}
    finally:
        for proc, marker in reversed(procs):
            _stop(proc, marker)
        shutil.rmtree(temp, ignore_errors=True)
        s3.stop()


def _wait_for_gpu_node(gcs: str, env: dict, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run([str(BIN / "ray"), "status", f"--address={gcs}"], env=env, capture_output=True,
                             text=True).stdout
        if f"0.0/{GPUS:.1f} GPU" in out:
            return
        time.sleep(2)
    raise TimeoutError("the GPU node did not join")


def _keys(client, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def _check(ws, proc, exp: str, metric: str, tracking: bool) -> dict:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and proc.stdout.rstrip().endswith("SUCCEEDED"), out[-6000:]
    lines = [ln for ln in out.splitlines() if ln.startswith("rehearse [")]
    print("\n".join(lines))
    client = ws["s3"]
    report = json.loads(client.get_object(Bucket=BUCKET, Key=f"runs/{exp}/rehearsal.json")["Body"].read())
    assert report["ok"] and all(s["ok"] for s in report["stages"]), report
    assert report["driver_ip"] == NODE_IP, report["driver_ip"]      # the job's driver too: loopback only
    by_stage = {s["stage"]: s for s in report["stages"] if s["experiment"] == exp}
    for stage in ("mine", "prompts", "generate", "score", "train", "report"):
        assert _keys(client, f"runs/{exp}/{stage}/"), f"no {stage} outputs in the bucket"
        assert by_stage[stage]["location"].startswith(f"s3://{BUCKET}/runs/{exp}/")
    # generation and training ran on the GPU node, holding its GPU
    gpu_node = [n for n, res in report["cluster"].items() if res.get("GPU")]
    assert len(gpu_node) == 1
    # the generator actors' own record (generate/summary.json): on the GPU node, holding its GPU
    summary = json.loads(client.get_object(Bucket=BUCKET, Key=f"runs/{exp}/generate/summary.json")["Body"].read())
    assert summary["actors"] and {a["node_id"] for a in summary["actors"]} == set(gpu_node), summary["actors"]
    assert all(a["resources"].get("GPU", 0) > 0 for a in summary["actors"])
    assert report["gpu_probe"]["cuda"] is False       # a GPU resource without CUDA: said, not hidden
    # the rehearsal's per-stage record says the same, for the Train workers too (their rank-<r>.json)
    for stage in ("generate", "score", "train"):
        assert by_stage[stage]["gpu_nodes"] == gpu_node and by_stage[stage]["gpus_held"] > 0, by_stage[stage]
    assert _keys(client, f"runs/{exp}/train/") and any("/workers/rank-0.json" in k
                                                       for k in _keys(client, f"runs/{exp}/train/"))
    # nothing on local disk: no parquet outside the fakes, no local run folder
    local = [p for p in list(REPO.glob("runs/*rehearsal*")) + list(ws["tmp"].rglob("*.parquet"))]
    assert not local, local
    if tracking:
        from mlflow.tracking import MlflowClient

        ml = MlflowClient(ws["mlflow"])
        runs = ml.search_runs([ml.get_experiment_by_name(exp).experiment_id])
        finals = [r for r in runs if metric in r.data.metrics]
        assert finals, [r.data.metrics for r in runs]
        saved = {k: os.environ.get(k) for k in ws["aws"]}
        os.environ.update(ws["aws"])        # artifacts are listed straight from the bucket (no proxy)
        try:
            assert ml.list_artifacts(finals[0].info.run_id)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        assert _keys(client, "mlflow/"), "MLflow artifacts did not reach the bucket"
    return report


def _start(ws, name: str, config: str, *overrides: str, tracking: bool = True) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env.update(ws["aws"])
    if tracking:
        env["MLFLOW_TRACKING_URI"] = ws["mlflow"]
    cmd = [str(BIN / "discl"), "submit", "rehearse", "--address", ws["address"], "--config", config, *overrides]
    # `discl submit` tails the job's log: to files, read when it ends (pipes read one after another would fill)
    out, err = _log(ws["tmp"], f"{name}.out"), _log(ws["tmp"], f"{name}.err")
    with out, err:      # the child holds its own copies
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=err)
    proc.logs = (Path(out.name), Path(err.name))
    return proc


def _wait(procs: dict, timeout: float = 1500) -> dict:
    done = {}
    deadline = time.monotonic() + timeout
    try:
        for name, proc in procs.items():
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            out, err = (f.read_text() for f in proc.logs)
            done[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return done


@pytest.fixture(scope="module")
def fakes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fakes")
    return {"wilds": fake_iwildcam(tmp / "wilds"), "inlt": fake_imagenet_lt(tmp / "inlt")}


@pytest.fixture(scope="module")
def rehearsals(workstation, fakes):
    """Two rehearsals on one cluster and one MLflow server, submitted one after the other: iWildCam (FLYP
    baseline, then DisCL adaptive) and ImageNet-LT (CE baseline, then diverse→specific), tracking on. One after the
    other because two cores cannot run two at once: measured, one alone took 135 s, two at once 610-630 s each
    (the nodes declare 8 CPUs to Ray on a 2-core machine). The same ImageNet-LT pair with tracking off is the slow
    test below; its run-folder lookup on S3 is tests/test_fidelity_init_from.py's
    test_resolves_from_an_object_store_run_root, without a cluster."""
    ws = workstation
    done = _wait({"iwildcam": _start(ws, "iwildcam", "configs/iwildcam/discl_adaptive.yaml",
                                     f"run_root=s3://{BUCKET}/runs", f"dataset.root={fakes['wilds']}")})
    done.update(_wait({"imagenet_lt": _start(ws, "imagenet_lt", "configs/imagenet_lt/discl_d2s.yaml",
                                             f"run_root=s3://{BUCKET}/runs", f"dataset.root={fakes['inlt']}")}))
    return done


def test_rehearse_iwildcam_through_discl_submit(workstation, rehearsals):
    _check(workstation, rehearsals["iwildcam"], "iwildcam_flyp_discl_adaptive_rehearsal", "final_test_ood_f1",
           tracking=True)


def test_rehearse_imagenet_lt_through_discl_submit(workstation, rehearsals):
    _check(workstation, rehearsals["imagenet_lt"], "imagenet_lt_ce_discl_d2s_rehearsal", "final_test_acc",
           tracking=True)


@pytest.mark.slow
def test_rehearse_imagenet_lt_with_tracking_off_finds_the_baseline_in_the_run_folder(workstation, fakes):
    ws = workstation
    proc = _wait({"tracking_off": _start(ws, "tracking_off", "configs/imagenet_lt/discl_d2s.yaml",
                                         f"run_root=s3://{BUCKET}/off", f"dataset.root={fakes['inlt']}",
                                         "tracking.enabled=false", tracking=False)})["tracking_off"]
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and proc.stdout.rstrip().endswith("SUCCEEDED"), out[-6000:]
    client = ws["s3"]
    report = json.loads(client.get_object(Bucket=BUCKET,
                                          Key="off/imagenet_lt_ce_discl_d2s_rehearsal/rehearsal.json")["Body"].read())
    assert report["ok"]
    assert _keys(client, "off/imagenet_lt_ce_rehearsal/train/")      # the baseline, in the run folder
    assert all(not s["mlflow_runs"] for s in report["stages"])
