"""``training.init_from: <experiment>[/<run name>]``: start from another run's best-on-validation model.

Algorithm 1 fine-tunes a *pretrained* classifier (A.4: LDMLR's ResNet-10, a CE model trained on the long-tail
set). Here the CE baseline run is that model: its config trains on real data only, and every DisCL config of
the dataset names it, so the chain is two commands (``discl train`` the baseline, then the DisCL run).

Resolution, before any worker starts:

1. the run directory ``<run_root>/<experiment>/train/<run>/checkpoint_*/state.pt`` - the newest checkpoint
   of a *finished* run (its state carries ``final``); its ``best_model`` is the model selected on validation;
2. otherwise MLflow: the experiment's finished ``train`` run of that name and its ``checkpoint/model.pt``
   artifact (the same selected model; logged when ``tracking.log_checkpoint`` is on), downloaded once.

Without a run name the experiment must hold exactly one finished run. Anything else is a
``FileNotFoundError`` that says which command produces the missing model.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)


def split_ref(ref: str) -> tuple[str, Optional[str]]:
    exp, _, run = ref.strip().strip("/").partition("/")
    if not exp or "/" in run:
        raise ValueError(f"training.init_from: expected '<experiment>[/<run name>]', got {ref!r}")
    return exp, run or None


def _finished(run_dir: Path) -> Optional[Path]:
    """The newest checkpoint dir of ``run_dir`` holding a finished run's state (names sort by time)."""
    import torch

    for ckpt in sorted(run_dir.glob("checkpoint_*"), reverse=True):
        state_file = ckpt / "state.pt"
        if not state_file.is_file():
            continue
        state = torch.load(state_file, map_location="cpu", weights_only=False)
        if state.get("final") and state.get("best_model"):
            return ckpt
    return None


def _from_run_dir(train_dir: Path, exp: str, run: Optional[str]) -> Optional[Path]:
    if not train_dir.is_dir():
        return None
    runs = [train_dir / run] if run else sorted(p for p in train_dir.iterdir() if p.is_dir())
    done = {p.name: c for p in runs if (c := _finished(p)) is not None}
    if run:
        return done.get(run)
    if len(done) > 1:
        raise ValueError(f"training.init_from: experiment {exp!r} has {len(done)} finished runs; name one: "
                         + ", ".join(f"{exp}/{name}" for name in sorted(done)))
    return next(iter(done.values()), None)


def _from_mlflow(cfg, exp: str, run: Optional[str]) -> Optional[Path]:
    import mlflow

    from discl_ray.runtime import RunPaths, tracking_uri

    try:
        client = mlflow.MlflowClient(tracking_uri=tracking_uri(cfg))
        found = client.get_experiment_by_name(exp)
    except Exception as err:   # an unreachable server is "not found here"; the error below names the fix
        log.warning("training.init_from: MLflow lookup failed: %s", err)
        return None
    if found is None:
        return None
    filt = "tags.stage = 'train' and metrics.best_epoch >= 0" + (f" and tags.run_name = '{run}'" if run else "")
    runs = client.search_runs([found.experiment_id], filter_string=filt, order_by=["attributes.start_time DESC"])
    names = sorted({r.data.tags.get("run_name", r.info.run_id) for r in runs})
    if not run and len(names) > 1:
        raise ValueError(f"training.init_from: experiment {exp!r} has {len(names)} finished runs in MLflow; name "
                         "one: " + ", ".join(f"{exp}/{n}" for n in names))
    for r in runs:
        dest = RunPaths.from_config(cfg).cache / "init_from" / exp / r.info.run_id
        model = dest / "checkpoint" / "model.pt"
        if not model.is_file():
            try:
                client.download_artifacts(r.info.run_id, "checkpoint", str(dest))
            except Exception:      # no checkpoint artifact (tracking.log_checkpoint was off)
                continue
        if model.is_file():
            return model
    return None


def resolve_checkpoint(cfg, ref: str) -> Path:
    """Checkpoint path (run checkpoint dir or ``model.pt``) of the run ``ref`` names; raises when missing."""
    from discl_ray.runtime import RunPaths

    exp, run = split_ref(ref)
    train_dir = RunPaths(root=RunPaths.from_config(cfg).root, experiment=exp, cache=Path()).stage("train")
    found = _from_run_dir(train_dir, exp, run) or (_from_mlflow(cfg, exp, run) if cfg.tracking.enabled else None)
    if found is None:
        what = f"run {run!r} of experiment {exp!r}" if run else f"a finished training run of experiment {exp!r}"
        raise FileNotFoundError(f"training.init_from: {what} not found under {train_dir} or in MLflow; train it "
                                f"first (e.g. discl train --config <its baseline config>, experiment={exp})")
    return found


def resolve_init_from(cfg):
    """``cfg`` with ``training.init_from`` replaced by the resolved ``training.init_checkpoint`` (idempotent)."""
    ref = cfg.training.init_from
    if not ref:
        return cfg
    path = resolve_checkpoint(cfg, ref)
    log.info("training.init_from %s -> %s", ref, path)
    training = cfg.training.model_copy(update={"init_from": None, "init_checkpoint": str(path)})
    return cfg.model_copy(update={"training": training})
