"""The generated CUDA kernels, run on the CPU through a host emulator (tests/cuda_emu), against the reference.

Not marked ``cuda``: it needs only g++. The very source CuPy would compile is built as host C++ (warps of
32 lanes in lockstep at ``__ballot_sync``), and ``runtime.cuda.scan.cuda_scan`` -- the autograd Function
and argument marshalling ``launch.py`` uses on a GPU -- runs unchanged on CPU tensors with the emulated
launcher. As for the C kernels (tests/test_cpu_kernels.py): spikes and final V bit-identical to the
reference scan in float32 and float64 (same IEEE operations, no FMA contraction), gradients to float
tolerance (the surrogate's exp differs by ulps between libraries). Half and bfloat16 inputs run with
float32 state, so they are compared with the float32 reference on the same (upcast) values.

Gradients are taken of ``(spikes * g).sum() + (V * g_v).sum()`` with random ``g`` and ``g_v``: a
constant weight would hide a gradient laid out in the wrong memory order.
"""
from __future__ import annotations

import itertools
import sys
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import pytest
import torch

import cuda_emu
from snncc.neurons import NeuronSpec
from snncc.runtime.cuda import scan
from snncc.runtime.reference import neuron_scan
from snncc.surrogate import KNOWN_SURROGATES, SurrogateSpec

pytestmark = pytest.mark.skipif(not cuda_emu.available(),
                                reason="g++ not found: the CUDA emulator compiles the kernels as host C++")

# kind, decay_input, v_reset, detach_reset: every configuration the kernels generate code for (as the C tests)
CONFIGS = [v for v in itertools.product(["if", "lif", "plif"], [True, False], [0.0, 0.5, None], [False, True])
           if not (v[0] == "if" and not v[1])]
# (broadcast, channels_last, initial V given): every input layout; the reset start on the plainest one
LAYOUTS = [(False, False, True), (True, False, True), (False, True, True), (True, True, True),
           (False, False, False), (True, True, False)]
EXACT = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-9, atol=1e-12)}


def _spec(kind: str, decay_input: bool = True, v_reset: Optional[float] = 0.0, detach_reset: bool = False,
          surrogate: str = "sigmoid", alpha: float = 4.0, fn: Any = None) -> NeuronSpec:
    return NeuronSpec(kind, SurrogateSpec("callable" if fn else surrogate, 1.0 if fn else alpha, fn),
                      v_reset=v_reset, detach_reset=detach_reset, tau=2.0, decay_input=decay_input,
                      learnable=("w",) if kind == "plif" else ())


def _seed_surrogates() -> Dict[str, Any]:
    """Seed 001's hand-written surrogates (conftest): opaque to snncc, plain z >= 0 spikes."""
    from conftest import seed_surrogate_functions
    return {name: (lambda F: lambda z: F.apply(z, 2.0))(F)
            for name, F in seed_surrogate_functions(lambda x: (x >= 0).to(x.dtype)).items()}


# ----------------------------------------------------------------------------------------------- variants
SURROGATE_CASES = [(s, "lif", 0.0, torch.float32) for s in KNOWN_SURROGATES] + \
                  [(s, "plif", None, torch.float64) for s in KNOWN_SURROGATES]
USER_CASES = [("lif", 0.0, torch.float64), ("plif", None, torch.float64), ("if", 0.5, torch.float32)]
HALF_CASES = [("lif", 0.0, torch.float16), ("plif", None, torch.float16), ("lif", None, torch.bfloat16)]
ODD_POOLS = [((2, 3, 7, 5), 2), ((2, 2, 9, 9), 3), ((1, 5, 4, 4), 4)]


def _all_variants() -> List[Tuple[NeuronSpec, torch.dtype, Optional[torch.dtype], int]]:
    """Every (spec, dtype, h_dtype, pool_k) this module launches: compiled up front in a few libraries."""
    out = [(_spec(*c), dt, None, 2) for c in CONFIGS for dt in (torch.float32, torch.float64)]
    out += [(_spec(k, v_reset=vr, surrogate=s, alpha=2.0), dt, None, 2) for s, k, vr, dt in SURROGATE_CASES]
    # a user's surrogate: one source whichever function (the kernels read its derivative)
    user = next(iter(_seed_surrogates().values()))
    out += [(_spec(k, v_reset=vr, fn=user), dt, None, 2) for k, vr, dt in USER_CASES]
    out += [(_spec(k, v_reset=vr, surrogate="atan", alpha=2.0), dt, None, 2) for k, vr, dt in HALF_CASES]
    out += [(_spec("lif"), dt, torch.float16, 2) for dt in (torch.float32, torch.float64)]
    out += [(_spec("lif", surrogate="atan", alpha=2.0), torch.float64, None, k) for _, k in ODD_POOLS]
    out += [(_spec("if"), torch.float64, None, 2)]
    return out


@pytest.fixture(scope="module")
def emu() -> cuda_emu.EmuLauncher:
    launcher = cuda_emu.EmuLauncher(threads_per_block=scan.THREADS_PER_BLOCK)
    launcher.prepare([scan.kernel_source(s, dt, h, k) for s, dt, h, k in _all_variants()])
    return launcher


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    """neuron_scan on CPU tensors would pick the C kernels: the oracle is the torch reference scan."""
    monkeypatch.setenv("SNNCC_BACKEND", "reference")


# ----------------------------------------------------------------------------------------------- helpers
def _memory_order(t: torch.Tensor) -> torch.Tensor:
    """A 4-d step tensor's values in the order its memory holds them (what the kernels index)."""
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return t.permute(0, 2, 3, 1).reshape(-1)
    return t.reshape(-1)


def _unpack_bits(bits: torch.Tensor, K: int, M: int) -> torch.Tensor:
    """The kernels' spike bits (step t, neuron i: bit i % 32 of word t * ceil(M/32) + i / 32) as [K, M]."""
    words = (M + 31) // 32
    w = bits.view(K, words).to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(32, dtype=torch.int64)
    return ((w.unsqueeze(-1) >> shifts) & 1).reshape(K, words * 32)[:, :M].to(torch.float64)


def _inputs(K: int, dtype: torch.dtype, broadcast: bool, channels_last: bool, shape=(3, 4, 6, 6),
            scale: float = 2.0, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(K * shape[0], *shape[1:], generator=g, dtype=torch.float64) * scale).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return (x[:shape[0]] if broadcast else x.view(K, *shape)).detach().requires_grad_(True)


def _grads(s: torch.Tensor, v: torch.Tensor, g: torch.Tensor, g_v: torch.Tensor, wrt: List[torch.Tensor]):
    loss = (s.to(g.dtype) * g).sum() + (v.to(g_v.dtype) * g_v).sum()
    return torch.autograd.grad(loss, wrt)


def _run_both(emu, spec, x, K, broadcast, w, v0, pool, h_dtype=None, ref_dtype=None, seed=1):
    """Emulated CUDA and reference runs: (spikes, final V, grads of x [, v0] [, w]) of each, the CUDA scan's
    saved tensors and the reference's leaves. ``ref_dtype``: the reference runs on the inputs upcast to
    it (half inputs: float32 state)."""
    step_shape = tuple(x.shape) if broadcast else tuple(x.shape[1:])
    out_shape = (K,) + step_shape if pool is None else \
        (K,) + step_shape[:2] + (step_shape[2] // pool, step_shape[3] // pool)
    gen = torch.Generator().manual_seed(seed)
    cdt = ref_dtype or x.dtype
    # the spikes' gradient reaches the kernel in the spikes' dtype: make it exact there
    g = torch.randn(out_shape, generator=gen, dtype=torch.float64).to(x.dtype).to(cdt)
    g_v = torch.randn(step_shape, generator=gen, dtype=torch.float64).to(cdt)
    s_c, v_c = scan.cuda_scan(emu, spec, x, K, broadcast, v0, w, pool, h_dtype)
    saved = s_c.grad_fn.saved_tensors
    g_c = _grads(s_c, v_c, g, g_v, [t for t in (x, v0, w) if t is not None])
    xr = x.detach().to(cdt).requires_grad_(True)
    v0r = None if v0 is None else v0.detach().to(cdt).requires_grad_(True)
    s_r, (v_r,) = neuron_scan(spec, xr, K, broadcast, None if v0r is None else (v0r,), () if w is None else (w,),
                              pool=pool)
    g_r = _grads(s_r, v_r, g, g_v, [t for t in (xr, v0r, w) if t is not None])
    return (s_c, v_c, g_c), (s_r, v_r, g_r), saved, (xr, v0r)


def _check_saved(saved, spec, xr, K, broadcast, v0r, w, h_dtype):
    """What the CUDA scan keeps for backward: H per step equal to the reference's (rounded to ``h_dtype``),
    and spike bits equal to the reference's unpooled spikes in H's memory order (the kernels' index)."""
    hs, bits = saved[0], saved[1]
    s_full, _ = neuron_scan(spec, xr, K, broadcast, None if v0r is None else (v0r,), () if w is None else (w,))
    h_ref = s_full.grad_fn.saved_tensors[0]           # the reference scan's H per step
    assert torch.equal(hs, h_ref.to(hs.dtype)), "saved H differs from the reference's"
    assert hs[0].is_contiguous() or _is_cl(hs[0])
    M = hs[0].numel()
    expect = torch.stack([_memory_order(torch.empty_like(hs[0], dtype=torch.float64).copy_(s_full[t]))
                          for t in range(K)])
    assert torch.equal(_unpack_bits(bits, K, M), expect), "spike bits differ from the spikes"


def _is_cl(t: torch.Tensor) -> bool:
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def _compare(emu, spec, dtype, pool=None, shape=(3, 4, 6, 6), K=4, h_dtype=None, tol=None, layouts=LAYOUTS,
             ref_dtype=None, w_dtype=None):
    w = torch.tensor(-0.3, dtype=w_dtype or dtype, requires_grad=True) if spec.kind == "plif" else None
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    for n, (broadcast, channels_last, with_v0) in enumerate(layouts):
        x = _inputs(K, dtype, broadcast, channels_last, shape, seed=n)
        v0 = None
        if with_v0:
            gen = torch.Generator().manual_seed(50 + n)
            v0 = (torch.rand(shape, generator=gen, dtype=sdt) - 0.5).requires_grad_(True)
        (s_c, v_c, g_c), (s_r, v_r, g_r), saved, (xr, v0r) = _run_both(emu, spec, x, K, broadcast, w, v0, pool,
                                                                       h_dtype, ref_dtype, seed=100 + n)
        where = f"broadcast={broadcast} channels_last={channels_last} v0={with_v0}"
        assert 0 < s_r.mean() and (pool or s_r.mean() < 1), "some but not all neurons must spike"
        assert s_c.dtype == dtype and s_c.shape == s_r.shape, where
        assert torch.equal(s_c.to(s_r.dtype), s_r), f"spikes differ ({where})"
        assert v_c.dtype == sdt and torch.equal(v_c, v_r.to(sdt)), f"final V differs ({where})"
        names = ["x"] + (["v0"] if v0 is not None else []) + (["w"] if w is not None else [])
        for name, a, b, leaf in zip(names, g_c, g_r, [t for t in (x, v0, w) if t is not None]):
            assert a.dtype == leaf.dtype and a.shape == leaf.shape, (name, where)
            torch.testing.assert_close(a.to(b.dtype), b, **(tol or EXACT[dtype]),
                                       msg=lambda m: f"grad of {name} ({where}): {m}")
        _check_saved(saved, spec, xr, K, broadcast, v0r, w, h_dtype)


# ----------------------------------------------------------------------------------------------- the tests
@pytest.mark.parametrize("kind,decay_input,v_reset,detach_reset", CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_neuron_config_flat_and_pooled(emu, kind, decay_input, v_reset, detach_reset, dtype):
    """Each configuration: scan_fwd/scan_bwd and pool_fwd/pool_bwd, every layout, with and without V0."""
    spec = _spec(kind, decay_input, v_reset, detach_reset)
    _compare(emu, spec, dtype)
    _compare(emu, spec, dtype, pool=2, layouts=LAYOUTS[::2] + LAYOUTS[3:4])


@pytest.mark.parametrize("surrogate,kind,v_reset,dtype", SURROGATE_CASES)
def test_every_surrogate(emu, surrogate, kind, v_reset, dtype):
    spec = _spec(kind, v_reset=v_reset, surrogate=surrogate, alpha=2.0)
    _compare(emu, spec, dtype, layouts=LAYOUTS[:2])


@pytest.mark.parametrize("kind,v_reset,dtype", USER_CASES)
@pytest.mark.parametrize("pool", [None, 2])
def test_user_surrogate(emu, kind, v_reset, dtype, pool):
    """Opaque surrogates: their derivative from their own backward (``dsur``), the rest in the kernels."""
    from snncc.runtime import codegen
    for name, fn in _seed_surrogates().items():
        spec = _spec(kind, v_reset=v_reset, fn=fn)
        assert spec.surrogate.opaque and codegen.plain_step_surrogate(fn), name
        _compare(emu, spec, dtype, pool=pool, layouts=LAYOUTS[:4])


@pytest.mark.parametrize("kind,v_reset,dtype", HALF_CASES)
@pytest.mark.parametrize("pool", [None, 2])
def test_half_precision_inputs(emu, kind, v_reset, dtype, pool):
    """float16 / bfloat16 inputs, float32 state (and a float32 PLIF weight, as under autocast): the same
    spikes and V as the float32 reference on the same values; gradients rounded to the input's precision."""
    spec = _spec(kind, v_reset=v_reset, surrogate="atan", alpha=2.0)
    eps = torch.finfo(dtype).eps
    _compare(emu, spec, dtype, pool=pool, ref_dtype=torch.float32, w_dtype=torch.float32,
             tol=dict(rtol=2 * eps, atol=1e-6), layouts=LAYOUTS[:4])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_half_precision_h(emu, dtype):
    """memory="half": H kept in float16 for backward; same forward, gradients to half precision."""
    _compare(emu, _spec("lif"), dtype, h_dtype=torch.float16, tol=dict(rtol=2e-2, atol=2e-3))
    _compare(emu, _spec("lif"), dtype, h_dtype=torch.float16, pool=2, tol=dict(rtol=2e-2, atol=2e-3),
             layouts=LAYOUTS[2:4])


@pytest.mark.parametrize("shape,pool", ODD_POOLS)
def test_pool_odd_sizes(emu, shape, pool):
    """Partial windows at the right and bottom edges still integrate (final V) and get no spike gradient."""
    _compare(emu, _spec("lif", surrogate="atan", alpha=2.0), torch.float64, pool=pool, shape=shape)


@pytest.mark.parametrize("shape", [(1, 1, 3, 5), (2, 1, 16, 17)])
def test_partial_and_multiple_blocks(emu, shape):
    """Fewer neurons than a warp (one partial warp) and more than a block (several blocks, a partial one)."""
    _compare(emu, _spec("lif", surrogate="atan", alpha=2.0), torch.float64, shape=shape, layouts=LAYOUTS[:2])


def test_pool_routes_gradient_to_torch_argmax(emu):
    """All-zero windows and windows with several spikes: the gradient goes where max_pool2d sends it."""
    spec = _spec("if")
    x = torch.tensor([[[[2.0, 2.0, 0.0, 0.0], [2.0, 0.0, 0.0, 2.0]]]], dtype=torch.float64).requires_grad_(True)
    g = torch.tensor([[[[[1.0, 10.0]]]]], dtype=torch.float64)
    s, _ = scan.cuda_scan(emu, spec, x.unsqueeze(0), 1, False, None, None, 2)
    assert s.flatten().tolist() == [1.0, 1.0]
    (gx,) = torch.autograd.grad((s * g).sum(), x)
    d = gx.flatten().tolist()
    # window 1: the first of its three spikes (0, 0); window 2: the only spike (1, 3)
    assert d[0] != 0 and d[7] != 0 and all(d[i] == 0 for i in (1, 2, 3, 4, 5, 6)), d
    (gx_r,) = torch.autograd.grad((neuron_scan(spec, x.unsqueeze(0), 1, False, None, (), pool=2)[0] * g).sum(), x)
    torch.testing.assert_close(gx, gx_r, rtol=1e-12, atol=0)


def test_empty_batch(emu):
    """No neurons: no launch (a 0-block grid is an invalid launch configuration on CUDA), empty results."""
    spec = _spec("plif")
    w = torch.tensor(-0.3, requires_grad=True)
    for pool in (None, 2):
        x = torch.randn(4, 0, 4, 6, 6, requires_grad=True)
        s, v = scan.cuda_scan(emu, spec, x, 4, False, None, w, pool)
        assert s.shape == ((4, 0, 4, 6, 6) if pool is None else (4, 0, 4, 3, 3)) and v.shape == (0, 4, 6, 6)
        gx, gw = torch.autograd.grad(s.sum() + v.sum(), (x, w))
        assert gx.shape == x.shape and float(gw) == 0.0


def test_inference_and_strided_steps(emu):
    """Under no_grad nothing is kept for backward (no H, no bits); a time-strided input (steps not M
    apart) is made dense first; a V0 with a different layout and dtype is converted."""
    spec = _spec("lif", v_reset=None)
    K = 3
    x = torch.randn(2 * K, 2, 3, 5, 5, dtype=torch.float64)[::2] * 2
    v0 = torch.rand(2, 3, 5, 5).contiguous(memory_format=torch.channels_last)   # float32, channels-last
    with torch.no_grad():
        s, v = scan.cuda_scan(emu, spec, x, K, False, v0)
        s_r, (v_r,) = neuron_scan(spec, x, K, False, (v0.double(),), ())
    assert s.grad_fn is None and torch.equal(s, s_r) and torch.equal(v, v_r)
    x.requires_grad_(True)
    v0.requires_grad_(True)
    (s_c, v_c, g_c), (s_r, v_r, g_r), _, _ = _run_both(emu, spec, x, K, False, None, v0.double(), None)
    assert torch.equal(s_c, s_r) and torch.equal(v_c, v_r)
    for a, b in zip(g_c, g_r):
        torch.testing.assert_close(a, b, **EXACT[torch.float64])


def test_launch_py_through_a_stand_in_cupy(emu, monkeypatch):
    """launch.py -- the CuPy launcher and the public ``cuda_scan`` -- with a stand-in ``cupy`` whose
    RawModule compiles through the emulator: the same calls reach the kernels as on a GPU (names,
    grid and block tuples, argument tuple), NVRTC gets the options, results match the reference."""
    from snncc.runtime.cuda import kernels
    seen: Dict[str, Any] = {"options": [], "launches": []}

    class RawModule:
        def __init__(self, code: str, options: Tuple[str, ...] = ()) -> None:
            seen["options"].append(options)
            self._mod = emu.module(code)

        def get_function(self, name: str):
            def fn(grid: Tuple[int, ...], block: Tuple[int, ...], args: Tuple[Any, ...]) -> None:
                seen["launches"].append((name, grid, block))
                self._mod.call(name, grid[0], block[0], *args)
            return fn

    class ExternalStream:
        def __init__(self, ptr: int) -> None:
            self.ptr = ptr

        def __enter__(self) -> "ExternalStream":
            return self

        def __exit__(self, *exc: Any) -> None:
            return None

    class _Device:
        def __init__(self, device: Any) -> None:
            seen.setdefault("devices", []).append(device)

        def __enter__(self) -> None:
            return None

        def __exit__(self, *exc: Any) -> None:
            return None

    monkeypatch.setattr(torch.cuda, "device", _Device)
    launch = cuda_emu.stand_in_cupy(monkeypatch, RawModule, ExternalStream)

    spec = _spec("plif", v_reset=None)
    x = _inputs(4, torch.float32, True, True, (2, 3, 7, 6))
    w = torch.tensor(-0.3, requires_grad=True)
    for pool in (None, 2):
        # positionally, exactly as reference.neuron_scan calls it
        s, v = launch.cuda_scan(spec, x, 4, True, None, w, pool, None)
        s_r, (v_r,) = neuron_scan(spec, x, 4, True, None, (w,), pool=pool)
        assert torch.equal(s, s_r) and torch.equal(v, v_r)
        g = torch.randn(s.shape)
        for a, b in zip(torch.autograd.grad((s * g).sum() + v.sum(), (x, w)),
                        torch.autograd.grad((s_r * g).sum() + v_r.sum(), (x, w))):
            torch.testing.assert_close(a, b, **EXACT[torch.float32])
    assert seen["options"] and all(o == kernels.NVRTC_OPTIONS for o in seen["options"])
    assert "--fmad=false" in kernels.NVRTC_OPTIONS
    names = [n for n, _, _ in seen["launches"]]
    assert names == ["snncc_scan_fwd", "snncc_scan_bwd", "snncc_pool_fwd", "snncc_pool_bwd"]
    n_win = 2 * 3 * 4 * 3          # channels-last: P = N, C = channels, ceil(7/2) x ceil(6/2) windows
    assert seen["launches"][2][1:] == ((1,), (256,)) and n_win <= 256
    assert seen["launches"][0][1:] == (((2 * 3 * 7 * 6 + 255) // 256,), (256,))
    assert seen["devices"] == [x.device] * 2


def test_scan_module_never_imports_cupy(tmp_path):
    """``import snncc`` and the scan module work where importing cupy fails; launch.py is the importer."""
    import subprocess
    code = ("import sys; sys.modules['cupy'] = None\n"
            "import snncc, snncc.runtime.cuda.scan, snncc.runtime.reference\n"
            "try:\n    import snncc.runtime.cuda.launch\nexcept ImportError:\n    print('launch needs cupy')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "launch needs cupy"


# ----------------------------------------------------------------------------------------------- the emulator
_PROBE = r'''
extern "C" __global__ void probe_ballot(const int* __restrict__ pred, unsigned int* __restrict__ out, long long n) {
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  const unsigned int word = __ballot_sync(0xffffffffu, i < n && pred[i] != 0);
  if (i < n) out[i] = word;
}
extern "C" __global__ void probe_early_return(unsigned int* __restrict__ out, long long n) {
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  out[i] = __ballot_sync(0xffffffffu, 1);
}
extern "C" __global__ void probe_widths(double* __restrict__ out, long long a, int b, double c) {
  if (blockIdx.x == 0 && threadIdx.x == 0) out[0] = (double)a + (double)b + c;
}
'''


def test_emulator_ballot_is_warp_wide(emu):
    """Each lane gets its warp's ballot of all 32 lanes' predicates (lanes past n vote 0), per warp."""
    n = 300
    pred = (torch.arange(n) % 3 == 0).to(torch.int32) | (torch.arange(n) >= 290).to(torch.int32)
    out = torch.zeros(n, dtype=torch.int32)
    mod = emu.module(_PROBE)
    emu.launch(mod, "probe_ballot", n, np.uint64(pred.data_ptr()), np.uint64(out.data_ptr()), np.int64(n))
    padded = torch.cat([pred, torch.zeros(320 - n, dtype=torch.int32)]).view(10, 32).to(torch.int64)
    words = (padded << torch.arange(32)).sum(1)
    assert torch.equal(out.to(torch.int64) & 0xFFFFFFFF, words.repeat_interleave(32)[:n])


def test_emulator_reports_kernel_and_launch_misuse(emu):
    """What fails on a GPU (or silently corrupts) is an error here, not a quiet result."""
    mod = emu.module(_PROBE)
    out = torch.zeros(300, dtype=torch.int32)
    with pytest.raises(cuda_emu.EmuError, match="already returned"):    # ballot with exited lanes: UB
        emu.launch(mod, "probe_early_return", 300, np.uint64(out.data_ptr()), np.int64(300))
    res = torch.zeros(2, dtype=torch.float64)
    emu.launch(mod, "probe_widths", 1, np.uint64(res.data_ptr()), np.int64(2), np.int32(3), np.float64(0.5))
    assert float(res[0]) == 5.5
    with pytest.raises(cuda_emu.EmuError, match="np.int64"):          # CuPy would pack 4 bytes
        emu.launch(mod, "probe_widths", 1, np.uint64(res.data_ptr()), np.int32(2), np.int32(3), np.float64(0.5))
    with pytest.raises(cuda_emu.EmuError, match="not aligned"):
        emu.launch(mod, "probe_widths", 1, np.uint64(res.data_ptr() + 4), np.int64(2), np.int32(3), np.float64(0.5))
    with pytest.raises(cuda_emu.EmuError, match="invalid launch configuration"):
        emu.launch(mod, "probe_widths", 0, np.uint64(res.data_ptr()), np.int64(2), np.int32(3), np.float64(0.5))
    with pytest.raises(cuda_emu.EmuError, match="__syncthreads"):
        emu.module(_PROBE.replace("if (i < n) out[i] = word;", "__syncthreads(); if (i < n) out[i] = word;"))
