"""Which training images are hard in confidence mining (§3.3), and the classifier that decides it.

§3.3: hard samples have a low "ground-truth class probability by a pretrained classifier"; the authors'
README: "a model pretrained on the original data". For iWildCam that is the FLYP baseline fine-tuned on
iWildCam (``mining.classifier=trained_run``, ``mining.classifier_from=iwildcam_flyp``), not the zero-shot
filter CLIP, which scores most camera-trap images near chance (Table 5: zero-shot ID F1 8.7).

The hard-set size is a stated target rather than a blind cut: exactly one of

* ``target_count``   the N least confident images overall (Table 6: 8,260 for iWildCam);
* ``class_quantile`` per class, the images at or below that quantile of the class's probabilities;
* ``lowest_k``       the k least confident images of every class;
* ``threshold``      every image below a probability.

``exclude_classes`` are never hard: iWildCam's "empty" frames show no animal, so there is nothing to prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from discl_ray.errors import UserError

if TYPE_CHECKING:
    from discl_ray.config import ExperimentConfig, MiningConfig


def select_hard(labels: Sequence[int], true_prob: Sequence[float], class_names: Sequence[str],
                m: "MiningConfig") -> np.ndarray:
    """Sorted indices of the hard images under ``m``'s rule (ties broken by index, so it is deterministic)."""
    labels = np.asarray(labels)
    prob = np.asarray(true_prob, dtype=np.float64)
    eligible = ~np.isin(np.asarray(class_names, dtype=object), list(m.exclude_classes)) if m.exclude_classes \
        else np.ones(len(labels), dtype=bool)
    cand = np.flatnonzero(eligible)
    if m.threshold is not None:
        return cand[prob[cand] < m.threshold]
    if m.target_count is not None:
        order = cand[np.lexsort((cand, prob[cand]))]
        return np.sort(order[:m.target_count])
    picked = []
    for c in np.unique(labels[cand]):
        idx = cand[labels[cand] == c]
        if m.lowest_k is not None:
            picked.append(idx[np.lexsort((idx, prob[idx]))][:m.lowest_k])
        else:
            picked.append(idx[prob[idx] <= np.quantile(prob[idx], m.class_quantile)])
    return np.sort(np.concatenate(picked)) if picked else np.array([], dtype=np.int64)


class TrainedRunClassifier:
    """The run ``mining.classifier_from`` names, as a batch scorer: ``probs(images, labels)`` gives true-class
    probabilities of float images in [0, 1] (B, 3, S, S). Loads once in ``__init__`` (a Ray Data actor can hold
    one); the device is a parameter.

    The model is rebuilt from this config's ``training`` section (backbone, ``training.clip``, captions with
    common names), which the baseline shares when both extend the same ``base.yaml``."""

    def __init__(self, cfg: "ExperimentConfig", class_names: Sequence[str], device: str = "cpu"):
        from discl_ray.training.checkpointing import load_model_state
        from discl_ray.training.clip_backbone import caption_prompts
        from discl_ray.training.init_from import resolve_checkpoint
        from discl_ray.training.models import build_model

        m, tc = cfg.mining, cfg.training
        path = resolve_checkpoint(cfg, m.classifier_from)
        net = build_model(tc.backbone, len(class_names), cfg=cfg, prompts=caption_prompts(cfg, class_names),
                          device=device)
        try:
            net.load_state_dict(load_model_state(str(path)))
        except RuntimeError as err:
            raise UserError(f"mining.classifier_from={m.classifier_from}: its checkpoint does not fit "
                             f"training.backbone={tc.backbone} of this config ({str(err).splitlines()[0]})") from None
        self.net = net.to(device).eval()
        self.device = device
        self.image_size = tc.image_size or cfg.dataset.image_size
        from discl_ray.training.transforms import build_pipeline

        # the baseline's own eval transform (e.g. CLIP's resize + mean/std): what it was validated on
        self.pipe = build_pipeline(cfg, getattr(net, "clip", None))

    def transform(self, img):
        """PIL image → float (3, S, S), the input pipeline's eval path."""
        return self.pipe(img.convert("RGB"), train=False)

    def probs(self, images, labels):
        import torch

        with torch.no_grad():
            p = torch.softmax(self.net(images.to(self.device)).float(), dim=-1).cpu()
        return p[torch.arange(len(labels)), torch.as_tensor(labels)].numpy().astype(np.float64)


def check_fits(cfg: "ExperimentConfig", class_names: Sequence[str]) -> None:
    """Driver-side: the run ``mining.classifier_from`` exists and its weights fit this config's model (built
    on the meta device, so no weights are allocated), before any Ray actor starts."""
    import torch

    from discl_ray.training.checkpointing import load_model_state
    from discl_ray.training.clip_backbone import caption_prompts
    from discl_ray.training.init_from import resolve_checkpoint
    from discl_ray.training.models import build_model

    m, tc = cfg.mining, cfg.training
    path = resolve_checkpoint(cfg, m.classifier_from)
    with torch.device("meta"):
        net = build_model(tc.backbone, len(class_names), cfg=cfg, prompts=caption_prompts(cfg, class_names),
                          device="meta")
    want = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in load_model_state(str(path)).items()}
    bad = sorted(set(want) ^ set(have)) + sorted(k for k in set(want) & set(have) if want[k] != have[k])
    if bad:
        raise UserError(f"mining.classifier_from={m.classifier_from}: its checkpoint does not fit "
                         f"training.backbone={tc.backbone} of this config ({len(bad)} mismatched tensors, "
                         f"e.g. {bad[0]})")
