"""The paper's data rules for one epoch that go beyond Algorithms 1 and 2's set algebra.

* Fixed-λ and text-only stages leave out the real hard images (§5: "real data for hard samples (λ ~ 1) is
  included by default; however, this doesn't apply to the Fixed Guidance and Text-only Guidance ablation").
* The authors' tail-ratio variant (their released code): keep a fixed share of non-tail rows and cut tail rows
  to a share of the stage total, as an option beside the paper's rule (A.1.2, ``undersample_to_ratio``).
* The synthetic-volume knob: at most N images per (source, λ), lowest seeds first.

Pure functions over index arrays and metadata tables, shared by the trainer and ``discl train --plan``.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# Strategies whose curriculum stages train on S_λ ∪ D_nh without D_h (§5).
NO_REAL_HARD = ("fixed", "text_only")


def uses_real_hard(tc) -> bool:
    """Whether a long-tail curriculum stage adds the real hard images D_h (Algorithm 1 line 4)."""
    if not tc.use_real_hard:
        return False
    return tc.strategy not in NO_REAL_HARD or tc.ablations_use_real_hard


def authors_undersample(tail: np.ndarray, nontail: np.ndarray, share: float, keep_nontail: float,
                        rng: np.random.Generator, keep_first: Optional[np.ndarray] = None) -> np.ndarray:
    """Keep ``keep_nontail`` of the non-tail rows, then at most enough tail rows to be ``share`` of the total.

    Tail rows listed in ``keep_first`` (the real hard images) are kept before synthetic ones."""
    n_nontail = int(round(keep_nontail * len(nontail)))
    nontail = rng.choice(nontail, size=n_nontail, replace=False) if len(nontail) else nontail
    if 0 < share < 1 and len(tail):
        want = int(round(share / (1.0 - share) * len(nontail)))
        if want < len(tail):
            first = np.intersect1d(tail, keep_first) if keep_first is not None else np.array([], np.int64)
            rest = np.setdiff1d(tail, first)
            first = rng.permutation(first)[:want]
            tail = np.concatenate([first, rng.choice(rest, size=want - len(first), replace=False)])
    return np.concatenate([tail, nontail]).astype(np.int64)


def limit_per_source(table: pa.Table, n: Optional[int]) -> pa.Table:
    """Rows of at most ``n`` seeds per (source_image_id, λ), lowest seeds first (None = every row).

    Applied after the CLIP filter, so ``n`` counts images a run actually trains on."""
    if n is None or table.num_rows == 0:
        return table
    order = table.sort_by([("source_image_id", "ascending"), ("lam", "ascending"), ("seed", "ascending")])
    src = order["source_image_id"].to_pylist()
    lam = pc.round(order["lam"], 6).to_pylist()
    keep, prev, rank = [], None, 0
    for i, key in enumerate(zip(src, lam)):
        rank = rank + 1 if key == prev else 0
        prev = key
        if rank < n:
            keep.append(i)
    return order.take(pa.array(keep, pa.int64())).sort_by("image_id")
