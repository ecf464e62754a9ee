"""Loaders for the paper's real datasets: ImageNet-LT, CIFAR-100-LT, iNaturalist-2018, iWildCam.

Each module exposes ``load(cfg: DatasetConfig) -> pyarrow.Table`` with ``discl_ray.data.CANONICAL_SCHEMA``
rows; they are registered (by string) in ``discl_ray.data.LOADERS`` so that importing the package costs
nothing until a dataset is used. Shared pieces: :mod:`.common` (``DatasetError``, file checks, table
building, seeded balanced hold-outs, optional image embedding) and :mod:`.groups` (many/medium/few).
The on-disk layouts each loader expects are described in ``docs/datasets.md``.
"""

from discl_ray.data.loaders.common import DatasetError
from discl_ray.data.loaders.groups import class_groups

__all__ = ["DatasetError", "class_groups"]
