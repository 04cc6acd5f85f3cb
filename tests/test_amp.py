"""AMP: under torch.autocast (or with half-precision inputs) convs run in half precision while the neurons
keep their state in float32 (runtime/reference.py), as the CUDA kernels do."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import snncc
from snncc.neurons import IF, LIF

from conftest import eager_run


@pytest.mark.parametrize("dtype,value,T", [(torch.bfloat16, 0.03, 40), (torch.float16, 0.003, 400)])
def test_half_input_integrates_in_float32(dtype, value, T):
    """An IF neuron fed a small constant: a half-precision V rounds the increments (it fires at another
    step); the compiled neuron's V is float32, so its spikes are exactly those of the float32 neuron on the
    same (half-rounded) input."""
    x = torch.full((3, 4), value, dtype=dtype)
    cm = snncc.compile(nn.Sequential(IF()), T=T)
    out = cm(x)
    assert out.dtype == dtype
    exact = eager_run(nn.Sequential(IF()), x.float(), T=T)
    assert torch.equal(out.float(), exact) and exact.sum() > 0
    half_state = eager_run(nn.Sequential(IF()), x, T=T)          # eager keeps V in the input's dtype
    assert not torch.equal(half_state.float(), exact)            # (so the check above can fail)
    assert cm.model[0].v.dtype == torch.float32


def _net() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.BatchNorm2d(8), LIF(), nn.MaxPool2d(2),
                      nn.Conv2d(8, 8, 3, padding=1), LIF(), nn.Flatten(), nn.Linear(8 * 4 * 4, 10), LIF())
    with torch.no_grad():
        m[4].weight.mul_(4.0)
        m[7].weight.mul_(4.0)
        m[7].bias.add_(0.8)
    return m


def test_autocast_bf16_training_on_cpu():
    model = _net()
    full = copy.deepcopy(model)
    cm = snncc.compile(model, T=4)
    x = torch.rand(4, 2, 8, 8) * 3
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = cm(x)
    assert out.dtype == torch.bfloat16                       # what eager gives under autocast
    assert all(model[i].v.dtype == torch.float32 for i in (2, 5, 8))
    ref = eager_run(full, x, T=4)
    assert out.float().mean() > 0
    assert (out.float() - ref).abs().mean() < 0.05           # few spikes flip at bf16 convolutions
    out.float().sum().backward()
    ref.sum().backward()
    for (name, p), q in zip(full.named_parameters(), model.parameters()):
        assert q.grad.dtype == p.dtype == torch.float32
        if name in ("0.weight", "4.weight", "7.weight", "1.weight"):
            assert torch.isfinite(q.grad).all()
            assert (q.grad - p.grad).norm() < 0.5 * p.grad.norm(), name
