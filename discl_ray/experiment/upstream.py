"""A config's upstream experiments: the runs it starts from, found in the run folder or trained first.

Two settings name another experiment whose trained model a config needs:

* ``training.init_from`` — Algorithm 1 fine-tunes the CE baseline (``imagenet_lt_ce``) and a sweep's trials
  start from it too;
* ``mining.classifier: trained_run`` with ``mining.classifier_from`` — iWildCam mines its hard samples with
  the FLYP baseline (``iwildcam_flyp``, §3.3).

Such an experiment is part of the config's pipeline: :func:`upstream_of` names it with the config file that
defines it (a YAML in the same folder whose ``experiment`` is that name), :func:`is_trained` looks for its
finished run the way the consuming stage will (run folder first, then MLflow), and ``discl pipeline`` /
``discl rehearse`` train what is missing before the stage that needs it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml

# Which stage reads which upstream setting.
NEEDED_BY = {"training.init_from": ("train", "sweep"), "mining.classifier_from": ("mine",)}


@dataclass(frozen=True)
class Upstream:
    setting: str          # the config key naming it
    experiment: str       # the experiment (with an optional '/<run name>')
    config: Optional[Path]  # the config file defining it (None: no such file next to the config)

    @property
    def stages(self) -> tuple[str, ...]:
        return NEEDED_BY[self.setting]

    @property
    def name(self) -> str:
        return self.experiment.split("/", 1)[0]


def upstream_refs(cfg) -> list[tuple[str, str]]:
    """``[(setting, experiment ref), …]`` the config's stages read."""
    refs = []
    if cfg.training.init_from:
        refs.append(("training.init_from", cfg.training.init_from))
    m = cfg.mining
    if m.mode == "confidence" and m.classifier == "trained_run" and m.classifier_from:
        refs.append(("mining.classifier_from", m.classifier_from))
    return refs


def _experiment_of(path: Path) -> Optional[str]:
    """The ``experiment`` a config file resolves to (following its ``base:`` chain), without validating it."""
    seen = set()
    while path and path not in seen:
        seen.add(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError):
            return None
        if not isinstance(data, dict):
            return None
        if "experiment" in data:
            return data["experiment"]
        base = data.get("base")
        path = (path.parent / base).resolve() if base else None
    return None


def config_for(experiment: str, folder: Path) -> Optional[Path]:
    """The YAML in ``folder`` whose experiment is ``experiment`` (``baseline_*`` first), or None."""
    files = sorted(Path(folder).glob("*.yaml"), key=lambda p: (not p.name.startswith("baseline_"), p.name))
    for path in files:
        if _experiment_of(path) == experiment:
            return path
    return None


def upstream_of(cfg, config_path: Optional[str | Path]) -> list[Upstream]:
    """The config's upstream experiments with the files that define them (looked up beside ``config_path``)."""
    folder = Path(config_path).resolve().parent if config_path else None
    out = []
    for setting, ref in upstream_refs(cfg):
        exp = ref.split("/", 1)[0]
        if exp == cfg.experiment:
            continue            # a baseline's own base settings (iWildCam's FLYP run mines with itself: unused)
        out.append(Upstream(setting, ref, config_for(exp, folder) if folder else None))
    return out


def is_trained(cfg, ref: str) -> bool:
    """Whether a finished run of ``ref`` exists where ``cfg``'s stages will look (run folder, then MLflow)."""
    from discl_ray.training.init_from import resolve_checkpoint

    try:
        resolve_checkpoint(cfg, ref)
    except FileNotFoundError:
        return False
    return True


def upstream_overrides(overrides: list[str]) -> list[str]:
    """The caller's overrides that also apply to an upstream experiment: where things run and are stored
    (run_root, dataset, ray, tracking, cache_dir, …), not what this experiment is (its name, training,
    mining, sweep)."""
    own = ("experiment=", "training.", "mining.", "sweep.", "generation.", "scoring.", "prompts.")
    return [o for o in overrides if not o.startswith(own)]
