"""Schema for Ray Tune sweeps over experiment settings."""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import Field, field_validator

from discl_ray.config.base import StrictModel

SPACE_KINDS = ("grid", "choice", "uniform", "loguniform", "randint")


class SweepConfig(StrictModel):
    """A search space over dotted config keys, e.g. ``training.strategy: {grid: [none, adaptive]}``."""

    space: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Dotted key -> {grid|choice: [...]} or {uniform|loguniform|randint: [low, high]}.")
    num_samples: int = Field(1, ge=1, description="Tune samples (grids multiply).")
    max_concurrent_trials: Optional[int] = Field(None, ge=1, description="None = from cluster resources.")
    metric: str = Field("val_acc", description="Metric Tune ranks trials by (validation, never test).")
    mode: Literal["min", "max"] = Field("max", description="Optimize direction of the metric.")
    name: Optional[str] = Field(None, description="Sweep name (runs/<exp>/sweep/<name>); an existing one resumes. "
                                                  "None = sweep-<UTC time>.")
    trial_cpus: float = Field(0.25, gt=0, description="CPUs the trial's driver function holds (it only waits on "
                                                      "its Train workers, which reserve their own).")
    reserve_cpus: float = Field(0.5, ge=0, description="CPUs left free when max_concurrent_trials is derived from "
                                                       "the cluster, so Ray Data and Train controllers never starve.")
    trial_retries: int = Field(0, ge=0, description="Times Tune reruns a failed trial (Train retries workers too).")

    @field_validator("space")
    @classmethod
    def _space(cls, v):
        for key, spec in v.items():
            if len(spec) != 1 or next(iter(spec)) not in SPACE_KINDS:
                raise ValueError(f"sweep.space.{key}: expected one of {list(SPACE_KINDS)} as the only key; got {list(spec)}")
            kind, vals = next(iter(spec.items()))
            if not isinstance(vals, list) or not vals:
                raise ValueError(f"sweep.space.{key}.{kind}: expected a non-empty list; got {vals!r}")
            if kind in ("uniform", "loguniform", "randint") and len(vals) != 2:
                raise ValueError(f"sweep.space.{key}.{kind}: expected [low, high]; got {vals!r}")
        return v
