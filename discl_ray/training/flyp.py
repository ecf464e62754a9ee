"""FLYP's own iWildCam recipe (Goyal et al., 2023; the authors' repository locuslab/FLYP), as the trainer runs it.

Three things the published FLYP baseline does that a plain contrastive fine-tune does not:

- **Captions.** ``datacreation_scripts/iwildcam.py`` writes every training image twice, once per template of
  ``src/templates/iwildcam_template.py`` ("a photo of {c}." and "{c} in the wild."), as the concatenation of the
  first-template rows and the second-template rows. Pair ``q`` of the N·K pairs is therefore image ``q mod N``
  with template ``q div N`` (``training.flyp_templates``; ``{name}`` is the class's display name).
- **Draw.** ``src/models/flyp_loss.py`` trains ``num_batches = len(dataset.train_loader)`` = ⌈N / B⌉ steps per
  epoch (the image loader's length, not the caption file's), each taking the next batch of ONE DataLoader over
  the N·K pairs (``src/datasets/laion.py`` ``get_csv_dataset``: ``shuffle=True``, ``drop_last=False``) that is
  kept across epochs and re-created, i.e. reshuffled, when exhausted. So an epoch sees N pairs, an image 0, 1 or
  2 times, and every (image, caption) pair exactly once per pass of K epochs' worth of batches.
  :func:`epoch_pair_batches` gives epoch ``e``'s global batches as a pure function of (seed, e): the batch
  stream is pass 0's batches, then pass 1's, … (pass ``p`` a seeded permutation of the pairs), and epoch ``e``
  takes batches ``[e·S, (e+1)·S)`` of it, so a resumed run draws what an uninterrupted one draws.
- **Learning rate.** ``src/models/utils.py`` ``cosine_lr`` is called before every optimizer step with the global
  step: a linear warm-up ``lr·(step + 1) / warmup`` for the first ``warmup_length`` (500) steps, then
  ``0.5·(1 + cos(π·(step − warmup) / (total − warmup)))·lr`` with ``total = epochs · num_batches`` and
  ``min_lr = 0`` (:func:`flyp_lr`, ``training.lr_schedule: cosine_steps``). A function of the global step only,
  which checkpoints keep.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional

import numpy as np

from discl_ray.runtime.io import stable_seed


def caption_texts(templates: Sequence[str], display_names: Sequence[str]) -> list[str]:
    """The K·C captions, template-major: caption ``k·C + c`` is template ``k`` with class ``c``'s name."""
    return [t.format(name=n) for t in templates for n in display_names]


def caption_ids(pairs: np.ndarray, n_images: int, labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Caption index of each pair (template ``q div N`` of the pair's image class), for :func:`caption_texts`."""
    pairs = np.asarray(pairs, dtype=np.int64)
    return (pairs // n_images) * n_classes + np.asarray(labels, dtype=np.int64)


def epoch_steps(n_images: int, batch: int, cap: Optional[int] = None) -> int:
    """FLYP's steps per epoch: ⌈N / B⌉ (the image loader's length), at most ``training.steps_per_epoch``."""
    s = math.ceil(n_images / batch)
    return min(s, cap) if cap else s


def pass_permutation(seed: int, n_pairs: int, p: int) -> np.ndarray:
    """The order of the pairs in pass ``p`` (one DataLoader iterator, ``shuffle=True``)."""
    return np.random.default_rng(stable_seed(seed, "flyp-pass", n_pairs, p)).permutation(n_pairs)


def epoch_pair_batches(n_images: int, n_templates: int, batch: int, epoch: int, seed: int,
                       cap: Optional[int] = None) -> list[np.ndarray]:
    """The global batches (pair indices in ``[0, N·K)``) of ``epoch``: FLYP's persistent pair loader (module
    docstring). A pass has ⌈N·K / B⌉ batches, the last one short (``drop_last=False``)."""
    n_pairs = n_images * n_templates
    steps = epoch_steps(n_images, batch, cap)
    per_pass = math.ceil(n_pairs / batch)
    perms: dict[int, np.ndarray] = {}
    out = []
    for g in range(epoch * steps, (epoch + 1) * steps):
        p, j = divmod(g, per_pass)
        if p not in perms:
            perms[p] = pass_permutation(seed, n_pairs, p)
        out.append(perms[p][j * batch:(j + 1) * batch])
    return out


def flyp_lr(base_lr: float, warmup: int, total: int, step: int) -> float:
    """FLYP's ``cosine_lr`` at optimizer step ``step`` (0-based), ``min_lr = 0``."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    e, es = step - warmup, total - warmup
    return 0.5 * (1 + math.cos(math.pi * min(e, es) / es)) * base_lr if es > 0 else base_lr
