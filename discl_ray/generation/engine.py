"""Batched, deterministic img2img over (source, λ, seed) work items — the work one generator actor does.

What is reused instead of recomputed (the "authors' way" recomputes all of it per output image):

* **prompt embeddings** — each distinct prompt string is run through the text encoder(s) once per engine
  (positive, negative and SDXL pooled embeddings are cached together) and the cached tensors are passed
  as ``prompt_embeds`` / ``negative_prompt_embeds`` (+ pooled) to every later call;
* **source latents** — each source image is VAE-encoded once (the posterior mode, so no randomness is
  spent on it) and the latents are reused for every λ and seed of that source; diffusers treats a
  4-channel tensor ``image`` as ready latents. Checkpoints whose VAE has a different latent width fall
  back to pixel input (the pipeline then encodes per image, still deterministically);
* **batching** — all items sharing λ (one strength per call) and image size go through one pipeline call
  in chunks of ``batch_size``: the seeds of a (source, λ) and several sources at once.

Determinism: every output image gets its own CPU ``torch.Generator`` seeded with
``stable_seed(source_image_id, λ, seed)``, passed to the pipeline as a list, so its noise does not depend
on what else is in the batch, on the actor, the run, or the GPU model. Same key and same batch layout
give bit-identical PNGs (tested across engines and between the in-process and Ray paths). Across
*different* batch sizes the noise is identical but float32 CPU/GPU kernels choose a different summation
order per batch shape (measured here: the CPU GEMM for 1 row vs 8 rows, oneDNN convolutions), which
moves a rare pixel by one 8-bit level; ``generation.dtype: float64`` on the CPU is bit-identical across
batch sizes (tested), at several times the cost.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from discl_ray.generation.pipeline import is_sdxl, load_img2img
from discl_ray.runtime.io import stable_seed

if TYPE_CHECKING:
    from pathlib import Path

    from PIL import Image

    from discl_ray.config import GenerationConfig

log = logging.getLogger(__name__)


def strength_of(lam: float) -> float:
    """img2img strength for image guidance λ, rounded (1 − 0.9 = 0.0999… would run zero steps)."""
    return round(1.0 - float(lam), 6)


def steps_for(steps: int, lam: float) -> int:
    """Denoising steps diffusers runs for λ: int(num_inference_steps × strength)."""
    return min(int(steps * strength_of(lam)), steps)


def output_key(source_image_id: str, lam: float, seed: int) -> str:
    """The spectrum row id ``{source}|l{λ:.3f}|s{seed}``."""
    return f"{source_image_id}|l{float(lam):.3f}|s{int(seed)}"


def noise_seed(source_image_id: str, lam: float, seed: int, shared: bool = False) -> int:
    """The per-image torch seed: a stable hash of the key (never Python's salted hash()).

    ``shared`` (``generation.shared_noise``, the authors' choice): one noise trajectory per (source, seed), the
    same for every λ, so a spectrum's levels differ only in where denoising starts."""
    if shared:
        return stable_seed(source_image_id, "shared-noise", int(seed))
    return stable_seed(source_image_id, round(float(lam), 6), int(seed))


@dataclass(frozen=True)
class WorkItem:
    """One output image to make."""

    key: str
    source_image_id: str
    lam: float
    seed: int
    prompt: str
    image: "Image.Image"


class SpectrumEngine:
    """A loaded pipeline plus caches; ``generate(items)`` returns one PIL image per item, in order."""

    def __init__(self, pipe: Any, *, steps: int, guidance_scale: float, batch_size: int,
                 negative_prompt: str = "", aesthetic_score: float = 6.0, negative_aesthetic_score: float = 2.5,
                 reuse: bool = True, shared_noise: bool = False):
        self.pipe = pipe
        self.steps = steps
        self.guidance_scale = guidance_scale
        self.batch_size = batch_size
        self.negative_prompt = negative_prompt
        self.aesthetic_score = aesthetic_score
        self.negative_aesthetic_score = negative_aesthetic_score
        self.reuse = reuse
        self.shared_noise = shared_noise
        self.sdxl = is_sdxl(pipe)
        self.latent_input = pipe.vae.config.latent_channels == 4
        self._prompts: dict[str, tuple] = {}
        self._latents: dict[tuple, Any] = {}
        self.steps_run = 0          # denoising steps × images actually executed
        self.calls = 0              # pipeline calls made

    @classmethod
    def from_config(cls, gen: "GenerationConfig", cache: Optional["Path"] = None) -> "SpectrumEngine":
        pipe = load_img2img(gen.model, gen.device, gen.dtype, gen.scheduler, cache=cache)
        if gen.compile_unet and str(pipe.device).startswith("cuda"):
            import torch

            pipe.unet = torch.compile(pipe.unet, mode="max-autotune-no-cudagraphs")  # varying batch shapes
        return cls(pipe, steps=gen.steps, guidance_scale=gen.guidance_scale, batch_size=gen.batch_size,
                   negative_prompt=gen.negative_prompt, aesthetic_score=gen.aesthetic_score,
                   negative_aesthetic_score=gen.negative_aesthetic_score, shared_noise=gen.shared_noise)

    # -- caches -------------------------------------------------------------------------------------
    def prompt_embeds(self, prompt: str) -> tuple:
        """(positive, negative, pooled, negative pooled) embeddings of one prompt, batch dim 1."""
        hit = self._prompts.get(prompt)
        if hit is not None:
            return hit
        import torch

        do_cfg = self.guidance_scale > 1
        with torch.inference_mode():
            if self.sdxl:
                pe, npe, pooled, npooled = self.pipe.encode_prompt(
                    prompt, device=self.pipe.device, num_images_per_prompt=1, do_classifier_free_guidance=do_cfg,
                    negative_prompt=self.negative_prompt)
            else:
                pe, npe = self.pipe.encode_prompt(prompt, self.pipe.device, 1, do_cfg,
                                                  negative_prompt=self.negative_prompt)
                pooled = npooled = None
        out = (pe, npe, pooled, npooled)
        self._prompts[prompt] = out
        return out

    def source_latents(self, source_image_id: str, image: "Image.Image") -> Any:
        """Scaled VAE latents (posterior mode) of one source, cached per source id and size."""
        key = (source_image_id, image.size)
        hit = self._latents.get(key)
        if hit is not None:
            return hit
        import torch

        pipe, vae = self.pipe, self.pipe.vae
        px = pipe.image_processor.preprocess(image)
        upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
        if upcast:
            vae.to(dtype=torch.float32)
        with torch.inference_mode():
            lat = vae.encode(px.to(pipe.device, dtype=vae.dtype)).latent_dist.mode()
        if upcast:
            vae.to(dtype=torch.float16)
        mean = getattr(vae.config, "latents_mean", None) if self.sdxl else None
        std = getattr(vae.config, "latents_std", None) if self.sdxl else None
        if mean is not None and std is not None:
            mean_t = torch.tensor(mean, device=lat.device, dtype=lat.dtype).view(1, -1, 1, 1)
            std_t = torch.tensor(std, device=lat.device, dtype=lat.dtype).view(1, -1, 1, 1)
            lat = (lat - mean_t) * vae.config.scaling_factor / std_t
        else:
            lat = vae.config.scaling_factor * lat
        lat = lat.to(dtype=pipe.unet.dtype)
        self._latents[key] = lat
        return lat

    def clear_latents(self) -> None:
        """Drop cached source latents (called between actor batches to bound memory)."""
        self._latents.clear()

    # -- generation ---------------------------------------------------------------------------------
    def generate(self, items: list[WorkItem]) -> list["Image.Image"]:
        """Generate every item; items sharing λ and image size are batched, results keep input order."""
        groups: dict[tuple, list[int]] = {}
        for i, it in enumerate(items):
            groups.setdefault((round(it.lam, 6), it.image.size), []).append(i)
        out: list[Any] = [None] * len(items)
        for (lam, _size), idx in groups.items():
            for start in range(0, len(idx), self.batch_size):
                chunk = idx[start:start + self.batch_size]
                images = self._call([items[i] for i in chunk], lam)
                for i, img in zip(chunk, images):
                    out[i] = img
        return out

    def _call(self, chunk: list[WorkItem], lam: float) -> list["Image.Image"]:
        import torch

        gens = [torch.Generator("cpu").manual_seed(noise_seed(it.source_image_id, it.lam, it.seed, self.shared_noise))
                for it in chunk]
        kwargs: dict[str, Any] = dict(strength=strength_of(lam), num_inference_steps=self.steps,
                                      guidance_scale=self.guidance_scale, generator=gens, output_type="pil")
        if self.reuse:
            embeds = [self.prompt_embeds(it.prompt) for it in chunk]
            kwargs["prompt_embeds"] = torch.cat([e[0] for e in embeds])
            if self.guidance_scale > 1:
                kwargs["negative_prompt_embeds"] = torch.cat([e[1] for e in embeds])
            if self.sdxl:
                kwargs["pooled_prompt_embeds"] = torch.cat([e[2] for e in embeds])
                if self.guidance_scale > 1:
                    kwargs["negative_pooled_prompt_embeds"] = torch.cat([e[3] for e in embeds])
        else:
            kwargs["prompt"] = [it.prompt for it in chunk]
            kwargs["negative_prompt"] = [self.negative_prompt] * len(chunk)
        if self.reuse and self.latent_input:
            kwargs["image"] = torch.cat([self.source_latents(it.source_image_id, it.image) for it in chunk])
        else:
            kwargs["image"] = [it.image for it in chunk]
        if self.sdxl:
            kwargs["aesthetic_score"] = self.aesthetic_score
            kwargs["negative_aesthetic_score"] = self.negative_aesthetic_score
        n = len(chunk)

        def count(_pipe, _i, _t, cb_kwargs):
            self.steps_run += n
            return cb_kwargs

        with torch.inference_mode():
            result = self.pipe(callback_on_step_end=count, **kwargs)
        self.calls += 1
        return list(result.images)
