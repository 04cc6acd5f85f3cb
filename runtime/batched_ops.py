"""Batched calls of the shape and matmul ops a time-batched task runs (``passes/batch_over_time.py``).

A batched task runs K steps' op as one call on the steps packed along dim 0 (``[K*N, ...]``). For
elementwise ops and layers that is the same call; for these it is another call, or none:

* ``reshape``/``view`` to sizes ``(s0, s1, ...)``: each step is one contiguous block of the packed tensor in
  row-major order, so one reshape to ``(K*s0, s1, ...)`` gives every step's result, in order, exactly
  (``s0 = -1`` is resolved from one step's size first). This is what lets ``B, L, D = x.shape;
  x.reshape(B, L, H, D // H)``, written once per step, run once per chunk.
* ``transpose``/``swapaxes``/``permute``: when dim 0 stays dim 0.
* ``matmul``/``@``/``bmm`` (and ``scaled_matmul``, ``passes/fold_matmul_scale.py``): when every per-step
  operand has the same rank >= 3 (so dim 0 is a batch dim of the product on both sides) and any operand
  shared by all steps (a parameter) has a lower rank.
* reductions (``mean``, ``sum``, ``amax``, ``amin``, ``softmax``, ``log_softmax``) over dims that exclude 0.

Each rule returns the call to make, or None when the guard does not hold for these tensors; the executor
then runs the steps one by one (``Executor._call``), so a wrong guess costs time, never a wrong value.
"""
from __future__ import annotations

import operator
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch

from snncc.passes.batch_over_time import GUARDED_FUNCTIONS as FUNCTIONS, GUARDED_METHODS as METHODS
from snncc.passes.fold_matmul_scale import scaled_matmul

__all__ = ["batched_call"]

Call = Tuple[Callable[..., Any], Tuple[Any, ...], Dict[str, Any]]

def _dim(d: Any, rank: int) -> Optional[int]:
    if not isinstance(d, int) or isinstance(d, bool) or rank == 0:
        return None
    return d % rank if -rank <= d < rank else None


def _sizes(args: Sequence[Any]) -> Optional[Tuple[int, ...]]:
    sizes = tuple(args[0]) if len(args) == 1 and isinstance(args[0], (tuple, list, torch.Size)) else tuple(args)
    if not sizes or not all(isinstance(s, int) and not isinstance(s, bool) for s in sizes):
        return None
    return sizes


def _reshape(x: Any, sizes_args: Sequence[Any], K: int) -> Optional[Call]:
    sizes = _sizes(sizes_args)
    if not isinstance(x, torch.Tensor) or sizes is None or x.dim() == 0 or x.shape[0] % K:
        return None
    step = x.numel() // K
    s0 = sizes[0]
    if s0 == -1:
        rest = 1
        for s in sizes[1:]:
            if s == -1:
                return None
            rest *= s
        if rest == 0 or step % rest:
            return None
        s0 = step // rest
    if s0 < 0:
        return None
    return torch.reshape, (x, (K * s0,) + sizes[1:]), {}


def _keeps_dim0(x: Any, dims: Sequence[Any]) -> bool:
    return isinstance(x, torch.Tensor) and all(_dim(d, x.dim()) not in (None, 0) for d in dims)


def _matmul(a: Any, b: Any, per_step: Tuple[bool, bool]) -> bool:
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        return False
    ranks = [t.dim() for t, s in zip((a, b), per_step) if s]
    shared = [t.dim() for t, s in zip((a, b), per_step) if not s]
    return bool(ranks) and min(ranks) >= 3 and len(set(ranks)) == 1 and all(r < ranks[0] for r in shared)


def _reduce_dims(x: Any, args: Sequence[Any], kwargs: Dict[str, Any]) -> bool:
    dim = args[0] if args else kwargs.get("dim", None)
    if dim is None:
        return False
    dims = dim if isinstance(dim, (tuple, list)) else (dim,)
    return _keeps_dim0(x, dims)


def batched_call(kind: str, target: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any], K: int,
                 per_step: Sequence[bool]) -> Optional[Call]:
    """The one call that gives all K steps of ``target(*args, **kwargs)`` packed along dim 0, or None.

    ``kind``: "function" or "method" (``args[0]`` is the object); ``per_step[i]``: argument i differs per
    step (packed), else it is shared by all steps."""
    name = target if kind == "method" else getattr(target, "__name__", "")
    if kind == "function" and target not in FUNCTIONS:
        return None
    if kind == "method" and target not in METHODS:
        return None
    if not args:
        return None
    x, rest = args[0], args[1:]
    if name in ("reshape", "view"):
        shape = rest if rest else (kwargs.get("shape", kwargs.get("size")),)
        return _reshape(x, shape, K)
    if name == "contiguous":
        return (torch.Tensor.contiguous, args, kwargs) if isinstance(x, torch.Tensor) else None
    if name in ("transpose", "swapaxes"):
        dims = list(rest) + [kwargs[k] for k in ("dim0", "dim1", "axis0", "axis1") if k in kwargs]
        return (torch.transpose, (x, dims[0], dims[1]), {}) if len(dims) == 2 and _keeps_dim0(x, dims) else None
    if name == "permute":
        dims = _sizes(rest) if rest else (tuple(kwargs["dims"]) if "dims" in kwargs else None)
        if dims is None or not isinstance(x, torch.Tensor) or _dim(dims[0], x.dim()) != 0:
            return None
        return torch.permute, (x, dims), {}
    if name in ("matmul", "bmm") or target is operator.matmul:
        b = rest[0] if rest else kwargs.get("other", kwargs.get("mat2"))
        flags = (bool(per_step[0]), bool(per_step[1]) if len(per_step) > 1 else False)
        return (torch.matmul, (x, b), {}) if any(flags) and _matmul(x, b, flags) else None
    if target is scaled_matmul:          # passes/fold_matmul_scale.py: a matmul, the scale shared by the steps
        flags = (bool(per_step[0]), bool(per_step[1]) if len(per_step) > 1 else False)
        return (scaled_matmul, args, {}) if len(rest) == 2 and any(flags) and _matmul(x, rest[0], flags) else None
    if name in ("mean", "sum", "amax", "amin", "softmax", "log_softmax"):
        fn = target if kind == "function" else (lambda t, *a, _n=name, **k: getattr(t, _n)(*a, **k))
        return (fn, args, kwargs) if _reduce_dims(x, rest, kwargs) else None
    return None
