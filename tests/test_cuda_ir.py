"""The CUDA scan of lifted neurons (runtime/cuda/ir_kernels.py, ir_scan.py, launch.cuda_ir_scan).

Three layers, as for the built-in kernels (tests/test_cuda_codegen.py, tests/test_cuda_emulated.py):

* compile: the generated source of every neuron below compiles with ``nvcc`` for sm_80 and sm_90 in one
  call, with NVRTC's environment imitated where nvcc can (no ``INFINITY``/``NAN`` macros: the source's own
  fallbacks are used; ``--fmad=false``), needs no header, and has no fused multiply-add in the forward;
  with libnvrtc installed, NVRTC compiles it with the launcher's options (skipped where absent);
* numerics on the host emulator (tests/cuda_emu, g++ only): ``ir_scan.cuda_ir_scan`` -- the autograd
  Function and marshalling ``launch.py`` uses on a GPU -- against the lifted step run by torch
  (``snncc.neuron_ir.interpret``, i.e. ``snncc.lift.run_lifted`` from the reset state) and torch autograd of
  it: outputs and states bit-identical for neurons made of +, -, *, / (and clamp, where, comparisons),
  gradients of the input, the initial states and the parameters to float tolerance; float32 and float64,
  broadcast input, an initial state given, channels-last, several blocks;
* on a GPU (``cuda`` marker, skipped without a device and CuPy): the same against eager torch on the device.

Division by a constant: on CUDA the scan computes it as torch's CUDA kernels do (times the reciprocal:
``ir_kernels.torch_cuda_semantics``), so the emulator's oracle is the lifted step with that rewrite; with
``division="true"`` it is the CPU's IEEE division, checked against ``run_lifted`` itself.
"""
from __future__ import annotations

import ast
import functools
import importlib.util
import re
import shutil
import subprocess
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pytest
import torch
from torch import nn

import cuda_emu
from snncc.lift import Lifted, lift_neuron, run_lifted
from snncc.neuron_ir import NeuronIR, interpret
from snncc.runtime.cuda import ir_kernels, ir_scan, scan
from conftest import NVCC_ARCHS

requires_emu = pytest.mark.skipif(not cuda_emu.available(),
                                  reason="g++ not found: the CUDA emulator compiles the kernels as host C++")
requires_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found")
HAS_SJ = importlib.util.find_spec("spikingjelly") is not None
HAS_SNNTORCH = importlib.util.find_spec("snntorch") is not None
SHAPE = (3, 4, 6, 6)            # one step: 432 neurons, two blocks of 256 (the second partial)
K = 5
DTYPES = (torch.float32, torch.float64)
GRAD_TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-10, atol=1e-12)}


# ----------------------------------------------------------------------------------------------- neurons
class UserSpike(torch.autograd.Function):
    """A user's own spike: z >= 0 forward, a derivative snncc does not know (so it stays opaque)."""

    @staticmethod
    def forward(ctx: Any, z: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(z)
        return (z >= 0).to(z.dtype)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        (z,) = ctx.saved_tensors
        return g * 0.7 / (1.0 + 2.0 * z * z)


class ChannelLIF(nn.Module):
    """A user's neuron: per-channel learnable decay, input divided by 3 (not a power of two: CPU and CUDA
    torch round it differently), soft reset, its own surrogate."""

    def __init__(self, channels: int = SHAPE[1]) -> None:
        super().__init__()
        self.decay = nn.Parameter(torch.linspace(0.2, 0.9, channels).view(channels, 1, 1))
        self.v: Optional[torch.Tensor] = None

    def reset(self) -> None:
        self.v = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.v is None:
            self.v = torch.zeros_like(x)
        h = self.v * self.decay.clamp(0.0, 1.0) + x / 3.0
        s = UserSpike.apply(h - 1.0)
        self.v = h - s
        return s


class Zoo(nn.Module):
    """Many ops in one step (transcendentals, min/max with infinity, a NaN literal, where, a bool state,
    a learnable scalar, pow, sqrt), with SpikingJelly's ATan surrogate (a known formula)."""

    def __init__(self) -> None:
        super().__init__()
        from spikingjelly.activation_based import surrogate
        self.gain = nn.Parameter(torch.tensor(1.3))
        self.sg = surrogate.ATan()
        self.v = self.a = self.ref = None

    def reset(self) -> None:
        self.v = self.a = self.ref = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.v is None:
            self.v, self.a = torch.zeros_like(x), torch.zeros_like(x)
            self.ref = torch.zeros_like(x, dtype=torch.bool)
        i = torch.tanh(x) * self.gain + torch.relu(x) * 0.25 - torch.sigmoid(self.a) * 0.5
        h = torch.where(self.ref, self.v * 0.5, self.v * 0.9 + i)
        h = torch.maximum(h, torch.full_like(h, -2.0))
        h = torch.minimum(h, torch.full_like(h, float("inf")))
        h = torch.where(h.abs() > 1e30, torch.full_like(h, float("nan")), h)
        s = self.sg(h - 1.0)
        self.a = self.a * 0.8 + s * (h.abs() + 1.0).pow(0.5) + torch.sqrt(x * x + 1.0) * 0.1 + \
            (x / 8.0).exp() * 0.01
        self.ref = s > 0
        self.v = h - s * self.gain.clamp(min=0.5)
        return s


def _sj(name: str, **kw: Any) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        from spikingjelly.activation_based import neuron
        return getattr(neuron, name)(**kw)
    return make


def _snn(name: str, **kw: Any) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        import snntorch
        return getattr(snntorch, name)(init_hidden=True, **kw)
    return make


# name -> (factory, exact: only +, -, *, / and friends (bit-identical forward), input scale, needs)
NEURONS: Dict[str, Tuple[Callable[[], nn.Module], bool, float, bool]] = {
    "sj_lif": (_sj("LIFNode"), True, 1.5, HAS_SJ),
    "sj_eif": (_sj("EIFNode"), False, 1.5, HAS_SJ),
    "sj_izhikevich": (_sj("IzhikevichNode"), True, 1.5, HAS_SJ),
    "sj_cubalif": (_sj("CUBALIFNode", c_decay=0.5, v_decay=0.75), True, 0.6, HAS_SJ),
    "snn_leaky": (_snn("Leaky", beta=0.9, learn_beta=True, learn_threshold=True), True, 0.8, HAS_SNNTORCH),
    "snn_synaptic": (_snn("Synaptic", alpha=0.8, beta=0.9, learn_alpha=True), True, 0.5, HAS_SNNTORCH),
    "user_channel_lif": (ChannelLIF, True, 2.0, True),
    "zoo": (Zoo, False, 1.5, HAS_SJ),
}
AVAILABLE = [n for n, v in NEURONS.items() if v[3]]
EXACT = [n for n in AVAILABLE if NEURONS[n][1]]


@functools.lru_cache(maxsize=None)
def _neuron(name: str, dtype: torch.dtype) -> Tuple[nn.Module, Lifted]:
    """The module (in ``dtype``) and its lifted step, once per run."""
    torch.manual_seed(0)
    m = NEURONS[name][0]().to(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return m, lift_neuron(m, dtype)


def _full(m: nn.Module, lifted: Lifted) -> Tuple[bool, ...]:
    return tuple(p.numel() > 1 for p in lifted.params(m))


def _steps(lifted: Lifted, division: str) -> Tuple[NeuronIR, NeuronIR]:
    """The IRs the scan compiles for ``division`` (what the oracle must interpret too)."""
    if division == "reciprocal":
        return ir_kernels.torch_cuda_semantics(lifted.first), ir_kernels.torch_cuda_semantics(lifted.steady)
    return lifted.first, lifted.steady


# ----------------------------------------------------------------------------------------------- references
def _reference(first: NeuronIR, steady: NeuronIR, x: torch.Tensor, K: int, broadcast: bool,
               state: Optional[Sequence[torch.Tensor]], params: Sequence[torch.Tensor]
               ) -> Tuple[torch.Tensor, Tuple[torch.Tensor, ...]]:
    """The lifted steps with torch: from the reset state (``first`` at step 0, as run_lifted) or from
    ``state``; differentiable (torch autograd of it is the BPTT the kernels must match)."""
    pd = dict(zip(steady.params, params))
    st: Tuple[torch.Tensor, ...] = tuple(state) if state else ()
    outs = []
    for t in range(K):
        ir = steady if (state or t > 0) else first
        (o,), st = interpret(ir, x if broadcast else x[t], st, pd)
        outs.append(o)
    return torch.stack(outs), st


def _inputs(lifted: Lifted, name: str, dtype: torch.dtype, broadcast: bool, channels_last: bool = False,
            seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scale = NEURONS[name][2]
    x = (torch.randn(K * SHAPE[0], *SHAPE[1:], generator=g, dtype=torch.float64) * scale + 0.3 * scale)
    x = x.to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return (x[:SHAPE[0]] if broadcast else x.view(K, *SHAPE)).detach().requires_grad_(True)


def _initial_state(m: nn.Module, lifted: Lifted, name: str, dtype: torch.dtype) -> List[torch.Tensor]:
    """A state some steps in (the reference's final states on other inputs), made leaves that need grad."""
    x = _inputs(lifted, name, dtype, False, seed=77).detach()
    with torch.no_grad():
        _, st = _reference(lifted.first, lifted.steady, x, K, False, None, lifted.params(m))
    return [s.detach().clone().requires_grad_(s.is_floating_point()) for s in st]


def _loss(out: torch.Tensor, states: Sequence[torch.Tensor], seed: int) -> torch.Tensor:
    """A random weighting of the outputs and float final states (a constant one hides layout errors)."""
    g = torch.Generator().manual_seed(seed)
    loss = (out * torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)).sum()
    for s in states:
        if s.is_floating_point():
            loss = loss + (s * torch.randn(s.shape, generator=g, dtype=torch.float64).to(s.dtype)).sum()
    return loss


def _grads(loss: torch.Tensor, wrt: Sequence[torch.Tensor]) -> Tuple[Optional[torch.Tensor], ...]:
    return torch.autograd.grad(loss, list(wrt), allow_unused=True)


# ----------------------------------------------------------------------------------------------- the emulator
def _all_sources() -> List[str]:
    """Every source the emulator tests launch (compiled up front into a few shared libraries)."""
    out = []
    for name in AVAILABLE:
        for dt in DTYPES:
            m, lifted = _neuron(name, dt)
            full = _full(m, lifted)
            for division in ("reciprocal", "true"):
                out.append(ir_scan.ir_kernel_source(*_steps(lifted, division), full))
    return out


@pytest.fixture(scope="module")
def emu() -> cuda_emu.EmuLauncher:
    if not cuda_emu.available():
        pytest.skip("g++ not found")
    launcher = cuda_emu.EmuLauncher(threads_per_block=scan.THREADS_PER_BLOCK)
    launcher.prepare(_all_sources())
    return launcher


def _scan(launcher: Any, *args: Any, **kw: Any) -> Any:
    """``ir_scan.cuda_ir_scan`` on ``launcher``."""
    return ir_scan.cuda_ir_scan(*args, launcher=launcher, **kw)


def _check(name: str, dtype: torch.dtype, launcher: Any, *, broadcast: bool = False, with_state: bool = False,
           channels_last: bool = False, division: str = "reciprocal", seed: int = 0,
           scan_fn: Optional[Callable[..., Any]] = None) -> Tuple[torch.Tensor, Tuple[torch.Tensor, ...]]:
    """Emulated CUDA scan vs the lifted reference: forward (bit-identical for exact neurons), gradients."""
    m, lifted = _neuron(name, dtype)
    exact = NEURONS[name][1]
    first, steady = _steps(lifted, division)
    params = lifted.params(m)
    x = _inputs(lifted, name, dtype, broadcast, channels_last, seed)
    state = _initial_state(m, lifted, name, dtype) if with_state else None
    where = f"{name} {dtype} broadcast={broadcast} state={with_state} channels_last={channels_last} {division}"
    if scan_fn is None:
        res = ir_scan.cuda_ir_scan(lifted.first, lifted.steady, x, K, broadcast, state, params,
                                   launcher=launcher, division=division)
    else:
        res = scan_fn(lifted.first, lifted.steady, x, K, broadcast, state, params)
    assert res is not None, where
    out, sn = res
    ref_out, ref_sn = _reference(first, steady, x, K, broadcast, state, params)
    assert 0 < (ref_out != 0).double().mean() < 1, f"{where}: some but not all neurons must spike"
    assert out.dtype == ref_out.dtype and out.shape == ref_out.shape, where
    assert len(sn) == len(ref_sn) == len(lifted.state_attrs)
    if exact:
        assert torch.equal(out, ref_out), f"{where}: outputs differ at {int((out != ref_out).sum())} places"
    else:
        assert torch.equal(out != 0, ref_out != 0), f"{where}: spikes differ"
        torch.testing.assert_close(out, ref_out, **GRAD_TOL[dtype])
    for k, a, b in zip(lifted.state_attrs, sn, ref_sn):
        assert a.dtype == b.dtype and a.shape == b.shape, (where, k)
        if exact or not a.is_floating_point():
            assert torch.equal(a, b), f"{where}: final state {k} differs"
        else:
            torch.testing.assert_close(a, b, **GRAD_TOL[dtype], equal_nan=True, msg=f"{where}: state {k}")
    # gradients: input, initial states, every parameter that needs one
    wrt = [x] + [s for s in (state or []) if s.requires_grad] + [p for p in params if p.requires_grad]
    names = ["x"] + [f"state {k}" for k, s in zip(lifted.state_attrs, state or []) if s.requires_grad] + \
        [f"param {a}" for a, p in zip(lifted.param_attrs, params) if p.requires_grad]
    g = _grads(_loss(out, sn, seed + 1), wrt)
    g_ref = _grads(_loss(ref_out, ref_sn, seed + 1), wrt)
    # NOTE: a float64 model may still compute some values in float32 as eager does (snnTorch's spikes are
    # float32, so `spike * threshold` is a float32 op): those gradients are only float32-accurate, and the
    # kernels sum per neuron first while torch reduces the broadcast gradient in float32
    low = any(dt == "float32" for _, dt in steady.dtypes)
    tol = GRAD_TOL[torch.float32 if low else dtype]
    for n, a, b, leaf in zip(names, g, g_ref, wrt):
        if b is None:
            assert a is None or not a.any(), (where, n)
            continue
        assert a is not None and a.dtype == leaf.dtype and a.shape == leaf.shape, (where, n)
        torch.testing.assert_close(a, b, **tol, msg=lambda s: f"{where}: grad of {n}: {s}")
    return out, sn


@requires_emu
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("name", AVAILABLE)
def test_emulated_scan_matches_lifted_reference(emu, name, dtype):
    """From the reset state, a broadcast input, an initial state: forward and BPTT as the lifted step."""
    _check(name, dtype, emu)
    _check(name, dtype, emu, broadcast=True, seed=1)
    _check(name, dtype, emu, with_state=True, seed=2)


@requires_emu
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_user_neuron_divisions_and_layouts(emu, dtype):
    """``division="true"``: bit-identical to ``run_lifted`` itself (CPU torch divides by 3); the default
    (torch's CUDA rounding, times 1/3) really differs from it, so the oracle choice is not vacuous.
    Channels-last input with a per-channel parameter; an initial state with a broadcast input."""
    name = "user_channel_lif"
    m, lifted = _neuron(name, dtype)
    out, sn = _check(name, dtype, emu, division="true")
    x = _inputs(lifted, name, dtype, False)
    with torch.no_grad():
        outs, states = run_lifted(lifted, m, list(x))
    assert torch.equal(out, torch.stack(outs)) and all(torch.equal(a, b) for a, b in zip(sn, states))
    _, sn_r = _check(name, dtype, emu)
    assert not torch.equal(sn_r[0], sn[0]), "x / 3 and x * (1/3) should round differently somewhere"
    _check(name, dtype, emu, channels_last=True, seed=3)
    _check(name, dtype, emu, broadcast=True, with_state=True, channels_last=True, seed=4, division="true")


@requires_emu
def test_power_of_two_divisions_agree(emu):
    """SpikingJelly's LIF (tau = 2): both division modes give the CPU's bits (1/2 is exact)."""
    if not HAS_SJ:
        pytest.skip("spikingjelly is not installed")
    m, lifted = _neuron("sj_lif", torch.float32)
    a, sa = _check("sj_lif", torch.float32, emu, division="true")
    b, sb = _check("sj_lif", torch.float32, emu, division="reciprocal")
    x = _inputs(lifted, "sj_lif", torch.float32, False)
    with torch.no_grad():
        outs, states = run_lifted(lifted, m, list(x))
    assert torch.equal(a, b) and torch.equal(a, torch.stack(outs)) and torch.equal(sa[0], sb[0])


@requires_emu
def test_no_grad_keeps_nothing_and_strided_input(emu):
    """Under no_grad nothing is kept for backward; a time-strided input (steps not M apart) is made dense
    first; with grad, what is kept is the input, the parameters and the user surrogate's z."""
    name = "user_channel_lif"
    m, lifted = _neuron(name, torch.float64)
    params = lifted.params(m)
    x = (torch.randn(2 * K, *SHAPE, dtype=torch.float64) * 2)[::2]
    with torch.no_grad():
        out, sn = _scan(emu, lifted.first, lifted.steady, x, K, False, None, params)
        ref, ref_sn = _reference(*_steps(lifted, "reciprocal"), x, K, False, None, params)
    assert out.grad_fn is None and torch.equal(out, ref) and torch.equal(sn[0], ref_sn[0])
    out, _ = _scan(emu, lifted.first, lifted.steady, x.requires_grad_(True), K, False, None, params)
    assert len(out.grad_fn.saved_tensors) == 1 + len(params) + 1     # x, the decay, z of the user's spike


@requires_emu
@pytest.mark.parametrize("name", [n for n in ("snn_synaptic", "zoo") if n in AVAILABLE])
def test_single_step_and_parameter_only_gradients(emu, name):
    """K = 1 (only the first step, or one steady step from a given state; an empty state sequence means
    the reset state, as for ir_c_scan) with only the parameters needing gradients."""
    m, lifted = _neuron(name, torch.float64)
    params = lifted.params(m)
    wrt = [p for p in params if p.requires_grad]
    assert wrt
    x = _inputs(lifted, name, torch.float64, False)[:1].detach()
    for state in ((), [s.detach() for s in _initial_state(m, lifted, name, torch.float64)]):
        out, sn = _scan(emu, lifted.first, lifted.steady, x, 1, False, state, params)
        ref, ref_sn = _reference(*_steps(lifted, "reciprocal"), x, 1, False, state, params)
        torch.testing.assert_close(out, ref, rtol=0, atol=0 if NEURONS[name][1] else 1e-12)
        for a, b in zip(sn, ref_sn):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=0, equal_nan=True)
        for a, b in zip(_grads(_loss(out, sn, 3), wrt), _grads(_loss(ref, ref_sn, 3), wrt)):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


@requires_emu
def test_empty_batch_and_unsupported_tensors(emu):
    """No neurons: no launch (a 0-block grid is invalid on CUDA), empty results and zero grads. Tensors
    the kernels do not take (another dtype than the lifted one) give None: the caller falls back."""
    name = "user_channel_lif"
    m, lifted = _neuron(name, torch.float32)
    params = lifted.params(m)
    x = torch.randn(K, 0, SHAPE[1], 6, 6, requires_grad=True)
    n = len(emu.launches)
    out, (v,) = _scan(emu, lifted.first, lifted.steady, x, K, False, None, params)
    assert out.shape == x.shape and v.shape == x.shape[1:] and len(emu.launches) == n
    gx, gp = torch.autograd.grad(out.sum() + v.sum(), (x, params[0]))
    assert gx.shape == x.shape and not gp.any()
    assert _scan(emu, lifted.first, lifted.steady, x.double(), K, False, None, params) is None
    assert _scan(emu, lifted.first, lifted.steady, x, K, False, None,
                                [p.double() for p in params]) is None
    assert ir_scan.cuda_supports_ir(lifted.first, lifted.steady, x) == "the input is not a CUDA tensor"
    assert "takes float32" in ir_scan._supports(lifted.first, lifted.steady, x.double())
    with pytest.raises(ValueError, match="division"):
        _scan(emu, lifted.first, lifted.steady, x, K, False, None, params, division="fast")


@requires_emu
def test_launch_py_through_a_stand_in_cupy(emu, monkeypatch):
    """launch.cuda_ir_scan with a stand-in ``cupy`` whose RawModule compiles through the emulator: the
    kernels are found by name, NVRTC gets the launcher's options, grid and block as on a GPU, and the
    results match the reference."""
    from snncc.runtime.cuda import kernels
    seen: Dict[str, List[Any]] = {"options": [], "launches": [], "devices": []}

    class RawModule:
        def __init__(self, code: str, options: Tuple[str, ...] = ()) -> None:
            seen["options"].append(options)
            self._mod = emu.module(code)

        def get_function(self, name: str) -> Callable[..., None]:
            def fn(grid: Tuple[int, ...], block: Tuple[int, ...], args: Tuple[Any, ...]) -> None:
                seen["launches"].append((name, grid, block))
                self._mod.call(name, grid[0], block[0], *args)
            return fn

    class _Null:
        def __init__(self, *a: Any) -> None:
            seen["devices"].extend(a)

        def __enter__(self) -> None:
            return None

        def __exit__(self, *exc: Any) -> None:
            return None

    monkeypatch.setattr(torch.cuda, "device", _Null)
    launch = cuda_emu.stand_in_cupy(monkeypatch, RawModule, lambda ptr: _Null())
    # positionally, as ir_c_scan is called: launch.py's entry, and ir_scan's without a launcher (what the
    # dispatcher calls: it takes CuPy's launcher from launch.py)
    _check("user_channel_lif", torch.float32, emu, scan_fn=launch.cuda_ir_scan)
    _check("user_channel_lif", torch.float32, emu, scan_fn=ir_scan.cuda_ir_scan, seed=5)
    assert seen["options"] and all(o == kernels.NVRTC_OPTIONS for o in seen["options"])
    M = int(np.prod(SHAPE))
    assert [n for n, _, _ in seen["launches"]] == ["snncc_ir_fwd", "snncc_ir_bwd"] * 2
    assert all(l[1:] == (((M + 255) // 256,), (256,)) for l in seen["launches"])
    assert seen["devices"] == [torch.device("cpu")] * 2        # each forward runs with x's device current


def test_scan_modules_import_no_cupy():
    """ir_kernels and ir_scan import neither cupy nor launch.py at module level (ir_scan imports launch.py
    only inside the call that runs on CuPy's launcher), so they load, and run on the emulator, without
    CuPy."""
    import snncc.runtime.cuda as pkg
    for mod in ("ir_kernels", "ir_scan"):
        tree = ast.parse(Path(pkg.__file__).with_name(f"{mod}.py").read_text())
        names = [a.name for n in tree.body if isinstance(n, ast.Import) for a in n.names]
        names += [n.module or "" for n in tree.body if isinstance(n, ast.ImportFrom)]
        assert names and not any("cupy" in n or n.endswith("launch") for n in names), (mod, names)


def test_torch_cuda_semantics_rewrite():
    """Only divisions of a value by a constant change, into a multiplication by the reciprocal rounded in
    the op's dtype; the rest of the IR (and an IR without such divisions) stays as it is."""
    m, lifted = _neuron("user_channel_lif", torch.float32)
    ir = ir_kernels.torch_cuda_semantics(lifted.steady)
    changed = [(a, b) for a, b in zip(lifted.steady.ops, ir.ops) if a != b]
    assert len(changed) == 1 and changed[0][0].op == "div" and changed[0][1].op == "mul"
    assert changed[0][1].args[1] == float(np.float32(1) / np.float32(3))
    assert ir_kernels.torch_cuda_semantics(ir) is ir


# ----------------------------------------------------------------------------------------------- compile
def _compile_variants() -> List[Tuple[str, torch.dtype, str]]:
    return [(n, dt, "reciprocal") for n in AVAILABLE for dt in DTYPES] + \
        [(n, torch.float32, "true") for n in ("user_channel_lif", "zoo") if n in AVAILABLE]


def _sources(prefixed: bool = True) -> List[Tuple[str, str]]:
    out = []
    for i, (name, dt, division) in enumerate(_compile_variants()):
        m, lifted = _neuron(name, dt)
        src = ir_kernels.ir_cuda_source(*_steps(lifted, division), _full(m, lifted),
                                        prefix=f"v{i}" if prefixed else "snncc_ir")
        out.append((f"{name}/{dt}/{division}", src))
    return out


@requires_nvcc
def test_every_neuron_compiles_for_sm80_and_sm90(tmp_path):
    """All variants in one translation unit, one nvcc call, both architectures; INFINITY and NAN undefined
    first (NVRTC has no math.h), so the sources' own fallbacks are what compiles. Then the PTX of the
    forward kernels with the launcher's options: no fused multiply-add (CUBA's ``c * 0.5 + x`` would
    contract by default)."""
    from snncc.runtime.cuda.kernels import NVRTC_OPTIONS
    srcs = _sources()
    cu = tmp_path / "ir_variants.cu"
    cu.write_text("#undef INFINITY\n#undef NAN\n" + "\n".join(s for _, s in srcs))
    fmad = [o for o in NVRTC_OPTIONS if o.startswith("--fmad")]
    assert fmad == ["--fmad=false"]
    r = subprocess.run(["nvcc", "-std=c++17", *fmad, "-c", str(cu), "-o", str(tmp_path / "all.o"),
                        *NVCC_ARCHS],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "error" not in r.stderr.lower(), r.stderr[-4000:]
    # the +-*/ neurons' forward kernels (expf & co. use fma inside the math library: not a contraction)
    variants = _compile_variants()
    exact = [i for i, (name, _, _) in enumerate(variants) if NEURONS[name][1]]
    cuba = [i for i, (name, _, _) in enumerate(variants) if name == "sj_cubalif"][:1]

    def ptx(indices: List[int], opts: Sequence[str]) -> Dict[str, str]:
        part, out = tmp_path / "part.cu", tmp_path / "part.ptx"
        part.write_text("\n".join(srcs[i][1] for i in indices))
        r = subprocess.run(["nvcc", *opts, "-ptx", "-arch=sm_80", str(part), "-o", str(out)],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-4000:]
        return {e.split("(")[0].strip(): e for e in out.read_text().split(".entry ")[1:]}

    entries = ptx(exact, NVRTC_OPTIONS)
    for i in exact:
        assert "fma.rn" not in entries[f"v{i}_fwd"], variants[i]
    if cuba:                     # the check would see a contraction: nvcc's default makes one there
        assert "fma.rn" in ptx(cuba, ["-std=c++17"])[f"v{cuba[0]}_fwd"]


def test_sources_need_no_headers():
    """NVRTC has no include path: no #include, no M_PI; INFINITY/NAN only through the guarded fallbacks;
    the kernels are extern "C" with the documented names."""
    for what, src in _sources(prefixed=False):
        assert not re.findall(r"#\s*include", src), what
        assert "M_PI" not in src, what
        assert src.count(ir_kernels.NVRTC_PRELUDE) == 1, what
        for name in ir_kernels.ir_kernel_names("snncc_ir"):
            assert f'extern "C" __global__ void {name}(' in src, what
    zoo = [s for w, s in _sources(prefixed=False) if w.startswith("zoo/")]
    if zoo:                                    # the literals and isnan really occur somewhere
        assert all("INFINITY" in s and "NAN" in s and "isnan(" in s for s in zoo)


def test_nvrtc_compiles_every_variant():
    """What CuPy does first on a GPU: NVRTC with the launcher's options and no include path at all."""
    from test_cuda_codegen import _nvrtc, nvrtc_compile
    lib = _nvrtc()
    if lib is None:
        pytest.skip("libnvrtc not found (set SNNCC_NVRTC=/path/to/libnvrtc.so)")
    for what, src in _sources(prefixed=False):
        rc, log = nvrtc_compile(lib, src)
        assert rc == 0, (what, log)


# ----------------------------------------------------------------------------------------------- on a GPU
_HAS_GPU = torch.cuda.is_available() and importlib.util.find_spec("cupy") is not None


@pytest.mark.cuda
@pytest.mark.skipif(not _HAS_GPU, reason="needs a CUDA device and CuPy")
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("name", AVAILABLE)
def test_gpu_scan_matches_eager_on_the_device(name, dtype):
    """On a GPU: the CUDA scan vs the lifted step run by torch on the same device (torch's CUDA kernels,
    whose division by a constant the default mode reproduces): outputs and states bit-identical for the
    exact neurons, gradients to tolerance; ``division="true"`` vs the CPU reference, bit-identical."""
    import copy
    from snncc.runtime.cuda import launch
    m_cpu, lifted = _neuron(name, dtype)
    m = copy.deepcopy(m_cpu).cuda()
    exact = NEURONS[name][1]
    params, params_cpu = lifted.params(m), lifted.params(m_cpu)
    for broadcast, with_state in ((False, False), (True, False), (False, True)):
        where = (name, dtype, broadcast, with_state)
        x_cpu = _inputs(lifted, name, dtype, broadcast).detach()
        x = x_cpu.cuda().requires_grad_(True)
        assert ir_scan.cuda_supports_ir(lifted.first, lifted.steady, x) is None
        st_cpu = [s.detach() for s in _initial_state(m_cpu, lifted, name, dtype)] if with_state else None
        state = [s.cuda().requires_grad_(s.is_floating_point()) for s in st_cpu] if with_state else None
        out, sn = launch.cuda_ir_scan(lifted.first, lifted.steady, x, K, broadcast, state, params)
        ref, ref_sn = _reference(lifted.first, lifted.steady, x, K, broadcast, state, params)
        for a, b in [(out, ref)] + list(zip(sn, ref_sn)):
            if exact or not a.is_floating_point():
                assert torch.equal(a, b), where
            else:
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, equal_nan=True)
        wrt = [x] + [s for s in (state or []) if s.requires_grad] + [p for p in params if p.requires_grad]
        for a, b in zip(_grads(_loss(out, sn, 5), wrt), _grads(_loss(ref, ref_sn, 5), wrt)):
            if a is not None or b is not None:
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        if exact:                  # IEEE division: the CPU's bits
            with torch.no_grad():
                o_t, s_t = _scan(launch.LAUNCHER, lifted.first, lifted.steady, x, K, broadcast,
                                                state, params, division="true")
                r_c, rs_c = _reference(lifted.first, lifted.steady, x_cpu, K, broadcast, st_cpu, params_cpu)
            assert torch.equal(o_t.cpu(), r_c) and all(torch.equal(a.cpu(), b) for a, b in zip(s_t, rs_c)), where
