"""What the scores say: the threshold filter, kept/total per λ and per class, histograms per λ.

Pure functions of the scores table so a new threshold can be applied (and re-plotted) without running
CLIP again: ``discl score scoring.threshold=0.28`` on a finished run only redoes this part.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def keep_mask(scores: pa.Table, threshold: float) -> pa.ChunkedArray:
    """``clip_text_cos >= threshold`` (inclusive, exact float comparison; NaN and null are dropped)."""
    col = scores["clip_text_cos"]
    return pc.fill_null(pc.and_(pc.greater_equal(col, pa.scalar(float(threshold))), pc.invert(pc.is_nan(col))),
                        False)


def filter_scores(scores: pa.Table, threshold: float) -> pa.Table:
    """Rows of ``scores`` whose raw image–text cosine is at or above ``threshold``."""
    return scores.filter(keep_mask(scores, threshold))


def _stats(values: np.ndarray) -> dict:
    values = values[~np.isnan(values)]
    if not len(values):
        return {"mean": None, "std": None, "min": None, "max": None}
    return {"mean": float(values.mean()), "std": float(values.std()), "min": float(values.min()),
            "max": float(values.max())}


def lam_key(lam: float) -> str:
    """λ as the summary's key (three decimals, like spectrum image ids)."""
    return f"{lam:.3f}"


def summarize(scores: pa.Table, threshold: float, clip_model: str, class_names: dict[int, str],
              n_errors: int = 0) -> dict:
    """kept/total overall, per λ and per class (plus per-λ score statistics) as a JSON-ready dict."""
    keep = np.asarray(keep_mask(scores, threshold).to_numpy(zero_copy_only=False), dtype=bool)
    lams = np.asarray(scores["lam"].to_numpy(), dtype=np.float64)
    labels = np.asarray(scores["label"].to_numpy(), dtype=np.int64)
    text_cos = np.asarray(scores["clip_text_cos"].to_numpy(), dtype=np.float64)
    image_cos = np.asarray(scores["clip_image_cos"].to_numpy(), dtype=np.float64)

    def group(mask: np.ndarray) -> dict:
        total, kept = int(mask.sum()), int((keep & mask).sum())
        return {"total": total, "kept": kept, "kept_frac": kept / total if total else None}

    per_lam = {}
    for lam in sorted(set(lams.tolist())):
        m = lams == lam
        per_lam[lam_key(lam)] = group(m) | {"clip_text_cos": _stats(text_cos[m]),
                                            "clip_image_cos": _stats(image_cos[m])}
    per_class = {}
    for label in sorted(set(labels.tolist())):
        m = labels == label
        per_class[str(label)] = {"class_name": class_names.get(label, str(label))} | group(m)
    return {"clip_model": clip_model, "threshold": float(threshold), "score": "clip_text_cos (raw cosine)",
            **group(np.ones(len(keep), dtype=bool)), "errors": int(n_errors),
            "per_lam": per_lam, "per_class": per_class}


def plot_histograms(scores: pa.Table, out_dir: Path, threshold: Optional[float] = None,
                    bins: int = 30) -> list[Path]:
    """One PNG per score (paper Fig. 4/5): a histogram panel per λ; the filter threshold drawn on the text panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lams = np.asarray(scores["lam"].to_numpy(), dtype=np.float64)
    levels = sorted(set(lams.tolist()))
    paths = []
    for column, title in (("clip_text_cos", "synthetic image – class prompt"),
                          ("clip_image_cos", "synthetic image – real source image")):
        values = np.asarray(scores[column].to_numpy(), dtype=np.float64)
        finite = values[~np.isnan(values)]
        lo, hi = (float(finite.min()), float(finite.max())) if len(finite) else (-1.0, 1.0)
        edges = np.linspace(min(lo, threshold or lo) - 1e-6, max(hi, threshold or hi) + 1e-6, bins + 1)
        cols = min(4, max(1, len(levels)))
        rows = max(1, math.ceil(len(levels) / cols))
        fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
        for ax in axes.flat[len(levels):]:
            ax.axis("off")
        for ax, lam in zip(axes.flat, levels):
            v = values[(lams == lam) & ~np.isnan(values)]
            ax.hist(v, bins=edges, color="tab:blue", alpha=0.8)
            if threshold is not None and column == "clip_text_cos":
                ax.axvline(threshold, color="tab:red", linestyle="--", label=f"threshold {threshold:g}")
                ax.legend(fontsize=7)
            ax.set_title(f"λ = {lam:g} (n = {len(v)})", fontsize=9)
            ax.set_xlabel("cosine", fontsize=8)
        fig.suptitle(f"CLIP cosine: {title}", fontsize=10)
        fig.tight_layout()
        path = out_dir / f"hist_{column}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths
