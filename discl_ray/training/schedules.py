"""λ schedules as pure functions of training progress, and the adaptive (DoCL) gain rule.

Every function here is deterministic and side-effect free so the tests can pin exact sequences and the
selector actor (``selector.py``) stays a thin stateful wrapper that records what was chosen.

Conventions shared with the trainer and the report:
- ``REAL_ONLY = -1.0`` is the λ of an epoch that trains on real data only (epochs after ``E_CL`` and the
  ``none`` baseline);
- ``ALL_LEVELS = nan`` is the λ of an ``all_level`` epoch (every λ mixed, no curriculum);
- λ = 1.0 inside Λ means "the real hard images" (never a synthetic row).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping, Sequence
from typing import Optional

import numpy as np

from discl_ray.errors import UserError
from discl_ray.runtime.io import stable_seed

REAL_ONLY = -1.0
ALL_LEVELS = float("nan")

# Strategies whose λ does not depend on training progress measurements.
NON_ADAPTIVE = ("none", "diverse_to_specific", "specific_to_diverse", "easy_to_hard", "random", "fixed",
                "text_only", "all_level")


def learning_rate(base_lr: float, schedule: str, epoch: int, epochs: int, global_step: int = 0,
                  warmup_steps: int = 0) -> float:
    """LR of an optimizer step: cosine over epochs (paper Table 8) or constant, times a linear warm-up
    ``(global_step + 1) / warmup_steps`` over the first ``warmup_steps`` steps (Table 8, iWildCam: 500).

    A function of (epoch, global step) only, so a resumed run needs just the step count to continue it."""
    lr = base_lr * (0.5 * (1 + math.cos(math.pi * epoch / epochs)) if schedule == "cosine" else 1.0)
    if warmup_steps and global_step < warmup_steps:
        lr *= (global_step + 1) / warmup_steps
    return lr


def lam_key(lam: float) -> str:
    """The text form of λ used in metric names (``gain_lam_0.5``, ``gain_lam_1.0``)."""
    return str(float(lam))


def linear_level(epoch: int, curriculum_epochs: int, n_levels: int) -> int:
    """Index of the level for ``epoch`` when ``curriculum_epochs`` are split into equal blocks.

    The paper's linear guidance schedule (A.3.1) trains "for equal durations" on each level; with
    E_CL not divisible by |Λ| the earlier levels get the extra epoch (floor(e·K / E_CL))."""
    if not 0 <= epoch < curriculum_epochs:
        raise ValueError(f"epoch {epoch} is outside the curriculum epochs [0, {curriculum_epochs})")
    return min(n_levels - 1, (epoch * n_levels) // curriculum_epochs)


def scheduled_lam(strategy: str, epoch: int, *, epochs: int, curriculum_epochs: int, lams: Sequence[float],
                  fixed_lam: Optional[float] = None, seed: int = 0) -> float:
    """λ of ``epoch`` (0-based) for a non-adaptive ``strategy`` (Algorithm 1's schedule G).

    Epochs ``>= curriculum_epochs`` are real-only (Algorithm 1 lines 7-9)."""
    if strategy not in NON_ADAPTIVE:
        raise UserError(f"strategy {strategy!r} has no fixed schedule; valid: {', '.join(NON_ADAPTIVE)}")
    if not 0 <= epoch < epochs:
        raise ValueError(f"epoch {epoch} is outside [0, {epochs})")
    levels = sorted(float(v) for v in lams)
    if strategy == "none" or epoch >= curriculum_epochs:
        return REAL_ONLY
    if strategy in ("diverse_to_specific", "easy_to_hard"):
        # Low λ (text-dominated, diverse) first, real-like last; iWildCam calls this easy→hard.
        return levels[linear_level(epoch, curriculum_epochs, len(levels))]
    if strategy == "specific_to_diverse":
        return levels[::-1][linear_level(epoch, curriculum_epochs, len(levels))]
    if strategy == "random":
        # Seeded per (seed, epoch) so a resumed run re-draws exactly the same λ.
        return random.Random(stable_seed("random-lam", seed, epoch)).choice(levels)
    if strategy == "fixed":
        if fixed_lam is None:
            raise UserError("strategy=fixed needs fixed_lam")
        return float(fixed_lam)
    if strategy == "text_only":
        return 0.0
    return ALL_LEVELS  # all_level


def schedule(strategy: str, *, epochs: int, curriculum_epochs: int, lams: Sequence[float],
             fixed_lam: Optional[float] = None, seed: int = 0) -> list[float]:
    """The whole λ sequence of a non-adaptive strategy (one entry per epoch)."""
    return [scheduled_lam(strategy, e, epochs=epochs, curriculum_epochs=curriculum_epochs, lams=lams,
                          fixed_lam=fixed_lam, seed=seed) for e in range(epochs)]


def robust_mean(values: Iterable[float]) -> float:
    """Mean after dropping Tukey outliers (outside [Q1 − 1.5·IQR, Q3 + 1.5·IQR]); NaN when empty.

    DoCL's progress estimate is a mean over the guidance-validation set; a few images whose probability
    jumps (e.g. a mislabeled or degenerate synthetic image) should not decide the epoch's λ."""
    arr = np.asarray(list(values), dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    if arr.size == 0:
        return float("nan")
    q1, q3 = np.percentile(arr, [25, 75])
    iqr = q3 - q1
    keep = arr[(arr >= q1 - 1.5 * iqr) & (arr <= q3 + 1.5 * iqr)]
    return float(keep.mean()) if keep.size else float(arr.mean())


def adaptive_gains(p_before: Mapping[float, Sequence[float]],
                   p_after: Mapping[float, Sequence[float]]) -> dict[float, float]:
    """Per-λ robust mean of the true-class probability gain p_aft − p_bef (Algorithm 2 lines 2-5)."""
    gains = {}
    for lam, before in p_before.items():
        after = p_after[lam]
        if len(after) != len(before):
            raise ValueError(f"λ={lam}: {len(before)} probabilities before training on D but {len(after)} after")
        gains[float(lam)] = robust_mean(np.asarray(after, dtype=np.float64) - np.asarray(before, dtype=np.float64))
    return gains


def pick_adaptive(gains: Mapping[float, float]) -> float:
    """argmax_λ gain (Algorithm 2 line 6); ties go to the lowest λ, NaN gains (empty V_λ) never win."""
    finite = {float(k): v for k, v in gains.items() if v is not None and math.isfinite(v)}
    if not finite:
        raise UserError(f"no λ has a finite gain (empty guidance-validation sets?): {dict(gains)}")
    return max(sorted(finite), key=lambda k: finite[k])
