"""The CUDA scan of a lifted neuron as an autograd Function, independent of how kernels are compiled and
launched (the :class:`~runtime.cuda.scan.Launcher` protocol: CuPy in ``launch.py``, the host emulator in
the tests). The counterpart of ``runtime.cpu_ir``'s ``_IRScan``/``ir_c_scan``: same arguments, same
results, same gradients (input, initial states, every parameter).

What it marshals (kernel signatures: ``ir_kernels.py``): every per-neuron buffer laid out like the input's
steps (contiguous or channels-last, step t at ``t * M``); parameters with more than one element broadcast
to one value per neuron (``full``), one-element parameters passed as a scalar; kernel arguments as numpy
scalars of the exact C width (``np.uint64`` pointers, ``np.int64`` for ``long long``, ``np.int32`` for
``int``). Kept for backward: the input, the initial states, the parameters and, for user surrogates, the
spike inputs ``z`` of every step. Backward allocates the kernel's state scratch ``[K, ns, M]`` for the
duration of its launch (the forward is recomputed per thread; see ``ir_kernels``).
"""
from __future__ import annotations

import threading
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from snncc.neuron_ir import NeuronIR
from .. import ir_codegen as cg
from .ir_kernels import DIVISIONS, ir_cuda_source, scratch_dtype, torch_cuda_semantics
from .scan import Launcher

__all__ = ["cuda_ir_scan", "cuda_supports_ir", "ir_kernel_source", "PREFIX"]

#: the kernels' name prefix (``<PREFIX>_fwd``, ``<PREFIX>_bwd``)
PREFIX = "snncc_ir"
_DT = {"float32": torch.float32, "float64": torch.float64, "bool": torch.bool}
_NAMES = {v: k for k, v in _DT.items()}
_LOCK = threading.Lock()
_SOURCES: Dict[Any, str] = {}


def cuda_supports_ir(first: NeuronIR, steady: NeuronIR, x: torch.Tensor) -> Optional[str]:
    """None when the CUDA scan can run these steps on ``x``; else the reason (the caller falls back)."""
    if x.device.type != "cuda":
        return "the input is not a CUDA tensor"
    from . import available
    if not available():
        return "CuPy is not installed (or SNNCC_BACKEND=reference)"
    return _supports(first, steady, x)


def _supports(first: NeuronIR, steady: NeuronIR, x: torch.Tensor) -> Optional[str]:
    """The device-independent part of :func:`cuda_supports_ir` (what the emulator tests run too)."""
    why = cg.supported_ir(first) or cg.supported_ir(steady)
    if why:
        return why
    if first.params != steady.params:
        return "the first step and the later steps take different parameters"
    if len(steady.outputs) != 1:
        return f"the step has {len(steady.outputs)} outputs"
    kinds = [[ir.surrogates[o.attr("surrogate")].opaque for o in ir.spike_ops] for ir in (first, steady)]
    if kinds[0] != kinds[1][:len(kinds[0])]:
        return "the first step's spike functions differ from the later steps'"
    if _NAMES.get(x.dtype) != steady.dtype(steady.x):
        return f"the input is {x.dtype}, the lifted step takes {steady.dtype(steady.x)}"
    return None


def ir_kernel_source(first: NeuronIR, steady: NeuronIR, full: Tuple[bool, ...]) -> str:
    """The CUDA source the scan compiles for these steps (memoized: one str object per variant, which the
    launchers key their compiled modules by)."""
    key = (first, steady, full)
    with _LOCK:
        src = _SOURCES.get(key)
        if src is None:
            src = _SOURCES[key] = ir_cuda_source(first, steady, full, prefix=PREFIX)
    return src


def _ptr(t: Optional[torch.Tensor]) -> np.uint64:
    return np.uint64(0 if t is None else t.data_ptr())


def _is_dense(t: torch.Tensor) -> bool:
    return t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))


def _as(t: torch.Tensor, shape: Tuple[int, ...], stride: Tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """``t`` broadcast to ``shape`` with ``stride`` and ``dtype`` (the layout the kernels index by): a copy
    only when it differs (incoming gradients are often expanded, e.g. from a ``sum()``)."""
    if t.shape == shape and t.stride() == stride and t.dtype == dtype:
        return t
    out = torch.empty_strided(shape, stride, dtype=dtype, device=t.device)
    out.copy_(t.expand(shape))
    return out


def _user_derivative(sur: Any, z: torch.Tensor) -> torch.Tensor:
    """A user surrogate's derivative at every saved ``z``, by its own backward (all steps at once)."""
    with torch.enable_grad():
        zz = z.detach().requires_grad_(True)
        s = sur.fn(zz)
        (d,) = torch.autograd.grad(s, zz, torch.ones_like(s))
    return d.to(z.dtype)


def _launch(launcher: Launcher, src: str, name: str, M: int, *args: Any) -> None:
    if M > 0:                   # a grid of 0 blocks is an invalid launch on CUDA (an empty batch: no work)
        launcher.launch(launcher.module(src), f"{PREFIX}_{name}", M, *args)


class _CudaIRScan(torch.autograd.Function):
    """A lifted neuron over K steps on the generated CUDA kernels. Inputs: x ``[K, *S]`` (or ``[*S]``,
    the same at every step), initial states ``[*S]`` (none: from the reset state), parameters
    (broadcastable to ``[*S]``)."""

    @staticmethod
    def forward(ctx: Any, launcher: Launcher, first: NeuronIR, steady: NeuronIR, broadcast: bool, K: int,
                ns: int, need_grad: bool, x: torch.Tensor, *rest: torch.Tensor):
        has_st0 = len(rest) > len(steady.params)
        st0 = rest[:ns] if has_st0 else ()
        params = rest[ns:] if has_st0 else rest
        like = x if broadcast else x[0]
        # the kernels read step t at x + t * M, each step dense (contiguous or channels-last)
        if not _is_dense(like) or (not broadcast and K > 1 and x.stride(0) != like.numel()):
            x = x.contiguous()
            like = x if broadcast else x[0]
        M, shape, stride, dev = like.numel(), tuple(like.shape), like.stride(), x.device
        steps = ((K,) + shape, (M,) + stride)
        full = tuple(p.numel() > 1 for p in params)
        pars = [_as(p.detach(), shape, stride, p.dtype) if f else p.detach().reshape(1).contiguous()
                for p, f in zip(params, full)]
        s0 = [_as(s.detach(), shape, stride, _DT[steady.dtype(n)]) for s, n in zip(st0, steady.states)]
        out = torch.empty_strided(*steps, dtype=_DT[steady.dtype(steady.outputs[0])], device=dev)
        sn = [torch.empty_strided(shape, stride, dtype=_DT[steady.dtype(s)], device=dev) for s in steady.states]
        zs: List[Optional[torch.Tensor]] = []
        for o in steady.spike_ops:
            z = o.args[0]
            zdt = _DT[steady.dtype(z)] if isinstance(z, str) else x.dtype
            keep = need_grad and steady.surrogates[o.attr("surrogate")].opaque
            zs.append(torch.empty_strided(*steps, dtype=zdt, device=dev) if keep else None)
        src = ir_kernel_source(first, steady, full)
        xts = np.int64(0 if broadcast else M)
        s0_ptrs = [_ptr(s) for s in s0] + [_ptr(None)] * (ns - len(s0))
        _launch(launcher, src, "fwd", M, _ptr(x), xts, *s0_ptrs, *[_ptr(p) for p in pars], _ptr(out),
                *[_ptr(s) for s in sn], *[_ptr(z) for z in zs], np.int64(K), np.int64(M), np.int32(has_st0))
        ctx.launcher, ctx.meta = launcher, (first, steady, broadcast, K, ns, has_st0, full, M, shape, stride)
        ctx.param_shapes = [p.shape for p in params]
        ctx.state_shapes = [s.shape for s in st0]
        ctx.set_materialize_grads(False)
        if need_grad:
            ctx.save_for_backward(x, *s0, *pars, *[z for z in zs if z is not None])
            ctx.zmask = [z is not None for z in zs]
        return (out,) + tuple(sn)

    @staticmethod
    def backward(ctx: Any, g_out: Optional[torch.Tensor], *g_sn: Optional[torch.Tensor]):
        first, steady, broadcast, K, ns, has_st0, full, M, shape, stride = ctx.meta
        saved = ctx.saved_tensors
        x = saved[0]
        s0 = list(saved[1:1 + (ns if has_st0 else 0)])
        npar = len(steady.params)
        off = 1 + len(s0)
        pars = list(saved[off:off + npar])
        zit = iter(saved[off + npar:])
        dev = x.device
        steps = ((K,) + shape, (M,) + stride)
        ds = [_user_derivative(steady.surrogates[o.attr("surrogate")], next(zit)) if has else None
              for o, has in zip(steady.spike_ops, ctx.zmask)]
        if g_out is not None:
            g_out = _as(g_out, *steps, _DT[steady.dtype(steady.outputs[0])])
        gsn = [None if g is None else _as(g, shape, stride, _DT[steady.dtype(s)])
               for g, s in zip(g_sn, steady.states)]
        gx = torch.empty_strided(*((shape, stride) if broadcast else steps), dtype=x.dtype, device=dev)
        gs0 = [torch.empty_like(s) for s in s0] + [None] * (ns - len(s0))
        gp = [torch.empty_strided(shape, stride, dtype=p.dtype, device=dev) for p in pars]
        hdt = scratch_dtype(steady)
        # NOTE: the backward kernel's scratch: the states before each step, [K, ns, M] (see ir_kernels)
        scratch = torch.empty((K, ns, M), dtype=_DT[hdt], device=dev) if hdt and M > 0 else None
        src = ir_kernel_source(first, steady, full)
        _launch(ctx.launcher, src, "bwd", M, _ptr(x), np.int64(0 if broadcast else M),
                *[_ptr(s) for s in s0], *[_ptr(None)] * (ns - len(s0)), *[_ptr(p) for p in pars], _ptr(g_out),
                *[_ptr(g) for g in gsn], *[_ptr(d) for d in ds], _ptr(gx), *[_ptr(g) for g in gs0],
                *[_ptr(g) for g in gp], _ptr(scratch), np.int64(K), np.int64(M), np.int32(has_st0))
        del scratch
        if M == 0:
            gx.zero_()
            for g in gp + [g for g in gs0 if g is not None]:
                g.zero_()
        g_params = [g.sum_to_size(shp) if len(shp) else g.sum() for g, shp in zip(gp, ctx.param_shapes)]
        g_states = tuple(g.sum_to_size(shp) if len(shp) else g.sum() for g, shp in zip(gs0, ctx.state_shapes)) \
            if has_st0 else ()
        grads = (gx,) + g_states + tuple(g_params)
        need = ctx.needs_input_grad[7:]
        return (None,) * 7 + tuple(g if n else None for g, n in zip(grads, need))


def cuda_ir_scan(first: NeuronIR, steady: NeuronIR, x: torch.Tensor, K: int, broadcast: bool,
                 state: Optional[Sequence[torch.Tensor]], params: Sequence[torch.Tensor], *,
                 launcher: Optional[Launcher] = None, division: str = "reciprocal"
                 ) -> Optional[Tuple[torch.Tensor, Tuple[torch.Tensor, ...]]]:
    """Run K steps with the generated CUDA kernels: ``(outputs [K, *S], final states)``, as
    ``runtime.cpu_ir.ir_c_scan`` (same arguments); None when the tensors do not fit (dtypes, devices) and
    the caller runs the reference scan. Call :func:`cuda_supports_ir` first.

    ``launcher``: where the kernels run; None is CuPy's (``launch.LAUNCHER``, imported only then, with
    ``x``'s device current), the tests pass the host emulator. ``division``: ``"reciprocal"`` divides by
    constants as torch's CUDA kernels do (``ir_kernels.torch_cuda_semantics``), ``"true"`` as its CPU
    kernels."""
    if division not in DIVISIONS:
        raise ValueError(f"division must be one of {DIVISIONS}, not {division!r}")
    if launcher is None:
        from .launch import LAUNCHER        # imports cupy: only when a CUDA scan actually runs
        with torch.cuda.device(x.device):
            return cuda_ir_scan(first, steady, x, K, broadcast, state, params, launcher=LAUNCHER,
                                division=division)
    if _supports(first, steady, x) is not None:
        return None
    ts = list(params) + list(state or ())
    if any(t.device != x.device for t in ts):
        return None
    like = x if broadcast else x[0]
    if len(params) != len(steady.params):
        return None
    for p, name in zip(params, steady.params):
        if _NAMES.get(p.dtype) != steady.dtype(name) or not _broadcasts(p.shape, tuple(like.shape)):
            return None
    state = tuple(state) if state else None          # none or empty: from the reset state
    if state is not None and len(state) != len(steady.states):
        return None
    for s, name in zip(state or (), steady.states):
        if _NAMES.get(s.dtype) != steady.dtype(name) or not _broadcasts(s.shape, tuple(like.shape)):
            return None
    if division == "reciprocal":
        first, steady = torch_cuda_semantics(first), torch_cuda_semantics(steady)
    ns = len(steady.states)
    need_grad = torch.is_grad_enabled() and any(t.requires_grad for t in [x] + ts)
    res = _CudaIRScan.apply(launcher, first, steady, broadcast, K, ns, need_grad, x, *(state or ()), *params)
    return res[0], tuple(res[1:])


def _broadcasts(shape: Tuple[int, ...], to: Tuple[int, ...]) -> bool:
    if len(shape) > len(to):
        return False
    return all(a in (1, b) for a, b in zip(reversed(shape), reversed(to)))
