"""Seed 001's surrogate-gradient study, eager and compiled.

The notebook trains its ``BasicCSNN`` ([conv -> LIF -> maxpool] x 2 -> linear -> LIF -> linear, T = 8,
the same image fed at every step, SpikingJelly ``LIFNode`` neurons, the mean of the T outputs as logits)
with three surrogate gradients written by hand as ``torch.autograd.Function``s: SuperSpike (alpha 10),
the sigmoid derivative (alpha 4) and Esser et al.'s piecewise-linear (alpha 1); Adam, lr 1e-3, batch 64,
cross-entropy. This script runs that experiment unchanged, twice per surrogate: the model as written
(eager) and ``snncc.compile(model)`` (the model loops over time itself), from the same initial weights on
the same batches. It prints per-epoch test accuracy and time for both and plots test accuracy per epoch
per surrogate (eager dashed, compiled solid).

Data: CIFAR-10 from a local directory of the standard python pickles (``--data cifar10 --cifar-root
DIR``; no torchvision, no download), or, by default, scikit-learn's bundled 8x8 digits (the network's
input layer and flatten size follow the image size; the rest is the seed's network).

    python examples/surrogate_study.py --quick                 # digits, < 1 min on 2 CPU cores
    python examples/surrogate_study.py --data cifar10 --cifar-root ~/data/cifar-10-batches-py
"""
from __future__ import annotations

import argparse
import datetime
import math
import importlib.util
import os
import platform
import sys
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

if __package__ in (None, ""):   # run as a script: make ``examples`` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import snncc
from examples.common import (Data, load_cifar10, load_digits_images, make_contenders, plot_curves,
                             run_training, seed_everything)
from examples.csnn import BasicCSNN, StepCSNN

__all__ = ["SuperSpike", "SigmoidDerivative", "Esser", "SURROGATES", "LoopingCSNN", "build_model", "main"]


# --------------------------------------------------------------------------- seed 001's surrogates
def heaviside(x: torch.Tensor) -> torch.Tensor:
    """The spike: 1 where ``x >= 0``, else 0 (in ``x``'s dtype; the notebook's ``.float()``)."""
    return (x >= 0).to(x.dtype)


class _SpikeFunction(torch.autograd.Function):
    """The forward the notebook's three surrogates share: the heaviside spike, x kept for backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, alpha: float) -> torch.Tensor:
        if x.requires_grad:
            ctx.save_for_backward(x)
            ctx.alpha = alpha
        return heaviside(x)


class SuperSpikeFunction(_SpikeFunction):
    """Heaviside forward; SuperSpike's ``1 / (alpha |x| + 1)^2`` backward (Zenke & Ganguli)."""

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor):
        (x,) = ctx.saved_tensors
        denom = ctx.alpha * x.abs() + 1.0
        return grad_output / (denom * denom), None


class SigmoidDerivativeFunction(_SpikeFunction):
    """Heaviside forward; ``s (1 - s)``, ``s = sigmoid(alpha x)``, backward (the notebook's version: no
    factor alpha)."""

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor):
        (x,) = ctx.saved_tensors
        s = torch.sigmoid(ctx.alpha * x)
        return grad_output * s * (1.0 - s), None


class EsserFunction(_SpikeFunction):
    """Heaviside forward; Esser et al.'s ``max(0, 1 - alpha |x|)`` backward."""

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor):
        (x,) = ctx.saved_tensors
        return grad_output * torch.clamp(1.0 - ctx.alpha * x.abs(), min=0.0), None


class _HandWritten(nn.Module):
    """A surrogate module as in the notebook: ``spiking=False`` gives the plain step (no gradient)."""

    function: type = SuperSpikeFunction

    def __init__(self, alpha: float, spiking: bool = True) -> None:
        super().__init__()
        self.alpha, self.spiking = alpha, spiking

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spiking:
            return self.function.apply(x, self.alpha)
        return heaviside(x)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}"


class SuperSpike(_HandWritten):
    function = SuperSpikeFunction

    def __init__(self, alpha: float = 100.0, spiking: bool = True) -> None:
        super().__init__(alpha, spiking)


class SigmoidDerivative(_HandWritten):
    function = SigmoidDerivativeFunction

    def __init__(self, alpha: float = 4.0, spiking: bool = True) -> None:
        super().__init__(alpha, spiking)


class Esser(_HandWritten):
    function = EsserFunction

    def __init__(self, alpha: float = 1.0, spiking: bool = True) -> None:
        super().__init__(alpha, spiking)


#: The notebook's ``surrogates_config``: name -> a fresh surrogate module with the study's alpha.
SURROGATES: Dict[str, Callable[[], nn.Module]] = {
    "SuperSpike": lambda: SuperSpike(alpha=10.0),
    "Sigmoid": lambda: SigmoidDerivative(alpha=4.0),
    "Esser": lambda: Esser(alpha=1.0),
}


# --------------------------------------------------------------------------- the model
class LoopingCSNN(nn.Module):
    """The fallback without SpikingJelly: seed 001's network with snncc's LIF (same equations and
    defaults as SpikingJelly's ``LIFNode``), looping over time itself like ``BasicCSNN``."""

    def __init__(self, T: int, surrogate_function: nn.Module, in_channels: int, size: int,
                 classes: int = 10) -> None:
        super().__init__()
        self.T = T
        self.step = StepCSNN(surrogate_function, in_channels=in_channels, size=size, classes=classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        snncc.reset(self.step)
        return torch.stack([self.step(x) for _ in range(self.T)]).mean(dim=0)


def build_model(surrogate: nn.Module, T: int, in_channels: int, size: int, use_spikingjelly: bool) -> nn.Module:
    """Seed 001's ``BasicCSNN`` (SpikingJelly) or, without SpikingJelly, :class:`LoopingCSNN`."""
    if use_spikingjelly:
        return BasicCSNN(T=T, surrogate_function=surrogate, in_channels=in_channels, size=size)
    return LoopingCSNN(T, surrogate, in_channels, size)


# --------------------------------------------------------------------------- the study
def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="Seed 001's surrogate-gradient study (BasicCSNN, T=8), "
                                             "eager vs snncc.compile, per-epoch accuracy and time.")
    ap.add_argument("--data", choices=("digits", "cifar10"), default="digits",
                    help="digits (built in, default) or cifar10 (needs --cifar-root)")
    ap.add_argument("--cifar-root", default=None,
                    help="directory with CIFAR-10's python pickles data_batch_1..5 and test_batch "
                         "(or its parent holding cifar-10-batches-py/)")
    ap.add_argument("--epochs", type=int, default=None, help="epochs per surrogate (default: 10 on CIFAR-10 "
                    "as in the notebook, 5 on digits)")
    ap.add_argument("--batch", type=int, default=64, help="batch size (default 64, the notebook's)")
    ap.add_argument("--lr", type=float, default=None,
                    help="Adam learning rate (default: 1e-3 on CIFAR-10, the notebook's; 1e-2 on digits)")
    ap.add_argument("--T", type=int, default=8, help="timesteps (default 8, the notebook's)")
    ap.add_argument("--surrogates", default=",".join(SURROGATES),
                    help=f"comma-separated subset of {','.join(SURROGATES)} (default: all three)")
    ap.add_argument("--train-size", type=int, default=None, help="use only this many training samples")
    ap.add_argument("--test-size", type=int, default=None, help="use only this many test samples")
    ap.add_argument("--neurons", choices=("auto", "spikingjelly", "snncc"), default="auto",
                    help="LIF neurons: SpikingJelly's LIFNode as in the notebook (auto: when installed) or "
                         "snncc.LIF (same equations)")
    ap.add_argument("--no-eager", action="store_true", help="train the compiled model only")
    ap.add_argument("--seed", type=int, default=0, help="seed for weights, data order and split (default 0)")
    ap.add_argument("--out", default=".", help="directory for the plot (default: current directory)")
    ap.add_argument("--plot", default=None, help="plot file (default: <out>/surrogate_study.png)")
    ap.add_argument("--quick", action="store_true",
                    help="a smoke test: 3 epochs, T=4, 320 training / 100 test samples, batch 32")
    args = ap.parse_args(argv)
    if args.quick:
        args.epochs = 3 if args.epochs is None else args.epochs
        args.T, args.batch = 4, 32
        args.train_size = args.train_size or 320
        args.test_size = args.test_size or 100
    if args.epochs is None:
        args.epochs = 10 if args.data == "cifar10" else 5
    if args.lr is None:
        args.lr = 1e-3 if args.data == "cifar10" else 1e-2
    for name in ("epochs", "batch", "T"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be >= 1")
    names = [s.strip() for s in args.surrogates.split(",") if s.strip()]
    unknown = [s for s in names if s not in SURROGATES]
    if unknown or not names:
        ap.error(f"--surrogates: unknown {unknown}; choose from {','.join(SURROGATES)}")
    args.surrogate_names = names
    if args.data == "cifar10" and not args.cifar_root:
        ap.error("--data cifar10 needs --cifar-root DIR (the directory of data_batch_1..5 and test_batch)")
    return args


def load_data(args: argparse.Namespace) -> Data:
    if args.data == "cifar10":
        return load_cifar10(args.cifar_root, args.train_size, args.test_size)
    subset = None
    if args.train_size or args.test_size:     # digits are split 75/25 from one pool
        subset = max(math.ceil((args.train_size or 0) / 0.75), math.ceil((args.test_size or 0) / 0.25))
    data = load_digits_images(args.seed, subset=subset)
    if args.train_size:
        data.x_train, data.y_train = data.x_train[:args.train_size], data.y_train[:args.train_size]
    if args.test_size:
        data.x_test, data.y_test = data.x_test[:args.test_size], data.y_test[:args.test_size]
    return data


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """Run the study; returns ``{"results": {surrogate: {"eager"|"compiled": {"accuracy", "loss",
    "train_s", "eval_s", "warmup_s"}}}, "plot": path or None, "backend": "spikingjelly"|"snncc"}``."""
    args = parse_args(argv)
    has_sj = importlib.util.find_spec("spikingjelly") is not None
    if args.neurons == "spikingjelly" and not has_sj:
        raise SystemExit("--neurons spikingjelly: SpikingJelly is not installed (pip install --no-deps spikingjelly)")
    use_sj = has_sj and args.neurons != "snncc"
    if not has_sj and args.neurons == "auto":
        print("note: SpikingJelly is not installed (pip install --no-deps spikingjelly); using the same "
              "network with snncc's LIF neurons (SpikingJelly's equations and defaults)")
    data = load_data(args)
    print(f"snncc {snncc.__version__} | torch {torch.__version__} | {torch.get_num_threads()} threads | "
          f"{platform.machine()} | {datetime.date.today()}")
    print(f"{data.describe()} | T={args.T}, batch={args.batch}, epochs={args.epochs}, lr={args.lr}, "
          f"seed={args.seed} | neurons: {'SpikingJelly LIFNode' if use_sj else 'snncc.LIF'}")
    in_channels, size = data.x_train.shape[1], data.x_train.shape[-1]
    results: Dict[str, Dict[str, Dict[str, Any]]] = {}
    for name in args.surrogate_names:
        seed_everything(args.seed)
        model = build_model(SURROGATES[name](), args.T, in_channels, size, use_sj)
        contenders = make_contenders(
            model, compile_fn=snncc.compile, eager_run=lambda m: m, lr=args.lr,
            loss_fn=nn.functional.cross_entropy, logits_fn=lambda out: out, eager=not args.no_eager)
        print(f">> surrogate {name} ({type(model).__name__}, {SURROGATES[name]().extra_repr()})", flush=True)
        results[name] = run_training(contenders, data, args.epochs, args.batch, args.seed, label=name)
    print("\nsummary: best test accuracy (total training time)")
    for name, sides in results.items():
        print(f"  {name:<11} " + " | ".join(
            f"{side} {max(r['accuracy']):6.2%} ({sum(r['train_s']):.2f}s)" for side, r in sides.items()))
    plot = args.plot or os.path.join(args.out, "surrogate_study.png")
    curves = {name: {side: r["accuracy"] for side, r in sides.items()} for name, sides in results.items()}
    written = plot_curves(curves, plot, f"Seed 001 surrogate study ({data.name}, T={args.T})")
    if written:
        print(f"plot: {written}")
    return {"results": results, "plot": written, "backend": "spikingjelly" if use_sj else "snncc",
            "data": data.name}


if __name__ == "__main__":
    main()
    sys.exit(0)
