"""Benchmark: a recurrent LIF network on spike-train audio (SHD layout), eager loop vs snncc, this machine.

The model is written in step mode the way users write recurrent SNNs: ``h = fc_in(x) + fc_rec(self.s)``
with the last spikes kept in the model (``self.s``, ``reset()``), snncc LIF neurons, a LIF readout and the
loss on the mean over time. Inputs are Bernoulli spike trains over 700 channels (``--input-rate``); every
neuron layer is calibrated to fire about ``--rate`` (tools/_rates.py), and the rates are printed.

Training steps (forward + cross-entropy + backward + Adam) are timed with the variants interleaved,
medians over ``--rounds`` quoted with their ratio to eager. Memory, per variant:

* *saved*: bytes kept for backward (one forward under ``saved_tensors_hooks``, each storage once, the
  input itself excluded: the caller holds it anyway);
* *peak*: the peak of torch's allocated CPU memory during one training step, above what was allocated
  before it (every allocation and free, from the profiler's memory events, summed in time order; resident
  memory is no measure here: the C allocator keeps freed memory for reuse).

    python tools/bench_rsnn.py                       # 700 -> 256 (recurrent) -> 20, T=250, N=32
    python tools/bench_rsnn.py --T 100 --rounds 3 --json out.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import snncc  # noqa: E402
from tools import _rates  # noqa: E402
from tools._memory import peak_bytes, saved_bytes  # noqa: E402,F401 (peak_bytes: re-exported)

#: variant -> snncc.compile options (None: the eager loop)
VARIANTS: Dict[str, Optional[Dict[str, Any]]] = {
    "eager": None,
    "snncc": {},
    "snncc min+chunk": {"memory": "min", "chunk": 25},
}


class RecurrentSNN(nn.Module):
    """700 -> H recurrent LIF -> 20 LIF, one timestep per call; keeps its last hidden spikes itself."""

    def __init__(self, inputs: int = 700, hidden: int = 256, classes: int = 20) -> None:
        super().__init__()
        self.fc_in = nn.Linear(inputs, hidden)
        self.fc_rec = nn.Linear(hidden, hidden, bias=False)
        self.lif = snncc.LIF(tau=2.0)
        self.fc_out = nn.Linear(hidden, classes)
        self.lif_out = snncc.LIF(tau=2.0)
        self.s: Optional[torch.Tensor] = None

    def reset(self) -> None:
        self.s = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc_in(x)
        if self.s is not None:
            h = h + self.fc_rec(self.s)
        self.s = self.lif(h)
        return self.lif_out(self.fc_out(self.s))


def eager_loop(model: RecurrentSNN) -> Callable[[torch.Tensor], torch.Tensor]:
    """The eager step loop over ``x_seq [T, N, 700]`` from the reset state."""
    def run(x_seq: torch.Tensor) -> torch.Tensor:
        model.reset()
        snncc.reset(model)
        return torch.stack([model(x_seq[t]) for t in range(x_seq.shape[0])])
    return run


def build(args: argparse.Namespace) -> Dict[str, Any]:
    """The calibrated model, an input batch and labels (deterministic in ``args.seed``)."""
    torch.manual_seed(args.seed)
    model = RecurrentSNN(hidden=args.hidden)
    g = torch.Generator().manual_seed(args.seed + 1)
    x = (torch.rand(args.T, args.batch, 700, generator=g) < args.input_rate).float()
    y = torch.randint(0, 20, (args.batch,), generator=g)
    run = eager_loop(model)
    gains = {"lif": _rates.ParamGain("fc_in", model.fc_in), "lif_out": _rates.ParamGain("fc_out", model.fc_out)}
    cal = _rates.calibrate(model, lambda: run(x), lambda: (model.reset(), snncc.reset(model), model(x[0])),
                           target=args.rate, overrides=gains)
    return {"model": model, "x": x, "y": y, "rates": cal.rates}


def _step(fwd: Callable[[torch.Tensor], torch.Tensor], opt: torch.optim.Optimizer, x: torch.Tensor,
          y: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(fwd(x).mean(0), y).backward()
    opt.step()


def _forward_of(name: str, model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    opts = VARIANTS[name]
    return eager_loop(model) if opts is None else snncc.compile(model, sequence=True, **opts)


def time_variants(state: Dict[str, Any], names: List[str], rounds: int) -> Dict[str, float]:
    """Median training-step milliseconds per variant, interleaved round by round."""
    import copy
    runs = {}
    for n in names:
        m = copy.deepcopy(state["model"])
        runs[n] = (_forward_of(n, m), torch.optim.Adam(m.parameters(), lr=1e-4))
    x, y = state["x"], state["y"]
    for fwd, opt in runs.values():          # warm-up: trace, kernels
        _step(fwd, opt, x, y)
    times: Dict[str, List[float]] = {n: [] for n in names}
    for _ in range(rounds):
        for n, (fwd, opt) in runs.items():
            t0 = time.perf_counter()
            _step(fwd, opt, x, y)
            times[n].append((time.perf_counter() - t0) * 1e3)
    return {n: statistics.median(v) for n, v in times.items()}


# --------------------------------------------------------------------------- memory
def memory_variants(state: Dict[str, Any], names: List[str]) -> Dict[str, Dict[str, float]]:
    """Per variant: bytes kept for backward (the input excluded: the caller holds it anyway) and the peak
    of a training step (after a warm-up step: trace, kernels, Adam's state)."""
    import copy
    x, y = state["x"], state["y"]
    out = {}
    for n in names:
        model = copy.deepcopy(state["model"])
        fwd = _forward_of(n, model)
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        _step(fwd, opt, x, y)
        saved = saved_bytes(lambda: fwd(x), exclude={x.untyped_storage().data_ptr()})
        peak = peak_bytes(lambda: _step(fwd, opt, x, y))
        out[n] = {"saved_mib": saved / 2 ** 20, "peak_mib": peak / 2 ** 20}
    return out


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, default=250)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--rate", type=float, default=0.10, help="target firing rate of every neuron layer")
    ap.add_argument("--input-rate", type=float, default=0.05, help="input spikes per channel and step")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-memory", action="store_true", help="skip the memory measurements")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(torch.get_num_threads())
    names = list(VARIANTS)
    state = build(args)
    print(f"snncc {getattr(snncc, '__version__', '?')} | torch {torch.__version__} | {torch.get_num_threads()} threads"
          f" | {platform.machine()} | {datetime.date.today()}")
    print(f"recurrent SNN 700 -> {args.hidden} (recurrent) -> 20, T={args.T}, N={args.batch}, input spikes "
          f"{args.input_rate:.0%}; firing rates: " + ", ".join(f"{k} {v:.1%}" for k, v in state["rates"].items()))
    ms = time_variants(state, names, args.rounds)
    mem = {} if args.no_memory else memory_variants(state, names)
    print(f"{'variant':<18} {'train step':>11} {'vs eager':>9} {'saved':>10} {'peak':>10} {'peak/eager':>11}")
    for n in names:
        m = mem.get(n, {})
        ratio = f"{mem['eager']['peak_mib'] and m['peak_mib'] / mem['eager']['peak_mib']:.3f}" if m else "-"
        print(f"{n:<18} {ms[n]:>8.1f} ms {ms['eager'] / ms[n]:>8.2f}x "
              f"{m.get('saved_mib', float('nan')):>6.1f} MiB {m.get('peak_mib', float('nan')):>6.1f} MiB {ratio:>11}")
    result = {"T": args.T, "batch": args.batch, "hidden": args.hidden, "rates": state["rates"], "train_ms": ms,
              "memory": mem, "torch": torch.__version__, "date": str(datetime.date.today())}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
