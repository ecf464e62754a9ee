"""Driver side: build the Ray Train V2 ``TorchTrainer`` for an experiment and run it.

    metrics = fit(ctx, run_name="lt-d2s-s0")      # final metrics of the run (ctx: the stage's context)

A run is identified by (storage_path, run_name): calling ``fit`` again with both unchanged — after a killed
driver, for instance — restores Ray Train's checkpoint manager from storage and continues from the last
checkpoint; worker failures are retried in-process up to ``training.max_failures`` times.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Optional

from discl_ray.errors import UserError
from discl_ray.runtime.io import stable_seed
from discl_ray.training.selector import get_selector

log = logging.getLogger(__name__)

# Ray Train's controller collects one report per poll of its workers, every 2 s by default, and a worker's
# next ``ray.train.report`` waits until the previous one is collected: with sub-second epochs the poll, not
# training, sets the pace (a 40-epoch toy run spent 68 of its 100 s blocked in reports; see
# docs/benchmarks/train.md). Ray passes the variable from the driver's environment to the controller when
# ``trainer.fit()`` starts; a value the user exported wins.
CONTROLLER_POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
CONTROLLER_POLL_S = 0.2
# Ray Train starts a preemption-watcher actor beside every run's controller (one more worker process, with its
# imports: ~1.5 CPU-s on 2 cores) to drain nodes a cloud provider reclaims. A cluster this driver started itself
# is this machine alone, with nothing to reclaim; a joined cluster (ray.address, RAY_ADDRESS) keeps Ray's
# default. A value the user exported wins either way.
PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"


def default_run_name(cfg) -> str:
    """Deterministic per config, so rerunning an identical (interrupted) job resumes it instead of duplicating."""
    spec = json.dumps({k: cfg.model_dump(mode="json")[k] for k in ("dataset", "training", "scoring", "experiment")},
                      sort_keys=True)
    return f"train-{cfg.training.strategy}-s{cfg.training.seed}-{stable_seed(spec) % 16**8:08x}"


def default_storage(cfg, paths=None) -> str:
    """``<run_root>/<experiment>/train`` (``paths``: the run's locations when the caller has them)."""
    from discl_ray.runtime.cluster import RunPaths

    path = (paths or RunPaths.from_config(cfg)).stage("train")
    path.mkdir(parents=True, exist_ok=True)       # a no-op on object stores (no directories there)
    return str(path)


def check_run_name(run_name: str) -> str:
    """Ray Train's controller writes the run name into ASCII-only places and fails mid-start otherwise."""
    if not run_name.isascii() or "/" in run_name:
        raise UserError(f"run name {run_name!r}: use ASCII characters and no '/' (e.g. 'lam0' for 'λ=0')")
    return run_name


def check_data_cpus(cfg, cluster_cpus: float, *, joined: bool = False, paths=None) -> bool:
    """A streamed run needs CPU left for its Ray Data decode tasks beside the Train workers: with every CPU
    held by the workers, the stream never starts and training waits forever.

    On the embedded local cluster (this machine, all of it up now) that is certain: fail up front. A joined
    cluster (``ray.address``) may have an autoscaler: what is up now says nothing about what the run will get
    (a GPU group scaled to zero has no CPUs until the workers' demand adds nodes, and those bring their own
    CPUs), so there it only warns. Returns whether the CPUs up now are short."""
    from discl_ray.training.images import will_stream

    tc = cfg.training
    held = tc.num_workers * tc.cpus_per_worker
    if not will_stream(cfg, paths) or held + tc.data_cpus <= cluster_cpus + 1e-9:
        return False
    need = (f"training streams its images through Ray Data, which needs training.data_cpus={tc.data_cpus} CPU "
            f"beside the {tc.num_workers} Train worker(s) × training.cpus_per_worker={tc.cpus_per_worker}, but "
            f"the cluster has {cluster_cpus:g} CPUs")
    if joined:
        log.warning("%s up now; going on: an autoscaler adds nodes for the run's demand (on a fixed-size cluster "
                    "the stream would wait: lower cpus_per_worker or raise training.image_cache_mb)", need)
        return True
    raise UserError(f"{need}: lower cpus_per_worker (fractions are fine) or raise training.image_cache_mb")


def build_trainer(ctx, *, run_name: Optional[str] = None, callbacks: Optional[list] = None,
                  mlflow_parent_run_id: Optional[str] = None, storage_path: Optional[str] = None,
                  fault: Optional[dict] = None, torch_threads: Optional[int] = None, trace: Optional[str] = None):
    """The ``TorchTrainer`` for the stage context ``ctx`` (or a bare config) plus its selector actor (Ray must
    be initialised).

    ``fault`` = {"epoch": e, "marker": path[, "rank": r]} makes one worker exit mid-epoch once (tests of
    restarts); ``trace`` = a directory where every rank writes the image ids it trained on per epoch and
    attempt (tests of the stream). Neither is set by the CLI."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from discl_ray.runtime.context import StageContext
    from discl_ray.training.loop import SELECTION_RANK, train_loop_per_worker

    ctx = StageContext.of(ctx, "train")
    cfg = ctx.cfg
    tc = cfg.training
    check_data_cpus(cfg, ray.cluster_resources().get("CPU", 0.0), joined=bool(ctx.address), paths=ctx.paths)
    os.environ.setdefault(CONTROLLER_POLL_ENV, str(CONTROLLER_POLL_S))
    if not ctx.address:
        os.environ.setdefault(PREEMPTION_WATCHER_ENV, "0")
    run_name = check_run_name(run_name or default_run_name(cfg))
    from discl_ray.runtime.storage import as_storage

    # Local folders absolute (trials run elsewhere); object stores through the project's filesystem client
    # (endpoint and region from the environment), so Ray Train writes checkpoints where the stages write.
    where = as_storage(storage_path or default_storage(cfg, ctx.paths))
    storage, storage_fs = (where.path, None) if where.is_local else (where.path, where.fs)
    selector = get_selector(run_name, tc)
    resources = {"CPU": tc.cpus_per_worker}
    if tc.gpus_per_worker:
        resources["GPU"] = tc.gpus_per_worker
    loop_config: dict[str, Any] = {
        "cfg": cfg.model_dump(mode="json"), "run_name": run_name, "parent_run_id": mlflow_parent_run_id,
        "namespace": ray.get_runtime_context().namespace, "fault": fault, "trace": trace,
        "torch_threads": torch_threads or max(1, int(tc.cpus_per_worker)),
        # where each rank records the node, resources and device it runs on (discl rehearse's "where it ran")
        "workers_dir": str(where / run_name / "workers"),
    }
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend=None if tc.dist_backend == "auto" else tc.dist_backend),
        scaling_config=ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.gpus_per_worker > 0,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=run_name, storage_path=storage, storage_filesystem=storage_fs,
                             callbacks=callbacks or None,
                             failure_config=FailureConfig(max_failures=tc.max_failures),
                             # Ranked by validation improvements (loop.SELECTION_RANK); the latest
                             # checkpoint is always kept besides the best num_to_keep.
                             checkpoint_config=CheckpointConfig(num_to_keep=tc.num_to_keep,
                                                                checkpoint_score_attribute=SELECTION_RANK,
                                                                checkpoint_score_order="max")),
    )
    return trainer, selector


def fit(ctx, *, run_name: str | None = None, callbacks: list | None = None,
        mlflow_parent_run_id: str | None = None, storage_path: str | None = None) -> dict:
    """Run curriculum training for the stage context ``ctx`` (or a bare config, which opens one) on Ray Train and
    return the final metrics (selected on validation)."""
    from discl_ray.config import resolve_paths
    from discl_ray.runtime.context import StageContext

    ctx = StageContext.of(ctx, "train")
    if run_name:
        check_run_name(run_name)
    # workers run in Ray's trial directories: relative run_root would point there
    ctx = ctx.child(cfg=resolve_paths(ctx.cfg))
    from discl_ray.training.init_from import resolve_init_from

    uri = ctx.tracking_uri if ctx.cfg.tracking.enabled else None
    # training.init_from -> the named run's best checkpoint, or a clear error now
    ctx = ctx.child(cfg=resolve_init_from(ctx.cfg, uri=uri, paths=ctx.paths))
    if uri:
        from discl_ray.runtime.tracking import check_reachable

        check_reachable(uri)   # fail before any training when the server is down
    from discl_ray.data import materialize
    from discl_ray.training.data import preflight

    preflight(ctx.cfg, ctx.paths)
    materialize(ctx.cfg, paths=ctx.paths)          # canonical rows written once here, not raced by the workers
    ctx.init_ray()
    if ctx.cfg.training.prepared_images:
        from discl_ray.training.images import will_stream

        if will_stream(ctx.cfg, ctx.paths):
            from discl_ray.training.prepared import prepare_real_images

            prepare_real_images(ctx.cfg, ctx.paths)   # once, before the workers; a current copy is reused
    trainer, selector = build_trainer(ctx, run_name=run_name, callbacks=callbacks,
                                      mlflow_parent_run_id=mlflow_parent_run_id, storage_path=storage_path)
    return dict(run_trainer(trainer, selector).metrics or {})


def run_trainer(trainer, selector):
    """Fit ``trainer``, always releasing the run's λ selector actor; re-raise a training error."""
    import ray

    try:
        result = trainer.fit()
    finally:
        ray.kill(selector)
    if result.error:
        raise result.error
    return result
