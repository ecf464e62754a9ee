"""Hard-sample mining (paper Fig. 1, phase 1): which training images get a synthetic spectrum.

* frequency — long-tail: classes are grouped by training count (few < ``few_max`` ≤ medium < ``many_min`` ≤ many;
  paper: 20 / 100) and every training image of the ``hard_groups`` classes is hard.
* confidence — low-quality: a pretrained classifier's true-class probability; hard when below ``threshold`` or
  among the ``lowest_k`` of its class.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np
import pyarrow as pa

from discl_ray.data.loaders.groups import class_groups
from discl_ray.errors import MissingInput, UserError
from discl_ray.toyworld import CLASSIFIERS

if TYPE_CHECKING:
    from discl_ray.config import ExperimentConfig, MiningConfig
    from discl_ray.runtime.context import StageContext

__all__ = ["HARD_SCHEMA", "class_groups", "mine_confidence", "mine_frequency", "select_low_confidence",
           "split_blocks", "true_class_probs"]

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
        raise UserError("give exactly one of threshold or lowest_k")
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
    from discl_ray.mining.hard_set import select_hard

    # threshold / lowest_k / target_count / class_quantile; exclude_classes never hard.
    idx = select_hard(labels, true_prob, train["class_name"].to_pylist(), cfg)
    sub = train.take(idx)
    return pa.table({
        "image_id": sub["image_id"], "label": sub["label"], "class_name": sub["class_name"],
        "group": [groups[y] for y in sub["label"].to_pylist()],
        "reason": ["confidence"] * sub.num_rows,
        "score": [float(true_prob[i]) for i in idx],
    }, schema=HARD_SCHEMA)


class ConfidenceScorer:
    """Ray Data actor: canonical rows → (image_id, true-class probability) under the mining classifier.

    Loads the classifier once per actor and resolves ``scoring.device`` where it runs (``auto`` → CUDA if
    this actor sees one), so confidence mining runs on the GPU nodes, never on the head."""

    def __init__(self, cfg: dict, texts: Optional[list[str]] = None, class_names: Optional[list[str]] = None):
        import torch

        from discl_ray.config import ExperimentConfig
        from discl_ray.runtime.cluster import RunPaths, resolve_device

        torch.set_grad_enabled(False)
        self.cfg = ExperimentConfig.model_validate(cfg)
        m = self.cfg.mining
        self.device = resolve_device(self.cfg.scoring.device, "mining")
        cache = RunPaths.from_config(self.cfg).cache
        self.texts = texts
        self.trained_run = None
        if m.classifier == "trained_run":     # the baseline trained on this dataset (§3.3), see hard_set.py
            from discl_ray.mining.hard_set import TrainedRunClassifier

            self.trained_run = TrainedRunClassifier(self.cfg, class_names or [], self.device)
            self.transform = self.trained_run.transform
        elif m.classifier == "torchscript" or m.classifier in CLASSIFIERS:
            from torchvision.transforms.functional import pil_to_tensor

            from discl_ray.toyworld import classifier_file

            toy = CLASSIFIERS.get(m.classifier)
            file = classifier_file(cache, toy) if toy else m.classifier_path
            if not Path(file).is_file():
                hint = (" (run `discl world" + ("" if toy == "clean" else f" --variant {toy}") + "` to train the toy "
                        "judge)") if toy else ""
                raise MissingInput(f"mining classifier not found: {file}{hint}")
            self.model = torch.jit.load(str(file), map_location=self.device).eval()
            size = self.cfg.dataset.image_size
            self.transform = lambda im: pil_to_tensor(im.resize((size, size))).float() / 255.0
        else:
            from discl_ray.models.clip import load_clip

            self.model, self.transform, self.tokenizer = load_clip(self.cfg.scoring, cache, self.device)
        from discl_ray.runtime.cluster import actor_record

        self.actor = actor_record(self.device)

    def __call__(self, batch: pa.Table) -> pa.Table:
        import torch


        root = self.cfg.dataset.root
        with torch.inference_mode():  # Ray Data calls from a worker thread: grad mode is per thread
            return self._score(batch, root)

    def _score(self, batch: pa.Table, root) -> pa.Table:
        import torch

        from discl_ray.runtime.io import load_image

        x = torch.stack([self.transform(load_image(img, path, root)) for img, path in
                         zip(batch["image"].to_pylist(), batch["path"].to_pylist())]).to(self.device)
        if self.trained_run is not None:
            true = self.trained_run.probs(x, batch["label"].to_pylist())
            return pa.table({"image_id": batch["image_id"], "prob": pa.array(true, pa.float64()),
                             "actor": pa.array([self.actor] * batch.num_rows, pa.string())})
        if self.texts is None:
            probs = torch.softmax(self.model(x), dim=-1)
        else:
            from discl_ray.models.clip import zero_shot_probs

            probs = zero_shot_probs(self.model, self.tokenizer, x, self.texts)
        labels = torch.tensor(batch["label"].to_pylist(), device=probs.device)
        true = probs[torch.arange(len(labels), device=probs.device), labels].cpu().numpy().astype(np.float64)
        return pa.table({"image_id": batch["image_id"], "prob": pa.array(true, pa.float64()),
                         "actor": pa.array([self.actor] * batch.num_rows, pa.string())})


def split_blocks(rows: pa.Table, batch_size: int, actors: int, per_actor: int = 16) -> list[pa.Table]:
    """``rows`` as consecutive slices, one Ray Data block each, so every actor of the pool gets work: one table
    is one block, and one block goes to one actor (which then decodes every image). At most ``per_actor``
    blocks per actor and none smaller than a batch (smaller ones would be bundled back together); slices share
    the table's buffers, and Ray's Arrow serializer ships only each slice's rows."""
    n = max(1, min(rows.num_rows // max(batch_size, 1), per_actor * max(actors, 1)))
    if n == 1:
        return [rows]
    size = -(-rows.num_rows // n)
    return [rows.slice(i, size) for i in range(0, rows.num_rows, size)]


def true_class_probs(ctx: "StageContext | ExperimentConfig", train: pa.Table, prompts: pa.Table | None = None,
                     actors: list | None = None) -> np.ndarray:
    """True-class probability of each training image under the configured classifier (a Ray Data stage
    on ``scoring``'s device and actor settings); ``actors`` receives the actors' descriptions. ``ctx``: the
    stage's context (a bare config opens one)."""
    import json

    import ray

    from discl_ray.runtime.cluster import actor_gpus
    from discl_ray.runtime.context import StageContext

    ctx = StageContext.of(ctx, "mine")
    cfg = ctx.cfg
    m = cfg.mining
    texts = None
    if m.classifier == "open_clip_zero_shot":
        if prompts is None:
            raise UserError("open_clip_zero_shot mining needs the prompts table (run `discl prompts` first)")
        by_label = dict(zip(prompts["label"].to_pylist(), prompts["clip_prompt"].to_pylist()))
        texts = [by_label.get(c, f"a photo of class {c}") for c in range(max(by_label) + 1)]
    elif m.classifier == "torchscript" and not Path(m.classifier_path).is_file():
        raise MissingInput(f"mining classifier not found: {m.classifier_path}")
    names = None
    if m.classifier == "trained_run":
        from discl_ray.data import class_names, read_rows
        from discl_ray.mining.hard_set import check_fits

        by_label = class_names(read_rows(cfg, paths=ctx.paths))
        names = [by_label.get(c, str(c)) for c in range(max(by_label) + 1)]
        check_fits(cfg, names)      # a missing or mismatched baseline fails here, before any actor starts
    ctx.init_ray()
    sc = cfg.scoring
    size = sc.actors_max if sc.actors_min is None else sc.actors_min
    rows = train.select(["image_id", "image", "path", "label"])
    ds = ray.data.from_arrow(split_blocks(rows, m.batch_size, sc.actors_max)).map_batches(
        ConfidenceScorer, fn_constructor_kwargs=dict(cfg=cfg.model_dump(mode="json"), texts=texts, class_names=names),
        batch_size=m.batch_size, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(min_size=size, max_size=sc.actors_max),
        num_gpus=actor_gpus(cfg, sc.device, sc.num_gpus_per_actor, "mining", address=ctx.address),
        num_cpus=sc.num_cpus_per_actor)
    out = pa.concat_tables(list(ds.iter_batches(batch_size=None, batch_format="pyarrow")))
    if actors is not None:
        actors.extend(json.loads(a) for a in sorted(set(out["actor"].to_pylist())) if a)
    prob = dict(zip(out["image_id"].to_pylist(), out["prob"].to_pylist()))
    return np.array([prob[i] for i in train["image_id"].to_pylist()], dtype=np.float64)


def trained_run_probs(cfg: "ExperimentConfig", train: pa.Table, device: str | None = None) -> np.ndarray:
    """True-class probability of each ``train`` row under the run ``mining.classifier_from`` names (the
    mining stage's Ray Data actors, on ``scoring``'s device settings; ``device`` is accepted for old callers)."""
    cfg = cfg.model_copy(update={"mining": cfg.mining.model_copy(update={"classifier": "trained_run"})})
    return true_class_probs(cfg, train)
