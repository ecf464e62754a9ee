"""Schemas for the Ray runtime and MLflow tracking."""

from __future__ import annotations

from typing import Optional

from pydantic import Field

from discl_ray.config.base import StrictModel


class RayConfig(StrictModel):
    """Where stages run: a local Ray cluster by default, or an existing one."""

    address: Optional[str] = Field(None, description="None = start a local cluster; 'auto' or 'host:port' = join one.")
    num_cpus: Optional[int] = Field(None, ge=1, description="CPUs of the local cluster (None = all).")
    num_gpus: Optional[int] = Field(None, ge=0, description="GPUs of the local cluster (None = detect).")
    temp_dir: Optional[str] = Field(None, description="Ray temp dir for a local cluster (None = <run_root>/.ray when short enough).")
    include_dashboard: bool = Field(False, description="Start the dashboard with a local cluster.")
    object_store_memory: Optional[int] = Field(None, ge=78643200, description="Object store bytes (None = Ray's default).")


class TrackingConfig(StrictModel):
    """MLflow tracking (sqlite under the run root by default; MLFLOW_TRACKING_URI wins)."""

    enabled: bool = Field(True, description="Log runs to MLflow.")
    tracking_uri: Optional[str] = Field(None, description="None = sqlite:///<run_root>/mlflow.db.")
    experiment_name: Optional[str] = Field(None, description="MLflow experiment (None = the experiment name).")
    log_checkpoint: Optional[bool] = Field(
        None, description="Log the selected model's weights (model.pt) as an MLflow artifact. None (default): yes "
                          "for a single run, no for a sweep's trials (each trial's checkpoints stay in its run "
                          "folder; uploading every trial's weights through the tracking server is not worth it).")
