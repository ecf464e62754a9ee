"""CLIP work on batches: per-row spectrum scores with reference embeddings cached in the scorer.

The filter prompt of a class and the real source image are shared by many synthetic rows (every λ and
seed of a source), so they are embedded once, not once per row: :class:`ReferenceCache` encodes every
class prompt when the scorer starts and each real source the first time a batch needs it, then keeps
the vectors. The source rows themselves travel once through the object store (``ray.put``).

Why a cache in the actor instead of a separate embedding pass: a second Ray Data pass costs a second
actor-pool start (process, torch and open_clip imports, model load: ~5–12 s on a small machine), more
than the embeddings themselves for a toy-sized spectrum. Generation writes a source's λ × seed rows
together and one spectrum file feeds one actor, so even with many actors a source is embedded about once.

The same functions run in-process (tests, benchmark) and inside Ray Data (:class:`SpectrumScorer`:
the model loads once in ``__init__``; ``__call__`` maps an Arrow batch to an Arrow batch).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import torch

from discl_ray.models.clip import encode_images, encode_texts, load_clip
from discl_ray.runtime.io import ImageLoadError, load_image

SCORE_COLUMNS = ["image_id", "source_image_id", "label", "lam", "seed", "clip_text_cos", "clip_image_cos",
                 "clip_score", "clip_model"]
SPECTRUM_INPUT_COLUMNS = ["image_id", "source_image_id", "label", "lam", "seed", "image"]
SOURCE_COLUMNS = ["image_id", "image", "path"]


def clip_score(cos: np.ndarray) -> np.ndarray:
    """CLIPScore as Hessel et al. define it, 2.5·max(cos, 0) (the filter itself uses the raw cosine)."""
    return 2.5 * np.maximum(np.asarray(cos, dtype=np.float64), 0.0)


def decode_images(preprocess, images: list[Optional[bytes]], paths: Optional[list[Optional[str]]] = None,
                  root: Optional[str] = None) -> tuple[Optional[torch.Tensor], list[Optional[str]]]:
    """Preprocessed batch of the readable images and one error reason (or None) per input row."""
    paths = paths or [None] * len(images)
    tensors, reasons = [], []
    for data, path in zip(images, paths):
        try:
            tensors.append(preprocess(load_image(data, path, root=root)))
            reasons.append(None)
        except ImageLoadError as err:
            reasons.append(str(err))
    return (torch.stack(tensors) if tensors else None), reasons


class ReferenceCache:
    """Class-prompt embeddings (all, at construction) and real-source embeddings (each once, on demand).

    ``sources`` holds the real rows (``image_id, image, path``) the spectrum refers to. A source that is
    absent gets no embedding (its rows get NaN image–image cosine); one that cannot be decoded is
    remembered in :attr:`errors` and never retried by this cache.
    """

    def __init__(self, model, preprocess, tokenizer, label_prompts: dict[int, str], sources: pa.Table,
                 root: Optional[str] = None):
        self.model, self.preprocess, self.root = model, preprocess, root
        prompts = sorted(set(label_prompts.values()))
        vecs = encode_texts(model, tokenizer, prompts).cpu()
        row = {p: i for i, p in enumerate(prompts)}
        self.labels = {int(lbl): i for i, lbl in enumerate(label_prompts)}
        self.text = vecs[[row[label_prompts[lbl]] for lbl in label_prompts]]
        self.rows = {sid: (img, path) for sid, img, path in zip(
            sources["image_id"].to_pylist(), sources["image"].to_pylist(), sources["path"].to_pylist())}
        self.image: dict[str, torch.Tensor] = {}
        self.errors: dict[str, str] = {}

    def ensure(self, source_ids: list[str]) -> None:
        """Embed the sources of ``source_ids`` not seen yet (one encoder call for all of them)."""
        new = sorted({s for s in source_ids if s in self.rows and s not in self.image and s not in self.errors})
        if not new:
            return
        batch, reasons = decode_images(self.preprocess, [self.rows[s][0] for s in new],
                                       [self.rows[s][1] for s in new], self.root)
        ok = [s for s, r in zip(new, reasons) if r is None]
        self.errors.update({s: r for s, r in zip(new, reasons) if r is not None})
        if ok:
            self.image.update(zip(ok, encode_images(self.model, batch).cpu()))

    def text_rows(self, labels: list[int]) -> torch.Tensor:
        try:
            return self.text[[self.labels[int(lbl)] for lbl in labels]]
        except KeyError as err:
            raise KeyError(f"label {err.args[0]} has no filter prompt in the prompts table") from None

    def image_rows(self, source_ids: list[str]) -> tuple[torch.Tensor, np.ndarray]:
        """Source embeddings (zeros where missing) and a mask of which sources have one."""
        out = torch.zeros(len(source_ids), self.text.shape[1])
        found = np.array([s in self.image for s in source_ids], dtype=bool)
        for i, s in enumerate(source_ids):
            if found[i]:
                out[i] = self.image[s]
        return out, found


def score_batch(model, preprocess, batch: pa.Table, refs: ReferenceCache, clip_model: str) -> pa.Table:
    """Score one batch of spectrum rows: ``SCORE_COLUMNS`` plus ``error`` (unreadable synthetic image) and
    ``source_error`` (unreadable real source: the row is still scored, without image–image cosine)."""
    n = batch.num_rows
    text_cos = np.full(n, np.nan)
    image_cos = np.full(n, np.nan)
    sources_all = batch["source_image_id"].to_pylist()
    images, reasons = decode_images(preprocess, batch["image"].to_pylist())
    ok = np.array([r is None for r in reasons], dtype=bool)
    if ok.any():
        emb = encode_images(model, images).cpu()
        labels = np.asarray(batch["label"].to_pylist())[ok].tolist()
        sources = [s for s, good in zip(sources_all, ok) if good]
        refs.ensure(sources)
        # float32 rounding can put a unit-vector dot product a hair outside [-1, 1]; a cosine cannot be.
        text_cos[ok] = (emb * refs.text_rows(labels)).sum(-1).clamp(-1.0, 1.0).numpy()
        src, found = refs.image_rows(sources)
        cos = (emb * src).sum(-1).clamp(-1.0, 1.0).numpy().astype(np.float64)
        cos[~found] = np.nan  # real source unreadable or absent: no image–image score, still filterable
        image_cos[ok] = cos
    return pa.table({
        "image_id": batch["image_id"], "source_image_id": batch["source_image_id"],
        "label": batch["label"].cast(pa.int64()), "lam": batch["lam"].cast(pa.float64()),
        "seed": batch["seed"].cast(pa.int64()),
        "clip_text_cos": pa.array(text_cos, pa.float64()), "clip_image_cos": pa.array(image_cos, pa.float64()),
        "clip_score": pa.array(clip_score(text_cos), pa.float64()),
        "clip_model": pa.array([clip_model] * n, pa.string()),
        "error": pa.array(reasons, pa.string()),
        "source_error": pa.array([refs.errors.get(s) for s in sources_all], pa.string()),
    })


def score_in_process(model, preprocess, tokenizer, spectrum: pa.Table, sources: pa.Table,
                     label_prompts: dict[int, str], clip_model: str, batch_size: int = 64,
                     root: Optional[str] = None) -> pa.Table:
    """Score a whole spectrum table in this process (tests, benchmark); ``sources``: ``SOURCE_COLUMNS``."""
    refs = ReferenceCache(model, preprocess, tokenizer, label_prompts, sources, root)
    return pa.concat_tables([score_batch(model, preprocess, spectrum.slice(i, batch_size), refs, clip_model)
                             for i in range(0, spectrum.num_rows, batch_size)])


class SpectrumScorer:
    """Ray Data callable class: spectrum rows → score rows, one CLIP model per actor.

    ``sources`` is ``[ObjectRef]`` of the real-source table (wrapped in a list so the actor fetches the
    object once itself) or the table itself in-process.
    """

    def __init__(self, scoring_cfg: Any, cache_dir: str, sources: Any, label_prompts: dict[int, str],
                 clip_model: str, root: Optional[str] = None):
        from discl_ray.runtime.cluster import actor_record, resolve_device

        torch.set_grad_enabled(False)
        self.device = resolve_device(scoring_cfg.device, "scoring")
        self.actor = actor_record(self.device)
        self.model, self.preprocess, tokenizer = load_clip(scoring_cfg, Path(cache_dir), self.device)
        if isinstance(sources, list):
            import ray

            sources = ray.get(sources[0])
        self.refs = ReferenceCache(self.model, self.preprocess, tokenizer, label_prompts, sources, root)
        self.clip_model = clip_model

    def __call__(self, batch: pa.Table) -> pa.Table:
        out = score_batch(self.model, self.preprocess, batch, self.refs, self.clip_model)
        return out.append_column("actor", pa.array([self.actor] * out.num_rows, pa.string()))
