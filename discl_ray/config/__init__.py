"""Experiment configuration: one YAML with a section per stage, strict validation, CLI overrides.

    cfg = load_config("configs/toy/digits_lt.yaml", ["training.epochs=3", "generation.seeds=[0,1]"])

A YAML file may name ``base: other.yaml`` (relative to itself) to inherit and override it. Overrides are
``dotted.key=value`` with the value parsed as YAML. Every problem raises :class:`ConfigError` naming the
field path and the valid choices, before any cluster work starts.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Optional

import yaml
from pydantic import Field, model_validator

from discl_ray.config.base import ConfigError, StrictModel, validate
from discl_ray.config.data import DatasetConfig, MiningConfig, PromptsConfig, ToyDataConfig
from discl_ray.config.generation import GenerationConfig
from discl_ray.config.runtime import RayConfig, TrackingConfig
from discl_ray.config.scoring import ScoringConfig
from discl_ray.config.sweep import SweepConfig
from discl_ray.config.training import STRATEGIES, TrainingConfig

__all__ = [
    "ConfigError", "DatasetConfig", "ExperimentConfig", "GenerationConfig", "MiningConfig", "PromptsConfig",
    "RayConfig", "STRATEGIES", "ScoringConfig", "SweepConfig", "ToyDataConfig", "TrackingConfig",
    "TrainingConfig", "absolute_paths", "apply_overrides", "resolve_paths", "load_config", "load_yaml", "to_flat_dict",
]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class ExperimentConfig(StrictModel):
    """A whole experiment: run location plus one section per stage."""

    experiment: str = Field("toy", description="Experiment name: runs/<experiment>/<stage>/…; MLflow experiment.")
    run_root: str = Field("runs", description="Root of all outputs (parquet, checkpoints, MLflow sqlite).")
    cache_dir: Optional[str] = Field(None, description="Toy models and materialized datasets (None = <run_root>/_cache).")
    dataset: DatasetConfig = Field(default_factory=DatasetConfig)
    mining: MiningConfig = Field(default_factory=MiningConfig)
    prompts: PromptsConfig = Field(default_factory=PromptsConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    scoring: ScoringConfig = Field(default_factory=ScoringConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    sweep: SweepConfig = Field(default_factory=SweepConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    ray: RayConfig = Field(default_factory=RayConfig)

    @model_validator(mode="after")
    def _cross(self):
        if not _NAME.match(self.experiment):
            raise ValueError(f"experiment: use letters, digits, '_', '-', '.' only (got {self.experiment!r})")
        missing = sorted(set(self.training.lams) - set(self.generation.lams) - {1.0})
        if missing and self.training.strategy != "none":
            raise ValueError(f"training.lams {missing} are not in generation.lams {self.generation.lams} "
                             "(only generated levels, or 1.0 for real images, can be trained on)")
        flat = to_flat_dict(self.model_dump())
        for key in self.sweep.space:
            if key.startswith("sweep.") or not any(k == key or k.startswith(key + ".") for k in flat):
                raise ValueError(f"sweep.space: '{key}' is not a config key a trial can set")
        return self


def load_yaml(path: str | Path, _seen: tuple = ()) -> dict:
    """Read a YAML config, resolving ``base:`` inheritance (deep merge, child wins)."""
    path = Path(path).resolve()
    if path in _seen:
        raise ConfigError(f"{path}: circular 'base:' chain")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    parent = load_yaml(path.parent / base, _seen + (path,))
    return _deep_merge(parent, data)


def _deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, val in over.items():
        if isinstance(val, dict) and isinstance(out.get(key), dict) and key != "space":
            out[key] = _deep_merge(out[key], val)
        else:
            out[key] = copy.deepcopy(val)
    return out


def apply_overrides(data: dict, overrides: Iterable[str]) -> dict:
    """Apply ``a.b.c=value`` overrides (value parsed as YAML) to a nested dict."""
    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected dotted.key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        set_dotted(data, key.strip(), value)
    return data


def set_dotted(data: dict, key: str, value: Any) -> None:
    """Set ``data[a][b][c] = value`` for ``key='a.b.c'``, creating mappings on the way."""
    parts = key.split(".")
    if not all(parts):
        raise ConfigError(f"override key {key!r}: empty path component")
    cur = data
    for part in parts[:-1]:
        nxt = cur.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {key!r}: '{part}' is not a section")
        cur = nxt
    cur[parts[-1]] = value


def load_config(path: str | Path | None = None, overrides: Iterable[str] = (),
                data: Optional[dict] = None) -> ExperimentConfig:
    """Load, merge, override and validate an experiment config."""
    base = copy.deepcopy(data) if data is not None else (load_yaml(path) if path else {})
    merged = apply_overrides(base, overrides)
    return validate(ExperimentConfig, merged)


ALWAYS_ABSOLUTE = ("run_root", "cache_dir", "ray.temp_dir")
PATH_KEYS = ("dataset.root", "mining.classifier_path", "prompts.name_map", "prompts.prompts_file",
             "scoring.model_config_path", "scoring.pretrained", "training.init_checkpoint", "generation.model",
             "training.clip.model_config_path", "training.clip.pretrained")


def absolute_paths(data: dict, cwd: Optional[Path] = None) -> dict:
    """Copy of config data with local relative paths made absolute (trials run in other directories)."""
    import copy

    cwd = cwd or Path.cwd()
    data = copy.deepcopy(data)
    flat = to_flat_dict(data)
    for key in ALWAYS_ABSOLUTE + PATH_KEYS:
        val = flat.get(key)
        if not isinstance(val, str) or not val or "://" in val or Path(val).is_absolute():
            continue
        if key in ALWAYS_ABSOLUTE or (cwd / val).exists():
            set_dotted(data, key, str((cwd / val).resolve()))
    return data


def resolve_paths(cfg: ExperimentConfig, cwd: Optional[Path] = None) -> ExperimentConfig:
    """The same config with local relative paths absolute: Ray workers and Tune trials run in other directories."""
    return validate(ExperimentConfig, absolute_paths(cfg.model_dump(mode="json"), cwd))


def to_flat_dict(data: dict, prefix: str = "") -> dict[str, Any]:
    """Flatten nested mappings to dotted keys (MLflow params, sweep-key checks)."""
    out: dict[str, Any] = {}
    for key, val in data.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(val, dict) and val and key != "space":
            out.update(to_flat_dict(val, name))
        else:
            out[name] = val
    return out
