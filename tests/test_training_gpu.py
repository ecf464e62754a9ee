"""On a machine with 2 CUDA GPUs (``pytest -m gpu``): the trainer with 2 workers × 1 GPU on a real ResNet-10
and a ViT-B/16-shaped CLIP (random weights) streams one epoch at fp32 and at bf16 — finite loss, ranks
agree on λ, a samples/s figure for each. The same run as ``discl bench train --device cuda``."""

from __future__ import annotations

import math

import pytest


@pytest.mark.gpu
def test_two_gpu_workers_resnet_and_vit_fp32_bf16(ray_local, tmp_path):
    import torch

    from discl_ray.bench import train_gpu

    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA devices (2 Train workers × 1 GPU)")
    rows = train_gpu.run(tmp_path, rows=1024, workers=2)
    assert {(r["model"], r["precision"]) for r in rows} == {
        (m, p) for m in train_gpu.MODELS for p in ("fp32", "bf16")}
    for r in rows:
        assert r["loss_finite"] and math.isfinite(r["train_loss"]), r
        assert r["lam_ranks_agree"] and r["lam"] == 0.5, r
        assert r["samples_per_s"] > 0 and r["model_samples_per_s_per_gpu"] > 0, r
