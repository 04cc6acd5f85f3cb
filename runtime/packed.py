"""Convolutions and linear layers that keep their spike input for backward as bits (1 per element).

A conv/linear needs its input only for the weight gradient. When that input is spikes (0/1), keeping it as
floats costs 32x what it carries: these autograd Functions run the op forward, keep the input packed
(``ctx.save_for_backward``, so saved-tensor hooks see it) and unpack it in backward for
``aten.convolution_backward`` / the matmuls. Packing checks every value; if one is not 0 or 1 the dense
input is kept instead, so the result is exact either way.
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = ["pack_spikes", "unpack_spikes", "packed_conv", "packed_linear"]

def _bit_weights(device: torch.device) -> torch.Tensor:
    return torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=device)


def _dense(x: torch.Tensor) -> bool:
    return x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))


def _c_bits(x: torch.Tensor) -> bool:
    from . import cpu
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and cpu.compiler_available()


def pack_spikes(x: torch.Tensor) -> Optional[torch.Tensor]:
    """``x``'s values in memory order, 8 per byte; None when ``x`` is not all 0/1 or not dense."""
    if not _dense(x):
        return None
    if _c_bits(x):                    # one pass: pack and check together
        from . import cpu
        out = torch.empty((x.numel() + 7) // 8, dtype=torch.uint8)
        ok = cpu.bits_library(x.dtype).pack_check(x.data_ptr(), x.numel(), out.data_ptr(), torch.get_num_threads())
        return out if ok else None
    flat = x.permute(0, 2, 3, 1).reshape(-1) if not x.is_contiguous() else x.reshape(-1)
    if not bool(((flat == 0) | (flat == 1)).all()):     # a value other than 0 or 1: keep the dense input
        return None
    b = flat.to(torch.uint8)
    n = b.numel()
    pad = (-n) % 8
    if pad:
        b = torch.cat([b, b.new_zeros(pad)])
    return (b.view(-1, 8) * _bit_weights(x.device)).sum(1, dtype=torch.uint8)


def unpack_spikes(bits: torch.Tensor, shape: Tuple[int, ...], stride: Tuple[int, ...],
                  dtype: torch.dtype) -> torch.Tensor:
    """The tensor ``pack_spikes`` packed, with its shape, strides and dtype."""
    n = 1
    for s in shape:
        n *= s
    out = torch.empty_strided(shape, stride, dtype=dtype, device=bits.device)
    if _c_bits(out):
        from . import cpu
        cpu.bits_library(dtype).unpack(bits.data_ptr(), n, out.data_ptr(), torch.get_num_threads())
        return out
    vals = bits.unsqueeze(1).bitwise_and(_bit_weights(bits.device)).ne(0).view(-1)[:n]
    if out.is_contiguous():
        out.view(-1).copy_(vals)
    else:       # channels-last: memory order is N, H, W, C
        out.permute(0, 2, 3, 1).copy_(vals.view(shape[0], shape[2], shape[3], shape[1]))
    return out


class _PackedConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                stride: Tuple[int, ...], padding: Any, dilation: Tuple[int, ...], groups: int) -> torch.Tensor:
        nd = x.dim() - 2
        fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[nd]
        y = fn(x, weight, bias, stride, padding, dilation, groups)
        bits = pack_spikes(x) if ctx.needs_input_grad[1] else None
        ctx.meta = (tuple(x.shape), x.stride(), x.dtype, bits is not None, bias is not None,
                    stride, padding, dilation, groups)
        ctx.save_for_backward(bits if bits is not None else x, weight)
        return y

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor):
        shape, strides, dtype, packed, has_bias, stride, padding, dilation, groups = ctx.meta
        saved, weight = ctx.saved_tensors
        x = unpack_spikes(saved, shape, strides, dtype) if packed else saved
        if isinstance(padding, str):      # 'same' / 'valid': as numbers for convolution_backward
            k = weight.shape[2:]
            padding = tuple(0 for _ in k) if padding == "valid" else tuple(d * (s - 1) // 2 for s, d in zip(k, dilation))
        gx, gw, gb = torch.ops.aten.convolution_backward(
            gy, x, weight, [weight.shape[0]] if has_bias else None, list(stride), list(padding), list(dilation),
            False, [0] * len(stride), groups, [ctx.needs_input_grad[0], ctx.needs_input_grad[1], has_bias and ctx.needs_input_grad[2]])
        return gx, gw, gb, None, None, None, None


class _PackedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        y = F.linear(x, weight, bias)
        bits = pack_spikes(x) if ctx.needs_input_grad[1] and x.is_contiguous() else None
        ctx.meta = (tuple(x.shape), x.stride(), x.dtype, bits is not None)
        ctx.save_for_backward(bits if bits is not None else x, weight)
        return y

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor):
        shape, strides, dtype, packed = ctx.meta
        saved, weight = ctx.saved_tensors
        x = unpack_spikes(saved, shape, strides, dtype) if packed else saved
        gx = gy.matmul(weight) if ctx.needs_input_grad[0] else None
        gw = gy.reshape(-1, gy.shape[-1]).t().matmul(x.reshape(-1, x.shape[-1])) if ctx.needs_input_grad[1] else None
        gb = gy.reshape(-1, gy.shape[-1]).sum(0) if ctx.needs_input_grad[2] else None
        return gx, gw, gb


def packed_conv(m: torch.nn.Module, x: torch.Tensor, weight: Optional[torch.Tensor] = None,
                bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``m(x)`` for a Conv1d/2d/3d (zeros padding), keeping a spike input as bits for backward."""
    w = m.weight if weight is None else weight
    b = m.bias if weight is None else bias
    return _PackedConv.apply(x, w, b, m.stride, m.padding, m.dilation, m.groups)


def packed_linear(m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``m(x)`` for a Linear, keeping a spike input as bits for backward."""
    return _PackedLinear.apply(x, m.weight, m.bias)
