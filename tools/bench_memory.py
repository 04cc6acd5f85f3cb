"""Benchmark: the peak memory of one training step of seed 001's CSNN, per variant and batch size, and the
largest batch each variant trains within a memory budget.

Variants: the eager loop, SpikingJelly's multi-step mode of the same layers, and ``snncc.compile`` with ``memory="max"`` (H and spike bits kept for every
layer), the default plan (passes/plan_memory.py, measured on its first training steps at each batch
size) and ``memory="min"``. The model's weights are scaled once (tools/_rates.py, at ``--calib-batch``)
so that every neuron layer fires about ``--rate`` (10%); the rates are printed.

*Peak*: the peak of torch's allocated CPU memory during one training step (forward + cross-entropy +
backward + Adam, after warm-up steps), above what was allocated before it -- every allocation and free
from the profiler's memory events, summed in time order (``tools/_memory.py``'s ``peak_bytes``).
snncc's CPU buffer pool (``runtime/buffers.py``, a speed cache of freed buffers) is off by default here
(``SNNCC_POOL_MB=0``), so every buffer is an allocation the profiler sees; with ``--pool`` it stays on and
the bytes it holds when the step starts are added (they are allocated before it and reused inside it).
Resident memory is no measure on a CPU (the C allocator keeps freed memory). *Saved*: bytes kept for
backward after one forward (each storage once). A variant is measured at growing batch sizes until its
peak passes ``--budget-mib``, then bisected between the last size within the budget and the first over
it (to ``--resolution`` samples); "largest batch" is the largest measured size within the budget.

    python tools/bench_memory.py                       # budget 1 GiB, batches 16 ... 2048
    python tools/bench_memory.py --budget-mib 256 --max-batch 256 --json out.json
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import sys
from typing import Any, Dict, List, Optional

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import snncc  # noqa: E402
from examples.csnn import BasicCSNN  # noqa: E402
from snncc.runtime import buffers  # noqa: E402
from tools._memory import peak_bytes, saved_bytes  # noqa: E402

#: variant -> snncc.compile options (None: the eager loop)
VARIANTS: Dict[str, Optional[Dict[str, Any]]] = {
    "eager": None,
    "spikingjelly multi-step": None,
    "snncc max": {"memory": "max"},
    "snncc default": {},
    "snncc min": {"memory": "min"},
}


def batch_sizes(lo: int, hi: int) -> List[int]:
    """lo, 1.5 lo, 2 lo, 3 lo, 4 lo, ... up to hi (steps of about sqrt 2)."""
    out, b = [], lo
    while b <= hi:
        out.append(b)
        if b * 3 // 2 <= hi and b % 2 == 0:
            out.append(b * 3 // 2)
        b *= 2
    return sorted(set(out))


def _step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


class SJMultiStep(nn.Module):
    """The CSNN in SpikingJelly's own multi-step mode (``tools/prof.py``'s conversion: stateless layers in
    ``SeqToANNContainer``, neurons ``step_mode='m'``, their default backend): the static input repeated
    over T, the mean of the T outputs, as ``BasicCSNN.forward``."""

    def __init__(self, csnn: nn.Module) -> None:
        super().__init__()
        import logging
        from tools.prof import _to_multistep
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)           # set_step_mode warns about every plain layer it wraps
        try:
            self.net = _to_multistep(copy.deepcopy(csnn.net))
        finally:
            root.setLevel(level)
        self.T = csnn.T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from spikingjelly.activation_based import functional
        functional.reset_net(self.net)
        return self.net(x.unsqueeze(0).repeat(self.T, *([1] * x.dim()))).mean(0)


def _build(base: nn.Module, name: str) -> nn.Module:
    opts = VARIANTS[name]
    if name == "spikingjelly multi-step":
        return SJMultiStep(base)
    return copy.deepcopy(base) if opts is None else snncc.compile(copy.deepcopy(base), **opts)


def measure(base: nn.Module, name: str, batch: int, T: int, warmup: int = 3) -> Dict[str, float]:
    """Saved and peak bytes (MiB) of one training step of variant ``name`` at ``batch``."""
    torch.manual_seed(1)
    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))
    opts = VARIANTS[name]
    buffers.clear()                  # nothing pooled from an earlier variant or batch size
    model = _build(base, name)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    for _ in range(warmup):          # trace, kernels, Adam's state; the default plan is measured here
        _step(model, opt, x, y)
    saved = saved_bytes(lambda: model(x), exclude={x.untyped_storage().data_ptr()})
    # NOTE: snncc's CPU buffer pool (runtime/buffers.py) holds its buffers between steps, allocated before
    # the profiled step: they count in full, as memory in use for the whole step
    pooled = buffers.pooled_bytes()
    peak = pooled + peak_bytes(lambda: _step(model, opt, x, y))
    out = {"saved_mib": saved / 2 ** 20, "peak_mib": peak / 2 ** 20, "pooled_mib": pooled / 2 ** 20}
    if opts is not None:
        for plan in model.memory_plans.values():
            out["plan"] = {k: v["keep"] for k, v in plan.by_layer().items()}
    del model, opt
    return out


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, default=8)
    ap.add_argument("--budget-mib", type=float, default=1024.0, help="the memory budget (MiB)")
    ap.add_argument("--min-batch", type=int, default=16)
    ap.add_argument("--max-batch", type=int, default=2048)
    ap.add_argument("--rate", type=float, default=0.10, help="target firing rate of every neuron layer")
    ap.add_argument("--calib-batch", type=int, default=32)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ", ".join(VARIANTS))
    ap.add_argument("--resolution", type=int, default=8, help="the largest batch is found to this many samples")
    ap.add_argument("--pool", action="store_true",
                    help="keep snncc's CPU buffer pool on (its held bytes are added to the peak); default off")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    if not args.pool:
        os.environ["SNNCC_POOL_MB"] = "0"        # every buffer a real allocation, seen by the profiler
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    torch.manual_seed(0)
    base = BasicCSNN(T=args.T)
    base.train()
    rates: Dict[str, float] = {}
    if args.rate > 0:
        from tools._rates import calibrate
        xc = torch.randn(args.calib_batch, 3, 32, 32)
        rates = calibrate(base, lambda: base(xc), lambda: base(xc), target=args.rate).rates
    sizes = batch_sizes(args.min_batch, args.max_batch)
    print(f"CSNN T={args.T} | snncc {getattr(snncc, '__version__', '?')} | torch {torch.__version__} | "
          f"{platform.machine()} | {torch.get_num_threads()} threads | {datetime.date.today()} | "
          f"budget {args.budget_mib:.0f} MiB | buffer pool {'on' if args.pool else 'off'}")
    if rates:
        print("firing rates (eager, per neuron layer): " + ", ".join(f"{k} {v:.3f}" for k, v in rates.items()))
    res: Dict[str, Dict[int, Dict[str, float]]] = {n: {} for n in names}
    for n in names:
        for b in sizes:
            r = measure(base, n, b, args.T)
            res[n][b] = r
            print(f"  {n:<14} batch {b:>5}: peak {r['peak_mib']:8.1f} MiB, saved {r['saved_mib']:8.1f} MiB"
                  + (f", plan {r['plan']}" if "plan" in r else ""), flush=True)
            if r["peak_mib"] > args.budget_mib:
                break
    largest = {n: max((b for b, r in res[n].items() if r["peak_mib"] <= args.budget_mib), default=0) for n in names}
    for n in names:          # bisection between the largest size within the budget and the first over it
        over = [b for b, r in res[n].items() if r["peak_mib"] > args.budget_mib]
        lo, hi = largest[n], min(over, default=0)
        while lo and hi and hi - lo > args.resolution:
            mid = (lo + hi) // 2 // args.resolution * args.resolution
            if mid <= lo:
                break
            r = res[n][mid] = measure(base, n, mid, args.T)
            print(f"  {n:<14} batch {mid:>5}: peak {r['peak_mib']:8.1f} MiB, saved {r['saved_mib']:8.1f} MiB (bisection)",
                  flush=True)
            lo, hi = (mid, hi) if r["peak_mib"] <= args.budget_mib else (lo, mid)
        largest[n] = lo
    shown = sorted({b for n in names for b in res[n]})
    print(f"\npeak MiB of one training step (saved for backward in brackets); '>' = over the {args.budget_mib:.0f} "
          "MiB budget, '' = not measured")
    wd = max([22] + [len(n) + 2 for n in names])     # column width: the longest variant name fits
    print(f"{'batch':>6}" + "".join(f"{n:>{wd}}" for n in names))
    for b in shown:
        cells = []
        for n in names:
            r = res[n].get(b)
            cells.append("" if r is None else f"{'>' if r['peak_mib'] > args.budget_mib else ''}"
                         f"{r['peak_mib']:.0f} ({r['saved_mib']:.0f})")
        print(f"{b:>6}" + "".join(f"{c:>{wd}}" for c in cells))
    ref = largest.get("eager") or None
    capped = {n: not any(r["peak_mib"] > args.budget_mib for r in res[n].values()) for n in names}
    print(f"{'largest':>6}" + "".join(f"{('>=' if capped[n] else '') + str(largest[n]):>{wd}}" for n in names)
          + ("   ('>=': --max-batch reached within the budget)" if any(capped.values()) else ""))
    if ref:
        print(f"{'vs eager':>6}" + "".join(f"{largest[n] / ref:>{wd - 1}.1f}x" for n in names))
    result = {"T": args.T, "budget_mib": args.budget_mib, "rates": rates, "results": res, "largest_batch": largest, "largest_is_lower_bound": capped,
              "pool": args.pool, "torch": torch.__version__, "date": str(datetime.date.today()), "machine": platform.machine(),
              "threads": torch.get_num_threads()}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
