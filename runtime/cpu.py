"""CPU backend: a neuron layer's scan as one generated C kernel (OpenMP), forward and backward.

This module runs the kernels: it decides what the C scans can take (:func:`supports`), finds the compiled
library for a spec (memoized: generating and hashing the source costs more than a small layer's kernel),
types its entry points for ctypes, and wraps the calls in ``torch.autograd.Function``s (``_CScan``, and
``_CBNScan`` with a training BatchNorm fused in) so backward runs the generated backward kernel. What it
needs from the two concerns split out of it:

* ``runtime/cpu_source.py``: the C source, generated from the :class:`~snncc.neurons.NeuronSpec` (charge,
  fire, reset, surrogate); pure text, nothing compiled there.
* ``runtime/cbuild.py``: compiling with the system C compiler, caching the .so on disk by a hash of the
  source and the flags, and whether a compiler exists at all.

The names tests and other modules import from here before the split (``kernel_source``, ``_library``,
``compiler_available``, ``CACHE_DIR``, ``_FLAGS``...) stay importable from here. NOTE: the build state
(``CACHE_DIR``, ``_LIBS``, ``_FOUND``, ``_WARNED``...) lives in ``runtime/cbuild.py`` and is read through
this module live, but setting it here changes nothing: patch it on ``cbuild``.

Exactness: ``-O3 -march=native -fno-trapping-math -ffp-contract=off`` and no ``-ffast-math``: the same
IEEE operations in the same order as the torch formula, so spikes and states are bit-identical to the
reference. Supported: IF and LIF (every reset mode, ``decay_input``, ``detach_reset``) with a surrogate snncc
knows, float32/float64, dense tensors of one layout. Everything else runs on the reference backend.
No compiler: the reference backend, with one warning.
"""
from __future__ import annotations

import ctypes
import dataclasses
import functools
from typing import Any, Dict, Optional, Tuple

import torch

from snncc.neurons import NeuronSpec
from . import buffers, cbuild, codegen
from .batchnorm import step_backward, step_statistics, update_running_stats  # noqa: F401
# NOTE: also re-exported for the modules and tests that import them from here (``cpu._library``,
# ``cpu.kernel_source``, ``cpu.sparse_conv_source``, ``cpu._HTYPE``...).
from .cbuild import _library, compiler_available  # noqa: F401
from .cpu_source import (_BLOCK, _CTYPE, _HTYPE, bits_source, kernel_source, sparse_block,  # noqa: F401
                         sparse_conv_source, sparse_linear_source, table_block, table_conv_source,
                         transpose_source)

__all__ = ["supports", "c_scan", "c_bn_scan", "update_running_stats", "kernel_source", "compiler_available",
           "pool_geometry", "CACHE_DIR"]

#: the build state of ``runtime/cbuild.py``, read through this module (``cpu.CACHE_DIR``, ``cpu._FLAGS``)
#: as before the split; looked up on each access so a value rebound there (a test's cache directory,
#: ``_WARNED`` set once warned) is the one seen here.
_BUILD_STATE = ("CACHE_DIR", "_FLAGS", "_LOCK", "_LIBS", "_FOUND", "_WARNED")


def __getattr__(name: str) -> Any:
    if name in _BUILD_STATE:
        return getattr(cbuild, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def supports(spec: NeuronSpec, *tensors: Optional[torch.Tensor]) -> bool:
    """Whether the C scan can run this built-in spec on these tensors (else: reference backend). Other
    neurons (two-state kinds, users') run scans generated from their lifted step (``runtime/cpu_ir.py``)."""
    if not codegen.supported(spec):
        return False
    ts = [t for t in tensors if t is not None]
    if not ts or any(t.device.type != "cpu" or t.dtype not in _CTYPE or t.dtype != ts[0].dtype for t in ts):
        return False
    return compiler_available()


def _conv_from_bits_library(src: str, fn: str) -> Any:
    """The compiled library of a spike-input convolution ``src`` whose entry point ``fn`` takes (bits,
    weights, bias, out, 13 geometry int64s, threads)."""
    lib = _library(src)
    if not getattr(lib, "_snncc_typed", False):
        i64, ptr, cint = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
        getattr(lib, fn).argtypes = [ptr, ptr, ptr, ptr] + [i64] * 13 + [cint]
        lib._snncc_typed = True
    return lib


@functools.lru_cache(maxsize=None)   # the source is generated and hashed once per argument, not per call
def sparse_conv_library(cout: int) -> Any:
    """The compiled spike-input convolution for ``cout`` output channels (block ``sparse_block(cout)``)."""
    return _conv_from_bits_library(sparse_conv_source(sparse_block(cout)), "sconv2d_fwd")


@functools.lru_cache(maxsize=None)
def sparse_linear_library(cout: int) -> Any:
    """The compiled spike-input linear for ``cout`` outputs (block ``sparse_block(cout)``)."""
    lib = _library(sparse_linear_source(sparse_block(cout)))
    if not getattr(lib, "_snncc_typed", False):
        i64, ptr, cint = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
        lib.slinear_fwd.argtypes = [ptr] * 4 + [i64] * 3 + [cint]
        lib.slinear_gw.argtypes = [ptr] * 3 + [i64] * 3 + [cint]
        lib._snncc_typed = True
    return lib


@functools.lru_cache(maxsize=None)
def table_conv_library(cout: int) -> Any:
    """The compiled table-lookup spike-input convolution for ``cout`` output channels."""
    return _conv_from_bits_library(table_conv_source(table_block(cout)), "tconv2d_fwd")


@functools.lru_cache(maxsize=None)
def _transpose_library() -> Any:
    lib = _library(transpose_source())
    i64, ptr, cint = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.transpose_f32.argtypes = [ptr, ptr, i64, i64, i64, cint]
    return lib


def blocked_transposed(w: torch.Tensor, block: int) -> torch.Tensor:
    """``w`` [Cout, Cin] as [Cout / block][Cin][block]: each block of ``block`` rows transposed, the blocks
    one after another (the spike-input linear's weights, one contiguous span per output block). float32
    CPU by the tiled C transpose, other tensors by torch."""
    cout, cin = w.shape
    if w.dtype != torch.float32 or w.device.type != "cpu" or not w.is_contiguous() or not compiler_available():
        return w.reshape(cout // block, block, cin).transpose(1, 2).contiguous()
    out = torch.empty((cout // block, cin, block), dtype=w.dtype)
    _transpose_library().transpose_f32(w.data_ptr(), out.data_ptr(), cout // block, block, cin,
                                       torch.get_num_threads())
    return out


def _copy_to_channels_last(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)`` for a channels-last ``[..., C, H, W]`` ``dst`` and an NCHW-contiguous ``src``:
    float32 by the tiled C transpose, one C x HW plane per image; anything else by torch."""
    c = src.shape[-3]
    hw = src.shape[-2] * src.shape[-1]
    if src.dtype != torch.float32 or not src.is_contiguous() or dst.dtype != src.dtype or c == 1 or hw == 1 \
            or dst.stride()[-3:] != (1, src.shape[-1] * c, c) or not compiler_available() or \
            dst.stride(0) * dst.shape[0] != dst.numel() or src.numel() == 0:
        dst.copy_(src)
        return
    _transpose_library().transpose_f32(src.data_ptr(), dst.data_ptr(), src.numel() // (c * hw), c, hw,
                                       torch.get_num_threads())


@functools.lru_cache(maxsize=None)
def bits_library(dtype: torch.dtype) -> Any:
    """The compiled pack/unpack functions for ``dtype`` (float32/float64)."""
    lib = _library(bits_source(dtype))
    if not getattr(lib, "_snncc_typed", False):
        i64, ptr, cint = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
        lib.pack_check.argtypes = [ptr, i64, ptr, cint]
        lib.pack_check.restype = i64
        lib.unpack.argtypes = [ptr, i64, ptr, cint]
        lib._snncc_typed = True
    return lib


def _scan_library(src: str) -> Any:
    """The compiled ``kernel_source`` ``src``, its four entry points typed for ctypes (once per library)."""
    lib = _library(src)
    if not getattr(lib, "_snncc_typed", False):
        i64, dbl, ptr, cint = ctypes.c_int64, ctypes.c_double, ctypes.c_void_p, ctypes.c_int
        extra = [ptr, i64, ptr, ptr] if "double* gk_part" in src else []     # PLIF: xs, x_stride, v0, gk
        extra = extra + [ptr, i64, ptr, ptr, ptr, i64, i64]     # the in-kernel rerun: x, stride, v0, BN
        lib.scan_fwd.argtypes = [ptr, i64, ptr, ptr, ptr, ptr, ptr, i64, i64, dbl, dbl, dbl, dbl, cint,
                                 ptr, ptr, i64, i64]
        lib.scan_bwd.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, cint, ptr, i64, i64, dbl, dbl, dbl, dbl, dbl,
                                 cint] + extra
        lib.pool_fwd.argtypes = [ptr, i64, ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64, i64, i64, i64,
                                 dbl, dbl, dbl, dbl, cint, ptr, ptr, i64, i64]
        lib.pool_bwd.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, cint, ptr, i64, i64, i64, i64, i64, i64, i64,
                                 dbl, dbl, dbl, dbl, dbl, cint] + extra
        lib._snncc_typed = True
    return lib


_BY_SPEC: Dict[Any, Any] = {}


def _kernels(spec: NeuronSpec, dtype: torch.dtype, pool: Optional[int]) -> Any:
    """The compiled scans for a spec, memoized by spec (generating and hashing the source every call
    costs more than the kernel on small layers)."""
    key = (spec if not spec.surrogate.opaque else dataclasses.replace(
        spec, surrogate=dataclasses.replace(spec.surrogate, fn=None)), dtype, pool)
    lib = _BY_SPEC.get(key)
    if lib is None:
        lib = _BY_SPEC[key] = _scan_library(kernel_source(spec, dtype, pool=pool))
    return lib


def _p(t: Optional[torch.Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


def _channels_last(t: torch.Tensor) -> bool:
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def _dense_like(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` with ``like``'s (dense) strides, so both can be walked as flat arrays in the same order."""
    if t.shape == like.shape and t.stride() == like.stride():
        return t
    out = buffers.empty_like(like)
    out.copy_(t)
    return out


def _steps_like(x_step: torch.Tensor, K: int, shape: Optional[Tuple[int, ...]] = None,
                dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """A pooled ``[K, *shape]`` buffer laid out like ``x_step`` (channels-last stays channels-last)."""
    shape = tuple(x_step.shape) if shape is None else shape
    flat = buffers.empty((K * shape[0],) + shape[1:], dtype or x_step.dtype, x_step.device,
                         channels_last=_channels_last(x_step))
    return flat.view((K,) + shape)


def _consts(spec: NeuronSpec, w: Optional[torch.Tensor]) -> Tuple[float, float, float, float]:
    """(tau, k, v_th, v_r) as the kernels take them; k = sigmoid(w) computed by torch, as the reference."""
    kc = float(w.detach().sigmoid()) if w is not None else 0.0
    return float(spec.tau), kc, float(spec.v_threshold), 0.0 if spec.v_reset is None else float(spec.v_reset)


def pool_geometry(x_step: torch.Tensor, k: int) -> Tuple[int, int, int, int, int]:
    """(P, H, W, C_inner, units) of a 4-d step tensor for the pooled kernels (see kernel_source)."""
    n, c, h, w = x_step.shape
    P, C = (n, c) if _channels_last(x_step) else (n * c, 1)
    Ho, rem = h // k, h % k
    return P, h, w, C, P * (Ho + (rem > 0))


def _user_derivative(spec: NeuronSpec, hs: torch.Tensor) -> torch.Tensor:
    """d spike / d z of a user's surrogate at z = H - V_th for every step, through its own backward
    (``codegen.plain_step_surrogate`` checked it is elementwise and linear in the incoming gradient).

    NOTE: called a step at a time, as eager calls it: its temporaries stay step-sized (reused by the
    allocator) instead of chunk-sized (a fresh, page-faulted block per temporary per call).
    """
    out = _steps_like(hs[0], hs.shape[0], dtype=hs.dtype)
    for t in range(hs.shape[0]):
        with torch.enable_grad():
            z = (hs[t] - spec.v_threshold).detach().requires_grad_(True)
            s = spec.surrogate.fn(z)
            (d,) = torch.autograd.grad(s, z, torch.ones_like(s))
        out[t].copy_(d)
    return out


def _bn_args(bn: Optional[Tuple[torch.Tensor, torch.Tensor]], x_step: torch.Tensor) -> Tuple[Any, ...]:
    """(alpha, beta, cdiv, cmod): the channel of flat element g is (g / cdiv) % cmod in x's layout."""
    if bn is None:
        return None, None, 1, 1
    c = x_step.shape[1]
    cdiv = 1 if _channels_last(x_step) else int(x_step[0, 0].numel())
    return bn[0].data_ptr(), bn[1].data_ptr(), cdiv, c


def _forward_kernel(lib: Any, spec: NeuronSpec, x: torch.Tensor, x_step: torch.Tensor, broadcast: bool, K: int,
                    v0: Optional[torch.Tensor], w: Optional[torch.Tensor], pool: Optional[int], keep: bool,
                    h_dtype: Optional[torch.dtype], want_out: bool = True, pool_cf: bool = False,
                    bn: Optional[Tuple[torch.Tensor, torch.Tensor]] = None):
    """Run the forward kernel; returns (out, final V, H per step or None, bits or None). ``bn``: per-step,
    per-channel (alpha, beta) ``[K, C]`` of a training BatchNorm applied to the input inside the kernel."""
    M = x_step.numel()
    hs = _steps_like(x_step, K) if keep else None
    v = buffers.empty_like(x_step)
    tau, kc, vth, vr = _consts(spec, w)
    nt = torch.get_num_threads()
    x_stride = 0 if broadcast else M
    if pool is None:
        units, ub = (M + _BLOCK - 1) // _BLOCK, _BLOCK // 8
        bits = buffers.empty((K * units * ub,), torch.uint8, x.device) if keep else None
        out = _steps_like(x_step, K) if want_out else None
        lib.scan_fwd(x.data_ptr(), x_stride, _p(v0), _p(out), _p(bits), _p(hs), v.data_ptr(),
                     K, M, tau, kc, vth, vr, nt, *_bn_args(bn, x_step))
    else:
        P, H, W, C, units = pool_geometry(x_step, pool)
        ub = (pool * W * C + 7) // 8
        bits = buffers.empty((K * units * ub,), torch.uint8, x.device) if keep else None
        n, c = x_step.shape[:2]
        shape = (n, c, H // pool, W // pool)
        out = None
        if want_out:
            out = buffers.empty((K * n,) + shape[1:], x.dtype, x.device).view((K,) + shape) if pool_cf \
                else _steps_like(x_step, K, shape)
        lib.pool_fwd(x.data_ptr(), x_stride, _p(v0), _p(out), _p(bits), _p(hs), v.data_ptr(),
                     K, P, H, W, C, pool, int(pool_cf), tau, kc, vth, vr, nt, *_bn_args(bn, x_step))
    return out, v, hs, bits


def can_rerun(spec: NeuronSpec, h_dtype: Optional[torch.dtype]) -> bool:
    """The backward kernel can rerun the forward itself (``_scan_grads(rerun=...)``): H in the input's
    dtype, a surrogate the kernel evaluates inline (a user's opaque one needs H in torch), not PLIF
    (its weight gradient reads H of every step)."""
    return h_dtype is None and not spec.surrogate.opaque and spec.kind != "plif"


def _scan_grads(lib: Any, spec: NeuronSpec, K: int, pool: Optional[int], pool_cf: bool, broadcast: bool,
                dtype: torch.dtype, out_meta: Tuple[Any, Any], hs: Optional[torch.Tensor],
                bits: Optional[torch.Tensor], g_out: Optional[torch.Tensor], g_v_last: Optional[torch.Tensor],
                x: Optional[torch.Tensor], v0: Optional[torch.Tensor], w: Optional[torch.Tensor],
                rerun: Optional[Tuple[Any, ...]] = None):
    """The backward kernel: (grad of the scan's input, grad of V0, PLIF's per-unit dL/dk or None).

    ``rerun`` = (x, x_step, broadcast, v0, bn): the kernel reruns the forward block by block itself (hs and
    bits are None; ``can_rerun`` must hold)."""
    h0 = hs[0] if hs is not None else rerun[1]
    dsur = _user_derivative(spec, hs) if spec.surrogate.opaque else None
    # the gradient of one step's input: laid out like H (and the input), in the input's dtype
    g_step = buffers.empty(tuple(h0.shape), dtype, h0.device, channels_last=_channels_last(h0))
    if g_out is not None:
        shape, stride = out_meta
        if g_out.stride() != stride:
            g = buffers.empty((shape[0] * shape[1],) + shape[2:], dtype, h0.device,
                              channels_last=_channels_last(h0) and not pool_cf).view(shape)
            _copy_to_channels_last(g, g_out)
            g_out = g
    g_v_last = None if g_v_last is None else _dense_like(g_v_last, g_step)
    g_x = g_step if broadcast else _steps_like(g_step, K)
    g_v0 = buffers.empty_like(g_step)
    M = h0.numel()
    tau, kc, vth, vr = _consts(spec, w)
    nt = torch.get_num_threads()
    plif = spec.kind == "plif"
    units = (M + _BLOCK - 1) // _BLOCK if pool is None else pool_geometry(h0, pool)[4]
    gk_part = torch.zeros(units, dtype=torch.float64) if plif else None
    extra = [x.data_ptr(), 0 if broadcast else M, _p(v0), gk_part.data_ptr()] if plif else []
    if rerun is not None:
        rx, rx_step, rb, rv0, rbn = rerun
        extra += [rx.data_ptr(), 0 if rb else M, _p(rv0), *_bn_args(rbn, rx_step)]
    else:
        extra += [None, 0, None, None, None, 1, 1]
    if pool is None:
        lib.scan_bwd(_p(g_out), _p(hs), _p(dsur), _p(bits), _p(g_v_last), g_x.data_ptr(),
                     int(broadcast), g_v0.data_ptr(), K, M, tau, kc, vth, vr, float(spec.surrogate.alpha), nt,
                     *extra)
    else:
        P, H, W, C, _ = pool_geometry(h0, pool)
        lib.pool_bwd(_p(g_out), _p(hs), _p(dsur), _p(bits), _p(g_v_last), g_x.data_ptr(),
                     int(broadcast), g_v0.data_ptr(), K, P, H, W, C, pool, int(pool_cf), tau, kc, vth, vr,
                     float(spec.surrogate.alpha), nt, *extra)
    return g_x, g_v0, gk_part


class _CScan(torch.autograd.Function):
    """IF/LIF/PLIF scan over K steps with the generated C kernels, optionally with a max-pool epilogue.

    Kept for backward (through ``ctx.save_for_backward``): H per step (in ``h_dtype``) and the spikes as
    packed bits; PLIF also keeps its input and initial V for the weight gradient. With ``recompute``
    (``memory="min"``) only the input and the chunk's initial V are kept, and backward reruns the forward
    kernel to get H and the spikes back (bit-identical: the same kernel on the same values).
    """

    @staticmethod
    def forward(ctx: Any, spec: NeuronSpec, broadcast: bool, K: int, need_grad: bool,
                h_dtype: Optional[torch.dtype], recompute: bool, pool: Optional[int], pool_cf: bool,
                x: torch.Tensor, v0: Optional[torch.Tensor], w: Optional[torch.Tensor]):
        x_step = x if broadcast else x[0]
        if not (x_step.is_contiguous() or _channels_last(x_step)):
            x = x.contiguous()
            x_step = x if broadcast else x[0]
        v0 = None if v0 is None else _dense_like(v0, x_step)     # None: the reset state, set by the kernel
        lib = _kernels(spec, x.dtype, pool)
        keep = need_grad and not recompute
        out, v, hs, bits = _forward_kernel(lib, spec, x, x_step, broadcast, K, v0, w, pool, keep, None,
                                           pool_cf=pool_cf and pool is not None)
        if hs is not None and h_dtype is not None and h_dtype != hs.dtype:
            # NOTE: converted by torch (vectorized F16C) rather than in the kernel, where gcc emits a
            # library call per element; the full-precision H is a pooled buffer, reused next step.
            hs = hs.to(h_dtype)
        ctx.spec, ctx.broadcast, ctx.K, ctx.h_dtype, ctx.pool = spec, broadcast, K, h_dtype, pool
        ctx.x_dtype, ctx.recompute, ctx.pool_cf = x.dtype, recompute, pool_cf and pool is not None
        ctx.set_materialize_grads(False)       # an unused final state needs no zero gradient tensor
        if need_grad:
            plif = spec.kind == "plif"
            if recompute:
                ctx.save_for_backward(None, None, x, v0, w)
            else:
                ctx.save_for_backward(hs, bits, x if plif else None, v0 if plif else None, w)
        ctx.out_meta = (tuple(out.shape), out.stride())
        return out, v

    @staticmethod
    def backward(ctx: Any, g_out: Optional[torch.Tensor], g_v_last: Optional[torch.Tensor]):
        hs, bits, x, v0, w = ctx.saved_tensors
        spec, K, pool = ctx.spec, ctx.K, ctx.pool
        lib = _kernels(spec, ctx.x_dtype, pool)
        rerun = None
        if ctx.recompute and can_rerun(spec, None):
            rerun = (x, x if ctx.broadcast else x[0], ctx.broadcast, v0, None)
        elif ctx.recompute:
            x_step = x if ctx.broadcast else x[0]
            _, _, hs, bits = _forward_kernel(lib, spec, x, x_step, ctx.broadcast, K, v0, w, pool, True,
                                             None, want_out=False)
        elif hs.dtype != ctx.x_dtype:
            full = _steps_like(hs[0], K, dtype=ctx.x_dtype)
            full.copy_(hs)
            hs = full
        g_x, g_v0, gk_part = _scan_grads(lib, spec, K, pool, ctx.pool_cf, ctx.broadcast, ctx.x_dtype, ctx.out_meta,
                                         None if rerun else hs, None if rerun else bits, g_out, g_v_last, x, v0, w,
                                         rerun=rerun)
        plif = spec.kind == "plif"
        g_w = None
        if plif and w is not None and ctx.needs_input_grad[10]:
            k = w.detach().sigmoid()
            g_w = (gk_part.sum().to(w.dtype) * k * (1.0 - k)).reshape(w.shape)
        return None, None, None, None, None, None, None, None, g_x, g_v0 if ctx.needs_input_grad[9] else None, g_w


def c_scan(spec: NeuronSpec, x: torch.Tensor, K: int, broadcast: bool, v0: Optional[torch.Tensor],
           w: Optional[torch.Tensor] = None, pool: Optional[int] = None,
           h_dtype: Optional[torch.dtype] = None, recompute: bool = False,
           pool_cf: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Spikes ``[K, *S]`` (or, with ``pool=k``, their k x k max-pool ``[K, N, C, H/k, W/k]``) and the final
    V of an IF/LIF/PLIF layer (``supports`` must hold). ``v0`` None: the reset state. ``recompute``: keep
    only the input and initial V for backward (``memory="min"``). ``pool_cf``: the pooled output in
    channels-first order even for a channels-last input (what a following flatten reads without a copy)."""
    need_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, v0, w))
    return _CScan.apply(spec, broadcast, K, need_grad, h_dtype, recompute, pool, pool_cf, x, v0, w)


class _CBNScan(torch.autograd.Function):
    """Training BatchNorm + IF/LIF scan (+ max-pool epilogue) over K steps, fused.

    Step mode's BatchNorm: step t normalized with its own batch statistics. Forward computes the K steps'
    statistics (eager's values bit for bit, ``batchnorm.step_statistics``, which also updates ``bn``'s
    running statistics K times), then the scan kernel applies each step's ``x * alpha + beta`` to its input
    as it reads it, so the normalized tensor never exists. Kept for backward: the input (BatchNorm's backward needs it, as in
    eager), the per-step mean and inverse std, H and the spike bits. Backward: the scan kernel gives the
    gradient of the normalized input, then eager's BatchNorm backward per step (``batchnorm.step_backward``).
    """

    @staticmethod
    def forward(ctx: Any, spec: NeuronSpec, K: int, need_grad: bool, pool: Optional[int], pool_cf: bool,
                eps: float, recompute: bool, broadcast: bool, bn: Any, x: torch.Tensor, v0: Optional[torch.Tensor],
                weight: Optional[torch.Tensor], bias: Optional[torch.Tensor]):
        x_step = x if broadcast else x[0]
        if not (x_step.is_contiguous() or _channels_last(x_step)):
            x = x.contiguous()
            x_step = x if broadcast else x[0]
        v0 = None if v0 is None else _dense_like(v0, x_step)
        # [K, C]; updates bn's running stats K times (a broadcast input: the same statistics K times, as K
        # eager calls on it compute)
        mean, _, invstd = step_statistics(x.unsqueeze(0).expand(K, *x.shape) if broadcast else x, eps, bn)
        alpha = invstd if weight is None else invstd * weight.detach()
        beta = -mean * alpha if bias is None else bias.detach() - mean * alpha
        alpha, beta = alpha.to(x.dtype).contiguous(), beta.to(x.dtype).contiguous()
        lib = _kernels(spec, x.dtype, pool)
        out, v, hs, bits = _forward_kernel(lib, spec, x, x_step, broadcast, K, v0, None, pool,
                                           need_grad and not recompute, None,
                                           pool_cf=pool_cf and pool is not None, bn=(alpha, beta))
        ctx.spec, ctx.K, ctx.pool, ctx.pool_cf, ctx.x_dtype = spec, K, pool, pool_cf and pool is not None, x.dtype
        ctx.broadcast = broadcast
        ctx.out_meta = (tuple(out.shape), out.stride())
        ctx.has_bias = bias is not None
        ctx.recompute, ctx.eps = recompute, eps
        ctx.set_materialize_grads(False)
        if need_grad:
            if recompute:    # backward reruns the kernel with the same per-step (alpha, beta): the same H
                ctx.save_for_backward(alpha, beta, x, v0, mean, invstd, weight)
            else:
                ctx.save_for_backward(hs, bits, x, v0, mean, invstd, weight)
        return out, v

    @staticmethod
    def backward(ctx: Any, g_out: Optional[torch.Tensor], g_v_last: Optional[torch.Tensor]):
        hs, bits, x, v0, mean, invstd, weight = ctx.saved_tensors
        lib = _kernels(ctx.spec, ctx.x_dtype, ctx.pool)
        b = ctx.broadcast
        x_step = x if b else x[0]
        rerun = None
        if ctx.recompute and can_rerun(ctx.spec, None):     # (alpha, beta) are saved in hs/bits' place
            rerun, hs, bits = (x, x_step, b, v0, (hs, bits)), None, None
        elif ctx.recompute:
            _, _, hs, bits = _forward_kernel(lib, ctx.spec, x, x_step, b, ctx.K, v0, None, ctx.pool, True,
                                             None, want_out=False, bn=(hs, bits))
        # broadcast: the normalized input's gradient summed over the K steps, which all had the same input
        # and statistics, so one BatchNorm backward of the sum is the sum of the K backwards (it is linear
        # in the output gradient)
        g_y, g_v0, _ = _scan_grads(lib, ctx.spec, ctx.K, ctx.pool, ctx.pool_cf, b, ctx.x_dtype, ctx.out_meta,
                                   hs, bits, g_out, g_v_last, None, v0, None, rerun=rerun)
        mask = (ctx.needs_input_grad[9], ctx.needs_input_grad[11], ctx.has_bias and ctx.needs_input_grad[12])
        # g_y is this backward's own buffer: the input gradient may be written over it
        if b:
            g_x, g_w, g_b = step_backward(g_y.unsqueeze(0), x.unsqueeze(0), weight, mean[:1], invstd[:1], ctx.eps,
                                          mask, gy_scratch=True)
            g_x = None if g_x is None else g_x[0]
        else:
            g_x, g_w, g_b = step_backward(g_y, x, weight, mean, invstd, ctx.eps, mask, gy_scratch=True)
        return (None, None, None, None, None, None, None, None, None, g_x,
                g_v0 if ctx.needs_input_grad[10] else None, g_w, g_b)


def c_bn_scan(spec: NeuronSpec, x: torch.Tensor, K: int, v0: Optional[torch.Tensor], bn: Any,
              pool: Optional[int] = None, pool_cf: bool = False,
              recompute: bool = False, broadcast: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """``neuron(batch_norm(x[t]))`` over K steps for a BatchNorm2d in training mode, fused (``_CBNScan``):
    spikes (or their max pool) and the final V; the running statistics are updated K times, in order.
    ``broadcast``: ``x`` is one step's tensor, the input of every step (a hoisted first layer's output)."""
    need_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                                for t in (x, v0, bn.weight, bn.bias))
    return _CBNScan.apply(spec, K, need_grad, pool, pool_cf, bn.eps, recompute, broadcast, bn, x, v0, bn.weight,
                          bn.bias)
