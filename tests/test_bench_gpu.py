"""`discl bench gpu`: the prepared GPU check runs where Ray and MLflow cannot be imported (the lent GPU image).

The default-suite test runs ``discl bench gpu --device cpu --tiny --json PATH`` in a subprocess whose
``ray`` and ``mlflow`` imports raise ImportError (a PYTHONPATH folder shadows both packages), and checks the
JSON the lent device would write: the headline keys, and values that follow from the run itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from discl_ray.bench import gpu

REPO = Path(__file__).resolve().parents[1]


def _blocked_env(tmp_path: Path) -> dict:
    """An environment whose Python finds a ``ray`` and an ``mlflow`` that refuse to import."""
    block = tmp_path / "blocked"
    for name in ("ray", "mlflow"):
        (block / name).mkdir(parents=True)
        (block / name / "__init__.py").write_text(f"raise ImportError('{name} is not on the GPU image')\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(block), str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def test_blocker_really_blocks(tmp_path):
    out = subprocess.run([sys.executable, "-c", "import ray"], env=_blocked_env(tmp_path), capture_output=True,
                         text=True, cwd=tmp_path)
    assert out.returncode != 0 and "not on the GPU image" in out.stderr


def test_tiny_cpu_run_without_ray_or_mlflow(tmp_path):
    path = tmp_path / "out" / "gpu.json"
    out = subprocess.run([sys.executable, "-m", "discl_ray.cli", "bench", "gpu", "--device", "cpu", "--tiny",
                          "--json", str(path)], env=_blocked_env(tmp_path), capture_output=True, text=True,
                         cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(path.read_text())
    assert res["errors"] == []
    # The headline keys the lent device fills in.
    for key in ("outputs_per_s", "tflops", "peak_fraction", "train_samples_per_s", "deterministic"):
        assert key in res
    assert res["outputs_per_s"] > 0 and res["tflops"] > 0
    assert res["peak_fraction"] is None and res["peak_bf16_tflops"] is None       # no chip peak on a CPU
    assert set(res["train_samples_per_s"]) == {"ViT-B-16", "ViT-L-14", "resnet10"}
    assert all(v > 0 for v in res["train_samples_per_s"].values())
    assert all(r["loss_finite"] and r["peak_gib"] is None for r in res["training"])
    assert res["scoring"][0]["model"] == "ViT-B-32" and res["scoring"][0]["images_per_s"] > 0
    assert res["deterministic"] is True
    assert res["determinism"]["same_keys_twice"]["max_abs_diff"] == 0
    # The spectrum went through the engine at the configured λ set: every batch eager, the tiny compiled batch
    # (dynamo with the eager backend: the code path, in seconds), and the
    # engine ran exactly Σ int(steps·(1 − λ)) denoising steps per source-seed over the λ sweep.
    s = res["spectrum_settings"]
    assert s["lams"] == [0.5, 0.7, 0.9] and s["steps"] == 10
    rows = res["spectrum"]
    assert {(r["batch"], r["compiled"]) for r in rows} == {(2, False), (4, False), (2, True)}
    steps = sum(int(10 * round(1 - lam, 6)) for lam in s["lams"])
    assert all(r["steps_run"] == r["batch"] * steps and r["outputs"] == 3 * r["batch"] for r in rows)
    assert res["steps_per_output"] == steps / 3
    assert res["flop_per_output_tflop"] > 0
    best = max(rows, key=lambda r: r["outputs_per_s"])
    assert res["outputs_per_s"] == best["outputs_per_s"] and res["tflops"] == best["tflops"]
    assert res["compile"]["float32 batch 2"]["first_call_s"] > 0
    # One table on stdout.
    assert "spectrum 32x32 outputs" in out.stdout and "determinism: same keys twice identical" in out.stdout


def test_full_size_needs_a_gpu(capsys):
    assert gpu.main(["--device", "cpu"]) == 2
    assert "--tiny" in capsys.readouterr().err


def test_spectrum_settings_are_the_paper_config_and_schema_defaults():
    """The GPU image has no pydantic: the plain-YAML reading must agree with the validated config."""
    from discl_ray.config import GenerationConfig, load_config

    cfg = load_config(str(REPO / "configs" / "iwildcam" / "base.yaml"), []).generation
    got = gpu.spectrum_settings(gpu.PAPER_CONFIG)
    for key in gpu.SPECTRUM_DEFAULTS:
        assert got[key] == getattr(cfg, key), key
    assert (got["width"], got["height"], got["lams"]) == (480, 272, [0.5, 0.7, 0.9])
    schema = GenerationConfig()
    fallback = gpu.spectrum_settings(None)
    for key in ("seeds", "steps", "guidance_scale", "shared_noise", "negative_prompt", "aesthetic_score",
                "negative_aesthetic_score"):
        assert fallback[key] == getattr(schema, key), key


@pytest.mark.parametrize("name,peak", [("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.0),
                                       ("NVIDIA H200", 989.4), ("NVIDIA A100-SXM4-80GB", 312.0),
                                       ("Some Future GPU", None)])
def test_chip_peak(name, peak):
    assert gpu.chip_peak(name) == peak
