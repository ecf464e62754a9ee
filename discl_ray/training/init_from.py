"""``training.init_from: <experiment>[/<run name>]``: start from another run's best-on-validation model.

Algorithm 1 fine-tunes a *pretrained* classifier (A.4: LDMLR's ResNet-10, a CE model trained on the long-tail
set). Here the CE baseline run is that model: its config trains on real data only, and every DisCL config of
the dataset names it, so the chain is two commands (``discl train`` the baseline, then the DisCL run).

Resolution, before any worker starts:

1. the run directory ``<run_root>/<experiment>/train/<run>/checkpoint_*/state.pt`` (local or an object-store
   URI) - the newest checkpoint of a *finished* run (its state carries ``final``); its ``best_model`` is the
   model selected on validation (copied into the local cache when the run root is remote);
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


def _train_storage(cfg, exp: str):
    """(filesystem, path) of ``<run_root>/<exp>/train``: local disk or an object store (``s3://``, ``gs://``)."""
    import pyarrow.fs as pafs

    root = str(cfg.run_root)
    if "://" in root:
        return pafs.FileSystem.from_uri(f"{root.rstrip('/')}/{exp}/train")
    return pafs.LocalFileSystem(), str(Path(root).resolve() / exp / "train")


def _children(fs, path: str) -> list[str]:
    import pyarrow.fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(i.path for i in infos if i.type == pafs.FileType.Directory)


def _finished(fs, run_dir: str) -> Optional[tuple[str, dict]]:
    """(path, state) of the newest checkpoint of ``run_dir`` holding a finished run (names sort by time)."""
    import io

    import torch

    for ckpt in reversed([c for c in _children(fs, run_dir) if c.rsplit("/", 1)[-1].startswith("checkpoint_")]):
        try:
            with fs.open_input_file(f"{ckpt}/state.pt") as fh:
                state = torch.load(io.BytesIO(fh.read()), map_location="cpu", weights_only=False)
        except (FileNotFoundError, OSError):
            continue
        if state.get("final") and state.get("best_model"):
            return ckpt, state
    return None


def _from_run_dir(cfg, exp: str, run: Optional[str]) -> Optional[Path]:
    import pyarrow.fs as pafs
    import torch

    fs, base = _train_storage(cfg, exp)
    runs = [f"{base}/{run}"] if run else _children(fs, base)
    done = {r.rsplit("/", 1)[-1]: found for r in runs if (found := _finished(fs, r)) is not None}
    if len(done) > 1:
        raise ValueError(f"training.init_from: experiment {exp!r} has {len(done)} finished runs; name one: "
                         + ", ".join(f"{exp}/{name}" for name in sorted(done)))
    if not done:
        return None
    name, (ckpt, state) = next(iter(done.items()))
    if isinstance(fs, pafs.LocalFileSystem):
        return Path(ckpt)
    # An object store: cache the selected model locally; workers load it by path.
    from discl_ray.runtime import RunPaths

    dest = RunPaths.from_config(cfg).cache / "init_from" / exp / name / "model.pt"
    dest.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state["best_model"], dest)
    return dest


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
    exp, run = split_ref(ref)
    train_dir = _train_storage(cfg, exp)[1]
    found = _from_run_dir(cfg, exp, run) or (_from_mlflow(cfg, exp, run) if cfg.tracking.enabled else None)
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
