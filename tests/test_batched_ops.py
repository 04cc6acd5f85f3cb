"""Shape, matmul and reduction ops batched over time under a runtime guard (``runtime/batched_ops.py``).

Step-mode transformers write ``B, L, D = x.shape; x.reshape(B, L, H, D // H).transpose(1, 2)`` and
``q @ k.transpose(-2, -1)`` once per step. These ran one task per step (and a ``torch.cat`` per neuron input);
now one call per chunk when the guard holds, step by step when it does not: the value is the same either way.
"""
from __future__ import annotations

import operator

import pytest
import torch
from torch import nn

import snncc
from snncc.passes import scaled_matmul
from conftest import assert_same_training
from snncc.runtime.batched_ops import batched_call

K = 3


@pytest.mark.parametrize("kind,target,step_shape,args,batched", [
    ("method", "reshape", (4, 6, 8), (4, 6, 2, 4), True),
    ("method", "reshape", (4, 6, 8), (-1, 8), True),           # rows of all samples: still step-major blocks
    ("method", "view", (4, 6, 8), ((4, 48),), True),
    ("method", "reshape", (4, 6, 8), (-1,), True),
    ("method", "transpose", (4, 6, 8), (1, 2), True),
    ("method", "transpose", (4, 6, 8), (-1, -2), True),
    ("method", "transpose", (4, 6, 8), (0, 1), False),           # moves the batch dim
    ("method", "permute", (4, 6, 8), (0, 2, 1), True),
    ("method", "permute", (4, 6, 8), (1, 0, 2), False),
    ("method", "mean", (4, 6, 8), (1,), True),
    ("method", "sum", (4, 6, 8), ((1, 2),), True),
    ("method", "mean", (4, 6, 8), (0,), False),                  # reduces over the batch
    ("method", "softmax", (4, 6, 8), (-1,), True),
    ("function", torch.transpose, (4, 6, 8), (2, 1), True),
])
def test_rules_equal_the_step_by_step_result(kind, target, step_shape, args, batched):
    torch.manual_seed(0)
    x = torch.randn(K * step_shape[0], *step_shape[1:], dtype=torch.float64)
    call = batched_call(kind, target, (x,) + args, {}, K, [True] + [False] * len(args))
    assert (call is not None) == batched
    fn = (lambda t, *a: getattr(t, target)(*a)) if kind == "method" else target
    if call is not None:
        f, a, k = call
        assert torch.equal(f(*a, **k), torch.cat([fn(xs, *args) for xs in x.chunk(K)]))


@pytest.mark.parametrize("a_shape,b_shape,b_per_step,batched", [
    ((2, 5, 3), (2, 3, 4), True, True),           # [N, H, L, d] style: batch dims lead on both sides
    ((2, 2, 5, 3), (2, 2, 3, 4), True, True),
    ((2, 5, 3), (3, 4), False, True),              # a shared weight broadcasts
    ((2, 3), (3, 2), True, False),                 # 2-d per step: x @ y mixes the batch rows
    ((2, 2, 5, 3), (2, 3, 4), True, False),        # ranks differ: dim 0 would broadcast against dim 1
])
def test_matmul_rule(a_shape, b_shape, b_per_step, batched):
    torch.manual_seed(0)
    a = torch.randn(K * a_shape[0], *a_shape[1:], dtype=torch.float64)
    b = torch.randn(K * b_shape[0], *b_shape[1:], dtype=torch.float64) if b_per_step else \
        torch.randn(*b_shape, dtype=torch.float64)
    call = batched_call("function", operator.matmul, (a, b), {}, K, [True, b_per_step])
    assert (call is not None) == batched
    if call is not None:
        f, args, kw = call
        bs = b.chunk(K) if b_per_step else [b] * K
        assert torch.equal(f(*args, **kw), torch.cat([x @ y for x, y in zip(a.chunk(K), bs)]))


class _SSA(nn.Module):
    """A step-mode spiking self-attention block: shapes read from x.shape every step."""

    def __init__(self, dim=8, heads=2, odd=False):
        super().__init__()
        self.heads, self.odd = heads, odd
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.bn = nn.BatchNorm1d(dim)
        self.nq, self.nk, self.nv = snncc.LIF(v_threshold=0.3), snncc.LIF(v_threshold=0.3), snncc.LIF(v_threshold=0.3)
        self.na = snncc.LIF(v_threshold=0.2)
        self.proj = nn.Linear(dim, dim)

    def _split(self, y):
        B, L, D = y.shape
        return y.reshape(B, L, self.heads, D // self.heads).transpose(1, 2)

    def forward(self, x):
        B, L, D = x.shape
        q = self._split(self.nq(self.bn(self.q(x).transpose(1, 2)).transpose(1, 2)))
        k, v = self._split(self.nk(self.k(x))), self._split(self.nv(self.v(x)))
        attn = (q @ k.transpose(-2, -1)) * 0.25
        y = self.na(attn @ v).transpose(1, 2).reshape(B, L, D)
        if self.odd:       # ops whose guards fail: mix the batch, step by step
            y = y + (y.transpose(0, 1).mean(0, keepdim=True)).transpose(0, 1) + y.permute(1, 0, 2).permute(1, 0, 2)
        return (x + self.proj(y)).mean(1)


@pytest.mark.parametrize("odd", [False, True])
def test_spiking_attention_compiles_batched_and_equals_eager(odd, monkeypatch):
    from snncc.runtime import batched_ops, executor
    calls = []

    def spy(*a, **k):
        calls.append(batched_ops.batched_call(*a, **k) is not None)
        return batched_ops.batched_call(*a, **k)
    monkeypatch.setattr(executor, "batched_call", spy)
    x = torch.randn(4, 6, 8) * 2
    assert_same_training(lambda: _SSA(odd=odd), x, T=5)
    assert calls and (all(calls) if not odd else (any(calls) and not all(calls)))
    cm = snncc.compile(_SSA(odd=odd), T=5)
    cm(x)
    _, ex = next(iter(cm._snncc_cache.values()))
    tasks = [t for _, t in ex.tg.graph.nodes(data="task")]
    per_step = [t for t in tasks if t.kind in ("function", "method") and not t.batched and t.t0 is not None and
                t.target in ("reshape", "transpose", operator.matmul, scaled_matmul, "mean")]
    assert not per_step, [t.name for t in per_step]
    assert any(t.target is scaled_matmul and t.batched for t in tasks)     # (q @ k^T) * 0.25, folded
