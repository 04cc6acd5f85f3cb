"""snncc.losses.tet_loss against TET's reference formula (seed 003), written as a loop over time."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import snncc
from snncc.losses import tet_loss


def tet_reference(outputs_ntc: torch.Tensor, labels: torch.Tensor, criterion: nn.Module, means: float,
                  lamb: float) -> torch.Tensor:
    """TET's ``functions.TET_loss`` as seed 003 shows it: outputs ``[N, T, C]``."""
    T = outputs_ntc.size(1)
    loss_es = 0
    for t in range(T):
        loss_es += criterion(outputs_ntc[:, t, ...], labels)
    loss_es = loss_es / T
    if lamb != 0:
        y = torch.zeros_like(outputs_ntc).fill_(means)
        loss_mmd = torch.nn.MSELoss()(outputs_ntc, y)
    else:
        loss_mmd = 0
    return (1 - lamb) * loss_es + lamb * loss_mmd


def _data(T: int = 5, N: int = 7, C: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = torch.randn(T, N, C, generator=g, dtype=torch.float64) * 2
    y = torch.randint(0, C, (N,), generator=g)
    return out, y


@pytest.mark.parametrize("lamb, means", [(0.0, 1.0), (1e-3, 1.0), (0.5, 0.3), (1.0, -2.0)])
def test_matches_tet_reference_loop(lamb, means):
    out, y = _data()
    got = tet_loss(out, y, means=means, lamb=lamb)
    ref = tet_reference(out.transpose(0, 1), y, nn.CrossEntropyLoss(), means, lamb)
    assert got.dtype == torch.float64 and got.dim() == 0
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-14)


def test_lamb_zero_is_mean_over_time_of_cross_entropy():
    out, y = _data(T=3, N=6, C=5, seed=1)
    per_step = torch.stack([nn.functional.cross_entropy(out[t], y) for t in range(3)]).mean()
    torch.testing.assert_close(tet_loss(out, y, lamb=0.0), per_step, rtol=1e-12, atol=1e-14)
    # ... which, with a batch mean, is also the cross-entropy over all T*N (step, sample) pairs
    flat = nn.functional.cross_entropy(out.reshape(-1, 5), y.repeat(3))
    torch.testing.assert_close(tet_loss(out, y, lamb=0.0), flat, rtol=1e-12, atol=1e-14)


def test_defaults_are_tets():
    out, y = _data(seed=2)
    ref = tet_reference(out.transpose(0, 1), y, nn.CrossEntropyLoss(), 1.0, 1e-3)
    torch.testing.assert_close(tet_loss(out, y), ref, rtol=1e-12, atol=1e-14)


def test_gradients_match_reference_and_gradcheck():
    out, y = _data(T=4, N=3, C=3, seed=3)
    a = out.clone().requires_grad_(True)
    b = out.clone().requires_grad_(True)
    tet_loss(a, y, means=0.5, lamb=0.2).backward()
    tet_reference(b.transpose(0, 1), y, nn.CrossEntropyLoss(), 0.5, 0.2).backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-14)
    assert torch.autograd.gradcheck(lambda o: tet_loss(o, y, means=0.5, lamb=0.2), (out.clone().requires_grad_(True),))


def test_custom_criterion_and_float32():
    out, y = _data(seed=4)
    crit = nn.CrossEntropyLoss(label_smoothing=0.1)
    got = tet_loss(out.float(), y, lamb=0.01, criterion=crit)
    ref = tet_reference(out.float().transpose(0, 1), y, crit, 1.0, 0.01)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref)


def test_trains_a_compiled_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), snncc.LIF(surrogate_function=snncc.surrogate.Triangle()), nn.Linear(16, 3))
    cm = snncc.compile(model, T=4)
    x, y = torch.randn(8, 6) * 3, torch.randint(0, 3, (8,))
    loss = tet_loss(cm(x), y)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("outputs, target, kwargs, match", [
    (torch.zeros(4, 3), torch.zeros(4, dtype=torch.long), {}, "outputs must have shape"),
    (torch.zeros(2, 4, 3, dtype=torch.long), torch.zeros(4, dtype=torch.long), {}, "outputs must be floating"),
    (torch.zeros(4, 2, 3), torch.zeros(4, dtype=torch.long), {}, r"transpose\(0, 1\)"),
    (torch.zeros(2, 4, 3), torch.zeros(4, dtype=torch.long), {"lamb": 1.5}, "lamb must be"),
    (torch.zeros(2, 4, 3), torch.zeros(4, dtype=torch.long), {"lamb": -0.1}, "lamb must be"),
    (torch.zeros(2, 4, 3), torch.zeros(4, dtype=torch.long), {"means": "1"}, "means must be"),
    ([1.0], torch.zeros(4, dtype=torch.long), {}, "outputs must be a tensor"),
    (torch.zeros(2, 4, 3), [0, 1, 2, 3], {}, "target must be a tensor"),
])
def test_errors_name_the_argument(outputs, target, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        tet_loss(outputs, target, **kwargs)
