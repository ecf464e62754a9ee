"""CLIP scoring and filtering of the synthetic-to-real spectrum (paper §3.1 end, appendix A.1.2–A.1.3).

- :mod:`discl_ray.models.clip`: the shared open_clip loader (:func:`load_clip`) and embedding helpers
  (:func:`encode_texts`, :func:`encode_images`, :func:`zero_shot_probs`) other stages reuse;
- :mod:`discl_ray.scoring.embed`: batch functions and the Ray Data actor classes;
- :mod:`discl_ray.scoring.job`: ``discl score`` (:func:`run_score`);
- :mod:`discl_ray.scoring.report`: threshold filter, summary, per-λ histograms.
"""

from discl_ray.models.clip import (
    clip_model_id,
    encode_images,
    encode_texts,
    load_clip,
    preprocess_images,
    zero_shot_probs,
)

__all__ = ["clip_model_id", "encode_images", "encode_texts", "load_clip", "preprocess_images", "zero_shot_probs"]
