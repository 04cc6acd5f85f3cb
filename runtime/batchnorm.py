"""Training-mode BatchNorm over a chunk of K timesteps, with step mode's exact semantics.

Step mode calls BatchNorm once per timestep: each step is normalized with its own batch statistics, and the
running statistics are updated once per step (K updates, in time order). This does the same for a
``[K, N, C, ...]`` chunk: the statistics of every step, then one pass for the normalization, and a backward
that keeps only the input and the per-step mean and inverse std (what ``torch.batch_norm`` keeps), instead
of K separate module calls and autograd nodes.

NOTE: the per-step statistics are eager's bit for bit (its mean, its inverse std, its running-statistics
update): on CPU one C call for the K steps replaying ATen's algorithm (``cpu_source.bn_stats_source``,
checked against ATen before it is trusted), elsewhere ATen's ``batch_norm_update_stats`` per step. Both are
10-20x faster than reducing a channels-last ``[K, N, C, H, W]`` over ``(1, 3, 4)`` with ``var_mean``,
which was what snncc did before (7.9 ms vs 0.45 ms for the stats of 8 x 32 x 16 x 16 x 16; the C call:
0.34 ms). The backward is ATen's formula in C with double sums (``bn_backward_source``), equal to eager's
kernel to float rounding.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import ctypes
import functools

import torch
from torch import nn

from . import buffers, cbuild
from .cpu_source import bn_backward_source, bn_stats_source

__all__ = ["batch_norm_steps", "step_statistics", "step_backward", "update_running_stats"]


def _stat_dtype(x: torch.Tensor) -> torch.dtype:
    """float16/bfloat16 inputs (autocast) keep their statistics in float32, as eager's kernel does."""
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def _tracks(bn: Optional[nn.Module]) -> bool:
    return bn is not None and bool(bn.track_running_stats) and bn.running_mean is not None


def step_statistics(x: torch.Tensor, eps: float, bn: Optional[nn.Module] = None
                    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-step batch mean, biased variance and inverse std of ``x`` = ``[K, N, C, ...]``, each ``[K, C]``,
    as eager's training-mode ``batch_norm`` computes them, bit for bit. With ``bn`` (a module in training
    mode), its running statistics are updated K times in time order, as K module calls update them. One C
    call for the K steps where it replays ATen exactly (``_c_step_statistics``), else ATen per step.

    NOTE: the inverse std is ``1 / sqrt(var + eps)`` in double, rounded once to x's dtype: what the CPU
    kernel computes (``rsqrt`` in float32 differs from it in the last bit for some channels)."""
    fast = _c_step_statistics(x, eps, bn)
    if fast is not None:
        return fast
    return _aten_step_statistics(x, eps, bn)


def _aten_step_statistics(x: torch.Tensor, eps: float, bn: Optional[nn.Module]
                          ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``step_statistics`` by eager's own ATen call per step (every layout and dtype)."""
    K = x.shape[0]
    sdt = _stat_dtype(x)
    direct = _tracks(bn) and bn.running_mean.dtype == x.dtype and bn.running_var.dtype == x.dtype
    means, variances = [], []
    with torch.no_grad():
        for k in range(K):
            if direct:
                bn.num_batches_tracked.add_(1)
                f = (1.0 / float(bn.num_batches_tracked)) if bn.momentum is None else float(bn.momentum)
                m, v = torch.batch_norm_update_stats(x[k], bn.running_mean, bn.running_var, f)
            else:
                m, v = torch.batch_norm_update_stats(x[k], None, None, 0.0)
            means.append(m)
            variances.append(v)
        mean, var = torch.stack(means).to(sdt), torch.stack(variances).to(sdt)
        invstd = _inverse_std(var, eps).to(sdt)
    if _tracks(bn) and not direct:       # running statistics in another dtype (AMP): the general update
        update_running_stats(bn, mean, var, x[0].numel() // x.shape[2])
    return mean, var, invstd


def _stats_geometry(x: torch.Tensor) -> Optional[Tuple[int, int, int, int, bool]]:
    """(N, C, S, step stride, channels innermost) of ``x`` = [K, N, C, *spatial] where ``bn_stats_source``
    replays ATen's kernel: a CPU float32/float64 input whose steps are contiguous (NCHW; one element per
    plane counts as channels innermost, as in ATen) or 4-d channels-last; None elsewhere (ATen runs)."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64) or x.dim() < 3 or x.numel() == 0:
        return None
    step = x[0]
    n, c = step.shape[0], step.shape[1]
    s = step.numel() // (n * c)
    if step.is_contiguous():
        cl = s == 1
    elif step.dim() == 4 and step.is_contiguous(memory_format=torch.channels_last):
        cl = True
    else:
        return None
    if not cbuild.compiler_available():
        return None
    return n, c, s, x.stride(0), cl


@functools.lru_cache(maxsize=None)
def _stats_library(dtype: torch.dtype) -> Any:
    lib = cbuild._library(bn_stats_source(dtype))
    i64, ptr, cint, dbl = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_double
    lib.bn_stats.argtypes = [ptr, i64, cint, i64, i64, i64, i64, cint, i64, cint, dbl] + [ptr] * 7 + [cint]
    return lib


#: (dtype, layout, channels, rows, parts) -> the variance variant (0: multiply then add, 1: fused) that gave
#: ATen's statistics bit for bit on this geometry's first call, or None: they differed, ATen runs
_VERIFIED: Dict[Tuple[Any, ...], Optional[int]] = {}


def _run_c_stats(x: torch.Tensor, geometry: Tuple[int, int, int, int, bool], fma_var: int, eps: float,
                 factors: Optional[List[float]], rm: Optional[torch.Tensor], rv: Optional[torch.Tensor]
                 ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One ``bn_stats`` call; ``rm``/``rv`` (contiguous, x's dtype) are updated in place."""
    n, c, s, sk, cl = geometry
    K, nt = x.shape[0], torch.get_num_threads()
    parts = nt if nt > 1 and n * s > 1 else 1       # at::parallel_for's split of the rows (serial: one)
    out = torch.empty((3, K, c), dtype=x.dtype)
    buf = torch.empty((K * parts * c,), dtype=x.dtype)
    mom = torch.tensor(factors, dtype=torch.float64) if factors is not None else None
    _stats_library(x.dtype).bn_stats(
        x.data_ptr(), K, int(sk == 0), sk, n, c, s, int(cl), parts, fma_var, float(eps),
        None if mom is None else mom.data_ptr(), out[0].data_ptr(), out[1].data_ptr(), out[2].data_ptr(),
        None if rm is None else rm.data_ptr(), None if rv is None else rv.data_ptr(), buf.data_ptr(), nt)
    return out[0], out[1], out[2]


def _momenta(bn: Any, K: int) -> List[float]:
    """The K steps' running-average factors, as K training-mode module calls compute them (``momentum``,
    or with ``momentum=None`` the cumulative average ``1 / num_batches_tracked`` after each increment)."""
    if bn.momentum is not None:
        return [float(bn.momentum)] * K
    done = int(bn.num_batches_tracked)
    return [1.0 / float(done + k + 1) for k in range(K)]


def _c_step_statistics(x: torch.Tensor, eps: float, bn: Optional[nn.Module]
                       ) -> Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``step_statistics`` in one C call (``bn_stats_source``), or None where it does not apply.

    NOTE: trusted only once it has given ATen's results bit for bit. ``_variance_variant``'s probe picks
    the variance sum this torch build uses (or rules the layout out); then the first call per geometry runs
    both the C kernel (on copies of the running statistics) and ATen, returns ATen's result, and keeps the
    geometry on the C kernel only if all of it matched (mean, variance, inverse std, running statistics).
    The result is eager's either way."""
    geometry = _stats_geometry(x)
    if geometry is None:
        return None
    tracks = _tracks(bn)
    if tracks and not (bn.running_mean.dtype == x.dtype == bn.running_var.dtype
                       and bn.running_mean.is_contiguous() and bn.running_var.is_contiguous()):
        return None
    n, c, s, _, cl = geometry
    nt = torch.get_num_threads()
    key = (x.dtype, cl, c, n * s, nt if nt > 1 and n * s > 1 else 1)
    K = x.shape[0]
    if key in _VERIFIED:
        variant = _VERIFIED[key]
        if variant is None:
            return None
        with torch.no_grad():
            factors = _momenta(bn, K) if tracks else None
            stats = _run_c_stats(x, geometry, variant, eps, factors, bn.running_mean if tracks else None,
                                 bn.running_var if tracks else None)
            if tracks:
                bn.num_batches_tracked.add_(K)
        return stats
    variant = _variance_variant(x.dtype, cl)
    _VERIFIED[key] = None
    if variant is None:
        return None
    with torch.no_grad():
        rm = bn.running_mean.clone() if tracks else None
        rv = bn.running_var.clone() if tracks else None
        stats = _run_c_stats(x, geometry, variant, eps, _momenta(bn, K) if tracks else None, rm, rv)
    ref = _aten_step_statistics(x, eps, bn)
    same = all(torch.equal(a, b) for a, b in zip(stats, ref))
    if same and tracks:
        same = torch.equal(rm, bn.running_mean) and torch.equal(rv, bn.running_var)
    if same:
        _VERIFIED[key] = variant
    return ref


@functools.lru_cache(maxsize=None)
def _variance_variant(dtype: torch.dtype, cl: bool) -> Optional[int]:
    """Which variance sum (0: ``b + d * d``, 1: ``fma(d, d, b)``) reproduces this torch build's
    ``batch_norm_update_stats`` for a layout, found on random values (where the two differ), or None if
    neither does. Whether ATen's vector kernel was compiled with floating-point contraction is a property
    of the build, not of the data; real inputs (small integers, spikes) may not tell the two apart."""
    g = torch.Generator().manual_seed(0)
    # few rows per channel, many channels: each product's rounding shows in its channel's sum (over
    # thousands of rows the two variants often round to the same total)
    probes = [torch.randn(2, 512, 1, 3, generator=g, dtype=dtype) * 3 + 1,
              torch.randn(5, 24, 7, 9, generator=g, dtype=dtype) * 3 + 1]
    for variant in (0, 1):
        ok = True
        for x in probes:
            x = x.contiguous(memory_format=torch.channels_last) if cl else x
            steps = x.unsqueeze(0)
            geometry = _stats_geometry(steps)
            if geometry is None or geometry[4] != cl:
                return None
            ref_mean, ref_var = torch.batch_norm_update_stats(x, None, None, 0.0)
            mean, var, _ = _run_c_stats(steps, geometry, variant, 1e-5, None, None, None)
            ok = ok and torch.equal(mean[0], ref_mean) and torch.equal(var[0], ref_var)
        if ok:
            return variant
    return None


def _inverse_std(var: torch.Tensor, eps: float) -> torch.Tensor:
    """``1 / sqrt(var + eps)`` in double, correctly rounded, as ATen's scalar ``InvStd`` computes it.

    NOTE: on CPU by numpy (the hardware square root): torch's vectorized float64 ``sqrt`` is off by one
    ulp for some values, which made the saved inverse std of float64 layers differ from eager's in the last
    bit (found when the C statistics kernel, which uses ``sqrt``, disagreed with this path)."""
    v = var.double()
    if v.device.type == "cpu":
        import numpy as np
        return torch.from_numpy(1.0 / np.sqrt(v.numpy() + eps))
    return 1.0 / torch.sqrt(v + eps)


def update_running_stats(bn: Any, mean: torch.Tensor, var: torch.Tensor, n: int) -> None:
    """K running-statistics updates in time order from the steps' (mean, biased var), as K training-mode
    module calls make (used when the buffers' dtype differs from the input's)."""
    if not _tracks(bn):
        return
    with torch.no_grad():
        unbiased = var * (n / max(n - 1, 1))
        for t in range(mean.shape[0]):
            bn.num_batches_tracked.add_(1)
            m = (1.0 / float(bn.num_batches_tracked)) if bn.momentum is None else bn.momentum
            bn.running_mean.mul_(1 - m).add_(mean[t].to(bn.running_mean.dtype), alpha=m)
            bn.running_var.mul_(1 - m).add_(unbiased[t].to(bn.running_var.dtype), alpha=m)


def step_backward(gy: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor], mean: torch.Tensor,
                  invstd: torch.Tensor, eps: float, mask: Sequence[bool], gy_scratch: bool = False
                  ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Gradients of K training-mode batch norms (``x``, ``gy`` = ``[K, N, C, ...]``; per-step ``mean``,
    ``invstd`` ``[K, C]``) for (input, weight, bias) as ``mask`` asks: eager's backward kernel per step, the
    weight and bias gradients summed over the steps. ``gy_scratch``: the caller owns ``gy`` and does not
    read it again, so the C kernel may write the input gradient over it (no fresh buffer to fault in)."""
    want_x, want_w, want_b = bool(mask[0]), bool(mask[1]) and weight is not None, bool(mask[2])
    if x.dtype != mean.dtype:          # autocast: float16/bfloat16 activations, float32 statistics
        gx, gw, gb = step_backward(gy.float(), x.float(), None if weight is None else weight.float(), mean,
                                   invstd, eps, mask)
        return (None if gx is None else gx.to(x.dtype), None if gw is None else gw.to(weight.dtype),
                None if gb is None else gb)
    w = None if weight is None else weight.detach().to(x.dtype)
    gy = gy.to(x.dtype)
    geometry = _c_geometry(x)
    if geometry is not None:
        return _c_step_backward(gy, x, w, mean, invstd, geometry, want_x, want_w, want_b, gy_scratch)
    gx = torch.empty_like(x) if want_x else None
    gw: Optional[torch.Tensor] = None
    gb: Optional[torch.Tensor] = None
    for k in range(x.shape[0]):
        a, b, c = torch.ops.aten.native_batch_norm_backward(gy[k], x[k], w, None, None, mean[k], invstd[k], True,
                                                            eps, [want_x, want_w, want_b])
        if want_x:
            gx[k].copy_(a)
        if want_w:
            gw = b if gw is None else gw + b
        if want_b:
            gb = c if gb is None else gb + c
    return gx, gw, gb


def _dense(x: torch.Tensor) -> bool:
    """Whether ``x``'s elements fill its storage span exactly once in some dimension order (no gaps, no
    overlaps): then ``empty_like(x)`` has x's strides, which the C kernel writes the gradient at."""
    expected = 1
    for n, st in sorted(((n, st) for n, st in zip(x.shape, x.stride()) if n != 1), key=lambda d: d[1]):
        if st != expected:
            return False
        expected *= n
    return True


def _c_geometry(x: torch.Tensor) -> Optional[Tuple[int, ...]]:
    """(N, C, S, sk, sn, sc, ss) of ``x`` = [K, N, C, *spatial] as ``bn_backward_source`` reads it (the
    spatial dims collapsed into one of S elements at stride ss), or None where the C kernel does not apply:
    not a CPU float32/float64 tensor, no C compiler, or a layout with neither the channels nor the spatial
    elements contiguous."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64) or x.dim() < 3:
        return None
    if not _dense(x) or not cbuild.compiler_available():
        return None
    sizes, strides = x.shape[3:], x.stride()[3:]
    S, ss = 1, 1
    dims = [(n, st) for n, st in zip(sizes, strides) if n != 1]
    for i, (n, st) in enumerate(dims):
        if i + 1 < len(dims) and st != dims[i + 1][1] * dims[i + 1][0]:
            return None                    # the spatial dims do not collapse into one stride
        S *= n
    if dims:
        ss = dims[-1][1]
    sc = x.stride(2) if x.shape[2] != 1 else 1
    if sc != 1 and ss != 1:
        return None
    return (x.shape[1], x.shape[2], S, x.stride(0), x.stride(1), sc, ss)


@functools.lru_cache(maxsize=None)   # the source is generated and hashed once per argument, not per call
def _bn_library(dtype: torch.dtype) -> Any:
    lib = cbuild._library(bn_backward_source(dtype))
    if not getattr(lib, "_snncc_typed", False):
        i64, ptr, cint = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
        lib.bn_bwd.argtypes = [ptr] * 10 + [i64] * 8 + [cint]
        lib._snncc_typed = True
    return lib


def _c_step_backward(gy: torch.Tensor, x: torch.Tensor, w: Optional[torch.Tensor], mean: torch.Tensor,
                     invstd: torch.Tensor, geometry: Tuple[int, ...], want_x: bool, want_w: bool, want_b: bool,
                     gy_scratch: bool = False
                     ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``step_backward`` by the C kernel (``_c_geometry`` holds): one call for the K steps.

    NOTE: the input gradient is written over ``gy`` when the caller gives it up (``gy_scratch``; the kernel
    reads each element of a step before writing it), else into a pooled buffer: a fresh 2-4 MiB tensor per
    layer and step was page-faulted in every call."""
    if gy.stride() != x.stride():
        gy = buffers.empty_strided(x.shape, x.stride(), x.dtype, x.device).copy_(gy)
        gy_scratch = True
    K, C = x.shape[0], x.shape[2]
    gx = None
    if want_x:
        gx = gy if gy_scratch else buffers.empty_strided(x.shape, x.stride(), x.dtype, x.device)
    # NOTE: the kernel sums the parameter gradients over the steps itself: the torch ops that did it cost
    # ~10-15 us each inside a training step. They are tensors of their own (autograd may keep them as
    # .grad), the per-step sums one scratch tensor.
    sums = torch.empty((2 * K * C,), dtype=torch.float64)
    gw = torch.empty((C,), dtype=x.dtype) if want_w else None
    gb = torch.empty((C,), dtype=x.dtype) if want_b else None
    mean_ = mean if mean.dtype == x.dtype and mean.is_contiguous() else mean.to(x.dtype).contiguous()
    invstd_ = invstd if invstd.dtype == x.dtype and invstd.is_contiguous() else invstd.to(x.dtype).contiguous()
    wc = None if w is None else w.contiguous()
    base = sums.data_ptr()
    _bn_library(x.dtype).bn_bwd(gy.data_ptr(), x.data_ptr(), mean_.data_ptr(), invstd_.data_ptr(),
                                None if wc is None else wc.data_ptr(), None if gx is None else gx.data_ptr(),
                                base, base + 8 * K * C, None if gw is None else gw.data_ptr(),
                                None if gb is None else gb.data_ptr(), K, *geometry, torch.get_num_threads())
    return gx, gw, gb


def _bshape(x: torch.Tensor) -> Tuple[int, ...]:
    """Shape that broadcasts a per-(step, channel) value over ``x`` = [K, N, C, ...]."""
    return (x.shape[0], 1, x.shape[2]) + (1,) * (x.dim() - 3)


class _BatchNormSteps(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                eps: float, bn: Optional[nn.Module]) -> torch.Tensor:
        mean, _var, invstd = step_statistics(x, eps, bn)
        # the form torch's CPU batch_norm computes: x * alpha + beta with alpha = invstd * w
        alpha = invstd if weight is None else invstd * weight.detach()
        beta = -mean * alpha if bias is None else bias.detach() - mean * alpha
        y = torch.addcmul(beta.view(_bshape(x)), x, alpha.view(_bshape(x))).to(x.dtype)
        ctx.save_for_backward(x, mean, invstd, weight)
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor):
        x, mean, invstd, weight = ctx.saved_tensors
        gx, gw, gb = step_backward(gy, x, weight, mean, invstd, ctx.eps, ctx.needs_input_grad[:3])
        return gx, gw, gb, None, None


def batch_norm_steps(x: torch.Tensor, bn: nn.modules.batchnorm._BatchNorm) -> torch.Tensor:
    """``torch.stack([bn(x[t]) for t in range(K)])`` for a module in training mode, as one op."""
    return _BatchNormSteps.apply(x, bn.weight, bn.bias, bn.eps, bn)
