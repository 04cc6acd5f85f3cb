"""snncc-prof: where the time and memory of a compiled SNN go, task by task, and how it compares.

    snncc-prof examples/csnn.py:StepCSNN --input-shape 3,32,32 --batch 8 -T 4 \\
        --compare eager,torch.compile,snncc --json prof.json --trace prof.trace.json

1. Profiles the compiled model for ``--steps`` runs (after ``--warmup``): per task (and per layer) the
   forward and backward time, spike rate, bytes saved for backward and bytes of its output; totals and
   peak memory (``torch.cuda.max_memory_allocated`` on CUDA; on CPU, which has no allocator peak counter,
   the activation bytes -- saved for backward + task outputs -- and the process's max RSS, each labelled).
   How each number is measured: ``snncc.tools._taskprof``. Each task's ``op`` says what ``snncc.explain``
   says of it: the kernel a neuron runs (built-in, or generated from its step code) and, for a module run
   opaque, why (also listed under the table, and as ``fate`` in the JSON's tasks and layers).
2. ``--compare``: runs the variants side by side, interleaved (every repetition runs each variant once),
   and reports medians of a training step (forward + backward of a stand-in loss; no optimizer, so every
   variant keeps the same weights) and of inference (``eval()``, ``no_grad``), with ratios to eager.
   A variant that cannot run is reported as skipped, with the reason, never silently dropped.
3. A rich table on the terminal; ``--json FILE`` for machines; ``--trace FILE`` a Chrome/Perfetto trace
   (open in https://ui.perfetto.dev or chrome://tracing) with one event per task forward and per autograd
   node of its backward.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

import snncc

from snncc.explain import task_fates

from ._loader import ModelSpecError, Workload, add_workload_args, annotate_fates, flatten_tensors, workload_from_args
from ._taskprof import (TaskProfiler, TaskRow, _loss, median_run, memory_plan_lines, memory_plan_of, param_storages,
                        profile_compiled, task_rows)

__all__ = ["main", "VARIANTS", "Variant", "build_variants", "compare", "chrome_trace", "layer_rows",
           "report_json"]

#: the variants --compare knows, in the order they are shown
VARIANTS = ("eager", "torch.compile", "spikingjelly", "snncc")
_ALIASES = {"torch_compile": "torch.compile", "compile": "torch.compile", "inductor": "torch.compile",
            "sj": "spikingjelly"}
RATIO_DEFINITION = "eager median ms / variant median ms (> 1: faster than eager)"


# --------------------------------------------------------------------------- variants
@dataclass
class Variant:
    """One way of running the workload: ``fn(x)`` runs all T steps from the reset state."""

    name: str
    module: Optional[nn.Module] = None
    fn: Optional[Callable[[torch.Tensor], Any]] = None
    x: Optional[torch.Tensor] = None
    skipped: Optional[str] = None
    train_ms: List[float] = field(default_factory=list)
    infer_ms: List[float] = field(default_factory=list)
    saved_bytes: Optional[int] = None
    peak_bytes: Optional[int] = None
    max_abs_diff: Optional[float] = None


def parse_variants(text: str) -> List[str]:
    """``'eager,torch.compile,snncc'`` -> known names in the given order; unknown names are an error."""
    if text.strip().lower() in ("", "none"):
        return []
    out = []
    for raw in text.split(","):
        name = _ALIASES.get(raw.strip().lower(), raw.strip().lower())
        if name not in VARIANTS:
            raise ModelSpecError(f"--compare: unknown variant {raw.strip()!r}; choose from {', '.join(VARIANTS)}")
        if name not in out:
            out.append(name)
    return out


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def _has_spikingjelly_neurons(model: nn.Module) -> bool:
    if "spikingjelly.activation_based.neuron" not in sys.modules:
        return False
    from spikingjelly.activation_based import neuron
    return any(isinstance(m, neuron.BaseNode) for m in model.modules())


def _to_multistep(module: nn.Module) -> nn.Module:
    """SpikingJelly's multi-step form of a step model: stateless leaf layers inside ``nn.Sequential``s are
    wrapped in ``SeqToANNContainer`` (they then see ``[T*N, ...]``), neurons switch to ``step_mode='m'``.

    Custom modules with their own ``forward`` are left as they are; if they cannot take ``[T, N, ...]``
    the first call fails and the variant is reported as skipped with that error.
    """
    from spikingjelly.activation_based import base, functional, layer

    def convert(m: nn.Module) -> nn.Module:
        if isinstance(m, base.StepModule):
            return m
        if isinstance(m, nn.Sequential):
            for key, child in list(m._modules.items()):
                if child is not None:
                    m._modules[key] = convert(child)
            return m
        if not list(m.children()):
            return layer.SeqToANNContainer(m)
        for key, child in list(m._modules.items()):
            if isinstance(child, nn.Sequential):
                m._modules[key] = convert(child)
        return m

    converted = convert(module)
    functional.set_step_mode(converted, "m")
    return converted


def _spikingjelly_variant(w: Workload, x: torch.Tensor) -> Variant:
    """SpikingJelly's own multi-step mode on a deep copy, input repeated over T (static form)."""
    if "spikingjelly" not in sys.modules and not _importable("spikingjelly"):
        return Variant("spikingjelly", skipped="spikingjelly is not installed")
    if not _has_spikingjelly_neurons(w.model):
        return Variant("spikingjelly", skipped="the model has no SpikingJelly neurons")
    if w.form == "loop":
        return Variant("spikingjelly", skipped="the model loops over time itself; SpikingJelly's multi-step "
                                               "mode needs a step model (use the static or --sequence form)")
    import logging
    from spikingjelly.activation_based import functional
    root_logger = logging.getLogger()
    level = root_logger.level
    root_logger.setLevel(logging.ERROR)                 # set_step_mode warns about every plain layer it sees
    try:
        m = _to_multistep(w.copy_model())
    finally:
        root_logger.setLevel(level)
    T, form = w.T, w.form

    def run(xx: torch.Tensor) -> Any:
        functional.reset_net(m)
        seq = xx if form == "sequence" else xx.unsqueeze(0).repeat(T, *([1] * xx.dim()))
        return m(seq)
    return Variant("spikingjelly", m, run, x)


def _importable(name: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(name) is not None


def build_variants(w: Workload, names: Sequence[str], x: torch.Tensor,
                   compile_backend: str = "inductor") -> List[Variant]:
    """Each variant on its own deep copy of the model (same initial weights, no shared state)."""
    out = []
    for name in names:
        if name == "eager":
            m = w.copy_model()
            out.append(Variant(name, m, w.eager(m), x))
        elif name == "snncc":
            m = w.copy_model()
            cm = w.compile(m)
            out.append(Variant(name, cm, cm, x))
        elif name == "torch.compile":
            m = w.copy_model()
            try:
                fn = torch.compile(w.eager(m), backend=compile_backend)
            except Exception as exc:                      # noqa: BLE001 -- reported, not raised
                out.append(Variant(name, skipped=f"torch.compile unavailable: {_first_line(exc)}"))
                continue
            out.append(Variant(name, m, fn, x))
        elif name == "spikingjelly":
            out.append(_spikingjelly_variant(w, x))
    return out


# --------------------------------------------------------------------------- timing
def _sync(x: torch.Tensor) -> None:
    if x.device.type == "cuda":
        torch.cuda.synchronize()


def _train_once(v: Variant) -> float:
    """Forward + backward of the stand-in loss, in ms (gradients cleared first, no optimizer step)."""
    for p in v.module.parameters():
        p.grad = None
    _sync(v.x)
    t0 = time.perf_counter()
    loss = _loss(v.fn(v.x))
    if loss is not None:
        loss.backward()
    _sync(v.x)
    return (time.perf_counter() - t0) * 1e3


def _infer_once(v: Variant) -> Tuple[float, Any]:
    _sync(v.x)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = v.fn(v.x)
    _sync(v.x)
    return (time.perf_counter() - t0) * 1e3, out


def _max_abs_diff(a: Any, b: Any) -> Optional[float]:
    ta, tb = flatten_tensors(a), flatten_tensors(b)
    if len(ta) != len(tb) or any(p.shape != q.shape for p, q in zip(ta, tb)):
        return None
    return max((float((p.double() - q.double()).abs().max()) for p, q in zip(ta, tb) if p.numel()), default=0.0)


def _saved_bytes(v: Variant, exclude: set) -> Optional[int]:
    """Unique storages saved for backward during one training forward (parameters/buffers excluded)."""
    from ._memory import saved_bytes
    v.module.train()
    try:
        return saved_bytes(lambda: v.fn(v.x), exclude)
    except Exception:                                   # noqa: BLE001 -- e.g. a backend refusing the hooks
        return None


def _peak_bytes(v: Variant) -> Optional[int]:
    """CUDA only: the allocator's peak during one training step (CPU has no such counter)."""
    if v.x.device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    v.module.train()
    _train_once(v)
    return int(torch.cuda.max_memory_allocated())


def compare(variants: List[Variant], warmup: int, repeat: int, log: Callable[[str], None] = lambda s: None) -> None:
    """Warm every variant up (a failure marks it skipped), then time them interleaved, ``repeat`` times."""
    outputs: Dict[str, Any] = {}
    for v in variants:
        if v.skipped:
            continue
        log(f"warm-up: {v.name}")
        try:
            for _ in range(max(1, warmup)):
                v.module.train()
                _train_once(v)
                v.module.eval()
                _, outputs[v.name] = _infer_once(v)
        except Exception as exc:                        # noqa: BLE001 -- reported as a skip reason
            v.skipped = f"failed to run: {_first_line(exc)}"
    live = [v for v in variants if not v.skipped]
    if "eager" in outputs:                              # same weights, eval mode: outputs should agree
        for v in live:
            if v.name != "eager":
                v.max_abs_diff = _max_abs_diff(outputs["eager"], outputs[v.name])
    outputs.clear()
    for _ in range(repeat):
        for v in live:
            v.module.train()
            v.train_ms.append(_train_once(v))
        for v in live:
            v.module.eval()
            v.infer_ms.append(_infer_once(v)[0])
    for v in live:
        exclude = param_storages(v.module)
        v.saved_bytes = _saved_bytes(v, exclude)
        v.peak_bytes = _peak_bytes(v)
        v.module.train()
        for p in v.module.parameters():
            p.grad = None


def variant_summary(variants: List[Variant]) -> Dict[str, Dict[str, Any]]:
    """Medians and ratios to eager, per variant (the ``variants`` object of the JSON report)."""
    med = {v.name: (statistics.median(v.train_ms) if v.train_ms else None,
                    statistics.median(v.infer_ms) if v.infer_ms else None) for v in variants}
    eager = med.get("eager", (None, None))
    out: Dict[str, Dict[str, Any]] = {}
    for v in variants:
        tr, inf = med[v.name]
        out[v.name] = {
            "train_ms": tr, "infer_ms": inf, "saved_bytes": v.saved_bytes, "peak_bytes": v.peak_bytes,
            "ratio_train_vs_eager": eager[0] / tr if eager[0] and tr else None,
            "ratio_infer_vs_eager": eager[1] / inf if eager[1] and inf else None,
            "max_abs_diff_vs_eager": v.max_abs_diff,
            "samples": {"train_ms": v.train_ms, "infer_ms": v.infer_ms},
            "skipped": v.skipped,
        }
    return out


# --------------------------------------------------------------------------- per-task report
def layer_rows(rows: List[TaskRow]) -> List[Dict[str, Any]]:
    """Per-layer sums over its tasks (spike rate weighted by output size), in first-appearance order."""
    out: Dict[str, Dict[str, Any]] = {}
    for r in rows:
        d = out.setdefault(r.layer, {"layer": r.layer, "op": r.op, "tasks": 0, "fwd_ms": 0.0, "bwd_ms": None,
                                     "spike_rate": None, "saved_bytes": 0, "out_bytes": 0, "fate": None,
                                     "_w": 0.0, "_s": 0.0, "_f": []})
        fate = getattr(r, "fate", None)          # set by annotate_fates (snncc.explain's words)
        if fate and fate not in d["_f"]:
            d["_f"].append(fate)
            d["fate"] = "; ".join(d["_f"])
        d["tasks"] += 1
        d["fwd_ms"] += r.fwd_ms
        if r.bwd_ms is not None:
            d["bwd_ms"] = (d["bwd_ms"] or 0.0) + r.bwd_ms
        d["saved_bytes"] += r.saved_bytes
        d["out_bytes"] += r.out_bytes
        if r.spike_rate is not None:
            weight = float(max(r.out_bytes, 1))
            d["_w"] += weight
            d["_s"] += weight * r.spike_rate
    for d in out.values():
        if d["_w"]:
            d["spike_rate"] = d["_s"] / d["_w"]
        del d["_w"], d["_s"], d["_f"]
    return list(out.values())


def _max_rss_bytes() -> Optional[int]:
    try:
        import resource
    except ImportError:
        return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if platform.system() == "Darwin" else rss * 1024)


def totals(prof: TaskProfiler, rows: List[TaskRow], device: torch.device) -> Dict[str, Any]:
    """Whole-run numbers, each with what it is (so nothing is read as something it is not)."""
    runs = prof.runs
    fwd_wall = statistics.median(r.forward_wall for r in runs) * 1e3 if runs else None
    bwd = [r.backward_wall for r in runs if r.backward_wall is not None]
    saved = sum(r.saved_bytes for r in rows)
    outb = sum(r.out_bytes for r in rows)
    out = {
        "forward_wall_ms": fwd_wall,
        "forward_tasks_ms": sum(r.fwd_ms for r in rows),
        "backward_wall_ms": statistics.median(bwd) * 1e3 if bwd else None,
        "backward_tasks_ms": sum(r.bwd_ms for r in rows if r.bwd_ms is not None) if bwd else None,
        "saved_bytes": saved,
        "output_bytes": outb,
        "activation_bytes": saved + outb,
        "process_max_rss_bytes": _max_rss_bytes(),
        "peak_bytes": None,
        "peak_note": "",
    }
    if device.type == "cuda":
        out["peak_bytes"] = int(torch.cuda.max_memory_allocated())
        out["peak_note"] = "torch.cuda.max_memory_allocated over the profiled runs"
    else:
        out["peak_note"] = ("CPU: no allocator peak counter; activation_bytes = saved for backward + task "
                            "outputs (unique storages, parameters excluded), an upper bound on what the "
                            "compiled run keeps alive; process_max_rss_bytes is the whole process's peak RSS")
    return out


def chrome_trace(prof: TaskProfiler, rows: List[TaskRow], meta: Dict[str, Any]) -> Dict[str, Any]:
    """The median profiled run as Chrome trace events: forward tasks on one track (the CPU runs one stream),
    backward autograd nodes on another, times in microseconds from the forward's start."""
    pid = 1
    events: List[Dict[str, Any]] = [
        {"name": "process_name", "ph": "M", "pid": pid, "tid": 0,
         "args": {"name": f"snncc {meta.get('model', '')}"}},
        {"name": "thread_name", "ph": "M", "pid": pid, "tid": 0,
         "args": {"name": "forward tasks (measured, one stream)"}},
        {"name": "thread_name", "ph": "M", "pid": pid, "tid": 1,
         "args": {"name": "backward: autograd nodes per task (measured)"}},
    ]
    run = median_run(prof)
    if run is None:
        return {"traceEvents": events, "displayTimeUnit": "ms", "otherData": meta}
    by_name = {r.name: r for r in rows}
    for name, (s, e) in sorted(run.fwd.items(), key=lambda kv: kv[1][0]):
        r = by_name.get(name)
        args = {"task": name}
        if r is not None:
            args.update(layer=r.layer, kind=r.kind, op=r.op, wave=r.wave, planned_lane=r.lane,
                        steps=[r.t0, r.t1], spike_rate=r.spike_rate, saved_bytes=run.saved.get(name, 0),
                        out_bytes=r.out_bytes, out_shape=[list(x) for x in r.out_shape])
        events.append({"name": r.label if r else name, "cat": "forward", "ph": "X", "ts": s * 1e6,
                       "dur": max(e - s, 0.0) * 1e6, "pid": pid, "tid": 0, "args": args})
    for name, spans in run.bwd.items():
        r = by_name.get(name)
        for s, e, node in spans:
            events.append({"name": f"{r.label if r else name} backward", "cat": "backward", "ph": "X",
                           "ts": s * 1e6, "dur": max(e - s, 0.0) * 1e6, "pid": pid, "tid": 1,
                           "args": {"task": name, "layer": r.layer if r else None, "autograd_node": node}})
    return {"traceEvents": events, "displayTimeUnit": "ms", "otherData": meta}


def report_json(meta: Dict[str, Any], variants: Dict[str, Dict[str, Any]], rows: List[TaskRow],
                layers: List[Dict[str, Any]], tot: Dict[str, Any]) -> Dict[str, Any]:
    return dict(meta, ratio_definition=RATIO_DEFINITION, variants=variants,
                tasks=[r.as_json() for r in rows], layers=layers, totals=tot)


# --------------------------------------------------------------------------- terminal
def _fmt_bytes(n: Optional[int]) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _fmt(x: Optional[float], spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def print_report(console: Any, meta: Dict[str, Any], rows: List[TaskRow], layers: List[Dict[str, Any]],
                 tot: Optional[Dict[str, Any]], variants: Dict[str, Dict[str, Any]], by: str) -> None:
    from rich.markup import escape
    from rich.table import Table
    console.print(f"[bold]snncc-prof[/bold] {meta['model']} | form={meta['form']} T={meta['T']} "
                  f"batch={meta['batch']} input={meta['input_shape']} | {meta['device']} | torch {meta['torch']} | "
                  f"{meta['threads']} threads | {meta['date']}")
    if rows:
        use_layers = by == "layer" or (by == "auto" and len(rows) > 40)
        title = (f"snncc {meta['mode']} run, medians of {meta['steps']} profiled runs "
                 f"({'per layer' if use_layers else 'per task'}; times with per-task hooks)")
        t = Table(title=title, title_justify="left")
        cols = ["layer", "op", "tasks", "fwd ms", "bwd ms", "spike rate", "saved", "output"] if use_layers else \
            ["task", "layer", "op", "steps", "wave/lane", "fwd ms", "bwd ms", "spike rate", "saved", "output"]
        for c in cols:
            t.add_column(c, justify="left" if c in ("task", "layer", "op", "steps") else "right")
        if use_layers:
            for d in layers:
                t.add_row(escape(d["layer"]), escape(d["op"]), str(d["tasks"]), _fmt(d["fwd_ms"], ".3f"),
                          _fmt(d["bwd_ms"], ".3f"), _fmt(d["spike_rate"], ".3f"), _fmt_bytes(d["saved_bytes"]),
                          _fmt_bytes(d["out_bytes"]))
        else:
            said: set = set()
            for r in rows:
                steps = "*" if r.t0 is None else (f"{r.t0}" if r.t1 - r.t0 == 1 else f"{r.t0}..{r.t1 - 1}")
                op = r.op
                if r.kind == "opaque" and getattr(r, "fate", None):      # the reason once per layer
                    op = op if r.layer not in said else op.replace(f"({r.fate})", "(opaque: reason above)")
                    said.add(r.layer)
                t.add_row(r.name, escape(r.layer), escape(op), steps, f"{r.wave}/{r.lane}", _fmt(r.fwd_ms, ".3f"),
                          _fmt(r.bwd_ms, ".3f"), _fmt(r.spike_rate, ".3f"), _fmt_bytes(r.saved_bytes),
                          _fmt_bytes(r.out_bytes))
        console.print(t)
        opaque = {r.layer: r.fate for r in rows if r.kind == "opaque" and getattr(r, "fate", None)}
        if opaque:
            console.print("opaque modules (run as is, step by step, at eager speed):", highlight=False)
            for layer, fate in opaque.items():
                why = fate[len("opaque: "):] if fate.startswith("opaque: ") else fate
                console.print(f"  {escape(layer)}: {escape(why)}",
                              highlight=False, soft_wrap=True)
    if tot:
        bwd = "" if tot["backward_wall_ms"] is None else \
            (f" | backward {tot['backward_wall_ms']:.2f} ms wall ({tot['backward_tasks_ms']:.2f} ms in "
             f"tasks' autograd nodes)")
        console.print(f"forward {tot['forward_wall_ms']:.2f} ms wall ({tot['forward_tasks_ms']:.2f} ms in tasks)"
                      f"{bwd}")
        mem = (f"peak {_fmt_bytes(tot['peak_bytes'])} (CUDA allocator)" if tot["peak_bytes"] is not None else
               f"activations {_fmt_bytes(tot['activation_bytes'])} (saved for backward "
               f"{_fmt_bytes(tot['saved_bytes'])} + task outputs {_fmt_bytes(tot['output_bytes'])}; CPU has no "
               f"allocator peak) | process max RSS {_fmt_bytes(tot['process_max_rss_bytes'])}")
        console.print(f"memory: {mem}")
    if variants:
        t = Table(title=f"variants, interleaved: medians of {meta['repeat']} repetitions "
                        f"(train = forward + backward, infer = eval + no_grad); x = {RATIO_DEFINITION}",
                  title_justify="left")
        for c in ("variant", "train ms", "infer ms", "train x", "infer x", "saved", "peak", "max |diff| vs eager",
                  "note"):
            t.add_column(c, justify="left" if c in ("variant", "note") else "right")
        for name, d in variants.items():
            if d["skipped"]:
                t.add_row(name, "-", "-", "-", "-", "-", "-", "-", f"skipped: {d['skipped']}")
                continue
            t.add_row(name, _fmt(d["train_ms"]), _fmt(d["infer_ms"]), _fmt(d["ratio_train_vs_eager"]),
                      _fmt(d["ratio_infer_vs_eager"]), _fmt_bytes(d["saved_bytes"]), _fmt_bytes(d["peak_bytes"]),
                      _fmt(d["max_abs_diff_vs_eager"], ".1e"), "")
        console.print(t)


# --------------------------------------------------------------------------- entry point
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="snncc-prof", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_args(ap)
    ap.add_argument("--compare", default="eager,snncc",
                    help=f"variants to time side by side, comma-separated, from {', '.join(VARIANTS)} "
                         f"(default eager,snncc; 'none' to skip)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs first (default 1; at least 1 per variant)")
    ap.add_argument("--repeat", type=int, default=3, help="timed repetitions per variant (default 3; medians)")
    ap.add_argument("--steps", type=int, default=3, help="profiled runs of the compiled model (default 3; medians)")
    ap.add_argument("--mode", choices=("train", "infer"), default="train",
                    help="per-task profile of a training step (forward + backward, default) or of inference")
    ap.add_argument("--by", choices=("auto", "task", "layer"), default="auto",
                    help="terminal rows per task or per layer (auto: per layer above 40 tasks)")
    ap.add_argument("--no-tasks", action="store_true", help="skip the per-task profile (only --compare)")
    ap.add_argument("--torch-compile-backend", default="inductor",
                    help="backend for the torch.compile variant (default inductor; its first compile on a CPU "
                         "can take minutes, cached afterwards; aot_eager compiles in seconds)")
    ap.add_argument("--json", metavar="FILE", help="write the report as JSON")
    ap.add_argument("--trace", metavar="FILE", help="write a Chrome/Perfetto trace of the profiled schedule")
    ap.add_argument("--quiet", action="store_true", help="no terminal tables")
    return ap


def _meta(w: Workload, args: argparse.Namespace) -> Dict[str, Any]:
    return {"tool": "snncc-prof", "model": w.spec, "model_class": type(w.model).__name__, "form": w.form,
            "T": w.T, "batch": w.batch, "input_shape": list(w.input_shape), "dtype": str(w.dtype).replace("torch.", ""),
            "device": str(w.device), "torch": torch.__version__, "snncc": getattr(snncc, "__version__", "?"),
            "threads": torch.get_num_threads(), "machine": platform.machine(),
            "date": datetime.datetime.now().isoformat(timespec="seconds"), "warmup": args.warmup,
            "repeat": args.repeat, "steps": args.steps, "mode": args.mode}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run snncc-prof; returns the exit status (0 ok, 1 the compiled model failed, 2 bad arguments or model
    spec). A variant of --compare that fails is reported as skipped, not as an error."""
    from rich.console import Console
    args = build_parser().parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 160, quiet=args.quiet)
    err = Console(stderr=True)
    try:
        names = parse_variants(args.compare)
        w = workload_from_args(args)
    except ModelSpecError as exc:
        err.print(f"[red]snncc-prof: {exc}[/red]", highlight=False, soft_wrap=True)
        return 2
    if args.repeat < 1 or args.steps < 1 or args.warmup < 0:
        err.print("[red]snncc-prof: --repeat and --steps must be >= 1, --warmup >= 0[/red]")
        return 2
    meta = _meta(w, args)
    x = w.make_input()
    variants = build_variants(w, names, x, args.torch_compile_backend)     # copies of the untouched model
    rows: List[TaskRow] = []
    tot: Optional[Dict[str, Any]] = None
    prof: Optional[TaskProfiler] = None
    if not args.no_tasks:
        cm = w.compile()
        if w.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        try:
            prof, compiled = profile_compiled(cm, x, args.steps, args.warmup, train=args.mode == "train",
                                              exclude=param_storages(w.model))
        except snncc.SNNCCError as exc:
            err.print(f"[red]snncc-prof: {w.spec}: compiling or running the model failed: {exc}[/red]",
                      highlight=False, soft_wrap=True)
            return 1
        rows = task_rows(prof, compiled)
        annotate_fates(rows, task_fates(cm, x))      # opaque: the reason; neurons: built-in or generated
        plan = memory_plan_of(cm)
        if plan is not None:
            meta["memory_plan"] = plan.as_dict()
        tot = totals(prof, rows, w.device)
        meta["tasks"] = len(rows)
        meta["waves"] = len(compiled.schedule.waves)
        meta["schedule_policy"] = compiled.schedule.policy
    compare(variants, args.warmup, args.repeat,
            log=(lambda s: err.print(f"[dim]snncc-prof: {s}[/dim]")) if not args.quiet else (lambda s: None))
    summary = variant_summary(variants)
    layers = layer_rows(rows)
    print_report(console, meta, rows, layers, tot, summary, args.by)
    if "memory_plan" in meta:
        console.print("memory plan (what each neuron layer keeps for backward; passes/plan_memory.py):",
                      highlight=False)
        for line in memory_plan_lines(memory_plan_of(cm)):
            console.print(line, highlight=False, soft_wrap=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report_json(meta, summary, rows, layers, tot or {}), f, indent=1)
        console.print(f"wrote {args.json}")
    if args.trace:
        if prof is None:
            err.print("[yellow]snncc-prof: --trace needs the per-task profile (drop --no-tasks)[/yellow]")
        else:
            with open(args.trace, "w") as f:
                json.dump(chrome_trace(prof, rows, meta), f)
            console.print(f"wrote {args.trace} (open in https://ui.perfetto.dev or chrome://tracing)")
    if summary.get("eager", {}).get("skipped"):
        err.print(f"[red]snncc-prof: the eager baseline itself failed ({summary['eager']['skipped']}): check the "
                  f"model, --input-shape and the form (--sequence / --loop)[/red]", highlight=False, soft_wrap=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
