"""Infra manifests carry what a secure deployment needs and none of the run-time failures found in review.

Secure: every image pinned, Ray token auth on, dashboard / MLflow reachable only inside the cluster, no
Secret objects or literal credentials. Runs what it says: each RayJob entrypoint is one `discl pipeline`
command with no shell syntax (KubeRay pastes it unquoted into `ray job submit -- ...`), its stages and
config load here; applying the folder starts at most one RayJob; RayJob clusters equal the RayCluster.
Boots and stores: the image removes whatever owns uid/gid 1000 before creating `ray`, installs rsync,
openssh-client and wget, needs TORCH_INDEX_URL; the launcher mounts the run and data volumes; no env var
is set to an empty string; PVCs are ReadWriteMany with a storage class; pods are sized for the stages.
Schema validation (KubeRay CRDs, Kubernetes, ray-schema.json, hadolint) is in test_infra_schemas.py.
"""

from __future__ import annotations

import functools
import re
import shlex
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
INFRA = REPO / "infra"
KUBERAY = INFRA / "kuberay"
LAUNCHER = INFRA / "cluster-launcher" / "aws-gpu.yaml"
RAY_VERSION = "2.60.0"
IMAGE_APP = "/home/ray/app/"  # the image's copy of the repo (Dockerfile WORKDIR)
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.load_all(path.read_text(), Loader=_LOADER) if d]


@functools.cache
def _all_docs() -> tuple[tuple[Path, dict], ...]:  # read once; no test changes them
    return tuple((p, d) for p in sorted(INFRA.rglob("*.yaml")) for d in _docs(p))


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


def _ray_cluster_specs() -> list[tuple[str, dict]]:
    specs = [(f"{p.name}:RayCluster", d["spec"]) for p, d in _kube("RayCluster")]
    specs += [(f"{p.name}:RayJob", d["spec"]["rayClusterSpec"]) for p, d in _kube("RayJob")]
    return specs


def _groups(spec: dict) -> list[tuple[str, dict]]:
    return [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]


def _gib(q: str) -> float:
    units = {"Ki": 2**-20, "Mi": 2**-10, "Gi": 1, "Ti": 2**10, "G": 1e9 / 2**30, "M": 1e6 / 2**30}
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([A-Za-z]*)", str(q))
    assert m, q
    return float(m.group(1)) * (units[m.group(2)] if m.group(2) else 2**-30)


def test_every_manifest_parses_and_images_are_pinned():
    docs = _all_docs()
    kinds = {d.get("kind") for _, d in docs if "kind" in d}
    assert {"RayCluster", "RayJob", "Deployment", "Service", "NetworkPolicy", "PersistentVolumeClaim"} <= kinds
    images = [c["image"] for _, d in docs for c in _containers(d)]
    images += [d["docker"]["image"] for _, d in docs if "docker" in d]
    assert len(images) >= 7
    assert all(_pinned(i) for i in images), [i for i in images if not _pinned(i)]
    assert not _pinned("discl-ray:latest") and not _pinned("discl-ray") and _pinned("x/y@sha256:ab")


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
        assert g["minReplicas"] == 0 < g["maxReplicas"] <= 8  # scales from zero, bounded
        for c in g["template"]["spec"]["containers"]:
            assert int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1
            assert c["resources"]["limits"]["nvidia.com/gpu"] == c["resources"]["requests"]["nvidia.com/gpu"]
    for _, group in _groups(spec):
        pod = group["template"]["spec"]
        assert pod["securityContext"]["runAsUser"] == 1000 and pod["securityContext"]["runAsNonRoot"] is True
        for c in pod["containers"]:
            assert c["securityContext"]["allowPrivilegeEscalation"] is False


@pytest.mark.parametrize("name,spec", _ray_cluster_specs(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_ray_container_tracks_to_the_mlflow_server_and_mounts_the_volumes(name, spec):
    for group_name, group in _groups(spec):
        pod = group["template"]["spec"]
        claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in pod["volumes"]}
        for c in pod["containers"]:
            env = {e["name"]: e for e in c.get("env", [])}
            uri = env["MLFLOW_TRACKING_URI"]["value"]
            assert re.fullmatch(r"https?://[a-z0-9.-]+(:\d+)?/?", uri), (name, group_name, uri)
            mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
            assert claims[mounts["/mnt/runs"]] == "discl-runs" and claims[mounts["/mnt/data"]] == "discl-data"
            assert env["HF_HOME"]["value"].startswith("/mnt/runs/")  # downloads once, on shared storage


@pytest.mark.parametrize("name,spec", _ray_cluster_specs(), ids=lambda v: v if isinstance(v, str) else "")
def test_pod_sizes_fit_the_stages(name, spec):
    """Sizes of docs/cluster.md "Pod sizes": a head for the drivers, 64-128 Gi GPU workers, shm over the store."""
    for group_name, group in _groups(spec):
        pod = group["template"]["spec"]
        (c,) = pod["containers"]
        req, lim = c["resources"]["requests"], c["resources"]["limits"]
        assert req["cpu"] == lim["cpu"] and req["memory"] == lim["memory"]  # Guaranteed QoS: never evicted first
        mem = _gib(lim["memory"])
        shm = [v for v in pod["volumes"] if v["name"] == "dshm"]
        assert shm, f"{name}/{group_name}: no /dev/shm volume for Ray's object store"
        shm_gib = _gib(shm[0]["emptyDir"]["sizeLimit"])
        # Ray's object store defaults to 30 % of the pod's memory and lives in /dev/shm; smaller shm -> /tmp.
        assert 0.3 * mem <= shm_gib <= 0.5 * mem, (name, group_name, mem, shm_gib)
        if "nvidia.com/gpu" in lim:
            assert 64 <= mem <= 128 and int(lim["cpu"]) >= 9  # a Train worker at cpus_per_worker=8, plus Data
        else:
            assert mem >= 32 and int(lim["cpu"]) >= 8


def test_rayjob_clusters_are_the_raycluster():
    """The RayJobs carry raycluster.yaml's templates: sized and secured in one place."""
    (_, rc), = [(p, d) for p, d in _kube("RayCluster") if p.parent == KUBERAY]
    jobs = [d for p, d in _kube("RayJob") if p.parent == KUBERAY]
    assert jobs
    for job in jobs:
        assert job["spec"]["rayClusterSpec"] == rc["spec"], job["metadata"]["name"]


def _entrypoints() -> list[tuple[str, str]]:
    return [(d["metadata"]["name"], d["spec"]["entrypoint"]) for _, d in _kube("RayJob")]


@pytest.mark.parametrize("job,entrypoint", _entrypoints())
def test_rayjob_entrypoint_is_one_pipeline_command_that_loads(job, entrypoint):
    from discl_ray.cli import COMMANDS
    from discl_ray.config import load_config
    from jobs.pipeline import STAGES, split_args

    # KubeRay pastes the entrypoint unquoted into a shell: no &&, ;, |, quotes, $, redirections, braces.
    assert re.fullmatch(r"[A-Za-z0-9_./=:,@+\- ]+", entrypoint), f"{job}: shell syntax in {entrypoint!r}"
    argv = shlex.split(entrypoint)
    assert argv[:2] == ["discl", "pipeline"], job
    stages, shared = split_args(argv[2:])
    assert stages and all(s in STAGES and s in COMMANDS for s in stages), stages
    assert len(stages) == len(set(stages))
    order = [s for s in STAGES if s in stages]
    assert stages == order, f"{job}: stages out of data-path order"
    cfg_path = shared[shared.index("--config") + 1]
    assert cfg_path.startswith(IMAGE_APP)
    overrides = [a for a in shared if "=" in a]
    cfg = load_config(REPO / cfg_path.removeprefix(IMAGE_APP), overrides)  # valid before any cluster exists
    assert cfg.run_root == "/mnt/runs" and cfg.dataset.root.startswith("/mnt/data/")
    if "sweep" in stages:
        assert cfg.sweep.name and cfg.training.gpus_per_worker == 1
        # Tune sizes concurrency from the resources up now (zero GPU workers): say how many it may grow to.
        gpu_max = sum(g["maxReplicas"] for _, d in _kube("RayJob") if d["metadata"]["name"] == job
                      for g in d["spec"]["rayClusterSpec"]["workerGroupSpecs"])
        assert cfg.sweep.max_concurrent_trials == gpu_max
        assert "training.strategy" in cfg.sweep.space


def test_entrypoint_check_catches_a_shell_chain():
    """The review's bug: `a && b` would run b in the submitter pod; the pattern above rejects it."""
    pattern = r"[A-Za-z0-9_./=:,@+\- ]+"
    for bad in ("discl mine && discl prompts", "discl mine; discl prompts", "discl mine | tee x",
                "discl pipeline mine 'sweep.space={a: 1}'", "discl pipeline mine run_root=$HOME"):
        assert not re.fullmatch(pattern, bad)


def test_applying_the_folder_starts_at_most_one_rayjob_and_the_whole_path():
    jobs = [d for p, d in _kube("RayJob") if p.parent == KUBERAY]
    running = [j for j in jobs if not j["spec"].get("suspend", False)]
    assert len(running) == 1, [j["metadata"]["name"] for j in running]
    stages, _ = __import__("jobs.pipeline", fromlist=["split_args"]).split_args(
        shlex.split(running[0]["spec"]["entrypoint"])[2:])
    assert stages == ["mine", "prompts", "generate", "score", "sweep", "report"]
    for job in jobs:
        spec = job["spec"]
        assert spec["submissionMode"] == "K8sJobMode" and spec["backoffLimit"] == 0
        assert spec["shutdownAfterJobFinishes"] is True and spec["activeDeadlineSeconds"] >= 24 * 3600
        for value in job["metadata"]["labels"].values():  # Kubernetes label value syntax
            assert re.fullmatch(r"([A-Za-z0-9]([-_.A-Za-z0-9]*[A-Za-z0-9])?)?", value) and len(value) <= 63


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
    text = "\n".join(p.read_text(errors="replace") for p in INFRA.rglob("*") if p.is_file() and p.suffix != ".gz")
    assert not re.search(r"postgres(ql)?://\w+:\w+@", text)       # no inline DB password
    assert not re.search(r"AKIA[0-9A-Z]{16}", text)                # no AWS key ids


def test_no_environment_variable_is_set_to_an_empty_string():
    """`MLFLOW_S3_ENDPOINT_URL: ""` broke every artifact upload on AWS S3 (boto3: Invalid endpoint)."""
    for path, doc in _all_docs():
        for c in _containers(doc):
            for e in c.get("env", []):
                assert "valueFrom" in e or str(e.get("value", "")).strip(), (path, e["name"])
        if doc.get("kind") == "ConfigMap":  # a ConfigMap's keys become env vars (configMapKeyRef / envFrom)
            for k, v in doc.get("data", {}).items():
                assert str(v).strip(), (path, k)
    launcher = _docs(LAUNCHER)[0]
    for opt in launcher["docker"]["run_options"]:
        m = re.match(r"(?:--env|-e)[ =](\w+)=(.*)", opt)
        if m:
            assert m.group(2).strip(), opt


def test_mlflow_server_sql_backend_object_store():
    (_, dep), = _kube("Deployment")
    c = dep["spec"]["template"]["spec"]["containers"][0]
    args = " ".join(c["args"])
    assert "--backend-store-uri=$(MLFLOW_BACKEND_STORE_URI)" in args and "--serve-artifacts" in args
    env = {e["name"]: e for e in c["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"]["name"] == "mlflow-db"
    # The S3 endpoint comes only from an optional ConfigMap that exists only for S3-compatible stores.
    assert "MLFLOW_S3_ENDPOINT_URL" not in env
    assert {"configMapRef": {"name": "mlflow-s3-endpoint", "optional": True}} in c["envFrom"]
    (_, cm), = _kube("ConfigMap")
    assert cm["data"]["ARTIFACTS_DESTINATION"].startswith(("s3://", "gs://"))
    assert "MLFLOW_S3_ENDPOINT_URL" not in cm["data"]
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    (_, svc), = _kube("Service")
    assert svc["spec"]["type"] == "ClusterIP" and svc["spec"]["ports"][0]["port"] == 5000
    host = f"{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc.cluster.local:5000"
    assert host in args  # MLflow's allowed-hosts admits the address the Ray pods use
    for _, spec in _ray_cluster_specs():
        for _, group in _groups(spec):
            for rc in group["template"]["spec"]["containers"]:
                uri = {e["name"]: e.get("value") for e in rc["env"]}["MLFLOW_TRACKING_URI"]
                assert uri == f"http://{host}"


def test_pvcs_are_read_write_many_with_a_storage_class():
    pvcs = {d["metadata"]["name"]: d for _, d in _kube("PersistentVolumeClaim")}
    assert set(pvcs) == {"discl-runs", "discl-data"}
    for name, pvc in pvcs.items():
        assert pvc["spec"]["accessModes"] == ["ReadWriteMany"], name
        assert pvc["spec"].get("storageClassName"), f"{name}: no storageClassName (the default class is RWO)"


def test_cluster_launcher_boots_and_mounts_the_volumes():
    cfg = yaml.safe_load(LAUNCHER.read_text())
    head = " ".join(cfg["head_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in head and "--dashboard-host=127.0.0.1" in head
    assert "RAY_AUTH_MODE=token" in " ".join(cfg["worker_start_ray_commands"])
    types = cfg["available_node_types"]
    assert types[cfg["head_node_type"]]["resources"]["GPU"] == 0
    assert any(t["resources"].get("GPU", 0) >= 1 and t["min_workers"] == 0 for t in types.values())
    opts = " ".join(cfg["docker"]["run_options"])
    volumes = dict(re.findall(r"(?:--volume|-v)[ =](/[^:\s]+):(/[^:\s]+)", opts))
    assert volumes.get("/mnt/runs") == "/mnt/runs" and volumes.get("/mnt/data") == "/mnt/data"
    assert re.search(r"--env MLFLOW_TRACKING_URI=https?://\S+", opts)
    assert re.search(r"--shm-size=(\d+)g", opts)
    init = " ".join(cfg["initialization_commands"])
    assert "/mnt/runs" in init and "chown 1000:1000 /mnt/runs" in init  # the container's uid writes there


def _dockerfile() -> str:
    return (INFRA / "Dockerfile").read_text()


def _run_blocks(text: str) -> list[str]:
    joined = re.sub(r"\\\n", " ", text)
    return [line[4:] for line in joined.splitlines() if line.startswith("RUN ")]


def test_image_reuses_uid_1000_instead_of_colliding_with_ubuntu():
    """Ubuntu 24.04 (the CUDA base too) has user/group `ubuntu` = 1000: a blind groupadd --gid 1000 fails."""
    for block in _run_blocks(_dockerfile()):
        if re.search(r"groupadd .*--gid 1000|useradd .*--uid 1000", block):
            before = block[:block.index("groupadd")]
            assert "getent passwd 1000" in before and "userdel" in before, "uid 1000 not freed first"
            assert "getent group 1000" in before and "groupdel" in before, "gid 1000 not freed first"
            break
    else:
        pytest.fail("the Dockerfile creates no uid-1000 user")
    assert re.search(r"^USER 1000(:1000)?$", _dockerfile(), re.M)  # numeric: runAsNonRoot can verify it
    assert re.search(r"^\s*HOME=/home/ray", _dockerfile(), re.M)  # the launcher mounts under the image's HOME


def test_image_has_what_the_launcher_and_kuberay_run():
    installs = " ".join(b for b in _run_blocks(_dockerfile()) if "apt-get install" in b)
    for pkg in ("rsync", "openssh-client", "wget", "tini"):
        assert re.search(rf"\b{pkg}\b", installs), pkg


def test_torch_index_is_required_and_matches_the_tag():
    text = _dockerfile()
    assert re.search(r"^ARG TORCH_INDEX_URL$", text, re.M), "TORCH_INDEX_URL must have no (empty) default"
    assert re.search(r'test -n "\$\{TORCH_INDEX_URL\}"', text)
    cuda_tag = re.search(r"^ARG CUDA_TAG=(\d+)\.(\d+)$", text, re.M)
    base = re.search(r"ARG CUDA_IMAGE=nvidia/cuda:(\d+)\.(\d+)\.\d+-cudnn-runtime-ubuntu24\.04", text)
    assert cuda_tag and base and cuda_tag.groups() == base.groups()
    cu = "cu" + "".join(cuda_tag.groups())
    assert "torch.version.cuda" in text and "${CUDA_TAG}" in text  # the build checks the installed wheel
    images = [c["image"] for _, d in _all_docs() for c in _containers(d)]
    images.append(yaml.safe_load(LAUNCHER.read_text())["docker"]["image"])
    assert all(i.endswith(f"-{cu}") for i in images), images
    readme = (INFRA / "README.md").read_text()
    assert re.search(rf"^export TORCH_INDEX_URL=.*{cu}", readme, re.M)   # the README asks for the tag's CUDA


def test_dockerignore_keeps_environments_and_runs_out_of_the_context():
    patterns = [p.strip() for p in (REPO / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]

    def regex(pattern: str) -> str:  # Docker's matching: Go filepath.Match plus `**` for any directories
        out = re.escape(pattern.strip("/"))
        out = out.replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        return out

    def ignored(path: str) -> bool:  # a matched directory excludes everything under it; the last match wins
        parts = path.split("/")
        state = False
        for pat in patterns:
            neg = pat.startswith("!")
            if any(re.fullmatch(regex(pat.lstrip("!")), "/".join(parts[:i])) for i in range(1, len(parts) + 1)):
                state = not neg
        return state

    for path in (".venv/bin/python", "runs/toy_lt/mlflow.db", ".git/HEAD", "discl_ray/__pycache__/x.pyc",
                 "data/wilds/iwildcam_v2.0/metadata.csv", "mlruns/0/meta.yaml"):
        assert ignored(path), path
    copied = re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", _dockerfile(), re.M)
    sources = [s for line in copied for s in line.split()]
    assert {"pyproject.toml", "README.md", "discl_ray", "jobs", "configs", "infra/requirements.txt"} <= set(sources)
    for src in sources:
        assert not ignored(src), src
        for f in (REPO / src).rglob("*") if (REPO / src).is_dir() else [REPO / src]:
            rel = f.relative_to(REPO).as_posix()
            if "__pycache__" not in rel and f.is_file() and not rel.endswith(".pyc"):
                assert not ignored(rel), rel


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
    docker = _dockerfile()
    base = re.search(r"ARG CUDA_IMAGE=(\S+)", docker).group(1)
    assert base.startswith("nvidia/cuda:") and _pinned(base) and "cudnn" in base
    assert "-r infra/requirements.txt" in docker and "RAY_AUTH_MODE=token" in docker


def test_readme_requires_kuberay_1_6_and_names_the_prerequisites():
    text = (INFRA / "README.md").read_text()
    assert "KubeRay ≥ 1.6" in text and "1.5.1" not in text
    for need in ("ReadWriteMany", "mlflow-db", "bucket", "kubectl -n discl wait", "rayjob-iwildcam.yaml"):
        assert need in text, need
