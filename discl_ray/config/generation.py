"""Schema for spectrum generation (diffusers image-to-image over guidance levels λ)."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, field_validator, model_validator

from discl_ray.config.base import StrictModel

Device = Literal["auto", "cpu", "cuda", "mps"]
DType = Literal["float32", "float16", "bfloat16"]
# float64 is a CPU reference mode: bit-identical pixels whatever the batch size (float32 kernels pick a
# different summation order per batch shape, which moves a rare pixel by one 8-bit level).
GenDType = Literal["float32", "float16", "bfloat16", "float64"]


def check_lams(values: list[float], field: str) -> list[float]:
    """λ values must lie in [0, 1] and be unique; returned sorted ascending."""
    bad = [v for v in values if not 0.0 <= v <= 1.0]
    if bad:
        raise ValueError(f"{field}: every λ must lie in [0, 1]; got {bad}")
    if len(set(values)) != len(values):
        raise ValueError(f"{field}: λ values must be unique; got {values}")
    return sorted(values)


class GenerationConfig(StrictModel):
    """Image-to-image generation of the synthetic-to-real spectrum (paper §3.1, Eq. 3)."""

    model: str = Field("stabilityai/stable-diffusion-xl-refiner-1.0",
                       description="Any diffusers img2img checkpoint (hub id or local dir); 'toy' = the toy-world generator, 'toy-gap' = the gap world's.")
    lams: list[float] = Field([0.0, 0.1, 0.3, 0.5], min_length=1,
                              description="Image-guidance levels λ; strength = 1 − λ. λ = 1 (the real image) is never generated.")
    seeds: list[int] = Field(list(range(8)), min_length=1, description="Random seeds per (source, λ); paper: 8.")
    steps: int = Field(50, ge=1, description="num_inference_steps; steps run = int(steps × (1 − λ)).")
    guidance_scale: float = Field(10.0, ge=0, description="Text (classifier-free) guidance w; paper: 10.")
    scheduler: Literal["ddim", "ddpm", "euler", "dpm"] = Field("ddim", description="Noise scheduler; paper: DDIM.")
    device: Device = Field("auto", description="auto = cuda when available, else cpu.")
    dtype: GenDType = Field("float16", description="Weights/activations dtype on GPU (CPU: float32, or float64 "
                                                   "for batch-size-independent bits).")
    height: Optional[int] = Field(None, ge=8, description="Resize sources to this height (None = keep).")
    width: Optional[int] = Field(None, ge=8, description="Resize sources to this width (None = keep).")
    batch_size: int = Field(8, ge=1, description="Output images per pipeline call (seeds of a source batched).")
    rows_per_block: int = Field(64, ge=1, description="Outputs per block handed to an actor (rounded up to whole "
                                "sources, a multiple of |λ|·|seeds|, and to at least 4 batches).")
    actors_min: Optional[int] = Field(None, ge=1, description="Minimum generator actors (None = actors_max: a fixed "
                                      "pool; Ray grows a pool one pending actor at a time).")
    actors_max: int = Field(1, ge=1, description="Generator actors in the pool (maximum when actors_min is lower).")
    num_gpus_per_actor: float = Field(1.0, ge=0, description="GPUs each generator actor asks Ray for whenever device "
                                      "is not cpu (device auto on a local cluster without GPUs asks for none).")
    num_cpus_per_actor: float = Field(1.0, gt=0, description="CPUs reserved per generator actor.")
    aesthetic_score: float = Field(6.0, description="SDXL refiner aesthetic conditioning (positive).")
    negative_aesthetic_score: float = Field(2.5, description="SDXL refiner aesthetic conditioning (negative).")
    negative_prompt: str = Field("", description="Negative prompt for classifier-free guidance.")
    grid_sources: int = Field(4, ge=0, description="Sources shown in the spectrum grid PNG.")
    grid_seeds: int = Field(3, ge=1, description="Seeds per λ shown in the spectrum grid PNG.")
    compile_unet: bool = Field(False, description="torch.compile the UNet (GPU runs).")
    shared_noise: bool = Field(False, description="One noise trajectory per (source, seed) shared by every λ (the "
                                                  "authors' release); default: independent noise per (source, λ, "
                                                  "seed). The seed used is recorded per row (noise_seed).")
    image_format: Literal["png", "webp", "jpeg"] = Field("png", description="Encoding of spectrum images (webp is "
                                                          "lossless); recorded per row in the `format` column.")
    jpeg_quality: int = Field(95, ge=1, le=100, description="JPEG quality when image_format is jpeg.")

    @field_validator("lams")
    @classmethod
    def _lams(cls, v):
        return check_lams(v, "generation.lams")

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v):
        if len(set(v)) != len(v):
            raise ValueError(f"seeds must be unique; got {v}")
        return v

    @model_validator(mode="after")
    def _steps_cover_lams(self):
        empty = [lam for lam in self.lams if lam < 1.0 and int(self.steps * round(1.0 - lam, 6)) < 1]
        if empty:
            raise ValueError(f"generation.steps={self.steps} runs int(steps × (1 − λ)) = 0 denoising steps for "
                             f"λ in {empty}; raise generation.steps or drop those λ")
        if self.actors_min is not None and self.actors_min > self.actors_max:
            raise ValueError(f"generation.actors_min ({self.actors_min}) must be <= actors_max ({self.actors_max})")
        if self.device == "cuda" and self.num_gpus_per_actor == 0:
            raise ValueError("generation.device=cuda needs generation.num_gpus_per_actor > 0 (Ray hides GPUs from "
                             "actors that asked for none)")
        return self
