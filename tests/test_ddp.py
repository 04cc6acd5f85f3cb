"""A compiled model under torch DistributedDataParallel: 2 CPU processes (gloo), each on half of a fixed
batch, get the gradients of one process on the whole batch (compiled and eager).

Why this holds: the loss is a mean over the batch, so the full-batch gradient is the average of the two
half-batch gradients, which is what DDP's all-reduce computes. The model has no train-mode BatchNorm: its
statistics would be those of each half batch, not of the full batch (DDP does not synchronize them; that
is what ``SyncBatchNorm`` is for), so the outputs themselves would differ. Its BatchNorm is in eval mode:
running statistics are buffers, which DDP broadcasts from rank 0 at every forward; the compiled module
shares them with the model, so this exercises that path too.
"""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import snncc

T, N, WORLD = 4, 8, 2


def make_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), snncc.LIF(surrogate_function=snncc.surrogate.ATan()),
        nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(6 * 4 * 4, 16), snncc.LIF(tau=1.5, surrogate_function=snncc.surrogate.Sigmoid()),
        nn.Linear(16, 3),
    ).double()
    with torch.no_grad():       # non-trivial running statistics, so that eval-mode BN does something
        model[1].running_mean.uniform_(-0.2, 0.2)
        model[1].running_var.uniform_(0.5, 1.5)
        model[5].weight.mul_(4.0)       # so that the second LIF layer fires
    model.train()
    model[1].eval()
    return model


def batch():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(N, 1, 8, 8, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, 3, (N,), generator=g)
    return x, y


def loss_of(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(out.mean(0), y)         # mean over the batch


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        model = make_model()
        ddp = nn.parallel.DistributedDataParallel(snncc.compile(model, T=T))
        x, y = batch()
        half = N // WORLD
        xs, ys = x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half]
        loss_of(ddp(xs), ys).backward()
        grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
        torch.save({"grads": grads, "buffers": {k: v.clone() for k, v in model.named_buffers()}},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reference(compiled: bool, rows: slice = slice(None)):
    model = make_model()
    x, y = batch()
    x, y = x[rows], y[rows]
    if compiled:
        out = snncc.compile(model, T=T)(x)
    else:
        snncc.reset(model)
        out = torch.stack([model(x) for _ in range(T)])
    loss_of(out, y).backward()
    return model, {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_ddp_gradients_equal_full_batch(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    model_c, compiled = _reference(compiled=True)
    _, eager = _reference(compiled=False)
    # not vacuous: every parameter gets a non-zero gradient (both LIF layers fire and pass gradient)
    assert all(g.abs().max() > 0 for g in compiled.values())
    for name in compiled:
        torch.testing.assert_close(compiled[name], eager[name], rtol=1e-9, atol=1e-12)
        for r in range(WORLD):
            torch.testing.assert_close(ranks[r]["grads"][name], compiled[name], rtol=1e-9, atol=1e-12,
                                       msg=lambda m: f"rank {r}, grad of {name}: {m}")
    # ... and that equality is DDP's doing: one half batch alone gives other gradients
    _, half = _reference(compiled=True, rows=slice(0, N // WORLD))
    assert any(not torch.allclose(half[name], compiled[name]) for name in compiled)
    # DDP's buffer broadcast left the (eval-mode) BatchNorm statistics as they were
    for k, v in model_c.named_buffers():
        for r in range(WORLD):
            assert torch.equal(ranks[r]["buffers"][k], v), k
