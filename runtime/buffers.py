"""A small caching allocator for the CPU kernels' big buffers (spikes, H per step, gradients).

Why: torch's CPU allocator hands large blocks straight to ``mmap`` and back to the OS when they are freed,
so every training step pays a page fault (and the kernel's zeroing) per 4 KiB of every fresh buffer. On the
2-core VMs this project runs on that cost more than the neuron scans themselves: a training step of the
seed CSNN spent about a third of its time faulting pages in. CUDA has torch's caching allocator; CPU needs
this.

How it stays safe: the pool keeps one flat byte tensor per buffer and hands out *views* of it. A view is a
separate TensorImpl holding a reference to the storage, so while anything (autograd's saved tensors, the
user's outputs, a view of a view) still uses the memory, the storage's use count is above the pool's own;
a buffer is handed out again only when the pool holds the last reference. Nothing is ever reused early.
The pool is bounded (``SNNCC_POOL_MB``, default 2048; 0 disables it): free buffers beyond the bound are
released, least recently used first.
"""
from __future__ import annotations

import os
import threading
from collections import OrderedDict
from typing import Dict, List, Sequence, Tuple

import torch

__all__ = ["empty", "empty_like", "empty_strided", "clear", "pooled_bytes"]

_LOCK = threading.Lock()
# nbytes -> list of flat uint8 base tensors (most recently used last); plus their use-count baseline.
_FREE: "OrderedDict[int, List[torch.Tensor]]" = OrderedDict()
_BASELINE: Dict[int, int] = {}


_HAS_USE_COUNT = hasattr(torch._C, "_storage_Use_Count")


def _limit() -> int:
    """The pool's bound in bytes; 0 (pool off) where this torch cannot tell when a buffer is free."""
    if not _HAS_USE_COUNT:
        return 0
    return int(os.environ.get("SNNCC_POOL_MB", "2048")) << 20


def _use_count(base: torch.Tensor) -> int:
    return torch._C._storage_Use_Count(base.untyped_storage()._cdata)


def _is_free(base: torch.Tensor) -> bool:
    return _use_count(base) <= _BASELINE[id(base)]


def pooled_bytes() -> int:
    """Bytes the pool holds (free or in use)."""
    with _LOCK:
        return sum(n * len(v) for n, v in _FREE.items())


def clear() -> None:
    """Drop every pooled buffer (those still in use stay alive through their views)."""
    with _LOCK:
        for bases in _FREE.values():
            for b in bases:
                _BASELINE.pop(id(b), None)
        _FREE.clear()


def _round(nbytes: int) -> int:
    """Sizes are rounded up to 1/8 of their power of two so near-equal requests share buffers."""
    if nbytes <= 4096:
        return 4096
    step = 1 << max(12, nbytes.bit_length() - 4)
    return (nbytes + step - 1) // step * step


def _take(nbytes: int) -> torch.Tensor:
    size = _round(nbytes)
    with _LOCK:
        for base in _FREE.get(size, ()):
            if _is_free(base):
                _FREE.move_to_end(size)
                return base
        base = torch.empty(size, dtype=torch.uint8)
        _BASELINE[id(base)] = _use_count(base)
        _FREE.setdefault(size, []).append(base)
        _FREE.move_to_end(size)
        _trim()
        return base


def _trim() -> None:
    """Release free buffers, least recently used sizes first, until the pool fits its bound."""
    total = sum(n * len(v) for n, v in _FREE.items())
    limit = _limit()
    for size in list(_FREE):
        if total <= limit:
            return
        keep = []
        for b in _FREE[size]:
            if total > limit and _is_free(b):
                total -= size
                _BASELINE.pop(id(b), None)
            else:
                keep.append(b)
        if keep:
            _FREE[size] = keep
        else:
            del _FREE[size]


def _cl_strides(shape: Sequence[int]) -> Tuple[int, ...]:
    """Channels-last strides of a 4-d shape (N, C, H, W) -> memory order N, H, W, C."""
    n, c, h, w = shape
    return (h * w * c, 1, w * c, c)


_ITEMSIZE: Dict[torch.dtype, int] = {}


def _itemsize(dtype: torch.dtype) -> int:
    """Bytes per element, memoized: ``torch.empty((), dtype=...)`` per call cost ~15 us inside a training
    step (every torch call is slower there, its code and data evicted by the kernels' traffic)."""
    n = _ITEMSIZE.get(dtype)
    if n is None:
        n = _ITEMSIZE[dtype] = torch.empty((), dtype=dtype).element_size()
    return n


def _contiguous_strides(shape: Sequence[int]) -> Tuple[int, ...]:
    out, acc = [], 1
    for n in reversed(shape):
        out.append(acc)
        acc *= max(n, 1)
    return tuple(reversed(out))


def empty(shape: Sequence[int], dtype: torch.dtype, device: torch.device,
          channels_last: bool = False, own: bool = False) -> torch.Tensor:
    """Like ``torch.empty`` (contiguous, or channels-last for 4-d), from the pool on CPU.

    ``own``: a tensor of its own on the pooled storage, not a view of the pool's base, so that views of it
    have it as their ``_base`` (``runtime/recompute.source_of`` follows ``_base`` to the tensor a recipe is
    attached to; a view's ``_base`` skips intermediate views). The pool's use count sees it all the same.
    """
    shape = tuple(int(s) for s in shape)
    if not isinstance(device, torch.device):
        device = torch.device(device)
    if device.type != "cpu" or _limit() <= 0:
        mf = torch.channels_last if channels_last else torch.contiguous_format
        return torch.empty(shape, dtype=dtype, device=device, memory_format=mf)
    numel = 1
    for s in shape:
        numel *= s
    itemsize = _itemsize(dtype)
    nbytes = max(numel * itemsize, 1)
    base = _take(nbytes)
    flat = base[:numel * itemsize].view(dtype)
    strides = _cl_strides(shape) if channels_last else _contiguous_strides(shape)
    if own:
        return torch.empty(0, dtype=dtype, device=device).set_(flat.untyped_storage(), flat.storage_offset(),
                                                                 shape, strides)
    return flat.as_strided(shape, strides)


def empty_like(t: torch.Tensor) -> torch.Tensor:
    """A pooled tensor with ``t``'s shape and dtype, channels-last when ``t`` is (4-d), else contiguous."""
    cl = t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)
    return empty(t.shape, t.dtype, t.device, channels_last=cl)


def empty_strided(shape: Sequence[int], stride: Sequence[int], dtype: torch.dtype,
                  device: torch.device) -> torch.Tensor:
    """Like ``torch.empty_strided``, from the pool on CPU when the strides are dense (no gaps, no overlap:
    any permutation of a contiguous layout); otherwise ``torch.empty_strided`` itself."""
    shape, stride = tuple(int(s) for s in shape), tuple(int(s) for s in stride)
    if not isinstance(device, torch.device):
        device = torch.device(device)
    numel = 1
    for s in shape:
        numel *= s
    extent = 1 + sum((n - 1) * st for n, st in zip(shape, stride)) if numel else 0
    dense = numel > 0 and extent == numel and all(st > 0 for st in stride) and \
        len({st for n, st in zip(shape, stride) if n > 1}) == sum(1 for n in shape if n > 1)
    if device.type != "cpu" or _limit() <= 0 or not dense:
        return torch.empty_strided(shape, stride, dtype=dtype, device=device)
    itemsize = _itemsize(dtype)
    base = _take(numel * itemsize)
    return base[:numel * itemsize].view(dtype).as_strided(shape, stride)
