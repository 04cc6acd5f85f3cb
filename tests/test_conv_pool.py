"""runtime/conv_pool.py and the conv_maxpool fusion: a training Conv2d and the MaxPool2d after it as one op
whose backward works from the pooled gradient. Forward values are the unfused pair's exactly; gradients
equal eager's to float rounding (the C kernels sum in another order than oneDNN)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import snncc
from snncc.frontend import trace_unrolled
from snncc.pipeline import compile_graph
from snncc.runtime import conv_pool, cpu

from conftest import assert_same_training

pytestmark = pytest.mark.skipif(not cpu.compiler_available(), reason="no C compiler")


def _eager(conv, x, k):
    return F.max_pool2d(conv(x), k)


def _grads(out, wrt, g):
    return torch.autograd.grad((out * g).sum(), wrt)


@pytest.mark.parametrize("cin,cout,ks,pad,stride,k,hw", [
    (16, 64, 5, 0, 1, 2, 12),     # snnTorch's tutorial conv net's second layer
    (8, 16, 3, 1, 1, 2, 10),
    (32, 24, 3, 1, 1, 2, 9),      # odd conv output: the last row and column are not pooled
    (8, 8, 3, 1, 2, 2, 12),       # strided conv
    (16, 8, 1, 0, 1, 3, 9),       # 1x1 conv, 3x3 pool
    (24, 40, 3, 2, 1, 2, 8),      # more registers than one accumulator block holds (kw * cin = 72)
])
@pytest.mark.parametrize("spikes", [True, False])
def test_fused_conv_pool_equals_conv_then_pool(cin, cout, ks, pad, stride, k, hw, spikes):
    torch.manual_seed(0)
    m = nn.Conv2d(cin, cout, ks, padding=pad, stride=stride)
    x = torch.rand(6, cin, hw, hw)
    x = (x < 0.3).float() if spikes else x - 0.5
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    assert conv_pool.conv_pool_ok(m, x, m.weight)
    out = conv_pool.conv_maxpool(m, x, k, spikes=spikes)
    assert out.grad_fn is not None and "ConvPool" in type(out.grad_fn).__name__
    ref = _eager(m, x, k)
    assert torch.equal(out, ref)
    g = torch.randn_like(ref)
    got = _grads(out, (x, m.weight, m.bias), g)
    want = _grads(ref, (x, m.weight, m.bias), g)
    for a, b, name in zip(got, want, ("input", "weight", "bias")):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=lambda s, n=name: f"{n} gradient: {s}")


def test_ties_and_nans_route_the_gradient_as_torch_does():
    """Torch's max pool takes the first maximum of a window in row-major order, and a NaN over any number:
    the one byte kept per pooled element must name the same element, or the gradient goes elsewhere."""
    m = nn.Conv2d(8, 8, 1, bias=False)
    with torch.no_grad():
        m.weight.copy_(torch.eye(8).view(8, 8, 1, 1))      # the conv passes its input through
    x = torch.zeros(1, 8, 4, 4)
    x[0, 1, 0, 1] = x[0, 1, 1, 0] = 2.0                    # a tie: the first (row-major) must win
    x[0, 2, 1, 1] = float("nan")                           # a NaN wins over larger numbers
    x[0, 2, 0, 0] = 5.0
    x[0, 3, 2, 2] = x[0, 3, 3, 3] = float("nan")           # two NaNs: as torch picks
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    out = conv_pool.conv_maxpool(m, x, 2)
    ref = _eager(m, x, 2)
    assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.nan_to_num(), ref.nan_to_num())
    g = torch.ones_like(ref)
    (gx,) = _grads(out, (x,), g)
    (gr,) = _grads(ref, (x,), g)
    assert torch.equal(gx, gr)


def test_outside_the_kernels_domain_it_is_conv_then_pool():
    """float64, cin * kw not a multiple of 8, or no gradient: the plain pair, same values."""
    torch.manual_seed(0)
    for m, x in [(nn.Conv2d(8, 8, 3).double(), torch.rand(2, 8, 8, 8, dtype=torch.float64)),
                 (nn.Conv2d(1, 4, 5), torch.rand(2, 1, 12, 12))]:
        x.requires_grad_(True)
        assert not conv_pool.conv_pool_ok(m, x, m.weight)
        out = conv_pool.conv_maxpool(m, x, 2)
        assert "ConvPool" not in type(out.grad_fn).__name__
        assert torch.equal(out, _eager(m, x, 2))
    with torch.no_grad():
        out = conv_pool.conv_maxpool(m, x, 2)
    assert out.grad_fn is None and torch.equal(out, _eager(m, x, 2))


class ConvPoolLIF(nn.Module):
    """snnTorch's layer order: conv -> max pool -> neuron (the pool reads the conv, not the spikes)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(2, 8, 3, padding=1)
        self.p1 = nn.MaxPool2d(2)
        self.n1 = snncc.LIF(surrogate_function=snncc.surrogate.Sigmoid())
        self.c2 = nn.Conv2d(8, 16, 3, padding=1)
        self.p2 = nn.MaxPool2d(2)
        self.n2 = snncc.LIF(surrogate_function=snncc.surrogate.Sigmoid(), v_threshold=0.5)
        self.fc = nn.Linear(16 * 2 * 2, 4)
        with torch.no_grad():
            for c in (self.c1, self.c2):
                c.weight.mul_(3.0)

    def forward(self, x):
        x = self.n1(self.p1(self.c1(x)))
        x = self.n2(self.p2(self.c2(x)))
        return self.fc(x.flatten(1))


def _fusions(model, train):
    model.train(train)
    tg = compile_graph(trace_unrolled(model, "static", 4), verify=True).task_graph
    return {t.target: [f.kind for f in t.fused] for t in tg.tasks() if t.kind == "module"}


def test_training_conv_absorbs_the_pool_after_it_and_eval_does_not():
    fused = _fusions(ConvPoolLIF(), True)
    assert fused["c1"] == ["conv_maxpool"] and fused["c2"] == ["conv_maxpool"]
    assert "p1" not in fused and "p2" not in fused
    fused = _fusions(ConvPoolLIF(), False)
    assert fused["c1"] == [] and fused["c2"] == [] and "p1" in fused


def test_pool_not_fused_when_the_conv_has_another_reader_or_the_pool_overlaps():
    class TwoReaders(ConvPoolLIF):
        def forward(self, x):
            y = self.c1(x)
            x = self.n1(self.p1(y)) + y.mean()
            return self.fc(self.n2(self.p2(self.c2(x))).flatten(1))
    assert _fusions(TwoReaders(), True)["c1"] == []
    m = ConvPoolLIF()
    m.p2 = nn.MaxPool2d(2, stride=1)
    m.fc = nn.Linear(16 * 3 * 3, 4)
    assert _fusions(m, True)["c2"] == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compiled_conv_pool_net_trains_like_eager(dtype, monkeypatch):
    calls = []
    real = conv_pool._ConvPool.backward
    monkeypatch.setattr(conv_pool._ConvPool, "backward",
                        staticmethod(lambda ctx, g: calls.append(1) or real(ctx, g)))
    x = torch.rand(3, 2, 8, 8)
    assert_same_training(ConvPoolLIF, x, T=4, dtype=dtype)
    # float32: conv2 (cin 8, 3x3) runs the fused kernels; conv1 (cin 2) and float64 the plain pair
    assert (len(calls) > 0) == (dtype == torch.float32)


def test_explain_names_the_fusion():
    cm = snncc.compile(ConvPoolLIF().train(), T=4)
    text = str(snncc.explain(cm, torch.rand(2, 2, 8, 8)))
    assert "max pool fused with the convolution" in text
