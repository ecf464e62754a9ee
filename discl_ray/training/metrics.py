"""Evaluation from confusion matrices (accuracy, many/medium/few accuracy, macro-F1), true-class
probabilities for the adaptive selector, and the run's plots (λ per epoch, confusion matrix)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from discl_ray.training.models import unwrap


@torch.no_grad()
def predict(model, images, idx: np.ndarray, device: str = "cpu", batch: int = 256,
            autocast=contextlib.nullcontext) -> Iterable[tuple[torch.Tensor, np.ndarray]]:
    """(float32 logits on the CPU, pool rows) over ``idx`` in eval mode; DDP bypassed (eval is local).

    Rows come in the order the image source yields them (a stream may reorder and drops undecodable ones)."""
    net = unwrap(model)
    was_training = net.training
    net.eval()
    try:
        for x, rows in images.eval_batches(np.asarray(idx, dtype=np.int64), batch):
            with autocast():
                logits = net(images.pipe.normalise(x.to(device, non_blocking=True)))
            yield logits.float().cpu(), rows
    finally:
        net.train(was_training)


def confusion(model, pool, images, idx: np.ndarray, device: str = "cpu", batch: int = 256,
              autocast=contextlib.nullcontext) -> np.ndarray:
    """(C, C) counts, rows = true class, columns = predicted class."""
    cm = np.zeros((pool.num_classes, pool.num_classes), dtype=np.int64)
    for logits, rows in predict(model, images, idx, device, batch, autocast):
        np.add.at(cm, (pool.labels[rows], logits.argmax(1).numpy()), 1)
    return cm


def true_class_prob(model, pool, images, idx: np.ndarray, device: str = "cpu", batch: int = 256,
                    autocast=contextlib.nullcontext) -> np.ndarray:
    """Softmax probability of the true class per row of ``idx``, in ``idx`` order (Algorithm 2's progress
    signal); NaN for a row whose image could not be decoded (the robust mean skips it)."""
    pos = {int(r): k for k, r in enumerate(idx)}
    out = np.full(len(idx), np.nan, dtype=np.float64)
    for logits, rows in predict(model, images, idx, device, batch, autocast):
        p = torch.softmax(logits, 1)[torch.arange(len(rows)), torch.as_tensor(pool.labels[rows])]
        out[[pos[int(r)] for r in rows]] = p.double().numpy()
    return out


def accuracy(cm: np.ndarray) -> float:
    total = cm.sum()
    return float(np.trace(cm) / total) if total else float("nan")


def group_accuracy(cm: np.ndarray, groups: dict[int, str]) -> dict[str, float]:
    """Top-1 accuracy over the test rows of each class group (many / medium / few)."""
    out = {}
    for g in ("many", "medium", "few"):
        cls = [c for c, name in groups.items() if name == g]
        rows = cm[cls].sum() if cls else 0
        out[g] = float(np.trace(cm[np.ix_(cls, cls)]) / rows) if rows else float("nan")
    return out


def macro_f1(cm: np.ndarray) -> float:
    """Mean F1 over the classes present in the ground truth (rows with a count), WILDS' iWildCam protocol:
    sklearn ``f1_score(average='macro', labels=unique(y_true))``, the same as
    ``discl_ray.data.loaders.iwildcam.macro_f1`` on label lists. A class that is only ever predicted is
    not averaged (its false positives still lower the recall of the true classes); NaN without rows."""
    cm = np.asarray(cm)
    tp = np.diag(cm).astype(np.float64)
    fp = cm.sum(0) - tp
    fn = cm.sum(1) - tp
    present = cm.sum(1) > 0
    if not present.any():
        return float("nan")
    denom = 2 * tp + fp + fn
    f1 = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)
    return float(f1[present].mean())


def lt_metrics(cm: np.ndarray, groups: dict[int, str], prefix: str) -> dict[str, float]:
    g = group_accuracy(cm, groups)
    return {f"{prefix}_acc": accuracy(cm), f"{prefix}_many_acc": g["many"], f"{prefix}_medium_acc": g["medium"],
            f"{prefix}_few_acc": g["few"]}


def save_lam_plot(history: list[dict], path: Path, curriculum_epochs: Optional[int] = None) -> Path:
    """λ chosen per epoch (real-only epochs drawn at λ = 1 with a different marker)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    epochs = [h["epoch"] for h in history]
    lams = [h["lam"] for h in history]
    cur = [(e, v) for e, v in zip(epochs, lams) if v >= 0 and not math.isnan(v)]
    real = [e for e, v in zip(epochs, lams) if v < 0]
    mixed = [e for e, v in zip(epochs, lams) if math.isnan(v)]
    if cur:
        ax.step(*zip(*cur), where="post", marker="o", label="λ (curriculum)")
    if real:
        ax.scatter(real, [1.0] * len(real), marker="s", color="gray", label="real only")
    if mixed:
        ax.scatter(mixed, [0.5] * len(mixed), marker="x", color="purple", label="all λ mixed")
    if curriculum_epochs:
        ax.axvline(curriculum_epochs - 0.5, color="k", lw=0.5, ls="--")
    ax.set(xlabel="epoch", ylabel="λ (image guidance)", ylim=(-0.05, 1.05))
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def save_confusion_plot(cm: np.ndarray, class_names: list[str], path: Path, title: str = "") -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = cm.shape[0]
    fig, ax = plt.subplots(figsize=(max(4, 0.35 * n + 2), max(3.5, 0.35 * n + 1.5)))
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    if n <= 30:
        ax.set_xticks(range(n), class_names, rotation=90, fontsize=6)
        ax.set_yticks(range(n), class_names, fontsize=6)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
