"""runtime/maxpool.py: the kernel == stride max pool used after lifted neurons equals F.max_pool2d
exactly (values, the first-maximum pick, NaN, remainders, gradients) in both layouts and dtypes, and
declines what it does not implement."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from snncc.runtime.maxpool import pool_kk

pytestmark = pytest.mark.skipif(not __import__("snncc.runtime.cbuild", fromlist=["x"]).compiler_available(),
                                reason="needs a C compiler")


def _both(pm, x):
    xa = x.clone().requires_grad_(True)
    xb = x.clone().requires_grad_(True)
    ya = pool_kk(pm, xa)
    assert ya is not None
    yb = pm(xb)
    g = torch.randn_like(yb)
    ya.backward(g)
    yb.backward(g)
    return ya, yb, xa.grad, xb.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("k,h,w", [(2, 8, 8), (2, 7, 9), (3, 10, 11), (4, 4, 8)])
def test_equals_max_pool2d(dtype, channels_last, k, h, w):
    torch.manual_seed(0)
    x = (torch.rand(3, 5, h, w, dtype=dtype) < 0.3).to(dtype)      # spikes: ties everywhere
    x[0, 0] = torch.randn(h, w, dtype=dtype)                        # and real values
    x[1, 1, :k, :k] = float("-inf")                                 # a window of -inf only
    x[1, 2, 0, 1] = float("nan")                                    # NaN propagates
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    ya, yb, ga, gb = _both(nn.MaxPool2d(k), x)
    torch.testing.assert_close(ya, yb, rtol=0, atol=0, equal_nan=True)
    assert ya.is_contiguous(memory_format=torch.channels_last) == channels_last
    torch.testing.assert_close(ga, gb, rtol=0, atol=0)
    assert ga.stride() == x.stride()                    # the gradient in the input's layout


@pytest.mark.parametrize("pm", [nn.MaxPool2d(2, stride=1), nn.MaxPool2d(2, padding=1), nn.MaxPool2d(2, ceil_mode=True),
                                nn.MaxPool2d(2, dilation=2), nn.MaxPool2d((2, 3)), nn.MaxPool2d(2, return_indices=True),
                                nn.AvgPool2d(2)])
def test_declines_other_pools(pm):
    assert pool_kk(pm, torch.rand(2, 3, 8, 8)) is None


def test_declines_hooks_and_other_tensors():
    pm = nn.MaxPool2d(2)
    assert pool_kk(pm, torch.rand(2, 3, 8, 8).half()) is None
    assert pool_kk(pm, torch.rand(2, 3, 8, 8).transpose(2, 3)) is None          # neither layout
    assert pool_kk(pm, torch.rand(3, 8, 8)) is None
    pm.register_forward_hook(lambda *a: None)
    assert pool_kk(pm, torch.rand(2, 3, 8, 8)) is None


def test_tuple_kernel_and_stride_equal_are_taken():
    x = torch.rand(2, 3, 6, 6)
    y = pool_kk(nn.MaxPool2d((2, 2), stride=(2, 2)), x)
    assert y is not None and torch.equal(y, F.max_pool2d(x, 2))


def _user_neuron_net():
    """The zoo's user-neuron net (``tools/bench_zoo.py``: a learnable-decay neuron, its own surrogate, a
    max pool after each neuron) on 11x11 maps (odd: a remainder row and column at the first pool), driven
    hard enough to fire."""
    from snncc.tools.bench_zoo import CustomNeuronNet
    net = CustomNeuronNet(8, 8, 11)
    with torch.no_grad():
        net.conv1.weight.mul_(4.0)
        net.conv2.weight.mul_(4.0)
    return net


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("in_scan", [True, False])
def test_lifted_neurons_pool_runs_the_kernel_and_equals_eager(dtype, in_scan, monkeypatch):
    """Through the executor: a generated neuron's max pool runs in C, as the generated scan's epilogue
    (``cpu_ir``'s pooled scans) or, where that declines, the C pool after the scan; training equals eager
    either way (float64: identical spikes)."""
    from conftest import assert_same_training
    from snncc.runtime import cpu_ir, maxpool
    calls, pooled = [], []
    real = maxpool._PoolKK.apply
    monkeypatch.setattr(maxpool._PoolKK, "apply", lambda *a: calls.append(1) or real(*a))
    real_ok = cpu_ir.ir_pool_ok
    monkeypatch.setattr(cpu_ir, "ir_pool_ok", lambda *a: in_scan and (pooled.append(1) or real_ok(*a)))
    assert_same_training(_user_neuron_net, torch.rand(3, 3, 11, 11), T=4, dtype=dtype, every_layer=False)
    assert bool(pooled) == in_scan and bool(calls) == (not in_scan)
