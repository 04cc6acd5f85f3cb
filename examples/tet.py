"""TET (temporal efficient training, seed 003) with VGGSNN or ResNet19 written in step mode, compiled.

TET (Deng et al., ICLR 2022) trains every timestep's output to classify, with the loss
``(1 - lamb) * mean_t CE(out[t], y) + lamb * MSE(out, means)`` (:func:`snncc.losses.tet_loss`), and uses
a LIF neuron ``mem = 0.5 mem + x``, spike ``[mem > 1]``, hard reset to 0, with the triangle (ZIF)
surrogate ``max(0, gamma - |x|) / gamma^2``: in snncc terms ``LIF(tau=2, decay_input=False, v_reset=0,
surrogate_function=Triangle(1.0))``.

The two networks of TET's code, written one timestep per call (TET's multi-step ``SeqToANNContainer``
wrappers are what snncc's ``batch_over_time`` pass does by itself):

* ``VGGSNN`` (for DVS frames ``2 x 48 x 48``, or any ``C x S x S`` with S a multiple of 16):
  [conv-BN-LIF 64, 128, avgpool] [256, 256, avgpool] [512, 512, avgpool] [512, 512, avgpool] -> linear.
* ``ResNet19``: conv-BN-LIF 64, then BasicBlocks of 128 x 3, 256 x 3 (stride 2), 512 x 2 (stride 2),
  global average pool, linear 256, LIF, linear.

``--width`` scales every channel count (``--quick`` uses 1/16). BatchNorm runs per timestep, as step mode
does (TET normalizes over T * N at once): see the README's contract.

Images (digits, CIFAR-10) are fed at every step: ``snncc.compile(model, T=T)``; event frames (synthetic
gestures) are a sequence: ``snncc.compile(model, sequence=True)``.

    python examples/tet.py --quick                      # VGGSNN on digits, < 1 min on 2 CPU cores
    python examples/tet.py --model resnet19 --quick
    python examples/tet.py --model vggsnn --data gestures --T 8 --epochs 10
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import sys
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import nn

if __package__ in (None, ""):   # run as a script: make ``examples`` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import snncc
from snncc.losses import tet_loss
from examples.common import (Data, eager_loop, load_cifar10, load_digits_images, load_gestures,
                             make_contenders, plot_curves, run_training, seed_everything)

__all__ = ["tet_lif", "ConvBNLIF", "VGGSNN", "BasicBlock", "ResNet19", "build_model", "main"]


def tet_lif(gamma: float = 1.0) -> snncc.LIF:
    """TET's ``LIFSpike`` (decay 0.5, threshold 1, hard reset to 0, ZIF surrogate of width ``gamma``)."""
    return snncc.LIF(tau=2.0, decay_input=False, v_threshold=1.0, v_reset=0.0,
                     surrogate_function=snncc.surrogate.Triangle(alpha=gamma))


def _w(channels: int, width: float) -> int:
    return max(1, int(round(channels * width)))


class ConvBNLIF(nn.Sequential):
    """TET's ``Layer``: conv3x3 -> BatchNorm -> LIF, one timestep."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__(nn.Conv2d(cin, cout, 3, stride, 1), nn.BatchNorm2d(cout), tet_lif())


class VGGSNN(nn.Module):
    """TET's VGGSNN, one timestep per call: input ``[N, C, S, S]`` (S a multiple of 16), output ``[N, classes]``."""

    PLAN: Sequence[Any] = (64, 128, "P", 256, 256, "P", 512, 512, "P", 512, 512, "P")

    def __init__(self, in_channels: int = 2, classes: int = 10, size: int = 48, width: float = 1.0) -> None:
        super().__init__()
        if size % 16:
            raise ValueError(f"VGGSNN: the input size must be a multiple of 16 (four 2x2 poolings), got {size}")
        layers: List[nn.Module] = []
        c = in_channels
        for item in self.PLAN:
            if item == "P":
                layers.append(nn.AvgPool2d(2))
            else:
                layers.append(ConvBNLIF(c, _w(item, width)))
                c = _w(item, width)
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c * (size // 16) ** 2, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


class BasicBlock(nn.Module):
    """TET's ResNet BasicBlock: conv-BN-LIF, conv-BN, + shortcut, LIF (its own LIF modules, since in step
    mode a neuron module holds its layer's state)."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.lif1 = tet_lif()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.lif2 = tet_lif()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.lif1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.lif2(out + identity)


class ResNet19(nn.Module):
    """TET's ResNet19 ([3, 3, 2] BasicBlocks of 128, 256, 512 channels), one timestep per call."""

    def __init__(self, in_channels: int = 3, classes: int = 10, width: float = 1.0) -> None:
        super().__init__()
        c0 = _w(64, width)
        self.conv1 = nn.Conv2d(in_channels, c0, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c0)
        self.lif1 = tet_lif()
        blocks: List[nn.Module] = []
        c = c0
        for channels, n, stride in ((128, 3, 1), (256, 3, 2), (512, 2, 2)):
            for i in range(n):
                blocks.append(BasicBlock(c, _w(channels, width), stride if i == 0 else 1))
                c = _w(channels, width)
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(c, _w(256, width))
        self.lif_fc = tet_lif()
        self.fc2 = nn.Linear(_w(256, width), classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.lif1(self.bn1(self.conv1(x)))
        x = torch.flatten(self.pool(self.layers(x)), 1)
        return self.fc2(self.lif_fc(self.fc1(x)))


def build_model(name: str, data: Data, width: float) -> nn.Module:
    shape = data.x_train.shape[2:] if data.sequence else data.x_train.shape[1:]
    if name == "vggsnn":
        return VGGSNN(shape[0], data.classes, shape[-1], width)
    return ResNet19(shape[0], data.classes, width)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="TET training of VGGSNN / ResNet19 (step mode) with snncc.compile.")
    ap.add_argument("--model", choices=("vggsnn", "resnet19"), default="vggsnn")
    ap.add_argument("--data", choices=("digits", "gestures", "cifar10"), default="digits",
                    help="digits (built in, static images), gestures (synthetic DVS frames, a sequence), "
                         "cifar10 (needs --cifar-root)")
    ap.add_argument("--cifar-root", default=None, help="directory of CIFAR-10's python pickles")
    ap.add_argument("--T", type=int, default=None, help="timesteps (default 4; 8 frames for gestures)")
    ap.add_argument("--epochs", type=int, default=None, help="epochs (default 5; 2 with --quick)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=None,
                    help="Adam learning rate (default: TET's 1e-3; 1e-2 with --quick)")
    ap.add_argument("--lamb", type=float, default=1e-3, help="TET's MSE weight lambda (default 1e-3)")
    ap.add_argument("--means", type=float, default=1.0, help="TET's MSE target (default 1.0)")
    ap.add_argument("--width", type=float, default=None,
                    help="channel multiplier (default 1 = TET's widths; 1/16 with --quick)")
    ap.add_argument("--train-size", type=int, default=None, help="use only this many training samples")
    ap.add_argument("--test-size", type=int, default=None, help="use only this many test samples")
    ap.add_argument("--no-eager", action="store_true", help="train the compiled model only")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=".", help="directory for the plot (default: current directory)")
    ap.add_argument("--plot", default=None, help="plot file (default: <out>/tet_<model>.png)")
    ap.add_argument("--quick", action="store_true",
                    help="a smoke test: width 1/16, T=2, 2 epochs, lr 1e-2, 320 training / 120 test samples "
                         "(16x16 gesture frames)")
    args = ap.parse_args(argv)
    if args.quick:
        args.width = args.width or 1 / 16
        args.T = args.T or 2
        args.epochs = args.epochs or 2
        args.lr = args.lr or 1e-2
        args.train_size = args.train_size or 320
        args.test_size = args.test_size or 120
    args.width = args.width or 1.0
    args.epochs = args.epochs or 5
    args.lr = args.lr or 1e-3
    args.T = args.T or (8 if args.data == "gestures" else 4)
    for name in ("epochs", "batch", "T"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be >= 1")
    if args.data == "cifar10" and not args.cifar_root:
        ap.error("--data cifar10 needs --cifar-root DIR")
    return args


def load_data(args: argparse.Namespace) -> Data:
    if args.data == "cifar10":
        return load_cifar10(args.cifar_root, args.train_size, args.test_size)
    if args.data == "gestures":
        size = 16 if args.quick else 48      # TET's DVS input is 48 x 48
        return load_gestures(args.train_size or 800, args.test_size or 200, classes=4, size=size,
                             frames=args.T, seed=args.seed, events_per_sample=1000 if args.quick else 4000)
    size = 16 if args.model == "vggsnn" else 8     # VGGSNN pools 4 times
    subset = None
    if args.train_size or args.test_size:
        subset = max(math.ceil((args.train_size or 0) / 0.75), math.ceil((args.test_size or 0) / 0.25))
    data = load_digits_images(args.seed, subset=subset, size=size)
    data.x_train, data.y_train = data.x_train[:args.train_size], data.y_train[:args.train_size]
    data.x_test, data.y_test = data.x_test[:args.test_size], data.y_test[:args.test_size]
    return data


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """Train; returns ``{"results": {"eager"|"compiled": {"accuracy", "loss", "train_s", "eval_s",
    "warmup_s"}}, "plot": path or None, "model": name, "form": "T=..." or "sequence"}``."""
    args = parse_args(argv)
    seed_everything(args.seed)
    data = load_data(args)
    seed_everything(args.seed)
    model = build_model(args.model, data, args.width)
    n_params = sum(p.numel() for p in model.parameters())
    if data.sequence:
        form, compile_fn = "sequence", (lambda m: snncc.compile(m, sequence=True))
        eager_run, prepare = (lambda m: eager_loop(m)), (lambda x: x.transpose(0, 1))
    else:
        form, compile_fn = f"T={args.T}", (lambda m: snncc.compile(m, T=args.T))
        eager_run, prepare = (lambda m: eager_loop(m, args.T)), None
    print(f"snncc {snncc.__version__} | torch {torch.__version__} | {torch.get_num_threads()} threads | "
          f"{platform.machine()} | {datetime.date.today()}")
    print(f"{data.describe()} | {args.model} (width {args.width:g}, {n_params} parameters), "
          f"snncc.compile(model, {'sequence=True' if data.sequence else form}) | TET loss lamb={args.lamb}, "
          f"means={args.means} | T={args.T}, batch={args.batch}, epochs={args.epochs}, lr={args.lr}, seed={args.seed}")

    def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return tet_loss(out, y, means=args.means, lamb=args.lamb)

    contenders = make_contenders(model, compile_fn, eager_run, args.lr, loss_fn, lambda out: out.mean(0),
                                 eager=not args.no_eager, prepare=prepare)
    results = run_training(contenders, data, args.epochs, args.batch, args.seed, label=args.model)
    plot = args.plot or os.path.join(args.out, f"tet_{args.model}.png")
    written = plot_curves({args.model: {k: r["accuracy"] for k, r in results.items()}}, plot,
                          f"TET, {args.model} on {data.name}")
    if written:
        print(f"plot: {written}")
    return {"results": results, "plot": written, "model": args.model, "form": form, "data": data.name}


if __name__ == "__main__":
    main()
    sys.exit(0)
