"""Many / medium / few class groups from training counts (the long-tail reporting convention).

The paper (after Liu et al., 2019) reports accuracy on *many* (> 100 training images), *medium* (20–100)
and *few* (< 20) classes; the few classes are also the "tail" whose images are hard samples in the
frequency-based miner. The thresholds are parameters so small data (the toy world, tiny test fakes) can
scale them down; they mirror ``MiningConfig.few_max`` / ``many_min``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Optional

from discl_ray.errors import UserError

GROUPS = ("many", "medium", "few")


def class_groups(train_labels: Iterable[int], few_max: int = 20, many_min: int = 101,
                 classes: Optional[Iterable[int]] = None) -> dict[int, str]:
    """label → ``"many" | "medium" | "few"`` from the training labels.

    A class with ``count < few_max`` is few, ``count >= many_min`` many, anything between medium.
    ``classes`` lists labels to include even if absent from training (they count 0 → few); without it
    only labels seen in ``train_labels`` appear.
    """
    if few_max < 1 or many_min <= few_max:
        raise UserError(f"class_groups: need 1 <= few_max < many_min (got few_max={few_max}, many_min={many_min})")
    counts = Counter(int(y) for y in train_labels)
    labels = set(counts) | {int(c) for c in (classes or ())}
    out: dict[int, str] = {}
    for label in sorted(labels):
        n = counts.get(label, 0)
        out[label] = "few" if n < few_max else ("many" if n >= many_min else "medium")
    return out


def group_sizes(groups: dict[int, str]) -> dict[str, int]:
    """Number of classes per group (all three keys present)."""
    sizes = dict.fromkeys(GROUPS, 0)
    for g in groups.values():
        sizes[g] += 1
    return sizes
