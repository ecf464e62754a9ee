"""GPU maths of a Train worker: mixed precision, TF32, and the collectives, each on the worker's device.

NCCL (what Ray Train sets up for GPU workers) only moves CUDA tensors: a collective on a CPU tensor raises
"No backend type associated with device type cpu". Every helper here therefore builds its tensor on the
device the model lives on — a CPU tensor under gloo, a CUDA tensor under NCCL — with no special case.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def enable_tf32() -> None:
    """TF32 matmuls and convolutions on Ampere+ GPUs (fp32 storage, ~8x the fp32 matmul rate)."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.set_float32_matmul_precision("high")


class Precision:
    """``training.precision`` on one device: an autocast context and, for fp16, a GradScaler.

    Autocast only on CUDA: on a CPU worker every setting runs fp32 (bf16 CPU autocast is slower than fp32
    on most CPUs and the toy runs must not change)."""

    def __init__(self, name: str, device: str):
        self.name = name
        self.cuda = str(device).startswith("cuda")
        self.dtype = PRECISIONS[name] if self.cuda else None
        self.scaler = torch.amp.GradScaler("cuda") if self.cuda and name == "fp16" else None
        if self.cuda:
            enable_tf32()

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=self.dtype)

    def step(self, loss: torch.Tensor, opt: torch.optim.Optimizer, before_step=None) -> None:
        """backward + optimizer step (scaled for fp16); ``before_step`` runs between them (LR warm-up)."""
        if self.scaler is None:
            loss.backward()
            if before_step:
                before_step()
            opt.step()
            return
        self.scaler.scale(loss).backward()
        if before_step:
            before_step()
        self.scaler.step(opt)
        self.scaler.update()

    def state_dict(self) -> Optional[dict]:
        return self.scaler.state_dict() if self.scaler is not None else None

    def load_state_dict(self, state: Optional[dict]) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)


def allreduce_mean(value: float, device) -> float:
    """Mean of a Python float over ranks; the tensor lives on ``device`` (NCCL needs CUDA tensors)."""
    if not distributed():
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float32, device=device)
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


def allreduce_max(value: float, device) -> float:
    if not distributed():
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def allreduce_sum_array(a: np.ndarray, device) -> np.ndarray:
    """Element-wise sum of every rank's int64 array (e.g. the shards' confusion matrices)."""
    if not distributed():
        return a
    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)).to(device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu().numpy()


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (B, D) of every rank in rank order, differentiable (the global FLYP batch).

    ``torch.distributed.nn`` all_gather sums the gradients of every rank's copy back to its owner in
    backward. Each rank computes the same global loss, so its local features get world × ∂L/∂f; DDP then
    averages parameter gradients over ranks, which leaves exactly ∂L/∂θ of the single-process loss on the
    same global batch (tests/test_training_distributed.py checks loss and gradients)."""
    if not distributed():
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous()), dim=0)


def gather_objects(obj, device) -> list:
    """Every rank's picklable ``obj`` (gloo: CPU, NCCL: through the current CUDA device)."""
    if not distributed():
        return [obj]
    if str(device).startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def worker_device() -> str:
    """This Train worker's torch device: Ray Train's choice, or the CPU (logged) when Ray gave the worker a GPU
    that torch cannot see (a node that declares a GPU resource without a working CUDA driver, or a
    rehearsal's stand-in GPU node) — never a crash on the first ``.to("cuda")``."""
    import ray.train.torch

    device = str(ray.train.torch.get_device())
    if device.startswith("cuda") and not torch.cuda.is_available():
        import logging

        logging.getLogger(__name__).warning(
            "this Train worker holds a GPU but torch sees no CUDA device (driver?); training on the CPU")
        return "cpu"
    return device


def prepare_model(net, device: str, world: int):
    """Ray Train's ``prepare_model`` (device move, DDP), except when :func:`worker_device` fell back to the CPU
    on a GPU worker without CUDA: Ray would move the model to ``cuda`` and build DDP with CUDA device ids, so
    the model stays on the CPU and DDP (gloo) wraps it plainly."""
    import ray.train.torch

    if str(ray.train.torch.get_device()).startswith("cuda") and device == "cpu":
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel

            return DistributedDataParallel(net)
        return net
    return ray.train.torch.prepare_model(net)

