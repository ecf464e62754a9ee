"""A two-node Ray cluster on loopback: `discl generate` and `discl score` joining it with `ray.address`.

The head has no GPU (as the KubeRay and launcher heads); the second node advertises one GPU (a resource on
this CPU machine: the actors find no CUDA inside and fall back to CPU, with a log line). Every generation
and scoring actor must land on the second node holding a GPU, and none on the head — which only holds if
the actors ask for GPUs from the config and `device: auto` is resolved inside them, not on the driver.

The default suite proves the same placement through `ray start` nodes and `discl submit`
(tests/test_rehearse_workstation.py: generate, score and train on the GPU node); the `ray.cluster_utils` case here
is *slow*. The refusal of the sqlite default on a cluster needs no cluster and stays in the default suite.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from clip_fixtures import TINY_CLIP, make_tiny_clip
from gen_fixtures import tiny_sd_dir, write_experiment

REPO = Path(__file__).resolve().parent.parent


def _cli(stage: str, cfg_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, "-m", "discl_ray.cli", stage, "--config", str(cfg_path), *overrides],
                          capture_output=True, text=True, timeout=400, env=env, cwd=REPO)


@pytest.fixture()
def two_nodes():
    assert os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == "0", "conftest pins Ray to loopback"
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0,
                                                            "include_dashboard": False})
    try:
        gpu_node = cluster.add_node(num_cpus=2, num_gpus=1)
        cluster.wait_for_nodes()
        yield cluster, cluster.head_node, gpu_node
    finally:
        cluster.shutdown()


def test_sqlite_tracking_is_refused_on_a_cluster_before_any_work(tmp_path):
    """On a cluster, the sqlite default is refused before any work (no cluster is reached), naming the setting."""
    bad = _cli("generate", REPO / "configs/toy/digits_lt.yaml", "ray.address=127.0.0.1:1", "tracking.enabled=true",
               f"run_root={tmp_path / 'runs'}")
    assert bad.returncode == 2 and "tracking.tracking_uri" in bad.stderr and "http(s)" in bad.stderr, bad.stderr[-2000:]
    assert "ray.address" in bad.stderr
    assert not [p for p in (tmp_path / "runs").rglob("*") if p.is_file() and "logs" not in p.parts]   # only its log


@pytest.mark.slow
def test_generate_and_score_actors_run_on_the_gpu_node(tmp_path, two_nodes):
    cluster, head, gpu_node = two_nodes
    assert head.node_ip_address == gpu_node.node_ip_address == "127.0.0.1"
    model = tiny_sd_dir(tmp_path / "models")
    cfg = write_experiment(tmp_path / "runs", model, n_sources=2, lams=[0.0, 0.5], seeds=[0, 1],
                           overrides={"steps": 4, "device": "auto", "num_gpus_per_actor": 1})
    json_path, weights = make_tiny_clip(tmp_path / "clip")
    data = cfg.model_dump(mode="json")
    data["ray"] = {"address": cluster.address}
    data["scoring"].update(model=TINY_CLIP, model_config_path=str(json_path), pretrained=str(weights),
                           device="auto", num_gpus_per_actor=1, batch_size=4, threshold=0.0)
    cfg_path = tmp_path / "cluster.yaml"
    cfg_path.write_text(yaml.safe_dump(data))

    # On a cluster, the sqlite default is refused before any work, naming the setting.
    bad = _cli("generate", cfg_path, "tracking.enabled=true")
    assert bad.returncode == 2 and "tracking.tracking_uri" in bad.stderr and "http(s)" in bad.stderr, bad.stderr[-2000:]

    gen = _cli("generate", cfg_path, "-v")                              # -v: worker logs reach the driver
    assert gen.returncode == 0, gen.stderr[-4000:]
    assert "falling back to CPU" in gen.stderr + gen.stdout          # auto resolved inside the actor
    summary = json.loads((tmp_path / "runs" / "gt" / "generate" / "summary.json").read_text())
    assert summary["generated"] == 2 * 2 * 2 and summary["actors"]
    for actor in summary["actors"]:
        assert actor["node_id"] == gpu_node.node_id != head.node_id
        assert actor["resources"].get("GPU") == 1 and actor["device"] == "cpu"

    sc = _cli("score", cfg_path)
    assert sc.returncode == 0, sc.stderr[-4000:]
    scored = json.loads((tmp_path / "runs" / "gt" / "score" / "summary.json").read_text())
    assert scored["total"] == 8 and scored["actors"]
    for actor in scored["actors"]:
        assert actor["node_id"] == gpu_node.node_id and actor["resources"].get("GPU") == 1
