"""``training.init_from: <experiment>[/<run name>]``: start from another run's best-on-validation model.

Algorithm 1 fine-tunes a *pretrained* classifier (A.4: LDMLR's ResNet-10, a CE model trained on the long-tail
set). Here the CE baseline run is that model: its config trains on real data only, and every DisCL config of
the dataset names it, so the chain is two commands (``discl train`` the baseline, then the DisCL run).

Resolution, before any worker starts:

1. the run directory ``<run_root>/<experiment>/train/<run>/checkpoint_final_*/state.pt`` (local or an
   object-store URI) - the final checkpoint of a *finished* run (its state carries ``final``); its ``model`` is
   the model selected on validation (the trainer writes it there, see ``loop.Worker.selected_model``). The
   resolved ``training.init_checkpoint`` is that folder's path or URI: every worker reads it through
   ``discl_ray.runtime.storage`` where it runs, never from a copy in the driver's node-local cache;
2. otherwise MLflow: the experiment's finished ``train`` run of that name and its ``checkpoint/model.pt``
   artifact (the same selected model; logged when ``tracking.log_checkpoint`` is on), copied once into this
   experiment's run folder (``init_from/``, through ``discl_ray.runtime.storage``).

Without a run name the experiment must hold exactly one finished run. Anything else is a
``FileNotFoundError`` that says which command produces the missing model.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from discl_ray.errors import MissingInput, UserError

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"     # checkpointing.STATE_FILE (not imported: that module imports torch at once)


def split_ref(ref: str) -> tuple[str, Optional[str]]:
    exp, _, run = ref.strip().strip("/").partition("/")
    if not exp or "/" in run:
        raise UserError(f"training.init_from: expected '<experiment>[/<run name>]', got {ref!r}")
    return exp, run or None


def _train_storage(cfg, exp: str):
    """``<run_root>/<exp>/train`` as a :class:`~discl_ray.runtime.storage.Storage` (local disk or an object store)."""
    from discl_ray.runtime.storage import as_storage

    return as_storage(cfg.run_root).join(exp, "train")


def _children(where) -> list:
    """The folders directly under ``where`` (a Storage), sorted by name."""
    import pyarrow.fs as pafs

    infos = where.fs.get_file_info(pafs.FileSelector(where.path, allow_not_found=True))
    return sorted((where.join(i.base_name) for i in infos if i.type == pafs.FileType.Directory),
                  key=lambda s: s.path)


def selected_model(state: dict) -> Optional[dict]:
    """The selected weights in a checkpoint's state: the trainer's final checkpoint keeps them as ``model``
    (``Worker.selected_model``); checkpoints of older versions kept them as ``best_model`` beside the last
    epoch's ``model``, so that key wins where it exists."""
    return state.get("best_model") or state.get("model")


def _finished(run_dir) -> Optional[tuple]:
    """(checkpoint Storage, state) of the newest checkpoint of ``run_dir`` holding a finished run: its state
    carries ``final`` (the trainer's ``checkpoint_final_a<n>``) and the selected model. Names sort by time
    within a kind, and ``checkpoint_final_*`` after every ``checkpoint_epoch*``."""
    import io

    import torch

    # The trainer's per-epoch checkpoints (checkpoint_epoch<NNNN>_a<n>) never carry ``final``: not read at all
    # (on an object store each would be a download of the model and its optimizer state).
    ckpts = [c for c in _children(run_dir) if c.name.startswith("checkpoint_")
             and not c.name.startswith("checkpoint_epoch")]
    ckpts.sort(key=lambda c: (c.name.startswith("checkpoint_final"), c.name))
    for ckpt in reversed(ckpts):
        try:
            state = torch.load(io.BytesIO(ckpt.join(STATE_FILE).read_bytes()), map_location="cpu",
                               weights_only=False)
        except (FileNotFoundError, OSError):
            continue
        if state.get("final") and selected_model(state):
            return ckpt, state
    return None


def _from_run_dir(cfg, exp: str, run: Optional[str]) -> Optional[str]:
    """The finished run's final checkpoint folder: a local path, or its object-store URI. Workers read it
    where they run (``checkpointing.load_model_state`` reads URIs through ``discl_ray.runtime.storage``), never from
    a copy in the driver's node-local cache."""
    base = _train_storage(cfg, exp)
    runs = [base.join(run)] if run else _children(base)
    done = {r.name: found for r in runs if (found := _finished(r)) is not None}
    if len(done) > 1:
        raise UserError(f"training.init_from: experiment {exp!r} has {len(done)} finished runs; name one: "
                         + ", ".join(f"{exp}/{name}" for name in sorted(done)))
    if not done:
        return None
    ckpt, _state = next(iter(done.values()))
    return str(ckpt)


def _from_mlflow(cfg, exp: str, run: Optional[str], uri: Optional[str] = None, paths=None) -> Optional[str]:
    """The run's ``checkpoint/model.pt`` artifact, copied once into this experiment's run folder
    (``<run_root>/<experiment>/init_from/<exp>/<run id>/model.pt``, local or object store) so every worker, on
    any node, reads the same file."""
    import tempfile

    import mlflow

    from discl_ray.runtime.cluster import RunPaths, tracking_uri

    try:
        client = mlflow.MlflowClient(tracking_uri=uri or tracking_uri(cfg))
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
        raise UserError(f"training.init_from: experiment {exp!r} has {len(names)} finished runs in MLflow; name "
                         "one: " + ", ".join(f"{exp}/{n}" for n in names))
    paths = paths or RunPaths.from_config(cfg)
    for r in runs:
        dest = paths.store("init_from", exp, r.info.run_id, "model.pt")
        if dest.is_file():
            return str(dest)
        with tempfile.TemporaryDirectory(prefix="discl-init-from-") as tmp:
            try:
                client.download_artifacts(r.info.run_id, "checkpoint", tmp)
            except Exception:      # no checkpoint artifact (tracking.log_checkpoint was off)
                continue
            model = Path(tmp, "checkpoint", "model.pt")
            if model.is_file():
                dest.write_bytes(model.read_bytes())
                return str(dest)
    return None


def resolve_checkpoint(cfg, ref: str, *, uri: Optional[str] = None, paths=None) -> str:
    """Where the weights of the run ``ref`` names are: its final checkpoint folder or a ``model.pt``, as a local
    path or an object-store URI (``checkpointing.load_model_state`` reads either); raises when missing.
    ``uri``, ``paths``: the stage's tracking URI and run locations, when the caller has them resolved."""
    exp, run = split_ref(ref)
    found = _from_run_dir(cfg, exp, run) or (_from_mlflow(cfg, exp, run, uri, paths) if cfg.tracking.enabled
                                             else None)
    if found is None:
        what = f"run {run!r} of experiment {exp!r}" if run else f"a finished training run of experiment {exp!r}"
        raise MissingInput(f"training.init_from: {what} not found under {_train_storage(cfg, exp)} or in "
                                f"MLflow; train it first (e.g. discl train --config <its baseline config>, "
                                f"experiment={exp})")
    return found


def resolve_init_from(cfg, *, uri: Optional[str] = None, paths=None):
    """``cfg`` with ``training.init_from`` replaced by the resolved ``training.init_checkpoint`` (idempotent)."""
    ref = cfg.training.init_from
    if not ref:
        return cfg
    path = resolve_checkpoint(cfg, ref, uri=uri, paths=paths)
    log.info("training.init_from %s -> %s", ref, path)
    training = cfg.training.model_copy(update={"init_from": None, "init_checkpoint": path})
    return cfg.model_copy(update={"training": training})
