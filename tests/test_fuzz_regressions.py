"""What the fuzzer (tests/test_fuzz.py) found, one test per finding: fixed ones pass, open ones are
``xfail(strict=True)`` with the reason (they start failing the suite the day they are fixed, so the mark is
removed then). Cases are written as tests/fuzz.py data: paste a failure's printed ``spec``/``setup``/``ops``.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import snncc
from conftest import requires_snntorch, reset_all

import fuzz
from fuzz import ModelSpec


def _run(spec: ModelSpec, setup: dict, ops: tuple) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fuzz.run_case(spec, setup, ops)


# ------------------------------------------------------------------------------------------ open findings
@requires_snntorch
@pytest.mark.xfail(strict=True, reason=(
    "compiled is more lenient than eager: snnTorch's spikes are float32 whatever the model's dtype "
    "((x > 0).float() in its surrogates), so in a float64 model the BatchNorm1d after a Leaky raises in eager "
    "('mixed dtype (CPU): expect parameter to have scalar type of Float'); the compiled model's BatchNorm "
    "task runs it (in float64) instead of raising as eager does (runtime/batchnorm.py, executor)"))
def test_batchnorm_after_snntorch_float32_spikes_raises_as_eager_does():
    import snntorch
    from snntorch import surrogate
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), snntorch.Leaky(beta=0.5, init_hidden=True,
                                                           spike_grad=surrogate.atan()),
                          nn.BatchNorm1d(4)).double()
    ref = copy.deepcopy(model)
    x = torch.rand(2, 3, dtype=torch.float64) * 3
    reset_all(ref)
    with pytest.raises(RuntimeError, match="mixed dtype"):
        torch.stack([ref(x) for _ in range(3)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match="mixed dtype"):
            snncc.compile(model, T=3)(x)


# ------------------------------------------------------------------------------------------ the harness's own
def test_zero_gradient_before_batchnorm_is_compared_at_the_model_scale():
    """A Linear's bias before a BatchNorm has a zero gradient but for cancellation (1e-9 here, against
    gradients of 1e2): compared at the scale of the model's gradients, not its own (a harness fix)."""
    spec = ModelSpec(inp=('vector', 5), program=(
        ('linear', 5, 6), ('bn1d', 6), ('scale', 1.5),
        ('neuron', ('snntorch', 'Leaky', (('beta', 0.5), ('learn_beta', False), ('reset_mechanism', 'subtract')),
                    ('atan', None))),
        ('res', (('linear', 6, 6), ('scale', 80.0),
                 ('neuron', ('snncc', 'Izhikevich', (('detach_reset', False),), ('Erf', 4.0))))),
        ('bn1d', 6), ('bn1d', 6)))
    if not fuzz.HAS_SNNTORCH:
        pytest.skip("snntorch is not installed")
    setup = {'form': 'sequence', 'T': None, 'chunk': None, 'memory': 'min', 'fuse': True, 'bitpack': False,
             'optimizer': 'sgd', 'dtype': 'float64', 'seed': 547}
    stats = _run(spec, setup, (('sd_in',), ('fwd', 2, 2), ('fwd', 2, 2)))
    assert stats["steps"] == 2
