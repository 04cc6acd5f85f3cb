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


class _Spike(torch.autograd.Function):
    """Heaviside forward, fast-sigmoid backward (a user's own surrogate)."""

    @staticmethod
    def forward(ctx, z):
        ctx.save_for_backward(z)
        return (z >= 0).to(z.dtype)

    @staticmethod
    def backward(ctx, g):
        (z,) = ctx.saved_tensors
        return g / (1 + 10 * z.abs()) ** 2


class _Neuron(nn.Module):
    """A user's neuron (lifted and generated, not a built-in kind): its pool runs after the scan."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.decay = nn.Parameter(torch.full((channels, 1, 1), 1.0))
        self.v = None

    def reset(self) -> None:
        self.v = None

    def forward(self, x):
        if self.v is None:
            self.v = torch.zeros_like(x)
        self.v = torch.sigmoid(self.decay) * self.v + x
        s = _Spike.apply(self.v - 1.0)
        self.v = self.v * (1.0 - s)
        return s


class _PoolNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(2, 8, 3, padding=1)
        self.n1 = _Neuron(8)
        self.p1 = nn.MaxPool2d(2)
        self.fc = nn.Linear(8 * 5 * 5, 4)
        with torch.no_grad():
            self.c1.weight.mul_(4.0)

    def forward(self, x):
        return self.fc(self.p1(self.n1(self.c1(x))).flatten(1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lifted_neurons_pool_runs_the_kernel_and_equals_eager(dtype, monkeypatch):
    """Through the executor: a generated neuron's max pool (odd 11x11 maps: a remainder row and column)
    runs the C pool, and training equals eager (float64: identical spikes)."""
    from conftest import assert_same_training
    from snncc.runtime import maxpool
    calls = []
    real = maxpool._PoolKK.apply
    monkeypatch.setattr(maxpool._PoolKK, "apply", lambda *a: calls.append(1) or real(*a))
    assert_same_training(_PoolNet, torch.rand(3, 2, 11, 11), T=4, dtype=dtype, every_layer=False)
    assert calls
