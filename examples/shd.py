"""A recurrent SNN on spike audio (the Spiking Heidelberg Digits layout), eager and compiled side by side.

    python examples/shd.py --quick                  # a smoke test: seconds
    python examples/shd.py                          # generated data: 800 / 400 recordings, T=100, 3 epochs
    python examples/shd.py --data ~/data/shd        # the real SHD: DIR/shd_train.h5 and DIR/shd_test.h5
    python examples/shd.py --float64                # identical spikes, so identical trainings

The model is written the way recurrent SNNs are written in step mode: one call is one timestep; the
hidden layer's spikes of the previous step are kept in the model (``self.s``) and fed back through a
recurrent Linear; ``reset()`` forgets them. Input spikes ``[N, 700]`` per step, 700 cochlea channels,
20 classes. Recordings (spike times and channels, :mod:`snncc.data.shd`) are binned into ``--T`` steps
over ``--duration`` seconds and batched time first, ``[T, N, 700]``.

Two copies of one initial model (``copy.deepcopy``) see the same batches in the same order with the same
optimizer: one runs the eager Python loop over time (``model.reset()``, then ``model(x[t])`` for each t),
the other ``snncc.compile(model, sequence=True)``. Compilation is a pure optimization, so their losses,
accuracies and final parameters agree (in float32 to rounding: see :func:`report_agreement`); the exit
status is 0 when they did.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

if __package__ in (None, ""):   # run as a script: make ``snncc`` importable from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import snncc
from snncc.data.shd import SHD_CHANNELS, SHD_CLASSES, SpikeAudio, SpikeRecordings, generated_shd, load_shd

__all__ = ["RecurrentSNN", "load_data", "main"]

Runner = Callable[[torch.Tensor], torch.Tensor]


class RecurrentSNN(nn.Module):
    """One timestep of a recurrent SNN: ``s_t = LIF(fc_in(x_t) + fc_rec(s_{t-1}))``, then a readout.

    ``readout="lif"``: ``LIF(fc_out(s_t))``, output spikes (the logits are the spike counts averaged over
    time); ``"linear"``: ``fc_out(s_t)`` (the logits are its mean over time). The LIF neurons leak without
    scaling their input (``decay_input=False``: ``H = V (1 - 1/tau) + X``), ``tau=5`` steps. The input
    and recurrent weights are scaled up from PyTorch's default so that a fresh net fires (sparse input
    spikes into 700 channels barely move the membranes otherwise, and nothing would learn).
    """

    def __init__(self, channels: int = SHD_CHANNELS, hidden: int = 256, classes: int = SHD_CLASSES,
                 tau: float = 5.0, readout: str = "lif", in_gain: float = 4.0, rec_gain: float = 2.0) -> None:
        super().__init__()
        if readout not in ("lif", "linear"):
            raise ValueError(f"RecurrentSNN: readout must be 'lif' or 'linear', got {readout!r}")
        sg = snncc.surrogate.ATan
        self.fc_in = nn.Linear(channels, hidden)
        self.fc_rec = nn.Linear(hidden, hidden, bias=False)
        self.lif = snncc.LIF(tau=tau, decay_input=False, surrogate_function=sg())
        self.fc_out = nn.Linear(hidden, classes)
        self.lif_out = snncc.LIF(tau=tau, decay_input=False, surrogate_function=sg()) if readout == "lif" else None
        with torch.no_grad():
            self.fc_in.weight.mul_(in_gain)
            self.fc_rec.weight.mul_(rec_gain)
        self.s: Optional[torch.Tensor] = None      # the hidden layer's spikes at the previous step

    def reset(self) -> None:
        """Start a new sequence: no previous spikes, every neuron at its reset state."""
        self.s = None
        snncc.reset(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc_in(x)
        if self.s is not None:          # the first step has no previous spikes to feed back
            h = h + self.fc_rec(self.s)
        self.s = self.lif(h)
        out = self.fc_out(self.s)
        return out if self.lif_out is None else self.lif_out(out)


def eager_runner(model: RecurrentSNN) -> Runner:
    """The eager baseline: reset, one call per timestep of ``x [T, N, 700]``, stacked -> ``[T, N, C]``."""
    def run(x: torch.Tensor) -> torch.Tensor:
        model.reset()
        return torch.stack([model(x[t]) for t in range(x.shape[0])])
    return run


@dataclass
class Data:
    """Training and test recordings, binned on access (``SpikeAudio``: batches ``[T, N, 700]``)."""

    train: SpikeAudio
    test: SpikeAudio
    name: str


def load_data(args: argparse.Namespace, dtype: torch.dtype) -> Data:
    """``--data DIR``: SHD's files (``--train-size`` / ``--test-size`` keep the first recordings); else
    the generated stand-in (train and test from different seeds, same classes)."""
    if args.data is not None:
        train = load_shd(args.data, "train", limit=args.train_size)
        test = load_shd(args.data, "test", limit=args.test_size)
        name = f"SHD ({args.data})"
    else:
        n_tr, n_te = args.train_size or 800, args.test_size or 400
        spikes = 1000 if args.quick else 4000
        train = generated_shd(n_tr, seed=2 * args.seed, spikes_per_sample=spikes)
        test = generated_shd(n_te, seed=2 * args.seed + 1, spikes_per_sample=spikes)
        name = "generated SHD-like"

    def binned(r: SpikeRecordings) -> SpikeAudio:
        return SpikeAudio(r, T=args.T, duration=args.duration, dtype=dtype)

    return Data(binned(train), binned(test), name)


def timed(fn: Callable[[], torch.Tensor]) -> Tuple[torch.Tensor, float]:
    """``fn()`` and its wall-clock seconds."""
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


@dataclass
class Contender:
    """One side of the comparison: a module, how to run it over time, its optimizer and its clocks."""

    name: str
    module: nn.Module
    run: Runner
    optimizer: torch.optim.Optimizer
    train_s: List[float] = field(default_factory=list)
    eval_s: List[float] = field(default_factory=list)

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """One optimizer step on the cross-entropy of the mean output over time; returns the loss (timed)."""
        def step() -> torch.Tensor:
            self.optimizer.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(self.run(x).mean(0), y)
            loss.backward()
            self.optimizer.step()
            return loss.detach()
        loss, seconds = timed(step)
        self.train_s[-1] += seconds
        return float(loss)

    @torch.no_grad()
    def predict(self, batches: Iterable[Tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Predicted classes in eval mode (the model's calls timed, not the binning)."""
        self.module.eval()
        preds = []
        for xb, _ in batches:
            out, seconds = timed(lambda: self.run(xb).mean(0).argmax(1))
            self.eval_s[-1] += seconds
            preds.append(out)
        self.module.train()
        return torch.cat(preds)


def make_contenders(model: RecurrentSNN, lr: float, chunk: Union[int, str, None],
                    memory: str) -> Tuple[Contender, Contender]:
    """Eager and compiled copies of the same initial model, each with its own Adam."""
    eager_model = copy.deepcopy(model)
    compiled_model = snncc.compile(copy.deepcopy(model), sequence=True, chunk=chunk, memory=memory)
    eager = Contender("eager", eager_model, eager_runner(eager_model),
                      torch.optim.Adam(eager_model.parameters(), lr=lr))
    compiled = Contender("compiled", compiled_model, compiled_model,
                         torch.optim.Adam(compiled_model.parameters(), lr=lr))
    return eager, compiled


def warm_up(c: Contender, shapes: Sequence[Tuple[bool, torch.Tensor]]) -> float:
    """Each input shape once (training and eval), outside the epoch clocks; returns the seconds spent.

    The compiled module specializes on first sight of a shape and mode (traces, runs its passes, builds
    its C kernels, cached on disk); eager torch sets up its kernels. Parameters and optimizer state are
    left untouched.
    """
    t0 = time.perf_counter()
    for training, x in shapes:
        c.module.train(training)
        with torch.set_grad_enabled(training):
            out = c.run(x)
            if training:
                out.sum().backward()
    c.module.zero_grad(set_to_none=True)
    c.module.train()
    return time.perf_counter() - t0


@torch.no_grad()
def hidden_rate(model: RecurrentSNN, x: torch.Tensor) -> float:
    """The hidden layer's mean firing rate over ``x [T, N, 700]`` (eager, eval mode)."""
    was = model.training
    model.eval()
    model.reset()
    total = 0.0
    for t in range(x.shape[0]):
        model(x[t])
        total += float(model.s.float().mean())
    model.reset()
    model.train(was)
    return total / x.shape[0]


@torch.no_grad()
def max_param_diff(a: nn.Module, b: nn.Module) -> float:
    """Largest absolute difference between corresponding parameters of two copies of one model."""
    return max(float((p - q).abs().max()) for p, q in zip(a.parameters(), b.parameters()))


@torch.no_grad()
def same_weights_gap(model: RecurrentSNN, compiled: nn.Module,
                     batches: Iterable[Tuple[torch.Tensor, torch.Tensor]]) -> Tuple[float, int, int]:
    """The contract itself, on one set of weights: the eager loop over ``model`` against ``compiled`` (a
    compiled ``model``), in eval mode. Returns (max |output difference|, differing predictions, samples)."""
    compiled.eval()
    eager = eager_runner(model)
    gap, differ, n = 0.0, 0, 0
    for xb, _ in batches:
        a, b = eager(xb).mean(0), compiled(xb).mean(0)
        gap = max(gap, float((a - b).abs().max()))
        differ += int((a.argmax(1) != b.argmax(1)).sum())
        n += len(xb[0])
    compiled.train()
    return gap, differ, n


def report_agreement(eager: Contender, compiled: Contender, preds: Sequence[torch.Tensor], data: Data,
                     args: argparse.Namespace) -> int:
    """Print whether eager and compiled agreed; returns the exit status (0: the contract held).

    Two checks: the two trainings ended at the same parameters (what the demo is about), and, on the
    trained weights, the compiled module gives the eager loop's outputs (the contract itself). In float32
    both can miss by a spike: the compiled model runs ``fc_in`` as one matmul over all T steps and sums
    weight gradients over T*N rows at once, eager step by step, so values differ by rounding, and a
    membrane that sits at its threshold can fire in one and not the other (over T = 100 steps and many
    neurons this happens now and then; after it the two trainings follow different, equally valid paths).
    So a float32 run whose same-weights check differs is checked again in float64 on a copy of the
    trained weights, where spikes are identical; that check decides.
    """
    float64 = data.train.dtype == torch.float64
    param_tol, out_tol = (1e-9, 1e-9) if float64 else (1e-3, 1e-4)
    diff = max_param_diff(eager.module, compiled.module)
    same = int((preds[0] == preds[1]).sum())
    n = len(data.test)
    gap, differ, _ = same_weights_gap(compiled.module.model, compiled.module, data.test.batches(args.batch))
    trained_alike = diff <= param_tol
    contract = gap <= out_tol and differ == 0
    print(f"final parameters: max |eager - compiled| = {diff:.2e}; test predictions identical on {same}/{n}")
    print(f"same weights, test set: max |eager loop output - compiled output| = {gap:.2e}, "
          f"{n - differ}/{n} predictions identical")
    if not contract and not float64:
        model64 = copy.deepcopy(compiled.module.model).double()
        c64 = snncc.compile(copy.deepcopy(model64), sequence=True, chunk=args.chunk, memory=args.memory)
        gap64, differ64, _ = same_weights_gap(model64, c64,
                                              ((x.double(), y) for x, y in data.test.batches(args.batch)))
        contract = gap64 <= 1e-9 and differ64 == 0
        print(f"same weights in float64 (float32 rounding flipped a spike at threshold): max |eager - compiled| "
              f"= {gap64:.2e}, {n - differ64}/{n} predictions identical")
    if trained_alike and contract:
        print("eager == compiled: yes")
    elif contract and not float64:
        print("eager == compiled: yes for the same weights; the two float32 trainings drifted apart (rounding "
              "differences flipped a spike at threshold); run with --float64 for identical trainings")
    else:
        print("eager == compiled: NO")
    return 0 if contract and (trained_alike or not float64) else 1


def _chunk(value: str) -> Union[int, str]:
    if value == "auto":
        return value
    try:
        k = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--chunk takes a positive int or 'auto', got {value!r}") from None
    if k < 1:
        raise argparse.ArgumentTypeError(f"--chunk must be >= 1, got {k}")
    return k


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """The command line (see ``--help``); ``--quick`` sets small defaults for what is not given."""
    ap = argparse.ArgumentParser(description="Train a recurrent SNN on spike audio (SHD layout), eager vs "
                                             "snncc.compile(model, sequence=True).")
    ap.add_argument("--data", default=None, metavar="DIR",
                    help="a directory holding shd_train.h5 and shd_test.h5 (default: generated SHD-like data)")
    ap.add_argument("--train-size", type=int, default=None,
                    help="training recordings (generated: default 800; SHD: the first N, default all)")
    ap.add_argument("--test-size", type=int, default=None,
                    help="test recordings (generated: default 400; SHD: the first N, default all)")
    ap.add_argument("--T", type=int, default=None, help="timesteps per recording (default 100; 20 with --quick)")
    ap.add_argument("--duration", type=float, default=1.0,
                    help="seconds binned into the T steps (default 1.0; later spikes are dropped)")
    ap.add_argument("--hidden", type=int, default=None, help="recurrent LIF neurons (default 256; 64 with --quick)")
    ap.add_argument("--readout", choices=("lif", "linear"), default="lif",
                    help="lif: Linear + LIF, logits = mean output spikes (default); linear: mean of a Linear")
    ap.add_argument("--batch", type=int, default=32, help="mini-batch size (default 32)")
    ap.add_argument("--epochs", type=int, default=None, help="training epochs (default 3; 1 with --quick)")
    ap.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate (default 2e-3)")
    ap.add_argument("--seed", type=int, default=0, help="seed for the weights, the data and its order")
    ap.add_argument("--chunk", type=_chunk, default=None,
                    help="snncc.compile's chunk=: timesteps per task (an int, or auto; default all T)")
    ap.add_argument("--memory", choices=("default", "half", "min"), default="default",
                    help="snncc.compile's memory=: what the neuron kernels keep for backward")
    ap.add_argument("--float64", action="store_true",
                    help="train in float64: identical spikes, so the two trainings stay identical")
    ap.add_argument("--quick", action="store_true",
                    help="a smoke test: 64 / 48 recordings (generated, or SHD's first), T=20, 64 hidden, 1 epoch")
    args = ap.parse_args(argv)
    if args.quick:
        args.T = args.T or 20
        args.hidden = args.hidden or 64
        args.epochs = args.epochs or 1
        args.train_size = args.train_size or 64
        args.test_size = args.test_size or 48
    args.T = args.T or 100
    args.hidden = args.hidden or 256
    args.epochs = args.epochs or 3
    for name in ("epochs", "batch", "T", "hidden"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be >= 1")
    for name in ("train_size", "test_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if not args.duration > 0:
        ap.error("--duration must be > 0 seconds")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    """Run the comparison; returns 0 when compiled == eager held (see :func:`report_agreement`)."""
    args = parse_args(argv)
    dtype = torch.float64 if args.float64 else torch.float32
    data = load_data(args, dtype)
    if len(data.train) < args.batch:
        raise SystemExit(f"--batch {args.batch} is larger than the {len(data.train)} training recordings")
    torch.manual_seed(args.seed)
    model = RecurrentSNN(data.train.channels, args.hidden, max(data.train.classes, data.test.classes),
                         readout=args.readout).to(dtype)
    eager, compiled = make_contenders(model, args.lr, args.chunk, args.memory)
    contenders = (eager, compiled)
    print(f"snncc {snncc.__version__} | torch {torch.__version__} | {torch.get_num_threads()} threads | "
          f"{platform.machine()} | {datetime.date.today()}")
    print(f"{data.name}: {len(data.train)} train / {len(data.test)} test recordings, {data.train.channels} "
          f"channels, {data.train.classes} classes | T={args.T} over {args.duration:g} s | RecurrentSNN "
          f"hidden={args.hidden}, readout {args.readout} | batch={args.batch}, epochs={args.epochs}, lr={args.lr}, "
          f"seed={args.seed}, chunk={args.chunk}, memory={args.memory}, {str(dtype).replace('torch.', '')}")

    x0, _ = data.train.batch(range(args.batch))
    test_sizes = sorted({min(args.batch, len(data.test)), len(data.test) % args.batch} - {0})
    shapes = [(True, x0)] + [(False, data.test.batch(range(k))[0]) for k in test_sizes]
    print(f"input spikes: {float(x0.mean()):.1%} of channel-steps | hidden firing rate of the initial model: "
          f"{hidden_rate(model, x0):.1%}")
    warm = {c.name: warm_up(c, shapes) for c in contenders}
    print(f"warm-up, one-off (compiled: trace, passes, kernels): eager {warm['eager']:.2f} s, "
          f"compiled {warm['compiled']:.2f} s")

    generator = torch.Generator().manual_seed(args.seed)
    preds: List[torch.Tensor] = []
    for epoch in range(1, args.epochs + 1):
        totals, n = [0.0, 0.0], 0
        for c in contenders:
            c.train_s.append(0.0)
        for xb, yb in data.train.batches(args.batch, shuffle=True, generator=generator, drop_last=True):
            for i, c in enumerate(contenders):
                totals[i] += c.train_step(xb, yb)
            n += 1
        for c in contenders:
            c.eval_s.append(0.0)
        preds = [c.predict(data.test.batches(args.batch)) for c in contenders]   # binned on the fly
        accs = [float((p == data.test.labels).float().mean()) for p in preds]
        cells = [f"{c.name} loss {t / n:.4f} acc {a:6.2%} ({c.train_s[-1]:.2f}s + {c.eval_s[-1]:.2f}s)"
                 for c, t, a in zip(contenders, totals, accs)]
        print(f"epoch {epoch}/{args.epochs} | " + " | ".join(cells)
              + f" | speedup train {eager.train_s[-1] / compiled.train_s[-1]:.2f}x"
              f" eval {eager.eval_s[-1] / compiled.eval_s[-1]:.2f}x", flush=True)

    train_x = sum(eager.train_s) / sum(compiled.train_s)
    eval_x = sum(eager.eval_s) / sum(compiled.eval_s)
    print(f"wall-clock speedup (eager time / compiled time): training {train_x:.2f}x "
          f"({sum(eager.train_s):.2f}s vs {sum(compiled.train_s):.2f}s), "
          f"evaluation {eval_x:.2f}x ({sum(eager.eval_s):.2f}s vs {sum(compiled.eval_s):.2f}s)")
    print(f"hidden firing rate of the trained model: {hidden_rate(eager.module, x0):.1%}")
    return report_agreement(eager, compiled, preds, data, args)


if __name__ == "__main__":
    sys.exit(main())
