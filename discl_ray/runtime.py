"""Where things run and where they are written: Ray start/join, run directories, MLflow URI.

Layout under ``run_root`` (default ``runs/``)::

    runs/mlflow.db                      MLflow sqlite store (unless MLFLOW_TRACKING_URI is set)
    runs/_cache/                        toy models, materialized datasets shared by experiments
    runs/<experiment>/dataset/          canonical rows (parquet)
    runs/<experiment>/<stage>/…         one folder per stage (mine, prompts, generate, score, train, …)
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from discl_ray.config import ExperimentConfig, RayConfig

log = logging.getLogger(__name__)

# Unix socket paths are limited to 107 bytes; Ray nests ~60 bytes of session path under its temp dir.
_MAX_RAY_TEMP_LEN = 40


@dataclass(frozen=True)
class RunPaths:
    """Resolved output locations of one experiment."""

    root: Path
    experiment: str
    cache: Path

    @classmethod
    def from_config(cls, cfg: "ExperimentConfig") -> "RunPaths":
        root = Path(cfg.run_root).resolve()
        cache = Path(cfg.cache_dir).resolve() if cfg.cache_dir else root / "_cache"
        return cls(root=root, experiment=cfg.experiment, cache=cache)

    @property
    def exp(self) -> Path:
        return self.root / self.experiment

    def stage(self, name: str, *parts: str) -> Path:
        """``runs/<experiment>/<stage>/<parts…>`` (not created)."""
        return self.exp.joinpath(name, *parts)

    @property
    def dataset(self) -> Path:
        return self.stage("dataset")


def tracking_uri(cfg: "ExperimentConfig") -> str:
    """MLflow tracking URI: MLFLOW_TRACKING_URI wins, then the config, then sqlite under run_root."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    if cfg.tracking.tracking_uri:
        return cfg.tracking.tracking_uri
    root = Path(cfg.run_root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def _local_temp_dir(ray_cfg: "RayConfig", run_root: Path) -> Optional[str]:
    if ray_cfg.temp_dir:
        return str(Path(ray_cfg.temp_dir).resolve())
    candidate = run_root / ".ray"
    if len(str(candidate)) <= _MAX_RAY_TEMP_LEN:
        return str(candidate)
    log.info("run root path too long for Ray's unix sockets; using Ray's default temp dir")
    return None


_INIT_LOCK = threading.Lock()


def _log_to_driver() -> bool:
    """Ray's own RAY_LOG_TO_DRIVER switch (set quiet by discl_ray.logs; --verbose turns it back on)."""
    return os.environ.get("RAY_LOG_TO_DRIVER", "1").strip().lower() not in ("0", "false", "no")


def init_ray(cfg: "ExperimentConfig", **kwargs) -> None:
    """Start a local Ray cluster (default) or join ``ray.address``; a no-op when Ray is already up.

    Thread-safe: stages run concurrently from one driver (the quickstart's trainings, ``bench replicate``)
    share one cluster; without the lock two threads could both see Ray down and start two."""
    with _INIT_LOCK:
        _init_ray(cfg, **kwargs)


def _init_ray(cfg: "ExperimentConfig", **kwargs) -> None:
    import ray

    if ray.is_initialized():
        return
    rc = cfg.ray
    address = rc.address or os.environ.get("RAY_ADDRESS")
    env_vars = {"PYTHONPATH": os.pathsep.join(filter(None, [str(Path.cwd()), os.environ.get("PYTHONPATH")]))}
    runtime_env = kwargs.pop("runtime_env", None) or {"env_vars": env_vars}
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=_log_to_driver(), **kwargs)
        return
    # Workers at Ray's default nice 15 starve behind the driver on small machines (measured 3x slower).
    os.environ.setdefault("RAY_worker_niceness", "0")
    temp_dir = _local_temp_dir(rc, Path(cfg.run_root).resolve())
    if temp_dir:
        Path(temp_dir).mkdir(parents=True, exist_ok=True)
        # A stale marker from a cluster that was stopped makes the next init hang.
        stale = Path(temp_dir, "ray_current_cluster")
        stale.unlink(missing_ok=True)
    init_kwargs = dict(num_cpus=rc.num_cpus, num_gpus=rc.num_gpus, include_dashboard=rc.include_dashboard,
                       object_store_memory=rc.object_store_memory, runtime_env=runtime_env,
                       log_to_driver=_log_to_driver())
    if temp_dir:
        init_kwargs["_temp_dir"] = temp_dir
    init_kwargs.update(kwargs)
    ray.init(**init_kwargs)


def resolve_device(device: str) -> str:
    """``auto`` → cuda when available, else cpu."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
