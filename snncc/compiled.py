"""``snncc.compile`` and the drop-in module it returns."""
from __future__ import annotations

import contextlib
import dataclasses
import numbers
import warnings
from collections import OrderedDict
from typing import Any, Dict, Iterable, Iterator, Optional, Tuple, Type, Union

import torch
from torch import nn

from .config import Options
from .errors import InputError
from .frontend import is_stateful, reset_module, trace_unrolled
from .inputs import check_call
from .recognize import bind_keyed
from .pipeline import Compiled, compile_graph
from snncc import passes
from snncc.runtime import Executor
from snncc.runtime import calibrate as calibration
from snncc.runtime.executor import TaskObserver
from snncc.runtime.graphs import GraphCache, blockers

__all__ = ["compile", "CompiledModule", "Stream", "reset"]

_CACHE_SIZE = 8


def _check_T(T: Any) -> int:
    if isinstance(T, bool) or not isinstance(T, numbers.Integral):
        raise InputError(f"snncc.compile: T must be a positive int (number of timesteps), got {T!r}")
    if T < 1:
        raise InputError(f"snncc.compile: T must be >= 1, got {T}")
    return int(T)


def _signature(args: Tuple[Any, ...], model: nn.Module) -> Tuple[Any, ...]:
    """What a specialization depends on: the inputs' shape/dtype/device and the model's configuration.

    The configuration part (every module's train flag, each neuron's spec, the root's plain attributes such
    as ``T``) makes a change to the model after the first call re-specialize instead of reusing a stale graph.
    """
    sig = tuple((tuple(a.shape), a.dtype, a.device) if isinstance(a, torch.Tensor) else (type(a), a)
                for a in args)
    config = []
    for name, m in model.named_modules():
        config.append(m.training)
        if name and is_stateful(m):
            # NOTE: the key after binding: config_key then knows (and leaves out) the state attributes
            config.append((name, bind_keyed(m)[1]))
    plain = tuple(sorted((k, v) for k, v in vars(model).items()
                         if not k.startswith("_") and isinstance(v, (int, float, bool, str, type(None)))))
    # NOTE: the parameters' dtypes and devices too: after cmodel.to(torch.float64) a float32 input is
    # checked again (an InputError naming the dtype) instead of reusing a specialization made for float32
    placed = frozenset((p.dtype, p.device) for p in model.parameters())
    return sig + (tuple(config), plain, placed)


class CompiledModule(nn.Module):
    """A compiled SNN: call it like the model; train it with the same loop and optimizer.

    It shares the model's parameters, buffers and submodules (the same objects: its ``state_dict`` is the
    model's, ``parameters()`` yields the model's Parameters), follows ``train()``/``eval()`` and ``.to()``,
    and specializes on the first call for the input's shape/dtype/device (and train/eval), re-specializing
    when those change.
    """

    def __init__(self, model: nn.Module, form: str, T: Optional[int],
                 leaf_modules: Tuple[Type[nn.Module], ...] = (), verify: bool = False,
                 options: Options = Options()) -> None:
        super().__init__()
        self._modules = model._modules
        self._parameters = model._parameters
        self._buffers = model._buffers
        object.__setattr__(self, "_snncc_model", model)
        object.__setattr__(self, "_snncc_cache", OrderedDict())
        object.__setattr__(self, "_snncc_observer", None)
        object.__setattr__(self, "_snncc_auto", {})      # specialization key -> its first call pending
        #: the cost model's decisions for ``chunk="auto"``: specialization key -> passes.ChunkChoice
        object.__setattr__(self, "chunk_choices", {})
        object.__setattr__(self, "_snncc_graphs", GraphCache())
        object.__setattr__(self, "_snncc_stream", False)   # the sequence model behind a Stream (messages)
        self.form, self.T, self.leaf_modules, self.verify = form, T, tuple(leaf_modules), verify
        self.options = options
        self.training = model.training

    @property
    def memory_plans(self) -> Dict[Tuple[Any, ...], Any]:
        """What each neuron scan keeps for backward, per cached specialization (key -> ``passes.MemoryPlan``:
        per scan, "h", "input" or "source", the bytes kept, the predicted recompute time). With ``memory="default"``
        the plan is chosen by ``passes/plan_memory.py`` from the first training calls' measured time."""
        return {k: ex.memory_plan for k, (_, ex) in self._snncc_cache.items()}

    @property
    def model(self) -> nn.Module:
        """The original (eager) model; it shares every parameter and buffer with this module."""
        return self._snncc_model

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_snncc") or name.startswith("__"):   # during copy/unpickling
                raise
            return getattr(self._snncc_model, name)

    def train(self, mode: bool = True) -> "CompiledModule":
        super().train(mode)
        self._snncc_model.train(mode)
        return self

    def _check_inputs(self, args: Tuple[Any, ...]) -> Optional[int]:
        """Validate the call for the compiled form; returns T for this call (None: the model's own loop)."""
        if self.form == "loop":
            return None
        if len(args) != 1:
            raise InputError(f"a model compiled with {'sequence=True' if self.form == 'sequence' else 'T='} "
                             f"takes one tensor input, got {len(args)} arguments")
        x = args[0]
        if not isinstance(x, torch.Tensor):
            raise InputError(f"a model compiled with {'sequence=True' if self.form == 'sequence' else 'T='} "
                             f"takes one tensor input, got a {type(x).__name__}"
                             + (" (torch.as_tensor(x) makes one)" if hasattr(x, "__array__") or
                                isinstance(x, (list, tuple)) else ""))
        if self.form == "sequence":
            if x.dim() < 2:
                raise InputError(f"compile(..., sequence=True) expects x_seq of shape [T, N, ...]; got shape "
                                 f"{tuple(x.shape)}. For a static input fed at every step use compile(model, T=...).")
            if x.shape[0] < 1:
                raise InputError("compile(..., sequence=True): the input has T = 0 timesteps")
            return int(x.shape[0])
        if x.dim() < 1:
            raise InputError(f"a model compiled with T={self.T} expects an input [N, ...] (one step, fed at "
                             "every step), got a 0-d tensor")
        return self.T

    def specialize(self, *args: Any) -> Compiled:
        """Trace and compile for inputs like ``args`` (cached): the graph and schedule ``forward`` runs."""
        return self._specialization(args)[0]

    def _specialization(self, args: Tuple[Any, ...]) -> Tuple[Compiled, Executor]:
        return self._entry(args)[1]

    def _entry(self, args: Tuple[Any, ...]) -> Tuple[Tuple[Any, ...], Tuple[Compiled, Executor]]:
        T = self._check_inputs(args)
        key = _signature(args, self._snncc_model) + (T,)
        cache: OrderedDict = self._snncc_cache
        if key in cache:
            cache.move_to_end(key)
            return key, cache[key]
        traced = trace_unrolled(self._snncc_model, self.form, T, self.leaf_modules, args)
        # NOTE: before any pass or task: a wrong input is an InputError naming the fix, not a failure deep
        # inside a layer (snncc/inputs.py; once per specialization, a walk over the traced graph)
        check_call(traced, self.form, T, args, stream=self._snncc_stream)
        if self.form == "loop":
            _check_loops(traced, self._snncc_model)
        options = self.options
        device = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
        if options.chunk == "auto":
            # NOTE: the first call runs layer-major (K = T, always valid) and measures what each task
            # touches; with several streams the cost model may then pick a smaller K (_resolve_auto).
            options = dataclasses.replace(options, chunk=None)
            if options.streams > 1:
                self._snncc_auto[key] = (traced, device)
        cache[key] = self._build(traced, options, device)
        if len(cache) > _CACHE_SIZE:
            old, _ = cache.popitem(last=False)
            self._snncc_auto.pop(old, None)
            self._snncc_graphs.forget(old)
        return key, cache[key]

    def _build(self, traced: Any, options: Options, device: Optional[torch.device]) -> Tuple[Compiled, Executor]:
        compiled = compile_graph(traced, verify=self.verify, options=options)
        executor = Executor(traced, compiled.task_graph, compiled.schedule, options=options)
        if options.streams > 1 and device is not None and device.type == "cuda":
            from snncc.runtime.streams import CudaBackend, plan_streams
            plan = plan_streams(compiled.task_graph, compiled.schedule, options.streams)
            executor.use_streams(plan, CudaBackend(options.streams, device))
        return compiled, executor

    def _resolve_auto(self, key: Tuple[Any, ...], step_bytes: Dict[str, float]) -> None:
        """After a ``chunk="auto"`` specialization's first call: pick K with the cost model and, when it is
        not T, rebuild the specialization chunked (later calls run it; results are the same either way)."""
        traced, device = self._snncc_auto.pop(key)
        compiled, _ = self._snncc_cache[key]
        tg, schedule = compiled.task_graph, compiled.schedule
        T = max((t.steps for t in tg.tasks() if t.batched), default=1)
        cal = calibration.calibrate(device if device is not None else torch.device("cpu"))
        choice = passes.choose_chunk(passes.layer_costs(tg, schedule, step_bytes), T, cal, self.options.streams)
        self.chunk_choices[key] = choice
        if choice.K < T:
            self._snncc_cache[key] = self._build(traced, dataclasses.replace(self.options, chunk=choice.K), device)

    def _graphed(self, key: Tuple[Any, ...], args: Tuple[Any, ...]) -> Any:
        """The call through runtime/graphs.py: warm-up, capture, then replay (or ordinary calls, and why)."""
        graphs = self._snncc_graphs
        gkey = key + (torch.is_grad_enabled(), _autocast_state(),
                      tuple(bool(getattr(a, "requires_grad", False)) for a in args))

        def run(*inputs: Any) -> Any:
            return self._snncc_cache[key][1].run(inputs, None)

        def why_not() -> list:
            return blockers(self._snncc_cache[key][0], self._snncc_model, args, self.options.streams, False,
                            need_cuda=graphs.backend.needs_cuda)
        return graphs.call(gkey, run, args, self._snncc_model, why_not)

    @contextlib.contextmanager
    def observing(self, observer: TaskObserver) -> Iterator[TaskObserver]:
        """Within the block, every forward calls ``observer.before(task)`` / ``observer.after(task, value)``
        around each task it runs (how snncc-prof times tasks); restored on exit."""
        previous = self._snncc_observer
        object.__setattr__(self, "_snncc_observer", observer)
        try:
            yield observer
        finally:
            object.__setattr__(self, "_snncc_observer", previous)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs:
            raise InputError(f"compiled models take positional inputs only; got keyword(s) {sorted(kwargs)}")
        key, (_, executor) = self._entry(args)
        if key not in self._snncc_auto:
            if self.options.cuda_graphs and self._snncc_observer is None:
                return self._graphed(key, args)
            return executor.run(args, self._snncc_observer)
        counter = _StepBytes(self._snncc_observer)
        out = executor.run(args, counter)
        self._resolve_auto(key, counter.step_bytes)
        return out

    def stream(self) -> "Stream":
        """A streaming session: feed timesteps one at a time or in chunks, the state carried between calls.

            stream = cmodel.stream()
            y_t = stream(x_t)              # one step: x_t [N, ...] -> y_t [N, ...]
            y_c = stream.feed(x_chunk)     # several: [k, N, ...] -> [k, N, ...]

        Memory is bounded by the chunk (nothing is kept across calls but the neurons' state). The session
        starts from the reset state; ``stream.reset()`` starts over. Runs under ``no_grad`` (inference).
        """
        if self.form == "loop":
            raise InputError("stream(): this model loops over time itself; streaming needs a step model "
                             "(compile it with T= or sequence=True)")
        return Stream(self)

    def extra_repr(self) -> str:
        return f"form={self.form}, T={self.T}"


class Stream:
    """Streaming inference over a compiled step model (see :meth:`CompiledModule.stream`)."""

    def __init__(self, cmodel: CompiledModule) -> None:
        self._seq = CompiledModule(cmodel.model, "sequence", None, cmodel.leaf_modules, cmodel.verify,
                                   cmodel.options)
        object.__setattr__(self._seq, "_snncc_stream", True)
        self._states: Optional[dict] = None
        self.steps = 0
        self._one_step_ok: Dict[Any, Optional[str]] = {}   # input kind -> recurrent cells a step would drop

    def reset(self) -> None:
        """Forget the state: the next call starts from the reset state."""
        self._states = None
        self.steps = 0

    def feed(self, x_chunk: torch.Tensor) -> torch.Tensor:
        """Run ``k`` more timesteps: ``x_chunk`` ``[k, N, ...]`` -> ``[k, N, ...]``."""
        if not isinstance(x_chunk, torch.Tensor) or x_chunk.dim() < 2:
            raise InputError(f"Stream.feed expects a chunk [k, N, ...]; got "
                             f"{tuple(x_chunk.shape) if isinstance(x_chunk, torch.Tensor) else type(x_chunk).__name__}."
                             " For one step [N, ...] call the stream itself: stream(x_t)")
        with torch.no_grad():
            _, ex = self._seq._specialization((x_chunk,))
            if self._states is None:
                ex.reset_state()
            out = ex.run((x_chunk,), None, {} if self._states is None else self._states)
            self._states = dict(ex.final_states)
        self.steps += x_chunk.shape[0]
        return out

    def __call__(self, x_t: torch.Tensor) -> torch.Tensor:
        """One timestep: ``x_t`` ``[N, ...]`` -> ``[N, ...]``."""
        if not isinstance(x_t, torch.Tensor):
            raise InputError(f"stream(x_t) expects a tensor [N, ...], got {type(x_t).__name__}")
        self._check_one_step(x_t)
        return self.feed(x_t.unsqueeze(0))[0]

    def _check_one_step(self, x_t: torch.Tensor) -> None:
        """A model that keeps its recurrent spikes itself (``self.s``, read from the second step on) shows
        its recurrence only in a trace of two steps or more: one step at a time would silently drop it."""
        key = (tuple(x_t.shape), x_t.dtype, x_t.device)
        if self._one_step_ok.get(key) is None:
            with torch.no_grad():
                compiled, _ = self._seq._specialization((torch.stack([x_t, x_t]),))
            own = [t.target for t in compiled.task_graph.tasks()
                   if t.fusion("recurrent") is not None and compiled.traced.bindings[t.target].recurrent is None]
            self._one_step_ok[key] = ", ".join(f"'{n}'" for n in own)
        if self._one_step_ok[key]:
            raise InputError(
                f"stream(x_t): the model feeds {self._one_step_ok[key]} its own previous spikes through state it "
                "keeps itself (e.g. self.s), which a one-step trace cannot see. Stream it in chunks of two or "
                "more steps: stream.feed(x[t:t + k]) with k >= 2.")


def _autocast_state() -> Tuple[Any, ...]:
    """What a captured graph depends on besides the specialization: autocast on/off and its dtype."""
    return tuple((d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in ("cuda", "cpu"))


class _StepBytes(TaskObserver):
    """Measures the bytes each task touches per timestep (its output, read and written: twice its size),
    passing every call on to the user's observer."""

    def __init__(self, inner: Optional[TaskObserver]) -> None:
        self.inner = inner
        self.step_bytes: Dict[str, float] = {}

    def before(self, task: Any) -> None:
        if self.inner is not None:
            self.inner.before(task)

    def after(self, task: Any, value: Any) -> None:
        nbytes = sum(t.numel() * t.element_size() for t in _tensors(value))
        self.step_bytes[task.name] = 2.0 * nbytes / max(task.steps, 1)
        if self.inner is not None:
            self.inner.after(task, value)


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


def _check_loops(traced, model: nn.Module) -> None:
    """A model compiled without T/sequence should loop over time itself: warn when it does not.

    Only a warning: a model that loops with T = 1 looks exactly like a step model.
    """
    counts = {}
    for n in traced.graph.nodes:
        if n.op == "call_module" and n.target in traced.stateful:
            counts[n.target] = counts.get(n.target, 0) + 1
    if counts and max(counts.values()) == 1:
        warnings.warn(
            f"snncc.compile({type(model).__name__}): this model runs one timestep per call (each of its "
            f"stateful modules, e.g. '{next(iter(counts))}', is called once). Pass T=<timesteps> for a static "
            "input fed at every step, or sequence=True for an input of shape [T, N, ...].", UserWarning,
            stacklevel=4)


def compile(model: nn.Module, T: Optional[int] = None, *, sequence: bool = False,
            leaf_modules: Iterable[Type[nn.Module]] = (), verify: bool = False, memory: str = "default",
            fuse: bool = True, bitpack: bool = True, chunk: Union[int, str, None] = None,
            streams: int = 1, cuda_graphs: bool = False) -> CompiledModule:
    """Compile a spiking model.

    * ``compile(step_model, T=8)``: the model runs one timestep per call; the input ``[N, ...]`` is fed at
      each of T steps; returns the stacked step outputs ``[T, N, ...]``.
    * ``compile(step_model, sequence=True)``: input ``[T, N, ...]``, step t gets ``x_seq[t]``; returns
      ``[T, N, ...]``.
    * ``compile(model)``: the model loops over time itself (resets, ``for t in range(T)``, stack/mean);
      inputs and outputs are the model's.

    Each call starts from the reset state. ``leaf_modules``: module classes to run as black boxes, step by
    step (the way out for code torch.fx cannot trace). ``verify``: check every pass's output.

    Options (exact by default; see ``snncc.config.Options``): ``memory`` "default" (per layer, what "min"
    keeps where rerunning the scan is cheap: passes/plan_memory.py) | "max" (H and spike bits kept for
    every layer) | "half" (H kept in float16 for backward) | "min" (backward reruns the neuron scans); ``fuse``/``bitpack``: the fusion and
    bit-packing passes; ``chunk``: timesteps per task (None: all T; an int: a wavefront of chunks; "auto":
    the cost model of ``passes/choose_chunk.py`` picks it per input shape after the first call, on a
    measurement of the device cached on disk, decisions in ``chunk_choices``); ``streams``: CUDA streams
    the waves are spread over; ``cuda_graphs``: after two warm-up calls per specialization, replay each
    call from a CUDA graph (``runtime/graphs.py``: what cannot be captured warns once and runs as usual).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"snncc.compile expects an nn.Module, got {type(model).__name__}")
    if isinstance(model, CompiledModule):
        raise InputError("snncc.compile: the model is already compiled; compile its eager model "
                         "(cmodel.model) with the new options instead")
    for name, flag in (("sequence", sequence), ("verify", verify), ("fuse", fuse), ("bitpack", bitpack)):
        if not isinstance(flag, bool):
            raise InputError(f"snncc.compile: {name} must be True or False, got {flag!r}")
    if T is not None and sequence:
        raise InputError("snncc.compile: pass either T= (a static input fed at every step) or sequence=True "
                         "(T read from the input's first dimension), not both")
    options = Options(fuse=bool(fuse), bitpack=bool(bitpack), memory=memory, chunk=chunk, streams=streams,
                      cuda_graphs=cuda_graphs)
    leaf = _check_leaf_modules(model, leaf_modules)
    if T is not None:
        return CompiledModule(model, "static", _check_T(T), leaf, verify, options)
    if sequence:
        return CompiledModule(model, "sequence", None, leaf, verify, options)
    return CompiledModule(model, "loop", None, leaf, verify, options)


def _check_leaf_modules(model: nn.Module, leaf_modules: Any) -> Tuple[Type[nn.Module], ...]:
    """``leaf_modules`` as a tuple of classes, each the class of some submodule of ``model`` (not the root's:
    the root is never a module call of the trace, so declaring it a leaf would change nothing)."""
    if isinstance(leaf_modules, (type, str, nn.Module)) or not isinstance(leaf_modules, Iterable):
        raise TypeError(f"snncc.compile: leaf_modules must be a list of nn.Module classes, e.g. "
                        f"leaf_modules=[{getattr(leaf_modules, '__name__', 'MyModule')}]; got {leaf_modules!r}")
    leaf = tuple(leaf_modules)
    for cls in leaf:
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise TypeError(f"snncc.compile: leaf_modules must be nn.Module classes, got {cls!r}"
                            + (f" (pass its class: leaf_modules=[{type(cls).__name__}])"
                               if isinstance(cls, nn.Module) else ""))
    subs = [m for name, m in model.named_modules() if name]
    for cls in leaf:
        if any(isinstance(m, cls) for m in subs):
            continue
        if isinstance(model, cls):
            raise InputError(
                f"snncc.compile: leaf_modules=[{cls.__name__}] names the class of the model itself; the model's "
                "own forward is what is traced, so it cannot be a leaf. Move the code torch.fx cannot trace "
                "(e.g. an `if` on a tensor) into a submodule of its own and pass that submodule's class, or "
                "rewrite it with tensor ops (torch.where)")
        names = sorted({type(m).__name__ for m in subs})
        raise InputError(f"snncc.compile: leaf_modules names {cls.__name__}, but no submodule of the model "
                         f"({type(model).__name__}) is one; its submodules' classes are: "
                         f"{', '.join(names) if names else '(none)'}")
    return leaf


def reset(model: nn.Module) -> nn.Module:
    """Reset every stateful module of ``model`` (snncc, SpikingJelly and snnTorch neurons); returns it."""
    for m in model.modules():
        if m is not model and is_stateful(m):
            reset_module(m)
    return model
