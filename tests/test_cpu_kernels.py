"""The generated C scans (runtime/cpu_source.py, run by runtime/cpu.py) against the reference torch scan:
every IF/LIF/PLIF variant.

Spikes and final membrane potentials must be bit-identical (same IEEE operations, no FMA contraction);
gradients equal to float tolerance (the surrogate's exp may differ by an ulp between libm and torch).
"""
from __future__ import annotations

import itertools

import pytest
import torch

from snncc.neurons import NeuronSpec
from snncc.runtime import cbuild, cpu
# the dispatcher (C scan unless SNNCC_BACKEND=reference): runtime.reference.neuron_scan is torch only
from snncc.runtime.dispatch import neuron_scan
from snncc.surrogate import KNOWN_SURROGATES, SurrogateSpec

pytestmark = pytest.mark.skipif(not cpu.compiler_available(), reason="no C compiler")


def _use(backend, monkeypatch):
    if backend == "reference":
        monkeypatch.setenv("SNNCC_BACKEND", "reference")
    else:
        monkeypatch.delenv("SNNCC_BACKEND", raising=False)


def _run(spec, x, K, broadcast, g, backend, monkeypatch, w=None, pool=None, h_dtype=None):
    _use(backend, monkeypatch)
    assert cpu.supports(spec, x) == (backend == "c")
    params = () if w is None else (w,)
    s, state = neuron_scan(spec, x, K, broadcast, None, params, pool=pool, h_dtype=h_dtype)
    wrt = (x,) if w is None else (x, w)
    grads = torch.autograd.grad((s * g).sum() + state[0].sum(), wrt)
    return s, state[0], grads


# kind, decay_input, v_reset, detach_reset: every neuron configuration the kernels generate code for
CONFIGS = [v for v in itertools.product(["if", "lif", "plif"], [True, False], [0.0, 0.5, None], [False, True])
           if not (v[0] == "if" and not v[1])]
LAYOUTS = [(False, False), (True, False), (False, True), (True, True)]     # (broadcast, channels_last)


def _inputs(K, dtype, broadcast, channels_last, shape=(3, 4, 6, 6), scale=2.0):
    x = torch.randn(K * shape[0], *shape[1:], dtype=dtype) * scale
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return (x[:shape[0]] if broadcast else x.view(K, *shape)).detach().requires_grad_(True)


def _compare(spec, dtype, monkeypatch, pool=None, shape=(3, 4, 6, 6), K=4, h_dtype=None, tol=None):
    torch.manual_seed(0)
    w = torch.tensor(-0.3, dtype=dtype, requires_grad=True) if spec.kind == "plif" else None
    for broadcast, channels_last in LAYOUTS:
        x = _inputs(K, dtype, broadcast, channels_last, shape)
        out_shape = (K, *shape) if pool is None else (K, shape[0], shape[1], shape[2] // pool, shape[3] // pool)
        g = torch.randn(out_shape, dtype=dtype)
        s_c, v_c, g_c = _run(spec, x, K, broadcast, g, "c", monkeypatch, w, pool, h_dtype)
        s_r, v_r, g_r = _run(spec, x, K, broadcast, g, "reference", monkeypatch, w, pool)
        assert 0 < s_r.mean() and (pool or s_r.mean() < 1), "the input must make some but not all neurons spike"
        assert torch.equal(s_c, s_r)
        assert torch.equal(v_c, v_r)
        for a, b in zip(g_c, g_r):
            torch.testing.assert_close(a, b, **(tol or dict(rtol=1e-5, atol=1e-6)))


@pytest.mark.parametrize("kind,decay_input,v_reset,detach_reset", CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_c_scan_matches_reference_every_neuron_config(kind, decay_input, v_reset, detach_reset, dtype,
                                                      monkeypatch):
    """Each neuron configuration, flat and with the max-pool epilogue, all layouts, both dtypes."""
    spec = NeuronSpec(kind, SurrogateSpec("sigmoid", 4.0), v_reset=v_reset, detach_reset=detach_reset,
                      tau=2.0, decay_input=decay_input, learnable=("w",) if kind == "plif" else ())
    _compare(spec, dtype, monkeypatch)
    _compare(spec, dtype, monkeypatch, pool=2)


@pytest.mark.parametrize("surrogate", KNOWN_SURROGATES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_c_scan_matches_reference_every_surrogate(surrogate, dtype, monkeypatch):
    """The surrogate's code is spliced into every configuration the same way: each one on two of them, one
    per dtype (hard reset LIF in float32, soft reset PLIF with its weight gradient in float64; each pair
    is a kernel compile, the bulk of this matrix's time)."""
    kind, v_reset = ("lif", 0.0) if dtype == torch.float32 else ("plif", None)
    spec = NeuronSpec(kind, SurrogateSpec(surrogate, 2.0), v_reset=v_reset, tau=2.0,
                      learnable=("w",) if kind == "plif" else ())
    _compare(spec, dtype, monkeypatch)


@pytest.mark.parametrize("shape,pool", [((2, 3, 7, 5), 2), ((2, 2, 9, 9), 3), ((1, 5, 4, 4), 4)])
def test_pool_epilogue_odd_sizes(shape, pool, monkeypatch):
    """Rows and columns no window covers still integrate (final V) and get no gradient, as in torch."""
    spec = NeuronSpec("lif", SurrogateSpec("atan", 2.0))
    _compare(spec, torch.float64, monkeypatch, pool=pool, shape=shape)


def test_pool_epilogue_routes_gradient_to_torch_argmax(monkeypatch):
    """All-zero windows and windows with several spikes: the gradient goes where max_pool2d sends it."""
    spec = NeuronSpec("if", SurrogateSpec("sigmoid", 4.0))
    x = torch.tensor([[[[2.0, 2.0, 0.0, 0.0], [2.0, 0.0, 0.0, 2.0]]]], dtype=torch.float64).requires_grad_(True)
    g = torch.tensor([[[[[1.0, 10.0]]]]], dtype=torch.float64)
    for backend in ("c", "reference"):
        _use(backend, monkeypatch)
        s, (v,) = neuron_scan(spec, x.unsqueeze(0), 1, False, None, (), pool=2)
        assert s.flatten().tolist() == [1.0, 1.0]
        (gx,) = torch.autograd.grad((s * g).sum(), x)
        # window 1: the first spike (0, 0); window 2: the only spike (1, 3)
        d = gx.flatten().tolist()
        assert d[0] != 0 and d[7] != 0 and all(d[i] == 0 for i in (1, 2, 3, 4, 5, 6)), (backend, d)


def test_half_precision_h_is_close(monkeypatch):
    """memory="half": H kept in float16 for backward; same forward, gradients to half precision."""
    spec = NeuronSpec("lif", SurrogateSpec("sigmoid", 4.0))
    _compare(spec, torch.float32, monkeypatch, h_dtype=torch.float16, tol=dict(rtol=2e-2, atol=2e-3))


def test_saved_for_backward_is_h_and_bits(monkeypatch):
    """The C scan keeps H (float32) and the spikes as bits: 4 + 1/8 bytes per neuron-step."""
    _use("c", monkeypatch)
    spec = NeuronSpec("lif", SurrogateSpec("sigmoid", 4.0))
    x = torch.randn(8, 4, 16, 16, 16, requires_grad=True)
    saved = []

    def pack(t):
        saved.append((t.dtype, t.numel()))
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        neuron_scan(spec, x, 8, False, None, ())
    n = x.numel()
    assert (torch.float32, n) in saved                               # H
    assert any(d == torch.uint8 and n // 8 <= m <= n // 8 + 8 * 128 for d, m in saved)   # bits
    assert sum(m * torch.empty((), dtype=d).element_size() for d, m in saved) <= n * 4.2


def test_kernel_source_is_cached(tmp_path, monkeypatch):
    # the cache lives in runtime/cbuild.py: patched there (setting cpu.CACHE_DIR would change nothing)
    monkeypatch.setattr(cbuild, "CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cbuild, "_LIBS", {})
    spec = NeuronSpec("lif", SurrogateSpec("atan", 2.0))
    src = cpu.kernel_source(spec, torch.float32)
    assert "scan_fwd" in src and "scan_bwd" in src and "-ffast-math" not in " ".join(cpu._FLAGS)
    cpu._library(src)
    files = list(tmp_path.glob("scan_*.so"))
    assert len(files) == 1
    mtime = files[0].stat().st_mtime_ns
    monkeypatch.setattr(cbuild, "_LIBS", {})
    cpu._library(src)                      # second load: from disk, not recompiled
    assert files[0].stat().st_mtime_ns == mtime


def test_unsupported_specs_fall_back():
    opaque = NeuronSpec("lif", SurrogateSpec("callable", 1.0, lambda z: (z >= 0).float()))
    assert not cpu.supports(opaque, torch.zeros(3))
    assert not cpu.supports(NeuronSpec("izhikevich", SurrogateSpec("sigmoid", 4.0)), torch.zeros(3))
    assert not cpu.supports(NeuronSpec("lif", SurrogateSpec("sigmoid", 4.0)), torch.zeros(3, dtype=torch.float16))


TWO_STATE = [v for v in itertools.product(["izhikevich", "alif"], [0.0, None], [False, True])]


@pytest.mark.parametrize("kind,v_reset,detach_reset", TWO_STATE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_two_state_generated_scan_matches_reference(kind, v_reset, detach_reset, dtype):
    """Izhikevich and adaptive LIF run the scan generated from their lifted step: identical spikes and
    states, gradients (input and both initial states) to tolerance, against the torch reference scan."""
    import snncc
    from snncc.lift import lift_neuron
    from snncc.runtime.cpu_ir import ir_c_scan
    from snncc.runtime.reference import lifted_scan
    if kind == "izhikevich":
        m = snncc.neurons.Izhikevich(c=-65.0 if v_reset == 0.0 else -50.0, detach_reset=detach_reset)
        scale, shift = 40.0, 10.0
    else:
        m = snncc.neurons.AdaptiveLIF(v_reset=v_reset, detach_reset=detach_reset)
        scale, shift = 2.0, 0.5
    L = lift_neuron(m, dtype)
    assert L.state_attrs == ("state#0", "state#1")
    K = 6
    torch.manual_seed(0)
    for broadcast in (False, True):
        x = (torch.randn(K, 3, 5, 7, dtype=dtype) * scale + shift)
        x = (x[0] if broadcast else x).detach().requires_grad_(True)
        v0 = (torch.randn(3, 5, 7, dtype=dtype) + (-60.0 if kind == "izhikevich" else 0.0)).requires_grad_(True)
        u0 = torch.rand(3, 5, 7, dtype=dtype).requires_grad_(True)
        g = torch.randn(K, 3, 5, 7, dtype=dtype)
        for state in ((v0, u0), None):
            res = []
            for scan in (ir_c_scan, lifted_scan):
                s, st = scan(L.first, L.steady, x, K, broadcast, state, ())
                wrt = (x, v0, u0) if state is not None else (x,)
                grads = torch.autograd.grad((s * g).sum() + st[0].sum() + 0.5 * st[1].sum(), wrt)
                res.append((s, st, grads))
            (s1, st1, g1), (s2, st2, g2) = res
            assert 0 < s2.mean() < 1
            assert torch.equal(s1, s2)
            assert torch.equal(st1[0], st2[0]) and torch.equal(st1[1], st2[1])
            for a, b in zip(g1, g2):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_pool_epilogue_channels_first_output(monkeypatch):
    """pool_cf: the same pooled spikes (and gradients) written in [N, C, Ho, Wo] order for a
    channels-last input, so a following flatten needs no copy."""
    _use("c", monkeypatch)
    spec = NeuronSpec("lif", SurrogateSpec("sigmoid", 4.0))
    torch.manual_seed(0)
    x = _inputs(4, torch.float32, False, True, shape=(3, 8, 6, 6))
    g = torch.randn(4, 3, 8, 3, 3)
    res = []
    for cf in (False, True):
        s, (v,) = neuron_scan(spec, x, 4, False, None, (), pool=2, pool_cf=cf)
        assert s[0].is_contiguous() == cf
        (gx,) = torch.autograd.grad((s * g).sum(), x)
        res.append((s, v, gx))
    assert torch.equal(res[0][0], res[1][0]) and torch.equal(res[0][1], res[1][1])
    assert torch.equal(res[0][2], res[1][2])


@pytest.mark.parametrize("pool", [None, 2])
@pytest.mark.parametrize("kind,v_reset", [("lif", 0.0), ("plif", None), ("if", 0.0)])
def test_user_surrogates_run_in_the_kernels(kind, v_reset, pool, monkeypatch):
    """Seed 001's hand-written surrogates (plain z >= 0 spikes, elementwise backward): the C kernels run
    them (their derivative from their own backward, once per chunk) and match the reference scan."""
    from conftest import seed_surrogate_functions
    from snncc.runtime import codegen
    for name, F in seed_surrogate_functions(lambda x: (x >= 0).to(x.dtype)).items():
        fn = (lambda F: lambda z: F.apply(z, 2.0))(F)
        assert codegen.plain_step_surrogate(fn), name
        spec = NeuronSpec(kind, SurrogateSpec("callable", 1.0, fn), v_reset=v_reset,
                          learnable=("w",) if kind == "plif" else ())
        _compare(spec, torch.float64, monkeypatch, pool=pool)


def test_unplain_user_surrogates_stay_on_the_reference():
    from snncc.runtime import codegen
    strict = lambda z: (z > 0).to(z.dtype) + 0 * z           # noqa: E731  spikes at z > 0
    rand = lambda z: (z + 0.1 * torch.randn_like(z) >= 0).to(z.dtype)   # noqa: E731  stochastic

    class Coupled(torch.autograd.Function):                   # backward mixes elements
        @staticmethod
        def forward(ctx, z):
            return (z >= 0).to(z.dtype)

        @staticmethod
        def backward(ctx, g):
            return g.sum() * torch.ones_like(g)
    for fn in (strict, rand, Coupled.apply):
        assert not codegen.plain_step_surrogate(fn)
        assert not cpu.supports(NeuronSpec("lif", SurrogateSpec("callable", 1.0, fn)), torch.zeros(3))


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", [(3, 4, 6, 6), (2, 3, 5, 7), (1, 4, 300, 300)])   # the last: a period too
@pytest.mark.parametrize("pool", [None, 2])                                           # long for a table
@pytest.mark.parametrize("recompute", [False, True])
def test_bn_scan_reads_each_channels_alpha_and_beta(channels_last, shape, pool, recompute):
    """The fused BatchNorm prologue reads (alpha, beta) from per-step tables indexed by the element's
    offset in its channel period, or gathers them per unit when the period is too long for a table:
    either way the kernel's input must be ``x * alpha[t, c] + beta[t, c]``, so its spikes and final V are
    bit-identical to the plain scan of that input computed in torch (float64), and its input gradient
    equals BatchNorm's backward of the plain scan's (also when backward reruns the forward kernel)."""
    torch.manual_seed(0)
    K, dtype = 3, torch.float64
    spec = NeuronSpec("lif", SurrogateSpec("atan", 2.0), tau=2.0, v_threshold=0.5, v_reset=0.0)
    x = torch.randn(K * shape[0], *shape[1:], dtype=dtype) * 2 + torch.arange(shape[1], dtype=dtype).view(-1, 1, 1)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x = x.view(K, *shape).detach().requires_grad_(True)
    bn = torch.nn.BatchNorm2d(shape[1]).double()
    with torch.no_grad():
        bn.weight.copy_(torch.linspace(0.5, 2.0, shape[1]))
        bn.bias.copy_(torch.linspace(-0.3, 0.4, shape[1]))
    s, v = cpu.c_bn_scan(spec, x, K, None, bn, pool=pool, recompute=recompute)
    g = torch.randn_like(s)
    (gx,) = torch.autograd.grad((s * g).sum() + v.sum(), (x,))

    xr = x.detach().clone().requires_grad_(True)
    mean, _, invstd = cpu.step_statistics(xr.detach(), bn.eps)
    alpha = invstd * bn.weight.detach()
    beta = bn.bias.detach() - mean * alpha
    shape_c = (K, 1, shape[1], 1, 1)
    xs = [torch.batch_norm(xr[t], bn.weight.detach(), bn.bias.detach(), None, None, True, 0.0, bn.eps, False)
          for t in range(K)]
    xn = torch.stack(xs)
    with torch.no_grad():      # the formula the kernel computes, in torch
        direct = (xr * alpha.view(shape_c) + beta.view(shape_c)).contiguous()
    s_plain, v_plain = cpu.c_scan(spec, direct, K, False, None, pool=pool)
    assert 0 < s_plain.mean() < 1
    assert torch.equal(s, s_plain)
    assert torch.equal(v, v_plain)
    s_r, v_r = cpu.c_scan(spec, xn, K, False, None, pool=pool)
    (gr,) = torch.autograd.grad((s_r * g).sum() + v_r.sum(), (xr,))
    torch.testing.assert_close(gx, gr, rtol=1e-9, atol=1e-9)
