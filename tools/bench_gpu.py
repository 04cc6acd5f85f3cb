"""GPU benchmark (issue 4's table): eager loop, SpikingJelly multi-step, torch.compile, snncc, ANN floor.

Runs in one process, variants interleaved per round, medians reported. Per model and mode (train = forward
+ backward + SGD step, infer = eval under no_grad) it records the time and the peak memory (CUDA:
``torch.cuda.max_memory_allocated``; CPU: null). Writes ``tools/results/<device>.json``: a list of records
``{model, T, batch, mode, variant, ms, peak_mem_mb, device, torch, date}`` (variant: eager,
spikingjelly-<backend>, torch.compile, snncc, ann_floor; a variant that cannot run is recorded with
``"skipped": reason`` and null numbers), and prints a Markdown table for the README.

    python tools/bench_gpu.py                       # all models, on cuda if available
    python tools/bench_gpu.py --quick --device cpu  # tiny shapes: a smoke test of the script itself

Models: seed 001's CSNN (3x32x32, T=8, batch 64 and 256), TET's VGGSNN (2x48x48 frames, T=10, batch 32),
SEW-ResNet18 (3x64x64, T=4, batch 32; SpikingJelly's model zoo, skipped without SpikingJelly). The ANN
floor is the same network with every neuron replaced by ReLU, compiled by snncc (first layer once for a
static input, the rest over ``[T*N, ...]``): what the layers cost without any spiking dynamics.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import snncc  # noqa: E402
from snncc.frontend import is_stateful  # noqa: E402

VARIANTS = ("eager", "spikingjelly", "torch.compile", "snncc", "snncc-graphs", "snncc-streams", "ann_floor")
#: snncc-graphs: compile(..., cuda_graphs=True); snncc-streams: compile(..., chunk="auto", streams=4)
_SNNCC_OPTIONS = {"snncc": {}, "snncc-graphs": {"cuda_graphs": True},
                  "snncc-streams": {"chunk": "auto", "streams": 4}}


# --------------------------------------------------------------------------- models
class StepCSNN(nn.Module):
    """Seed 001's CSNN, one timestep per call. With SpikingJelly: its LIF and its layer wrappers (which
    also run in its multi-step mode); without: snncc's LIF and torch layers."""

    def __init__(self, size: int = 32, classes: int = 10) -> None:
        super().__init__()
        try:
            from spikingjelly.activation_based import layer, neuron, surrogate
            L, lif = layer, (lambda: neuron.LIFNode(surrogate_function=surrogate.Sigmoid()))
        except ImportError:
            L, lif = nn, (lambda: snncc.LIF())
        self.net = nn.Sequential(
            L.Conv2d(3, 32, 3, padding=1), lif(), L.MaxPool2d(2),
            L.Conv2d(32, 64, 3, padding=1), lif(), L.MaxPool2d(2), L.Flatten(),
            L.Linear(64 * (size // 4) ** 2, 128), lif(), L.Linear(128, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _torchvision_stub() -> None:
    """SpikingJelly's model zoo imports torchvision only to download pretrained weights (never used here);
    without torchvision, register the one submodule it imports, whose download function raises."""
    import importlib.util
    import types
    if importlib.util.find_spec("torchvision") is not None or "torchvision._internally_replaced_utils" in sys.modules:
        return
    stub = types.ModuleType("torchvision._internally_replaced_utils")

    def load_state_dict_from_url(*a: Any, **k: Any) -> None:
        raise RuntimeError("pretrained weights need torchvision and a network")
    stub.load_state_dict_from_url = load_state_dict_from_url
    sys.modules[stub.__name__] = stub


def build(name: str, quick: bool) -> Tuple[Callable[[], nn.Module], Tuple[int, ...], int, bool, Optional[str]]:
    """(factory, input shape of one sample, T, sequence input?, reason it cannot be built or None)."""
    if name == "csnn":
        size = 16 if quick else 32
        return (lambda: StepCSNN(size)), (3, size, size), (2 if quick else 8), False, None
    if name == "vggsnn":
        from examples.tet import VGGSNN
        size = 16 if quick else 48
        return (lambda: VGGSNN(2, 10, size, 0.125 if quick else 1.0)), (2, size, size), (2 if quick else 10), \
            True, None
    if name == "sew_resnet18":
        try:
            _torchvision_stub()
            from spikingjelly.activation_based import neuron, surrogate
            from spikingjelly.activation_based.model import sew_resnet
        except ImportError as e:
            return (lambda: nn.Identity()), (3, 64, 64), 4, False, f"needs SpikingJelly's model zoo ({e})"
        size = 32 if quick else 64
        return (lambda: sew_resnet.sew_resnet18(num_classes=10, spiking_neuron=neuron.IFNode, cnf="ADD",
                                                surrogate_function=surrogate.ATan(), detach_reset=True)), \
            (3, size, size), (2 if quick else 4), False, None
    raise ValueError(f"unknown model {name!r}")


# --------------------------------------------------------------------------- variants
def eager_loop(model: nn.Module, T: int, sequence: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    def run(x: torch.Tensor) -> torch.Tensor:
        snncc.reset(model)
        return torch.stack([model(x[t] if sequence else x) for t in range(T)]).mean(0)
    return run


def sj_multistep(model: nn.Module, T: int, sequence: bool) -> Tuple[Optional[Callable], str]:
    """SpikingJelly multi-step mode with its fastest backend (cupy on CUDA when installed, else torch)."""
    try:
        from spikingjelly.activation_based import functional, neuron
    except ImportError:
        return None, "spikingjelly not installed"
    if not any(isinstance(m, neuron.BaseNode) for m in model.modules()):
        return None, "model has no SpikingJelly neurons"
    functional.set_step_mode(model, "m")
    backend = "torch"
    if next(model.parameters()).is_cuda:
        try:
            import cupy  # noqa: F401
            functional.set_backend(model, "cupy", neuron.BaseNode)
            backend = "cupy"
        except Exception:
            backend = "torch"

    def run(x: torch.Tensor) -> torch.Tensor:
        functional.reset_net(model)
        xs = x if sequence else x.unsqueeze(0).expand(T, *x.shape).contiguous()
        return model(xs).mean(0)
    return run, backend


def relu_copy(model: nn.Module) -> nn.Module:
    """The same network with every stateful (neuron) module replaced by ReLU."""
    m = copy.deepcopy(model)
    for name, sub in list(m.named_modules()):
        if name and is_stateful(sub):
            parent = m.get_submodule(name.rsplit(".", 1)[0]) if "." in name else m
            setattr(parent, name.rsplit(".", 1)[-1], nn.ReLU())
    return m


def make_variants(factory: Callable[[], nn.Module], T: int, sequence: bool, device: torch.device,
                  which: List[str]) -> Dict[str, Tuple[Optional[Callable], Optional[nn.Module], Optional[str]]]:
    """name -> (callable x -> output, the module whose parameters train, skip reason)."""
    torch.manual_seed(0)
    base = factory().to(device)
    out: Dict[str, Tuple[Optional[Callable], Optional[nn.Module], Optional[str]]] = {}
    for v in which:
        m = copy.deepcopy(base)
        try:
            if v == "eager":
                out[v] = (eager_loop(m, T, sequence), m, None)
            elif v == "spikingjelly":
                fn, why = sj_multistep(m, T, sequence)
                out[f"spikingjelly-{why}" if fn else v] = (fn, m, None if fn else why)
            elif v == "torch.compile":
                out[v] = (torch.compile(eager_loop(m, T, sequence)), m, None)
            elif v in _SNNCC_OPTIONS:
                kw = _SNNCC_OPTIONS[v]
                cm = snncc.compile(m, sequence=True, **kw) if sequence else snncc.compile(m, T=T, **kw)
                out[v] = ((lambda c: lambda x: c(x).mean(0))(cm), m, None)
            elif v == "ann_floor":
                r = relu_copy(m)
                cm = snncc.compile(r, sequence=True) if sequence else snncc.compile(r, T=T)
                out[v] = ((lambda c: lambda x: c(x).mean(0))(cm), r, None)
        except Exception as e:          # a variant that cannot be built is reported, not fatal
            out[v] = (None, None, f"{type(e).__name__}: {e}")
    return out


# --------------------------------------------------------------------------- measuring
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device) -> Tuple[float, Optional[float]]:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    ms = (time.perf_counter() - t0) * 1e3
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None
    return ms, peak


def bench_model(name: str, batch: int, device: torch.device, which: List[str], rounds: int, quick: bool
                ) -> List[Dict[str, Any]]:
    factory, shape, T, sequence, why = build(name, quick)
    meta = {"model": name, "T": T, "batch": batch, "device": _device_name(device), "torch": torch.__version__,
            "date": str(datetime.date.today())}
    if why:
        return [dict(meta, mode=mode, variant=v, ms=None, peak_mem_mb=None, skipped=why)
                for mode in ("train", "infer") for v in which]
    torch.manual_seed(1)
    x = torch.rand((T, batch) + shape if sequence else (batch,) + shape, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    variants = make_variants(factory, T, sequence, device, which)
    opts = {k: torch.optim.SGD(m.parameters(), lr=1e-3) for k, (f, m, _) in variants.items() if f is not None}

    def train(k: str) -> None:
        f, m, _ = variants[k]
        m.train()
        opts[k].zero_grad(set_to_none=True)
        nn.functional.cross_entropy(f(x), y).backward()
        opts[k].step()

    def infer(k: str) -> None:
        f, m, _ = variants[k]
        m.eval()
        with torch.no_grad():
            f(x)
    times: Dict[Tuple[str, str], List[Tuple[float, Optional[float]]]] = {}
    live = [k for k, (f, _, _) in variants.items() if f is not None]
    for k in list(live):                      # warm-up (compilation, specialization, allocator)
        try:
            for _ in range(2):
                train(k)
                infer(k)
        except Exception as e:
            variants[k] = (None, None, f"{type(e).__name__}: {e}")
            live.remove(k)
    for _ in range(rounds):
        for k in live:
            for mode, fn in (("train", train), ("infer", infer)):
                times.setdefault((k, mode), []).append(_timed(lambda: fn(k), device))
    records = []
    for k, (f, _, reason) in variants.items():
        for mode in ("train", "infer"):
            got = times.get((k, mode))
            if not got:
                records.append(dict(meta, mode=mode, variant=k, ms=None, peak_mem_mb=None,
                                    skipped=reason or "did not run"))
                continue
            peaks = [p for _, p in got if p is not None]
            records.append(dict(meta, mode=mode, variant=k, ms=statistics.median(t for t, _ in got),
                                peak_mem_mb=max(peaks) if peaks else None))
    return records


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


def markdown(records: List[Dict[str, Any]]) -> str:
    """A README table: one row per (model, batch, mode), ms per variant and the ratio eager/snncc."""
    rows: Dict[Tuple[str, int, str], Dict[str, Any]] = {}
    names: List[str] = []
    for r in records:
        rows.setdefault((r["model"], r["batch"], r["mode"]), {})[r["variant"]] = r
        if r["variant"] not in names:
            names.append(r["variant"])
    head = "| model | batch | mode | " + " | ".join(names) + " | snncc vs eager |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for (model, batch, mode), d in rows.items():
        cells = []
        for n in names:
            r = d.get(n)
            cells.append("skipped" if r is None or r["ms"] is None else f"{r['ms']:.1f} ms")
        e, s = d.get("eager"), d.get("snncc")
        ratio = f"{e['ms'] / s['ms']:.2f}x" if e and s and e["ms"] and s["ms"] else "-"
        lines.append(f"| {model} | {batch} | {mode} | " + " | ".join(cells) + f" | {ratio} |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> List[Dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--models", default="csnn,vggsnn,sew_resnet18")
    ap.add_argument("--variants", default=None,
                    help=f"comma-separated, from {', '.join(VARIANTS)} (default: all; on CPU without the "
                         "GPU-only snncc-graphs and snncc-streams)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="tiny shapes and batches: a smoke test")
    ap.add_argument("--out", help="JSON file (default tools/results/<device>.json)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    default = VARIANTS if device.type == "cuda" else tuple(v for v in VARIANTS
                                                            if v not in ("snncc-graphs", "snncc-streams"))
    which = [v.strip() for v in (args.variants or ",".join(default)).split(",") if v.strip()]
    bad = [v for v in which if v not in VARIANTS]
    if bad:
        ap.error(f"unknown variant(s) {bad}; choose from {', '.join(VARIANTS)}")
    plan = {"csnn": [64, 256], "vggsnn": [32], "sew_resnet18": [32]}
    records: List[Dict[str, Any]] = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        if name not in plan:
            ap.error(f"unknown model {name!r}; choose from {', '.join(plan)}")
        for batch in ([2] if args.quick else plan[name]):
            records += bench_model(name, batch, device, which, 1 if args.quick else args.rounds, args.quick)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   _device_name(device).replace(" ", "_") + ".json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(records, f, indent=1)
    print(markdown(records))
    print(f"records written to {out}")
    return records


if __name__ == "__main__":
    main()
