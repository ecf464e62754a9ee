"""Curriculum training (paper §3.2, Algorithms 1 and 2) on Ray Train V2 with a λ selector actor.

Public API: :func:`fit` (run a config, return final metrics) and :func:`build_trainer`. Building blocks:
``schedules`` (pure λ schedules, DoCL gain rule), ``selector`` (the actor), ``losses``, ``models``,
``data`` (per-epoch sets from parquet), ``loop`` (the per-worker function), ``metrics``.
"""

from discl_ray.training.trainer import build_trainer, default_run_name, fit

__all__ = ["build_trainer", "default_run_name", "fit"]
