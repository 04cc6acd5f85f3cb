"""Training-mode BatchNorm over a chunk of K timesteps in one op, with step mode's exact semantics.

Step mode calls BatchNorm once per timestep: each step is normalized with its own batch statistics, and the
running statistics are updated once per step (K updates, in time order). This does the same for a
``[K, N, C, ...]`` chunk with one pass for the statistics of every step, one for the normalization, and a
hand-written backward that keeps only the input and the per-step mean and inverse std (what
``torch.batch_norm`` keeps), instead of K separate module calls and autograd nodes.
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
from torch import nn

from .cpu import update_running_stats

__all__ = ["batch_norm_steps"]


def _bshape(x: torch.Tensor) -> Tuple[int, ...]:
    """Shape that broadcasts a per-(step, channel) value over ``x`` = [K, N, C, ...]."""
    return (x.shape[0], 1, x.shape[2]) + (1,) * (x.dim() - 3)


class _BatchNormSteps(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                eps: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        dims = (1,) + tuple(range(3, x.dim()))
        var, mean = torch.var_mean(x, dim=dims, unbiased=False, keepdim=True)
        invstd = torch.rsqrt(var + eps)
        # the form torch's CPU batch_norm computes: x * alpha + beta with alpha = invstd * w
        alpha = invstd if weight is None else invstd * weight.view(1, 1, -1, *([1] * (x.dim() - 3)))
        beta = -mean * alpha
        if bias is not None:
            beta = beta + bias.view(1, 1, -1, *([1] * (x.dim() - 3)))
        y = torch.addcmul(beta, x, alpha)
        ctx.save_for_backward(x, mean, invstd, weight)
        ctx.has_bias = bias is not None
        return y, mean.view(x.shape[0], -1), var.view(x.shape[0], -1)

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor, _gm: Any, _gv: Any):
        x, mean, invstd, weight = ctx.saved_tensors
        dims = (1,) + tuple(range(3, x.dim()))
        n = x.numel() // (x.shape[0] * x.shape[2])
        xhat = (x - mean) * invstd
        g_sum = gy.sum(dims, keepdim=True)
        g_dot = (gy * xhat).sum(dims, keepdim=True)
        scale = invstd if weight is None else invstd * weight.view(1, 1, -1, *([1] * (x.dim() - 3)))
        gx = None
        if ctx.needs_input_grad[0]:
            gx = (gy - g_sum / n - xhat * (g_dot / n)) * scale
        gw = g_dot.sum(0).view(-1) if weight is not None and ctx.needs_input_grad[1] else None
        gb = g_sum.sum(0).view(-1) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb, None


def batch_norm_steps(x: torch.Tensor, bn: nn.modules.batchnorm._BatchNorm) -> torch.Tensor:
    """``torch.stack([bn(x[t]) for t in range(K)])`` for a module in training mode, as one op."""
    y, mean, var = _BatchNormSteps.apply(x, bn.weight, bn.bias, bn.eps)
    update_running_stats(bn, mean, var, x.numel() // (x.shape[0] * x.shape[2]))
    return y
