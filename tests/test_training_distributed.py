"""Collectives of the Train worker in a real 2-process group: the FLYP loss over the global batch equals the
single-process loss on the same 2 × B pairs (and so do the DDP-averaged gradients), and every collective
runs on a tensor on the worker's device. gloo on the CPU in the default suite; the same code under NCCL on
two GPUs with ``-m gpu``."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

B, D_IN, D = 4, 12, 8


class TwoTower(nn.Module):
    """Image and caption encoders in one forward (DDP needs one forward per backward)."""

    def __init__(self):
        super().__init__()
        self.img = nn.Linear(D_IN, D)
        self.txt = nn.Linear(D_IN, D)
        self.logit_scale = nn.Parameter(torch.tensor(2.0))

    def forward(self, xi, xt):
        return self.img(xi), self.txt(xt), self.logit_scale.exp()


def global_batch():
    g = torch.Generator().manual_seed(7)
    return torch.randn(2 * B, D_IN, generator=g), torch.randn(2 * B, D_IN, generator=g)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, backend: str, out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from discl_ray.training import distributed as dx
    from discl_ray.training.losses import flyp_loss

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = torch.device(f"cuda:{rank}" if backend == "nccl" else "cpu")
    if backend == "nccl":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, rank=rank, world_size=world)
    seen: list[str] = []

    def recording(fn):
        def wrapper(*args, **kwargs):
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            tensors += [t for a in args if isinstance(a, list) for t in a if isinstance(t, torch.Tensor)]
            seen.extend(str(t.device) for t in tensors)
            return fn(*args, **kwargs)
        return wrapper

    dist.all_reduce = recording(dist.all_reduce)
    dist.all_gather = recording(dist.all_gather)
    torch.manual_seed(0)
    model = DDP(TwoTower().to(device), device_ids=[rank] if backend == "nccl" else None)
    xi, xt = global_batch()
    local = slice(rank * B, (rank + 1) * B)
    img, txt, scale = model(xi[local].to(device), xt[local].to(device))
    loss = flyp_loss(dx.gather_with_grad(img), dx.gather_with_grad(txt), scale)
    loss.backward()
    result = {
        "loss": float(loss.detach()),
        "grads": {k: p.grad.detach().cpu() for k, p in model.module.named_parameters()},
        "mean": dx.allreduce_mean(rank + 1.0, device),
        "max": dx.allreduce_max(10.0 * rank, device),
        "objects": dx.gather_objects({f"bad-{rank}"}, device),
        "devices": seen,
    }
    torch.save(result, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def run_two_ranks(backend: str, tmp_path) -> list[dict]:
    mp.spawn(_rank_main, args=(2, _free_port(), backend, str(tmp_path)), nprocs=2, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]


def check(results: list[dict], device_type: str) -> None:
    from discl_ray.training.losses import flyp_loss

    torch.manual_seed(0)
    ref = TwoTower()
    xi, xt = global_batch()
    img, txt, scale = ref(xi, xt)
    loss = flyp_loss(img, txt, scale)            # one process, the same 2 × B pairs
    loss.backward()
    value = float(loss.detach())
    for res in results:
        assert res["loss"] == pytest.approx(value, abs=1e-5)
        for name, p in ref.named_parameters():
            assert torch.allclose(res["grads"][name], p.grad, atol=1e-5), name
        assert res["mean"] == pytest.approx(1.5) and res["max"] == pytest.approx(10.0)
        assert res["objects"] == [{"bad-0"}, {"bad-1"}]
        # all_gather of the features and the scalar all-reduces: every tensor on the worker's device.
        assert res["devices"] and {d.split(":")[0] for d in res["devices"]} == {device_type}
    # A local-batch loss (each rank contrasting its own B pairs) is a different number: the test can fail.
    local = flyp_loss(img[:B], txt[:B], scale)
    assert abs(float(local.detach()) - value) > 1e-3


def test_flyp_global_batch_and_collectives_gloo(tmp_path):
    check(run_two_ranks("gloo", tmp_path), "cpu")


@pytest.mark.gpu
def test_flyp_global_batch_and_collectives_nccl(tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA devices")
    check(run_two_ranks("nccl", tmp_path), "cuda")
