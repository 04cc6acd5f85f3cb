"""Frontend: trace a step-mode model with torch.fx into one graph unrolled over time.

Neuron modules stay leaves (``call_module`` nodes), so a stateful layer called at T timesteps appears as T
nodes with one target; the passes read time and state from that. The three entry forms all become the same
unrolled graph:

* ``T=``: the step model traced inside ``torch.stack([model(x) for _ in range(T)])``;
* ``sequence=True``: the same with ``model(x_seq[t])``;
* a model that loops over time itself: its own forward, Python loop unrolled by tracing.

Recognized neurons (snncc's own, SpikingJelly's IF/LIF/ParametricLIF nodes) are mapped to a
:class:`~snncc.neurons.NeuronSpec`; any other stateful module is kept opaque and called eagerly, in step
order, after its own reset. ``spikingjelly`` and ``snntorch`` are never imported here: modules are
recognized by their class's module path.
"""
from __future__ import annotations

import contextlib
import linecache
import sys
import traceback
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple, Type

import torch
import torch.fx as fx
from torch import nn

from .errors import TraceFailure
from .neurons import BaseNeuron
from .lift import restore_attrs, snapshot_attrs
from .recognize import NeuronBinding, bind

__all__ = ["NeuronBinding", "bind_neuron", "is_stateful", "reset_module", "trace_unrolled", "Traced",
           "OpaqueModuleWarning"]


def _mro_names(m: nn.Module) -> List[str]:
    return [f"{c.__module__}.{c.__qualname__}" for c in type(m).__mro__]


def bind_neuron(m: nn.Module) -> Optional[NeuronBinding]:
    """How snncc compiles the stateful module ``m`` (a built-in spec or its lifted step), or None if it
    runs opaque (``snncc.recognize.bind(m).reason`` says why)."""
    return bind(m).binding


_STATEFUL_BASES = ("spikingjelly.activation_based.base.MemoryModule",
                   "snntorch._neurons.neurons.SpikingNeuron")


def is_stateful(m: nn.Module) -> bool:
    """Neurons and anything else that keeps state between calls (a ``reset``-able module)."""
    if isinstance(m, BaseNeuron) or any(n in _STATEFUL_BASES for n in _mro_names(m)):
        return True
    return callable(getattr(m, "reset", None)) or callable(getattr(m, "reset_mem", None))


def reset_module(m: nn.Module) -> None:
    """Bring one stateful module back to its initial state, the way its library does."""
    if callable(getattr(m, "reset", None)):
        m.reset()
    elif callable(getattr(m, "reset_mem", None)):
        m.reset_mem()


@dataclass
class Traced:
    """The unrolled graph and what the passes need to know about its modules."""

    root: nn.Module                      # resolves call_module / get_attr targets (shares the model's modules)
    graph: fx.Graph
    stateful: Dict[str, nn.Module]       # qualname -> stateful module (neurons and opaque state)
    bindings: Dict[str, NeuronBinding]   # qualname -> spec, for recognized neurons
    opaque: frozenset                    # qualnames of leaf modules run as black boxes (user's leaf_modules)
    form: str                            # "static" | "sequence" | "loop"
    #: qualname -> why a stateful module runs opaque, step by step (snncc.explain, the warning)
    reasons: Dict[str, str] = field(default_factory=dict)


class _Unrolled(nn.Module):
    """Traces the step model inside the time loop, with the model's own submodules as its children.

    It shares the model's ``_modules``/``_parameters``/``_buffers`` so that qualnames in the graph are the
    model's own (``net.0``, not ``model.net.0``), and calls ``type(model).forward`` directly so the model
    itself is not a module call in the trace.
    """

    def __init__(self, model: nn.Module, T: int, sequence: bool) -> None:
        super().__init__()
        self._modules = model._modules
        self._parameters = model._parameters
        self._buffers = model._buffers
        object.__setattr__(self, "_snncc_model", model)
        self._T, self._sequence = T, sequence

    def forward(self, x):
        step = type(self._snncc_model).forward
        if self._sequence:
            return torch.stack([step(self._snncc_model, x[t]) for t in range(self._T)])
        return torch.stack([step(self._snncc_model, x) for _ in range(self._T)])


class _ShapedProxy(fx.Proxy):
    """A model input whose shape is known: snncc specializes on input shapes, so Python that reads them
    (``for t in range(x.shape[0])``, ``x.size(0)``) is unrolled with the concrete values."""

    def __init__(self, node: fx.Node, tracer: fx.Tracer, shape: torch.Size) -> None:
        super().__init__(node, tracer)
        self._shape = torch.Size(shape)

    @property
    def shape(self) -> torch.Size:
        return self._shape

    def size(self, dim: Optional[int] = None) -> Any:
        return self._shape if dim is None else self._shape[dim]

    def dim(self) -> int:
        return len(self._shape)

    @property
    def ndim(self) -> int:
        return len(self._shape)

    def __len__(self) -> int:
        return self._shape[0]


class _SNNTracer(fx.Tracer):
    """Keeps neurons, stateful modules and user-declared leaves as leaves; remembers the module stack."""

    def __init__(self, leaf_types: Tuple[Type[nn.Module], ...], whole: frozenset = frozenset()) -> None:
        super().__init__()
        self.leaf_types = leaf_types
        self.whole = whole          # ids of stateful blocks kept as leaves (their trace failed)
        self._snncc_stack: List[str] = []
        self.opaque: set = set()
        self.example_shapes: List[Optional[torch.Size]] = []

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, self.leaf_types):
            self.opaque.add(qualname)
            return True
        if is_stateful(m) and (not _traced_through(m) or id(m) in self.whole):
            return True
        return super().is_leaf_module(m, qualname) or _is_torch_leaf(m)

    def call_module(self, m: nn.Module, forward: Callable, args: Any, kwargs: Any) -> Any:
        self._snncc_stack.append(self.path_of_module(m))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as exc:
            if not hasattr(exc, "_snncc_module_stack"):   # innermost module: where the trace failed
                exc._snncc_module_stack = list(self._snncc_stack)
            raise
        finally:
            self._snncc_stack.pop()

    def create_proxy(self, kind: str, target: Any, args: Any, kwargs: Any, *a: Any, **k: Any) -> fx.Proxy:
        proxy = super().create_proxy(kind, target, args, kwargs, *a, **k)
        if kind == "placeholder" and self.example_shapes:
            shape = self.example_shapes.pop(0)
            if shape is not None:
                return _ShapedProxy(proxy.node, proxy.tracer, shape)
        return proxy


def _is_torch_leaf(m: nn.Module) -> bool:
    """SpikingJelly's ``layer.Conv2d`` & co. subclass torch's layers: in step mode they are those layers."""
    if getattr(m, "step_mode", "s") != "s" or isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
        return False
    return any(c.__module__.startswith("torch.nn.modules") and c is not nn.Module for c in type(m).__mro__[1:])


def _user_frame(tb) -> Optional[traceback.FrameSummary]:
    """The innermost frame of the user's code (not torch's, not snncc's) in a traceback."""
    frames = traceback.extract_tb(tb)
    for fr in reversed(frames):
        f = fr.filename.replace("\\", "/")
        if "/torch/" not in f and "/snncc/" not in f and "<" not in f:
            return fr
    return None


def _trace_error(model: nn.Module, exc: BaseException, stack: List[str]) -> TraceFailure:
    """What to say when torch.fx cannot trace the model: where (file, line, code, module) and the ways out
    that work there. In a submodule: declare its class a leaf. In the model's own forward (the root, never a
    module call of the trace, so leaf_modules cannot name it): rewrite with tensor ops, or move the code into
    a submodule that can be a leaf."""
    fr = _user_frame(exc.__traceback__)
    where = f"{fr.filename}:{fr.lineno}" if fr else "unknown location"
    code = (linecache.getline(fr.filename, fr.lineno).strip() if fr else "") or "?"
    mod = stack[-1] if stack else ""
    cls = type(model.get_submodule(mod)).__name__ if mod else type(model).__name__
    mod_desc = f"module '{mod}' ({cls})" if mod else f"the model's forward ({cls})"
    control = "inputs to control flow" in str(exc) or code.startswith(("if ", "elif ", "while ", "assert "))
    what = ("torch.fx needs control flow that does not depend on tensor values" if control else
            "torch.fx records tensor operations without running them, so Python that needs a tensor's value "
            "(bool(), int(), .item(), .tolist(), iterating over it, numpy) cannot be traced")
    rewrite = ("  - rewrite the condition with tensor ops: `y = torch.where(cond, a, b)` instead of "
               "`if cond: y = a else: y = b` (or multiply by a mask, `y = b + cond * (a - b)`), or\n"
               if control else "  - rewrite it with tensor ops (torch.where, masking, shapes from .shape), or\n")
    if mod:
        return TraceFailure(
            f"snncc could not trace {mod_desc} at {where}: `{code}`\n  {type(exc).__name__}: {exc}\n"
            f"  {what}. Ways out:\n{rewrite}"
            f"  - pass leaf_modules=[{cls}] to snncc.compile to run that module as a black box, step by step.")
    return TraceFailure(
        f"snncc could not trace {mod_desc} at {where}: `{code}`\n  {type(exc).__name__}: {exc}\n"
        f"  {what}. The line is in the model's own forward ({cls}, the root module), which is traced itself "
        f"and cannot be a leaf module (leaf_modules=[{cls}] would change nothing). Ways out:\n{rewrite}"
        f"  - move that code into a submodule of its own, e.g. `class Branch(nn.Module)` whose forward holds "
        f"`{code}` and what depends on it, call it from {cls}.forward (`self.branch = Branch()` in __init__), and "
        "pass leaf_modules=[Branch] to snncc.compile: it then runs as a black box, step by step.")


def trace_unrolled(model: nn.Module, form: str, T: Optional[int],
                   leaf_modules: Iterable[Type[nn.Module]] = (),
                   example_inputs: Tuple[Any, ...] = ()) -> Traced:
    """Trace ``model`` into one graph unrolled over time (see the module docstring for the forms).

    ``example_inputs`` give a self-looping model's inputs' shapes to the trace (snncc specializes on them).
    """
    leaf_types = tuple(leaf_modules)
    root: nn.Module = model if form == "loop" else _Unrolled(model, int(T), form == "sequence")
    whole: set = set()
    untraced: Dict[int, str] = {}       # block id -> why it could not be traced into
    while True:
        tracer = _SNNTracer(leaf_types, frozenset(whole))
        if form == "loop":
            tracer.example_shapes = [a.shape if isinstance(a, torch.Tensor) else None for a in example_inputs]
        with _attrs_restored(model):
            _reset_containers(model, tracer)
            try:
                graph = tracer.trace(root)
                break
            except TraceFailure:
                raise
            except Exception as exc:  # fx raises TraceError, TypeError, AttributeError...: "not traceable"
                stack = getattr(exc, "_snncc_module_stack", [])
                block = _untraceable_block(model, stack, whole)
                if block is None:
                    raise _trace_error(model, exc, stack) from exc
                # NOTE: a stateful block with neurons inside is traced into; one that cannot be traced runs
                # as one opaque leaf, step by step, as such blocks did before (and is warned about)
                whole.add(id(model.get_submodule(block)))
                untraced[id(model.get_submodule(block))] = (
                    f"it contains neurons but its forward cannot be traced ({type(exc).__name__}: "
                    f"{str(exc).splitlines()[0][:160]}); rewrite the data-dependent Python there with tensor "
                    "ops (torch.where) to compile its neurons")
    stateful: Dict[str, nn.Module] = {}
    bindings: Dict[str, NeuronBinding] = {}
    reasons: Dict[str, str] = {}
    for node in graph.nodes:
        if node.op != "call_module" or node.target in stateful:
            continue
        m = root.get_submodule(node.target)
        if node.target in tracer.opaque and not is_stateful(m):
            continue
        if is_stateful(m) or node.target in tracer.opaque:
            stateful[node.target] = m
            if node.target in tracer.opaque:
                reasons[node.target] = "declared a leaf (leaf_modules=)"
                continue
            if id(m) in untraced:
                reasons[node.target] = untraced[id(m)]
                _warn_opaque(node.target, m, reasons[node.target])
                continue
            r = bind(m)
            if r.binding is None:
                reasons[node.target] = r.reason
                _warn_opaque(node.target, m, r.reason)
            elif not _single_tensor_call(graph, node.target):
                reasons[node.target] = "called with more than one input (e.g. an explicit state argument)"
                _warn_opaque(node.target, m, reasons[node.target])
            else:
                bindings[node.target] = r.binding
    return Traced(root, graph, stateful, bindings, frozenset(tracer.opaque), form, reasons)


@contextlib.contextmanager
def _attrs_restored(model: nn.Module) -> Iterator[None]:
    """Tracing leaves nothing behind: every attribute, buffer and memory of every module is put back.

    NOTE: a model that keeps state itself (``self.s = self.lif(h)`` in its forward, the way recurrent SNNs
    are written in step mode) would otherwise be left holding an ``fx.Proxy``: the eager model would break,
    and so would every later specialization (train -> eval, a new batch size or T).
    """
    modules = list(model.modules())
    snaps = [snapshot_attrs(m) for m in modules]
    try:
        yield
    finally:
        for m, snap in zip(modules, snaps):
            restore_attrs(m, snap)


def _reset_containers(model: nn.Module, tracer: "_SNNTracer") -> None:
    """Trace from the reset state: modules that are traced through (the root included) and have a
    ``reset()`` get it called, as ``functional.reset_net`` does, so state the model keeps itself (``self.s``)
    starts at its reset value in every specialization. Leaf stateful modules are reset by the executor."""
    for m in model.modules():
        if callable(getattr(m, "reset", None)) and not isinstance(m, tracer.leaf_types) and \
                (m is model or _traced_through(m)):
            m.reset()


def _untraceable_block(model: nn.Module, stack: List[str], whole: set) -> Optional[str]:
    """The innermost traced-into stateful block (not the root) on the failing trace's module stack."""
    for q in reversed(stack):
        if not q:
            continue
        m = model.get_submodule(q)
        if is_stateful(m) and _traced_through(m) and id(m) not in whole:
            return q
    return None


def _traced_through(m: nn.Module) -> bool:
    """A stateful module that contains stateful modules (a recurrent block with ``reset()`` around its
    neurons) is traced into, not kept as a leaf: its neurons compile and its own state is part of the graph."""
    return not isinstance(m, BaseNeuron) and any(d is not m and is_stateful(d) for d in m.modules())


def _single_tensor_call(graph: fx.Graph, target: str) -> bool:
    return all(len(n.args) == 1 and not n.kwargs for n in graph.nodes
               if n.op == "call_module" and n.target == target)


class OpaqueModuleWarning(UserWarning):
    """A stateful module runs opaque, step by step: the compiled model is slower there than it could be."""


_WARNED: Dict[Tuple[int, str], Any] = {}


def _warn_opaque(qualname: str, m: nn.Module, reason: str) -> None:
    """One warning per module and reason: which module, its class, why, and the way out."""
    key = (id(m), reason)
    hit = _WARNED.get(key)
    if hit is not None and hit() is m:
        return
    _WARNED[key] = weakref.ref(m)
    warnings.warn(f"snncc: module '{qualname}' ({type(m).__module__}.{type(m).__qualname__}) is not compiled: "
                  f"{reason}. It runs opaque, step by step, at eager speed; snncc.explain(model, x) lists every "
                  "layer.", OpaqueModuleWarning, stacklevel=_user_stacklevel())


def _user_stacklevel() -> int:
    """The stacklevel that points a warning at the user's line (the first frame outside snncc and torch)."""
    level, frame = 1, sys._getframe(1)
    while frame is not None:
        f = frame.f_code.co_filename.replace("\\", "/")
        if "/snncc/" not in f and "/torch/" not in f and "/runtime/" not in f and "/passes/" not in f:
            return level
        frame, level = frame.f_back, level + 1
    return 2
