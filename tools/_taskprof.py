"""Per-task measurements of a compiled model: forward and backward time, spike rate, bytes saved, shapes.

How each number is obtained, so that it can be trusted:

* forward time: wall clock between the executor's ``before(task)`` and ``after(task, value)`` calls
  (``TaskObserver``), with a device synchronization around each task on CUDA;
* backward time: the autograd nodes a task created are found after it ran (walking ``grad_fn`` back from its
  output, stopping at nodes an earlier task owns) and timed with node pre/post hooks while ``backward()``
  runs; a task's backward time is the sum of its nodes' times. Engine overhead between nodes is counted in
  the backward wall time only, never attributed to a task;
* saved bytes: ``torch.autograd.graph.saved_tensors_hooks`` sees every tensor kept for backward (snncc's
  tasks save through ``ctx.save_for_backward``); unique storages are counted once (by data pointer), at the
  task that saved them first; the model's parameters and buffers are excluded (they exist anyway);
* spike rate: the mean of a neuron task's output (spikes are 0/1).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Set, Tuple

import torch
from torch import nn

from snncc.ir import Schedule, Task, TaskGraph
from snncc.runtime.executor import TaskObserver

from ._loader import flatten_tensors

__all__ = ["TaskRow", "RunRecord", "TaskProfiler", "profile_compiled", "planned_lanes", "task_describe", "module_class",
           "task_rows", "median_run",
           "storage_bytes", "param_storages", "memory_plan_of", "memory_plan_lines", "memory_notes"]


def storage_bytes(t: torch.Tensor) -> Tuple[int, int]:
    """(data pointer, bytes) of the storage behind ``t``: what keeping ``t`` alive really costs."""
    try:
        s = t.untyped_storage()
        return s.data_ptr(), s.nbytes()
    except (RuntimeError, NotImplementedError):
        return id(t), t.numel() * t.element_size()


def param_storages(model: nn.Module) -> Set[int]:
    """Data pointers of a model's parameters and buffers (excluded from 'saved for backward')."""
    ptrs = set()
    for t in list(model.parameters()) + list(model.buffers()):
        ptrs.add(storage_bytes(t)[0])
    return ptrs


def planned_lanes(schedule: Schedule) -> Tuple[Dict[str, int], Dict[str, int]]:
    """(wave, lane) per task: task i of a wave goes to lane i -- the streams a wavefront run would use.

    The CPU runtime runs everything on one stream; these lanes are the plan, labelled as such wherever shown.
    """
    wave, lane = {}, {}
    for w, names in enumerate(schedule.waves):
        for i, name in enumerate(names):
            wave[name], lane[name] = w, i
    return wave, lane


def module_class(root: Optional[nn.Module], qualname: Any) -> str:
    """The class name of ``root``'s submodule ``qualname`` (the qualname itself if it cannot be found)."""
    if root is None or not isinstance(qualname, str):
        return str(qualname)
    try:
        return type(root.get_submodule(qualname)).__name__
    except AttributeError:
        return qualname


def task_describe(task: Task, root: Optional[nn.Module]) -> str:
    """A short human name for what a task runs: the module's class, 'LIF scan', a function's name, plus
    the work fused into it (``+ MaxPool2d``)."""
    if task.kind in ("module", "neuron", "opaque") and isinstance(task.target, str):
        cls = module_class(root, task.target)
        text = {"neuron": f"{cls} scan", "opaque": f"{cls} (opaque)"}.get(task.kind, cls)
    elif task.kind in ("function", "method"):
        text = getattr(task.target, "__name__", str(task.target))
    else:
        text = task.kind
    for f in getattr(task, "fused", ()):       # NOTE: getattr: older IRs have no fusions
        text += f" + {module_class(root, f.module)}"
    return text


@dataclass
class RunRecord:
    """One profiled forward (+ backward): per-task spans in seconds from the run's start."""

    fwd: Dict[str, Tuple[float, float]] = field(default_factory=dict)
    bwd: Dict[str, List[Tuple[float, float, str]]] = field(default_factory=dict)
    saved: Dict[str, int] = field(default_factory=dict)
    out_bytes: Dict[str, int] = field(default_factory=dict)
    spike_rate: Dict[str, float] = field(default_factory=dict)
    shapes: Dict[str, List[Tuple[int, ...]]] = field(default_factory=dict)
    forward_wall: float = 0.0
    backward_wall: Optional[float] = None
    start: float = 0.0


class TaskProfiler(TaskObserver):
    """A TaskObserver that records one ``RunRecord`` per run (see the module docstring for the method)."""

    def __init__(self, exclude_storages: Iterable[int] = (), sync: Optional[Callable[[], None]] = None,
                 backward_hooks: bool = True) -> None:
        self.exclude = set(exclude_storages)
        self.sync = sync or (lambda: None)
        self.backward_hooks = backward_hooks
        self.runs: List[RunRecord] = []
        self._run: Optional[RunRecord] = None
        self._current: Optional[str] = None
        self._t: float = 0.0
        self._claimed: Set[Any] = set()
        self._seen: Set[int] = set()
        self._handles: List[Any] = []

    # ------------------------------------------------------------ run bracketing
    def begin(self) -> RunRecord:
        self.end()
        self.sync()
        self._run = RunRecord(start=time.perf_counter())
        self._claimed, self._seen, self._current = set(), set(), None
        self.runs.append(self._run)
        return self._run

    def end(self) -> None:
        """Remove this run's backward hooks (call after its backward).

        NOTE: required, not tidiness: a parameter's AccumulateGrad node outlives the graph, so a hook left on
        it would fire in every later backward and attribute that time to this run.
        """
        for h in self._handles:
            h.remove()
        self._handles = []
        self._claimed = set()

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        """saved_tensors_hooks pack: count a storage the first time a task saves it; the tensor is kept as is."""
        if self._run is not None and self._current is not None:
            ptr, nbytes = storage_bytes(t)
            if ptr not in self._seen and ptr not in self.exclude:
                self._seen.add(ptr)
                self._run.saved[self._current] = self._run.saved.get(self._current, 0) + nbytes
        return t

    @staticmethod
    def unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    # ------------------------------------------------------------ TaskObserver
    def before(self, task: Task) -> None:
        self.sync()
        self._current = task.name
        self._t = time.perf_counter()

    def after(self, task: Task, value: Any) -> None:
        self.sync()
        end = time.perf_counter()
        run = self._run
        if run is None:
            return
        run.fwd[task.name] = (self._t - run.start, end - run.start)
        self._current = None
        tensors = flatten_tensors(value)
        run.shapes[task.name] = [tuple(t.shape) for t in tensors]
        out, seen = 0, set()
        for t in tensors:
            ptr, nbytes = storage_bytes(t)
            if ptr not in seen and ptr not in self.exclude:
                seen.add(ptr)
                out += nbytes
        run.out_bytes[task.name] = out
        if task.kind in ("neuron", "opaque") and tensors and tensors[0].is_floating_point() and tensors[0].numel():
            s = tensors[0].detach()
            if task.kind == "neuron" or bool(((s == 0) | (s == 1)).all()):
                run.spike_rate[task.name] = float(s.float().mean())
        if self.backward_hooks:
            self._claim(task.name, tensors)

    # ------------------------------------------------------------ backward attribution
    def _claim(self, name: str, tensors: List[torch.Tensor]) -> None:
        """Hook the autograd nodes this task created: those reachable from its outputs and not yet owned."""
        stack = [t.grad_fn for t in tensors if t.requires_grad and t.grad_fn is not None]
        while stack:
            node = stack.pop()
            if node is None or node in self._claimed:
                continue
            self._claimed.add(node)
            self._hook(node, name)
            stack.extend(nxt for nxt, _ in node.next_functions if nxt is not None)

    def _hook(self, node: Any, name: str) -> None:
        run = self._run
        starts: List[float] = []
        sync = self.sync
        node_name = node.name()     # not the node itself: a hook holding its node would keep graphs alive

        def pre(grad_outputs: Any) -> None:
            sync()
            starts.append(time.perf_counter())

        def post(grad_inputs: Any, grad_outputs: Any) -> None:
            sync()
            if starts:
                t0 = starts.pop()
                run.bwd.setdefault(name, []).append((t0 - run.start, time.perf_counter() - run.start,
                                                     node_name))
        try:
            self._handles.append(node.register_prehook(pre))
            self._handles.append(node.register_hook(post))
        except (RuntimeError, AttributeError):      # a node type without hooks: not timed
            pass


def median_run(prof: "TaskProfiler") -> Optional[RunRecord]:
    """The profiled run with the median total time: the one to draw or trace (not an outlier)."""
    if not prof.runs:
        return None
    ranked = sorted(prof.runs, key=lambda r: r.forward_wall + (r.backward_wall or 0.0))
    return ranked[(len(ranked) - 1) // 2]


def _median(xs: List[float]) -> Optional[float]:
    return statistics.median(xs) if xs else None


@dataclass
class TaskRow:
    """What snncc-prof reports per task (times in ms: medians over the profiled runs)."""

    name: str
    layer: str
    kind: str
    op: str
    label: str
    t0: Optional[int]
    t1: Optional[int]
    batched: bool
    wave: int
    lane: int
    fwd_ms: float
    bwd_ms: Optional[float]
    spike_rate: Optional[float]
    saved_bytes: int
    out_bytes: int
    out_shape: List[Tuple[int, ...]]

    def as_json(self) -> Dict[str, Any]:
        d = dict(self.__dict__)
        d["out_shape"] = [list(s) for s in self.out_shape]
        return d


def _loss(out: Any) -> Optional[torch.Tensor]:
    """A stand-in loss that touches every output (sum of mean squares): backward then runs the whole graph."""
    parts = [t.float().square().mean() for t in flatten_tensors(out) if t.is_floating_point() and t.requires_grad]
    return sum(parts) if parts else None


def _profiled_run(cm: Any, x: torch.Tensor, prof: TaskProfiler, rec: RunRecord, backward: bool,
                  sync: Optional[Callable[[], None]]) -> None:
    """One forward (+ backward) under the profiler, filling ``rec``'s wall times."""
    if not backward:
        with cm.observing(prof), torch.no_grad():
            cm(x)
        if sync:
            sync()
        rec.forward_wall = time.perf_counter() - rec.start
        return
    with cm.observing(prof), torch.autograd.graph.saved_tensors_hooks(prof.pack, prof.unpack):
        out = cm(x)
    if sync:
        sync()
    rec.forward_wall = time.perf_counter() - rec.start
    loss = _loss(out)
    if loss is not None:
        t0 = time.perf_counter()
        loss.backward()
        if sync:
            sync()
        rec.backward_wall = time.perf_counter() - t0


def profile_compiled(cm: Any, x: torch.Tensor, runs: int, warmup: int, train: bool = True,
                     exclude: Iterable[int] = (), backward: Optional[bool] = None) -> Tuple[TaskProfiler, Any]:
    """Run the compiled module ``warmup + runs`` times under a TaskProfiler; keep the last ``runs`` records.

    ``train``: the module's mode. ``backward`` (default: ``train``): forward with autograd then ``backward``
    of a stand-in loss (backward times, saved bytes); otherwise the forward runs under ``no_grad``.
    Returns the profiler and the specialization that ran.
    """
    sync = torch.cuda.synchronize if x.device.type == "cuda" else None
    backward = train if backward is None else backward
    cm.train(train)
    prof = TaskProfiler(exclude, sync, backward_hooks=backward)
    for i in range(warmup + runs):
        for p in cm.parameters():
            p.grad = None
        rec = prof.begin()
        try:
            _profiled_run(cm, x, prof, rec, backward, sync)
        finally:
            prof.end()
        if i < warmup:
            prof.runs.pop()
    for p in cm.parameters():
        p.grad = None
    return prof, cm.specialize(x)


def task_rows(prof: TaskProfiler, compiled: Any) -> List[TaskRow]:
    """Per-task medians over the profiled runs, in schedule order."""
    tg: TaskGraph = compiled.task_graph
    wave, lane = planned_lanes(compiled.schedule)
    root = getattr(compiled.traced, "root", None)
    rows = []
    for name in compiled.schedule.order:
        task = tg.task(name)
        fwd = [(r.fwd[name][1] - r.fwd[name][0]) * 1e3 for r in prof.runs if name in r.fwd]
        bwd = [sum(e - s for s, e, _ in r.bwd.get(name, ())) * 1e3 for r in prof.runs
               if r.backward_wall is not None]
        has_bwd = any(name in r.bwd for r in prof.runs)
        last = prof.runs[-1] if prof.runs else RunRecord()
        rates = [r.spike_rate[name] for r in prof.runs if name in r.spike_rate]
        rows.append(TaskRow(
            name=name, layer=task.layer, kind=task.kind, op=task_describe(task, root), label=task.label,
            t0=task.t0, t1=task.t1, batched=task.batched, wave=wave.get(name, 0), lane=lane.get(name, 0),
            fwd_ms=_median(fwd) or 0.0, bwd_ms=_median(bwd) if has_bwd else None,
            spike_rate=_median(rates), saved_bytes=last.saved.get(name, 0), out_bytes=last.out_bytes.get(name, 0),
            out_shape=last.shapes.get(name, [])))
    return rows


# --------------------------------------------------------------------------- the memory plan
def memory_plan_of(cm: Any) -> Optional[Any]:
    """The memory plan (``passes.MemoryPlan``) of ``cm``'s most recently run specialization, or None (no
    training call ran, or not a compiled model)."""
    plans = getattr(cm, "memory_plans", None)
    if not plans:
        return None
    plan = list(plans.values())[-1]
    return plan if plan.layers else None


def memory_plan_lines(plan: Any) -> List[str]:
    """The plan as text: its summary, then per neuron layer what it keeps for backward and what rerunning
    its scan costs (predicted by passes/plan_memory.py)."""
    lines = [plan.summary()]
    for layer, d in plan.by_layer().items():
        what = {"input": "its input + initial V (scan rerun in backward)",
                "source": "initial V only (input recomputed from its producer's kept input, scan rerun)",
                "h": "H + spike bits"}.get(d["keep"], "mixed over chunks")
        cost = f", recompute {d['recompute_us'] / 1e3:.2f} ms" if d["keep"] != "h" else ""
        lines.append(f"  {layer}: keeps {what}, {d['kept_bytes'] / 2 ** 20:.2f} MiB{cost} ({d['why']})")
    return lines


def memory_notes(plan: Optional[Any]) -> Dict[str, str]:
    """Per neuron layer, a short note of what it keeps for backward (for tables of layers)."""
    if plan is None:
        return {}
    out = {}
    for layer, d in plan.by_layer().items():
        mib = d["kept_bytes"] / 2 ** 20
        kept = {"h": "H + bits", "source": "no input (recomputed from its producer)"}.get(d["keep"], "input")
        cost = "" if d["keep"] == "h" else f" (recompute {d['recompute_us'] / 1e3:.2f} ms)"
        out[layer] = f"backward keeps {kept}, {mib:.2f} MiB{cost}"
    return out
