"""Schema for CLIP scoring and filtering of the spectrum."""

from __future__ import annotations

from typing import Optional

from pydantic import Field, model_validator

from discl_ray.config.base import StrictModel
from discl_ray.config.generation import Device, DType


class ScoringConfig(StrictModel):
    """open_clip image–text (filter) and image–image (analysis) cosine scores (paper §3.1, A.1.2–A.1.3)."""

    model: str = Field("ViT-B-32", description="open_clip architecture name ('toy-clip' = the toy-world CLIP, 'toy-gap-clip' = the gap world's).")
    pretrained: Optional[str] = Field("openai", description="open_clip pretrained tag or a local weights file.")
    model_config_path: Optional[str] = Field(None, description="JSON file/folder registering a custom architecture.")
    threshold: float = Field(0.30, ge=-1, le=1,
                             description="Keep rows with raw image–text cosine >= threshold (0.30 IN-LT, 0.25 iWildCam).")
    device: Device = Field("auto", description="auto = cuda when available, else cpu.")
    dtype: DType = Field("float16", description="Dtype on GPU (CPU always float32).")
    batch_size: int = Field(64, ge=1, description="Images per CLIP forward pass.")
    actors_min: Optional[int] = Field(None, ge=1, description="Minimum scorer actors (None = actors_max: a fixed pool).")
    actors_max: int = Field(1, ge=1, description="Scorer actors (maximum when actors_min is lower).")
    num_gpus_per_actor: float = Field(1.0, ge=0, description="GPUs each scorer (and confidence-mining) actor asks "
                                      "for whenever device is not cpu; fractions share a GPU.")
    num_cpus_per_actor: float = Field(1.0, gt=0, description="CPUs per scorer actor.")
    write_every: int = Field(1024, ge=1,
                             description="Spectrum rows per scoring block, each written as one part by a worker: "
                                         "the resume granularity of an interrupted run.")
    retry_errors: bool = Field(False, description="Rerun also retries image_ids in score/errors/ (after the spectrum "
                               "was repaired); by default they are skipped like scored ids.")
    histogram_bins: int = Field(30, ge=2, description="Bins of the per-λ score histograms (paper Fig. 4/5).")

    @model_validator(mode="after")
    def _check(self):
        if self.device == "cuda" and self.num_gpus_per_actor == 0:
            raise ValueError("scoring.device=cuda needs scoring.num_gpus_per_actor > 0 (Ray hides GPUs from actors "
                             "that asked for none)")
        if self.actors_min is not None and self.actors_min > self.actors_max:
            raise ValueError(f"scoring.actors_min ({self.actors_min}) must be <= scoring.actors_max ({self.actors_max})")
        return self
