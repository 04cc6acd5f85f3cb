"""Compile (once per source, cached by CuPy) and launch the generated CUDA kernels on torch's stream.

The only module of snncc that imports cupy. Tensors are passed as raw device pointers; the launch goes on
``torch.cuda.current_stream()`` so it orders with the surrounding torch work without synchronizing.
"""
from __future__ import annotations

import hashlib
import threading
from typing import Any, Dict, Optional, Tuple

import cupy  # noqa: F401  (the only cupy import in snncc)
import numpy as np
import torch

from snncc.neurons import NeuronSpec
from .kernels import cuda_source

__all__ = ["cuda_scan"]

_THREADS = 256
_LOCK = threading.Lock()
_MODULES: Dict[str, Any] = {}
_STATE_DTYPE = {torch.float16: torch.float32, torch.bfloat16: torch.float32}


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


def _module(spec: NeuronSpec, dtype: torch.dtype, h_dtype: Optional[torch.dtype], pool: int) -> Any:
    src = cuda_source(spec, _dtype_name(dtype), None if h_dtype is None else _dtype_name(h_dtype), pool)
    key = hashlib.sha256(src.encode()).hexdigest()[:20]
    with _LOCK:
        if key not in _MODULES:
            _MODULES[key] = cupy.RawModule(code=src, options=("-std=c++17",))
        return _MODULES[key]


def _ptr(t: Optional[torch.Tensor]) -> np.uint64:
    return np.uint64(0 if t is None else t.data_ptr())


def _launch(mod: Any, name: str, n: int, *args: Any) -> None:
    fn = mod.get_function(f"snncc_{name}")
    stream = cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream)
    with stream:
        fn(((n + _THREADS - 1) // _THREADS,), (_THREADS,), args)


def _consts(spec: NeuronSpec, w: Optional[torch.Tensor]) -> Tuple[np.float64, ...]:
    kc = float(w.detach().sigmoid()) if w is not None else 0.0
    return (np.float64(spec.tau), np.float64(kc), np.float64(spec.v_threshold),
            np.float64(0.0 if spec.v_reset is None else spec.v_reset))


def _geometry(x_step: torch.Tensor, k: int) -> Tuple[int, int, int, int, int]:
    n, c, h, w = x_step.shape
    cl = not x_step.is_contiguous() and x_step.is_contiguous(memory_format=torch.channels_last)
    P, C = (n, c) if cl else (n * c, 1)
    return P, h, w, C, P * ((h + k - 1) // k) * ((w + k - 1) // k) * C


class _CudaScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, spec: NeuronSpec, broadcast: bool, K: int, need_grad: bool,
                h_dtype: Optional[torch.dtype], pool: Optional[int], x: torch.Tensor, v0: torch.Tensor,
                w: Optional[torch.Tensor]):
        x = x.contiguous() if not (x.is_contiguous() or (x.dim() == 4 and broadcast and
                                                          x.is_contiguous(memory_format=torch.channels_last))) else x
        x_step = x if broadcast else x[0]
        sdt = _STATE_DTYPE.get(x.dtype, x.dtype)
        v0_dtype = sdt if v0 is None else v0.dtype
        cl = x_step.dim() == 4 and not x_step.is_contiguous()
        if v0 is not None:           # None: the kernels start from the reset value
            v0 = v0.to(sdt).contiguous(memory_format=torch.channels_last) if cl else v0.to(sdt).contiguous()
        M = x_step.numel()
        words = (M + 31) // 32
        bits = torch.zeros(K * words, dtype=torch.int32, device=x.device) if need_grad else None
        hs = torch.empty((K,) + tuple(x_step.shape), dtype=h_dtype or sdt, device=x.device) if need_grad else None
        v = torch.empty(tuple(x_step.shape), dtype=sdt, device=x.device,
                        memory_format=torch.channels_last if cl else torch.contiguous_format)
        mod = _module(spec, x.dtype, h_dtype, pool or 2)
        consts = _consts(spec, w)
        xs_stride = np.int64(0 if broadcast else M)
        if pool is None:
            out = torch.empty((K,) + tuple(x_step.shape), dtype=x.dtype, device=x.device)
            _launch(mod, "scan_fwd", M, _ptr(x), xs_stride, _ptr(v0), _ptr(out), _ptr(bits), _ptr(hs), _ptr(v),
                    np.int64(K), np.int64(M), *consts)
        else:
            P, H, W, C, n_win = _geometry(x_step, pool)
            n, c = x_step.shape[:2]
            out = torch.empty((K, n, c, H // pool, W // pool), dtype=x.dtype, device=x.device)
            _launch(mod, "pool_fwd", n_win, _ptr(x), xs_stride, _ptr(v0), _ptr(out), _ptr(bits), _ptr(hs),
                    _ptr(v), np.int64(K), np.int64(P), np.int64(H), np.int64(W), np.int64(C), *consts)
        ctx.spec, ctx.broadcast, ctx.K, ctx.h_dtype, ctx.pool, ctx.x_dtype = spec, broadcast, K, h_dtype, pool, x.dtype
        ctx.v0_dtype = v0_dtype
        ctx.set_materialize_grads(False)
        if need_grad:
            plif = spec.kind == "plif"
            ctx.save_for_backward(hs, bits, x if plif else None, v0 if plif else None, w)
        return out, v

    @staticmethod
    def backward(ctx: Any, g_out: Optional[torch.Tensor], g_v_last: Optional[torch.Tensor]):
        hs, bits, x, v0, w = ctx.saved_tensors
        spec, K, pool = ctx.spec, ctx.K, ctx.pool
        h0 = hs[0]
        M = h0.numel()
        g_out = None if g_out is None else g_out.contiguous()
        g_v_last = None if g_v_last is None else g_v_last.to(h0.dtype if h0.dtype in (torch.float32, torch.float64)
                                                             else torch.float32).contiguous()
        g_x = torch.empty(tuple(h0.shape) if ctx.broadcast else tuple(hs.shape), dtype=ctx.x_dtype, device=h0.device)
        dsur = None
        if spec.surrogate.opaque:       # a user's surrogate: its derivative from its own backward
            from ..cpu import _user_derivative
            dsur = _user_derivative(spec, hs.to(_STATE_DTYPE.get(hs.dtype, hs.dtype))).contiguous()
        sdt = _STATE_DTYPE.get(ctx.x_dtype, ctx.x_dtype)
        g_v0 = torch.empty(tuple(h0.shape), dtype=sdt, device=h0.device)
        mod = _module(spec, ctx.x_dtype, ctx.h_dtype, pool or 2)
        consts = _consts(spec, w) + (np.float64(spec.surrogate.alpha),)
        plif = spec.kind == "plif"
        n = M if pool is None else _geometry(h0, pool)[4]
        gk = torch.zeros(n, dtype=torch.float64, device=h0.device) if plif else None
        extra = (_ptr(x), np.int64(0 if ctx.broadcast else M), _ptr(v0), _ptr(gk)) if plif else ()
        if pool is None:
            _launch(mod, "scan_bwd", M, _ptr(g_out), _ptr(hs), _ptr(dsur), _ptr(bits), _ptr(g_v_last), _ptr(g_x),
                    np.int32(ctx.broadcast), _ptr(g_v0), np.int64(K), np.int64(M), *consts, *extra)
        else:
            P, H, W, C, _ = _geometry(h0, pool)
            _launch(mod, "pool_bwd", n, _ptr(g_out), _ptr(hs), _ptr(dsur), _ptr(bits), _ptr(g_v_last), _ptr(g_x),
                    np.int32(ctx.broadcast), _ptr(g_v0), np.int64(K), np.int64(P), np.int64(H), np.int64(W),
                    np.int64(C), *consts, *extra)
        g_w = None
        if plif and w is not None and ctx.needs_input_grad[8]:
            k = w.detach().sigmoid()
            g_w = (gk.sum().to(w.dtype) * k * (1.0 - k)).reshape(w.shape)
        return None, None, None, None, None, None, g_x, g_v0.to(ctx.v0_dtype) if ctx.needs_input_grad[7] else None, g_w


def cuda_scan(spec: NeuronSpec, x: torch.Tensor, K: int, broadcast: bool, v0: Optional[torch.Tensor],
              w: Optional[torch.Tensor] = None, pool: Optional[int] = None,
              h_dtype: Optional[torch.dtype] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The CUDA counterpart of ``runtime.cpu.c_scan`` (same arguments and results)."""
    need_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, v0, w))
    return _CudaScan.apply(spec, broadcast, K, need_grad, h_dtype, pool, x, v0, w)
