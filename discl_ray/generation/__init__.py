"""Spectrum generation (paper §3.1, Eq. 3): diffusers image-to-image over λ × seeds on Ray Data.

Public entry points: ``load_img2img`` (the one loader for any img2img checkpoint, hub id, local folder
or ``toy``), ``SpectrumEngine`` (batched, cached, deterministic generation), ``SpectrumGenerator`` (the
Ray Data actor), ``run_generate`` (the whole stage, resumable). Import submodules directly; this package
imports nothing heavy.
"""

from __future__ import annotations

__all__ = ["load_img2img", "run_generate", "SpectrumEngine", "SpectrumGenerator"]


def __getattr__(name: str):
    if name == "load_img2img":
        from discl_ray.generation.pipeline import load_img2img
        return load_img2img
    if name == "run_generate":
        from discl_ray.generation.job import run_generate
        return run_generate
    if name == "SpectrumEngine":
        from discl_ray.generation.engine import SpectrumEngine
        return SpectrumEngine
    if name == "SpectrumGenerator":
        from discl_ray.generation.actor import SpectrumGenerator
        return SpectrumGenerator
    raise AttributeError(name)
