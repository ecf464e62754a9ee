"""`discl bench train --device cuda`: the trainer on GPUs, 2 workers × 1 GPU, fp32 against bf16.

For a real ResNet-10 (the long-tail backbone, the paper's ResNet input pipeline at 224²) and a CLIP-shaped
ViT (open_clip's ViT-B-16 architecture with random weights, FLYP loss over the global batch, CLIP's own
preprocess), each at ``training.precision`` fp32 and bf16: one epoch of a synthetic 224² JPEG experiment
streamed through Ray Data, then

- ``samples_per_s`` of the epoch (input pipeline included), ``train_loss`` (must be finite), the λ of the
  epoch and ``lam_ranks_agree`` (every rank trained on the same λ, checked on device);
- ``model_samples_per_s_per_gpu``: the same model's forward + backward + step on device-resident random
  batches in the driver (one GPU, no input pipeline, no DDP) — when ``workers`` × that is far above
  ``samples_per_s`` the run is input-bound and needs more CPUs per GPU for the decode tasks.

Nothing is downloaded: the ViT is built from open_clip's architecture table with ``pretrained=None``.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

MODELS = {
    "resnet10": ["training.backbone=resnet10", "training.image_size=224", "training.lr=0.001"],
    "clip_vit_b16": ["training.backbone=clip", "training.loss=flyp", "scoring.model=ViT-B-16",
                     "scoring.pretrained=null", "training.optimizer=adamw", "training.lr=0.00001"],
}


def model_rate(cfg, device: str, steps: int = 20) -> float:
    """Samples/s of forward + backward + step on random device batches (one GPU, no input pipeline)."""
    import torch

    from discl_ray.training.distributed import Precision
    from discl_ray.training.losses import classification_loss, flyp_loss
    from discl_ray.training.models import build_model, class_prompts

    tc = cfg.training
    net = build_model(tc.backbone, 10, cfg=cfg, prompts=class_prompts([f"class{i}" for i in range(10)],
                                                                     cfg.prompts.clip_template), device=device)
    net = net.to(device).train()
    size = getattr(net, "image_size", None) or (tc.image_size, tc.image_size)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-5)
    prec = Precision(tc.precision, device)
    batch = tc.batch_size // max(1, tc.num_workers)
    x = torch.randn(batch, 3, *size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    t0 = 0.0
    for step in range(steps + 3):
        if step == 3:                        # warm-up steps (cuDNN autotune, allocator) not timed
            torch.cuda.synchronize()
            t0 = time.perf_counter()
        with prec.autocast():
            if tc.loss == "flyp":
                img, txt, scale = net(x, flyp_labels=y)
                loss = flyp_loss(img.float(), txt.float(), scale.float())
            else:
                loss = classification_loss("ce", net(x).float(), y)
        opt.zero_grad(set_to_none=True)
        prec.step(loss, opt)
    torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - t0)


def run(root: Path, rows: int = 4096, workers: int = 2, precisions=("fp32", "bf16"), models=tuple(MODELS),
        extra: list[str] | None = None) -> list[dict]:
    """One epoch per (model, precision) on ``workers`` GPU workers; returns one result row each."""
    import ray

    from discl_ray.bench.train_memory import ray_run, write_experiment
    from discl_ray.config import load_config

    # Half the cluster's CPUs to the Train workers (at most 2 each), the rest to the decode tasks.
    per_worker = max(0.25, min(2.0, ray.cluster_resources().get("CPU", 2.0) / (2 * workers)))
    out = []
    for model in models:
        for precision in precisions:
            cfg = load_config(None, [
                f"run_root={root}", f"experiment=gpu{rows}", "dataset.name=digits_lt", "dataset.image_size=224",
                "training.task=low_quality", "training.strategy=fixed", "training.fixed_lam=0.5",
                "generation.lams=[0.5,0.9]", "training.lams=[0.5,0.9,1.0]", "scoring.threshold=0.0",
                "training.epochs=1",
                "training.curriculum_epochs=1", "training.batch_size=256", "training.eval_batch_size=256",
                f"training.num_workers={workers}", "training.gpus_per_worker=1",
                f"training.cpus_per_worker={per_worker}", "training.data_cpus=0.5",
                "training.image_cache_mb=0", f"training.precision={precision}", "tracking.enabled=false",
                *MODELS[model], *(extra or [])])
            write_experiment(cfg, rows)
            res = ray_run(cfg, f"gpu-{model}-{precision}-{time.strftime('%H%M%S')}", str(root / "storage"))
            h = res["history"][0]
            row = {"model": model, "precision": precision, "workers": workers, "rows": h["n_train"],
                   "samples_per_s": h["samples_per_s"], "epoch_train_s": h["epoch_train_s"],
                   "train_loss": h["train_loss"], "loss_finite": math.isfinite(h["train_loss"]),
                   "lam": h["lam"], "lam_ranks_agree": h.get("lam_ranks_agree") == 1.0,
                   "worker_peak_rss_mb": h.get("worker_peak_rss_mb"),
                   "model_samples_per_s_per_gpu": model_rate(cfg, "cuda:0")}
            print(row, flush=True)
            out.append(row)
    return out
