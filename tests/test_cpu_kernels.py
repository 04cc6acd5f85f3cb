"""The generated C scans (runtime/cpu.py) against the reference torch scan: every IF/LIF variant.

Spikes and final membrane potentials must be bit-identical (same IEEE operations, no FMA contraction);
gradients equal to float tolerance (the surrogate's exp may differ by an ulp between libm and torch).
"""
from __future__ import annotations

import itertools

import pytest
import torch

from snncc.neurons import NeuronSpec
from snncc.runtime import cpu
from snncc.runtime.reference import neuron_scan
from snncc.surrogate import KNOWN_SURROGATES, SurrogateSpec

pytestmark = pytest.mark.skipif(not cpu.compiler_available(), reason="no C compiler")


def _run(spec, x, K, broadcast, g, backend, monkeypatch):
    if backend == "reference":
        monkeypatch.setenv("SNNCC_BACKEND", "reference")
    else:
        monkeypatch.delenv("SNNCC_BACKEND", raising=False)
    assert cpu.supports(spec, x) == (backend == "c")
    s, state = neuron_scan(spec, x, K, broadcast, None, ())
    (gx,) = torch.autograd.grad((s * g).sum() + state[0].sum(), x)
    return s, state[0], gx


VARIANTS = [v for v in itertools.product(["if", "lif"], [True, False], [0.0, 0.5, None], [False, True])
            if not (v[0] == "if" and not v[1])]


@pytest.mark.parametrize("kind,decay_input,v_reset,detach_reset", VARIANTS)
@pytest.mark.parametrize("surrogate", KNOWN_SURROGATES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_c_scan_matches_reference(kind, decay_input, v_reset, detach_reset, surrogate, dtype, monkeypatch):
    torch.manual_seed(0)
    spec = NeuronSpec(kind, SurrogateSpec(surrogate, 2.0), v_reset=v_reset, detach_reset=detach_reset,
                      tau=2.0, decay_input=decay_input)
    K = 4
    for broadcast, channels_last in [(False, False), (True, False), (False, True), (True, True)]:
        x = torch.randn(K * 3, 4, 5, 6, dtype=dtype) * 2
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x = (x[:3] if broadcast else x.view(K, 3, 4, 5, 6)).detach().requires_grad_(True)
        g = torch.randn(K, 3, 4, 5, 6, dtype=dtype)
        s_c, v_c, gx_c = _run(spec, x, K, broadcast, g, "c", monkeypatch)
        s_r, v_r, gx_r = _run(spec, x, K, broadcast, g, "reference", monkeypatch)
        assert 0 < s_r.mean() < 1, "the test input must make some but not all neurons spike"
        assert torch.equal(s_c, s_r)
        assert torch.equal(v_c, v_r)
        torch.testing.assert_close(gx_c, gx_r, rtol=1e-5, atol=1e-6)


def test_kernel_source_is_cached(tmp_path, monkeypatch):
    monkeypatch.setattr(cpu, "CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cpu, "_LIBS", {})
    spec = NeuronSpec("lif", SurrogateSpec("atan", 2.0))
    src = cpu.kernel_source(spec, torch.float32)
    assert "scan_fwd" in src and "scan_bwd" in src and "-ffast-math" not in " ".join(cpu._FLAGS)
    cpu._library(src)
    files = list(tmp_path.glob("scan_*.so"))
    assert len(files) == 1
    mtime = files[0].stat().st_mtime_ns
    monkeypatch.setattr(cpu, "_LIBS", {})
    cpu._library(src)                      # second load: from disk, not recompiled
    assert files[0].stat().st_mtime_ns == mtime


def test_unsupported_specs_fall_back():
    opaque = NeuronSpec("lif", SurrogateSpec("callable", 1.0, lambda z: (z >= 0).float()))
    assert not cpu.supports(opaque, torch.zeros(3))
    assert not cpu.supports(NeuronSpec("plif", SurrogateSpec("sigmoid", 4.0), learnable=("w",)), torch.zeros(3))
    assert not cpu.supports(NeuronSpec("lif", SurrogateSpec("sigmoid", 4.0)), torch.zeros(3, dtype=torch.float16))
