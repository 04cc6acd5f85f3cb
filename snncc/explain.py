"""``snncc.explain``: what snncc made of each layer of a model, and why (like ``torch._dynamo.explain``).

    e = snncc.explain(model, x, T=8)      # compiles, runs one forward on x, puts the model back as it was
    print(e)                              # one row per layer: its fate, spike rate, bytes saved for backward
    e.opaque                              # {qualname: why it runs opaque, step by step}

A layer's *fate* is what the compiled schedule does with it:

* ``compiled (built-in LIF kernel)``: a neuron bound to one of snncc's specs (hand-tuned scans);
* ``compiled (generated from its step code)``: a neuron lifted from its own step (``snncc/lift.py``), whose
  scan is generated from the neuron IR;
* ``fused into <layer> (...)``: work absorbed into another task (a max pool into the neuron's kernel, a
  BatchNorm into the convolution or the neuron);
* ``batched over time`` (``, bit-packed input`` when its spike input is kept as bits for backward),
  ``hoisted: runs once`` (its input is the same at every step), ``step by step`` (a stateless op that runs
  once per timestep);
* ``opaque: <reason>``: a stateful module snncc could not compile (or one declared in ``leaf_modules=``),
  called as is, step by step; the reason is the one the frontend's ``OpaqueModuleWarning`` gives.

Spike rates and saved bytes are measured on the one forward ``explain`` runs (through a
``TaskObserver`` and ``torch.autograd.graph.saved_tensors_hooks``; see ``tools/_taskprof.py``), so they are
exact for that input, not predictions. ``explain`` leaves the model as it found it: buffers (BatchNorm
running statistics), neuron states and other attributes are restored, nothing is written into ``.grad``,
and the global RNG is forked around the run.
"""
from __future__ import annotations

import contextlib
import textwrap
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

from .errors import InputError
from .ir import Task
from .lift import snapshot_attrs

__all__ = ["explain", "Explanation", "Layer", "task_fates", "opaque_reasons", "neuron_kernel"]

#: built-in neuron kinds as users know them
_KIND_NAMES = {"if": "IF", "lif": "LIF", "plif": "ParametricLIF", "izhikevich": "Izhikevich", "alif": "AdaptiveLIF"}
_FUSION_WORDS = {"maxpool_epilogue": "max-pool epilogue", "bn_fold": "BatchNorm folded into the convolution",
                 "bn_train": "training BatchNorm prologue",
                 "conv_maxpool": "max pool fused with the convolution (backward from the pooled gradient)"}
_SKIP_KINDS = ("placeholder", "get_attr", "output")
LEAF_REASON = "declared a leaf (leaf_modules=)"


# --------------------------------------------------------------------------- fates (shared with the tools)
def neuron_kernel(binding: Any) -> str:
    """``"built-in LIF kernel"`` / ``"generated from its step code"`` for a neuron binding."""
    how = getattr(binding, "how", "lifted")
    if how.startswith("builtin:"):
        kind = how.split(":", 1)[1]
        return f"built-in {_KIND_NAMES.get(kind, kind.upper())} kernel"
    return "generated from its step code"


def _specialization(cm: Any, inputs: Tuple[Any, ...]) -> Tuple[Any, Any]:
    return cm._specialization(tuple(inputs))


def _reasons(compiled: Any, executor: Any) -> Dict[str, str]:
    """qualname -> why it runs opaque. NOTE: read from the frontend's trace (the executor keeps it): the
    hoisting pass returns a new Traced, which may not carry ``reasons``."""
    out: Dict[str, str] = {}
    for traced in (getattr(executor, "traced", None), getattr(compiled, "traced", None)):
        out.update(getattr(traced, "reasons", None) or {})
    return out


def _task_reason(task: Task, traced: Any, reasons: Dict[str, str]) -> str:
    if task.target in reasons:
        return reasons[task.target]
    if task.target in getattr(traced, "opaque", ()):
        return LEAF_REASON
    return "not recognized as a neuron (no reason recorded)"


_PLUMBING = {"placeholder": "model input", "get_attr": "parameter, buffer or constant", "output": "model output"}


def _fate(task: Task, traced: Any, reasons: Dict[str, str]) -> str:
    """What the schedule does with one task (see the module docstring)."""
    if task.kind in _PLUMBING:
        return _PLUMBING[task.kind]
    if task.kind == "neuron":
        binding = traced.bindings.get(task.target)
        rec = task.fusion("recurrent")
        if rec is not None:
            # NOTE: a cell runs its neuron's lifted step inside the generated recurrent loop, whatever the neuron
            return f"compiled (recurrent cell with {rec.module}: one fused loop per chunk)"
        return f"compiled ({neuron_kernel(binding)})"
    if task.kind == "opaque":
        return f"opaque: {_task_reason(task, traced, reasons)}"
    if task.t0 is None:
        text = "hoisted: runs once (its input is the same at every step)"
    elif task.batched:
        text = "batched over time"
    else:
        text = "step by step"
    if task.spike_input:
        text += ", bit-packed input"
    return text


def _fused_fate(host: Task, kind: str) -> str:
    return f"fused into {host.layer} ({_FUSION_WORDS.get(kind, kind.replace('_', ' '))})"


def task_fates(cm: Any, *inputs: Any) -> Dict[str, str]:
    """Task name -> its fate for the specialization ``inputs`` select (what snncc-prof and snncc-viz
    print); ``"<task>#fused<j>"`` -> the fate of the j-th module fused into that task."""
    compiled, executor = _specialization(cm, inputs)
    traced, reasons = compiled.traced, _reasons(compiled, executor)
    out: Dict[str, str] = {}
    for t in compiled.task_graph.tasks():
        out[t.name] = _fate(t, traced, reasons)
        for j, f in enumerate(t.fused):
            out[f"{t.name}#fused{j}"] = _fused_fate(t, f.kind)
    return out


def opaque_reasons(cm: Any, *inputs: Any) -> Dict[str, str]:
    """qualname -> reason, for every module the specialization runs opaque, step by step."""
    compiled, executor = _specialization(cm, inputs)
    reasons = _reasons(compiled, executor)
    return {t.target: _task_reason(t, compiled.traced, reasons)
            for t in compiled.task_graph.tasks() if t.kind == "opaque"}


# --------------------------------------------------------------------------- the result
@dataclass
class Layer:
    """One row of :class:`Explanation`: a layer (module qualname, or a function's layer name)."""

    qualname: str
    cls: str                          # the module's class name (a function's or method's name)
    fate: str
    kind: str                         # neuron | opaque | module | function | method | fused
    tasks: int = 0
    steps: int = 0                    # timesteps its tasks cover (1 for work that runs once)
    spike_rate: Optional[float] = None   # mean of its (0/1) output on the input; None when not spikes
    rate_note: str = ""               # e.g. the rate is of the output after a fused max pool
    saved_bytes: Optional[int] = None    # measured, bytes its tasks saved for backward (None: not training)
    reason: Optional[str] = None      # opaque layers: why
    kernel: Optional[str] = None      # neurons: "builtin:<kind>" or "lifted"

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def _fmt_bytes(n: Optional[int]) -> str:
    if n is None:
        return "-"
    x = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(x) < 1024 or unit == "GiB":
            return f"{x:.0f} {unit}" if unit == "B" else f"{x:.1f} {unit}"
        x /= 1024
    return str(n)


@dataclass
class Explanation:
    """What ``snncc.explain`` found: ``layers`` (one :class:`Layer` per layer, in program order), ``opaque``
    (qualname -> reason), ``counts``; ``str()`` is a readable table, ``to_dict()`` JSON-ready."""

    model: str
    form: str
    T: Optional[int]
    training: bool
    inputs: List[Tuple[Tuple[int, ...], str]]
    layers: List[Layer]
    opaque: Dict[str, str]
    counts: Dict[str, int]
    saved_bytes: Optional[int] = None          # all bytes saved for backward by the forward (unique storages)
    saved_unattributed: Optional[int] = None   # of which saved outside any task (the executor's own work)
    warnings: List[str] = field(default_factory=list)
    compiled: Any = field(default=None, repr=False, compare=False)   # the pipeline's Compiled
    #: what each neuron scan keeps for backward from now on (passes.MemoryPlan; None: not training)
    memory_plan: Any = field(default=None, repr=False, compare=False)

    def layer(self, qualname: str) -> Layer:
        """The row of layer ``qualname``."""
        for row in self.layers:
            if row.qualname == qualname:
                return row
        raise KeyError(f"no layer {qualname!r}; have {[r.qualname for r in self.layers]}")

    def to_dict(self) -> Dict[str, Any]:
        return {"model": self.model, "form": self.form, "T": self.T, "training": self.training,
                "inputs": [{"shape": list(s), "dtype": d} for s, d in self.inputs],
                "layers": [r.to_dict() for r in self.layers], "opaque": dict(self.opaque),
                "counts": dict(self.counts), "saved_bytes": self.saved_bytes,
                "saved_unattributed": self.saved_unattributed, "warnings": list(self.warnings),
                "memory_plan": None if self.memory_plan is None else self.memory_plan.as_dict()}

    def __str__(self) -> str:
        form = {"static": f"T={self.T}, the input fed at every step", "sequence": f"T={self.T}, sequence input",
                "loop": f"the model's own loop over time, T={self.T}"}.get(self.form, self.form)
        shapes = ", ".join("x".join(map(str, s)) + f" {d}" for s, d in self.inputs)
        head = [f"snncc.explain: {self.model} ({form}; input {shapes}; "
                f"{'training' if self.training else 'eval'} mode)"]
        cols = ("layer", "class", "fate", "spike rate", "saved")
        fate_w = 58
        rows = []
        for r in self.layers:
            rate = "-" if r.spike_rate is None else f"{r.spike_rate:.3f}" + ("*" if r.rate_note else "")
            rows.append((r.qualname, r.cls, textwrap.wrap(r.fate, fate_w) or [""], rate, _fmt_bytes(r.saved_bytes)))
        w0 = max([len(cols[0])] + [len(r[0]) for r in rows])
        w1 = max([len(cols[1])] + [len(r[1]) for r in rows])
        w2 = max([len(cols[2])] + [len(line) for r in rows for line in r[2]])
        w3 = max([len(cols[3])] + [len(r[3]) for r in rows])
        w4 = max([len(cols[4])] + [len(r[4]) for r in rows])
        lines = head + [f"{cols[0]:<{w0}}  {cols[1]:<{w1}}  {cols[2]:<{w2}}  {cols[3]:>{w3}}  {cols[4]:>{w4}}",
                        "-" * (w0 + w1 + w2 + w3 + w4 + 8)]
        for q, c, fate, rate, saved in rows:
            lines.append(f"{q:<{w0}}  {c:<{w1}}  {fate[0]:<{w2}}  {rate:>{w3}}  {saved:>{w4}}")
            for more in fate[1:]:
                lines.append(f"{'':<{w0}}  {'':<{w1}}    {more}")
        n = self.counts
        kinds = []
        if n.get("builtin"):
            kinds.append(f"{n['builtin']} built-in")
        if n.get("lifted"):
            kinds.append(f"{n['lifted']} generated from step code")
        summary = (f"{n.get('compiled_neurons', 0)} neuron(s) compiled" + (f" ({', '.join(kinds)})" if kinds else "")
                   + f", {n.get('opaque_modules', 0)} opaque module(s), {n.get('fused', 0)} fused, "
                   f"{n.get('batched', 0)} layer(s) batched over time, {n.get('tasks', 0)} tasks")
        lines.append(summary)
        if self.saved_bytes is not None:
            extra = f" ({_fmt_bytes(self.saved_unattributed)} outside any task)" if self.saved_unattributed else ""
            lines.append(f"saved for backward: {_fmt_bytes(self.saved_bytes)} (measured on this forward){extra}")
        else:
            lines.append("saved for backward: - (not measured: eval mode, grad disabled or no output needs grad)")
        if self.memory_plan is not None and self.memory_plan.layers:
            lines.append(f"memory plan for the next training calls: {self.memory_plan.summary()}")
        notes = sorted({r.rate_note for r in self.layers if r.rate_note})
        for note in notes:
            lines.append(f"* {note}")
        if self.opaque:
            lines.append("opaque modules (run as is, step by step, at eager speed):")
            for q, why in self.opaque.items():
                lines.append(f"  {q}: {why}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"Explanation(model={self.model!r}, layers={len(self.layers)}, counts={self.counts}, "
                f"opaque={self.opaque})")


# --------------------------------------------------------------------------- leaving the model as it was
class _ModelState:
    """Everything a forward may change in a model: buffers (values too: BatchNorm updates them in place),
    plain and tensor attributes (neuron states), SpikingJelly memories, parameters' ``.grad``."""

    def __init__(self, model: nn.Module) -> None:
        self.mods: List[Tuple[nn.Module, Dict[Tuple[str, str], Any], Dict[Tuple[str, str], torch.Tensor]]] = []
        for m in model.modules():
            refs = snapshot_attrs(m)
            values = {key: v.detach().clone() for key, v in refs.items() if isinstance(v, torch.Tensor)}
            self.mods.append((m, refs, values))
        self.grads = [(p, p.grad) for p in model.parameters()]

    @staticmethod
    def _now(m: nn.Module) -> Dict[Tuple[str, str], Any]:
        """What the module holds now, private attributes aside (those a run may add are torch's)."""
        return {key: v for key, v in snapshot_attrs(m).items() if not (key[0] == "attr" and key[1].startswith("_"))}

    def restore(self) -> None:
        with torch.no_grad():
            for m, refs, values in self.mods:
                for (kind, k), v in refs.items():
                    if kind == "attr":
                        if vars(m).get(k, _MISSING) is not v:
                            object.__setattr__(m, k, v)
                    elif kind == "buffer":
                        m._buffers[k] = v
                    else:
                        m._memories[k] = v
                    saved = values.get((kind, k))
                    if saved is not None and not (v.shape == saved.shape and torch.equal(v.detach(), saved)):
                        v.detach().copy_(saved)         # changed in place (running stats, num_batches_tracked)
                for (kind, k) in self._now(m):          # public attributes that appeared during the run
                    if (kind, k) not in refs:
                        if kind == "attr":
                            object.__delattr__(m, k)
                        elif kind == "buffer":
                            del m._buffers[k]
                        else:
                            del m._memories[k]
        for p, g in self.grads:
            p.grad = g


_MISSING = object()


@contextlib.contextmanager
def _preserved(model: nn.Module, inputs: Tuple[Any, ...]) -> Iterator[None]:
    devices = sorted({a.device.index or 0 for a in inputs if isinstance(a, torch.Tensor) and a.is_cuda})
    state = _ModelState(model)
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        state.restore()


# --------------------------------------------------------------------------- the measurement
def _observer(exclude: Any) -> Any:
    """A snncc-prof TaskProfiler (saved bytes attributed through its before/after window) that also keeps
    each task's spike count and size, and every saved storage, attributed or not."""
    from snncc.tools._loader import flatten_tensors
    from snncc.tools._taskprof import TaskProfiler, storage_bytes

    class _Explainer(TaskProfiler):
        def __init__(self) -> None:
            super().__init__(exclude, backward_hooks=False)
            self.spikes: Dict[str, Tuple[float, int]] = {}
            self.total = 0
            self._all: set = set()

        def pack(self, t: torch.Tensor) -> torch.Tensor:
            ptr, nbytes = storage_bytes(t)
            if ptr not in self._all and ptr not in self.exclude:
                self._all.add(ptr)
                self.total += nbytes
            return super().pack(t)

        def after(self, task: Task, value: Any) -> None:
            super().after(task, value)
            if task.kind not in ("neuron", "opaque"):
                return
            tensors = flatten_tensors(value)
            if not tensors or not tensors[0].is_floating_point() or not tensors[0].numel():
                return
            s = tensors[0].detach()
            if bool(((s == 0) | (s == 1)).all()):
                self.spikes[task.name] = (float(s.double().sum()), s.numel())

    return _Explainer()


def _class_name(root: Optional[nn.Module], task: Task) -> str:
    if task.kind in ("module", "neuron", "opaque") and isinstance(task.target, str) and root is not None:
        try:
            return type(root.get_submodule(task.target)).__name__
        except AttributeError:
            return task.target
    return getattr(task.target, "__name__", str(task.target))


def _module_class(root: Optional[nn.Module], qualname: str) -> str:
    try:
        return type(root.get_submodule(qualname)).__name__ if root is not None else qualname
    except AttributeError:
        return qualname


def _layers(compiled: Any, executor: Any, prof: Any, rec: Any, measured: bool) -> List[Layer]:
    tg, traced = compiled.task_graph, compiled.traced
    reasons = _reasons(compiled, executor)
    root = getattr(traced, "root", None)
    rows: Dict[str, Layer] = {}
    fates: Dict[str, List[str]] = {}
    counts: Dict[str, List[float]] = {}       # layer -> [spikes, elements]
    order = {name: i for i, name in enumerate(compiled.schedule.order)}
    tasks = sorted(tg.tasks(), key=lambda t: (t.order, order.get(t.name, 0)))

    def row(qualname: str, cls: str, kind: str) -> Layer:
        if qualname not in rows:
            rows[qualname] = Layer(qualname, cls, "", kind, saved_bytes=0 if measured else None)
            fates[qualname] = []
        return rows[qualname]

    for t in tasks:
        if t.kind in _SKIP_KINDS:
            continue
        r = row(t.layer, _class_name(root, t), t.kind)
        r.tasks += 1
        r.steps += t.steps
        fate = _fate(t, traced, reasons)
        if fate not in fates[t.layer]:
            fates[t.layer].append(fate)
        if t.kind == "opaque":
            r.reason = _task_reason(t, traced, reasons)
        if t.kind == "neuron":
            r.kernel = getattr(traced.bindings.get(t.target), "how", None)
        if measured:
            r.saved_bytes += rec.saved.get(t.name, 0)
        if t.name in prof.spikes:
            c = counts.setdefault(t.layer, [0.0, 0])
            c[0] += prof.spikes[t.name][0]
            c[1] += prof.spikes[t.name][1]
        for f in t.fused:
            fr = row(f.module, _module_class(root, f.module), "fused")
            ff = _fused_fate(t, f.kind)
            if ff not in fates[f.module]:
                fates[f.module].append(ff)
            if f.kind == "maxpool_epilogue":
                r.rate_note = ("rate of the neuron's output after its fused max pool (1 where any spike in the "
                               "window): higher than the neuron's own rate")
            fr.saved_bytes = None
    for q, r in rows.items():
        r.fate = "; ".join(fates[q])
        if q in counts and counts[q][1]:
            r.spike_rate = counts[q][0] / counts[q][1]
    return list(rows.values())


def _counts(compiled: Any, layers: List[Layer]) -> Dict[str, int]:
    """Layers by fate (a layer split into chunks counts once), and the number of tasks."""
    tasks = [t for t in compiled.task_graph.tasks()]
    neurons = [r for r in layers if r.kind == "neuron"]
    return {"layers": len(layers),
            "compiled_neurons": len(neurons),
            "builtin": sum(1 for r in neurons if (r.kernel or "").startswith("builtin:")),
            "lifted": sum(1 for r in neurons if r.kernel == "lifted"),
            "opaque_modules": sum(1 for r in layers if r.kind == "opaque"),
            "fused": sum(1 for r in layers if r.kind == "fused"),
            "batched": sum(1 for r in layers if "batched over time" in r.fate),
            "bitpacked": sum(1 for r in layers if "bit-packed input" in r.fate),
            "tasks": len(tasks)}


# --------------------------------------------------------------------------- entry point
def explain(model: nn.Module, *example_inputs: Any, T: Optional[int] = None, sequence: bool = False,
            **compile_options: Any) -> Explanation:
    """Compile ``model`` (as ``snncc.compile(model, T=T, sequence=sequence, **compile_options)`` would, or
    take an already compiled ``CompiledModule``), run one forward on ``example_inputs`` and say what became
    of every layer: its fate (compiled neuron, fused, batched over time, opaque and why...), the spike rate
    of its output on that input, and the bytes it saved for backward (measured when the model is in
    training mode, grad is enabled and the output requires grad).

    The model is left as it was: buffers (BatchNorm running statistics), neuron states and attributes are
    restored, no ``.grad`` is written, the global RNG is untouched. Warnings raised while compiling
    (``snncc.frontend.OpaqueModuleWarning``) are re-issued and listed in ``Explanation.warnings``.
    """
    from .compiled import CompiledModule, compile as _compile
    from snncc.tools._taskprof import param_storages

    if isinstance(model, CompiledModule):
        if T is not None or sequence or compile_options:
            raise InputError("snncc.explain: the model is already compiled; pass T=, sequence= and compile "
                             "options to snncc.compile, not to explain")
        cm = model
    elif isinstance(model, nn.Module):
        cm = _compile(model, T=T, sequence=sequence, **compile_options)
    else:
        raise TypeError(f"snncc.explain expects an nn.Module or a CompiledModule, got {type(model).__name__}")
    eager = cm.model
    inputs = tuple(example_inputs)
    caught: List[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with _preserved(eager, inputs):
                # NOTE: the specialization that runs now is the one explained (with chunk="auto", later
                # calls may run a rebuilt, chunked one: same values, other tasks)
                compiled, executor = _specialization(cm, inputs)
                prof = _observer(param_storages(eager))
                grad = cm.training and torch.is_grad_enabled()
                rec = prof.begin()
                try:
                    with torch.set_grad_enabled(grad), cm.observing(prof), \
                            torch.autograd.graph.saved_tensors_hooks(prof.pack, prof.unpack):
                        out = cm(*inputs)
                finally:
                    prof.end()
                needs_grad = grad and any(isinstance(t, torch.Tensor) and t.requires_grad for t in _flat(out))
                del out                              # frees the autograd graph: nothing reaches .grad
    finally:
        for w in caught:                         # still shown, under the user's filters
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    measured = bool(needs_grad)
    layers = _layers(compiled, executor, prof, rec, measured)
    opaque = {r.qualname: r.reason or "" for r in layers if r.kind == "opaque"}
    total = prof.total if measured else None
    attributed = sum(rec.saved.values()) if measured else None
    T_run = max((t.t1 for t in compiled.task_graph.tasks() if t.t1 is not None), default=None)
    return Explanation(
        model=type(eager).__name__, form=cm.form, T=cm.T if cm.T is not None else T_run, training=cm.training,
        inputs=[(tuple(a.shape), str(a.dtype).replace("torch.", "")) for a in inputs if isinstance(a, torch.Tensor)],
        layers=layers, opaque=opaque, counts=_counts(compiled, layers), saved_bytes=total,
        saved_unattributed=None if total is None else max(total - attributed, 0),
        warnings=[f"{w.category.__name__}: {w.message}" for w in caught], compiled=compiled,
        memory_plan=executor.memory_plan if measured else None)


def _flat(value: Any) -> List[Any]:
    if isinstance(value, (list, tuple)):
        return [x for v in value for x in _flat(v)]
    if isinstance(value, dict):
        return [x for v in value.values() for x in _flat(v)]
    return [value]
