"""Loading any diffusers img2img checkpoint the same way: hub id, local folder or the toy generator.

``load_img2img`` is the one loader every stage uses (generation, benchmarks, the toy-world checks), so
a checkpoint that loads here runs everywhere. What it settles once, so callers never think about it:

* ``model == "toy"`` (``"toy-gap"``) resolves to the cached (gap) toy-world generator folder;
* local folders load with ``local_files_only`` (no network is ever attempted for them);
* the scheduler is swapped by name (DDIM by default, as in the paper), keeping the checkpoint's betas;
* CPU always runs float32 (half precision on the CPU is slow or unsupported);
* SDXL's ``requires_aesthetics_score`` flag is made to agree with the UNet's added-embedding width
  (``projection_class_embeddings_input_dim`` = n_time_ids × addition_time_embed_dim + text projection
  dim, n_time_ids = 5 with the aesthetic score, 6 without), which would otherwise be a ValueError at the
  first call for checkpoints saved with the wrong flag.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Optional

from discl_ray.errors import MissingInput, UserError
from discl_ray.runtime.storage import is_uri, local_copy

log = logging.getLogger(__name__)

SCHEDULERS: dict[str, str] = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "euler": "EulerDiscreteScheduler",
    "dpm": "DPMSolverMultistepScheduler",
}
DTYPES = ("float32", "float16", "bfloat16", "float64")


def resolve_model(model: str, cache: Optional[Path] = None) -> str:
    """The path or hub id to load: ``toy`` (``toy-gap``) → the clean (gap) toy world's generator folder
    under ``cache``."""
    from discl_ray.toyworld import GENERATORS, generator_dir

    if model in GENERATORS:
        if cache is None:
            from discl_ray.config import ExperimentConfig
            from discl_ray.runtime.cluster import RunPaths

            cache = RunPaths.from_config(ExperimentConfig()).cache
        variant = GENERATORS[model]
        path = generator_dir(cache, variant)
        if not (path / "model_index.json").is_file():
            how = "discl world" if variant == "clean" else f"discl world --variant {variant}"
            raise MissingInput(f"toy generator not found at {path}; build the toy world first ({how})")
        return str(path)
    return model


def fetch_model_dir(uri: str, cache: Optional[Path]) -> Path:
    """A checkpoint folder on object storage, copied to ``<cache>/models/`` once per node."""
    if cache is None:
        raise UserError(f"model {uri} is on object storage: a local cache_dir is needed to load it")
    log.info("using a node-local copy of %s", uri)
    return local_copy(uri, cache)


def is_sdxl(pipe: Any) -> bool:
    """SDXL-family pipelines take pooled text embeddings and micro-conditioning time ids."""
    return hasattr(pipe, "text_encoder_2") and hasattr(pipe.config, "requires_aesthetics_score")


def fix_aesthetics_flag(pipe: Any) -> None:
    """Make ``requires_aesthetics_score`` agree with the UNet's projection width (SDXL only)."""
    if not is_sdxl(pipe):
        return
    unet_cfg = pipe.unet.config
    expected = unet_cfg.projection_class_embeddings_input_dim
    proj = pipe.text_encoder_2.config.projection_dim
    per_id = unet_cfg.addition_time_embed_dim
    if expected == 5 * per_id + proj:
        wanted = True
    elif expected == 6 * per_id + proj:
        wanted = False
    else:
        raise UserError(f"SDXL UNet projection_class_embeddings_input_dim={expected} fits neither 5 nor 6 time ids "
                         f"× {per_id} + text projection {proj}")
    if bool(pipe.config.requires_aesthetics_score) != wanted:
        log.info("setting requires_aesthetics_score=%s to match the UNet", wanted)
        pipe.register_to_config(requires_aesthetics_score=wanted)


def make_scheduler(pipe: Any, scheduler: str) -> Any:
    """A scheduler of the named family built from the checkpoint's own scheduler config."""
    import diffusers

    if scheduler not in SCHEDULERS:
        raise UserError(f"unknown scheduler {scheduler!r}; valid: {', '.join(SCHEDULERS)}")
    cls = getattr(diffusers, SCHEDULERS[scheduler])
    return cls.from_config(pipe.scheduler.config)


def load_img2img(model: str, device: str = "cpu", dtype: str = "float32", scheduler: str = "ddim",
                 cache: Optional[Path] = None) -> Any:
    """Load any diffusers image-to-image pipeline (hub id, local folder, or ``toy``) ready to call.

    ``device`` is ``cpu``, ``cuda``, ``cuda:N``, ``mps`` or ``auto``; ``dtype`` one of float32, float16,
    bfloat16 (half types become float32 on the CPU), float64 (CPU reference). Raises ValueError naming the bad argument."""
    import torch
    from diffusers import AutoPipelineForImage2Image

    from discl_ray.runtime.cluster import resolve_device

    if dtype not in DTYPES:
        raise UserError(f"dtype {dtype!r}: valid: {', '.join(DTYPES)}")
    if scheduler not in SCHEDULERS:
        raise UserError(f"scheduler {scheduler!r}: valid: {', '.join(SCHEDULERS)}")
    device = resolve_device(device)
    if device == "cpu" and dtype in ("float16", "bfloat16"):
        log.info("CPU run: using float32 instead of %s", dtype)
        dtype = "float32"
    source = resolve_model(model, cache)
    if is_uri(source):
        source = str(fetch_model_dir(source, cache))
    kwargs: dict[str, Any] = {"dtype": getattr(torch, dtype)}
    if Path(source).is_dir():
        kwargs["local_files_only"] = True
    elif cache is not None and not os.environ.get("HF_HUB_CACHE") and not os.environ.get("HF_HOME"):
        # Hub weights land once per node (or once per cluster on a shared run volume), not per actor.
        kwargs["cache_dir"] = str(Path(cache) / "hf")
    elif dtype == "float16":
        kwargs["variant"] = "fp16"        # hub checkpoints ship half-size fp16 weights
    try:
        pipe = AutoPipelineForImage2Image.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as err:
        if "variant" not in kwargs:
            raise
        log.info("no fp16 variant for %s (%s); loading the default weights", source, err)
        kwargs.pop("variant")
        pipe = AutoPipelineForImage2Image.from_pretrained(source, **kwargs)
    pipe.scheduler = make_scheduler(pipe, scheduler)
    fix_aesthetics_flag(pipe)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe
