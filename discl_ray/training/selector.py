"""The λ selector: a thin stateful wrapper over ``schedules.py`` that records every choice and gain.

One named Ray actor per run (``discl-selector-<run>``), created by the driver so that it outlives a Train
worker failure. Its state is a plain dict stored in every checkpoint; on resume the trainer calls
``load_state`` with the checkpoint's copy, which drops choices made after that checkpoint (an epoch that
died half-way is chosen again), so the history stays one entry per finished epoch, without gaps.

``choose(epoch, gains)`` is idempotent per epoch: asking twice for the same epoch returns the recorded λ.
"""

from __future__ import annotations

import copy
import logging
import re
from typing import Any, Optional

from discl_ray.errors import UserError
from discl_ray.training.schedules import (
    REAL_ONLY,
    lam_key,
    pick_adaptive,
    scheduled_lam,
)

log = logging.getLogger(__name__)

_STATE_VERSION = 1


class LambdaSelector:
    """Decides each epoch's λ for one run and keeps the history of choices and per-λ gains."""

    def __init__(self, strategy: str, lams: list[float], epochs: int, curriculum_epochs: int,
                 fixed_lam: Optional[float] = None, seed: int = 0):
        from discl_ray.config.training import STRATEGIES

        if strategy not in STRATEGIES:
            raise UserError(f"unknown strategy {strategy!r}; valid: {', '.join(STRATEGIES)}")
        if not lams:
            raise UserError("lams: the λ set must not be empty")
        if not 0 <= curriculum_epochs <= epochs:
            raise UserError(f"curriculum_epochs ({curriculum_epochs}) must lie in [0, epochs={epochs}]")
        self.strategy = strategy
        self.lams = sorted(float(v) for v in lams)
        self.epochs = epochs
        self.curriculum_epochs = curriculum_epochs
        self.fixed_lam = fixed_lam
        self.seed = seed
        self.history: list[dict[str, Any]] = []   # one {"epoch", "lam", "gains"} per chosen epoch

    # -- decisions -------------------------------------------------------------------------------
    def needs_gains(self, epoch: int) -> bool:
        """True when ``choose(epoch)`` needs measured gains (adaptive curriculum epochs not yet chosen)."""
        return (self.strategy == "adaptive" and epoch < self.curriculum_epochs
                and self._recorded(epoch) is None)

    def choose(self, epoch: int, gains: Optional[dict[float, float]] = None) -> float:
        """λ for ``epoch`` (0-based); records it. Adaptive curriculum epochs need ``gains`` {λ: gain}."""
        if not 0 <= epoch < self.epochs:
            raise ValueError(f"epoch {epoch} is outside [0, {self.epochs})")
        done = self._recorded(epoch)
        if done is not None:
            return done["lam"]
        if epoch != len(self.history):
            raise ValueError(f"epoch {epoch} asked out of order: history holds {len(self.history)} epochs "
                             "(restore the checkpoint's selector state first)")
        clean_gains: dict[str, float] = {}
        if self.strategy == "adaptive":
            if epoch >= self.curriculum_epochs:
                lam = REAL_ONLY
            else:
                if not gains:
                    raise ValueError(f"adaptive epoch {epoch}: gains per λ are required")
                unknown = sorted(set(float(k) for k in gains) - set(self.lams))
                if unknown:
                    raise ValueError(f"gains for λ {unknown} not in the λ set {self.lams}")
                lam = pick_adaptive(gains)
                clean_gains = {lam_key(k): float(v) for k, v in gains.items()}
        else:
            lam = scheduled_lam(self.strategy, epoch, epochs=self.epochs,
                                curriculum_epochs=self.curriculum_epochs, lams=self.lams,
                                fixed_lam=self.fixed_lam, seed=self.seed)
        self.history.append({"epoch": epoch, "lam": float(lam), "gains": clean_gains})
        log.info("selector: epoch %d -> λ=%s %s", epoch, lam, clean_gains or "")
        return float(lam)

    def _recorded(self, epoch: int) -> Optional[dict]:
        return self.history[epoch] if epoch < len(self.history) else None

    # -- state -----------------------------------------------------------------------------------
    def lam_history(self) -> list[float]:
        return [h["lam"] for h in self.history]

    def get_history(self) -> list[dict[str, Any]]:
        return copy.deepcopy(self.history)

    def state(self) -> dict[str, Any]:
        """JSON-able state (stored in every checkpoint)."""
        return {"version": _STATE_VERSION, "strategy": self.strategy, "lams": self.lams, "epochs": self.epochs,
                "curriculum_epochs": self.curriculum_epochs, "fixed_lam": self.fixed_lam, "seed": self.seed,
                "history": copy.deepcopy(self.history)}

    def load_state(self, state: dict[str, Any], upto_epoch: Optional[int] = None) -> None:
        """Restore from a checkpoint; keep only epochs ``< upto_epoch`` (the epochs the checkpoint holds)."""
        for key in ("strategy", "lams", "epochs", "curriculum_epochs"):
            if state.get(key) != getattr(self, key):
                raise ValueError(f"selector state was saved with {key}={state.get(key)!r}, this run has "
                                 f"{getattr(self, key)!r}: resume with the same training config")
        hist = copy.deepcopy(state.get("history", []))
        if upto_epoch is not None:
            hist = [h for h in hist if h["epoch"] < upto_epoch]
        if [h["epoch"] for h in hist] != list(range(len(hist))):
            raise ValueError(f"selector history has gaps: epochs {[h['epoch'] for h in hist]}")
        self.history = hist


# Ray actor wrapper: the same class, so the logic is testable without Ray.
def actor_name(run_name: str) -> str:
    """Actor name for a run (characters outside [A-Za-z0-9_.-] replaced)."""
    return "discl-selector-" + re.sub(r"[^A-Za-z0-9_.-]", "_", run_name)


def get_selector(run_name: str, training_cfg, namespace: Optional[str] = None):
    """The run's selector actor, created on first use (``get_if_exists``), CPU-free (num_cpus=0).

    It lives on the driver's node, beside Ray Train's controller (which Ray pins there too): placed anywhere,
    it could land on a worker node and die with it, and every restart of the worker group would then fail at
    the lost selector (tests/test_node_loss.py). The driver's node going away ends the run anyway."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    actor_cls = ray.remote(num_cpus=0, max_restarts=0)(LambdaSelector)
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return actor_cls.options(name=actor_name(run_name), get_if_exists=True, namespace=namespace,
                             lifetime=None, scheduling_strategy=here).remote(
        training_cfg.strategy, list(training_cfg.lams), training_cfg.epochs, training_cfg.curriculum_epochs,
        training_cfg.fixed_lam, training_cfg.seed)
