"""MLflow helpers shared by every stage: URI resolution, reachability check, runs with flat params."""

from __future__ import annotations

import contextlib
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Optional

from discl_ray.config import to_flat_dict
from discl_ray.runtime import tracking_uri

if TYPE_CHECKING:
    from discl_ray.config import ExperimentConfig


class TrackingUnavailable(RuntimeError):
    """The MLflow tracking server named by the URI cannot be reached."""


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast (before any training) when an http(s) tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).read()
    except (urllib.error.URLError, OSError) as err:
        raise TrackingUnavailable(f"MLflow tracking server {uri} cannot be reached ({err}); "
                                  "start it (discl ui) or set MLFLOW_TRACKING_URI / tracking.tracking_uri") from None


def setup(cfg: "ExperimentConfig") -> str:
    """Point MLflow at the experiment's store and experiment; returns the tracking URI."""
    import mlflow

    uri = tracking_uri(cfg)
    check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(cfg.tracking.experiment_name or cfg.experiment)
    return uri


def flat_params(cfg: "ExperimentConfig") -> dict[str, str]:
    """The resolved config flattened to dotted keys, values as strings (MLflow's 500-char limit kept)."""
    return {k: str(v)[:500] for k, v in to_flat_dict(cfg.model_dump(mode="json")).items()}


def git_commit() -> str:
    """The current git commit, or 'unknown' outside a checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def base_tags(cfg: "ExperimentConfig", stage: str) -> dict[str, str]:
    return {"stage": stage, "dataset": cfg.dataset.name, "strategy": cfg.training.strategy,
            "seed": str(cfg.training.seed), "git_commit": git_commit()}


@contextlib.contextmanager
def run(cfg: "ExperimentConfig", stage: str, run_name: Optional[str] = None,
        parent_run_id: Optional[str] = None, tags: Optional[dict[str, Any]] = None,
        log_params: bool = True) -> Iterator[Any]:
    """An MLflow run with flattened config params and standard tags (nested under ``parent_run_id``)."""
    import mlflow

    setup(cfg)
    all_tags = base_tags(cfg, stage) | {k: str(v) for k, v in (tags or {}).items()}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    with mlflow.start_run(run_name=run_name, tags=all_tags) as active:
        if log_params:
            mlflow.log_params(flat_params(cfg))
        yield active
