"""Training BatchNorm over K steps (``runtime/batchnorm.py``) against K eager module calls.

It runs eager's own ATen kernels per step, so in float32 the outputs' statistics, the running statistics
and the input gradient (float32) are eager's to the bit (regression: the
statistics were a ``var_mean`` over a channels-last 5-d tensor, 10-20x slower and off in the last bit).
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

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
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 if dtype == torch.float32 else 1e-12)
    if dtype == torch.float32:
        assert torch.equal(ga[0], gb[0])     # the input gradient: eager's kernel, step by step


def test_step_statistics_are_eagers_saved_mean_and_invstd():
    torch.manual_seed(1)
    x = (torch.randn(4 * 8, 16, 6, 6) * 2 + 3).to(memory_format=torch.channels_last).view(4, 8, 16, 6, 6)
    mean, var, invstd = step_statistics(x, 1e-5)
    w, b = torch.ones(16), torch.zeros(16)
    for k in range(4):
        _, sm, si = torch.native_batch_norm(x[k], w, b, None, None, True, 0.1, 1e-5)
        assert torch.equal(mean[k], sm) and torch.equal(invstd[k], si)


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
