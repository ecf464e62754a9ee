"""A worker node lost mid-stage on a loopback multi-node Ray cluster (issue 29): spot preemption, a GPU fault,
an OOM-killed raylet. ``ray.cluster_utils.Cluster`` starts a head that holds no CPU (so every task, actor and
Train worker runs on the worker node, as on a GPU cluster whose head only coordinates) and one worker node;
the test removes that node with everything on it (raylet, object store, workers: ``allow_graceful=False``)
once the stage is half done, adds a fresh node, and checks the stage ends exactly as an uninterrupted run.

The stage runs as its own process through the CLI, joining the cluster with ``ray.address``, as a job does.
The streamed training's node loss is ``tests/test_faults.py::test_node_loss_mid_streamed_training`` (it shares
that module's uninterrupted run).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow.compute as pc
import yaml
from gen_fixtures import tiny_sd_dir, write_experiment
from reliab_fixtures import finish, loopback_cluster, stage_process  # noqa: F401 (loopback_cluster: a fixture)

from discl_ray.runtime.io import parquet_files, read_parquet_dir


def replace_node(cluster, node) -> object:
    """Remove ``node`` at once (its raylet, object store and workers die; no drain), then add a fresh one."""
    cluster.remove_node(node, allow_graceful=False)
    new = cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    return new


# -- generate ----------------------------------------------------------------------------------------------
def _gen_experiment(root: Path, model: Path):
    # 5 sources × 2 λ × 2 seeds, one source per block: the run writes 5 parts one by one. float64 on the CPU
    # is bit-identical whatever the batch layout, so the bytes can be compared with an uninterrupted run.
    return write_experiment(root, model, n_sources=5, lams=[0.0, 0.5], seeds=[0, 1],
                            overrides={"steps": 2, "dtype": "float64", "batch_size": 1, "rows_per_block": 4})


def uninterrupted_spectrum(cfg) -> dict[str, bytes]:
    """image_id → encoded image of an uninterrupted run: the stage's own steps (plan, prepare, the generator
    actor's class, encode) run in this process, without Ray — the rows the Ray path gives (tests/test_generation.py)."""
    from discl_ray.generation.actor import SpectrumGenerator
    from discl_ray.generation.output import encode_rows
    from discl_ray.generation.plan import plan_sources, prepare_sources, read_inputs, spectrum_lams

    gen = cfg.generation
    sources = plan_sources(*read_inputs(cfg))
    prepared = prepare_sources(sources, spectrum_lams(gen), list(gen.seeds), root=cfg.dataset.root,
                               width=gen.width, height=gen.height)
    rows = encode_rows(SpectrumGenerator(gen.model_dump(mode="json"))(prepared), gen.image_format)
    assert set(rows["error"].to_pylist()) == {""}
    return dict(zip(rows["image_id"].to_pylist(), rows["image"].to_pylist()))


def test_node_loss_mid_generate(tmp_path, loopback_cluster):  # noqa: F811 (the fixture imported above)
    cluster, node = loopback_cluster
    model = tiny_sd_dir(tmp_path / "models")
    cfg = _gen_experiment(tmp_path / "lost", model)
    data = cfg.model_dump(mode="json")
    data["ray"] = {"address": cluster.address}
    cfg_path = tmp_path / "job.yaml"
    cfg_path.write_text(yaml.safe_dump(data))
    out_dir = tmp_path / "lost" / "gt" / "generate" / "spectrum"
    log = tmp_path / "driver.log"
    proc = stage_process("generate", cfg_path, log=log)
    deadline = time.monotonic() + 300
    while not parquet_files(out_dir) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the stage ended before the node could be lost:\n" + log.read_text()[-3000:]
    written = len(read_parquet_dir(out_dir))
    replace_node(cluster, node)
    out = finish(proc, log)
    assert proc.returncode == 0, out[-4000:]
    assert 0 < written < 20, "the node must be lost mid-stage"
    summary = json.loads((tmp_path / "lost" / "gt" / "generate" / "summary.json").read_text())
    assert summary["generated"] == 20 and summary["failed"] == 0, summary   # one run, every key made once

    got = read_parquet_dir(out_dir)
    assert got.num_rows == pc.count_distinct(got["image_id"]).as_py() == 20  # every key exactly once
    want = uninterrupted_spectrum(_gen_experiment(tmp_path / "ref", model))
    assert sorted(got["image_id"].to_pylist()) == sorted(want)
    assert all(want[k] == v for k, v in zip(got["image_id"].to_pylist(), got["image"].to_pylist()))
    assert not list((tmp_path / "lost").rglob("*.tmp"))
