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
JOBS = KUBERAY / "jobs"
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
    assert {"RayCluster", "RayJob", "Deployment", "Service", "NetworkPolicy", "PersistentVolumeClaim",
            "ServiceAccount", "PodDisruptionBudget"} <= kinds
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
    jobs = [d for p, d in _kube("RayJob") if p.parent == JOBS]
    assert len(jobs) == len(_kube("RayJob")) >= 3
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
    if argv[:4] == ["python", "-m", "discl_ray.cli", "rehearse"]:  # the rehearsal: one stage command
        assert "rehearse" in COMMANDS and "--no-upstream" not in argv
        stages, shared = [], argv[4:]
    else:
        assert argv[:2] == ["discl", "pipeline"], job
        stages, shared = split_args(argv[2:])
        assert stages
    assert all(s in STAGES and s in COMMANDS for s in stages), stages
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


def test_applying_the_folder_starts_no_rayjob_and_reapplying_never_suspends():
    """Review 3: re-applying the folder set the running sweep job's `suspend: true` again, and KubeRay deleted
    its cluster mid-sweep. RayJobs live in jobs/ (applied by name) and none sets spec.suspend."""
    assert not [p for p, _ in _kube("RayJob") if p.parent == KUBERAY], "a RayJob that `apply -f kuberay/` starts"
    jobs = {d["metadata"]["name"]: d for p, d in _kube("RayJob")}
    assert {"discl-rehearse", "discl-iwildcam", "discl-iwildcam-sweep"} <= set(jobs)
    for name, job in jobs.items():
        spec = job["spec"]
        assert "suspend" not in spec, f"{name}: re-applying would set suspend again"
        assert spec["submissionMode"] == "K8sJobMode" and spec["backoffLimit"] == 0
        assert spec["shutdownAfterJobFinishes"] is True
        # the rehearsal is minutes (a stuck one must not hold GPUs for two days); the real path is up to 48 h
        assert (spec["activeDeadlineSeconds"] <= 4 * 3600 if name == "discl-rehearse"
                else spec["activeDeadlineSeconds"] >= 24 * 3600), name
        for value in job["metadata"]["labels"].values():  # Kubernetes label value syntax
            assert re.fullmatch(r"([A-Za-z0-9]([-_.A-Za-z0-9]*[A-Za-z0-9])?)?", value) and len(value) <= 63
    from jobs.pipeline import split_args

    stages, _ = split_args(shlex.split(jobs["discl-iwildcam"]["spec"]["entrypoint"])[2:])
    assert stages == ["mine", "prompts", "generate", "score", "sweep", "report"]


def test_iwildcam_job_trains_the_flyp_baseline_before_mining():
    """Issue 25: the iWildCam configs mine with the FLYP baseline (mining.classifier: trained_run); the job's
    `discl pipeline` finds it as an upstream experiment of `mine` and trains it from baseline_flyp.yaml, a
    config that ships in the image, with the job's run_root and dataset (not switched off)."""
    from discl_ray.config import load_config
    from discl_ray.experiment.upstream import upstream_of, upstream_overrides
    from jobs.pipeline import split_args

    (job,) = [d for _, d in _kube("RayJob") if d["metadata"]["name"] == "discl-iwildcam"]
    argv = shlex.split(job["spec"]["entrypoint"])
    stages, shared = split_args(argv[2:])
    assert "--no-upstream" not in shared
    cfg_path = REPO / shared[shared.index("--config") + 1].removeprefix(IMAGE_APP)
    overrides = [a for a in shared if "=" in a]
    cfg = load_config(cfg_path, overrides)
    assert cfg.mining.classifier == "trained_run" and cfg.mining.classifier_from == "iwildcam_flyp"
    (up,) = upstream_of(cfg, cfg_path)
    assert up.config == REPO / "configs" / "iwildcam" / "baseline_flyp.yaml" and up.name == "iwildcam_flyp"
    assert "mine" in up.stages and stages.index("mine") == 0  # trained before the first stage that reads it
    kept = upstream_overrides(overrides)
    assert "run_root=/mnt/runs" in kept and "dataset.root=/mnt/data/wilds" in kept
    baseline = load_config(up.config, kept)
    assert baseline.experiment == "iwildcam_flyp" and baseline.training.strategy == "none"
    assert baseline.training.gpus_per_worker == 1 and baseline.run_root == "/mnt/runs"
    copied = re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", _dockerfile(), re.M)
    assert any(src.split()[0] == "configs" for src in copied)  # the baseline's config is in the image


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


def _mlflow() -> tuple[dict, dict]:
    (_, dep), = _kube("Deployment")
    return dep, dep["spec"]["template"]["spec"]["containers"][0]


def test_mlflow_server_sql_backend_object_store():
    dep, c = _mlflow()
    env = {e["name"]: e for e in c["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"]["name"] == "mlflow-db"
    # The S3 endpoint comes only from an optional ConfigMap that exists only for S3-compatible stores.
    assert "MLFLOW_S3_ENDPOINT_URL" not in env
    assert {"configMapRef": {"name": "mlflow-s3-endpoint", "optional": True}} in c["envFrom"]
    (_, cm), = _kube("ConfigMap")
    assert {"configMapRef": {"name": cm["metadata"]["name"]}} in c["envFrom"]
    assert cm["data"]["MLFLOW_DEFAULT_ARTIFACT_ROOT"].startswith(("s3://", "gs://"))
    assert "MLFLOW_S3_ENDPOINT_URL" not in cm["data"]
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    (_, svc), = _kube("Service")
    assert svc["spec"]["type"] == "ClusterIP" and svc["spec"]["ports"][0]["port"] == 5000
    host = f"{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc.cluster.local:5000"
    assert host in " ".join(c["args"])  # MLflow's allowed-hosts admits the address the Ray pods use
    for _, spec in _ray_cluster_specs():
        for _, group in _groups(spec):
            for rc in group["template"]["spec"]["containers"]:
                uri = {e["name"]: e.get("value") for e in rc["env"]}["MLFLOW_TRACKING_URI"]
                assert uri == f"http://{host}"


def test_mlflow_artifacts_go_straight_to_the_bucket(monkeypatch):
    """Review 3: with --serve-artifacts every upload was staged in the MLflow pod's 2 Gi /tmp and a wave of
    8 checkpoints evicted it. Clients write to S3 directly; the server only reads for the UI."""
    from mlflow.cli import server

    _, c = _mlflow()
    assert "--no-serve-artifacts" in c["args"] and "--serve-artifacts" not in c["args"]
    assert not any(a.startswith("--artifacts-destination") for a in c["args"])
    # what `mlflow server`'s own option parser makes of these arguments and the pod's environment
    (_, cm), = _kube("ConfigMap")
    for k, v in {"MLFLOW_BACKEND_STORE_URI": "postgresql://u@h/db", **cm["data"]}.items():
        monkeypatch.setenv(k, v)
    params = server.make_context("mlflow server", list(c["args"])).params
    assert params["serve_artifacts"] is False
    assert params["default_artifact_root"] == cm["data"]["MLFLOW_DEFAULT_ARTIFACT_ROOT"]
    assert params["backend_store_uri"] == "postgresql://u@h/db"
    # every Ray pod can write the bucket itself: workload identity or keys, on head and workers
    for name, spec in _ray_cluster_specs():
        for group_name, group in _groups(spec):
            pod = group["template"]["spec"]
            assert pod["serviceAccountName"] == "discl-ray", (name, group_name)
            (rc,) = pod["containers"]
            assert {"configMapRef": {"name": "mlflow-s3-endpoint", "optional": True}} in rc["envFrom"]
    tmp = [v for v in dep_volumes() if v["name"] == "tmp"]
    assert _gib(tmp[0]["emptyDir"]["sizeLimit"]) >= 4  # UI downloads of a 1.7 GB checkpoint still fit


def dep_volumes() -> list[dict]:
    dep, _ = _mlflow()
    return dep["spec"]["template"]["spec"]["volumes"]


def test_mlflow_admits_port_forwards_to_any_local_port():
    """Review 3: --allowed-hosts matched exactly, so `port-forward svc/mlflow 8080:5000` got 403. Checked with
    MLflow's own matcher, as its security middleware applies it to the Host header."""
    from mlflow.server.security_utils import is_allowed_host_header

    _, c = _mlflow()
    (arg,) = [a for a in c["args"] if a.startswith("--allowed-hosts=")]
    allowed = arg.split("=", 1)[1].split(",")
    for host in ("localhost:5000", "localhost:8080", "127.0.0.1:5000", "127.0.0.1:18080", "[::1]:8080",
                 "mlflow.discl.svc.cluster.local:5000", "mlflow:5000", "mlflow.discl:5000"):
        assert is_allowed_host_header(allowed, host), host
    for host in ("evil.example.com", "evil.example.com:5000", "localhost.evil.example.com:5000", "10.0.0.1:5000"):
        assert not is_allowed_host_header(allowed, host), host
    assert "*" not in allowed
    assert not is_allowed_host_header(["localhost:5000", "127.0.0.1:5000"], "127.0.0.1:8080")  # the old list


def test_mlflow_db_password_never_on_the_command_line():
    """Review 3: `--backend-store-uri=$(MLFLOW_BACKEND_STORE_URI)` expanded the password into argv (ps)."""
    _, c = _mlflow()
    secret_env = {e["name"] for e in c["env"] if "secretKeyRef" in e.get("valueFrom", {})}
    assert "MLFLOW_BACKEND_STORE_URI" in secret_env
    for arg in c.get("command", []) + c.get("args", []):
        for var in re.findall(r"\$\((\w+)\)", arg):
            assert var not in secret_env, f"secret {var} expanded onto the command line: {arg}"
        assert not arg.startswith("--backend-store-uri")


def test_mlflow_has_a_startup_probe():
    """Review 3: first start on an empty database (table creation) outlived liveness' initial delay."""
    _, c = _mlflow()
    probe = c["startupProbe"]
    assert probe["httpGet"]["path"] == "/health"
    assert probe["periodSeconds"] * probe["failureThreshold"] >= 180
    assert "initialDelaySeconds" not in c["livenessProbe"]


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
    for need in ("ReadWriteMany", "mlflow-db", "bucket", "wait-job.sh", "rayjob-iwildcam.yaml"):
        assert need in text, need


def _prerequisites() -> str:
    text = (INFRA / "README.md").read_text()
    return text[text.index("## Prerequisites"):text.index("## From an empty cluster")]


# A 16 vCPU / 64 GiB node (m6i.4xlarge, n2-standard-16, D16s v5) leaves about 15.9 CPU and 57-61 GiB
# allocatable; keep room for daemonsets (CNI, kube-proxy, CSI, log and metrics agents).
CPU_NODE = {"vcpu": 16, "gib": 64, "allocatable_cpu": 15.9, "allocatable_gib": 57.0}
DAEMONSETS = {"cpu": 0.5, "gib": 2.0}


def _cpu(q) -> float:
    q = str(q)
    return float(q[:-1]) / 1000 if q.endswith("m") else float(q)


@pytest.mark.parametrize("name,spec", _ray_cluster_specs(), ids=lambda v: v if isinstance(v, str) else "")
def test_head_fits_the_cpu_node_the_prerequisites_name(name, spec):
    """Review 3: a 16 CPU / 64 Gi head (plus the autoscaler sidecar in its pod) never fits a 16 vCPU / 64 GiB
    node's allocatable, and the prerequisites named no CPU node size: the head stayed Pending."""
    (head,) = spec["headGroupSpec"]["template"]["spec"]["containers"]
    req = head["resources"]["requests"]
    side = spec["autoscalerOptions"]["resources"]["requests"]
    cpu = _cpu(req["cpu"]) + _cpu(side["cpu"]) + DAEMONSETS["cpu"]
    mem = _gib(req["memory"]) + _gib(side["memory"]) + DAEMONSETS["gib"]
    assert cpu <= CPU_NODE["allocatable_cpu"] and mem <= CPU_NODE["allocatable_gib"], (name, cpu, mem)
    assert "tolerations" not in spec["headGroupSpec"]["template"]["spec"]  # never on a (tainted) GPU node
    assert re.search(rf"CPU node of at least {CPU_NODE['vcpu']} vCPU / {CPU_NODE['gib']} GiB", _prerequisites())


def test_gpu_driver_r570_is_a_prerequisite_and_checked_at_start():
    """Review 3: the CUDA 12.8 image needs driver R570+; on older drivers `device: auto` ran on the CPU."""
    assert re.search(r"NVIDIA driver R570 or newer", _prerequisites())
    assert "CUDA_IMAGE=nvidia/cuda:12.8" in _dockerfile()
    for name, spec in _ray_cluster_specs():
        for group in spec["workerGroupSpecs"]:
            (c,) = group["template"]["spec"]["containers"]
            cmd = " ".join(c["lifecycle"]["postStart"]["exec"]["command"])
            assert "torch.cuda.is_available()" in cmd and "sys.exit" in cmd, name
            assert "R570" in cmd


def test_pod_security_contexts_skip_recursive_chown():
    """Review 3: fsGroup without fsGroupChangePolicy re-owned the 2 Ti run volume on every pod start."""
    pods = 0
    for path, doc in _all_docs():
        for key_path, node in _walk(doc):
            if isinstance(node, dict) and "fsGroup" in node:
                pods += 1
                assert node.get("fsGroupChangePolicy") == "OnRootMismatch", (path, key_path)
    assert pods >= 9  # 4 Ray manifests × 2 groups, MLflow, the dataset Job


def _pod_templates_all() -> list[tuple[str, dict]]:
    """Every pod template (with its metadata) in the manifests."""
    out = []
    for path, doc in _all_docs():
        for key_path, node in _walk(doc):
            if key_path and key_path[-1] == "template" and isinstance(node, dict) and "spec" in node:
                if "containers" in node["spec"]:
                    out.append((f"{path.name}:{'.'.join(key_path)}", node))
    return out


def test_every_container_requests_ephemeral_storage():
    """Review 3: Ray's logs and spilled objects land on the node's disk; without a request the scheduler
    ignores it and the kubelet evicts under disk pressure."""
    templates = _pod_templates_all()
    assert len(templates) >= 10
    for name, tpl in templates:
        for c in tpl["spec"]["containers"]:
            assert _gib(c["resources"]["requests"]["ephemeral-storage"]) >= 1, (name, c["name"])
    for name, spec in _ray_cluster_specs():
        (worker,) = spec["workerGroupSpecs"][0]["template"]["spec"]["containers"]
        assert _gib(worker["resources"]["requests"]["ephemeral-storage"]) >= 40, name


def test_long_jobs_are_not_disrupted():
    """Review 3: a 48 h job had no PodDisruptionBudget and no do-not-disrupt annotation."""
    (_, pdb), = _kube("PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 0 and "minAvailable" not in pdb["spec"]
    sel = pdb["spec"]["selector"]

    def selected(labels: dict) -> bool:
        if any(labels.get(k) != v for k, v in sel.get("matchLabels", {}).items()):
            return False
        for e in sel.get("matchExpressions", []):
            if e["operator"] != "In" or labels.get(e["key"]) not in e["values"]:
                return False
        return True

    for name, spec in _ray_cluster_specs():
        for group_name, group in _groups(spec):
            meta = group["template"]["metadata"]
            assert selected(meta["labels"]), (name, group_name)
            assert meta["annotations"]["karpenter.sh/do-not-disrupt"] == "true"
            assert meta["annotations"]["cluster-autoscaler.kubernetes.io/safe-to-evict"] == "false"
    dep, _ = _mlflow()
    assert not selected(dep["spec"]["template"]["metadata"]["labels"])  # MLflow may move
    (_, job), = _kube("Job")
    assert not selected(job["spec"]["template"]["metadata"]["labels"])


SECRET_ENV = {  # name -> Secret it comes from, on the head and on every GPU worker
    "AWS_ACCESS_KEY_ID": "discl-aws", "AWS_SECRET_ACCESS_KEY": "discl-aws", "AWS_SESSION_TOKEN": "discl-aws",
    "HF_TOKEN": "hf-token",
    "MLFLOW_TRACKING_USERNAME": "mlflow-auth", "MLFLOW_TRACKING_PASSWORD": "mlflow-auth",
    "MLFLOW_TRACKING_TOKEN": "mlflow-auth",
}


@pytest.mark.parametrize("name,spec", _ray_cluster_specs(), ids=lambda v: v if isinstance(v, str) else "")
def test_credentials_reach_head_and_workers_from_their_own_environment(name, spec):
    """Review 3: AWS_*, HF_* and MLFLOW_TRACKING_* travelled in the Ray job's runtime env (plaintext, readable
    with the Ray token). Every Ray pod now gets them from Secrets (optional: workload identity instead), with a
    slot for a session token, and runs as a ServiceAccount that workload identity can annotate."""
    (_, sa), = _kube("ServiceAccount")
    for group_name, group in _groups(spec):
        pod = group["template"]["spec"]
        assert pod["serviceAccountName"] == sa["metadata"]["name"], group_name
        (c,) = pod["containers"]
        env = {e["name"]: e for e in c["env"]}
        for var, secret in SECRET_ENV.items():
            ref = env[var]["valueFrom"]["secretKeyRef"]
            assert ref["name"] == secret and ref["optional"] is True, (group_name, var)
        assert env["MLFLOW_TRACKING_URI"]["value"].startswith("http://")
        if group_name != "head":  # only the head's autoscaler sidecar talks to the Kubernetes API
            assert pod["automountServiceAccountToken"] is False, group_name
    dep, c = _mlflow()
    assert dep["spec"]["template"]["spec"]["serviceAccountName"] == sa["metadata"]["name"]
    assert {e["name"] for e in c["env"]} >= {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"}


def test_image_build_is_for_the_nodes_platform():
    """Review 3: `docker build` on Apple silicon made an arm64 image (exec format error on the nodes)."""
    readme = (INFRA / "README.md").read_text()
    builds = re.findall(r"^docker build .*$", readme, re.M)
    assert builds and all("--platform linux/amd64" in b for b in builds), builds
    assert "docker build --platform linux/amd64" in _dockerfile()
    assert re.search(r"^ARG IMAGE_ARCH=amd64$", _dockerfile(), re.M)
    first = _run_blocks(_dockerfile())[0]
    assert first.startswith('arch="$(dpkg --print-architecture)"') and "${IMAGE_ARCH}" in first
    check = first[:first.index(" && apt-get update")]  # the build's own check, run with a fake dpkg
    import os
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for arch, rc in (("amd64", 0), ("arm64", 1)):
            dpkg = Path(tmp) / "dpkg"
            dpkg.write_text(f"#!/bin/sh\necho {arch}\n")
            dpkg.chmod(0o755)
            env = {**os.environ, "PATH": f"{tmp}:{os.environ['PATH']}", "IMAGE_ARCH": "amd64"}
            out = subprocess.run(["bash", "-o", "pipefail", "-c", check], env=env, capture_output=True, text=True,
                                 timeout=30)
            assert out.returncode == rc, (arch, out.stderr)
            if rc:
                assert "docker build --platform linux/amd64" in out.stderr


def test_launcher_mounts_both_volumes_idempotently(tmp_path):
    """Review 3: the launcher's EFS mount (commented out) was not idempotent and nothing mounted /mnt/data.
    initialization_commands run twice (`ray up` again, a node restart) with fake sudo / mount / mountpoint:
    both volumes mounted once, the second run mounts nothing."""
    import os
    import stat
    import subprocess

    cfg = yaml.safe_load(LAUNCHER.read_text())
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    state = tmp_path / "mounted"
    state.mkdir()
    fakes = {
        "sudo": 'exec "$@"',
        "mkdir": "exit 0",
        "chown": f'echo "chown $*" >> {tmp_path}/log',
        # mountpoint -q DIR: mounted when the fake mount recorded it
        "mountpoint": f'[[ -e {state}/$(echo "${{@: -1}}" | tr / _) ]]',
        "mount": f'echo "mount $*" >> {tmp_path}/log; touch {state}/$(echo "${{@: -1}}" | tr / _)',
    }
    for name, body in fakes.items():
        f = bin_dir / name
        f.write_text(f"#!/usr/bin/env bash\n{body}\n")
        f.chmod(f.stat().st_mode | stat.S_IEXEC)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    for _ in range(2):
        for cmd in cfg["initialization_commands"]:
            out = subprocess.run(["bash", "-c", cmd], env=env, capture_output=True, text=True, timeout=30)
            assert out.returncode == 0, (cmd, out.stderr)
    mounts = [ln for ln in (tmp_path / "log").read_text().splitlines() if ln.startswith("mount ")]
    assert len(mounts) == 2, mounts  # once each, not again on the second run
    assert mounts[0].endswith(" /mnt/runs") and mounts[1].endswith(" /mnt/data")
    opts = " ".join(cfg["docker"]["run_options"])
    assert "--volume /mnt/data:/mnt/data:ro" in opts


def test_step_references_point_at_the_right_readme_step():
    """Review 3: rayjob-sweep.yaml sent readers to "step 6" (the dataset) for what step 9 did."""
    import fnmatch

    readme = (INFRA / "README.md").read_text()
    sections = dict(re.findall(r"^### (\d+)\. .*?\n(.*?)(?=^### |^## |\Z)", readme, re.M | re.S))
    assert len(sections) >= 10
    refs = 0
    for path in sorted(INFRA.rglob("*")):
        if not path.is_file() or path.suffix in (".gz", ".json") or path.name == "README.md":
            continue
        for n in re.findall(r"README\.md,? step (\d+)", path.read_text()):
            refs += 1
            assert n in sections, (path.name, n)
            body = sections[n]
            rel = path.relative_to(REPO).as_posix()
            names = {d["metadata"]["name"] for d in _docs(path) if "metadata" in d} if path.suffix == ".yaml" else set()
            globs = re.findall(r"infra/[\w./*-]+", body)
            assert (any(fnmatch.fnmatch(rel, g) for g in globs) or any(nm in body for nm in names)), \
                f"{rel}: step {n} is not about it"
    assert refs >= 4
    for n in re.findall(r"\bstep (\d+)", readme):
        assert n in sections, n


def test_rehearsal_is_the_first_job_and_readme_names_match_the_manifests():
    """Issue 25/30: after install, the README's first job is the rehearsal of discl_adaptive.yaml; every job
    the README applies, follows or waits for is a manifest of that name, in that order."""
    readme = (INFRA / "README.md").read_text()
    main = readme[readme.index("## From an empty cluster"):readme.index("## Alternative")]
    code = "\n".join(re.findall(r"```bash\n(.*?)```", main, re.S))
    by_file = {p.relative_to(REPO).as_posix(): d for p, d in _all_docs() if d.get("kind") in ("RayJob", "Job")}
    applied: list[tuple[str, str]] = []
    for line in code.splitlines():
        m = re.match(r"kubectl apply -f (\S+\.yaml)", line)
        if m and m.group(1) in by_file:
            applied.append((by_file[m.group(1)]["kind"], by_file[m.group(1)]["metadata"]["name"]))
        m = re.match(r"infra/kuberay/(wait-rayjob|logs-rayjob|wait-job)\.sh (\S+)", line)
        if m:
            kind = "Job" if m.group(1) == "wait-job" else "RayJob"
            assert (kind, m.group(2)) in applied, f"{line}: not applied before"
    rayjobs = [n for k, n in applied if k == "RayJob"]
    assert rayjobs[:2] == ["discl-rehearse", "discl-iwildcam"], rayjobs
    assert ("Job", "discl-dataset-iwildcam") in applied  # the rehearsal reads a few real images
    (rehearse,) = [d for d in by_file.values() if d["metadata"]["name"] == "discl-rehearse"]
    argv = shlex.split(rehearse["spec"]["entrypoint"])
    assert argv[:6] == ["python", "-m", "discl_ray.cli", "rehearse", "--config",
                        IMAGE_APP + "configs/iwildcam/discl_adaptive.yaml"]
    assert "run_root=/mnt/runs" in argv and "dataset.root=/mnt/data/wilds" in argv
    # the submit loop: rehearsal, then the FLYP baseline, then the stages that mine with it
    alt = readme[readme.index("## Alternative"):readme.index("## Pod sizes")]
    order = [alt.index(s) for s in ("discl submit rehearse", "configs/iwildcam/discl_adaptive.yaml",
                                    "discl submit train", "configs/iwildcam/baseline_flyp.yaml",
                                    "for stage in mine")]
    assert order == sorted(order)
