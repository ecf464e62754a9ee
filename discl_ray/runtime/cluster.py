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
from typing import TYPE_CHECKING, Any, Optional

from discl_ray.errors import UserError
from discl_ray.runtime.storage import Storage, as_storage, is_uri, local_or_storage

if TYPE_CHECKING:
    from discl_ray.config import ExperimentConfig, RayConfig

log = logging.getLogger(__name__)

# Unix socket paths are limited to 107 bytes; Ray nests ~60 bytes of session path under its temp dir.
_MAX_RAY_TEMP_LEN = 40


@dataclass(frozen=True)
class RunPaths:
    """Resolved output locations of one experiment.

    ``root`` is a ``Path`` when ``run_root`` is local and a :class:`~discl_ray.runtime.storage.Storage` when it is an
    object-store URI; :meth:`stage` follows it (a Path-like result for local roots, so callers that use
    Path methods keep working) and :meth:`store` always gives a ``Storage``. ``str()`` of either is the
    path or URI. ``cache`` (model weights, toy models) is always local: libraries load weights from disk.
    """

    root: "Path | Storage"
    experiment: str
    cache: Path

    @classmethod
    def from_config(cls, cfg: "ExperimentConfig") -> "RunPaths":
        root = local_or_storage(cfg.run_root)
        if cfg.cache_dir:
            if is_uri(cfg.cache_dir):
                raise UserError(f"cache_dir must be a local (or mounted) path, not {cfg.cache_dir}")
            cache = Path(cfg.cache_dir).resolve()
        elif isinstance(root, Path):
            cache = root / "_cache"
        else:  # object-store run root: weights still need a local (node or shared-volume) folder
            cache = Path(os.environ.get("DISCL_CACHE_DIR", Path.home() / ".cache" / "discl-ray")).resolve()
        return cls(root=root, experiment=cfg.experiment, cache=cache)

    @property
    def is_local(self) -> bool:
        return isinstance(self.root, Path)

    @property
    def exp(self) -> "Path | Storage":
        return self.root / self.experiment

    def stage(self, name: str, *parts: str) -> "Path | Storage":
        """``runs/<experiment>/<stage>/<parts…>`` (not created)."""
        return self.exp.joinpath(name, *parts)

    def store(self, name: str, *parts: str) -> Storage:
        """:meth:`stage` as a :class:`~discl_ray.runtime.storage.Storage` (what the stages read and write through)."""
        return as_storage(self.stage(name, *parts))

    @property
    def dataset(self) -> "Path | Storage":
        return self.stage("dataset")


class TrackingConfigError(UserError):
    """The tracking settings cannot work where the stage runs (message names the setting)."""


def cluster_address(cfg: "ExperimentConfig") -> Optional[str]:
    """The Ray cluster this driver joins (``ray.address`` or ``RAY_ADDRESS``); None = embedded local cluster
    (also for Ray's own ``local``, which means "start a new local cluster", not "join one")."""
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS") or None
    return None if address == "local" else address


# "not given: resolve it from the config" (None is a resolved address: the embedded local cluster)
_RESOLVE: Any = object()


def tracking_uri(cfg: "ExperimentConfig", address: Optional[str] = _RESOLVE) -> str:
    """MLflow tracking URI: MLFLOW_TRACKING_URI wins, then the config, then sqlite under a local run_root.

    On a cluster (``ray.address`` set) the store must be an ``http(s)`` MLflow server: a sqlite file on
    shared storage corrupts under several writers and a local one is invisible to the other nodes.
    ``address``: the already resolved :func:`cluster_address` (a stage's context passes its own)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking.tracking_uri
    if address is _RESOLVE:
        address = cluster_address(cfg)
    if address and not (uri or "").startswith(("http://", "https://", "databricks")):
        raise TrackingConfigError(
            f"ray.address is set ({address}): tracking.tracking_uri (or MLFLOW_TRACKING_URI) must be an "
            f"http(s) MLflow server, got {uri or 'nothing (the sqlite default)'}; "
            "or set tracking.enabled=false")
    if uri:
        return uri
    if is_uri(cfg.run_root):
        raise TrackingConfigError(f"run_root is an object store ({cfg.run_root}): sqlite cannot live there; set "
                                  "tracking.tracking_uri (or MLFLOW_TRACKING_URI) or tracking.enabled=false")
    root = Path(cfg.run_root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def check_tracking(cfg: "ExperimentConfig") -> None:
    """Raise :class:`TrackingConfigError` now (before cluster work) when tracking is on and cannot work."""
    if cfg.tracking.enabled:
        tracking_uri(cfg)


def _local_temp_dir(ray_cfg: "RayConfig", run_root: "Path | Storage") -> Optional[str]:
    if ray_cfg.temp_dir:
        return str(Path(ray_cfg.temp_dir).resolve())
    if not isinstance(run_root, Path):
        return None
    candidate = run_root / ".ray"
    if len(str(candidate)) <= _MAX_RAY_TEMP_LEN:
        return str(candidate)
    log.info("run root path too long for Ray's unix sockets; using Ray's default temp dir")
    return None


_INIT_LOCK = threading.Lock()


def _log_to_driver() -> bool:
    """Ray's own RAY_LOG_TO_DRIVER switch (set quiet by discl_ray.runtime.logs; --verbose turns it back on)."""
    return os.environ.get("RAY_LOG_TO_DRIVER", "1").strip().lower() not in ("0", "false", "no")


def init_ray(cfg: "ExperimentConfig", *, address: Optional[str] = _RESOLVE, check: bool = True, **kwargs) -> None:
    """Start a local Ray cluster (default) or join ``ray.address``; a no-op when Ray is already up.

    Thread-safe: stages run concurrently from one driver (the quickstart's trainings, ``bench replicate``)
    share one cluster; without the lock two threads could both see Ray down and start two.

    From a non-main thread the start runs on a keeper thread that never exits: Ray's GCS and raylet are
    started with a parent-death signal, which Linux sends when the *thread* that started them ends, so a
    cluster started by a short-lived worker thread died with it (every later call hung on the GCS).

    ``address``: the resolved :func:`cluster_address`, ``check=False``: the tracking settings are checked
    already (a stage's context does both once, :meth:`discl_ray.runtime.context.StageContext.init_ray`)."""
    with _INIT_LOCK:
        if threading.current_thread() is threading.main_thread():
            _init_ray(cfg, address, check, **kwargs)
        else:
            _on_keeper_thread(lambda: _init_ray(cfg, address, check, **kwargs))


def _on_keeper_thread(fn) -> None:
    """Run ``fn`` on a daemon thread that then waits for the life of the process; re-raise its error."""
    box: dict = {}
    ready = threading.Event()

    def run() -> None:
        try:
            fn()
        except BaseException as err:  # noqa: BLE001 — handed to the caller
            box["error"] = err
        ready.set()
        threading.Event().wait()      # keep the processes this thread started alive

    threading.Thread(target=run, name="discl-ray-keeper", daemon=True).start()
    ready.wait()
    if "error" in box:
        raise box["error"]


# Environment a driver forwards to its workers: object-store endpoints and regions, the tracking server and
# the weights cache. On a local cluster workers inherit them anyway; on a joined cluster they would not.
FORWARD_ENV_PREFIXES = ("AWS_", "GOOGLE_", "GCS_", "HF_", "MLFLOW_TRACKING_", "DISCL_CACHE_DIR")
# Never forwarded: a job's runtime env is stored in the cluster's GCS in plain text and readable by anyone who
# holds the cluster token. Credentials reach workers from the nodes' own environment (a Kubernetes Secret on
# the pod spec, workload identity, the shell that ran `ray start`): docs/cluster.md, "Secrets".
SECRET_ENV_WORDS = ("SECRET", "TOKEN", "PASSWORD", "ACCESS_KEY", "CREDENTIAL", "SESSION", "_KEY_ID", "API_KEY")


def is_secret_env(name: str) -> bool:
    upper = name.upper()
    return any(word in upper for word in SECRET_ENV_WORDS)


def job_env_vars() -> dict[str, str]:
    """Env vars the surrounding Ray job's runtime env already sets ({} outside a Ray job).

    Ray refuses a ``ray.init(runtime_env=…)`` that sets any of them again ("Failed to merge the Job's runtime
    env"), even to the same value; the job's values reach every worker anyway."""
    import json

    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return {}
    try:
        runtime_env = (json.loads(raw) or {}).get("runtime_env") or {}
    except ValueError:
        return {}
    return dict(runtime_env.get("env_vars") or {})


def forwarded_env(secrets: bool = False) -> dict[str, str]:
    """What this driver hands its workers: the forwardable settings, minus whatever the Ray job around it
    (``discl submit``, a RayJob) already sets, and minus secrets unless ``secrets`` (this process's own local
    cluster: nothing leaves the machine, and workers then see credentials set after Ray started)."""
    already = job_env_vars()
    return {k: v for k, v in os.environ.items()
            if k.startswith(FORWARD_ENV_PREFIXES) and (secrets or not is_secret_env(k)) and k not in already}


def driver_runtime_env(joined: bool = True) -> dict:
    """The ``runtime_env`` of this driver's ``ray.init``: PYTHONPATH (this checkout) and :func:`forwarded_env`
    (secrets only to a local cluster this process starts), leaving out every key the surrounding Ray job's
    runtime env sets."""
    already = job_env_vars()
    env_vars = dict(forwarded_env(secrets=not joined))
    if "PYTHONPATH" not in already:
        env_vars["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path.cwd()), os.environ.get("PYTHONPATH")]))
    return {"env_vars": env_vars}


def pin_loopback() -> None:
    """Make a Ray cluster started by this process advertise 127.0.0.1, not the machine's network address.

    Ray reads ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` once at import (0 = loopback node IP on Linux too); the
    env var reaches the raylet and workers, and the already-imported constant is set for this process."""
    if os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == "1":
        return  # the operator asked for a network-visible local cluster
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray._private.ray_constants as rc

    rc.ENABLE_RAY_CLUSTER = False


def init_local_ray(**kwargs) -> None:
    """Start this process's own local Ray cluster, pinned to 127.0.0.1: the one place the project calls
    ``ray.init`` for a cluster it starts (stages, benchmarks). Joining a running cluster by address is
    :func:`init_ray`'s business; tests/test_loopback.py fails on any other ``ray.init`` in the package.

    ``address`` is always ``"local"``: never a cluster some other ``ray start`` left running."""
    import ray

    address = kwargs.pop("address", "local")
    if address != "local":
        raise ValueError(f"init_local_ray starts a local cluster; address={address!r} joins one (use init_ray)")
    pin_loopback()
    ray.init(address="local", **kwargs)


def _init_ray(cfg: "ExperimentConfig", address: Optional[str], check: bool, **kwargs) -> None:
    import ray

    if address is _RESOLVE:
        address = cluster_address(cfg)
    if check and cfg.tracking.enabled:
        tracking_uri(cfg, address)
    if ray.is_initialized():
        return
    rc = cfg.ray
    runtime_env = kwargs.pop("runtime_env", None) or driver_runtime_env(joined=bool(address))
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=_log_to_driver(), **kwargs)
        return
    pin_loopback()
    # Workers at Ray's default nice 15 starve behind the driver on small machines (measured 3x slower).
    os.environ.setdefault("RAY_worker_niceness", "0")
    temp_dir = _local_temp_dir(rc, local_or_storage(cfg.run_root))
    if temp_dir:
        Path(temp_dir).mkdir(parents=True, exist_ok=True)
        # A stale marker from a cluster that was stopped makes the next init hang.
        stale = Path(temp_dir, "ray_current_cluster")
        stale.unlink(missing_ok=True)
    # address="local": always this process's own cluster, never one some other `ray start` left running
    init_kwargs = dict(address="local", num_cpus=rc.num_cpus, num_gpus=rc.num_gpus,
                       include_dashboard=rc.include_dashboard, object_store_memory=rc.object_store_memory,
                       runtime_env=runtime_env, log_to_driver=_log_to_driver())
    if temp_dir:
        init_kwargs["_temp_dir"] = temp_dir
    init_kwargs.update(kwargs)
    init_local_ray(**init_kwargs)


def resolve_device(device: str, what: str = "") -> str:
    """``auto`` → cuda when this process sees a GPU, else cpu (logged, so a CPU fallback is never silent).

    Call it where the work runs (inside the actor), never on the driver: a cluster's head has no GPU."""
    if device != "auto":
        return device
    import torch

    if torch.cuda.is_available():
        return "cuda"
    log.warning("%sdevice auto: no CUDA device visible in this process; falling back to CPU",
                f"{what}: " if what else "")
    return "cpu"


def actor_info(device: str) -> dict:
    """Where this Ray actor runs: ``{node_id, resources, device}`` (recorded in the stage summaries)."""
    import ray

    ctx = ray.get_runtime_context()
    res = {k: float(v) for k, v in ctx.get_assigned_resources().items()}
    return {"node_id": ctx.get_node_id(), "actor_id": ctx.get_actor_id(), "resources": res, "device": device}


def actor_record(device: str) -> str:
    """:func:`actor_info` as JSON inside a Ray actor; "" elsewhere (in-process runs, tests)."""
    import json

    try:
        import ray

        if ray.is_initialized() and ray.get_runtime_context().get_actor_id():
            return json.dumps(actor_info(device), sort_keys=True)
    except Exception as err:  # noqa: BLE001 — bookkeeping must never fail a stage
        log.debug("no actor info: %s", err)
    return ""


def actor_gpus(cfg: "ExperimentConfig", device: str, per_actor: float, what: str,
               address: Optional[str] = _RESOLVE) -> float:
    """GPUs a stage's actors ask Ray for: ``per_actor`` whenever ``device`` is not cpu.

    No check against the cluster's current GPUs: on an autoscaling cluster the GPU group may be at zero
    when the job starts, and asking is what makes the autoscaler add nodes. One exception keeps the
    embedded local cluster usable on a laptop: ``device: auto`` there, with no GPU in it, asks for none
    (the actor then resolves ``auto`` to CPU and logs it)."""
    if device == "cpu" or not per_actor:
        return 0
    if address is _RESOLVE:
        address = cluster_address(cfg)
    if device == "auto" and not address:
        import ray

        if not ray.cluster_resources().get("GPU"):
            log.info("%s: device auto on a local cluster without GPUs: actors run on CPU", what)
            return 0
    return per_actor
