"""passes/fold_matmul_scale.py: a power-of-two scale of a matmul's product moves onto its smallest operand,
bit for bit; other scales, and products read elsewhere, stay as they are."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import snncc
from snncc.frontend import trace_unrolled
from snncc.passes import fold_matmul_scale, scaled_matmul
from snncc.passes.fold_matmul_scale import power_of_two
from snncc.pipeline import compile_graph
from conftest import assert_same_training


@pytest.mark.parametrize("c,ok", [(0.125, True), (0.25, True), (2, True), (-4.0, True), (1, True), (2.0 ** -20, True),
                                  (0.1, False), (3, False), (0, False), (math.inf, False), (math.nan, False),
                                  (True, False), (2.0 ** 40, False), (2.0 ** -40, False), ("0.5", False)])
def test_power_of_two(c, ok):
    assert power_of_two(c) is ok


@pytest.mark.parametrize("a_shape,b_shape,transposed_b,scaled", [
    ((6, 2, 16, 4), (6, 2, 4, 16), True, "a"),      # q @ k^T: the operands are a quarter of the product
    ((3, 40, 8), (3, 8, 4), False, "b"),            # the second operand is the smallest
    ((6, 2, 16, 16), (6, 2, 16, 4), False, "out"),  # attn @ v: the product is no bigger than v
    ((40, 30), (30, 50), True, "a"),                # 2-d, the second operand a transposed view
])
@pytest.mark.parametrize("scale", [0.125, 4.0, -0.5])
def test_scaled_matmul_is_the_scaled_product_bit_for_bit(a_shape, b_shape, transposed_b, scaled, scale, monkeypatch):
    torch.manual_seed(0)
    a = torch.randn(a_shape)
    b = torch.randn(b_shape[:-2] + b_shape[-2:][::-1]).transpose(-2, -1) if transposed_b else torch.randn(b_shape)
    seen = []
    real_mul = torch.Tensor.__mul__

    def spy(t, c):
        seen.append("a" if t is a else "b" if t is b else "out")
        return real_mul(t, c)
    monkeypatch.setattr(torch.Tensor, "__mul__", spy)
    got = scaled_matmul(a, b, scale)
    monkeypatch.undo()
    assert seen == [scaled]
    assert torch.equal(got, torch.matmul(a, b) * scale)
    ga, gb = (t.detach().requires_grad_(True) for t in (a, b))
    ea, eb = (t.detach().requires_grad_(True) for t in (a, b))
    g = torch.randn_like(got)
    (scaled_matmul(ga, gb, scale) * g).sum().backward()
    ((torch.matmul(ea, eb) * scale) * g).sum().backward()
    torch.testing.assert_close(ga.grad, ea.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gb.grad, eb.grad, rtol=1e-6, atol=1e-6)


class _Scales(nn.Module):
    """Every form the pass folds, and the ones it must leave alone."""

    def forward(self, q):
        kt = (q + 1).transpose(-2, -1)
        a = (q @ kt) * 0.125                         # operator.mul, scale on the right
        b = 0.25 * torch.matmul(q, kt)               # on the left, torch.matmul
        c = (q @ kt) / 8                             # truediv by a power of two
        d = q.matmul(kt).mul(2.0)                    # methods
        e = torch.bmm(q[0], kt[0]) * 0.5             # bmm
        keep1 = (q @ kt) * 0.1                       # not a power of two
        p = q @ kt
        keep2 = p * 0.5 + p                          # the product is read twice
        return a + b + c + d + e[None] + keep1 + keep2


def test_pass_folds_power_of_two_scales_only():
    traced = trace_unrolled(_Scales(), "static", 1)
    traced, folded = fold_matmul_scale(traced)
    assert folded == 5
    targets = [n.target for n in traced.graph.nodes if n.op in ("call_function", "call_method")]
    assert targets.count(scaled_matmul) == 5
    assert sum(t in (torch.matmul,) or getattr(t, "__name__", "") == "matmul" for t in targets) == 2


def test_compiled_model_with_folded_scale_is_eager_and_reports_the_fold():
    q = torch.randn(3, 2, 6, 4)
    model = _Scales()
    c = compile_graph(trace_unrolled(model, "static", 2), verify=True)
    # hoisting runs first: the T = 2 copies are one, and the identical ``q @ kt`` of a, c, keep1 and p are
    # one node with four readers, which is kept; b, d and e (other targets) fold
    assert c.snapshot("fold_matmul_scale").stats["folded"] == 3
    out = snncc.compile(_Scales(), T=2)(q)
    assert torch.equal(out, torch.stack([model(q), model(q)]))


class _Attention(nn.Module):
    """Spiking attention with Spikformer's scale: q, k, v are spikes."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.nq, self.nk, self.nv = snncc.LIF(v_threshold=0.3), snncc.LIF(v_threshold=0.3), snncc.LIF(v_threshold=0.3)
        self.na = snncc.LIF(v_threshold=0.2)

    def forward(self, x):
        q, k, v = self.nq(self.q(x)), self.nk(self.k(x)), self.nv(self.v(x))
        return self.na((q @ k.transpose(-2, -1)) * 0.125 @ v).mean(1)


def test_spiking_attention_with_folded_scale_trains_as_eager():
    torch.manual_seed(0)
    assert_same_training(_Attention, torch.randn(4, 6, 8) * 2, T=4)
