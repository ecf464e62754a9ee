"""Vendor KubeRay's RayCluster / RayJob openAPIV3Schema as test data (run by hand when KubeRay moves).

    python infra/schemas/vendor_kuberay_crds.py PATH_TO_KUBERAY_CHECKOUT v1.6.0 v1.7.0

Reads ray-operator/config/crd/bases/ray.io_{rayclusters,rayjobs}.yaml at each tag (``git show``), keeps the
served ``v1`` schema, drops ``description`` texts (85 % of the bytes, no validation meaning) and writes
``kuberay-<tag>/<kind>.json.gz`` beside this file with the tag's commit in ``SOURCE.json``.
Everything else (types, enums, required, x-kubernetes-* markers) is kept as upstream wrote it; the test
closes objects (additionalProperties: false) itself, so the data stays a faithful copy.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
CRDS = {"RayCluster": "rayclusters", "RayJob": "rayjobs"}


def strip_descriptions(node):
    if isinstance(node, dict):
        return {k: strip_descriptions(v) for k, v in node.items() if not (k == "description" and isinstance(v, str))}
    if isinstance(node, list):
        return [strip_descriptions(v) for v in node]
    return node


def git(repo: str, *args: str) -> str:
    return subprocess.run(["git", "-C", repo, *args], capture_output=True, text=True, check=True).stdout


def vendor(repo: str, tag: str) -> None:
    out = HERE / f"kuberay-{tag}"
    out.mkdir(exist_ok=True)
    source = {"repository": "ray-project/kuberay", "tag": tag, "commit": git(repo, "rev-list", "-n1", tag).strip(),
              "files": {}}
    for kind, plural in CRDS.items():
        path = f"ray-operator/config/crd/bases/ray.io_{plural}.yaml"
        crd = yaml.safe_load(git(repo, "show", f"{tag}:{path}"))
        (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        schema = strip_descriptions(version["schema"]["openAPIV3Schema"])
        data = json.dumps(schema, sort_keys=True, separators=(",", ":")).encode()
        (out / f"{kind.lower()}.json.gz").write_bytes(gzip.compress(data, mtime=0))
        source["files"][f"{kind.lower()}.json.gz"] = path
    (out / "SOURCE.json").write_text(json.dumps(source, indent=1) + "\n")


if __name__ == "__main__":
    repo_dir, *tags = sys.argv[1:]
    for t in tags:
        vendor(repo_dir, t)
