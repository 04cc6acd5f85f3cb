"""The generated CUDA C++ compiles with nvcc for sm_80 and sm_90 (every neuron configuration, every
surrogate, every input dtype), and -- on a GPU with CuPy -- matches the reference scan.

The compile check needs only ``nvcc`` (no GPU); it is skipped where nvcc is absent. The numeric tests are
marked ``cuda`` and skipped without a CUDA device and CuPy.
"""
from __future__ import annotations

import importlib.util
import itertools
import shutil
import subprocess

import pytest
import torch

from snncc.neurons import NeuronSpec
from snncc.runtime.cuda.kernels import cuda_source, kernel_names
from snncc.surrogate import KNOWN_SURROGATES, SurrogateSpec

CONFIGS = [v for v in itertools.product(["if", "lif", "plif"], [True, False], [0.0, 0.5, None], [False, True])
           if not (v[0] == "if" and not v[1])]


def _spec(kind, decay_input=True, v_reset=0.0, detach_reset=False, surrogate="sigmoid"):
    return NeuronSpec(kind, SurrogateSpec(surrogate, 2.0), v_reset=v_reset, detach_reset=detach_reset,
                      decay_input=decay_input, learnable=("w",) if kind == "plif" else ())


def _variants():
    """(spec, dtype, h_dtype, pool_k): every configuration in float32; every surrogate in float64; half and
    bfloat16 inputs with float32 state; float16 H; a 3x3 pool."""
    out = [(_spec(*c), "float32", None, 2) for c in CONFIGS]
    out += [(_spec("lif", surrogate=s), "float64", None, 2) for s in KNOWN_SURROGATES]
    out += [(_spec("plif", surrogate="atan"), "float16", None, 2), (_spec("lif"), "bfloat16", None, 2),
            (_spec("lif", v_reset=None), "float32", "float16", 3)]
    user = NeuronSpec("lif", SurrogateSpec("callable", 1.0, _plain_step))     # a user's surrogate
    out += [(user, "float32", None, 2), (user, "float64", None, 2)]
    return out


def _plain_step(z):
    """A user's surrogate: the z >= 0 spike with a straight-through-free (zero) derivative."""
    return (z >= 0).to(z.dtype) + 0 * z


def test_cuda_source_names_and_no_cupy_import():
    import sys
    src = cuda_source(_spec("lif"))
    for name in kernel_names("snncc"):
        assert f'extern "C" __global__ void {name}(' in src
    assert "cupy" not in sys.modules


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found")
def test_every_variant_compiles_for_sm80_and_sm90(tmp_path):
    parts = [cuda_source(spec, dt, hdt, k, prefix=f"v{i}", header=i == 0)
             for i, (spec, dt, hdt, k) in enumerate(_variants())]
    cu = tmp_path / "all_variants.cu"
    cu.write_text("".join(parts))
    cmd = ["nvcc", "-std=c++17", "-c", str(cu), "-o", str(tmp_path / "all.o"),
           "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "error" not in r.stderr.lower()


# --------------------------------------------------------------------------- on a GPU
def _use(backend, monkeypatch):
    """Run the CUDA kernels ("cuda") or force the reference backend."""
    if backend == "reference":
        monkeypatch.setenv("SNNCC_BACKEND", "reference")
    else:
        monkeypatch.delenv("SNNCC_BACKEND", raising=False)


_HAS_GPU = torch.cuda.is_available() and importlib.util.find_spec("cupy") is not None


@pytest.mark.cuda
@pytest.mark.skipif(not _HAS_GPU, reason="needs a CUDA device and CuPy")
@pytest.mark.parametrize("kind,decay_input,v_reset,detach_reset", CONFIGS)
@pytest.mark.parametrize("pool", [None, 2])
def test_cuda_scan_matches_reference(kind, decay_input, v_reset, detach_reset, pool, monkeypatch):
    from snncc.runtime.reference import neuron_scan
    spec = _spec(kind, decay_input, v_reset, detach_reset)
    torch.manual_seed(0)
    K = 4
    for dtype in (torch.float32, torch.float64):
        for broadcast in (False, True):
            x = (torch.randn(K, 3, 4, 6, 6, dtype=dtype, device="cuda") * 2)
            x = (x[0] if broadcast else x).detach().requires_grad_(True)
            w = torch.tensor(-0.3, dtype=dtype, device="cuda", requires_grad=True) if kind == "plif" else None
            params = () if w is None else (w,)
            res = {}
            for backend in ("cuda", "reference"):
                _use(backend, monkeypatch)
                s, (v,) = neuron_scan(spec, x, K, broadcast, None, params, pool=pool)
                g = torch.randn(s.shape, dtype=dtype, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
                wrt = (x,) if w is None else (x, w)
                res[backend] = (s, v, torch.autograd.grad((s * g).sum() + v.sum(), wrt))
            (s1, v1, g1), (s2, v2, g2) = res["cuda"], res["reference"]
            assert torch.equal(s1, s2) and torch.equal(v1, v2)
            for a, b in zip(g1, g2):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.skipif(not _HAS_GPU, reason="needs a CUDA device and CuPy")
@pytest.mark.parametrize("pool", [None, 2])
def test_cuda_scan_user_surrogate_matches_reference(pool, monkeypatch):
    """A user's plain surrogate on CUDA: its derivative from its own backward, the rest in the kernels."""
    from snncc.runtime.reference import neuron_scan
    import snncc
    spec = NeuronSpec("lif", SurrogateSpec("callable", 1.0, snncc.surrogate.ATan()))
    x = (torch.randn(4, 3, 4, 6, 6, dtype=torch.float64, device="cuda") * 2).requires_grad_(True)
    res = {}
    for backend in ("cuda", "reference"):
        _use(backend, monkeypatch)
        s, (v,) = neuron_scan(spec, x, 4, False, None, (), pool=pool)
        res[backend] = (s, v, torch.autograd.grad((s * torch.cos(s + 1)).sum() + v.sum(), x))
    assert torch.equal(res["cuda"][0], res["reference"][0]) and torch.equal(res["cuda"][1], res["reference"][1])
    torch.testing.assert_close(res["cuda"][2][0], res["reference"][2][0])
