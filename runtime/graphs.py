"""CUDA graphs: capture one specialization's steady-state call and replay it, falling back cleanly.

A compiled SNN call issues hundreds of small kernels; at small batch the GPU waits for Python. A CUDA graph
records them once and replays the whole call with one launch. ``compile(..., cuda_graphs=True)`` turns it
on; per specialization (input shape/dtype/device, train/eval, grad mode, autocast: the cache key),
``GraphCache`` does the following:

1. ``warmup`` ordinary calls (kernels get compiled, the allocator warms up, ``chunk="auto"`` decides);
2. then a capture: inference (no grad) with ``torch.cuda.CUDAGraph`` over the executor's run; training
   with ``torch.cuda.make_graphed_callables``, which captures forward and backward as one autograd
   function (parameter gradients accumulate as usual). The warm-up and capture runs would update BatchNorm
   running statistics; they are restored afterwards, so the model sees exactly the calls the user made;
3. later calls copy their inputs into the graph's static inputs and replay (outputs are returned as
   copies, so a later replay never overwrites what the caller holds).

What cannot be captured runs as before, with one warning saying why (``blockers``): random ops (dropout
draws would differ from eager's), opaque modules (arbitrary Python), PLIF neurons on CUDA (their decay is
read on the host at launch), several streams, an observer (profiling), CPU tensors. A failed capture warns
once and that specialization stays uncaptured. A new shape is a new specialization: its own warm-up and
capture, while the old graph is kept for when that shape comes back (up to the specialization cache size).

``NullGraphs`` runs the same policy without a GPU (capture = remember the function, replay = call it), so
the policy is tested on any machine; ``CudaGraphs`` is the real one.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from snncc.passes.hoist_time_invariant import is_random

__all__ = ["GraphCache", "CudaGraphs", "NullGraphs", "blockers", "WARMUP"]

#: ordinary calls before a specialization is captured
WARMUP = 2

def blockers(compiled: Any, model: nn.Module, inputs: Sequence[Any], streams: int,
             observed: bool, need_cuda: bool = True) -> List[str]:
    """Why this specialization cannot be captured (empty: it can)."""
    why: List[str] = []
    tensors = [a for a in inputs if isinstance(a, torch.Tensor)]
    if need_cuda and (not tensors or any(t.device.type != "cuda" for t in tensors)):
        why.append("the inputs are not CUDA tensors")
    if streams > 1:
        why.append("streams > 1 (a graph replays the whole schedule on one stream)")
    if observed:
        why.append("an observer is attached (profiling)")
    for task in compiled.task_graph.tasks():
        if task.kind == "opaque":
            why.append(f"module '{task.target}' runs opaquely (arbitrary Python)")
    traced = compiled.traced
    for node in traced.graph.nodes:
        # NOTE: the passes' own notion of a random draw; a dropout module in eval draws nothing
        if is_random(node, traced) and (node.op != "call_module" or traced.root.get_submodule(node.target).training):
            why.append(f"'{getattr(node.target, '__name__', node.target)}' draws random numbers")
    for name, b in compiled.traced.bindings.items():
        if b is not None and b.spec is not None and b.spec.kind == "plif":
            why.append(f"PLIF neuron '{name}' (its decay is read on the host at launch)")
    return sorted(set(why))


class NullGraphs:
    """The policy without a GPU: ``capture`` keeps the function, ``replay`` calls it; records what it did."""

    needs_cuda = False

    def __init__(self) -> None:
        self.log: List[Tuple[str, Any]] = []

    def capture(self, fn: Callable[..., Any], inputs: Tuple[Any, ...], training: bool,
                params: Sequence[torch.Tensor]) -> Callable[..., Any]:
        self.log.append(("capture", training))
        fn(*inputs)                                   # a capture runs the call once, as CUDA graphs do

        def replay(*args: Any) -> Any:
            self.log.append(("replay", training))
            return fn(*args)
        return replay


class _Graphed(nn.Module):
    """The executor's run as a module that owns the parameters (what ``make_graphed_callables`` needs)."""

    def __init__(self, fn: Callable[..., Any], params: Sequence[torch.Tensor]) -> None:
        super().__init__()
        self.fn = fn
        self._params = nn.ParameterList([p for p in params if isinstance(p, nn.Parameter)])

    def forward(self, *args: Any) -> Any:
        return self.fn(*args)


def _clone_tree(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, (list, tuple)):
        return type(value)(_clone_tree(v) for v in value)
    return value


class CudaGraphs:
    """Real CUDA graphs (see the module docstring)."""

    needs_cuda = True

    def capture(self, fn: Callable[..., Any], inputs: Tuple[Any, ...], training: bool,
                params: Sequence[torch.Tensor]) -> Callable[..., Any]:
        static_in = tuple(a.detach().clone().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor)
                          else a for a in inputs)
        if training:
            graphed = torch.cuda.make_graphed_callables(_Graphed(fn, params), static_in, num_warmup_iters=1)

            def replay_train(*args: Any) -> Any:
                # NOTE: the graphed callable returns its static output buffers; copies (differentiable)
                # keep what the caller holds from being overwritten by the next replay
                return _clone_tree(graphed(*args))
            return replay_train
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn(*static_in)                              # warm-up on a side stream, as torch requires
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = fn(*static_in)

        def replay(*args: Any) -> Any:
            for dst, src in zip(static_in, args):
                if isinstance(dst, torch.Tensor):
                    dst.copy_(src)
            graph.replay()
            return _clone_tree(static_out)
        return replay


@dataclass
class _Entry:
    calls: int = 0
    replay: Optional[Callable[..., Any]] = None
    refused: Optional[str] = None


@dataclass
class GraphCache:
    """Per-specialization warm-up, capture and replay (the policy of the module docstring)."""

    backend: Any = field(default_factory=CudaGraphs)
    warmup: int = WARMUP
    entries: Dict[Any, _Entry] = field(default_factory=dict)
    warned: set = field(default_factory=set)

    def call(self, key: Any, run: Callable[..., Any], inputs: Tuple[Any, ...], model: nn.Module,
             why_not: Callable[[], List[str]]) -> Any:
        """``run(*inputs)``, replayed from a graph once this specialization is warm and capturable."""
        e = self.entries.setdefault(key, _Entry())
        if e.replay is not None:
            return e.replay(*inputs)
        if e.refused is not None or e.calls < self.warmup:
            e.calls += 1
            return run(*inputs)
        reasons = why_not()
        if reasons:
            e.refused = "; ".join(reasons)
            self._warn(key, f"snncc: CUDA graphs off for this input ({e.refused}); running without them.")
            return run(*inputs)
        training = torch.is_grad_enabled() and any(p.requires_grad for p in model.parameters())
        saved = _buffers(model)
        try:
            e.replay = self.backend.capture(run, inputs, training, list(model.parameters()))
        except Exception as exc:                      # noqa: BLE001 - any capture failure falls back
            e.refused = f"capture failed: {type(exc).__name__}: {exc}"
            self._warn(key, f"snncc: CUDA graph capture failed ({e.refused}); running without graphs.")
            _restore(model, saved)
            return run(*inputs)
        _restore(model, saved)            # the capture's own runs must not count as calls
        return e.replay(*inputs)

    def forget(self, prefix: Tuple[Any, ...]) -> None:
        """Drop the graphs of an evicted specialization (every graph key that starts with its key)."""
        for k in [k for k in self.entries if k[:len(prefix)] == prefix]:
            del self.entries[k]

    def _warn(self, key: Any, msg: str) -> None:
        if msg not in self.warned:
            self.warned.add(msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=4)


def _buffers(model: nn.Module) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    return [(b, b.detach().clone()) for b in model.buffers() if isinstance(b, torch.Tensor)]


def _restore(model: nn.Module, saved: List[Tuple[torch.Tensor, torch.Tensor]]) -> None:
    with torch.no_grad():
        for b, copy in saved:
            b.copy_(copy)
