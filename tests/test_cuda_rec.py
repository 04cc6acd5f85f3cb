"""The CUDA recurrent cell (runtime/cuda/rec_kernels.py, rec_scan.py): a neuron layer fed back its own
spikes through a square Linear, one thread block per sample, the time loop inside the kernel.

Three layers, as for the lifted neuron scan (tests/test_cuda_ir.py):

* compile: every source below (snncc's LIF and AdaptiveLIF behind a user's add, ParametricLIF's scalar
  parameter, a user neuron with a per-neuron parameter and a division by 3, snnTorch's RLeaky reading its
  own recurrent Linear as the tap; float32 and float64; both division modes) compiles with ``nvcc`` for
  sm_80 and sm_90 in one call without headers, and the forward kernels of the +-*/ neurons have no fused
  multiply-add with the launcher's options; NVRTC itself where libnvrtc is installed;
* numerics on the host emulator (tests/cuda_emu, g++ only): ``rec_scan.rec_cuda_scan`` -- the autograd
  Function and marshalling a GPU runs -- against ``runtime.reference.recurrent_scan`` and torch autograd of
  it (spikes identical, states to rounding: the reference's ``F.linear`` sums in another order; gradients
  of e, W, b, the previous spikes, the initial states and every parameter to tolerance), and with IEEE
  division against the C cell (``cpu_recurrent.rec_c_scan``), which sums in the same order: spikes, states
  and, in float64, every gradient bit-identical;
* on a GPU (``cuda`` marker, skipped without a device and CuPy): the same against the reference on the
  device, and the dispatcher's hook.

The emulator runs a block's warps one after another, so it cannot run a block-wide barrier across warps;
but the kernels take any block of full warps, and in a block of one warp (what :class:`EmuBlocks` launches)
``__syncthreads()`` is exactly a ballot of all 32 lanes, which the emulator runs in lockstep. The shim
substitutes that, and a static array for the one dynamic shared-memory declaration (blocks run one after
another, and the kernels write their shared buffers before reading them): nothing else of the source
changes. H > 32 neurons per sample make every thread loop over several neurons (the path a GPU takes
beyond its block size).
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import importlib.util
import shutil
import subprocess
import types
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import pytest
import torch
from torch import nn

import cuda_emu
import snncc
from snncc.lift import lift_neuron
from snncc.neuron_ir import NeuronIR
from snncc.runtime import cpu_recurrent, reference
from snncc.runtime.cbuild import compiler_available
from snncc.runtime.cuda import ir_kernels, rec_kernels, rec_scan
from snncc.surrogate import ATan
from conftest import NVCC_ARCHS

requires_emu = pytest.mark.skipif(not cuda_emu.available(),
                                  reason="g++ not found: the CUDA emulator compiles the kernels as host C++")
requires_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found")
HAS_SNNTORCH = importlib.util.find_spec("snntorch") is not None
_HAS_GPU = torch.cuda.is_available() and importlib.util.find_spec("cupy") is not None
K, N, H = 6, 3, 45                 # H: two iterations of a 32-thread block, the second partial
DTYPES = (torch.float32, torch.float64)
TOL = {torch.float32: dict(rtol=2e-5, atol=2e-6), torch.float64: dict(rtol=1e-10, atol=1e-12)}
EMU_SHARED = 1 << 19               # bytes of the emulator's stand-in for dynamic shared memory


# ----------------------------------------------------------------------------------------------- neurons
class ChannelLIF(nn.Module):
    """A user's neuron: a learnable decay per neuron ([H]: ``full``), input divided by 3 (not a power of
    two: torch's CPU and CUDA kernels round it differently), soft reset, ATan surrogate."""

    def __init__(self, h: int = H) -> None:
        super().__init__()
        self.decay = nn.Parameter(torch.linspace(0.3, 0.9, h))
        self.sg = ATan()
        self.v: Optional[torch.Tensor] = None

    def reset(self) -> None:
        self.v = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.v is None:
            self.v = torch.zeros_like(x)
        h = self.v * self.decay + x / 3.0
        s = self.sg(h - 1.0)
        self.v = h - s
        return s


@functools.lru_cache(maxsize=None)
def _cell(name: str, dtype: torch.dtype, h: int = H) -> Tuple[NeuronIR, NeuronIR, str, Tuple[torch.Tensor, ...]]:
    """(first, steady, tap, params) of a cell, as the dispatcher hands them to a backend: a user's add
    (``with_tap``) for snncc's neurons, the module's own step for snnTorch's RLeaky (its graded spikes
    factor set to 0.5: spike values that are not 1 exercise the ``s * W`` products)."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if name == "rleaky":
            import snntorch
            from snncc.recognize import lift_with_tap
            m = snntorch.RLeaky(beta=0.8, linear_features=h, init_hidden=True)
            lifted, tap = lift_with_tap(m, dtype)
            params = []
            for attr, p in zip([a for a, q in zip(lifted.param_attrs, lifted.steady.params) if q != tap],
                               lifted.params_except(m, tap)):
                p = torch.full_like(p, 0.5) if attr == "graded_spikes_factor" else p.detach().clone()
                params.append(p.requires_grad_(p.is_floating_point()))
            return lifted.first, lifted.steady, tap, tuple(params)
        m = {"lif": snncc.LIF, "alif": snncc.AdaptiveLIF, "plif": snncc.ParametricLIF,
             "chan": lambda: ChannelLIF(h)}[name]().to(dtype)
        lifted = lift_neuron(m, dtype)
        params = tuple(p.detach().clone().requires_grad_(True) for p in lifted.params(m))
        return lifted.first, cpu_recurrent.with_tap(lifted.steady), cpu_recurrent.TAP, params


# name -> (dtypes, +-*/ only (forward without fma), available)
NEURONS: Dict[str, Tuple[Tuple[torch.dtype, ...], bool, bool]] = {
    "lif": (DTYPES, True, True),
    "alif": (DTYPES, True, True),
    "plif": ((torch.float64,), False, True),
    "chan": (DTYPES, True, True),
    # NOTE: snnTorch's spikes are float32 whatever the model's dtype (tests/test_recurrent.py)
    "rleaky": ((torch.float32,), True, HAS_SNNTORCH),
}
CASES = [(n, dt) for n, (dts, _, ok) in NEURONS.items() if ok for dt in dts]


def _steps(name: str, dtype: torch.dtype, division: str) -> Tuple[NeuronIR, NeuronIR]:
    """The IRs the cell compiles for ``division`` (what the oracle must interpret too)."""
    first, steady, _, _ = _cell(name, dtype)
    if division == "reciprocal":
        return ir_kernels.torch_cuda_semantics(first), ir_kernels.torch_cuda_semantics(steady)
    return first, steady


def _full(params: Sequence[torch.Tensor]) -> Tuple[bool, ...]:
    return tuple(p.numel() > 1 for p in params)


# ----------------------------------------------------------------------------------------------- emulator
@functools.lru_cache(maxsize=None)
def emulable(src: str) -> str:
    """``src`` as the host emulator runs it in blocks of one warp (module docstring): the barrier as a
    32-lane ballot, the dynamic shared memory as a static array."""
    assert src.count(rec_kernels.SHARED_DECL) == 2 and src.count("__syncthreads()") >= 4
    out = src.replace("__syncthreads()", "__ballot_sync(0xffffffffu, 1)")
    out = out.replace(rec_kernels.SHARED_DECL, f"static double rk_smem[{EMU_SHARED // 8}];")
    assert "__shared__" not in out and "__syncthreads" not in out
    return out


class EmuBlocks:
    """``rec_scan.BlockLauncher`` on the host emulator: blocks of one warp (32 threads)."""

    max_threads = 32

    def __init__(self, emu: cuda_emu.EmuLauncher) -> None:
        self.emu = emu
        self.launches: List[Tuple[str, int, int, int]] = []

    def prepare(self, sources: Sequence[str]) -> None:
        self.emu.prepare([emulable(s) for s in sources])

    def module(self, src: str) -> cuda_emu.EmuModule:
        return self.emu.module(emulable(src))

    def launch_blocks(self, handle: cuda_emu.EmuModule, name: str, grid: int, block: int, shared_bytes: int,
                      *args: Any) -> None:
        assert block == 32 and shared_bytes <= EMU_SHARED, (block, shared_bytes)
        self.launches.append((name, grid, block, shared_bytes))
        handle.call(name, grid, block, *args)

    def max_shared_bytes(self, device: torch.device) -> int:
        return EMU_SHARED


def _all_sources() -> List[str]:
    """Every source the emulator tests launch (compiled up front, in parallel, into a few libraries)."""
    out = []
    for name, dt in CASES:
        first, steady, tap, params = _cell(name, dt)
        for division in ("reciprocal", "true"):
            f, s = _steps(name, dt, division)
            out.append(rec_scan.rec_kernel_source(f, s, _full(params), tap))
    return out


@pytest.fixture(scope="module")
def emu() -> EmuBlocks:
    if not cuda_emu.available():
        pytest.skip("g++ not found")
    launcher = EmuBlocks(cuda_emu.EmuLauncher())
    launcher.prepare(_all_sources())
    return launcher


# ----------------------------------------------------------------------------------------------- inputs
def _inputs(name: str, dtype: torch.dtype, seed: int, k: int = K, n: int = N, h: int = H, bias: bool = True,
            sp: bool = False, state: bool = False, dev: str = "cpu") -> Dict[str, Any]:
    """Leaves that need grad: e, W (scaled for ~10-40% firing with a recurrence that matters), b, the
    previous chunk's spikes and the states some steps in (the reference's own, on other inputs)."""
    first, steady, tap, params = _cell(name, dtype, h)
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64)
    e = rnd(k, n, h) * 1.2 + 0.5
    w = rnd(h, h) * (2.0 / h ** 0.5)
    b = rnd(h) * 0.2 if bias else None
    val = 0.5 if name == "rleaky" else 1.0
    sp0 = (torch.rand(n, h, generator=g) < 0.3).double() * val if sp else None
    st = None
    if state:
        with torch.no_grad():
            _, st = reference.recurrent_scan(first, steady, tap, (rnd(3, n, h) + 0.5).to(dtype), w.to(dtype),
                                             None, None, None, params)
    leaf = lambda t: None if t is None else t.to(dtype).to(dev).detach().requires_grad_(True)  # noqa: E731
    return dict(e=leaf(e), w=leaf(w), b=leaf(b), sp0=leaf(sp0),
                state=None if st is None else tuple(leaf(s) for s in st),
                params=tuple(p.to(dev).detach().requires_grad_(p.requires_grad) for p in params))


def _leaves(inp: Dict[str, Any]) -> Tuple[List[str], List[torch.Tensor]]:
    names, ts = [], []
    for k in ("e", "w", "b", "sp0"):
        if inp[k] is not None:
            names.append(k)
            ts.append(inp[k])
    for j, s in enumerate(inp["state"] or ()):
        names.append(f"state{j}")
        ts.append(s)
    for j, p in enumerate(inp["params"]):
        if p.requires_grad:
            names.append(f"param{j}")
            ts.append(p)
    return names, ts


def _loss(out: torch.Tensor, states: Sequence[torch.Tensor], seed: int) -> torch.Tensor:
    """A random weighting of the spikes and the final states (a constant one hides layout errors)."""
    g = torch.Generator().manual_seed(seed)
    loss = (out * torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype).to(out.device)).sum()
    for s in states:
        loss = loss + (s * torch.randn(s.shape, generator=g, dtype=torch.float64).to(s.dtype).to(s.device)).sum()
    return loss


def _run(fn: Callable[..., Any], first: NeuronIR, steady: NeuronIR, tap: str, inp: Dict[str, Any], seed: int,
         **kw: Any) -> Tuple[torch.Tensor, Tuple[torch.Tensor, ...], Dict[str, Optional[torch.Tensor]]]:
    res = fn(first, steady, tap, inp["e"], inp["w"], inp["b"], inp["sp0"], inp["state"], inp["params"], **kw)
    assert res is not None
    out, sn = res
    names, leaves = _leaves(inp)
    grads = torch.autograd.grad(_loss(out, sn, seed), leaves, allow_unused=True)
    return out, sn, dict(zip(names, grads))


def _check(launcher: Any, name: str, dtype: torch.dtype, seed: int, division: str = "reciprocal",
           **kw: Any) -> Tuple[torch.Tensor, Tuple[torch.Tensor, ...]]:
    """The emulated (or on-GPU) cell vs the reference loop and torch autograd of it."""
    first, steady, tap, _ = _cell(name, dtype, kw.get("h", H))
    inp = _inputs(name, dtype, seed, **kw)
    where = f"{name} {dtype} {division} {kw}"
    out, sn, g = _run(rec_scan.rec_cuda_scan, first, steady, tap, inp, seed + 1, launcher=launcher,
                      division=division)
    rf, rs = (ir_kernels.torch_cuda_semantics(first), ir_kernels.torch_cuda_semantics(steady)) \
        if division == "reciprocal" else (first, steady)
    ref, ref_sn, g_ref = _run(reference.recurrent_scan, rf, rs, tap, inp, seed + 1)
    rate = (ref[1:] if len(ref) > 1 else ref).ne(0).double().mean().item()
    assert 0.05 < rate < 0.7, f"{where}: firing rate {rate}"
    assert out.shape == ref.shape and out.dtype == ref.dtype and len(sn) == len(ref_sn), where
    assert torch.equal(out, ref), f"{where}: spikes differ at {int((out != ref).sum())} places"
    for a, b in zip(sn, ref_sn):
        torch.testing.assert_close(a, b, **TOL[dtype], msg=lambda m: f"{where}: final state: {m}")
    for k, b in g_ref.items():
        a = g[k]
        if b is None:
            assert a is None or not a.any(), (where, k)
            continue
        assert a is not None and a.shape == b.shape and a.dtype == b.dtype, (where, k)
        torch.testing.assert_close(a, b, **TOL[dtype], msg=lambda m: f"{where}: grad of {k}: {m}")
    return out, sn


# ----------------------------------------------------------------------------------------------- compile
def _compile_variants() -> List[Tuple[str, torch.dtype, str]]:
    return [(n, dt, "reciprocal") for n, dt in CASES] + [(n, torch.float32, "true") for n in ("chan",)]


def _sources(prefixed: bool = True) -> List[Tuple[str, str]]:
    out = []
    for i, (name, dt, division) in enumerate(_compile_variants()):
        _, _, tap, params = _cell(name, dt)
        src = rec_kernels.rec_cuda_source(*_steps(name, dt, division), _full(params), tap,
                                          prefix=f"v{i}" if prefixed else rec_kernels.PREFIX)
        out.append((f"{name}/{dt}/{division}", src))
    return out


@requires_nvcc
def test_every_cell_compiles_for_sm80_and_sm90(tmp_path: Path) -> None:
    """All variants in one translation unit, one nvcc call, both architectures; INFINITY and NAN undefined
    first (NVRTC has no math.h), so the sources' own fallbacks compile. Then the PTX with the launcher's
    options: the +-*/ neurons' forward kernels (the spike-driven sum included) have no fused multiply-add
    -- the C cell's bits need two roundings per ``r += s * w``."""
    from snncc.runtime.cuda.kernels import NVRTC_OPTIONS
    srcs = _sources()
    cu = tmp_path / "rec_variants.cu"
    cu.write_text("#undef INFINITY\n#undef NAN\n" + "\n".join(s for _, s in srcs))
    fmad = [o for o in NVRTC_OPTIONS if o.startswith("--fmad")]
    assert fmad == ["--fmad=false"]
    r = subprocess.run(["nvcc", "-std=c++17", *fmad, "-c", str(cu), "-o", str(tmp_path / "all.o"),
                        *NVCC_ARCHS],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "error" not in r.stderr.lower(), r.stderr[-4000:]
    exact = [i for i, (name, _, _) in enumerate(_compile_variants()) if NEURONS[name][1]]
    part, ptx = tmp_path / "exact.cu", tmp_path / "exact.ptx"
    part.write_text("\n".join(srcs[i][1] for i in exact))
    r = subprocess.run(["nvcc", *NVRTC_OPTIONS, "-ptx", "-arch=sm_80", str(part), "-o", str(ptx)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]
    entries = {e.split("(")[0].strip(): e for e in ptx.read_text().split(".entry ")[1:]}
    for i in exact:
        assert f"v{i}_fwd" in entries and "fma.rn" not in entries[f"v{i}_fwd"], _compile_variants()[i]
        assert "bar.sync" in entries[f"v{i}_fwd"] and "vote.sync.ballot" in entries[f"v{i}_fwd"]


def test_sources_need_no_headers() -> None:
    """NVRTC has no include path: no #include, no M_PI; INFINITY/NAN only through the guarded fallbacks;
    the kernels are extern "C" with the documented names, each with the one shared-memory declaration."""
    for what, src in _sources(prefixed=False):
        assert not [ln for ln in src.splitlines() if ln.lstrip().startswith("#include")], what
        assert "M_PI" not in src, what
        assert src.count(ir_kernels.NVRTC_PRELUDE) == 1 and "__CUDA_ARCH__" in src, what
        for name in rec_kernels.rec_kernel_names():
            assert f'extern "C" __global__ void {name}(' in src, what
        assert src.count(rec_kernels.SHARED_DECL) == 2, what


def test_nvrtc_compiles_every_variant() -> None:
    """What CuPy does first on a GPU: NVRTC with the launcher's options and no include path at all."""
    from test_cuda_codegen import _nvrtc, nvrtc_compile
    lib = _nvrtc()
    if lib is None:
        pytest.skip("libnvrtc not found (set SNNCC_NVRTC=/path/to/libnvrtc.so)")
    for i, (name, dt, division) in enumerate(_compile_variants()):
        _, _, tap, params = _cell(name, dt)
        src = rec_kernels.rec_cuda_source(*_steps(name, dt, division), _full(params), tap)
        rc, log = nvrtc_compile(lib, src)
        assert rc == 0, (name, dt, log)


def test_modules_import_no_cupy() -> None:
    """rec_kernels and rec_scan import neither cupy nor launch.py at module level (rec_scan reaches
    launch.py only inside the CuPy launcher's methods), so they load, and run on the emulator, without
    CuPy."""
    import snncc.runtime.cuda as pkg
    for mod in ("rec_kernels", "rec_scan"):
        tree = ast.parse(Path(pkg.__file__).with_name(f"{mod}.py").read_text())
        names = [a.name for n in tree.body if isinstance(n, ast.Import) for a in n.names]
        names += [n.module or "" for n in tree.body if isinstance(n, ast.ImportFrom)]
        assert names and not any("cupy" in n or n.endswith("launch") for n in names), (mod, names)


# ----------------------------------------------------------------------------------------------- emulated
@requires_emu
@pytest.mark.parametrize("name,dtype", CASES, ids=[f"{n}-{str(d)[6:]}" for n, d in CASES])
def test_emulated_cell_matches_reference(emu: EmuBlocks, name: str, dtype: torch.dtype) -> None:
    """From a sequence's start, and as a later chunk (the previous spikes and the states given): spikes
    identical, states and every gradient as the reference loop's with torch autograd."""
    _check(emu, name, dtype, seed=10)
    _check(emu, name, dtype, seed=20, sp=True, state=True)


@requires_emu
def test_emulated_cell_edge_starts_and_no_bias(emu: EmuBlocks) -> None:
    """A state without previous spikes (r_0 = b), previous spikes without a state (the first step of a
    user's add has no recurrent term: none of r_0 reaches W, b or the spikes), no bias, a single step.
    (The C cell's W/b gradients differ from the reference in the first two: see rec_scan._reads_tap_at_0.)"""
    _check(emu, "alif", torch.float64, seed=30, state=True)
    _check(emu, "lif", torch.float64, seed=31, sp=True)
    _check(emu, "chan", torch.float64, seed=32, bias=False, sp=True, state=True)
    _check(emu, "lif", torch.float64, seed=33, k=1, sp=True, state=True)
    if HAS_SNNTORCH:
        _check(emu, "rleaky", torch.float32, seed=34, k=1)


@requires_emu
@pytest.mark.skipif(not compiler_available(), reason="no C compiler")
@pytest.mark.parametrize("name,dtype", [c for c in CASES if c[0] in ("alif", "chan", "rleaky")],
                         ids=lambda v: str(v)[6:] if isinstance(v, torch.dtype) else v)
def test_emulated_cell_equals_the_c_cell(emu: EmuBlocks, name: str, dtype: torch.dtype) -> None:
    """With IEEE division the CUDA cell computes what the C cell computes, in the same order (the
    spike-driven sum over j ascending, W^T g_r over rows ascending, zeros skipped): spikes and final
    states bit-identical; gradients bit-identical in float64 (the surrogate's exp is libm's in both), to
    float tolerance in float32 (the C backward's vectorizable expf)."""
    first, steady, tap, _ = _cell(name, dtype)
    for seed, kw in ((40, {}), (41, dict(sp=True, state=True))):
        inp = _inputs(name, dtype, seed, **kw)
        out, sn, g = _run(rec_scan.rec_cuda_scan, first, steady, tap, inp, seed, launcher=emu, division="true")
        c_out, c_sn, c_g = _run(cpu_recurrent.rec_c_scan, first, steady, tap, inp, seed)
        assert torch.equal(out, c_out) and all(torch.equal(a, b) for a, b in zip(sn, c_sn)), (name, kw)
        assert 0 < (out != 0).double().mean() < 0.7
        for k, b in c_g.items():
            if dtype == torch.float64:
                assert torch.equal(g[k], b), (name, kw, k, (g[k] - b).abs().max())
            else:
                torch.testing.assert_close(g[k], b, **TOL[dtype])


@requires_emu
def test_division_modes_differ_where_torch_does(emu: EmuBlocks) -> None:
    """``x / 3``: CUDA torch multiplies by the reciprocal, CPU torch divides; each mode matches its own
    oracle (``_check``), and the two really round differently somewhere (the oracle choice is not
    vacuous)."""
    _, sr = _check(emu, "chan", torch.float32, seed=50)
    _, st = _check(emu, "chan", torch.float32, seed=50, division="true")
    assert not torch.equal(sr[0], st[0])
    first, steady, tap, params = _cell("lif", torch.float32)
    inp = _inputs("lif", torch.float32, 0)
    with pytest.raises(ValueError, match="division"):
        rec_scan.rec_cuda_scan(first, steady, tap, inp["e"], inp["w"], None, None, None, (), launcher=emu,
                               division="fast")


@requires_emu
def test_launch_geometry_and_what_is_kept(emu: EmuBlocks) -> None:
    """One block per sample, full warps, shared memory as rec_shared_bytes says; under no_grad the
    same spikes; with grad only e, W, b, the one step of previous spikes, the states and the parameters
    are kept."""
    first, steady, tap, params = _cell("alif", torch.float64)
    inp = _inputs("alif", torch.float64, 60, sp=True, state=True)
    n0 = len(emu.launches)
    out, sn = rec_scan.rec_cuda_scan(first, steady, tap, inp["e"], inp["w"], inp["b"], inp["sp0"], inp["state"],
                                     params, launcher=emu)
    fwd_b, bwd_b = rec_kernels.rec_shared_bytes(steady, H)
    assert emu.launches[n0:] == [("snncc_rec_fwd", N, 32, fwd_b)]
    assert fwd_b == 2 * 4 * 2 and bwd_b == 2 * H * 8 + fwd_b
    assert len(out.grad_fn.saved_tensors) == 4 + 2          # e, w, b, sp0, two states (no parameters)
    torch.autograd.grad(out.sum(), inp["w"])
    assert emu.launches[-1] == ("snncc_rec_bwd", N, 32, bwd_b)
    with torch.no_grad():
        o2, s2 = rec_scan.rec_cuda_scan(first, steady, tap, inp["e"], inp["w"], inp["b"], inp["sp0"],
                                        inp["state"], params, launcher=emu)
    assert o2.grad_fn is None and torch.equal(o2, out) and torch.equal(s2[1], sn[1])


@requires_emu
def test_empty_batch_and_what_is_declined(emu: EmuBlocks) -> None:
    """No samples: no launch (a 0-block grid is invalid on CUDA), empty results, zero gradients. Tensors
    the kernels do not take give None (the caller runs the reference loop), and so do steps they do not
    generate; off a GPU the support check says why."""
    first, steady, tap, params = _cell("lif", torch.float32)
    e = torch.randn(K, 0, H, requires_grad=True)
    w = torch.randn(H, H, requires_grad=True)
    n0 = len(emu.launches)
    out, (v,) = rec_scan.rec_cuda_scan(first, steady, tap, e, w, None, None, None, (), launcher=emu)
    assert out.shape == e.shape and v.shape == (0, H) and len(emu.launches) == n0
    ge, gw = torch.autograd.grad(out.sum() + v.sum(), (e, w))
    assert ge.shape == e.shape and not gw.any()
    e = torch.randn(K, N, H)
    scan = functools.partial(rec_scan.rec_cuda_scan, first, steady, tap, launcher=emu)
    assert scan(e.double(), w.double(), None, None, None, ()) is None                  # not the IR's dtype
    assert scan(e, w.double(), None, None, None, ()) is None                           # mixed dtypes
    assert scan(e, w[:, :-1], None, None, None, ()) is None                            # not square H x H
    assert scan(e, w, torch.zeros(H + 1), None, None, ()) is None                      # bias shape
    assert scan(e, w, None, None, (torch.zeros(N, H), torch.zeros(N, H)), ()) is None  # two states for one
    assert scan(e[0], w, None, None, None, ()) is None                                 # not [K, N, H]
    f2, s2, tap2, p2 = _cell("plif", torch.float64)
    ed = e.double()
    assert rec_scan.rec_cuda_scan(f2, s2, tap2, ed, w.double(), None, None, None, (), launcher=emu) is None
    assert rec_scan.rec_cuda_scan(f2, s2, tap2, ed, w.double(), None, None, None, (torch.ones(H + 1).double(),),
                                  launcher=emu) is None
    assert rec_scan.cuda_supports_rec(first, steady, e) == "the input is not a CUDA tensor"
    assert rec_scan.rec_cuda_scan(first, steady, tap, e, w, None, None, None, ()) is None   # CPU, no launcher
    # a user surrogate (its derivative is taken by its own backward): the reference loop runs it
    from snncc.surrogate import SurrogateSpec
    user = dataclasses.replace(steady, surrogates=tuple(SurrogateSpec("callable", 1.0, lambda z: (z >= 0).float())
                                                        for _ in steady.surrogates))
    assert "user surrogate" in rec_scan._supports(first, user, tap)
    assert rec_scan.rec_cuda_scan(first, user, tap, e, w, None, None, None, (), launcher=emu) is None


@requires_emu
def test_wide_sample_and_long_sequence(emu: EmuBlocks) -> None:
    """H = 100: four block iterations and four bit words per step (set bits in every word), K = 12."""
    first, steady, tap, params = _cell("lif", torch.float64, 100)
    emu.prepare([rec_scan.rec_kernel_source(*(ir_kernels.torch_cuda_semantics(ir) for ir in (first, steady)),
                                            (), tap)])
    _check(emu, "lif", torch.float64, seed=70, k=12, h=100, sp=True, state=True)


class _CudaLooking(torch.Tensor):
    """A CPU tensor that says it is on CUDA: drives the dispatcher's CUDA branch without a GPU."""

    @property
    def is_cuda(self) -> bool:          # type: ignore[override]
        return True


@requires_emu
@pytest.mark.parametrize("which", ["user_add", "rleaky"])
def test_dispatch_hook_tries_the_cuda_cell_first(emu: EmuBlocks, monkeypatch: pytest.MonkeyPatch,
                                                 which: str) -> None:
    """``dispatch.recurrent_cell_scan`` with a CUDA input asks ``rec_scan`` first, with the kernel steps
    (parameter-only ops hoisted: RLeaky's clamped beta is a derived parameter) and the tap's name; its
    result is the cell's. On a CPU input the CUDA cell is not consulted (the C loop runs as before)."""
    from snncc.runtime import dispatch
    from snncc.runtime.cuda import rec_scan as rs
    if which == "rleaky" and not HAS_SNNTORCH:
        pytest.skip("snntorch is not installed")
    torch.manual_seed(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if which == "rleaky":
            import snntorch
            from snncc.recognize import lift_with_tap
            m = snntorch.RLeaky(beta=0.8, linear_features=H, init_hidden=True)
            lifted, tap = lift_with_tap(m, torch.float32)
            params, first, steady, name = lifted.params_except(m, tap), lifted.first, lifted.steady, tap
        else:
            m = snncc.ParametricLIF()
            lifted, tap = lift_neuron(m, torch.float32), None
            params, name = lifted.params(m), cpu_recurrent.TAP
            first, steady = lifted.first, cpu_recurrent.with_tap(lifted.steady)
    inp = _inputs("lif", torch.float32, 100, sp=True, state=False)
    e, w, b, sp0 = inp["e"].detach(), inp["w"].detach(), inp["b"].detach(), inp["sp0"].detach()
    seen: List[Any] = []
    real_scan = rs.rec_cuda_scan

    def supports(f: NeuronIR, s: NeuronIR, x: torch.Tensor, t: str) -> Optional[str]:
        seen.append(("supports", t, s.params))
        return rs._supports(f, s, t)

    def scan(f: NeuronIR, s: NeuronIR, t: str, x: torch.Tensor, *rest: Any) -> Any:
        seen.append(("scan", len(rest[-1])))
        return real_scan(f, s, t, x.as_subclass(torch.Tensor), *rest, launcher=emu)
    monkeypatch.setattr(rs, "cuda_supports_rec", supports)
    monkeypatch.setattr(rs, "rec_cuda_scan", scan)
    state = None
    with torch.no_grad():
        out, sn = dispatch.recurrent_cell_scan(lifted, e.as_subclass(_CudaLooking), w, b, sp0, state, params, tap)
        ref, ref_sn = reference.recurrent_scan(ir_kernels.torch_cuda_semantics(first),
                                               ir_kernels.torch_cuda_semantics(steady), name, e, w, b, sp0,
                                               state, params)
    n_kernel = len([p for p in dispatch._kernel_steps(lifted)[0].steady.params if p != name])
    assert seen[0][0] == "supports" and seen[0][1] == name and seen[1] == ("scan", n_kernel), seen
    assert torch.equal(out, ref) and all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(sn, ref_sn))
    seen.clear()
    if compiler_available():          # a CPU input: the C loop, as before the hook

        def no_reference(*a: Any, **k: Any) -> None:
            raise AssertionError("the reference loop ran: the C loop should have")
        monkeypatch.setattr(reference, "recurrent_scan", no_reference)
    with torch.no_grad():
        out_c, _ = dispatch.recurrent_cell_scan(lifted, e, w, b, sp0, state, params, tap)
    assert seen == [] and torch.equal(out_c, out)


# ----------------------------------------------------------------------------------------------- CuPy launcher
class _FakeFn:
    """Stands in for a CuPy kernel function: its attributes, and the calls it gets."""

    def __init__(self, mod: Any, name: str, max_threads: int) -> None:
        self.mod, self.name = mod, name
        self.max_threads_per_block = max_threads
        self.max_dynamic_shared_size_bytes = 48 * 1024
        self.calls: List[Tuple[Any, ...]] = []

    def __call__(self, grid: Tuple[int, ...], block: Tuple[int, ...], args: Tuple[Any, ...],
                 shared_mem: int = 0) -> None:
        self.calls.append((grid, block, shared_mem, self.max_dynamic_shared_size_bytes))
        if self.mod is not None:
            self.mod.call(self.name, grid[0], block[0], *args)


@requires_emu
def test_cupy_launcher_through_a_stand_in_cupy(emu: EmuBlocks, monkeypatch: pytest.MonkeyPatch) -> None:
    """``CupyBlockLauncher`` with a stand-in ``cupy`` whose RawModule compiles through the emulator: NVRTC
    gets the launcher's options, the kernels are found by name, the block is lowered to what the compiled
    kernel allows (here one warp, so the emulator can run it), launches go to torch's stream, shared
    memory beyond 48 KiB is opted into first; results as the reference's."""
    from snncc.runtime.cuda import kernels
    seen: Dict[str, List[Any]] = {"options": [], "fns": [], "streams": []}

    class RawModule:
        def __init__(self, code: str, options: Tuple[str, ...] = ()) -> None:
            seen["options"].append(options)
            self._mod = emu.module(code)

        def get_function(self, name: str) -> _FakeFn:
            fn = _FakeFn(self._mod, name, 32)
            seen["fns"].append(fn)
            return fn

    class _Stream:
        def __init__(self, ptr: int) -> None:
            seen["streams"].append(ptr)

        def __enter__(self) -> None:
            return None

        def __exit__(self, *exc: Any) -> None:
            return None

    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda d: types.SimpleNamespace(shared_memory_per_block_optin=100 * 1024))
    cuda_emu.stand_in_cupy(monkeypatch, RawModule, _Stream)
    cupy_launcher = rec_scan.CupyBlockLauncher()
    _check(cupy_launcher, "chan", torch.float32, seed=80, sp=True, state=True)
    assert seen["options"] and all(o == kernels.NVRTC_OPTIONS for o in seen["options"])
    assert [f.name for f in seen["fns"]] == ["snncc_rec_fwd", "snncc_rec_bwd"]
    # asked for two warps (H = 45), lowered to the one the stand-in allows; 45 floats of g_r x 2 + bits
    fwd_b, bwd_b = rec_kernels.rec_shared_bytes(_cell("chan", torch.float32)[1], H)
    assert [f.calls for f in seen["fns"]] == [[((N,), (32,), fwd_b, 48 * 1024)], [((N,), (32,), bwd_b, 48 * 1024)]]
    assert set(seen["streams"]) == {7}
    # a wide layer's backward: more than the portable 48 KiB is opted into before the launch
    fn = _FakeFn(None, "snncc_rec_bwd", 1024)
    handle = types.SimpleNamespace(get_function=lambda name: fn)
    cupy_launcher.launch_blocks(handle, "snncc_rec_bwd", 5, 512, 64 * 1024)
    assert fn.calls == [((5,), (512,), 64 * 1024, 64 * 1024)]
    assert cupy_launcher.max_shared_bytes(torch.device("cpu")) == 100 * 1024
    assert rec_scan._block(cupy_launcher, 1000) == rec_scan.MAX_THREADS and rec_scan._block(cupy_launcher, 5) == 32


# ----------------------------------------------------------------------------------------------- on a GPU
@pytest.mark.cuda
@pytest.mark.skipif(not _HAS_GPU, reason="needs a CUDA device and CuPy")
@pytest.mark.parametrize("name,dtype", CASES, ids=[f"{n}-{str(d)[6:]}" for n, d in CASES])
def test_gpu_cell_matches_reference_on_the_device(name: str, dtype: torch.dtype) -> None:
    """On a GPU, CuPy's launcher (blocks of up to 256 threads, several warps: the barrier the emulator
    cannot check): against the reference loop on the same device (torch's CUDA kernels, whose division by
    a constant the default mode reproduces)."""
    for seed, kw in ((90, {}), (91, dict(sp=True, state=True)), (92, dict(h=300, sp=True, state=True))):
        first, steady, tap, _ = _cell(name, dtype, kw.get("h", H))      # h = 300: two 256-thread iterations
        inp = _inputs(name, dtype, seed, dev="cuda", **kw)
        out, sn, g = _run(rec_scan.rec_cuda_scan, first, steady, tap, inp, seed)
        rf, rs = ir_kernels.torch_cuda_semantics(first), ir_kernels.torch_cuda_semantics(steady)
        ref, ref_sn, g_ref = _run(reference.recurrent_scan, rf, rs, tap, inp, seed)
        assert torch.equal(out, ref), (name, kw)
        for a, b in zip(sn, ref_sn):
            torch.testing.assert_close(a, b, **TOL[dtype])
        for k, b in g_ref.items():
            if b is not None:
                torch.testing.assert_close(g[k], b, rtol=1e-4 if dtype == torch.float32 else 1e-9,
                                           atol=1e-5 if dtype == torch.float32 else 1e-11)


@pytest.mark.cuda
@pytest.mark.skipif(not _HAS_GPU or not compiler_available(), reason="needs a CUDA device, CuPy and a C compiler")
def test_gpu_cell_with_ieee_division_gives_the_c_cells_bits() -> None:
    """``division="true"`` on the device: the C cell's spikes and final states, bit for bit."""
    name, dtype = "chan", torch.float64
    first, steady, tap, _ = _cell(name, dtype)
    inp = _inputs(name, dtype, 95, sp=True, state=True)
    c_out, c_sn, _ = _run(cpu_recurrent.rec_c_scan, first, steady, tap, inp, 95)
    gpu = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in inp.items()}
    gpu["state"] = tuple(s.cuda() for s in inp["state"])
    gpu["params"] = tuple(p.cuda() for p in inp["params"])
    with torch.no_grad():
        out, sn = rec_scan.rec_cuda_scan(first, steady, tap, gpu["e"], gpu["w"], gpu["b"], gpu["sp0"],
                                         gpu["state"], gpu["params"], division="true")
    assert torch.equal(out.cpu(), c_out) and all(torch.equal(a.cpu(), b) for a, b in zip(sn, c_sn))


@pytest.mark.cuda
@pytest.mark.skipif(not _HAS_GPU, reason="needs a CUDA device and CuPy")
def test_gpu_dispatch_runs_the_cuda_cell(monkeypatch: pytest.MonkeyPatch) -> None:
    """A compiled user recurrent model on the GPU runs its cell on the CUDA kernels, not the reference
    loop: outputs as eager's on the device (float64: identical spikes), every gradient to tolerance."""
    from test_recurrent import _eager, _model, _spikes
    import copy

    def no_reference(*a: Any, **k: Any) -> None:
        raise AssertionError("the reference loop ran: the CUDA cell should have")
    m = _model(torch.float64).cuda()
    c = snncc.compile(copy.deepcopy(m), sequence=True, chunk=4)
    x = _spikes(9, 3, 12, torch.float64).cuda()
    ye = _eager(m, x)
    monkeypatch.setattr(reference, "recurrent_scan", no_reference)
    yc = c(x)
    assert torch.equal(ye, yc) and 0.02 < ye[..., :-4].mean().item() < 0.6
    g = torch.randn(ye.shape, generator=torch.Generator().manual_seed(3), dtype=ye.dtype).cuda()
    (ye * g).sum().backward()
    (yc * g).sum().backward()
    for (name, p), q in zip(m.named_parameters(), c.model.parameters()):
        assert p.grad is not None and q.grad is not None and p.grad.abs().sum() > 0, name
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-11, msg=name)
