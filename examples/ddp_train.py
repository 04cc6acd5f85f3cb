"""Data-parallel training of a compiled SNN with torch DistributedDataParallel, launched by torchrun.

    torchrun --nproc_per_node=2 examples/ddp_train.py --quick          # 2 CPU processes (gloo)
    torchrun --nproc_per_node=4 examples/ddp_train.py --epochs 10      # 4 GPUs (nccl), one per process

The compiled model is an ordinary ``nn.Module`` whose parameters are the eager model's, so it goes into
``DistributedDataParallel`` as any model does::

    cmodel = snncc.compile(model, T=4).to(device)
    ddp = torch.nn.parallel.DistributedDataParallel(cmodel, device_ids=[local_rank] if cuda else None)
    loss = F.cross_entropy(ddp(x).mean(0), y); loss.backward()      # gradients all-reduced (averaged)

Each process trains on its shard of the digits (``DistributedSampler``; a per-process batch of
``--batch / world size``, so the global batch is ``--batch``); the gradients DDP averages over the
processes equal those of one process on the whole batch (the loss is a mean over the batch; there is no
train-mode BatchNorm here, whose statistics would be per shard). Rank 0 prints per-epoch loss (averaged
over the processes), test accuracy and time, and at the end checks that every process holds the same
parameters. Backend: nccl on CUDA, gloo on CPU (``--backend`` to override). Run without torchrun, it
trains in a single process (a world of one).
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

if __package__ in (None, ""):   # run as a script: make ``examples`` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import snncc
from examples.common import load_digits_images, seed_everything
from examples.digits_demo import DigitsSNN

__all__ = ["Looping", "main"]


class Looping(nn.Module):
    """The eager baseline as one module (``--mode eager``): reset, T steps on the same input, stack."""

    def __init__(self, step_model: nn.Module, T: int) -> None:
        super().__init__()
        self.net, self.T = step_model, T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        snncc.reset(self.net)
        return torch.stack([self.net(x) for _ in range(self.T)])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="DistributedDataParallel training of snncc.compile(model, T=...) "
                                             "on the digits; launch with torchrun --nproc_per_node=N.")
    ap.add_argument("--epochs", type=int, default=None, help="epochs (default 5; 2 with --quick)")
    ap.add_argument("--batch", type=int, default=None,
                    help="global batch size, split over the processes (default 64; 32 with --quick)")
    ap.add_argument("--T", type=int, default=4, help="timesteps (default 4)")
    ap.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate (default 1e-2)")
    ap.add_argument("--mode", choices=("compiled", "eager"), default="compiled",
                    help="train snncc.compile(model) (default) or the eager loop, both under DDP")
    ap.add_argument("--backend", choices=("auto", "gloo", "nccl"), default="auto",
                    help="process-group backend (auto: nccl on CUDA, gloo on CPU)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="a smoke test: 2 epochs, global batch 32")
    args = ap.parse_args(argv)
    args.epochs = args.epochs or (2 if args.quick else 5)
    args.batch = args.batch or (32 if args.quick else 64)
    for name in ("epochs", "batch", "T"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be >= 1")
    return args


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """Train; returns (on every rank) ``{"world_size", "rank", "accuracy": [per epoch], "loss": [...],
    "epoch_s": [...], "in_sync": bool}``."""
    args = parse_args(argv)
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    cuda = torch.cuda.is_available()
    backend = args.backend if args.backend != "auto" else ("nccl" if cuda else "gloo")
    own_group = not dist.is_initialized()
    if own_group:
        if launched:                    # torchrun set RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
            dist.init_process_group(backend)
        else:                           # plain `python ddp_train.py`: a world of one
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local_rank}") if cuda and backend == "nccl" else torch.device("cpu")
    if cuda and device.type == "cuda":
        torch.cuda.set_device(device)
    if args.batch % world:
        raise SystemExit(f"--batch {args.batch} must be divisible by the number of processes ({world})")
    lead = rank == 0

    try:
        data = load_digits_images(args.seed)
        seed_everything(args.seed)      # the same initial weights on every rank (DDP also broadcasts rank 0's)
        step_model = DigitsSNN(data.classes).to(device)
        model = snncc.compile(step_model, T=args.T) if args.mode == "compiled" else Looping(step_model, args.T)
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        optimizer = torch.optim.Adam(ddp.parameters(), lr=args.lr)
        if lead:
            print(f"snncc {snncc.__version__} | torch {torch.__version__} | world size {world} ({backend}, "
                  f"{device.type}) | {torch.get_num_threads()} threads per process | {args.mode} model under DDP")
            print(f"{data.describe()} | T={args.T}, global batch {args.batch} ({args.batch // world} per process), "
                  f"epochs={args.epochs}, lr={args.lr}, seed={args.seed}", flush=True)

        train = torch.utils.data.TensorDataset(data.x_train, data.y_train)
        sampler = torch.utils.data.distributed.DistributedSampler(train, num_replicas=world, rank=rank,
                                                                  shuffle=True, seed=args.seed, drop_last=True)
        loader = torch.utils.data.DataLoader(train, batch_size=args.batch // world, sampler=sampler, drop_last=True)
        result: Dict[str, Any] = {"world_size": world, "rank": rank, "accuracy": [], "loss": [], "epoch_s": []}
        for epoch in range(1, args.epochs + 1):
            sampler.set_epoch(epoch)
            ddp.train()
            total, batches = torch.zeros((), device=device), 0
            t0 = time.perf_counter()
            for x, y in tqdm(loader, desc=f"epoch {epoch}/{args.epochs}", unit="batch", leave=False,
                             disable=not lead, file=sys.stderr, dynamic_ncols=True):
                x, y = x.to(device), y.to(device)
                optimizer.zero_grad(set_to_none=True)
                loss = nn.functional.cross_entropy(ddp(x).mean(0), y)
                loss.backward()             # DDP all-reduces (averages) the gradients here
                optimizer.step()
                total += loss.detach()
                batches += 1
            seconds = time.perf_counter() - t0
            dist.all_reduce(total)          # mean training loss over all processes
            mean_loss = float(total) / (max(batches, 1) * world)
            # Test accuracy: each process scores a strided shard of the test set; the counts are summed.
            ddp.eval()
            with torch.no_grad():
                xs, ys = data.x_test[rank::world].to(device), data.y_test[rank::world].to(device)
                correct = torch.tensor([float((model(xs).mean(0).argmax(1) == ys).sum())], device=device)
            dist.all_reduce(correct)
            acc = float(correct) / len(data.y_test)
            result["accuracy"].append(acc)
            result["loss"].append(mean_loss)
            result["epoch_s"].append(seconds)
            if lead:
                print(f"epoch {epoch}/{args.epochs} | loss {mean_loss:.4f} | test acc {acc:6.2%} | "
                      f"train {seconds:.2f}s", flush=True)
        # Every process must hold the same parameters (DDP's averaged gradients, the same Adam steps).
        flat = torch.cat([p.detach().flatten() for p in step_model.parameters()])
        ref = flat.clone()
        dist.broadcast(ref, src=0)
        diff = (flat - ref).abs().max().reshape(1)
        dist.all_reduce(diff, op=dist.ReduceOp.MAX)
        result["in_sync"] = bool(diff.item() == 0.0)
        if lead:
            print(f"parameters identical on all {world} processes: {'yes' if result['in_sync'] else 'NO'} "
                  f"(max difference {diff.item():.1e})", flush=True)
        return result
    finally:
        if own_group:
            dist.destroy_process_group()


if __name__ == "__main__":
    res = main()
    sys.exit(0 if res["in_sync"] else 1)
