"""The spectrum grid PNG: one row per source — the real image, then each λ × a few seeds.

Read back from the written spectrum (not from memory), so the grid also shows what a resumed run holds.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Optional

import pyarrow as pa
import pyarrow.dataset as pads
from PIL import Image, ImageDraw

from discl_ray.storage import Storage, as_storage

GAP = 2
LABEL_H = 12


def spectrum_grid(spectrum_dir: "str | Path | Storage", sources: dict[str, Image.Image], lams: list[float], seeds: list[int],
                  n_sources: int, n_seeds: int) -> Optional[Image.Image]:
    """Grid image for up to ``n_sources`` of ``sources`` (id → real image); None when nothing to show."""
    where = as_storage(spectrum_dir)
    files = where.parquet_files()
    if not files or n_sources == 0 or not sources:
        return None
    chosen = sorted(sources)[:n_sources]
    table = pads.dataset([f.path for f in files], format="parquet", filesystem=where.fs).to_table(
        columns=["source_image_id", "lam", "seed", "image"],
        filter=pads.field("source_image_id").isin(pa.array(chosen)))
    cells = {(r["source_image_id"], round(r["lam"], 3), r["seed"]): r["image"] for r in table.to_pylist()}
    shown_seeds = list(seeds)[:n_seeds]
    cols = [None] + [(round(lam, 3), s) for lam in lams for s in shown_seeds]
    w, h = sources[chosen[0]].size
    grid = Image.new("RGB", (len(cols) * (w + GAP), LABEL_H + len(chosen) * (h + GAP)), "white")
    draw = ImageDraw.Draw(grid)
    for c, col in enumerate(cols):
        if col is None:
            draw.text((c * (w + GAP), 0), "real", fill="black")
        elif col[1] == shown_seeds[0]:
            draw.text((c * (w + GAP), 0), f"l={col[0]:g}", fill="black")
    for r, sid in enumerate(chosen):
        y = LABEL_H + r * (h + GAP)
        for c, col in enumerate(cols):
            if col is None:
                img = sources[sid]
            else:
                data = cells.get((sid, col[0], col[1]))
                if data is None:
                    continue
                img = Image.open(io.BytesIO(data)).convert("RGB")
            grid.paste(img.resize((w, h)), (c * (w + GAP), y))
    return grid
