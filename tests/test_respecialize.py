"""Every model of the test zoo survives re-specialization: one compiled model driven through train -> eval
-> a new batch size -> a new T -> train again, each call equal to its eager twin (outputs, parameter
gradients, BatchNorm running statistics), and the eager model still runs unchanged afterwards."""
from __future__ import annotations

import copy
from typing import Callable, List, Tuple

import pytest
import torch
from torch import nn

import snncc
from test_golden_zoo import BNConvNet, ConvNet, DropoutNet, MLP, ResidualNet
from test_recurrent import UserRSNN, _eager


def _img(T: int, n: int, seed: int, shape: Tuple[int, ...]) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((T, n) + shape, generator=g, dtype=torch.float64) * 1.5 + 0.3


def _rsnn() -> nn.Module:
    torch.manual_seed(0)
    m = UserRSNN(i=8, h=10, o=3)
    with torch.no_grad():
        m.fc_in.weight.mul_(4.0)
        m.fc_rec.weight.mul_(3.0)
    return m


ZOO: List[Tuple[str, Callable[[], nn.Module], Tuple[int, ...]]] = [
    ("convnet_lif", lambda: ConvNet("lif"), (2, 8, 8)),
    ("bnconvnet_plif", lambda: BNConvNet("plif"), (2, 8, 8)),
    ("mlp_alif", lambda: MLP("alif"), (10,)),
    ("mlp_izhikevich", lambda: MLP("izhikevich"), (10,)),
    ("residual_lif", lambda: ResidualNet("lif"), (2, 8, 8)),
    ("dropout_if", lambda: DropoutNet("if"), (10,)),
    ("user_rsnn", _rsnn, (8,)),
]

#: (T, N, training): train, eval, eval with a new batch size, train with a new T, train as at first
CALLS = [(4, 2, True), (4, 2, False), (4, 3, False), (3, 3, True), (4, 2, True)]


def _bn_stats(m: nn.Module) -> List[torch.Tensor]:
    return [b for n, b in m.named_buffers() if "running" in n]


@pytest.mark.parametrize("name,factory,shape", ZOO, ids=[z[0] for z in ZOO])
def test_train_eval_batch_T_changes_equal_eager(name: str, factory: Callable[[], nn.Module],
                                                shape: Tuple[int, ...]) -> None:
    torch.manual_seed(0)
    eager_m = factory().double()
    twin = copy.deepcopy(eager_m)
    c = snncc.compile(twin, sequence=True)
    for i, (T, N, train) in enumerate(CALLS):
        x = _img(T, N, 20 + i, shape)
        eager_m.train(train)
        c.train(train)
        for p, q in zip(eager_m.parameters(), twin.parameters()):
            p.grad, q.grad = None, None
        with torch.set_grad_enabled(train):
            torch.manual_seed(100 + i)                       # the same dropout draws
            ye = _eager(eager_m, x)
            torch.manual_seed(100 + i)
            yc = c(x)
        assert torch.equal(ye, yc), f"{name}: call {i} {(T, N, train)}"
        assert ye.abs().sum() > 0, f"{name}: silent output (the comparison would prove nothing)"
        if train:
            g = torch.randn(ye.shape, generator=torch.Generator().manual_seed(i), dtype=ye.dtype)
            (ye * g).sum().backward()
            (yc * g).sum().backward()
            for (pn, p), q in zip(eager_m.named_parameters(), twin.parameters()):
                assert (p.grad is None) == (q.grad is None), pn
                if p.grad is not None:
                    assert torch.allclose(p.grad, q.grad, rtol=1e-9, atol=1e-11), f"{name}: {pn} call {i}"
        for a, b in zip(_bn_stats(eager_m), _bn_stats(twin)):
            assert torch.allclose(a, b, rtol=1e-12, atol=1e-14), f"{name}: BN statistics after call {i}"
    # the eager twin (the compiled model's own modules) still runs as eager
    x = _img(3, 2, 99, shape)
    eager_m.eval()
    twin.eval()
    with torch.no_grad():
        assert torch.equal(_eager(eager_m, x), _eager(twin, x))
