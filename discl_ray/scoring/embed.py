"""CLIP work on batches: reference embeddings (prompts, real sources) and per-row spectrum scores.

Why two steps: the filter prompt of a class and the real source image are shared by many synthetic rows
(every λ and seed of a source), so they are embedded exactly once, in a first pass over the *unique*
references, and handed to the scorer as a small matrix (``ray.put``). The scorer then encodes only the
synthetic images. The same functions run in-process (tests, benchmark) and inside Ray Data actors
(:class:`ReferenceEmbedder`, :class:`SpectrumScorer`: models load once in ``__init__``, ``__call__`` maps
an Arrow batch to an Arrow batch).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import torch

from discl_ray.io import ImageLoadError, load_image
from discl_ray.scoring.clip import encode_images, encode_texts, load_clip

REFERENCE_SCHEMA = pa.schema([("kind", pa.string()), ("key", pa.string()), ("text", pa.string()),
                              ("image", pa.binary()), ("path", pa.string())])
SCORE_COLUMNS = ["image_id", "source_image_id", "label", "lam", "seed", "clip_text_cos", "clip_image_cos",
                 "clip_score", "clip_model"]
SPECTRUM_INPUT_COLUMNS = ["image_id", "source_image_id", "label", "lam", "seed", "image"]


def clip_score(cos: np.ndarray) -> np.ndarray:
    """CLIPScore as Hessel et al. define it, 2.5·max(cos, 0) (the filter itself uses the raw cosine)."""
    return 2.5 * np.maximum(np.asarray(cos, dtype=np.float64), 0.0)


def reference_items(prompts: list[str], sources: pa.Table) -> pa.Table:
    """``REFERENCE_SCHEMA`` rows: one per filter prompt, one per real source (``image_id, image, path``)."""
    n = sources.num_rows
    texts = pa.table({"kind": ["text"] * len(prompts), "key": prompts, "text": prompts,
                      "image": pa.nulls(len(prompts), pa.binary()), "path": pa.nulls(len(prompts), pa.string())},
                     schema=REFERENCE_SCHEMA)
    images = pa.table({"kind": ["image"] * n, "key": sources["image_id"], "text": pa.nulls(n, pa.string()),
                       "image": sources["image"].cast(pa.binary()), "path": sources["path"].cast(pa.string())},
                      schema=REFERENCE_SCHEMA)
    return pa.concat_tables([texts, images])


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


def embed_references(model, preprocess, tokenizer, items: pa.Table, root: Optional[str] = None) -> pa.Table:
    """Embed a batch of reference items (``REFERENCE_SCHEMA``): ``kind, key, embedding, error``.

    ``kind`` is ``text`` (``text`` = a filter prompt) or ``image`` (a real source, ``image`` bytes or
    ``path``). Unreadable images get ``error`` and no embedding.
    """
    kinds, keys = items["kind"].to_pylist(), items["key"].to_pylist()
    n = len(keys)
    emb: list[Optional[np.ndarray]] = [None] * n
    errors: list[Optional[str]] = [None] * n
    text_idx = [i for i, k in enumerate(kinds) if k == "text"]
    if text_idx:
        texts = items["text"].to_pylist()
        vecs = encode_texts(model, tokenizer, [texts[i] for i in text_idx]).cpu().numpy()
        for i, v in zip(text_idx, vecs):
            emb[i] = v
    img_idx = [i for i, k in enumerate(kinds) if k == "image"]
    if img_idx:
        data, paths = items["image"].to_pylist(), items["path"].to_pylist()
        batch, reasons = decode_images(preprocess, [data[i] for i in img_idx], [paths[i] for i in img_idx], root)
        ok = [i for i, r in zip(img_idx, reasons) if r is None]
        for i, r in zip(img_idx, reasons):
            errors[i] = r
        if ok:
            for i, v in zip(ok, encode_images(model, batch).cpu().numpy()):
                emb[i] = v
    dim = next((len(v) for v in emb if v is not None), 0)
    return pa.table({
        "kind": pa.array(kinds, pa.string()),
        "key": pa.array(keys, pa.string()),
        "embedding": pa.array([None if v is None else v.astype(np.float32) for v in emb],
                              pa.list_(pa.float32(), dim) if dim else pa.list_(pa.float32())),
        "error": pa.array(errors, pa.string()),
    })


class ReferenceIndex:
    """Lookup of precomputed embeddings: class label → prompt row, source image id → image row."""

    def __init__(self, references: pa.Table, label_prompts: dict[int, str]):
        ok = references.filter(references["error"].is_null())
        kinds, keys = ok["kind"].to_pylist(), ok["key"].to_pylist()
        vecs = [np.asarray(v, dtype=np.float32) for v in ok["embedding"].to_pylist()]
        text = {k: v for kind, k, v in zip(kinds, keys, vecs) if kind == "text"}
        image = {k: v for kind, k, v in zip(kinds, keys, vecs) if kind == "image"}
        missing = sorted({p for p in label_prompts.values() if p not in text})
        if missing:
            raise ValueError(f"no text embedding for prompts {missing[:5]}")
        self.labels = {int(lbl): i for i, lbl in enumerate(label_prompts)}
        self.text = torch.from_numpy(np.stack([text[label_prompts[lbl]] for lbl in label_prompts]))
        self.sources = {k: i for i, k in enumerate(image)}
        dim = self.text.shape[1]
        self.image = torch.from_numpy(np.stack(list(image.values()))) if image else torch.zeros(0, dim)

    def text_rows(self, labels: list[int]) -> torch.Tensor:
        try:
            return self.text[[self.labels[int(lbl)] for lbl in labels]]
        except KeyError as err:
            raise KeyError(f"label {err.args[0]} has no filter prompt in the prompts table") from None

    def image_rows(self, source_ids: list[str]) -> tuple[torch.Tensor, np.ndarray]:
        """Source embeddings (zeros where missing) and a mask of which sources were found."""
        idx = np.array([self.sources.get(s, -1) for s in source_ids], dtype=np.int64)
        found = idx >= 0
        out = torch.zeros(len(source_ids), self.text.shape[1])
        if found.any():
            out[torch.from_numpy(found)] = self.image[torch.from_numpy(idx[found])]
        return out, found


def score_batch(model, preprocess, batch: pa.Table, refs: ReferenceIndex, clip_model: str) -> pa.Table:
    """Score one batch of spectrum rows: ``SCORE_COLUMNS`` plus ``error`` (unreadable synthetic image)."""
    n = batch.num_rows
    text_cos = np.full(n, np.nan)
    image_cos = np.full(n, np.nan)
    images, reasons = decode_images(preprocess, batch["image"].to_pylist())
    ok = np.array([r is None for r in reasons], dtype=bool)
    if ok.any():
        emb = encode_images(model, images).cpu()
        labels = np.asarray(batch["label"].to_pylist())[ok].tolist()
        sources = np.asarray(batch["source_image_id"].to_pylist(), dtype=object)[ok].tolist()
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
    })


class _ClipActor:
    """Loads the CLIP model once per actor on the device Ray gave it."""

    def __init__(self, scoring_cfg: Any, cache_dir: str, root: Optional[str] = None):
        from discl_ray.runtime import resolve_device

        torch.set_grad_enabled(False)
        self.device = resolve_device(scoring_cfg.device)
        self.model, self.preprocess, self.tokenizer = load_clip(scoring_cfg, Path(cache_dir), self.device)
        self.root = root


class ReferenceEmbedder(_ClipActor):
    """Ray Data callable class: reference items → embeddings (pass 1)."""

    def __call__(self, batch: pa.Table) -> pa.Table:
        return embed_references(self.model, self.preprocess, self.tokenizer, batch, self.root)


class SpectrumScorer(_ClipActor):
    """Ray Data callable class: spectrum rows → scores (pass 2); references arrive once via the object store.

    ``references`` is ``[ObjectRef]`` (wrapped in a list so Ray hands the reference, not a copy per
    task, and the actor fetches it once) or a plain ``pa.Table`` in-process.
    """

    def __init__(self, scoring_cfg: Any, cache_dir: str, references: Any, label_prompts: dict[int, str],
                 clip_model: str, root: Optional[str] = None):
        super().__init__(scoring_cfg, cache_dir, root)
        if isinstance(references, list):
            import ray

            references = ray.get(references[0])
        self.refs = ReferenceIndex(references, label_prompts)
        self.clip_model = clip_model

    def __call__(self, batch: pa.Table) -> pa.Table:
        return score_batch(self.model, self.preprocess, batch, self.refs, self.clip_model)


def score_in_process(model, preprocess, tokenizer, spectrum: pa.Table, references: pa.Table,
                     label_prompts: dict[int, str], clip_model: str, batch_size: int = 64,
                     root: Optional[str] = None) -> pa.Table:
    """Both passes in this process (tests, benchmark): ``references`` are ``REFERENCE_SCHEMA`` items."""
    refs = pa.concat_tables([embed_references(model, preprocess, tokenizer, references.slice(i, batch_size), root)
                             for i in range(0, references.num_rows, batch_size)])
    index = ReferenceIndex(refs.filter(refs["error"].is_null()), label_prompts)
    return pa.concat_tables([score_batch(model, preprocess, spectrum.slice(i, batch_size), index, clip_model)
                             for i in range(0, spectrum.num_rows, batch_size)])
