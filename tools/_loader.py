"""What snncc-viz and snncc-prof share: load a model from a spec, build its input, run it eagerly or compiled.

A model is named the way a user already has it, by a callable that returns it:

* ``path/to/file.py:factory`` -- the file is imported as a module (its folder goes on ``sys.path`` first,
  as ``python path/to/file.py`` would do, so it can import its neighbours);
* ``package.module:factory`` -- imported with ``importlib``.

``factory`` may be a dotted attribute (``module:Class.build``); it is called with the ``--kw KEY=VALUE``
arguments, plus ``T=<T>`` when it takes a parameter named ``T`` that was not given (a model that loops over
time itself usually does). Errors name the spec and say what to fix, because the spec is all the user typed.
"""
from __future__ import annotations

import argparse
import ast
import copy
import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

import snncc

__all__ = ["ModelSpecError", "Workload", "add_workload_args", "workload_from_args", "load_factory",
           "parse_kwargs", "parse_shape", "eager_forward", "reset_model", "flatten_tensors", "annotate_fates",
           "shorten"]

FORMS = ("static", "sequence", "loop")


class ModelSpecError(ValueError):
    """The model spec (``file.py:factory`` / ``pkg.mod:factory``) or its arguments could not be used."""


# --------------------------------------------------------------------------- spec -> callable
def _split_spec(spec: str) -> Tuple[str, str]:
    """``'a/b.py:make'`` -> ``('a/b.py', 'make')``; the last colon splits, so Windows drive letters survive."""
    if ":" not in spec:
        raise ModelSpecError(f"model spec {spec!r}: expected 'path/to/file.py:factory' or "
                             f"'package.module:factory' (a callable that returns the model)")
    where, attr = spec.rsplit(":", 1)
    if not where or not attr:
        raise ModelSpecError(f"model spec {spec!r}: both the module/file and the factory name are needed, "
                             f"as in 'examples/csnn.py:StepCSNN'")
    return where, attr


def _is_file_spec(where: str) -> bool:
    return where.endswith(".py") or os.sep in where or "/" in where


def _import_file(path: str, spec: str) -> Any:
    """Import a Python file as a module under a private, path-derived name (so two files named alike
    do not collide in ``sys.modules``)."""
    full = os.path.abspath(path)
    if not os.path.isfile(full):
        raise ModelSpecError(f"model spec {spec!r}: file {path!r} does not exist (looked at {full})")
    folder = os.path.dirname(full)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    digest = hashlib.sha1(full.encode()).hexdigest()[:10]
    name = f"_snncc_model_{os.path.splitext(os.path.basename(full))[0]}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, full)
    if module_spec is None or module_spec.loader is None:
        raise ModelSpecError(f"model spec {spec!r}: cannot import {path!r} as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception:
        del sys.modules[name]
        raise
    return module


def _import_module(where: str, spec: str) -> Any:
    if os.getcwd() not in sys.path and "" not in sys.path:     # console scripts do not put cwd on the path
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(where)
    except ModuleNotFoundError as exc:
        if exc.name and where.startswith(exc.name):
            raise ModelSpecError(f"model spec {spec!r}: no module named {exc.name!r} (is it installed, or did "
                                 f"you mean a file path such as 'path/to/{where.replace('.', '/')}.py'?)") from exc
        raise


def load_factory(spec: str) -> Callable[..., Any]:
    """The callable a model spec names."""
    where, attr = _split_spec(spec)
    module = _import_file(where, spec) if _is_file_spec(where) else _import_module(where, spec)
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            have = sorted(n for n in dir(obj) if not n.startswith("_") and callable(getattr(obj, n, None))
                          and getattr(getattr(obj, n), "__module__", None) == getattr(obj, "__name__", None))
            raise ModelSpecError(f"model spec {spec!r}: {where!r} has no attribute {attr!r} "
                                 f"(callables there: {', '.join(have[:20]) or 'none'})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ModelSpecError(f"model spec {spec!r}: {attr!r} is a {type(obj).__name__}, not a callable "
                             f"returning the model")
    return obj


def parse_kwargs(items: Sequence[str]) -> Dict[str, Any]:
    """``['size=16', 'name=lif']`` -> ``{'size': 16, 'name': 'lif'}`` (Python literals, else strings)."""
    out: Dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ModelSpecError(f"--kw {item!r}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key.strip()] = value
    return out


def _accepts(fn: Callable[..., Any], name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params and params[name].kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                    inspect.Parameter.KEYWORD_ONLY)


def build_model(spec: str, kwargs: Dict[str, Any], T: Optional[int] = None) -> nn.Module:
    """Call the factory a spec names and check that it returned an ``nn.Module``.

    ``T`` is passed as ``T=`` when the factory takes a parameter of that name and ``kwargs`` do not set it.
    """
    factory = load_factory(spec)
    kw = dict(kwargs)
    if T is not None and "T" not in kw and _accepts(factory, "T"):
        kw["T"] = T
    try:
        model = factory(**kw)
    except TypeError as exc:
        raise ModelSpecError(f"model spec {spec!r}: calling it with {kw or 'no arguments'} failed: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"model spec {spec!r}: the factory returned an object of type "
                             f"{type(model).__name__}, not a torch.nn.Module")
    return model


def parse_shape(text: str) -> Tuple[int, ...]:
    """``'3,32,32'`` (or ``'3x32x32'``) -> ``(3, 32, 32)``: one sample's shape, without batch or time."""
    parts = [p for p in text.replace("x", ",").replace(" ", "").split(",") if p]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise ModelSpecError(f"--input-shape {text!r}: expected integers separated by commas, e.g. 3,32,32")
    if not shape or any(d < 1 for d in shape):
        raise ModelSpecError(f"--input-shape {text!r}: expected positive sizes, e.g. 3,32,32")
    return shape


# --------------------------------------------------------------------------- running a model
def flatten_tensors(value: Any) -> List[torch.Tensor]:
    """The tensors in a (nested) output, in a stable order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in flatten_tensors(v)]
    if isinstance(value, dict):
        return [t for k in sorted(value, key=str) for t in flatten_tensors(value[k])]
    return []


def reset_model(model: nn.Module) -> nn.Module:
    """Reset every stateful module, including SpikingJelly memory modules that are not neurons, as the
    tests' eager reference does (``functional.reset_net`` semantics)."""
    snncc.reset(model)
    if "spikingjelly.activation_based.base" in sys.modules:
        from spikingjelly.activation_based import base
        for m in model.modules():
            if isinstance(m, base.MemoryModule):
                m.reset()
    return model


def eager_forward(model: nn.Module, form: str, T: Optional[int]) -> Callable[[torch.Tensor], Any]:
    """The eager Python loop over time that the compiled model replaces (the baseline every ratio uses)."""
    if form == "static":
        def run_static(x: torch.Tensor) -> Any:
            reset_model(model)
            return torch.stack([model(x) for _ in range(T)])
        return run_static
    if form == "sequence":
        def run_sequence(x: torch.Tensor) -> Any:
            reset_model(model)
            return torch.stack([model(x[t]) for t in range(x.shape[0])])
        return run_sequence

    def run_loop(x: torch.Tensor) -> Any:        # the model loops (and resets) itself
        return model(x)
    return run_loop


def shorten(text: str, width: int = 48) -> str:
    """``text`` cut to ``width`` characters with an ellipsis (picture labels; tooltips keep the whole)."""
    if len(text) <= width:
        return text
    cut = text[:width - 1]
    if " " in cut[width // 2:]:
        cut = cut[:cut.rindex(" ")]
    return cut.rstrip(" ,;:(") + "…"


def annotate_fates(rows: Sequence[Any], fates: Dict[str, str]) -> None:
    """Give each task row its fate (``snncc.explain.task_fates``: ``row.fate``, also in the JSON) and say it
    in the row's ``op``: why an opaque module is opaque, whether a neuron runs a built-in kernel or one
    generated from its step code -- the same words ``snncc.explain`` prints."""
    for r in rows:
        fate = fates.get(r.name)
        r.fate = fate
        if fate is None:
            continue
        if r.kind == "opaque":
            r.op = r.op.replace("(opaque)", f"({fate})") if "(opaque)" in r.op else f"{r.op} ({fate})"
        elif r.kind == "neuron" and fate.startswith("compiled (") and fate.endswith(")"):
            kernel = fate[len("compiled ("):-1]
            r.op = r.op.replace(" scan", f" scan ({kernel})", 1) if " scan" in r.op else f"{r.op} ({kernel})"


@dataclass
class Workload:
    """A model, how it is compiled (form, T) and the input it runs on: what both tools profile or draw."""

    spec: str
    model: nn.Module
    form: str
    T: Optional[int]
    batch: int
    input_shape: Tuple[int, ...]
    dtype: torch.dtype = torch.float32
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0
    input_scale: float = 1.0

    @property
    def name(self) -> str:
        return f"{self.spec} ({type(self.model).__name__})"

    def make_input(self) -> torch.Tensor:
        """A seeded uniform [0, scale) input: ``[T, N, ...]`` for ``--sequence``, else ``[N, ...]``."""
        g = torch.Generator().manual_seed(self.seed)
        lead = (self.T, self.batch) if self.form == "sequence" else (self.batch,)
        x = torch.rand(*lead, *self.input_shape, generator=g) * self.input_scale
        return x.to(self.device, self.dtype)

    def compile(self, model: Optional[nn.Module] = None) -> snncc.CompiledModule:
        """``snncc.compile`` in this workload's form (on ``model``, default the workload's own)."""
        m = self.model if model is None else model
        if self.form == "static":
            return snncc.compile(m, T=self.T)
        if self.form == "sequence":
            return snncc.compile(m, sequence=True)
        return snncc.compile(m)

    def eager(self, model: Optional[nn.Module] = None) -> Callable[[torch.Tensor], Any]:
        return eager_forward(self.model if model is None else model, self.form, self.T)

    def copy_model(self) -> nn.Module:
        """A deep copy from the reset state (a run leaves neuron state tensors with autograd history on the
        modules, which ``deepcopy`` refuses)."""
        return copy.deepcopy(reset_model(self.model))


# --------------------------------------------------------------------------- command line
def add_workload_args(ap: argparse.ArgumentParser) -> None:
    """The model arguments both tools take, spelled the same way."""
    ap.add_argument("model", help="the model: path/to/file.py:factory or package.module:factory "
                                  "(a callable returning the nn.Module)")
    ap.add_argument("--input-shape", required=True, metavar="C,H,W",
                    help="one sample's shape, without batch and time, e.g. 3,32,32")
    ap.add_argument("--batch", type=int, default=4, help="batch size N (default 4)")
    ap.add_argument("-T", "--T", dest="T", type=int, default=4,
                    help="timesteps (default 4): compile(model, T=T); with --sequence the input's length; "
                         "with --loop passed to the factory as T= when it takes T")
    form = ap.add_mutually_exclusive_group()
    form.add_argument("--sequence", action="store_true",
                      help="compile(model, sequence=True): the input is [T, N, ...]")
    form.add_argument("--loop", action="store_true",
                      help="compile(model): the model loops over time itself (reset, for t in range(T), ...)")
    ap.add_argument("--kw", action="append", default=[], metavar="KEY=VALUE",
                    help="keyword argument for the factory (Python literal), repeatable, e.g. --kw size=16")
    ap.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--input-scale", type=float, default=1.0,
                    help="the input is uniform in [0, scale) (default 1; an untrained net may need more to spike)")
    ap.add_argument("--seed", type=int, default=0, help="seeds the model's initialization and the input")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads for the run (default: torch's own choice)")


def workload_from_args(args: argparse.Namespace) -> Workload:
    """Parse, import and build: every user error surfaces here as a ModelSpecError naming what to fix."""
    if args.T < 1:
        raise ModelSpecError(f"-T {args.T}: the number of timesteps must be >= 1")
    if args.batch < 1:
        raise ModelSpecError(f"--batch {args.batch}: must be >= 1")
    if args.threads is not None:
        if args.threads < 1:
            raise ModelSpecError(f"--threads {args.threads}: must be >= 1")
        torch.set_num_threads(args.threads)
    shape = parse_shape(args.input_shape)
    form = "sequence" if args.sequence else "loop" if args.loop else "static"
    torch.manual_seed(args.seed)
    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelSpecError("--device cuda: no CUDA device is available here (use --device cpu)")
    model = build_model(args.model, parse_kwargs(args.kw), args.T).to(device, dtype)
    return Workload(args.model, model, form, args.T, args.batch, shape, dtype, device, args.seed,
                    args.input_scale)
