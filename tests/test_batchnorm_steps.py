"""Training BatchNorm over K steps (``runtime/batchnorm.py``) against K eager module calls.

The statistics and running statistics are eager's to the bit, by the C kernel replaying ATen's algorithm
or by ATen itself (regression: the statistics were a ``var_mean`` over a channels-last 5-d tensor, 10-20x
slower and off in the last bit); the gradients equal eager's to float rounding.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from snncc.runtime import batchnorm
from snncc.runtime.batchnorm import batch_norm_steps, step_statistics


def _eager(bn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return torch.stack([bn(x[k]) for k in range(x.shape[0])])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["2d", "2d-channels-last", "1d", "1d-tokens"])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_batch_norm_steps_is_eager(dtype, layout, momentum):
    torch.manual_seed(0)
    K = 5
    if layout.startswith("2d"):
        bn = nn.BatchNorm2d(6, momentum=momentum)
        x = torch.randn(K * 4, 6, 7, 5, dtype=dtype) * 3 + 1
        if layout == "2d-channels-last":
            x = x.to(memory_format=torch.channels_last)
        x = x.view(K, 4, 6, 7, 5)
    else:
        bn = nn.BatchNorm1d(6, momentum=momentum)
        x = torch.randn(K, 8, 6, 3, dtype=dtype) if layout == "1d-tokens" else torch.randn(K, 16, 6, dtype=dtype)
        x = x * 2 - 0.5
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    bn = bn.to(dtype).train()
    ref = copy.deepcopy(bn)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = batch_norm_steps(xa, bn), _eager(ref, xb)
    torch.testing.assert_close(ya, yb, rtol=0, atol=1e-6 if dtype == torch.float32 else 1e-14)
    assert torch.equal(bn.running_mean, ref.running_mean)
    assert torch.equal(bn.running_var, ref.running_var)
    assert int(bn.num_batches_tracked) == int(ref.num_batches_tracked) == K
    g = torch.randn_like(ya)
    ga = torch.autograd.grad((ya * g).sum(), [xa, bn.weight, bn.bias])
    gb = torch.autograd.grad((yb * g).sum(), [xb, ref.weight, ref.bias])
    # NOTE: the input gradient was eager's kernel step by step (bit-identical) before the C kernel
    # (``bn_backward_source``): now ATen's formula with double sums, equal to float rounding
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 if dtype == torch.float32 else 1e-12)


def _stats_input(layout: str, dtype: torch.dtype, K: int, seed: int) -> torch.Tensor:
    """[K, N, C, ...] inputs in the layouts the statistics kernel replays ATen on."""
    g = torch.Generator().manual_seed(seed)
    if layout in ("channels-last", "broadcast"):
        x = (torch.randn(K * 8, 16, 6, 5, generator=g, dtype=dtype) * 2 + 3).to(memory_format=torch.channels_last)
        x = x.view(K, 8, 16, 6, 5)
        return x[:1].expand(K, *x.shape[1:]) if layout == "broadcast" else x   # stride 0: one step for all
    if layout == "nchw":
        return torch.randn(K, 8, 16, 6, 5, generator=g, dtype=dtype) * 2 + 3
    if layout == "1d":                                  # [N, C]: one element per plane
        return torch.randn(K, 24, 16, generator=g, dtype=dtype) * 2 + 3
    return torch.randn(K, 8, 16, 11, generator=g, dtype=dtype) * 2 + 3      # "1d-tokens": [N, C, L]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["channels-last", "nchw", "1d", "1d-tokens", "broadcast"])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_step_statistics_are_eagers_saved_mean_invstd_and_running_stats(dtype, layout, momentum, monkeypatch):
    """Bit for bit eager's: each step's saved mean and inverse std (``native_batch_norm``), the running
    statistics and ``num_batches_tracked`` after K training-mode module calls.

    The first call per geometry checks the C kernel against ATen and returns ATen's result; the second
    runs the C kernel alone, and it must be in use here (this torch build is the one it replays: a
    kernel that drifted from ATen would silently fall back, which this assertion catches).
    Regression: in float64 the inverse std by torch's vectorized ``sqrt`` was off by one ulp for some
    channels."""
    if not batchnorm.cbuild.compiler_available():
        pytest.skip("no C compiler")
    monkeypatch.setattr(batchnorm, "_VERIFIED", {})
    K, eps = 4, 1e-5
    C = 16
    bn = (nn.BatchNorm2d(C, momentum=momentum) if layout in ("channels-last", "broadcast", "nchw")
          else nn.BatchNorm1d(C, momentum=momentum)).to(dtype).train()
    ref = copy.deepcopy(bn)
    w, b = torch.ones(C, dtype=dtype), torch.zeros(C, dtype=dtype)
    for seed in (1, 2):
        x = _stats_input(layout, dtype, K, seed)
        mean, var, invstd = step_statistics(x, eps, bn)
        with torch.no_grad():
            for k in range(K):
                ref(x[k])
                _, sm, si = torch.native_batch_norm(x[k], w, b, None, None, True, 0.1, eps)
                assert torch.equal(mean[k], sm) and torch.equal(invstd[k], si), (seed, k)
                assert torch.equal(var[k], torch.batch_norm_update_stats(x[k], None, None, 0.0)[1])
        assert torch.equal(bn.running_mean, ref.running_mean) and torch.equal(bn.running_var, ref.running_var)
        assert int(bn.num_batches_tracked) == int(ref.num_batches_tracked) == K * seed
    planes = layout in ("nchw", "1d-tokens")
    used = list(batchnorm._VERIFIED.values())
    assert len(used) == 1
    if dtype == torch.float64 and planes:
        # this torch build sums float64 NCHW variances in another order than the one replayed: the probe
        # keeps that case on ATen (the values above are eager's either way)
        assert used[0] == batchnorm._variance_variant(dtype, False)
    else:
        assert used[0] is not None and used[0] == batchnorm._variance_variant(dtype, not planes)


@pytest.mark.parametrize("threads", [1, 3])
def test_step_statistics_follow_atens_split_of_the_rows_for_any_thread_count(threads, monkeypatch):
    """ATen sums the rows of a channels-last step in one chunk per thread (serially with one thread); the
    C kernel replays the same split for the thread count torch has, and is exact and in use for each."""
    if not batchnorm.cbuild.compiler_available():
        pytest.skip("no C compiler")
    monkeypatch.setattr(batchnorm, "_VERIFIED", {})
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for seed in (1, 2):
            x = _stats_input("channels-last", torch.float32, 3, seed)
            mean, var, invstd = step_statistics(x, 1e-5)
            for k in range(3):
                _, sm, si = torch.native_batch_norm(x[k], None, None, None, None, True, 0.1, 1e-5)
                assert torch.equal(mean[k], sm) and torch.equal(invstd[k], si), (threads, seed, k)
    finally:
        torch.set_num_threads(before)
    (key, variant), = batchnorm._VERIFIED.items()
    assert key[-1] == (threads if threads > 1 else 1) and variant is not None


def test_step_statistics_stay_on_aten_where_the_c_kernel_disagrees(monkeypatch):
    """A C result that differs from ATen's on a geometry's first call (another torch build) puts that
    geometry on ATen for good: every call's statistics are still eager's."""
    if not batchnorm.cbuild.compiler_available():
        pytest.skip("no C compiler")
    monkeypatch.setattr(batchnorm, "_VERIFIED", {})
    real = batchnorm._run_c_stats
    calls = []

    def drifted(*a, **k):
        calls.append(1)
        mean, var, invstd = real(*a, **k)
        return mean + 1e-3, var, invstd
    monkeypatch.setattr(batchnorm, "_run_c_stats", drifted)
    bn = nn.BatchNorm2d(16).train()
    ref = copy.deepcopy(bn)
    for seed in (1, 2):
        x = _stats_input("channels-last", torch.float32, 3, seed)
        mean, _, invstd = step_statistics(x, 1e-5, bn)
        with torch.no_grad():
            for k in range(3):
                ref(x[k])
                _, sm, si = torch.native_batch_norm(x[k], None, None, None, None, True, 0.1, 1e-5)
                assert torch.equal(mean[k], sm) and torch.equal(invstd[k], si)
        assert torch.equal(bn.running_mean, ref.running_mean) and torch.equal(bn.running_var, ref.running_var)
    assert list(batchnorm._VERIFIED.values()) == [None] and len(calls) == 1     # not tried again


def test_pooled_empty_strided():
    """``buffers.empty_strided``: dense layouts come from the pool (the IR scans' outputs: a fresh
    16 MiB tensor page-faulted in on every call cost ~3 ms), other strides from torch."""
    from snncc.runtime import buffers
    t = buffers.empty_strided((3, 2, 4, 5, 6), (240, 120, 1, 24, 4), torch.float32, torch.device("cpu"))
    assert t.shape == (3, 2, 4, 5, 6) and t.stride() == (240, 120, 1, 24, 4)
    t.fill_(1.0)
    assert float(t.sum()) == 3 * 2 * 4 * 5 * 6
    gap = buffers.empty_strided((2, 3), (8, 2), torch.float32, torch.device("cpu"))
    assert gap.stride() == (8, 2)


def _aten_step_backward(gy, x, w, mean, invstd, eps, mask):
    """The reference: eager's kernel per step (what ``step_backward`` ran before its C kernel)."""
    gx, gw, gb = torch.empty_like(x), None, None
    for k in range(x.shape[0]):
        a, b, c = torch.ops.aten.native_batch_norm_backward(gy[k], x[k], w, None, None, mean[k], invstd[k], True,
                                                            eps, list(mask))
        if mask[0]:
            gx[k].copy_(a)
        gw = b if gw is None else gw + b
        gb = c if gb is None else gb + c
    return (gx if mask[0] else None, gw if mask[1] else None, gb if mask[2] else None)


def _bn_layouts():
    """[K, N, C, ...] inputs in the layouts the executor hands ``step_backward``."""
    K = 3
    return {
        "channels-last": torch.randn(K * 4, 16, 5, 7).to(memory_format=torch.channels_last).view(K, 4, 16, 5, 7),
        "nchw": torch.randn(K, 4, 16, 5, 7),
        "tokens-transposed": torch.randn(K, 4, 9, 16).transpose(2, 3),      # BatchNorm1d on x.transpose(1, 2)
        "tokens": torch.randn(K, 4, 16, 9),
        "flat": torch.randn(K, 10, 16),
        "single-pixel": torch.randn(K, 4, 16, 1, 1),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", list(_bn_layouts()))
@pytest.mark.parametrize("mask", [(True, True, True), (True, False, False), (False, True, True)])
def test_c_step_backward_equals_atens_kernel(dtype, layout, mask):
    """The C kernel for every layout it takes: ATen's gradients to float rounding, the input gradient at
    the input's strides (where the K-step tensor expects it)."""
    from snncc.runtime import batchnorm
    torch.manual_seed(2)
    x = (_bn_layouts()[layout] * 2 + 0.5).to(dtype)
    if not batchnorm.cbuild.compiler_available():
        pytest.skip("no C compiler")
    assert batchnorm._c_geometry(x) is not None, layout
    gy = torch.randn_like(x)
    w = torch.rand(x.shape[2], dtype=dtype) + 0.5
    mean, _, invstd = step_statistics(x, 1e-5)
    got = batchnorm.step_backward(gy, x, w, mean, invstd, 1e-5, mask)
    want = _aten_step_backward(gy, x, w, mean, invstd, 1e-5, mask)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-13)
    for a, b, on in zip(got, want, mask):
        assert (a is None) == (not on)
        if on:
            torch.testing.assert_close(a, b, **tol)
    if mask[0]:
        assert got[0].stride() == x.stride()


def test_c_step_backward_takes_other_gradient_strides_and_leaves_odd_layouts_to_aten():
    """A gradient laid out unlike the input is read correctly; an input with gaps (a slice), or with
    neither its channels nor its pixels contiguous, falls back to ATen's per-step kernel (same values)."""
    from snncc.runtime import batchnorm
    torch.manual_seed(3)
    K = 3
    x = torch.randn(K * 4, 16, 5, 7).to(memory_format=torch.channels_last).view(K, 4, 16, 5, 7)
    gy = torch.randn(K, 4, 16, 5, 7)                          # NCHW gradient of a channels-last input
    w = torch.rand(16) + 0.5
    mean, _, invstd = step_statistics(x, 1e-5)
    mask = (True, True, True)
    for a, b in zip(batchnorm.step_backward(gy, x, w, mean, invstd, 1e-5, mask),
                    _aten_step_backward(gy, x, w, mean, invstd, 1e-5, mask)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    sliced = torch.randn(K, 4, 16, 5, 9)[..., 1:8]            # gaps between rows
    odd = torch.randn(K, 16, 5, 4, 7).permute(0, 3, 1, 2, 4)  # [K, N, C, H, W], N between H and W: no collapse
    for t in (sliced, odd):
        assert batchnorm._c_geometry(t) is None
        m, _, s_ = step_statistics(t, 1e-5)
        g = torch.randn_like(t)
        for a, b in zip(batchnorm.step_backward(g, t, w, m, s_, 1e-5, mask),
                        _aten_step_backward(g, t, w, m, s_, 1e-5, mask)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("channels_last", [False, True])
def test_step_backward_writes_over_a_scratch_gradient_only_when_allowed(channels_last):
    """``gy_scratch``: the fused BatchNorm + LIF backward gives up its own gradient buffer, and the input
    gradient is written over it (same values as into a new buffer); without it ``gy`` is left untouched."""
    torch.manual_seed(0)
    K, shape = 3, (4, 5, 6, 6)
    x = torch.randn(K * shape[0], *shape[1:], dtype=torch.float64)
    gy = torch.randn_like(x)
    if channels_last:
        x, gy = (t.contiguous(memory_format=torch.channels_last) for t in (x, gy))
    x, gy = x.view(K, *shape), gy.view(K, *shape)
    w = torch.linspace(0.5, 1.5, shape[1], dtype=torch.float64)
    mean, _, invstd = batchnorm.step_statistics(x, 1e-5)
    keep = gy.clone()
    gx, gw, gb = batchnorm.step_backward(gy, x, w, mean, invstd, 1e-5, (True, True, True))
    assert torch.equal(gy, keep) and gx.data_ptr() != gy.data_ptr()
    gx2, gw2, gb2 = batchnorm.step_backward(gy, x, w, mean, invstd, 1e-5, (True, True, True), gy_scratch=True)
    assert gx2.data_ptr() == gy.data_ptr()
    assert torch.equal(gx2, gx) and torch.equal(gw2, gw) and torch.equal(gb2, gb)
