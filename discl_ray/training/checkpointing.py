"""Checkpoint layout of a training run (one directory per checkpoint epoch, persisted by ``ray.train.report``).

``state.pt`` holds everything a restarted worker needs to continue without gaps: model and optimizer
state (and the fp16 GradScaler's), the last finished epoch, the best validation value with its epoch and
checkpoint name, the selector actor's state (strategy, λ set, history of choices and gains), the per-epoch
metrics and the MLflow run id.

Checkpoints are written at the epochs ``is_checkpoint_epoch`` names (``training.checkpoint_every``) and at
every epoch that improves the validation metric, named ``checkpoint_epoch<NNNN>_a<attempt start>``; Ray Train keeps
``training.num_to_keep`` of them ranked by that metric (``CheckpointConfig(checkpoint_score_attribute)``)
plus always the latest, so the selected model is read back from storage at the end instead of being held
as a second copy in memory and in every checkpoint. The final checkpoint (``checkpoint_final_a<start>``) holds the
selected model. A restarted worker re-runs the epochs after the last checkpoint, which reproduce exactly
(every random draw of an epoch is seeded by the run seed and the epoch).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch

from discl_ray.errors import MissingInput

STATE_FILE = "state.pt"


def is_checkpoint_epoch(epoch: int, epochs: int, every: int) -> bool:
    """Whether ``epoch`` (0-based) of ``epochs`` ends with a checkpoint: the first epoch (it pins the run's
    MLflow run id early), every ``every``-th epoch and the last one."""
    return epoch == 0 or (epoch + 1) % max(1, every) == 0 or epoch == epochs - 1


def cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def save(model: torch.nn.Module, opt: Optional[torch.optim.Optimizer], **state: Any):
    """Write ``state.pt`` to a fresh temp dir and wrap it as a Ray ``Checkpoint`` (caller reports it)."""
    from ray.train import Checkpoint

    tmp = Path(tempfile.mkdtemp(prefix="discl-ckpt-"))
    payload = dict(state, model=cpu_state(model), optimizer=opt.state_dict() if opt is not None else None)
    torch.save(payload, tmp / STATE_FILE)
    return Checkpoint.from_directory(str(tmp))


def cleanup(checkpoint) -> None:
    """Remove the local temp dir of a checkpoint once ``ray.train.report`` has persisted it."""
    if checkpoint is not None and Path(checkpoint.path).name.startswith("discl-ckpt-"):
        shutil.rmtree(checkpoint.path, ignore_errors=True)


def read_state(checkpoint) -> dict[str, Any]:
    """The ``state.pt`` payload of a Ray checkpoint (empty dict for None)."""
    if checkpoint is None:
        return {}
    with checkpoint.as_directory() as d:
        return torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=False)


def restore(checkpoint, model: torch.nn.Module, opt: Optional[torch.optim.Optimizer]) -> dict[str, Any]:
    """Load model/optimizer from ``checkpoint`` in place; returns the rest of the state ({} when fresh)."""
    state = read_state(checkpoint)
    if state:
        model.load_state_dict(state.pop("model"))
        opt_state = state.pop("optimizer", None)
        if opt is not None and opt_state is not None:
            opt.load_state_dict(opt_state)
    return state


def save_model_file(model: torch.nn.Module, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(cpu_state(model), path)
    return path


def load_model_state(path: str) -> dict[str, torch.Tensor]:
    """Weights for ``training.init_checkpoint``: a ``model.pt`` state dict or a run checkpoint directory, on
    local disk or an object store (read where this runs, through ``discl_ray.runtime.storage``)."""
    from discl_ray.runtime.storage import as_storage, is_uri

    if is_uri(path):
        import io

        src = as_storage(path)
        state_file = src.join(STATE_FILE)
        if state_file.is_file():
            state = torch.load(io.BytesIO(state_file.read_bytes()), map_location="cpu", weights_only=False)
            return state.get("best_model") or state["model"]
        if not src.is_file():
            raise MissingInput(f"training.init_checkpoint: {path} is neither a model.pt nor a checkpoint dir")
        return torch.load(io.BytesIO(src.read_bytes()), map_location="cpu", weights_only=True)
    p = Path(path)
    if p.is_dir():
        if (p / STATE_FILE).is_file():
            state = torch.load(p / STATE_FILE, map_location="cpu", weights_only=False)
            return state.get("best_model") or state["model"]
        p = p / "model.pt"
    if not p.is_file():
        raise MissingInput(f"training.init_checkpoint: {path} is neither a model.pt nor a checkpoint dir")
    return torch.load(p, map_location="cpu", weights_only=True)
