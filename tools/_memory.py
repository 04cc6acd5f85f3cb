"""Memory as the benchmarks and snncc-prof measure it, one definition each.

* :func:`saved_bytes`: what autograd keeps for backward while a forward runs (each storage once, as
  keeping a view alive keeps its whole storage), seen through ``saved_tensors_hooks``;
* :func:`peak_bytes`: the peak of torch's CPU allocations while a step runs, from the profiler's memory
  events (resident memory is no measure on CPU: the C allocator keeps freed memory for reuse).
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Tuple

import torch

from ._taskprof import storage_bytes

__all__ = ["saved_bytes", "saved_bytes_and_output", "peak_bytes"]


def saved_bytes_and_output(run: Callable[[], Any], exclude: Iterable[int] = ()) -> Tuple[int, Any]:
    """(bytes of the distinct storages saved for backward during ``run()``, its output); ``exclude``:
    storage data pointers not to count (the input the caller holds anyway, parameters)."""
    skip = set(exclude)
    seen: dict = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr, nbytes = storage_bytes(t)
        if ptr not in skip:
            seen[ptr] = nbytes
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    return sum(seen.values()), out


def saved_bytes(run: Callable[[], Any], exclude: Iterable[int] = ()) -> int:
    """Bytes of the distinct storages saved for backward during ``run()`` (its output is dropped)."""
    return saved_bytes_and_output(run, exclude)[0]


def peak_bytes(fn: Callable[[], None]) -> int:
    """The peak of torch's allocated CPU memory while ``fn`` runs, above what was allocated when it started:
    every allocation and free torch's allocator made, from the profiler's memory events, summed in time
    order. (Scratch memory a C kernel takes with ``malloc`` is not seen: snncc's are per thread and small.)"""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, n in events:
        live += n
        peak = max(peak, live)
    return peak
