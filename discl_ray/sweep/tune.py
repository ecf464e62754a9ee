"""Ray Tune sweeps that drive the curriculum trainer (Ray Train V2) and track every trial in MLflow.

Train V2 cannot be handed to a ``Tuner`` as a trainer; instead each Tune trial is a small *driver function*
that builds the trial's config and calls :func:`discl_ray.training.fit` with a ``TuneReportCallback``, so the
Train workers' per-epoch reports reach Tune (ranking, schedulers) while the trainer keeps its own MLflow child
run. The search space is the YAML ``sweep.space`` (dotted key -> ``{grid|choice|uniform|loguniform|randint}``);
a trial's config is the base config plus its sampled values, validated like a command line, so a bad value
fails with the field named.

    result = run_sweep(load_config("configs/toy/digits_lt.yaml", ["sweep.space={...}"]))

One MLflow parent run per sweep (flattened base params, the space as a param and a JSON artifact, summary
metrics at the end), one child run per trial (logged by the trainer with ``mlflow_parent_run_id``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from discl_ray.config import ExperimentConfig, load_config
from discl_ray.errors import UserError
from discl_ray.runtime.cluster import tracking_uri
from discl_ray.runtime.context import StageContext

if TYPE_CHECKING:
    from ray.tune import ResultGrid

    from discl_ray.runtime.storage import Storage

log = logging.getLogger(__name__)

# Config keys holding local paths: made absolute so trials resolve them the same from any working directory.
from discl_ray.config import ALWAYS_ABSOLUTE, PATH_KEYS, absolute_paths  # noqa: E402,F401  (re-exported)


def to_tune_space(space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """YAML space -> Tune domains: grid -> grid_search, choice, uniform, loguniform, randint [low, high)."""
    from ray import tune

    out: dict[str, Any] = {}
    for key, spec in space.items():
        (kind, vals), = spec.items()
        if kind == "grid":
            out[key] = tune.grid_search(list(vals))
        elif kind == "choice":
            out[key] = tune.choice(list(vals))
        elif kind == "uniform":
            out[key] = tune.uniform(*vals)
        elif kind == "loguniform":
            out[key] = tune.loguniform(*vals)
        elif kind == "randint":
            out[key] = tune.randint(*vals)
        else:  # SweepConfig validates kinds; keep the message in case the schema grows
            raise UserError(f"sweep.space.{key}: unknown kind {kind!r}")
    return out


def trial_overrides(params: dict[str, Any]) -> list[str]:
    """A trial's sampled values as CLI-style overrides (JSON is valid YAML, so types survive)."""
    return [f"{key}={json.dumps(val)}" for key, val in sorted(params.items())]


def sweep_base(cfg: ExperimentConfig, uri: Optional[str]) -> dict:
    """The config data every trial starts from: paths made absolute, the sweep's tracking store, and no upload
    of a trial's weights to MLflow unless ``tracking.log_checkpoint`` says so (its checkpoints stay in its run
    folder)."""
    base = absolute_paths(cfg.model_dump(mode="json"))
    if cfg.tracking.enabled:
        base["tracking"]["tracking_uri"] = uri  # every trial logs to the sweep's store
    if base["tracking"].get("log_checkpoint") is None:
        base["tracking"]["log_checkpoint"] = False
    return base


def trial_config(base: dict, params: dict[str, Any]) -> ExperimentConfig:
    """Base config data + a trial's sampled values, validated (raises ConfigError naming the field)."""
    return load_config(data=base, overrides=trial_overrides(params))


def grid_size(space: dict[str, dict[str, Any]], num_samples: int) -> int:
    """Number of trials Tune will run: grid product × num_samples."""
    return math.prod(len(spec["grid"]) for spec in space.values() if "grid" in spec) * num_samples


def resolve_metric(cfg: ExperimentConfig) -> str:
    """The validation metric trials report: low-quality runs report ``val_f1``, long-tail ``val_acc``."""
    metric = cfg.sweep.metric
    if cfg.training.task == "low_quality" and metric == "val_acc":
        return "val_f1"
    return metric


def trial_resources(cfg: ExperimentConfig) -> dict[str, float]:
    """What one trial holds while running: its driver function plus its Train workers."""
    t = cfg.training
    return {"CPU": cfg.sweep.trial_cpus + t.num_workers * t.cpus_per_worker,
            "GPU": t.num_workers * t.gpus_per_worker}


def max_concurrent(cfg: ExperimentConfig, resources: Optional[dict[str, float]] = None) -> int:
    """``sweep.max_concurrent_trials`` or as many trials as the cluster's CPUs/GPUs hold at once.

    ``sweep.reserve_cpus`` stays free so a Ray Data transform inside a trial always gets a CPU (the 2-core
    deadlock: workers holding every CPU starve Data forever). At least 1, so an autoscaling cluster grows.
    On an autoscaling cluster the resources are those up *now* (often no GPU at all): set
    ``sweep.max_concurrent_trials`` to the GPU count the cluster may grow to.
    """
    if cfg.sweep.max_concurrent_trials:
        return cfg.sweep.max_concurrent_trials
    if resources is None:
        import ray

        resources = ray.cluster_resources()
    need = trial_resources(cfg)
    n = math.floor((resources.get("CPU", 0.0) - cfg.sweep.reserve_cpus) / need["CPU"] + 1e-9)
    if need["GPU"] > 0:
        n = min(n, math.floor(resources.get("GPU", 0.0) / need["GPU"] + 1e-9))
    return max(1, n)


def _trial(params: dict[str, Any], *, base: dict, parent_run_id: Optional[str], storage: str, sweep: str,
           ctx: Optional[StageContext] = None) -> None:
    """One Tune trial: a Train run of the sweep's config with ``params`` applied. ``ctx``: the sweep's context,
    from which the trial derives its own (the run's locations, Ray address and tracking URI carried over)."""
    """The Tune trial: build the trial config and run the trainer, forwarding its reports to Tune."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from discl_ray.training import fit

    # Tune moves trials into their own directory; resolve anything relative from where the sweep started.
    orig = os.environ.get("TUNE_ORIG_WORKING_DIR")
    if orig and Path(orig).is_dir():
        os.chdir(orig)
    cfg = trial_config(base, params)
    trial_ctx = ctx.child(cfg=cfg, stage="train") if ctx is not None else StageContext.open(cfg, "train")
    trial_id = tune.get_context().get_trial_id()
    label = ",".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in sorted(params.items()))
    log.info("trial %s: %s", trial_id, label)
    # The run name names the Train run's folder and selector actor too: keep it path- and actor-safe.
    run_name = f"{sweep}-{trial_id}"
    fit(trial_ctx, run_name=run_name, callbacks=[TuneReportCallback()], mlflow_parent_run_id=parent_run_id,
        storage_path=storage)
    if parent_run_id and cfg.tracking.enabled:
        drop_stale_children(cfg, parent_run_id, run_name, uri=trial_ctx.tracking_uri)


def drop_stale_children(cfg: ExperimentConfig, parent_run_id: str, run_name: str,
                        uri: Optional[str] = None) -> list[str]:
    """Delete the MLflow child runs a killed sweep driver left behind for this trial; returns their ids.

    A trial interrupted before its first checkpoint starts over when the sweep is resubmitted, and the
    trainer opens a new child run: the first attempt's child stays RUNNING forever, a duplicate of the trial.
    Once the trial has a FINISHED child, every other child of that name is such a leftover; it is marked
    KILLED, tagged with the run that replaced it and deleted (restorable with ``mlflow runs restore``)."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri or tracking_uri(cfg))
    exp = client.get_experiment_by_name(cfg.tracking.experiment_name or cfg.experiment)
    if exp is None:
        return []
    runs = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}' and "
                                                   f"tags.mlflow.runName = '{run_name}'")
    finished = [r for r in runs if r.info.status == "FINISHED"]
    if not finished:
        return []
    stale = [r.info.run_id for r in runs if r.info.status != "FINISHED"]
    for run_id in stale:
        client.set_tag(run_id, "discl.superseded_by", finished[0].info.run_id)
        client.set_terminated(run_id, "KILLED")
        client.delete_run(run_id)
        log.info("trial %s: deleted the MLflow child %s left by an interrupted attempt", run_name, run_id)
    return stale


@dataclass
class SweepResult:
    """What a sweep produced: its name and folder, the MLflow parent run, Tune's results."""

    name: str
    path: "Path | Storage"
    parent_run_id: Optional[str]
    results: "ResultGrid"
    num_trials: int
    num_errors: int
    best_params: Optional[dict[str, Any]]
    best_metric: Optional[float]


def run_sweep(ctx: "StageContext | ExperimentConfig", name: Optional[str] = None) -> SweepResult:
    """Run (or resume, when ``runs/<exp>/sweep/<name>`` exists) a Tune sweep over ``cfg.sweep.space``.
    ``ctx``: the stage's context (a bare config opens one); each trial derives its own from it."""
    from discl_ray.runtime import tracking

    ctx = StageContext.of(ctx, "sweep")
    cfg = ctx.cfg
    uri = ctx.tracking_uri
    tracking.check_reachable(uri)  # before any Ray or training work
    name = name or cfg.sweep.name or datetime.now(timezone.utc).strftime("sweep-%Y%m%d-%H%M%S")
    base = sweep_base(cfg, uri)
    ctx = ctx.child(cfg=load_config(data=base))
    for params in _grid_points(cfg.sweep.space):  # a bad grid value fails now, not in trial 7
        trial_config(base, params)
    sweep_dir = ctx.out()   # local folder or object store, one API
    ctx.init_ray()
    if not cfg.tracking.enabled:
        return _summarize(ctx, name, sweep_dir / name, None, _tune(ctx, base, name, sweep_dir, None))
    with _parent_run(ctx, name, sweep_dir / name) as parent_id:
        results = _tune(ctx, base, name, sweep_dir, parent_id)
        return _summarize(ctx, name, sweep_dir / name, parent_id, results)


def _grid_points(space: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    import itertools

    grid = {k: spec["grid"] for k, spec in space.items() if "grid" in spec}
    return [dict(zip(grid, vals, strict=True)) for vals in itertools.product(*grid.values())]


@contextlib.contextmanager
def _parent_run(ctx: StageContext, name: str, path: "Storage") -> Iterator[str]:
    """The sweep's MLflow parent run, open while Tune runs (reopened when resuming; id kept beside Tune's state)."""
    import mlflow

    from discl_ray.runtime import tracking

    cfg = ctx.cfg
    marker = path / "mlflow_parent_run.json"
    if marker.is_file():
        tracking.setup(cfg, ctx.tracking_uri)
        with mlflow.start_run(run_id=json.loads(marker.read_text())["run_id"]) as run:
            yield run.info.run_id
        return
    path.mkdir(parents=True, exist_ok=True)
    space = cfg.sweep.space
    tags = {"sweep.name": name, "sweep.space": json.dumps(space)[:5000]}
    with tracking.run(cfg, "sweep", run_name=name, tags=tags, uri=ctx.tracking_uri, paths=ctx.paths) as run:
        from discl_ray.generation.store import log_store_input

        log_store_input(cfg, "sweep", ctx.paths)
        mlflow.log_dict(space, "sweep_space.json")
        mlflow.log_param("sweep.num_trials", grid_size(space, cfg.sweep.num_samples))
        marker.write_text(json.dumps({"run_id": run.info.run_id}))
        yield run.info.run_id


def _tune(ctx: StageContext, base: dict, name: str, sweep_dir: "Storage", parent_id: Optional[str]) -> "ResultGrid":
    from ray import tune

    cfg = ctx.cfg
    trials_dir = sweep_dir / name / "trials"
    trainable = tune.with_parameters(_trial, base=base, parent_run_id=parent_id, storage=str(trials_dir), sweep=name,
                                     ctx=ctx)
    trainable = tune.with_resources(trainable, {"cpu": cfg.sweep.trial_cpus})
    exp_path = sweep_dir / name
    # Tune gets the project's filesystem client for object stores (endpoint and region from the environment),
    # as the trainer does, so its experiment state lands where the stages write.
    fs = None if sweep_dir.is_local else sweep_dir.fs
    if tune.Tuner.can_restore(exp_path.path, storage_filesystem=fs):
        log.info("resuming sweep %s from %s (finished trials are kept, others rerun)", name, exp_path)
        tuner = tune.Tuner.restore(exp_path.path, trainable=trainable, resume_errored=True, storage_filesystem=fs)
    else:
        n = max_concurrent(cfg)
        log.info("sweep %s: %d trials, up to %d at once", name, grid_size(cfg.sweep.space, cfg.sweep.num_samples), n)
        tuner = tune.Tuner(
            trainable, param_space=to_tune_space(cfg.sweep.space),
            # No metric here: the trainer's last report holds final test metrics only, and Tune rejects a
            # result without its metric. Ranking happens in _summarize over every epoch's report.
            tune_config=tune.TuneConfig(num_samples=cfg.sweep.num_samples, max_concurrent_trials=n,
                                        trial_dirname_creator=lambda t: t.trial_id),
            run_config=tune.RunConfig(name=name, storage_path=sweep_dir.path, storage_filesystem=fs,
                                      failure_config=tune.FailureConfig(max_failures=cfg.sweep.trial_retries),
                                      verbose=1))
    return tuner.fit()


def _summarize(ctx: StageContext, name: str, path: "Storage", parent_id: Optional[str],
               results: "ResultGrid") -> SweepResult:
    """Write ``trials.csv`` and log the sweep's outcome (trials, errors, best) to the parent run."""
    cfg = ctx.cfg
    space_keys = list(cfg.sweep.space)
    best_params, best_metric = None, None
    try:
        metric = resolve_metric(cfg)
        best = results.get_best_result(metric=metric, mode=cfg.sweep.mode, scope="all")
        best_params = {k: best.config.get(k) for k in space_keys}
        df_best = best.metrics_dataframe
        if df_best is not None and metric in df_best:
            col = df_best[metric].dropna()
            best_metric = float(col.max() if cfg.sweep.mode == "max" else col.min())
    except (RuntimeError, ValueError, KeyError):  # no trial reported the metric
        pass
    df = results.get_dataframe()
    csv = df.to_csv(index=False)
    (path / "trials.csv").write_text(csv)           # through discl_ray.runtime.storage: a folder or a bucket
    if parent_id:
        import tempfile

        import mlflow

        client = mlflow.MlflowClient(tracking_uri=ctx.tracking_uri)
        client.log_metric(parent_id, "num_trials", len(results))
        client.log_metric(parent_id, "num_errors", len(results.errors))
        if best_metric is not None:
            client.log_metric(parent_id, f"best_{resolve_metric(cfg)}", float(best_metric))
            client.set_tag(parent_id, "sweep.best_params", json.dumps(best_params)[:5000])
        with tempfile.TemporaryDirectory(prefix="discl-sweep-") as tmp:
            Path(tmp, "trials.csv").write_text(csv)
            client.log_artifact(parent_id, str(Path(tmp, "trials.csv")))
    shown = Path(path.path) if path.is_local else path
    return SweepResult(name=name, path=shown, parent_run_id=parent_id, results=results, num_trials=len(results),
                       num_errors=len(results.errors), best_params=best_params, best_metric=best_metric)
