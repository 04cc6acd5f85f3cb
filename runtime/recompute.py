"""recompute: a neuron layer's input rebuilt in backward from what its producer keeps anyway.

A neuron scan that recomputes (``memory="min"``, or the default plan's choice) keeps only its input for
backward: on seed 001's CSNN that is the second conv's float output, 16 MiB, most of what ``min`` keeps.
But that conv keeps its own input for its weight gradient, as bits (``runtime/packed.py``), and its output
is a pure function of those bits and its weight. So the scan's saved input need not be kept at all: it is
recomputed in backward by the same conv kernel on the same values (bit-identical), just before the scan's
backward reads it.

How: the producing conv/linear attaches a :class:`Source` to its output (how to compute it again, and the
tensors that takes, all kept by the producer's own backward already); the executor runs the neuron scan
inside :func:`saving_as_source`, a ``saved_tensors_hooks`` context whose pack hook replaces any saved
tensor that is (a view of) the producer's output by a token, and whose unpack hook recomputes it.

NOTE: saved-tensor hooks do not nest (only the innermost pair runs), so this pair forwards every tensor it
does not replace, and the tensors a token holds, to the hooks that were active outside it: a user's or a
profiler's hooks (``tools/_memory.saved_bytes``, DDP, offloading) still see everything kept, and nothing
that is not kept.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple

import torch

from snncc.errors import SNNCCError

__all__ = ["Source", "attach_source", "source_of", "saving_as_source"]


@dataclass
class Source:
    """How to compute a tensor again: ``fn(*tensors)`` returns it, bit for bit. ``tensors`` are what that
    takes (kept by the producer's backward anyway); their version counters are checked before a rerun, so
    an in-place change between forward and backward is an error, not a wrong gradient. ``task``: the
    producing task (its measured time is the recompute cost); ``hits``: saved tensors it replaced."""

    fn: Callable[..., torch.Tensor]
    tensors: Tuple[torch.Tensor, ...]
    what: str
    task: Optional[str] = None
    hits: int = 0
    _ptr: int = 0
    _geometry: Tuple[Any, ...] = ()
    _versions: Tuple[int, ...] = field(default=())

    def recompute(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        versions = tuple(t._version for t in tensors)
        if versions != self._versions:
            raise SNNCCError(f"snncc: {self.what}'s input or weight was modified in place between the forward "
                             "and the backward; its output, recomputed in backward (memory plan), would differ. "
                             "Call backward before changing them, or compile with memory='max'.")
        with torch.no_grad():
            y = self.fn(*tensors)
        shape, stride, _ = self._geometry
        if tuple(y.shape) != shape or y.stride() != stride:
            raise SNNCCError(f"snncc: {self.what} recomputed in backward came back as {tuple(y.shape)} with strides "
                             f"{y.stride()}, not {shape} / {stride}; please report it (memory='max' avoids it)")
        return y


def attach_source(y: torch.Tensor, fn: Callable[..., torch.Tensor], tensors: Sequence[torch.Tensor],
                  what: str, task: Optional[str] = None) -> torch.Tensor:
    """Mark ``y`` as recomputable by ``fn(*tensors)``; returns ``y``."""
    ts = tuple(tensors)
    y._snncc_source = Source(fn, ts, what, task, 0, y.untyped_storage().data_ptr(),
                             (tuple(y.shape), y.stride(), y.storage_offset()), tuple(t._version for t in ts))
    return y


def source_of(x: Any) -> Optional[Source]:
    """The :class:`Source` of ``x`` or of the tensor ``x`` is a view of (same storage), if any."""
    while isinstance(x, torch.Tensor):
        src = getattr(x, "_snncc_source", None)
        if src is not None:
            return src if x.untyped_storage().data_ptr() == src._ptr else None
        x = x._base
    return None


class _Token:
    """A saved tensor that is not kept: the view of ``source``'s output it was, and the source's tensors
    as the outer hooks packed them."""

    __slots__ = ("source", "view", "kept")

    def __init__(self, source: Source, view: Tuple[Any, ...], kept: List[Any]) -> None:
        self.source, self.view, self.kept = source, view, kept


@contextlib.contextmanager
def saving_as_source(source: Optional[Source]) -> Iterator[None]:
    """Inside: a saved tensor on ``source``'s output storage is kept as a recipe, recomputed on unpack."""
    if source is None:
        yield
        return
    outer = torch._C._autograd._top_saved_tensors_default_hooks(False)
    outer_pack, outer_unpack = outer if outer is not None else (None, None)

    def pack(t: torch.Tensor) -> Any:
        if t.device == source.tensors[0].device and t.untyped_storage().data_ptr() == source._ptr \
                and t.untyped_storage().data_ptr() != 0:
            source.hits += 1
            kept = [outer_pack(s) if outer_pack is not None else s for s in source.tensors]
            return _Token(source, (tuple(t.shape), t.stride(), t.storage_offset()), kept)
        return ("t", outer_pack(t) if outer_pack is not None else t)

    def unpack(p: Any) -> torch.Tensor:
        if isinstance(p, _Token):
            tensors = [outer_unpack(k) if outer_unpack is not None else k for k in p.kept]
            y = p.source.recompute(tensors)
            shape, stride, offset = p.view
            base = p.source._geometry[2]
            return y.as_strided(shape, stride, y.storage_offset() + offset - base)
        return outer_unpack(p[1]) if outer_unpack is not None else p[1]

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield
