"""Model code more than one stage uses, below the stages (``config → runtime → data → models → stages``).

- :mod:`discl_ray.models.clip`: the open_clip loader (:func:`~discl_ray.models.clip.load_clip`), the CLIP source
  and identity (:func:`~discl_ray.models.clip.resolve_clip_source`) and embedding helpers; used by mining
  (zero-shot confidence), generation (the spectrum store's score keys), scoring and training (CLIP backbones).
"""
