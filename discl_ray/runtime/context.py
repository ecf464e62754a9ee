"""The stage context: what one stage run knows about where it runs, resolved once where the stage starts.

    ctx = StageContext.open(cfg, "generate")     # discl_ray.cli.stage.run_stage does this for every stage
    ctx.out("spectrum")                          # runs/<experiment>/generate/spectrum (a Storage)
    ctx.input("mine")                            # runs/<experiment>/mine
    ctx.init_ray()                               # start or join the cluster (idempotent)
    fit(ctx.child(cfg=trial_cfg, stage="train")) # a sweep trial: same run root, other settings

Before it, every layer rebuilt the run's locations (``RunPaths.from_config``), the MLflow URI and the Ray
address from the whole config: one ``discl generate`` resolved the same paths ten times. The context resolves
each once per stage; drivers take ``ctx``, and what they call takes the few values it uses (``paths``,
``uri``, ``address``). Ray actors, Data functions and Train workers still get only a config section and
strings (a context holds a live filesystem client and is built where the driver runs).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from discl_ray.runtime.cluster import RunPaths, cluster_address, init_ray, tracking_uri
from discl_ray.runtime.storage import Storage, is_uri

if TYPE_CHECKING:
    from discl_ray.config import ExperimentConfig


def _place(cfg: "ExperimentConfig") -> tuple:
    """What :class:`RunPaths` depends on, with local paths made absolute (``runs`` and ``/x/runs`` agree)."""
    def norm(p: Optional[str]) -> Optional[str]:
        return p if not p or is_uri(p) else str(Path(p).resolve())

    return norm(cfg.run_root), cfg.experiment, norm(cfg.cache_dir)


@dataclass(frozen=True)
class StageContext:
    """One stage run: its config, its name, the run's locations, the Ray cluster it uses and its MLflow store.

    Frozen: a stage that needs other settings (a sweep trial, the trainer's resolved paths) derives a
    :meth:`child`, which reuses whatever the change leaves valid."""

    cfg: "ExperimentConfig"
    stage: str
    paths: RunPaths
    address: Optional[str] = None       # the Ray cluster to join; None = this process's own local cluster
    # the tracking URI once resolved (see :attr:`tracking_uri`); not part of equality
    _uri: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def open(cls, cfg: "ExperimentConfig", stage: str) -> "StageContext":
        """Resolve the run's locations and Ray address for ``stage``; the MLflow URI is resolved on first use
        (the preflight of a tracked stage, :meth:`init_ray`), so a stage that never logs never needs one."""
        return cls(cfg=cfg, stage=stage, paths=RunPaths.from_config(cfg), address=cluster_address(cfg))

    @classmethod
    def of(cls, ctx_or_cfg: "StageContext | ExperimentConfig", stage: str) -> "StageContext":
        """``ctx`` itself, or a context opened for a bare config (callers that predate the context: tests,
        benchmarks, notebooks)."""
        return ctx_or_cfg if isinstance(ctx_or_cfg, StageContext) else cls.open(ctx_or_cfg, stage)

    @property
    def tracking_uri(self) -> str:
        """The MLflow tracking URI (``MLFLOW_TRACKING_URI``, then ``tracking.tracking_uri``, then sqlite under a
        local run root), resolved on first use and then kept for the stage."""
        if "uri" not in self._uri:
            self._uri["uri"] = tracking_uri(self.cfg, address=self.address)
        return self._uri["uri"]

    def out(self, *parts: str) -> Storage:
        """This stage's output folder (or a file or folder under it), as a Storage."""
        return self.paths.store(self.stage, *parts)

    def input(self, stage: str, *parts: str) -> Storage:
        """Another stage's folder of this experiment (``dataset``, ``mine``, ``generate`` …), as a Storage."""
        return self.paths.store(stage, *parts)

    @property
    def cache(self) -> Path:
        return self.paths.cache

    def init_ray(self, **kwargs) -> None:
        """Start this stage's local Ray cluster or join :attr:`address`; a no-op when Ray is up."""
        if self.cfg.tracking.enabled:
            self.tracking_uri  # noqa: B018 — a cluster needs an http(s) store: say so before any work
        init_ray(self.cfg, address=self.address, check=False, **kwargs)

    def child(self, *, cfg: Optional["ExperimentConfig"] = None, stage: Optional[str] = None) -> "StageContext":
        """The same run with another config or stage name (a sweep trial, a train run with resolved paths).

        Locations, Ray address and tracking URI are carried over where the new config leaves them as they
        were, and resolved again only where it changes them."""
        new = cfg if cfg is not None else self.cfg
        same_place = _place(new) == _place(self.cfg)
        paths = self.paths if same_place else RunPaths.from_config(new)
        same_ray = new.ray.address == self.cfg.ray.address
        address = self.address if same_ray else cluster_address(new)
        # the URI stays when nothing it depends on changed, or when the new config names the resolved URI itself
        # (a sweep pins its trials to the sweep's store)
        same_store = _place(new)[0] == _place(self.cfg)[0] and (
            new.tracking.tracking_uri in (self.cfg.tracking.tracking_uri, self._uri.get("uri")))
        uri = dict(self._uri) if same_ray and same_store else {}
        return replace(self, cfg=new, stage=stage or self.stage, paths=paths, address=address, _uri=uri)

