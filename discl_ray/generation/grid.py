"""The spectrum grid PNG: one row per source — the real image, then each λ × a few seeds.

Read back from the written spectrum (not from memory), so the grid also shows what a resumed run holds.
Small images (the toy world's 32 px digits) are enlarged with nearest-neighbour resampling to at least
``MIN_CELL`` px, so each pixel stays a crisp square and the grid is readable at a glance; each λ column
group is labelled ``λ=0.3`` above its first seed.
"""

from __future__ import annotations

import io
from functools import lru_cache
from pathlib import Path
from typing import Optional

import pyarrow as pa
import pyarrow.dataset as pads
from PIL import Image, ImageDraw, ImageFont

from discl_ray.runtime.storage import Storage, as_storage

GAP = 2
GROUP_GAP = 6            # extra space between λ groups (and after the real column)
MIN_CELL = 96            # smallest displayed cell, px
LABEL_H = 20
FONT_PX = 14


def cell_size(w: int, h: int) -> tuple[int, int]:
    """Displayed size of a ``w × h`` image: the smallest integer upscale reaching ``MIN_CELL`` on the short side."""
    scale = max(1, -(-MIN_CELL // max(1, min(w, h))))
    return w * scale, h * scale


@lru_cache(maxsize=1)
def _font() -> ImageFont.ImageFont:
    """DejaVu Sans (bundled with matplotlib, has 'λ'); PIL's default font otherwise."""
    try:
        from matplotlib import font_manager

        return ImageFont.truetype(font_manager.findfont("DejaVu Sans"), FONT_PX)
    except (ImportError, OSError, ValueError):
        return ImageFont.load_default()


def _column_x(n_lams: int, n_seeds: int, w: int) -> list[int]:
    """Left edge of every column: real, then λ groups of ``n_seeds`` separated by ``GROUP_GAP``."""
    xs, x = [0], w + GAP + GROUP_GAP
    for _ in range(n_lams):
        for _ in range(n_seeds):
            xs.append(x)
            x += w + GAP
        x += GROUP_GAP
    return xs


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
    w, h = cell_size(*sources[chosen[0]].size)
    xs = _column_x(len(lams), len(shown_seeds), w)
    width = (xs[-1] + w) if len(xs) > 1 else w
    grid = Image.new("RGB", (width, LABEL_H + len(chosen) * (h + GAP)), "white")
    draw = ImageDraw.Draw(grid)
    font = _font()
    for x, col in zip(xs, cols):
        if col is None:
            draw.text((x + 2, 2), "real", fill="black", font=font)
        elif col[1] == shown_seeds[0]:
            draw.text((x + 2, 2), f"λ={col[0]:g}", fill="black", font=font)
    for r, sid in enumerate(chosen):
        y = LABEL_H + r * (h + GAP)
        for x, col in zip(xs, cols):
            if col is None:
                img = sources[sid]
            else:
                data = cells.get((sid, col[0], col[1]))
                if data is None:
                    continue
                img = Image.open(io.BytesIO(data)).convert("RGB")
            # nearest when enlarging (crisp pixels), smooth when a generated image is larger than its source
            grid.paste(img.resize((w, h), Image.NEAREST if img.width <= w else Image.BILINEAR), (x, y))
    return grid
