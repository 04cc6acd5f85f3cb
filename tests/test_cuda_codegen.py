"""The generated CUDA C++ compiles with nvcc for sm_80 and sm_90 (every neuron configuration, every
surrogate, every input dtype), and -- on a GPU with CuPy -- matches the reference scan.

The compile check needs only ``nvcc`` (no GPU); it is skipped where nvcc is absent. The numeric tests are
marked ``cuda`` and skipped without a CUDA device and CuPy.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import glob
import importlib.util
import itertools
import os
import re
import shutil
import subprocess
from typing import Optional, Tuple

import pytest
import torch

from snncc.neurons import NeuronSpec
from snncc.runtime.cuda.kernels import cuda_source, kernel_names
from snncc.surrogate import KNOWN_SURROGATES, SurrogateSpec
from conftest import NVCC_ARCHS

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
    parts = [cuda_source(spec, dt, hdt, k, prefix=f"v{i}")
             for i, (spec, dt, hdt, k) in enumerate(_variants())]
    cu = tmp_path / "all_variants.cu"
    cu.write_text("".join(parts))
    cmd = ["nvcc", "-std=c++17", "-c", str(cu), "-o", str(tmp_path / "all.o"),
           *NVCC_ARCHS]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "error" not in r.stderr.lower()


def test_source_needs_no_host_headers():
    """CuPy compiles with NVRTC, which has no system include path: ``#include <math.h>`` is a fatal error
    there and ``M_PI`` (a host math.h macro) is undefined. Only the half-precision headers, and only in the
    variants that use them."""
    for spec, dt, hdt, k in _variants():
        src = cuda_source(spec, dt, hdt, k)
        includes = re.findall(r"#\s*include\s*[<\"]([^>\"]+)", src)
        want = (["cuda_fp16.h"] if "float16" in (dt, hdt) else []) + (["cuda_bf16.h"] if dt == "bfloat16" else [])
        assert includes == want, (dt, hdt, includes)
        assert "M_PI" not in src


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found")
def test_forward_kernels_do_not_fuse_multiply_add(tmp_path):
    """With the launcher's NVRTC options the forward scans have no fused multiply-add: ``v * DEC + x``
    contracted into one fma rounds once, torch rounds twice, and V would not be bit-identical."""
    from snncc.runtime.cuda.kernels import NVRTC_OPTIONS
    cu = tmp_path / "lif.cu"
    cu.write_text(cuda_source(_spec("lif", decay_input=False)))     # v * DEC + x: contracted by default
    ptx = {}
    for name, opts in (("default", ["-std=c++17"]), ("launcher", list(NVRTC_OPTIONS))):
        out = tmp_path / f"{name}.ptx"
        r = subprocess.run(["nvcc", *opts, "-ptx", "-arch=sm_80", str(cu), "-o", str(out)],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-4000:]
        ptx[name] = {e.split("(")[0].strip(): e for e in out.read_text().split(".entry ")[1:]}
    fwd = ("snncc_scan_fwd", "snncc_pool_fwd")
    assert any("fma.rn" in ptx["default"][k] for k in fwd), "the check would not see a contraction"
    for k in fwd:
        assert "fma.rn" not in ptx["launcher"][k], k


def _nvrtc() -> Optional[ctypes.CDLL]:
    """libnvrtc, where installed (a CUDA toolkit, or PyPI's nvidia-cuda-nvrtc-cu12 / SNNCC_NVRTC=path)."""
    paths = [os.environ.get("SNNCC_NVRTC", ""), ctypes.util.find_library("nvrtc") or ""]
    spec = importlib.util.find_spec("nvidia.cuda_nvrtc") if importlib.util.find_spec("nvidia") else None
    if spec is not None and spec.submodule_search_locations:
        paths += sorted(glob.glob(os.path.join(list(spec.submodule_search_locations)[0], "lib", "libnvrtc.so*")))
    for p in paths:
        if p:
            try:
                return ctypes.CDLL(p)
            except OSError:
                continue
    return None


def nvrtc_compile(lib: ctypes.CDLL, src: str) -> Tuple[int, str]:
    """Compile ``src`` with NVRTC and the launcher's options (what CuPy does first on a GPU): (status, log)."""
    from snncc.runtime.cuda.kernels import NVRTC_OPTIONS
    prog = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), b"k.cu", 0, None, None) == 0
    opts = (ctypes.c_char_p * len(NVRTC_OPTIONS))(*[o.encode() for o in NVRTC_OPTIONS])
    rc = lib.nvrtcCompileProgram(prog, len(NVRTC_OPTIONS), opts)
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return rc, log.value.decode(errors="replace")[-3000:]


@pytest.mark.skipif(_nvrtc() is None, reason="libnvrtc not found (set SNNCC_NVRTC=/path/to/libnvrtc.so)")
def test_nvrtc_compiles_every_float_variant():
    """What CuPy does first on a GPU: NVRTC, the launcher's options, no include path at all. (The half
    variants need CuPy's include path for cuda_fp16.h / cuda_bf16.h and are left to the nvcc check.)"""
    lib = _nvrtc()
    for spec, dt, hdt, k in _variants():
        if "float16" in (dt, hdt) or dt == "bfloat16":
            continue
        rc, log = nvrtc_compile(lib, cuda_source(spec, dt, hdt, k))
        assert rc == 0, (spec, dt, log)


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
