"""`kill -9` of the `discl generate` driver mid-run, then a rerun: the spectrum is exactly what an
uninterrupted run writes — every key once, the same bytes (float64 on the CPU is batch-layout independent).

The killed driver joins the test session's Ray cluster, as a job on a real cluster would; Ray ends the
job's actors and tasks when its driver dies. Workers write the parts, so what was written before the kill
survives as whole files; the dead run's lease and temp files must not block or pollute the rerun.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.compute as pc
import yaml
from gen_fixtures import tiny_sd_dir, write_experiment

from discl_ray.generation.job import run_generate
from discl_ray.runtime.io import parquet_files, read_parquet_dir

REPO = Path(__file__).resolve().parent.parent


def _experiment(root: Path, model: Path):
    # 5 sources × 2 λ × 2 seeds; one source (4 outputs) per block, so the run writes 5 parts one by one.
    return write_experiment(root, model, n_sources=5, lams=[0.0, 0.5], seeds=[0, 1],
                            overrides={"steps": 2, "dtype": "float64", "batch_size": 1, "rows_per_block": 4})


def test_kill_driver_mid_generate_then_rerun(tmp_path, ray_local):
    model = tiny_sd_dir(tmp_path / "models")
    killed = _experiment(tmp_path / "killed", model)
    data = killed.model_dump(mode="json")
    data["ray"] = {"address": ray_local.get_runtime_context().gcs_address}
    cfg_path = tmp_path / "job.yaml"
    cfg_path.write_text(yaml.safe_dump(data))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env.pop("MLFLOW_TRACKING_URI", None)
    out_dir = tmp_path / "killed" / "gt" / "generate" / "spectrum"
    proc = subprocess.Popen([sys.executable, "-m", "discl_ray.cli", "generate", "--config", str(cfg_path)],
                            env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not parquet_files(out_dir) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert proc.poll() is None, f"the driver ended before it could be killed: {proc.stderr.read()[-3000:]}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    written = read_parquet_dir(out_dir)["image_id"].to_pylist()
    assert 0 < len(written) < 20, "the kill must land mid-run"
    assert (out_dir.parent / "_lease.json").is_file()                # the dead run's lease is left behind

    summary = run_generate(killed)                                    # rerun (same cluster, new driver)
    assert summary["skipped"] >= len(written) and summary["generated"] + summary["skipped"] == 20

    reference = _experiment(tmp_path / "ref", model)
    run_generate(reference)                                           # an uninterrupted run
    got = read_parquet_dir(out_dir)
    want = read_parquet_dir(tmp_path / "ref" / "gt" / "generate" / "spectrum")
    assert got.num_rows == pc.count_distinct(got["image_id"]).as_py() == 20
    assert set(got["image_id"].to_pylist()) == set(want["image_id"].to_pylist())
    same = dict(zip(want["image_id"].to_pylist(), want["image"].to_pylist()))
    assert all(same[k] == v for k, v in zip(got["image_id"].to_pylist(), got["image"].to_pylist()))
    assert not list(out_dir.parent.rglob("*.tmp"))
