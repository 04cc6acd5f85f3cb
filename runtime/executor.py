"""Executor: runs a Schedule's tasks in order on torch tensors; autograd records them for backward.

Values live in an environment keyed by task name. A time-batched task's value is one tensor ``[K*N, ...]``
(or, when its steps could not be packed, a list of K values); ``Ref(task, i)`` is a view of step i. A
``Steps`` argument that is exactly all steps of one batched task is passed without a copy; otherwise the
steps are concatenated. When packing would change a module's meaning (per-step shapes differ, an unbatched
input to a conv), the task falls back to running its steps one by one: slower, never wrong.
"""
from __future__ import annotations

import dataclasses

import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from snncc.config import Options
from snncc.errors import InputError, SNNCCError, TaskFailure
from snncc.frontend import Traced, reset_module
from snncc.ir import Ref, Schedule, SliceConst, Steps, Task, TaskGraph
from .batched_ops import batched_call
from .batchnorm import batch_norm_steps
from .cpu import c_bn_scan, can_rerun as cpu_can_rerun, supports as cpu_supports
from .streams import StreamPlan
from .packed import packed_conv, packed_linear
from .conv_pool import conv_maxpool
from .maxpool import pool_kk, pool_kk_size
from .recompute import attach_source, saving_as_source, source_of
from .dispatch import lifted_neuron_scan, lifted_neuron_scan_pooled, neuron_scan, recurrent_cell_scan
from snncc.lift import _set_state
from snncc.passes.batch_over_time import GUARDED_FUNCTIONS, GUARDED_METHODS
from snncc.passes.plan_memory import STEP_PER_FORWARD, MemoryPlan, ScanCost, plan_memory


_WARNED: set = set()


def _warn_once(msg: str) -> None:
    if msg not in _WARNED:
        _WARNED.add(msg)
        import warnings
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


class TaskObserver:
    """Watches a run task by task (snncc-prof's per-task timing, spike rates, saved bytes).

    ``before`` is called just before a task runs, ``after`` with the value it produced. The base class does
    nothing; subclass and pass it to ``CompiledModule.observing(...)``. Observers must not change values.
    """

    def before(self, task: Task) -> None:
        pass

    def after(self, task: Task, value: Any) -> None:
        pass


def _fold_bn(w: torch.Tensor, b: Optional[torch.Tensor], bn: nn.Module
             ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Conv weights with an eval BatchNorm folded in: BN(conv(x; w, b)) == conv(x; w', b')."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = bn.weight * scale
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    w2 = w * scale.reshape(-1, *([1] * (w.dim() - 1)))
    b2 = shift if b is None else b * scale + shift
    return w2, b2


class _Unpackable(Exception):
    """Steps of a batched task cannot be packed along dim 0; run them one by one."""


def _bn_steps(xs: torch.Tensor, broadcast: bool, K: int, bn: nn.Module) -> torch.Tensor:
    """A training BatchNorm's K steps ``[K, *S]`` of a neuron's input; a broadcast input (one tensor every
    step reads) is normalized K times, as K eager calls do (K running-statistics updates)."""
    return batch_norm_steps(xs.unsqueeze(0).expand(K, *xs.shape) if broadcast else xs, bn)


def _module_rank(m: nn.Module) -> Optional[int]:
    """The input rank a 1d/2d/3d conv, pool or norm needs to treat dim 0 as the batch."""
    name = type(m).__name__
    for suffix, rank in (("1d", 3), ("2d", 4), ("3d", 5)):
        if name.endswith(suffix) and not isinstance(m, nn.BatchNorm1d):
            return rank
    return None


_CL_MODULES = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)
#: spike inputs smaller than this (elements) are not bit-packed nor run spike-driven (per-call overhead)
_SMALL = 1 << 15


def _to_channels_last(x: Any) -> Any:
    """NHWC for 4-d float32 CPU tensors: oneDNN's convolutions and pooling are several times faster so."""
    if isinstance(x, torch.Tensor) and x.dim() == 4 and x.device.type == "cpu" and x.dtype == torch.float32:
        return x.contiguous(memory_format=torch.channels_last)
    return x


#: key suffix of a recurrent cell's last spikes in the carried states (a stream's next call starts from them)
_PREV = "#spikes"


def _adjacent_view(parts: Sequence[torch.Tensor]) -> Optional[torch.Tensor]:
    """``torch.cat(parts)`` as a view, when the parts are consecutive rows of one contiguous tensor (the
    steps ``x_seq[t0:t1]`` of a sequence input): no copy of the input, and nothing extra kept for backward."""
    base = parts[0]._base
    if base is None or not base.is_contiguous() or not all(p._base is base and p.is_contiguous() for p in parts):
        return None
    n = parts[0].numel()
    off = parts[0].storage_offset() - base.storage_offset()
    if any(p.storage_offset() - base.storage_offset() != off + i * n for i, p in enumerate(parts)):
        return None
    flat = base.reshape(-1)[off:off + n * len(parts)]
    return flat.view(len(parts) * parts[0].shape[0], *parts[0].shape[1:])


def _checkpoint_signals() -> Tuple[type, ...]:
    """Exceptions torch's checkpoint raises through the recomputed function to stop it early: not failures."""
    try:
        from torch.utils.checkpoint import _StopRecomputationError
        return (_StopRecomputationError,)
    except ImportError:         # another torch version: nothing of the kind to let through
        return ()


_CHECKPOINT_SIGNALS = _checkpoint_signals()


def _flatten(ext: Dict[str, Any], states: Dict[str, Any]) -> Tuple[List[Any], Any]:
    """A chunk's inputs as one flat list (what ``checkpoint`` takes) and how to put them back."""
    flat: List[Any] = []
    spec: List[Any] = []
    for n, v in ext.items():
        if isinstance(v, dict):
            spec.append(("steps", n, sorted(v)))
            flat.extend(v[j] for j in sorted(v))
        else:
            spec.append(("value", n, None))
            flat.append(v)
    for key, v in states.items():
        if isinstance(v, tuple):
            spec.append(("state", key, len(v)))
            flat.extend(v)
        else:
            spec.append(("state1", key, None))
            flat.append(v)
    return flat, spec


def _unflatten(spec: Any, tensors: Sequence[Any]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    it = iter(tensors)
    ext: Dict[str, Any] = {}
    states: Dict[str, Any] = {}
    for kind, n, extra in spec:
        if kind == "steps":
            ext[n] = {j: next(it) for j in extra}
        elif kind == "value":
            ext[n] = next(it)
        elif kind == "state":
            states[n] = tuple(next(it) for _ in range(extra))
        else:
            states[n] = next(it)
    return ext, states


@dataclass
class _Run:
    """Per-call state: values, cached step views, neuron states."""

    env: Dict[str, Any]
    views: Dict[str, Sequence[Any]]
    states: Dict[str, Tuple[torch.Tensor, ...]]


class Executor:
    """Executes one specialization (a TaskGraph and its Schedule) of a traced model."""

    def __init__(self, traced: Traced, tg: TaskGraph, schedule: Schedule, channels_last: bool = True,
                 options: Options = Options()) -> None:
        self.traced, self.tg, self.options = traced, tg, options
        self.h_dtype = torch.float16 if options.memory == "half" else None
        self.plan: Optional[StreamPlan] = None
        self.backend: Any = None
        # NOTE: a layout choice only; values are the same up to float rounding of the convolution.
        self.channels_last = channels_last
        self.tasks: List[Task] = [tg.task(n) for n in schedule.order]
        self.placeholders = [t.name for t in sorted((t for t in self.tasks if t.kind == "placeholder"),
                                                    key=lambda t: t.order)]
        self.last_chunk: Dict[str, str] = {}
        for t in self.tasks:
            if t.kind == "neuron":
                self.last_chunk[t.target] = t.name
        self.modules: Dict[str, nn.Module] = {t.target: traced.root.get_submodule(t.target)
                                              for t in self.tasks if t.kind in ("module", "neuron", "opaque")}
        for t in self.tasks:
            for f in t.fused:
                self.modules[f.module] = traced.root.get_submodule(f.module)
        # neuron tasks read only by flattens get channels-first pooled output (fixed per schedule)
        self._cell_lifts: Dict[str, Any] = {}     # recurrent cells of built-in neurons: their lifted steps
        self.flattened = {t.name for t in self.tasks if t.kind == "neuron" and self._flattened(t)}
        self.frees = self._last_uses()
        self.regions = self._time_regions() if options.memory == "min" else None
        # memory plan (passes/plan_memory.py): the neuron scans seen in training, the training forwards'
        # times, and (memory="default") the plan the later calls run with
        self._scans: Dict[str, ScanCost] = {}
        self._fwd_us: List[float] = []
        self._scan_us: Dict[str, float] = {}      # neuron task -> its fastest measured forward (us)
        self._task_us: Dict[str, float] = {}      # producer (conv/linear) task -> its fastest forward (us)
        self._device: Optional[torch.device] = None
        self._plan: Optional[MemoryPlan] = None
        self.handlers: Dict[str, Callable[[Task, _Run], Any]] = {
            "placeholder": self._placeholder, "get_attr": self._get_attr, "module": self._module,
            "function": self._function, "method": self._method, "neuron": self._neuron,
            "opaque": self._opaque, "output": self._output}

    #: training forwards timed for the default memory plan (the fastest counts: the first pays for kernels)
    PLAN_CALLS = 3

    @property
    def memory_plan(self) -> MemoryPlan:
        """What each built-in neuron scan keeps for backward (``passes.plan_memory``): the plan the default
        mode runs with (from its first training calls on), or what ``max``/``half``/``min`` keep. Empty
        before a training call (the scans are recorded as they run)."""
        if self.options.memory == "default" and self._plan is not None:
            return self._plan
        return self._make_plan()

    def _make_plan(self) -> MemoryPlan:
        cal = None
        if self._scans and self.options.memory in ("default", "min", "max"):
            from .calibrate import calibrate
            cal = calibrate(self._device or torch.device("cpu"))
        step = STEP_PER_FORWARD * min(self._fwd_us) if self._fwd_us else None
        order = {t.name: i for i, t in enumerate(self.tasks)}
        scans = sorted((dataclasses.replace(c, measured_us=self._scan_us.get(c.name),
                                            source_us=None if c.source is None else self._task_us.get(c.source))
                        for c in self._scans.values()), key=lambda c: order.get(c.name, 0))
        return plan_memory(scans, self.options.memory, cal, step)

    def _recompute(self, task: Task) -> bool:
        """Whether this neuron scan keeps only its input and reruns in backward (the memory plan)."""
        mode = self.options.memory
        if mode == "min":
            return True
        return mode == "default" and self._plan is not None and self._plan.recompute(task.name)

    def _sources_on(self, x: Any) -> bool:
        """Whether conv/linear outputs are marked recomputable (``runtime/recompute.py``) in this call:
        training with a plan that may use them, outside ``memory="min"``'s time chunks (checkpointed as a
        whole) and autocast (a rerun in backward would not run in the autocast dtype)."""
        return (self.options.memory in ("min", "default") and self.regions is None and torch.is_grad_enabled()
                and isinstance(x, torch.Tensor) and not torch.is_autocast_enabled(x.device.type))

    def _input_source(self, task: Task, xs: torch.Tensor) -> Any:
        """The Source the scan of ``task`` saves its input as (None: it keeps the input), per the plan."""
        mode = self.options.memory
        # NOTE: "min" recomputes from the producer until its plan is measured (the least memory meanwhile)
        if (mode == "min" and (self._plan is None or self._plan.from_source(task.name))) or \
                (mode == "default" and self._plan is not None and self._plan.from_source(task.name)):
            return source_of(xs) if self._sources_on(xs) else None
        return None

    def _record_scan(self, task: Task, xs: torch.Tensor, broadcast: bool, K: int, state0: Any, spec: Any,
                     can: bool, why: str = "", keeps_input: bool = False) -> None:
        if task.name in self._scans or not torch.is_grad_enabled():
            return
        M = xs.numel() // (1 if broadcast else max(K, 1))
        size = 4 if xs.dtype in (torch.float16, torch.bfloat16) else xs.element_size()
        src = source_of(xs) if self._sources_on(xs) else None
        self._scans[task.name] = ScanCost(task.name, str(task.target), int(M), K, size, broadcast,
                                          state0 is not None, 2 if self.h_dtype is not None else None,
                                          can, keeps_input or spec.kind == "plif", why,
                                          in_kernel_rerun=can and cpu_can_rerun(spec, None),
                                          source=None if src is None else src.task)

    def _last_uses(self) -> List[Tuple[str, ...]]:
        """For each task in schedule order, the values no later task reads: dropped once it has run.

        NOTE: without this every intermediate value of a call stayed alive until the call returned, so the
        forward's peak held all of them at once (what autograd saves for backward is kept either way)."""
        from snncc.verify import iter_refs
        last: Dict[str, int] = {}
        for i, t in enumerate(self.tasks):
            for ref in iter_refs((t.args, t.kwargs)):
                last[ref.task] = i
        frees: List[List[str]] = [[] for _ in self.tasks]
        for name, i in last.items():
            if name != self.tg.output:
                frees[i].append(name)
        return [tuple(f) for f in frees]

    def _time_regions(self) -> Optional[List[List[int]]]:
        """``memory="min"`` with chunks: the tasks grouped by time chunk (schedule indices), each chunk to run
        under activation checkpointing, so that backward keeps only what crosses chunk boundaries (neuron
        states, the recurrent spikes of the last step) and the peak grows with the chunk, not with T.

        None (the usual run) when there is one chunk, or when recomputing a chunk in backward would not be
        the same as running it once: training BatchNorm (running statistics updated twice), random draws,
        opaque modules (their own state)."""
        K = max((t.steps for t in self.tasks if t.batched and t.kind == "neuron"), default=0)
        if K < 1 or not any(t.t0 is not None and t.t0 >= K for t in self.tasks):
            return None
        for t in self.tasks:
            m = self.modules.get(t.target) if isinstance(t.target, str) else None
            if t.kind == "opaque" or isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.Dropout)) or \
                    any(isinstance(self.modules.get(f.module), nn.modules.batchnorm._BatchNorm) for f in t.fused):
                return None
            if t.kind in ("function", "method") and "drop" in str(getattr(t.target, "__name__", t.target)):
                return None
        regions: Dict[int, List[int]] = {}
        for i, t in enumerate(self.tasks):
            if t.t0 is None:
                continue                                   # time-invariant: runs before the chunks
            r = t.t0 // K
            if (t.t1 - 1) // K != r:
                return None                                # a task across chunks: no clean cut
            regions.setdefault(r, []).append(i)
        return [regions[r] for r in sorted(regions)] if len(regions) > 1 else None

    # ----------------------------------------------------------------- values
    def _view(self, run: _Run, ref: Ref) -> Any:
        val = run.env[ref.task]
        if ref.step is None:
            return val
        views = run.views.get(ref.task)
        if views is None:
            k = len(self.tg.task(ref.task).nodes)
            views = val if isinstance(val, list) else val.chunk(k)
            run.views[ref.task] = views
        return views[ref.step]

    def _whole(self, run: _Run, refs: Tuple[Ref, ...]) -> Optional[torch.Tensor]:
        """The packed tensor of a batched task when ``refs`` are exactly its steps in order."""
        src = refs[0].task
        val = run.env.get(src)
        if isinstance(val, torch.Tensor) and len(refs) == len(self.tg.task(src).nodes) and \
                all(r.task == src and r.step == i for i, r in enumerate(refs)):
            return val
        return None

    def _packed(self, run: _Run, steps: Steps) -> torch.Tensor:
        whole = self._whole(run, steps.refs)
        if whole is not None:
            return whole
        parts = [self._view(run, r) for r in steps.refs]
        if not any(isinstance(p, torch.Tensor) for p in parts) and all(type(p) is type(parts[0]) and p == parts[0]
                                                                      for p in parts):
            return parts[0]        # the same number at every step (a size from x.shape): passed as is
        if not all(isinstance(p, torch.Tensor) and p.dim() >= 1 and p.shape == parts[0].shape for p in parts):
            raise _Unpackable()
        view = _adjacent_view(parts)
        return view if view is not None else torch.cat(parts)

    def _value(self, run: _Run, a: Any, member: Optional[int] = None) -> Any:
        if isinstance(a, Ref):
            return self._view(run, a)
        if isinstance(a, Steps):
            return self._view(run, a.refs[member]) if member is not None else self._packed(run, a)
        if isinstance(a, SliceConst):
            return slice(self._value(run, a.start, member), self._value(run, a.stop, member),
                         self._value(run, a.step, member))
        if isinstance(a, tuple):
            if a and isinstance(a[0], str) and a[0] == "__list__":
                return [self._value(run, x, member) for x in a[1:]]
            return tuple(self._value(run, x, member) for x in a)
        return a

    def _guarded(self, task: Task, run: _Run, fn: Callable[..., Any]) -> Any:
        """A batched shape/matmul/reduction task (``batched_ops``): one call when its guard holds for these
        tensors, else step by step."""
        per_step = [isinstance(a, Steps) for a in task.args]
        return self._call(task, run, fn, batched=lambda args, kw: batched_call(
            task.kind, task.target, args, kw, len(task.nodes), per_step))

    def _call(self, task: Task, run: _Run, fn: Callable[..., Any], check: Callable[[Any], bool] = None,
              batched: Optional[Callable[..., Any]] = None) -> Any:
        """Call ``fn`` on the task's arguments, packed over its steps, or step by step if that fails.
        ``batched(args, kwargs)``: the one call to make on the packed arguments instead of ``fn``, or None."""
        kwargs = dict(task.kwargs)
        if task.batched:
            try:
                args = self._value(run, task.args)
                kw = {k: self._value(run, v) for k, v in kwargs.items()}
                if batched is not None:
                    call = batched(args, kw)
                    if call is not None:
                        f, a, k = call
                        return f(*a, **k)
                elif check is None or check(args):
                    return fn(*args, **kw)
            except _Unpackable:
                pass
            return [fn(*self._value(run, task.args, i), **{k: self._value(run, v, i) for k, v in kwargs.items()})
                    for i in range(len(task.nodes))]
        return fn(*self._value(run, task.args), **{k: self._value(run, v) for k, v in kwargs.items()})

    # ----------------------------------------------------------------- task kinds
    def _placeholder(self, task: Task, run: _Run) -> Any:
        return run.env["__inputs__"][self.placeholders.index(task.name)]

    def _get_attr(self, task: Task, run: _Run) -> Any:
        obj: Any = self.traced.root
        for part in task.target.split("."):
            obj = getattr(obj, part)
        return obj

    def _module(self, task: Task, run: _Run) -> Any:
        m = self.modules[task.target]
        if task.batched and isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
            # NOTE: step mode normalizes each step with its own batch statistics and updates the running
            # statistics once per step: batch_norm_steps does exactly that for the K steps in one op.
            x = self._value(run, task.args[0])
            if not isinstance(x, torch.Tensor):
                return self._call(task, run, m)
            K = len(task.nodes)
            if not isinstance(task.args[0], Steps):    # one time-invariant input read at every step
                if _module_rank(m) in (None, x.dim()) and x.dim() >= 2:
                    return _bn_steps(x, True, K, m).reshape(K * x.shape[0], *x.shape[1:])
                return torch.cat([m(x) for _ in range(K)])
            if x.dim() >= 2 and _module_rank(m) in (None, x.dim()) and x.dim() >= 2:
                x5 = x.view(K, x.shape[0] // K, *x.shape[1:])
                return batch_norm_steps(x5, m).view(x.shape)
            return torch.cat([m(xs) for xs in x.chunk(K)])
        rank = _module_rank(m)
        if task.spike_input or task.fused:
            return self._conv_like(task, run, m, rank)
        if rank == 4 and self.channels_last and isinstance(m, _CL_MODULES):
            if isinstance(m, nn.Conv2d) and m.padding_mode == "zeros" and type(m).forward is nn.Conv2d.forward:
                return self._call(task, run, lambda x: self._dense_conv(task, m, _to_channels_last(x)),
                                  lambda args: len(args) == 1 and isinstance(args[0], torch.Tensor) and
                                  args[0].dim() == rank)
            return self._call(task, run, lambda x, *a, **k: m(_to_channels_last(x), *a, **k),
                              lambda args: isinstance(args[0], torch.Tensor) and args[0].dim() == rank)
        return self._call(task, run, m, None if rank is None else
                          (lambda args: isinstance(args[0], torch.Tensor) and args[0].dim() == rank))

    def _dense_conv(self, task: Task, m: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
        """``m(x)`` (its hooks too); in training, the output marked recomputable from ``x`` and the weight,
        which the convolution's backward keeps anyway (a hoisted first layer's output, fed to a neuron at
        every step, then need not be kept: ``runtime/recompute.py``)."""
        y = m(x)
        if self._sources_on(x) and m.weight.requires_grad and not m._forward_hooks and not m._forward_pre_hooks:
            attach_source(y, lambda x, w, *b: m._conv_forward(x, w, b[0] if b else None),
                          (x, m.weight) + (() if m.bias is None else (m.bias,)), f"convolution '{task.target}'",
                          task.name)
        return y

    def _conv_like(self, task: Task, run: _Run, m: nn.Module, rank: Optional[int]) -> Any:
        """A conv/linear with its fusions: eval BatchNorm folded into the weights, spike input kept as bits,
        the max pool after a training conv (``runtime/conv_pool.py``)."""
        fold = task.fusion("bn_fold")
        cl = rank == 4 and self.channels_last
        pool = task.fusion("conv_maxpool")

        def fn(x: torch.Tensor) -> torch.Tensor:
            w, b = m.weight, m.bias
            if fold is not None:
                w, b = _fold_bn(w, b, self.modules[fold.module])
            if pool is not None:      # the max pool after it, with the backward from the pooled gradient
                x = _to_channels_last(x) if cl else x
                return conv_maxpool(m, x, pool.params[0], w, b, spikes=task.spike_input,
                                    conv=lambda v: conv(v, w, b))
            return conv(x, w, b)

        def conv(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor]) -> torch.Tensor:
            # NOTE: below _SMALL elements packing saves little memory and costs more than it saves in time
            pack = task.spike_input and torch.is_grad_enabled() and w.requires_grad and x.numel() >= _SMALL
            # the output, recomputable from the input's bits (a neuron's input the plan need not keep)
            src = task.name if pack and self._sources_on(x) else None
            if isinstance(m, nn.Linear):
                if task.spike_input and (pack or (x.device.type == "cpu" and x.numel() >= _SMALL)):
                    # bits for backward; spike-driven forward on CPU
                    return packed_linear(m, x, source=src if fold is None else None)
                return nn.functional.linear(x, w, b)
            if cl:
                x = _to_channels_last(x)
            if task.spike_input and m.padding_mode == "zeros" and \
                    (pack or (x.device.type == "cpu" and x.numel() >= _SMALL)):
                return packed_conv(m, x, w, b, source=src)      # bits for backward; spike-driven forward on CPU
            return m._conv_forward(x, w, b)
        return self._call(task, run, fn, None if rank is None else
                          (lambda args: isinstance(args[0], torch.Tensor) and args[0].dim() == rank))

    def _function(self, task: Task, run: _Run) -> Any:
        if task.target is torch.stack and not task.batched and task.args and \
                isinstance(task.args[0], tuple) and task.args[0][:1] == ("__list__",) and \
                dict(task.kwargs).get("dim", task.args[1] if len(task.args) > 1 else 0) == 0:
            refs = task.args[0][1:]
            if refs and all(isinstance(r, Ref) for r in refs):
                whole = self._whole(run, refs)
                if whole is not None:     # stacking all steps of a batched task: a view, no copy
                    return whole.view(len(refs), whole.shape[0] // len(refs), *whole.shape[1:])
        if task.batched and task.target in GUARDED_FUNCTIONS:
            return self._guarded(task, run, task.target)
        return self._call(task, run, task.target)

    def _method(self, task: Task, run: _Run) -> Any:
        def fn(obj: Any, *a: Any, **k: Any) -> Any:
            return getattr(obj, task.target)(*a, **k)
        if task.batched and task.target in GUARDED_METHODS:
            return self._guarded(task, run, fn)
        return self._call(task, run, fn)

    def _opaque(self, task: Task, run: _Run) -> Any:
        return self._call(task, run, self.modules[task.target])

    def _neuron(self, task: Task, run: _Run) -> Any:
        binding = self.traced.bindings[task.target]
        if task.fusion("recurrent") is not None or binding.recurrent is not None:
            return self._recurrent(task, run, binding)
        if binding.spec is None:
            return self._lifted_neuron(task, run, binding)
        m = self.modules[task.target]
        K = len(task.nodes)
        arg = task.args[0]
        broadcast = not isinstance(arg, Steps)
        x = self._value(run, arg)
        if not isinstance(x, torch.Tensor):
            raise TaskFailure(f"neuron '{task.target}' got a non-tensor input")
        if broadcast:
            xs = x
        else:
            step_shape = self._view(run, arg.refs[0]).shape
            xs = x.view(K, *step_shape)
        params = tuple(getattr(m, n) for n in binding.param_names)
        pool = task.fusion("maxpool_epilogue")
        step_dim = xs.dim() - (0 if broadcast else 1)
        k = pool.params[0] if pool is not None and step_dim == 4 else None
        cf = k is not None and task.name in self.flattened
        bn_f = task.fusion("bn_train")
        state0 = run.states.get(task.target)
        if bn_f is not None and self._bn_kernel(binding.spec, xs, step_dim, state0):
            self._record_scan(task, xs, broadcast, K, state0, binding.spec, True, keeps_input=True)
            with saving_as_source(self._input_source(task, xs)):
                spikes, v = c_bn_scan(binding.spec, xs, K, None if state0 is None else state0[0],
                                      self.modules[bn_f.module], pool=k, pool_cf=cf, recompute=self._recompute(task),
                                      broadcast=broadcast)
            state: Tuple[torch.Tensor, ...] = (v,)
        else:
            if bn_f is not None:    # the same semantics without the kernel: the K steps' BatchNorm, then the scan
                xs, broadcast = _bn_steps(xs, broadcast, K, self.modules[bn_f.module]), False
            if task.name not in self._scans and torch.is_grad_enabled():
                # NOTE: once per task (the float copy of an AMP input is only for the check)
                can = xs.device.type == "cpu" and cpu_supports(binding.spec, xs.float() if xs.dtype in (
                    torch.float16, torch.bfloat16) else xs, None if state0 is None else state0[0])
                self._record_scan(task, xs, broadcast, K, state0, binding.spec, can,
                                  "" if can else "kernel keeps H (not a built-in C kernel on this device)")
            with saving_as_source(None if bn_f is not None else self._input_source(task, xs)):
                spikes, state = neuron_scan(binding.spec, xs, K, broadcast, state0, params, pool=k,
                                            h_dtype=self.h_dtype, recompute=self._recompute(task), pool_cf=cf)
        if pool is not None and k is None:        # not 4-d per step: the pool module, step by step
            pm = self.modules[pool.module]
            spikes = torch.stack([pm(s) for s in spikes])
        run.states[task.target] = state
        if binding.state_attr is not None and self.last_chunk[task.target] == task.name:
            setattr(m, binding.state_attr, state[0])
        elif binding.state_attr is None and hasattr(m, "state") and self.last_chunk[task.target] == task.name:
            m.state = state
        return spikes.view(K * spikes.shape[1], *spikes.shape[2:]) if spikes.dim() > 1 else spikes

    def _neuron_input(self, task: Task, run: _Run) -> Tuple[torch.Tensor, bool, int]:
        """A neuron task's input as ``[K, *S]`` (or ``[*S]`` when broadcast), whether broadcast, K."""
        K = len(task.nodes)
        arg = task.args[0]
        broadcast = not isinstance(arg, Steps)
        x = self._value(run, arg)
        if not isinstance(x, torch.Tensor):
            raise TaskFailure(f"neuron '{task.target}' got a non-tensor input")
        if broadcast:
            return x, True, K
        return x.view(K, *self._view(run, arg.refs[0]).shape), False, K

    def _lifted_neuron(self, task: Task, run: _Run, binding: Any) -> Any:
        """A neuron compiled from its lifted step: the generated scan of this device (C on CPU, CUDA on a
        GPU), else the torch reference; the module's own code, step by step, if its step does not hold in
        this dtype. Fusions run around the scan: training BatchNorm before it, the max pool after it."""
        m = self.modules[task.target]
        xs, broadcast, K = self._neuron_input(task, run)
        bn_f = task.fusion("bn_train")
        if bn_f is not None:
            xs, broadcast = _bn_steps(xs, broadcast, K, self.modules[bn_f.module]), False
        state0 = run.states.get(task.target)
        in_dtype = xs.dtype
        if xs.dtype in (torch.float16, torch.bfloat16):
            # NOTE: AMP: the state stays in float32 (as for the built-in neurons); outputs go back to the input dtype
            xs = xs.float()
        try:
            lifted = binding.lifted.get(m, xs.dtype)
        except Exception as exc:
            return self._eager_steps(task, run, m, xs, broadcast, K, str(exc))
        pool = task.fusion("maxpool_epilogue")
        res = None
        k = None if pool is None else pool_kk_size(self.modules[pool.module], xs if broadcast else xs[0])
        if k is not None:          # a plain k x k pool: the kernel itself may write the pooled outputs
            res = lifted_neuron_scan_pooled(lifted, xs, K, broadcast, state0, lifted.params(m), k)
        pooled = res is not None
        out, state = res if pooled else lifted_neuron_scan(lifted, xs, K, broadcast, state0, lifted.params(m))
        if not lifted.output_grad:      # a hard threshold: eager's spikes carry no gradient, so neither do these
            out = out.detach()
        if out.dtype != in_dtype and in_dtype in (torch.float16, torch.bfloat16):
            out = out.to(in_dtype)
        run.states[task.target] = state
        if self.last_chunk[task.target] == task.name:
            for name, v in zip(lifted.state_attrs, state):
                _set_state(m, name, v)
        if pool is not None and not pooled:
            pm = self.modules[pool.module]
            if out.dim() == 5:
                flat = out.flatten(0, 1)
                pooled = pool_kk(pm, flat)            # the C pool: 1-byte offsets, the scan's layout
                pooled = pm(flat) if pooled is None else pooled
                out = pooled.view(K, out.shape[1], *pooled.shape[1:])
            else:
                out = torch.stack([pm(o) for o in out])
        return out.reshape(K * out.shape[1], *out.shape[2:]) if out.dim() > 1 else out

    def _cell_steps(self, task: Task, m: nn.Module, binding: Any, dtype: torch.dtype) -> Any:
        """The neuron's lifted step for a recurrent cell (built-in neurons are lifted too, on first use)."""
        lifted = binding.lifted
        if lifted is None:
            lifted = self._cell_lifts.get(task.target)
            if lifted is None:
                from snncc.lift import lift_neuron
                from snncc.recognize import LiftedSteps
                lifted = self._cell_lifts[task.target] = LiftedSteps(lift_neuron(m, dtype))
        return lifted.get(m, dtype)

    def _recurrent(self, task: Task, run: _Run, binding: Any) -> Any:
        """A recurrent cell (passes/fuse_recurrence.py): the neuron and the Linear of its own previous
        spikes over the chunk's steps, as one loop (C on CPU; the torch loop elsewhere and under AMP)."""
        m = self.modules[task.target]
        fusion = task.fusion("recurrent")
        # NOTE: a neuron with its own recurrent Linear is a cell even when its steps were split apart
        lin = self.modules[fusion.module] if fusion is not None else m.get_submodule(binding.recurrent)
        e, broadcast, K = self._neuron_input(task, run)
        if broadcast:
            e = e.expand(K, *e.shape)
        sp0 = None if len(task.args) < 2 or task.args[1] is None else self._value(run, task.args[1])
        state0 = run.states.get(task.target)
        if sp0 is None and state0 is not None:
            # NOTE: streaming: the previous call's last spikes (the graph's first step has no recurrent term)
            sp0 = run.states.get(task.target + _PREV)
        lifted = self._cell_steps(task, m, binding, e.dtype if e.dtype.is_floating_point else torch.float32)
        if binding.tap is not None:
            # NOTE: the module's spikes are one of its states: a later chunk's previous spikes are that state
            params = lifted.params_except(m, binding.tap)
            if state0 is not None:
                sp0 = state0[list(lifted.steady.new_states).index(lifted.steady.outputs[0])]
        else:
            params = lifted.params(m)
        shape = e.shape
        e3 = e.reshape(K, shape[1], -1)
        sp = None if sp0 is None else sp0.reshape(shape[1], -1)
        st = None if state0 is None else tuple(s.reshape(shape[1], -1) for s in state0)
        out, state = recurrent_cell_scan(lifted, e3, lin.weight, lin.bias, sp, st, params, binding.tap)
        state = tuple(s.reshape(shape[1:]) for s in state)
        run.states[task.target] = state
        # NOTE: a copy of the one step: a view would keep the chunk's whole output alive (memory="min" chunks
        # hand states to the next chunk through checkpoint, which keeps them)
        run.states[task.target + _PREV] = out[-1].reshape(shape[1:]).clone()
        if self.last_chunk[task.target] == task.name:
            for name, v in zip(lifted.state_attrs, state):
                _set_state(m, name, v)
        return out.reshape(K * shape[1], *shape[2:])

    def _eager_steps(self, task: Task, run: _Run, m: nn.Module, xs: torch.Tensor, broadcast: bool, K: int,
                     why: str) -> Any:
        """The module itself over the K steps (its lifted step does not hold for this input's dtype)."""
        _warn_once(f"snncc: module '{task.target}' ({type(m).__name__}) runs step by step for "
                   f"{xs.dtype} inputs: {why}")
        if task.target not in run.states:
            reset_module(m)
        outs = [m(xs if broadcast else xs[t]) for t in range(K)]
        run.states[task.target] = ()
        out = torch.stack(outs)
        pool = task.fusion("maxpool_epilogue")
        if pool is not None:
            pm = self.modules[pool.module]
            out = torch.stack([pm(o) for o in out])
        return out.reshape(K * out.shape[1], *out.shape[2:])

    def _bn_kernel(self, spec: Any, xs: torch.Tensor, step_dim: int, state0: Any) -> bool:
        """Whether the fused BatchNorm + scan kernel runs this chunk (CPU, IF/LIF, 4-d steps, H kept exact or
        recomputed; otherwise the unfused path, same values)."""
        return (step_dim == 4 and spec.kind in ("if", "lif") and self.h_dtype is None and
                cpu_supports(spec, xs, None if state0 is None else state0[0]))

    def _flattened(self, task: Task) -> bool:
        """Every reader of ``task`` flattens it (so channels-first output saves the flatten a copy)."""
        readers = list(self.tg.graph.successors(task.name))
        data = [r for r in readers if self.tg.graph.edges[task.name, r]["kind"] == "data"]
        if not data:
            return False
        for r in data:
            t = self.tg.task(r)
            m = self.modules.get(t.target) if t.kind == "module" else None
            if not (isinstance(m, nn.Flatten) or (t.kind == "method" and t.target in ("flatten", "view", "reshape"))
                    or (t.kind == "function" and t.target in (torch.flatten, torch.reshape))):
                return False
        return True

    def _output(self, task: Task, run: _Run) -> Any:
        out = self._value(run, task.args[0])
        # NOTE: eager returns fresh tensors; a view of a scan's buffer would refuse in-place edits.
        if isinstance(out, torch.Tensor) and out._base is not None and out.requires_grad:
            return out.clone()
        return out

    # ----------------------------------------------------------------- entry
    def reset_state(self) -> None:
        """Every call starts from the reset state (as SpikingJelly's ``functional.reset_net`` does)."""
        for name, m in self.traced.stateful.items():
            if name not in self.traced.bindings:
                reset_module(m)

    def use_streams(self, plan: Optional[StreamPlan], backend: Any = None) -> None:
        """Run the tasks on the plan's streams through ``backend`` (``streams.CudaBackend`` on a GPU,
        ``streams.NullBackend`` to record and test); None: one stream, in schedule order."""
        self.plan, self.backend = plan, backend

    def _on_stream(self, task: Task, run: _Run) -> Any:
        plan, be = self.plan, self.backend
        s = plan.stream_of[task.name]
        for u in plan.waits[task.name]:
            be.wait(s, u)
        be.consumed(s, [run.env[u] for u in self.tg.graph.predecessors(task.name)
                        if plan.stream_of[u] != s and u in run.env])
        ctx = be.launch(s, task.name)
        if ctx is None:
            value = self.handlers[task.kind](task, run)
        else:
            with ctx:
                value = self.handlers[task.kind](task, run)
        if task.name in plan.record:
            be.record(s, task.name)
        return value

    def run(self, inputs: Sequence[Any], observer: Optional[TaskObserver] = None,
            states: Optional[Dict[str, Tuple[torch.Tensor, ...]]] = None) -> Any:
        """Run the schedule on ``inputs``. ``states`` None: from the reset state (every compiled call);
        otherwise each neuron layer starts from ``states[qualname]`` (streaming inference), opaque stateful
        modules keep the state they have, and the final states are left in ``self.final_states``."""
        if len(inputs) != len(self.placeholders):
            raise InputError(f"compiled model takes {len(self.placeholders)} input(s), got {len(inputs)}")
        t0 = time.perf_counter()
        out = self._run(inputs, observer, states)
        first = next((o for o in (out if isinstance(out, (tuple, list)) else (out,))
                      if isinstance(o, torch.Tensor)), None)
        if torch.is_grad_enabled() and first is not None and first.requires_grad and \
                len(self._fwd_us) < self.PLAN_CALLS:
            # NOTE: the memory plan is measured on the first training calls (the fastest of them: the
            # first also loads kernels); results are the same whatever the plan, only the bytes kept differ
            self._fwd_us.append((time.perf_counter() - t0) * 1e6)
            if self._device is None:
                self._device = first.device
            if self.options.memory in ("default", "min") and self._scans:
                self._plan = self._make_plan()
        return out

    def _run(self, inputs: Sequence[Any], observer: Optional[TaskObserver],
             states: Optional[Dict[str, Tuple[torch.Tensor, ...]]]) -> Any:
        if states is None:
            self.reset_state()
        run = _Run({"__inputs__": tuple(inputs)}, {}, dict(states or {}))
        if self.regions is not None and self.plan is None and observer is None and torch.is_grad_enabled():
            out = self._run_regions(run)
            self.final_states = run.states
            return out
        # NOTE: the memory plan's recompute cost of a scan is its measured forward time (on the first
        # training calls): the bytes-only model predicted 30-40 us for SEW-ResNet's scans, which took 0.7 ms
        timing = self.plan is None and torch.is_grad_enabled() and len(self._fwd_us) < self.PLAN_CALLS
        for i, task in enumerate(self.tasks):
            try:
                if observer is not None:
                    observer.before(task)
                if timing and task.kind in ("neuron", "module"):
                    t0 = time.perf_counter()
                    run.env[task.name] = self.handlers[task.kind](task, run)
                    us = (time.perf_counter() - t0) * 1e6
                    times = self._scan_us if task.kind == "neuron" else self._task_us
                    times[task.name] = min(us, times.get(task.name, us))
                else:
                    run.env[task.name] = self.handlers[task.kind](task, run) if self.plan is None \
                        else self._on_stream(task, run)
                if observer is not None:
                    observer.after(task, run.env[task.name])
            except SNNCCError:
                raise
            except Exception as exc:
                raise self._failure(task, run, exc) from exc
            if self.plan is None:       # (streams: a value may still be in use on another stream)
                for name in self.frees[i]:
                    run.env.pop(name, None)
                    run.views.pop(name, None)
        self.final_states = run.states
        if self.plan is not None:
            self.backend.join()
        return run.env[self.tg.output]

    def _run_task(self, i: int, run: _Run) -> None:
        task = self.tasks[i]
        try:
            run.env[task.name] = self.handlers[task.kind](task, run)
        except (SNNCCError, *_CHECKPOINT_SIGNALS):
            raise
        except Exception as exc:
            raise self._failure(task, run, exc) from exc

    def _run_regions(self, run: _Run) -> Any:
        """Time-invariant tasks first, then each time chunk under ``torch.utils.checkpoint`` (see
        :meth:`_time_regions`): its inputs are the values it reads from outside (steps read from an earlier
        chunk are copied, so the earlier chunk's whole output is not kept alive) and the states entering it;
        its outputs the values later chunks read and the states leaving it."""
        from torch.utils.checkpoint import checkpoint
        from snncc.verify import iter_refs
        inside = {i for r in self.regions for i in r}
        for i in range(len(self.tasks)):
            if i not in inside:
                self._run_task(i, run)
        region_of = {self.tasks[i].name: k for k, r in enumerate(self.regions) for i in r}
        readers: Dict[str, set] = {}
        for k, r in enumerate(self.regions):
            for i in r:
                for ref in iter_refs((self.tasks[i].args, self.tasks[i].kwargs)):
                    readers.setdefault(ref.task, set()).add((k, ref.step))
        for k, r in enumerate(self.regions):
            names = {self.tasks[i].name for i in r}
            ext: Dict[str, Any] = {}            # outside value -> the tensor or {step: copy}
            for i in r:
                for ref in iter_refs((self.tasks[i].args, self.tasks[i].kwargs)):
                    if ref.task in names:
                        continue
                    if ref.step is None or region_of.get(ref.task) is None:
                        ext[ref.task] = run.env[ref.task]
                    elif not isinstance(ext.get(ref.task, {}), dict):
                        continue
                    else:
                        ext.setdefault(ref.task, {})[ref.step] = self._view(run, ref).clone()
            keep = [n for n in names if n == self.tg.output or
                    any(kk != k for kk, _ in readers.get(n, ()))]
            flat, spec = _flatten(ext, run.states)
            if not all(isinstance(v, torch.Tensor) for v in flat):
                for i in r:
                    self._run_task(i, run)
                continue

            out_spec: List[Any] = [None]          # how the states leaving the chunk were flattened

            def chunk(*tensors: torch.Tensor, _r=r, _spec=spec, _keep=keep, _out=out_spec
                      ) -> Tuple[torch.Tensor, ...]:
                ext_in, states_in = _unflatten(_spec, tensors)
                sub = _Run({"__inputs__": run.env["__inputs__"]}, {}, states_in)
                for n, v in ext_in.items():
                    if isinstance(v, dict):
                        sub.views[n] = [v.get(j) for j in range(len(self.tg.task(n).nodes))]
                        sub.env[n] = None
                    else:
                        sub.env[n] = v
                for name, v in run.env.items():
                    sub.env.setdefault(name, v)
                for i in _r:
                    self._run_task(i, sub)
                outs = [sub.env[n] for n in _keep]
                if not all(isinstance(o, torch.Tensor) for o in outs):
                    raise TaskFailure("a chunk's output is not one tensor (memory='min' checkpointing)")
                flat_states, _out[0] = _flatten({}, sub.states)
                return tuple(outs) + tuple(flat_states)
            res = checkpoint(chunk, *flat, use_reentrant=False, preserve_rng_state=True)
            for n, v in zip(keep, res):
                run.env[n] = v
            run.states = _unflatten(out_spec[0], res[len(keep):])[1]
            for n in list(run.env):                    # values no later chunk reads
                if n in region_of and region_of[n] <= k and n != self.tg.output and \
                        not any(kk > k for kk, _ in readers.get(n, ())):
                    run.env.pop(n, None)
                    run.views.pop(n, None)
        return run.env[self.tg.output]

    def _failure(self, task: Task, run: _Run, exc: BaseException) -> TaskFailure:
        what = f"module '{task.target}' ({type(self.modules[task.target]).__name__})" \
            if task.target in self.modules else f"{task.kind} '{getattr(task.target, '__name__', task.target)}'"
        shapes = [tuple(v.shape) for v in run.env["__inputs__"] if isinstance(v, torch.Tensor)]
        hint = _hint(self.traced.root, exc)
        return TaskFailure(f"{what} failed at {task.label} on input shape(s) {shapes}: "
                           f"{type(exc).__name__}: {exc}{hint}")


def _hint(root: nn.Module, exc: BaseException) -> str:
    """A hint for a TaskFailure, only where it is certainly right: the model's own parameters and buffers
    are split over several devices or floating dtypes and torch complained about that. (A wrong input is
    caught before any task runs, as an InputError naming the fix: snncc/inputs.py.)"""
    text = str(exc).lower()
    tensors = [t for t in list(root.parameters()) + list(root.buffers()) if t.is_floating_point()]
    devices = sorted({str(t.device) for t in tensors})
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in tensors})
    if len(devices) > 1 and "device" in text:
        return (f"\n  The model's parameters and buffers are on several devices ({', '.join(devices)}): move "
                "the whole model, e.g. cmodel.to(device).")
    if len(dtypes) > 1 and any(w in text for w in ("dtype", "scalar type", "same type", "type (")):
        return (f"\n  The model's parameters and buffers have several dtypes ({', '.join(dtypes)}): cast the "
                "whole model, e.g. cmodel.to(torch.float32).")
    return ""
