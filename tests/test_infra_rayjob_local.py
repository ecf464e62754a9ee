"""A RayJob's entrypoint through the same shell line KubeRay's K8sJobMode submitter runs (slow: a local Ray
cluster with a job server, about a minute on 2 busy cores).

KubeRay (v1.6, v1.7) builds ``if ! ray job status ... ; then ray job submit --address A --no-wait
--submission-id ID -- <entrypoint> ; fi ; ray job logs --address A --follow ID`` and runs it with bash.
Here that line runs against a local cluster (127.0.0.1, its own ports and temp dir, stopped by its own
driver) with a toy-world `discl pipeline`, and with the old ``a && b`` form for contrast: the chained
command runs outside the job, in the submitter's shell.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow

# ray.cluster_utils.Cluster: explicit ports (the job agent's default port 52365 may be held by another Ray on
# this machine, and then no job can be submitted) and a shutdown() that stops only its own processes.
HOLD_CLUSTER = """
import sys
from ray.cluster_utils import Cluster
port, agent_port, temp_dir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
cluster = Cluster(initialize_head=True, head_node_args=dict(
    num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port,
    dashboard_agent_listen_port=agent_port, node_ip_address="127.0.0.1", temp_dir=temp_dir))
print("up", flush=True)
try:
    sys.stdin.read()      # until the test closes stdin
finally:
    cluster.shutdown()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_job_agent(address: str) -> None:
    """The job server answers before the node's job agent is up ("No available agent"), which KubeRay's
    submitter Job meets with retries; here one warm-up job waits for it."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(address)
    deadline = time.monotonic() + 300
    while True:
        try:
            job = client.submit_job(entrypoint="true")
            break
        except RuntimeError:
            assert time.monotonic() < deadline, "the job agent did not come up in 300 s"
            time.sleep(1)
    while str(client.get_job_status(job)) not in ("SUCCEEDED", "FAILED", "STOPPED"):
        assert time.monotonic() < deadline, "the warm-up job did not finish in 300 s"
        time.sleep(1)


def _kuberay_submitter_line(address: str, job_id: str, entrypoint: str) -> str:
    """KubeRay's BuildJobSubmitCommand for K8sJobMode (wait loop left out: the server is up already)."""
    return (f"if ! ray job status --address {address} {job_id} >/dev/null 2>&1 ; "
            f"then ray job submit --address {address} --no-wait --submission-id {job_id} -- {entrypoint} ; fi ; "
            f"ray job logs --address {address} --follow {job_id}")


@pytest.fixture(scope="module")
def job_server(tmp_path_factory):
    tmp = Path("/tmp") / f"rj{os.getpid()}"  # short: Ray's unix socket paths have a length limit
    port = _free_port()
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.Popen([sys.executable, "-c", HOLD_CLUSTER, str(port), str(_free_port()), str(tmp)],
                            stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env, cwd=tmp_path_factory.mktemp("driver"))
    try:
        import select

        ready, _, _ = select.select([proc.stdout], [], [], 300)
        assert ready and proc.stdout.readline().strip() == "up", "local Ray cluster did not start in 300 s"
        address = f"http://127.0.0.1:{port}"
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{address}/api/gcs_healthz", timeout=2).read()
                break
            except OSError:
                time.sleep(1)
        _wait_for_job_agent(address)
        yield address, env
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)


def _submit(job_server, job_id: str, entrypoint: str, cwd: Path) -> subprocess.CompletedProcess:
    address, env = job_server
    line = _kuberay_submitter_line(address, job_id, entrypoint)
    return subprocess.run(["bash", "-c", line], capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


def _finish(job_server, job_id: str) -> tuple[str, str]:
    """(final status, driver log). `ray job logs --follow` right after `--no-wait` can hit a 404 while the
    job's supervisor starts (KubeRay's submitter Job retries then); the status is the ground truth."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(job_server[0])
    for _ in range(600):
        status = str(client.get_job_status(job_id))
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            return status, client.get_job_logs(job_id)
        time.sleep(1)
    raise AssertionError(f"job {job_id} still {status}")


def test_pipeline_entrypoint_runs_every_stage_in_the_job(job_server, tmp_path):
    runs = tmp_path / "runs"
    out = _submit(job_server, "pipeline-ok", f"discl pipeline prompts mine run_root={runs}", tmp_path)
    assert "submitted successfully" in out.stdout + out.stderr, out.stdout + out.stderr
    status, log = _finish(job_server, "pipeline-ok")
    assert status == "SUCCEEDED", log
    assert "[1/2] prompts" in log and "[2/2] mine" in log and "2 stage(s) done" in log
    assert any((runs / "toy_lt" / "mine").glob("*.parquet"))


def test_failed_stage_fails_the_job(job_server, tmp_path):
    _submit(job_server, "pipeline-fail", f"discl pipeline prompts score mine run_root={tmp_path}", tmp_path)
    status, log = _finish(job_server, "pipeline-fail")
    assert status == "FAILED"
    assert "stage 'score' (2/3) exited with code 2; not run: mine" in log


def test_chained_entrypoint_runs_the_rest_in_the_submitter(job_server, tmp_path):
    """The review's bug, reproduced: only the first command is the Ray job; `&&` binds in the submitter."""
    marker = tmp_path / "ran-in-submitter"
    _submit(job_server, "chained", f"python -c pass && touch {marker}", tmp_path)
    assert _finish(job_server, "chained")[0] == "SUCCEEDED"
    assert marker.exists()  # created by the submitter's shell, not by the job
