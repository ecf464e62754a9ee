"""The real configs train in bf16 autocast on CUDA; the toy world (and any CPU worker) stays fp32."""

from __future__ import annotations

from pathlib import Path

import pytest

from discl_ray.config import load_config

REPO = Path(__file__).resolve().parents[1]
REAL = sorted(p for d in ("iwildcam", "imagenet_lt", "inat2018", "cifar100_lt")
              for p in (REPO / "configs" / d).glob("*.yaml") if p.name != "base.yaml")
TOY = sorted(p for p in (REPO / "configs" / "toy").glob("*.yaml") if p.name != "base.yaml")


@pytest.mark.parametrize("path", REAL, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_real_configs_train_in_bf16(path):
    assert load_config(path).training.precision == "bf16"


def test_toy_configs_and_the_default_stay_fp32():
    assert TOY and all(load_config(p).training.precision == "fp32" for p in TOY)
    assert load_config(None).training.precision == "fp32"


def test_bf16_autocasts_on_cuda_only():
    import torch

    from discl_ray.training.distributed import Precision

    cpu = Precision("bf16", "cpu")
    assert cpu.dtype is None and cpu.scaler is None                 # a CPU worker runs fp32 whatever the config
    if torch.cuda.is_available():
        cuda = Precision("bf16", "cuda:0")
        assert cuda.dtype == torch.bfloat16 and cuda.scaler is None
        with cuda.autocast():
            y = torch.nn.Linear(8, 8).cuda()(torch.randn(2, 8, device="cuda"))
        assert y.dtype == torch.bfloat16
