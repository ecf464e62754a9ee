"""Hard-sample mining (paper Fig. 1, phase 1): which training images get a synthetic spectrum.

* frequency — long-tail: classes are grouped by training count (few < ``few_max`` ≤ medium < ``many_min`` ≤ many;
  paper: 20 / 100) and every training image of the ``hard_groups`` classes is hard.
* confidence — low-quality: a pretrained classifier's true-class probability; hard when below ``threshold`` or
  among the ``lowest_k`` of its class.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from discl_ray.data.loaders.groups import class_groups

if TYPE_CHECKING:
    from discl_ray.config import ExperimentConfig, MiningConfig

__all__ = ["HARD_SCHEMA", "class_groups", "mine_confidence", "mine_frequency", "select_low_confidence",
           "true_class_probs"]

HARD_SCHEMA = pa.schema([
    ("image_id", pa.string()), ("label", pa.int64()), ("class_name", pa.string()),
    ("group", pa.string()), ("reason", pa.string()), ("score", pa.float64()),
])


def mine_frequency(train: pa.Table, cfg: "MiningConfig") -> pa.Table:
    """Every training image whose class falls in ``cfg.hard_groups``."""
    labels = train["label"].to_pylist()
    groups = class_groups(labels, cfg.few_max, cfg.many_min)
    keep = [i for i, y in enumerate(labels) if groups[y] in cfg.hard_groups]
    sub = train.take(keep)
    return pa.table({
        "image_id": sub["image_id"], "label": sub["label"], "class_name": sub["class_name"],
        "group": [groups[y] for y in sub["label"].to_pylist()],
        "reason": ["frequency"] * sub.num_rows, "score": [float("nan")] * sub.num_rows,
    }, schema=HARD_SCHEMA)


def select_low_confidence(labels: Sequence[int], true_prob: Sequence[float], threshold: float | None = None,
                          lowest_k: int | None = None) -> np.ndarray:
    """Indices of hard images: prob < threshold, or the k lowest per class (ties broken by index)."""
    labels, true_prob = np.asarray(labels), np.asarray(true_prob, dtype=np.float64)
    if (threshold is None) == (lowest_k is None):
        raise ValueError("give exactly one of threshold or lowest_k")
    if threshold is not None:
        return np.flatnonzero(true_prob < threshold)
    picked = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        order = idx[np.lexsort((idx, true_prob[idx]))]
        picked.append(order[:lowest_k])
    return np.sort(np.concatenate(picked)) if picked else np.array([], dtype=np.int64)


def mine_confidence(train: pa.Table, cfg: "MiningConfig", true_prob: Sequence[float]) -> pa.Table:
    """Hard rows by low true-class probability (``true_prob`` aligned with ``train``)."""
    labels = train["label"].to_pylist()
    groups = class_groups(labels, cfg.few_max, cfg.many_min)
    from discl_ray.hard_set import select_hard

    # threshold / lowest_k / target_count / class_quantile; exclude_classes never hard.
    idx = select_hard(labels, true_prob, train["class_name"].to_pylist(), cfg)
    sub = train.take(idx)
    return pa.table({
        "image_id": sub["image_id"], "label": sub["label"], "class_name": sub["class_name"],
        "group": [groups[y] for y in sub["label"].to_pylist()],
        "reason": ["confidence"] * sub.num_rows,
        "score": [float(true_prob[i]) for i in idx],
    }, schema=HARD_SCHEMA)


def _image_batches(train: pa.Table, root: str | None, batch_size: int, transform: Callable):
    import torch

    from discl_ray.io import load_image

    images, paths = train["image"].to_pylist(), train["path"].to_pylist()
    for start in range(0, train.num_rows, batch_size):
        ims = [transform(load_image(images[i], paths[i], root)) for i in range(start, min(start + batch_size,
                                                                                            train.num_rows))]
        yield torch.stack(ims)


def true_class_probs(cfg: "ExperimentConfig", train: pa.Table, prompts: pa.Table | None = None) -> np.ndarray:
    """True-class probability of each training image under the configured classifier."""
    import torch
    from torchvision.transforms.functional import pil_to_tensor

    from discl_ray.runtime import RunPaths, resolve_device

    m = cfg.mining
    device = resolve_device(cfg.scoring.device)
    paths = RunPaths.from_config(cfg)
    labels = torch.tensor(train["label"].to_pylist())
    outs = []
    if m.classifier == "trained_run":      # the baseline trained on this dataset (§3.3), see hard_set.py
        from discl_ray.hard_set import trained_run_probs

        return trained_run_probs(cfg, train, device)
    with torch.no_grad():
        if m.classifier in ("torchscript", "toy"):
            from discl_ray.toyworld import classifier_file

            file = classifier_file(paths.cache) if m.classifier == "toy" else m.classifier_path
            if not Path(file).is_file():
                hint = " (run `discl world` to train the toy judge)" if m.classifier == "toy" else ""
                raise FileNotFoundError(f"mining classifier not found: {file}{hint}")
            model = torch.jit.load(str(file), map_location=device).eval()
            size = cfg.dataset.image_size

            def tf(im):
                return pil_to_tensor(im.resize((size, size))).float() / 255.0

            for x in _image_batches(train, cfg.dataset.root, m.batch_size, tf):
                outs.append(torch.softmax(model(x.to(device)), dim=-1).cpu())
        else:
            from discl_ray.scoring.clip import load_clip, zero_shot_probs

            if prompts is None:
                raise ValueError("open_clip_zero_shot mining needs the prompts table (run `discl prompts` first)")
            model, preprocess, tokenizer = load_clip(cfg.scoring, paths.cache, device)
            by_label = dict(zip(prompts["label"].to_pylist(), prompts["clip_prompt"].to_pylist()))
            n_cls = max(by_label) + 1
            texts = [by_label.get(c, f"a photo of class {c}") for c in range(n_cls)]
            for x in _image_batches(train, cfg.dataset.root, m.batch_size, preprocess):
                outs.append(zero_shot_probs(model, tokenizer, x.to(device), texts).cpu())
    probs = torch.cat(outs) if outs else torch.zeros((0, 1))
    return probs[torch.arange(len(labels)), labels].numpy().astype(np.float64)
