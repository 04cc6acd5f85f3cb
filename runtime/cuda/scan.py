"""The CUDA neuron scan as an autograd Function, independent of how kernels are compiled and launched.

Why a separate module: ``launch.py`` is the only module that may import cupy, and code that imports cupy
cannot run (or be tested) on a machine without a GPU. Everything here -- which kernel gets which buffers,
in which dtype and memory layout, with which scalar arguments -- is plain torch + numpy and talks to the
device only through a :class:`Launcher`. ``launch.py`` supplies the CuPy launcher; the tests supply a
host emulator (``tests/cuda_emu``) that runs the very same generated CUDA C++ on CPU tensors, so this
argument marshalling is exercised in CI without a GPU.

Kernel arguments are numpy scalars of the exact C width (``np.uint64`` pointers, ``np.int64`` for
``long long``, ``np.int32`` for ``int``, ``np.float64`` for ``double``): CuPy packs each argument by its
numpy dtype, so a wrong width is a silent garbage argument on the GPU, not an error.
"""
from __future__ import annotations

import dataclasses
import threading
from typing import Any, Dict, Optional, Protocol, Tuple

import numpy as np
import torch

from snncc.neurons import NeuronSpec
from .kernels import cuda_source

__all__ = ["Launcher", "THREADS_PER_BLOCK", "cuda_scan", "kernel_source"]

#: threads per block of every launch (a multiple of the warp size: the spike bits are one word per warp)
THREADS_PER_BLOCK = 256
#: the kernels' name prefix (``<PREFIX>_scan_fwd`` ...)
PREFIX = "snncc"
_STATE_DTYPE = {torch.float16: torch.float32, torch.bfloat16: torch.float32}
_LOCK = threading.Lock()
_SOURCES: Dict[Any, str] = {}


class Launcher(Protocol):
    """How the generated source reaches a device: compile it once, launch its kernels.

    ``module(src)`` returns a handle for the compiled source (the launcher caches it); ``launch(handle,
    name, n_threads, *args)`` runs kernel ``name`` over ``n_threads`` threads (``ceil(n_threads /
    THREADS_PER_BLOCK)`` blocks of ``THREADS_PER_BLOCK``), in stream order with the surrounding torch work.
    """

    def module(self, src: str) -> Any: ...

    def launch(self, handle: Any, name: str, n_threads: int, *args: Any) -> None: ...


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


def kernel_source(spec: NeuronSpec, dtype: torch.dtype, h_dtype: Optional[torch.dtype], pool: int) -> str:
    """The CUDA source the scan compiles for these arguments (memoized: generating it costs more than a
    small layer's launch)."""
    key_spec = spec
    if spec.surrogate.opaque:       # the kernels read a user surrogate's derivative: one source for all
        key_spec = dataclasses.replace(spec, surrogate=dataclasses.replace(spec.surrogate, fn=None))
    key = (key_spec, dtype, h_dtype, pool)
    with _LOCK:
        src = _SOURCES.get(key)
        if src is None:
            src = _SOURCES[key] = cuda_source(spec, _dtype_name(dtype),
                                              None if h_dtype is None else _dtype_name(h_dtype), pool,
                                              prefix=PREFIX)
    return src


def _ptr(t: Optional[torch.Tensor]) -> np.uint64:
    return np.uint64(0 if t is None else t.data_ptr())


def _consts(spec: NeuronSpec, w: Optional[torch.Tensor]) -> Tuple[np.float64, ...]:
    """(tau, k, v_th, v_r) as the kernels take them; k = sigmoid(w) computed by torch, as the reference."""
    kc = float(w.detach().sigmoid()) if w is not None else 0.0
    return (np.float64(spec.tau), np.float64(kc), np.float64(spec.v_threshold),
            np.float64(0.0 if spec.v_reset is None else spec.v_reset))


def _channels_last(t: torch.Tensor) -> bool:
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def _steps(shape: Tuple[int, ...], K: int, dtype: torch.dtype, device: torch.device, cl: bool) -> torch.Tensor:
    """``[K, *shape]`` whose every step is laid out like the input's steps (channels-last stays so).

    The kernels index every per-neuron buffer (input, spikes, H, V, gradients) by the same flat memory
    index, so all of them must share the input step's memory order.
    """
    flat = torch.empty((K * shape[0],) + tuple(shape[1:]), dtype=dtype, device=device,
                       memory_format=torch.channels_last if cl else torch.contiguous_format)
    return flat.view((K,) + tuple(shape))


def _step(shape: Tuple[int, ...], dtype: torch.dtype, device: torch.device, cl: bool) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=device,
                       memory_format=torch.channels_last if cl else torch.contiguous_format)


def _layout(shape: Tuple[int, ...], stride: Tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A layout to convert to (a meta tensor: no memory)."""
    return torch.empty_strided(shape, stride, dtype=dtype, device="meta")


def _as(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` (broadcast to ``like``'s shape) with ``like``'s strides and dtype -- the layout a kernel indexes
    it by: a copy only when it differs. Incoming gradients often do: expanded (stride 0) from a ``sum()``,
    or NCHW for a channels-last layer."""
    if t.dtype == like.dtype and t.shape == like.shape and t.stride() == like.stride():
        return t
    out = torch.empty_strided(like.shape, like.stride(), dtype=like.dtype, device=t.device)
    out.copy_(t)
    return out


def _geometry(x_step: torch.Tensor, k: int, cl: bool) -> Tuple[int, int, int, int, int]:
    """(P, H, W, C, windows) of the pooled kernels: P planes of H rows of W*C elements (NCHW: P = N*C,
    C = 1; channels-last: P = N, C = channels), one thread per k x k window, partial ones included."""
    n, c, h, w = x_step.shape
    P, C = (n, c) if cl else (n * c, 1)
    return P, h, w, C, P * ((h + k - 1) // k) * ((w + k - 1) // k) * C


def _launch(launcher: Launcher, mod: Any, name: str, n: int, *args: Any) -> None:
    if n > 0:                   # a grid of 0 blocks is an invalid launch on CUDA (an empty batch: no work)
        launcher.launch(mod, f"{PREFIX}_{name}", n, *args)


class _CudaScan(torch.autograd.Function):
    """IF/LIF/PLIF scan over K steps with the generated CUDA kernels, optionally with a max-pool epilogue.

    Every per-neuron buffer is laid out like the input's steps (NCHW or channels-last), since the kernels
    walk them all by one flat index; half-precision inputs get float32 state (V, V0 and their gradients).
    Kept for backward: H per step (in ``h_dtype``) and the spikes as bits; PLIF also its input and V0.
    """

    @staticmethod
    def forward(ctx: Any, launcher: Launcher, spec: NeuronSpec, broadcast: bool, K: int, need_grad: bool,
                h_dtype: Optional[torch.dtype], pool: Optional[int], x: torch.Tensor, v0: Optional[torch.Tensor],
                w: Optional[torch.Tensor]):
        x_step = x if broadcast else x[0]
        M = x_step.numel()
        # the kernels read step t at x + t * M, each step dense (NCHW or channels-last)
        if not (x_step.is_contiguous() or _channels_last(x_step)) or (not broadcast and K > 1 and
                                                                       x.stride(0) != M):
            x = x.contiguous()
            x_step = x if broadcast else x[0]
        cl = _channels_last(x_step)
        shape, dev = tuple(x_step.shape), x.device
        sdt = _STATE_DTYPE.get(x.dtype, x.dtype)
        v0_dtype = sdt if v0 is None else v0.dtype
        v = _step(shape, sdt, dev, cl)
        if v0 is not None:           # None: the kernels start from the reset value
            v0 = _as(v0.detach(), v)
        words = (M + 31) // 32
        bits = torch.zeros(K * words, dtype=torch.int32, device=dev) if need_grad else None
        hs = _steps(shape, K, h_dtype or sdt, dev, cl) if need_grad else None
        mod = launcher.module(kernel_source(spec, x.dtype, h_dtype, pool or 2))
        consts = _consts(spec, w)
        xs_stride = np.int64(0 if broadcast else M)
        if pool is None:
            out = _steps(shape, K, x.dtype, dev, cl)
            _launch(launcher, mod, "scan_fwd", M, _ptr(x), xs_stride, _ptr(v0), _ptr(out), _ptr(bits), _ptr(hs),
                    _ptr(v), np.int64(K), np.int64(M), *consts)
            geometry = None
        else:
            geometry = _geometry(x_step, pool, cl)
            P, H, W, C, n_win = geometry
            out = _steps((shape[0], shape[1], H // pool, W // pool), K, x.dtype, dev, cl)
            _launch(launcher, mod, "pool_fwd", n_win, _ptr(x), xs_stride, _ptr(v0), _ptr(out), _ptr(bits),
                    _ptr(hs), _ptr(v), np.int64(K), np.int64(P), np.int64(H), np.int64(W), np.int64(C), *consts)
        ctx.launcher, ctx.geometry, ctx.cl = launcher, geometry, cl
        ctx.spec, ctx.broadcast, ctx.K, ctx.h_dtype, ctx.pool, ctx.x_dtype = spec, broadcast, K, h_dtype, pool, x.dtype
        ctx.v0_dtype = v0_dtype
        ctx.out_meta = (tuple(out.shape), out.stride())
        ctx.set_materialize_grads(False)
        if need_grad:
            plif = spec.kind == "plif"
            ctx.save_for_backward(hs, bits, x if plif else None, v0 if plif else None, w)
        return out, v

    @staticmethod
    def backward(ctx: Any, g_out: Optional[torch.Tensor], g_v_last: Optional[torch.Tensor]):
        hs, bits, x, v0, w = ctx.saved_tensors
        spec, K, pool, launcher, cl = ctx.spec, ctx.K, ctx.pool, ctx.launcher, ctx.cl
        shape, dev = tuple(hs.shape[1:]), hs.device
        M = hs[0].numel()
        sdt = _STATE_DTYPE.get(ctx.x_dtype, ctx.x_dtype)      # the kernels' T: V, its gradients, dsur
        g_v0 = _step(shape, sdt, dev, cl)
        if g_out is not None:
            g_out = _as(g_out, _layout(*ctx.out_meta, ctx.x_dtype))
        if g_v_last is not None:
            g_v_last = _as(g_v_last, g_v0)
        g_x = torch.empty_like(g_v0, dtype=ctx.x_dtype) if ctx.broadcast else _steps(shape, K, ctx.x_dtype, dev, cl)
        dsur = None
        if spec.surrogate.opaque:       # a user's surrogate: its derivative from its own backward
            from ..cpu import _user_derivative
            dsur = _as(_user_derivative(spec, hs.to(sdt)), _layout(tuple(hs.shape), hs.stride(), sdt))
        mod = launcher.module(kernel_source(spec, ctx.x_dtype, ctx.h_dtype, pool or 2))
        consts = _consts(spec, w) + (np.float64(spec.surrogate.alpha),)
        plif = spec.kind == "plif"
        n = M if pool is None else ctx.geometry[4]
        gk = torch.zeros(n, dtype=torch.float64, device=dev) if plif else None
        extra = (_ptr(x), np.int64(0 if ctx.broadcast else M), _ptr(v0), _ptr(gk)) if plif else ()
        if pool is None:
            _launch(launcher, mod, "scan_bwd", M, _ptr(g_out), _ptr(hs), _ptr(dsur), _ptr(bits), _ptr(g_v_last),
                    _ptr(g_x), np.int32(ctx.broadcast), _ptr(g_v0), np.int64(K), np.int64(M), *consts, *extra)
        else:
            P, H, W, C, _ = ctx.geometry
            _launch(launcher, mod, "pool_bwd", n, _ptr(g_out), _ptr(hs), _ptr(dsur), _ptr(bits), _ptr(g_v_last),
                    _ptr(g_x), np.int32(ctx.broadcast), _ptr(g_v0), np.int64(K), np.int64(P), np.int64(H),
                    np.int64(W), np.int64(C), *consts, *extra)
        g_w = None
        if plif and w is not None and ctx.needs_input_grad[9]:
            k = w.detach().sigmoid()
            g_w = (gk.sum().to(w.dtype) * k * (1.0 - k)).reshape(w.shape)
        return (None, None, None, None, None, None, None, g_x,
                g_v0.to(ctx.v0_dtype) if ctx.needs_input_grad[8] else None, g_w)


def cuda_scan(launcher: Launcher, spec: NeuronSpec, x: torch.Tensor, K: int, broadcast: bool,
              v0: Optional[torch.Tensor], w: Optional[torch.Tensor] = None, pool: Optional[int] = None,
              h_dtype: Optional[torch.dtype] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The CUDA counterpart of ``runtime.cpu.c_scan`` (same arguments and results) on ``launcher``."""
    need_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, v0, w))
    return _CudaScan.apply(launcher, spec, broadcast, K, need_grad, h_dtype, pool, x, v0, w)
