"""Benchmark: seed 001's CSNN (SpikingJelly LIF + Sigmoid surrogate), eager loop vs snncc, on this machine.

Variants are interleaved in one process (eager, snncc, eager, snncc, ...), each timed ``--reps`` times per
round; medians are reported with their ratio. Measures a training step (forward + backward + Adam) and
inference (eval, no_grad), and the bytes each variant keeps for backward (one forward under
``torch.autograd.graph.saved_tensors_hooks``, each storage counted once). ``--torch-compile`` adds
``torch.compile`` of the eager loop; ``snncc-max`` / ``snncc-half`` / ``snncc-min`` are
``snncc.compile(..., memory="max")`` / ``"half"`` / ``"min"`` (``snncc`` is the default memory plan, measured
on its warm-up steps; the plan is printed).

    python tools/bench_csnn.py --batch 32 --T 8 --torch-compile
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import snncc  # noqa: E402
from examples.csnn import BasicCSNN  # noqa: E402


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()


def _surrogate(name: str) -> Optional[nn.Module]:
    """None (SpikingJelly's Sigmoid) or seed 001's hand-written surrogate module (examples/surrogate_study)."""
    if name == "sigmoid":
        return None
    from examples import surrogate_study as ss
    return {"superspike": ss.SuperSpike, "sigmoid_derivative": ss.SigmoidDerivative, "esser": ss.Esser}[name]()


def _timed(fn: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def main(argv: List[str] = None) -> Dict[str, Dict[str, float]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--T", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--torch-compile", action="store_true", help="also time torch.compile of the eager loop")
    ap.add_argument("--json", help="write the medians here")
    ap.add_argument("--variants", help="comma-separated subset (the first is the ratios' reference; default: all, "
                                       "eager first)")
    ap.add_argument("--rate", type=float, default=0.10,
                    help="scale each layer's weights so every neuron layer fires about this often (0: as initialized)")
    ap.add_argument("--surrogate", default="sigmoid", choices=["sigmoid", "superspike", "sigmoid_derivative", "esser"],
                    help="SpikingJelly's Sigmoid (default) or one of seed 001's hand-written surrogates")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, 32, 32)
    y = torch.randint(0, 10, (args.batch,))
    base = BasicCSNN(T=args.T, surrogate_function=_surrogate(args.surrogate))
    rates: Dict[str, float] = {}
    if args.rate > 0:
        # NOTE: realistic firing (DESIGN.md): a fresh net is nearly silent past its first layer, which
        # flatters spike-driven code; the weights feeding each neuron layer are scaled to ~args.rate
        from tools._rates import calibrate
        base.train()
        rates = calibrate(base, lambda: base(x), lambda: base(x), target=args.rate).rates
    variants: Dict[str, nn.Module] = {"eager": copy.deepcopy(base), "snncc": snncc.compile(copy.deepcopy(base)),
                                      "snncc-max": snncc.compile(copy.deepcopy(base), memory="max"),
                                      "snncc-half": snncc.compile(copy.deepcopy(base), memory="half"),
                                      "snncc-min": snncc.compile(copy.deepcopy(base), memory="min")}
    if args.torch_compile:
        variants["torch.compile"] = torch.compile(copy.deepcopy(base))
    if args.variants:
        keep = [v.strip() for v in args.variants.split(",") if v.strip()]
        variants = {k: variants[k] for k in keep}
    opts = {k: torch.optim.Adam(m.parameters(), lr=1e-3) for k, m in variants.items()}
    times: Dict[str, Dict[str, List[float]]] = {k: {"train": [], "infer": []} for k in variants}
    for k, m in variants.items():            # warm-up: specialization, compilation, allocator
        m.train()
        _train_step(m, opts[k], x, y)
        _train_step(m, opts[k], x, y)
        m.eval()
        with torch.no_grad():
            m(x)
            m(x)
    for _ in range(args.rounds):
        for k, m in variants.items():
            m.train()
            for _ in range(args.reps):
                times[k]["train"].append(_timed(lambda: _train_step(m, opts[k], x, y)))
            m.eval()
            with torch.no_grad():
                for _ in range(args.reps):
                    times[k]["infer"].append(_timed(lambda: m(x)))
    med = {k: {mode: statistics.median(v) for mode, v in d.items()} for k, d in times.items()}
    for k, m in variants.items():
        m.train()
        med[k]["saved_mb"] = saved_bytes(m, x) / 2 ** 20
    sj = _sj_version()
    print(f"CSNN T={args.T} batch={args.batch} surrogate={args.surrogate} | torch {torch.__version__} | spikingjelly {sj}"
          f" | {platform.processor() or platform.machine()} | {torch.get_num_threads()} threads | {datetime.date.today()}")
    if rates:
        print("firing rates (eager, per neuron layer): " + ", ".join(f"{k} {v:.3f}" for k, v in rates.items()))
    print(f"{'variant':<15}{'train ms':>10}{'infer ms':>10}{'train x':>9}{'infer x':>9}{'saved MB':>10}{'saved /' + next(iter(med))[:6]:>13}")
    ref = med[next(iter(med))]
    for k, d in med.items():
        print(f"{k:<15}{d['train']:>10.1f}{d['infer']:>10.1f}{ref['train'] / d['train']:>9.2f}"
              f"{ref['infer'] / d['infer']:>9.2f}{d['saved_mb']:>10.1f}{d['saved_mb'] / ref['saved_mb']:>13.3f}")
    for plan in (variants["snncc"].memory_plans.values() if "snncc" in variants else ()):
        if not plan.layers:                  # the eval specialization keeps nothing
            continue
        print("snncc default " + plan.summary())
        for layer, d in plan.by_layer().items():
            print(f"  {layer}: keep {d['keep']}, {d['kept_bytes'] / 2 ** 20:.1f} MiB, recompute "
                  f"{d['recompute_us'] / 1e3:.2f} ms ({d['why']})")
    if "torch.compile" in med and "snncc" in med:
        tc = med["torch.compile"]
        print(f"snncc vs torch.compile: train {tc['train'] / med['snncc']['train']:.2f}x, "
              f"infer {tc['infer'] / med['snncc']['infer']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"T": args.T, "batch": args.batch, "torch": torch.__version__, "spikingjelly": sj,
                       "date": str(datetime.date.today()), "rates": rates, "medians_ms": med}, f, indent=1)
    return med


def _sj_version() -> str:
    try:
        import importlib.metadata
        return importlib.metadata.version("spikingjelly")
    except Exception:
        return "not installed"


def saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd keeps for backward after one forward (each storage once)."""
    from tools._memory import saved_bytes as saved
    return saved(lambda: model(x))


if __name__ == "__main__":
    main()
