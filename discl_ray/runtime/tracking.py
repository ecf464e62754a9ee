"""MLflow helpers shared by every stage: URI resolution, reachability check, runs with flat params."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from discl_ray.config import to_flat_dict
from discl_ray.errors import ServiceLost, UserError
from discl_ray.runtime.cluster import tracking_uri

if TYPE_CHECKING:
    from discl_ray.config import ExperimentConfig
    from discl_ray.runtime.cluster import RunPaths


class TrackingUnavailable(ServiceLost):
    """The MLflow tracking server named by the URI cannot be reached."""


def check_reachable(uri: str, timeout: float = 5.0, patience: Optional[float] = None) -> None:
    """Fail fast (before any training) when an http(s) tracking server is not there.

    Nothing listening (connection refused, an unknown host, an HTTP error other than 502-504) fails at once.
    A server that takes the connection but does not answer within ``timeout`` is busy, not gone (a cold start,
    or a small machine running several jobs at once): it is asked again until ``patience`` seconds have passed,
    by default MLflow's own request timeout (``MLFLOW_HTTP_REQUEST_TIMEOUT``, 120 s), so this check is never
    stricter than the MLflow client that follows it.
    """
    if not uri.startswith(("http://", "https://")):
        return
    if patience is None:
        patience = float(os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT") or 120)
    deadline = time.monotonic() + patience
    while True:
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as resp:
                resp.read()
            return
        except (urllib.error.URLError, OSError) as err:
            reason = err.reason if isinstance(err, urllib.error.URLError) else err
            busy = isinstance(reason, TimeoutError) or (isinstance(err, urllib.error.HTTPError)
                                                        and err.code in (502, 503, 504))
            if not busy or time.monotonic() + timeout > deadline:
                raise TrackingUnavailable(f"MLflow tracking server {uri} cannot be reached ({reason}); start it "
                                          "(discl ui) or set MLFLOW_TRACKING_URI / tracking.tracking_uri") from None
            print(f"MLflow tracking server {uri} is slow to answer ({reason}); asking again for up to "
                  f"{deadline - time.monotonic():.0f} s", file=sys.stderr, flush=True)
            time.sleep(1.0)


def artifact_root(cfg: "ExperimentConfig", uri: Optional[str] = None) -> Optional[str]:
    """Where a local (sqlite) store keeps artifacts: ``<run_root>/mlartifacts``; a server decides itself.

    Without this MLflow puts artifacts in ``./mlruns`` of whatever directory the process runs in (a Tune
    trial directory, a Ray worker's cwd), scattering them away from the run root.
    """
    uri = uri or tracking_uri(cfg)
    if uri.startswith(("http://", "https://", "databricks")):
        return None
    return str(Path(cfg.run_root).resolve() / "mlartifacts")


# MLflow 3's UI opens an experiment without this tag as a GenAI "traces" overview; with it, as the runs table
# of a model-training experiment (the value the UI writes when a user picks "custom model development").
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
# Stages whose runs show the datasets they trained on (the runs table's "Dataset" column).
DATASET_STAGES = ("train", "sweep")
# Stages whose runs name the spectrum store they read or wrote (an input ``<dataset>-spectrum-store``).


def ensure_experiment(uri: str, name: str, artifacts: Optional[str] = None) -> str:
    """The id of MLflow experiment ``name`` (tagged as a model-training experiment), created with
    ``artifacts/<name>`` as its artifact location."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(name)
    if exp is None:
        location = Path(artifacts, name).as_uri() if artifacts else None
        try:
            return client.create_experiment(name, artifact_location=location,
                                            tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except mlflow.exceptions.MlflowException:  # created concurrently by another trial
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:     # made by an older version or by hand
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return exp.experiment_id


def use_uri(uri: str) -> None:
    """Point this process's MLflow client at ``uri`` without touching ``MLFLOW_TRACKING_URI``.

    ``mlflow.set_tracking_uri`` also exports the env var, which :func:`discl_ray.runtime.cluster.tracking_uri` reads
    as the user's choice: a second experiment in the same process would then log into the first one's store."""
    import os

    import mlflow

    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


# Stages run side by side in threads of one process (the quickstart's two tasks, `discl bench replicate`): MLflow's
# active experiment is process-wide, so :func:`run` opens each run with its experiment's id, one opening at a time.
# Only the opening is serialised; the runs themselves (a whole training) go on at once, each in its own thread's
# active-run stack. Stages in one process share one tracking URI (MLflow's client URI is process-wide too).
_OPENING = threading.RLock()


def _setup(cfg: "ExperimentConfig", uri: Optional[str]) -> tuple[str, str]:
    import mlflow

    uri = uri or tracking_uri(cfg)
    check_reachable(uri)
    use_uri(uri)
    name = cfg.tracking.experiment_name or cfg.experiment
    experiment_id = ensure_experiment(uri, name, artifact_root(cfg, uri))
    mlflow.set_experiment(experiment_id=experiment_id)
    return uri, experiment_id


def setup(cfg: "ExperimentConfig", uri: Optional[str] = None) -> str:
    """Point MLflow at the experiment's store and experiment; returns the tracking URI (``uri``: the stage's
    resolved one, else resolved from ``cfg``)."""
    with _OPENING:
        return _setup(cfg, uri)[0]


def ui_command(uri: str, port: int = 5000, host: str = "127.0.0.1", artifacts: Optional[str] = None,
               workers: int = 1) -> list[str]:
    """The ``mlflow server`` command line serving ``uri`` (a SQL store) on ``host:port``.

    The host defaults to loopback: the UI has no authentication, so reach it through an SSH tunnel or
    ``kubectl port-forward``, never by binding a public interface.
    """
    if uri.startswith(("http://", "https://")):
        raise UserError(f"tracking URI {uri} is already a server; open it in a browser instead of 'discl ui'")
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", host,
           "--port", str(port), "--workers", str(workers)]
    if artifacts:
        cmd += ["--artifacts-destination", artifacts]
    return cmd


def wait_until_up(url: str, timeout: float = 90.0, proc: Optional[subprocess.Popen] = None) -> None:
    """Poll ``url`` until it answers 200 (MLflow's server takes ~15 s to start on a small machine)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode} before answering at {url}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")


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


def _metadata_frame(directory: Path, keep: Optional[tuple[str, ...]] = None):
    """The non-binary columns of a parquet directory as a DataFrame (never the image bytes)."""
    import pyarrow as pa
    import pyarrow.dataset as pads

    from discl_ray.runtime.io import parquet_files

    files = parquet_files(directory)
    if not files:
        return None
    ds = pads.dataset([str(f) for f in files], format="parquet")
    cols = [f.name for f in ds.schema if not pa.types.is_binary(f.type) and not pa.types.is_large_binary(f.type)
            and (keep is None or f.name in keep)]
    return ds.to_table(columns=cols).to_pandas()


def dataset_inputs(cfg: "ExperimentConfig", paths: "Optional[RunPaths]" = None) -> list[tuple[Any, str]]:
    """``(mlflow Dataset, context)`` for the real rows and, for a curriculum, the scored synthetic spectrum.

    Metadata only (ids, labels, splits, λ, seeds, CLIP scores): MLflow stores the schema, row count and a
    digest, so two runs trained on the same data show the same dataset digest in the runs table."""
    import mlflow.data

    from discl_ray.runtime.cluster import RunPaths

    paths = paths or RunPaths.from_config(cfg)
    out = []
    real = _metadata_frame(paths.dataset)
    if real is not None:
        out.append((mlflow.data.from_pandas(real, source=str(paths.dataset), targets="label",
                                            name=f"{cfg.dataset.name}-real"), "training"))
    if cfg.training.strategy != "none":
        spec = _metadata_frame(paths.stage("generate", "spectrum"),
                               ("image_id", "source_image_id", "label", "lam", "seed"))
        scores = _metadata_frame(paths.stage("score", "scores"), ("image_id", "clip_text_cos"))
        if spec is not None:
            if scores is not None:
                spec = spec.merge(scores, on="image_id", how="left")
            out.append((mlflow.data.from_pandas(spec.sort_values("image_id", ignore_index=True),
                                                source=str(paths.stage("generate", "spectrum")), targets="label",
                                                name=f"{cfg.dataset.name}-synthetic"), "synthetic"))
    return out


def log_dataset_inputs(cfg: "ExperimentConfig", paths: "Optional[RunPaths]" = None) -> int:
    """Log :func:`dataset_inputs` to the active run; returns how many were logged (0 on any failure:
    bookkeeping never stops a training)."""
    import logging

    import mlflow

    try:
        inputs = dataset_inputs(cfg, paths)
        for ds, context in inputs:
            mlflow.log_input(ds, context=context)
        return len(inputs)
    except Exception as err:  # noqa: BLE001 - unreadable inputs must not fail the run they describe
        logging.getLogger(__name__).warning("could not log dataset inputs to MLflow: %s", err)
        return 0


@contextlib.contextmanager
def run(cfg: "ExperimentConfig", stage: str, run_name: Optional[str] = None,
        parent_run_id: Optional[str] = None, tags: Optional[dict[str, Any]] = None,
        log_params: bool = True, uri: Optional[str] = None, paths: "Optional[RunPaths]" = None) -> Iterator[Any]:
    """An MLflow run with flattened config params and standard tags (nested under ``parent_run_id``).

    ``uri`` and ``paths``: the stage's resolved tracking URI and locations (its context), else from ``cfg``."""
    import mlflow

    all_tags = base_tags(cfg, stage) | {k: str(v) for k, v in (tags or {}).items()}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    with _OPENING:      # the experiment id is passed, not read from MLflow's process-wide active experiment
        _, experiment_id = _setup(cfg, uri)
        opened = mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=all_tags)
    with opened as active:
        if log_params:
            mlflow.log_params(flat_params(cfg))
        if stage in DATASET_STAGES:
            log_dataset_inputs(cfg, paths)
        yield active
