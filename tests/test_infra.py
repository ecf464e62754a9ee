"""Infra manifests parse and carry what a secure, reproducible deployment needs.

Checked: every image pinned (explicit version tag or digest, never latest), GPU resources on the Ray workers
and none on the head, Ray token auth on, dashboard / MLflow reachable only inside the cluster (ClusterIP,
no LoadBalancer/NodePort/Ingress), no Secret objects or literal credentials, RayJobs for every paper stage
with valid commands and config files, and the container's pins equal the project's.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
INFRA = REPO / "infra"
RAY_VERSION = "2.60.0"


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _all_docs() -> list[tuple[Path, dict]]:
    return [(p, d) for p in sorted(INFRA.rglob("*.yaml")) for d in _docs(p)]


def _walk(node, key_path=()):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, key_path + (k,))
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v, key_path)
    yield key_path, node


def _containers(doc: dict) -> list[dict]:
    out = []
    for path, node in _walk(doc):
        if path and path[-1] == "containers" and isinstance(node, list):
            out += node
    return out


def _pinned(image: str) -> bool:
    if "@sha256:" in image:
        return True
    tag = image.rsplit("/", 1)[-1].partition(":")[2]
    return bool(tag) and tag != "latest" and re.search(r"\d", tag) is not None


def _kube(kind: str) -> list[tuple[Path, dict]]:
    return [(p, d) for p, d in _all_docs() if d.get("kind") == kind]


def test_every_manifest_parses_and_images_are_pinned():
    docs = _all_docs()
    kinds = {d.get("kind") for _, d in docs if "kind" in d}
    assert {"RayCluster", "RayJob", "Deployment", "Service", "NetworkPolicy"} <= kinds
    images = [c["image"] for _, d in docs for c in _containers(d)]
    images += [d["docker"]["image"] for _, d in docs if "docker" in d]
    assert len(images) >= 12
    assert all(_pinned(i) for i in images), [i for i in images if not _pinned(i)]
    assert not _pinned("discl-ray:latest") and not _pinned("discl-ray") and _pinned("x/y@sha256:ab")


def _ray_cluster_specs() -> list[tuple[str, dict]]:
    specs = [(f"{p.name}:RayCluster", d["spec"]) for p, d in _kube("RayCluster")]
    specs += [(f"{p.name}:RayJob", d["spec"]["rayClusterSpec"]) for p, d in _kube("RayJob")]
    return specs


@pytest.mark.parametrize("name,spec", _ray_cluster_specs(), ids=lambda v: v if isinstance(v, str) else "")
def test_ray_clusters_cpu_head_gpu_workers_auth_on(name, spec):
    assert spec["rayVersion"] == RAY_VERSION
    assert spec["authOptions"]["mode"] == "token"
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    assert head["rayStartParams"]["num-gpus"] == "0"
    for c in head["template"]["spec"]["containers"]:
        assert "nvidia.com/gpu" not in c["resources"].get("limits", {})
    gpu_groups = [g for g in spec["workerGroupSpecs"]
                  if all("nvidia.com/gpu" in c["resources"]["limits"] for c in g["template"]["spec"]["containers"])]
    assert gpu_groups, f"{name}: no GPU worker group"
    for g in gpu_groups:
        assert g["minReplicas"] == 0 < g["maxReplicas"]  # scales from zero
        for c in g["template"]["spec"]["containers"]:
            assert int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1
            assert c["resources"]["limits"]["nvidia.com/gpu"] == c["resources"]["requests"]["nvidia.com/gpu"]
    for c in head["template"]["spec"]["containers"] + [c for g in spec["workerGroupSpecs"]
                                                       for c in g["template"]["spec"]["containers"]]:
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        env = {e["name"]: e for e in c.get("env", [])}
        assert env["MLFLOW_TRACKING_URI"]["value"].startswith("http://mlflow.discl.svc")


def test_rayjobs_cover_the_paper_stages():
    from discl_ray.cli import COMMANDS
    from discl_ray.config import load_config

    jobs = {d["metadata"]["labels"]["discl.stage"]: d for _, d in _kube("RayJob")}
    assert set(jobs) == {"generate", "score", "train", "sweep"}
    for stage, job in jobs.items():
        spec = job["spec"]
        assert spec["shutdownAfterJobFinishes"] is True and spec["backoffLimit"] == 0
        commands = [shlex.split(part) for part in spec["entrypoint"].split("&&")]
        assert commands[-1][:4] == ["python", "-m", "discl_ray.cli", stage]
        for cmd in commands:
            assert cmd[3] in COMMANDS
            cfg_path = cmd[cmd.index("--config") + 1]
            assert cfg_path.startswith("/home/ray/app/")  # the image's copy of the repo (Dockerfile WORKDIR)
            local = REPO / cfg_path.removeprefix("/home/ray/app/")
            overrides = [a for a in cmd[cmd.index("--config") + 2:]]
            cfg = load_config(local, overrides)  # the job's config is valid here, before any cluster exists
            assert cfg.run_root == "/mnt/runs"
    sweep = load_config(REPO / "configs/iwildcam/sweep_curricula.yaml",
                        shlex.split(jobs["sweep"]["spec"]["entrypoint"])[6:])
    assert sweep.training.gpus_per_worker == 1 and sweep.sweep.max_concurrent_trials == 8
    assert "training.strategy" in sweep.sweep.space


def test_nothing_exposed_and_no_secrets():
    for path, doc in _all_docs():
        assert doc.get("kind") not in ("Secret", "Ingress"), path
        if doc.get("kind") == "Service":
            assert doc["spec"].get("type", "ClusterIP") == "ClusterIP", path
        for key_path, node in _walk(doc):
            if key_path and key_path[-1] == "serviceType":
                assert node == "ClusterIP", path
        for c in _containers(doc):
            for e in c.get("env", []):
                if re.search(r"TOKEN|PASSWORD|SECRET|KEY|URI$", e["name"]) and e["name"] != "MLFLOW_TRACKING_URI":
                    assert "valueFrom" in e and "value" not in e, (path, e["name"])
    text = "\n".join(p.read_text() for p in INFRA.rglob("*") if p.is_file())
    assert not re.search(r"postgres(ql)?://\w+:\w+@", text)       # no inline DB password
    assert not re.search(r"AKIA[0-9A-Z]{16}", text)                # no AWS key ids


def test_mlflow_server_sql_backend_object_store():
    (_, dep), = _kube("Deployment")
    c = dep["spec"]["template"]["spec"]["containers"][0]
    args = " ".join(c["args"])
    assert "--backend-store-uri=$(MLFLOW_BACKEND_STORE_URI)" in args and "--serve-artifacts" in args
    env = {e["name"]: e for e in c["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"]["name"] == "mlflow-db"
    (_, cm), = _kube("ConfigMap")
    assert cm["data"]["ARTIFACTS_DESTINATION"].startswith(("s3://", "gs://"))
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    (_, svc), = _kube("Service")
    assert svc["spec"]["type"] == "ClusterIP" and svc["spec"]["ports"][0]["port"] == 5000


def test_cluster_launcher_auth_and_loopback_dashboard():
    (cfg,) = _docs(INFRA / "cluster-launcher" / "aws-gpu.yaml")
    head = " ".join(cfg["head_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in head and "--dashboard-host=127.0.0.1" in head
    assert "RAY_AUTH_MODE=token" in " ".join(cfg["worker_start_ray_commands"])
    types = cfg["available_node_types"]
    assert types[cfg["head_node_type"]]["resources"]["GPU"] == 0
    assert any(t["resources"].get("GPU", 0) >= 1 and t["min_workers"] == 0 for t in types.values())


def test_container_pins_match_project():
    import tomllib

    reqs = {}
    for line in (INFRA / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, sep, ver = line.partition("==")
            assert sep, f"unpinned requirement: {line}"
            reqs[re.sub(r"\[.*\]", "", name).lower()] = ver
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in project:
        if "==" in dep:
            name, _, ver = dep.partition("==")
            assert reqs[re.sub(r"\[.*\]", "", name).lower()] == ver, dep
    docker = (INFRA / "Dockerfile").read_text()
    base = re.search(r"ARG CUDA_IMAGE=(\S+)", docker).group(1)
    assert base.startswith("nvidia/cuda:") and _pinned(base) and "cudnn" in base
    assert "-r infra/requirements.txt" in docker and "USER ray" in docker and "RAY_AUTH_MODE=token" in docker
