"""A convolution and the k x k max pool after it as one op, whose backward works from the pooled gradient.

Why: behind a k x k, stride-k max pool only the element each window picked gets a gradient, so the
convolution's backward in eager (``aten.convolution_backward`` of a gradient that is (k*k-1)/(k*k) zeros)
does k*k times the needed work. snnTorch's conv nets (``Conv2d -> MaxPool2d -> Leaky``) spend most of their
training step there. ``_ConvPool`` keeps the input (as bits when it is spikes), the weight and one byte per
pooled element (the window position it came from), never the conv's full-size output, and computes the
input, weight and bias gradients from the pooled gradient (``cpu_source.conv_pool_source``).

Domain of the C kernels (``conv_pool_ok``): CPU, float32, 2-d conv with groups 1, dilation 1, zeros padding,
``kw * cin`` a multiple of 8. Elsewhere (another dtype or device, autocast) ``conv_maxpool`` runs the conv
and ``F.max_pool2d`` unfused: the same values, eager's backward. Forward values are exactly the unfused
pair's (the same conv path, then a max, which rounds nothing); gradients equal eager's to float rounding
(the sums run in another order than oneDNN's).
"""
from __future__ import annotations

import ctypes
import functools
from typing import Any, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import buffers
from .cbuild import _library, compiler_available
from .cpu_source import conv_pool_source
from .packed import spike_conv_forward, unpack_spikes, _weight_layout

__all__ = ["conv_maxpool", "conv_pool_ok"]


def _pair(v: Any) -> Tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def conv_pool_ok(m: nn.Conv2d, x: torch.Tensor, w: torch.Tensor) -> bool:
    """The fused op's C kernels can run this conv (module docstring)."""
    return (isinstance(m, nn.Conv2d) and x.dim() == 4 and x.device.type == "cpu" and x.dtype == torch.float32
            and w.dtype == torch.float32 and m.groups == 1 and _pair(m.dilation) == (1, 1)
            and m.padding_mode == "zeros" and not isinstance(m.padding, str)
            and (w.shape[3] * w.shape[1]) % 8 == 0 and not torch.is_autocast_enabled("cpu")
            and compiler_available())


@functools.lru_cache(maxsize=None)   # the source is generated and hashed once per argument, not per call
def _lib(ci: int, kh: int, kw: int, pk: int) -> Any:
    lib = _library(conv_pool_source(ci, kh, kw, pk))
    if not getattr(lib, "_snncc_typed", False):
        i64, ptr, cint = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
        lib.pool_sel.argtypes = [ptr, ptr, ptr] + [i64] * 4 + [cint]
        lib.pconv_gx.argtypes = [ptr] * 4 + [i64] * 7 + [cint]
        lib.pconv_gw.argtypes = [ptr] * 4 + [i64] * 7 + [cint]
        lib._snncc_typed = True
    return lib


def _padded(x: torch.Tensor, ph: int, pw: int) -> torch.Tensor:
    """``x`` [B, C, H, W] as a channels-last tensor zero-padded by (ph, pw): what the kernels read."""
    if ph == 0 and pw == 0 and x.is_contiguous(memory_format=torch.channels_last):
        return x
    b, c, h, w = x.shape
    out = buffers.empty((b, c, h + 2 * ph, w + 2 * pw), x.dtype, x.device, channels_last=True)
    if ph or pw:
        out.zero_()
    out[:, :, ph:ph + h, pw:pw + w].copy_(x)
    return out


class _ConvPool(torch.autograd.Function):
    """``max_pool2d(conv2d(x, w, b), k)`` with the backward from the pooled gradient (module docstring)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                stride: Tuple[int, int], padding: Tuple[int, int], k: int, spikes: bool) -> torch.Tensor:
        if spikes:
            y, bits, _ = spike_conv_forward(x, weight, bias, stride, padding, (1, 1), 1)
        else:
            y, bits = F.conv2d(x, weight, bias, stride, padding), None
        y = y.contiguous(memory_format=torch.channels_last)
        bsz, co, hc, wc = y.shape
        ho, wo = hc // k, wc // k
        out = buffers.empty((bsz, co, ho, wo), y.dtype, y.device, channels_last=True, own=True)
        sel = torch.empty((bsz, ho, wo, co), dtype=torch.uint8)
        cin, kh, kw = weight.shape[1:]
        _lib(cin, kh, kw, k).pool_sel(y.data_ptr(), out.data_ptr(), sel.data_ptr(), bsz, hc, wc, co,
                                      torch.get_num_threads())
        ctx.meta = (tuple(x.shape), x.stride(), x.dtype, bits is not None, bias is not None, stride, padding, k)
        if any(ctx.needs_input_grad[:3]):
            ctx.save_for_backward(bits if bits is not None else x, weight, sel)
        return out

    @staticmethod
    def backward(ctx: Any, gp: torch.Tensor):
        shape, strides, dtype, packed, has_bias, stride, padding, k = ctx.meta
        saved, weight, sel = ctx.saved_tensors
        gp = gp.contiguous(memory_format=torch.channels_last)
        bsz, co, ho, wo = gp.shape
        cin, kh, kw = weight.shape[1:]
        (sh, sw), (ph, pw) = stride, padding
        assert sh == sw, "conv_maxpool runs unequal strides unfused"
        lib = _lib(cin, kh, kw, k)
        nt = torch.get_num_threads()
        hp, wp = shape[2] + 2 * ph, shape[3] + 2 * pw
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            w_cl = _weight_layout(weight, "conv_pool")
            gxp = buffers.empty((bsz, cin, hp, wp), dtype, gp.device, channels_last=True)
            lib.pconv_gx(gp.data_ptr(), sel.data_ptr(), w_cl.data_ptr(), gxp.data_ptr(), bsz, hp, wp, ho, wo, co,
                         sh, nt)
            gx = gxp if (ph, pw) == (0, 0) else gxp[:, :, ph:ph + shape[2], pw:pw + shape[3]]
        if ctx.needs_input_grad[1]:
            x = unpack_spikes(saved, shape, strides, dtype) if packed else saved
            xp = _padded(x, ph, pw)
            g = torch.empty((co, kh, kw, cin), dtype=weight.dtype)
            lib.pconv_gw(gp.data_ptr(), sel.data_ptr(), xp.data_ptr(), g.data_ptr(), bsz, hp, wp, ho, wo, co, sh, nt)
            gw = g.permute(0, 3, 1, 2).contiguous()
        if has_bias and ctx.needs_input_grad[2]:
            gb = gp.sum((0, 2, 3))       # every pooled element's gradient reaches exactly one conv output
        return gx, gw, gb, None, None, None, None


def conv_maxpool(m: nn.Conv2d, x: torch.Tensor, k: int, weight: Optional[torch.Tensor] = None,
                 bias: Optional[torch.Tensor] = None, spikes: bool = False,
                 conv: Optional[Any] = None) -> torch.Tensor:
    """``max_pool2d(m(x), k)`` (kernel = stride = k) as one op with the pooled-gradient backward where
    ``conv_pool_ok``; else the conv (``conv(x)``, default ``m._conv_forward``) and ``F.max_pool2d``.
    ``spikes``: ``x`` is probably 0/1 (kept as bits for backward, the conv maybe computed from them)."""
    w = m.weight if weight is None else weight
    b = m.bias if weight is None else bias
    stride, padding = _pair(m.stride), _pair(m.padding)
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, w, b))
    if not grad or not conv_pool_ok(m, x, w) or stride[0] != stride[1]:
        y = conv(x) if conv is not None else m._conv_forward(x, w, b)
        return F.max_pool2d(y, k)
    return _ConvPool.apply(x, w, b, stride, padding, k, spikes)
