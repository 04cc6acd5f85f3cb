"""Neurons compiled from their own step code (snncc/lift.py -> neuron IR -> generated scans) equal eager.

Golden tests: each neuron kind in a small network, compiled vs the eager loop: outputs (identical spikes in
float64), input and parameter gradients, and the state the module is left with. Property test: random
elementwise step neurons (hypothesis) lift, compile to C kernels, and equal eager.
"""
from __future__ import annotations

import copy
import math
import warnings
from typing import Callable, List

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from torch import nn

import snncc
from snncc.lift import LiftFailure, _get_state, lift_neuron, run_lifted, _probe_inputs
from snncc.recognize import bind
from snncc.runtime import cpu_ir
from snncc.runtime.cpu_ir import c_supports_ir, ir_c_scan

sj = pytest.importorskip("spikingjelly.activation_based.neuron", reason="spikingjelly not installed")


class FastSigmoidSpike(torch.autograd.Function):
    """A user's surrogate: Heaviside forward, fast-sigmoid backward."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return (x >= 0).to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g / (1 + 10 * x.abs()) ** 2


class OddSpike(torch.autograd.Function):
    """A surrogate snncc has no formula for: its derivative comes from its own backward."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return (x >= 0).to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * torch.exp(-x * x) * (1.0 + 0.5 * torch.cos(x))


class _LazyStateNeuron(nn.Module):
    """A user's neuron keeping its state in ``self.v``: None after reset, zeros at the first step."""

    def __init__(self) -> None:
        super().__init__()
        self.v = None

    def reset(self) -> None:
        self.v = None

    def _v(self, x: torch.Tensor) -> torch.Tensor:
        if self.v is None:
            self.v = torch.zeros_like(x)
        return self.v


class ChannelDecayNeuron(_LazyStateNeuron):
    """A user's neuron: state in self.v (None after reset), learnable per-channel decay, own surrogate."""

    def __init__(self, channels: int, spike: Callable = FastSigmoidSpike.apply) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.linspace(-1.0, 1.5, channels).view(channels, 1, 1))
        self.spike = spike

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self._v(x) * torch.sigmoid(self.w) + x
        s = self.spike(h - 1.0)
        self.v = h - s.detach() * 1.0
        return s


def _reset_all(model: nn.Module) -> None:
    for m in model.modules():
        if m is model:
            continue
        if callable(getattr(m, "reset", None)):
            m.reset()
        elif callable(getattr(m, "reset_mem", None)):
            m.reset_mem()


def _eager(model: nn.Module, x: torch.Tensor, T: int) -> torch.Tensor:
    _reset_all(model)
    return torch.stack([model(x) for _ in range(T)])


def _conv_net(neuron: Callable[[], nn.Module], dtype: torch.dtype, head: bool = True) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), neuron(), nn.Flatten(), nn.Linear(4 * 6 * 6, 8),
                        neuron() if head else nn.Identity())
    with torch.no_grad():
        net[0].weight.mul_(3.0)
        net[3].weight.mul_(4.0)
    return net.to(dtype)


SJ_NEURONS = {
    "CUBALIFNode": lambda: sj.CUBALIFNode(),
    "EIFNode": lambda: sj.EIFNode(),
    "QIFNode": lambda: sj.QIFNode(),
    "IzhikevichNode": lambda: sj.IzhikevichNode(),
    "KLIFNode": lambda: sj.KLIFNode(),
}


def _check_golden(neuron: Callable[[], nn.Module], dtype: torch.dtype, how: str = "lifted",
                  exact: bool = True, head: bool = True) -> None:
    model = _conv_net(neuron, dtype, head)
    ref = copy.deepcopy(model)
    x = (torch.rand(3, 2, 6, 6, generator=torch.Generator().manual_seed(1)) * 2).to(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error", snncc.frontend.OpaqueModuleWarning)
        cm = snncc.compile(model, T=6, verify=True)
        out = cm(x)
    assert bind(model[1]).binding.how == how
    out_e = _eager(ref, x, 6)
    if exact:
        assert torch.equal(out, out_e)
    else:
        torch.testing.assert_close(out, out_e)
    assert out_e.sum() > 0, "the check would be vacuous: nothing spikes"
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=dtype)
    (out * w).sum().backward()
    (out_e * w).sum().backward()
    for (n, pe), pc in zip(ref.named_parameters(), model.parameters()):
        torch.testing.assert_close(pc.grad, pe.grad, msg=n, rtol=1e-6 if exact else 1e-3, atol=1e-9 if exact else 1e-5)
    # the module is left with eager's final state
    lifted = bind(model[1]).binding.lifted
    for a in lifted.state_attrs:
        se, sc = _get_state(ref[1], a), _get_state(model[1], a)
        torch.testing.assert_close(sc.detach(), se.detach(), rtol=1e-6 if exact else 1e-3, atol=1e-9 if exact else 1e-5)


@pytest.mark.parametrize("name", sorted(SJ_NEURONS))
def test_spikingjelly_neurons_compile_from_their_step(name):
    _check_golden(SJ_NEURONS[name], torch.float64)


def test_spikingjelly_lif_family_binds_to_builtin_kernels():
    for cls, kind in ((sj.IFNode, "if"), (sj.LIFNode, "lif"), (sj.ParametricLIFNode, "plif")):
        b = bind(cls()).binding
        assert b is not None and b.how == f"builtin:{kind}", cls


def test_user_neuron_with_channel_decay_and_own_surrogate():
    _check_golden(lambda: ChannelDecayNeuron(4), torch.float64, head=False)


def test_lifting_under_cprofile_keeps_the_users_profiler():
    """Regression: compiling while the user profiles with cProfile raised "'Profile' object is not
    callable" inside the lift (restoring a C-level profiler through ``sys.setprofile``), so every
    generated neuron ran opaque. The bound-``apply`` surrogate (caught by the lift's profile hook) is
    found, and the user's profiler is active again afterwards."""
    import cProfile
    import sys
    prof = cProfile.Profile()
    prof.enable()
    try:
        lifted = lift_neuron(ChannelDecayNeuron(4, OddSpike.apply), torch.float64)
        after = sys.getprofile()
    finally:
        prof.disable()
    assert lifted.steady.surrogates[0].opaque
    assert after is prof


def test_user_neuron_surrogate_without_known_formula():
    """The derivative comes from the user's own backward (precomputed over the chunk)."""
    m = ChannelDecayNeuron(4, OddSpike.apply)
    lifted = lift_neuron(m, torch.float64)
    assert lifted.steady.surrogates[0].opaque
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), ChannelDecayNeuron(4, OddSpike.apply)).double()
    with torch.no_grad():
        model[0].weight.mul_(3.0)
    ref = copy.deepcopy(model)
    x = torch.rand(2, 2, 5, 5, dtype=torch.float64) * 2
    out = snncc.compile(model, T=5)(x)
    out_e = _eager(ref, x, 5)
    assert torch.equal(out, out_e) and out_e.sum() > 0
    out.sum().backward()
    out_e.sum().backward()
    for pe, pc in zip(ref.parameters(), model.parameters()):
        torch.testing.assert_close(pc.grad, pe.grad)


@pytest.mark.parametrize("kind", ["izhikevich", "alif"])
def test_snncc_two_state_neurons_run_generated_kernels(kind):
    mk = (lambda: snncc.Izhikevich(surrogate_function=snncc.surrogate.Sigmoid(alpha=0.5))) if kind == "izhikevich" \
        else (lambda: snncc.AdaptiveLIF(tau=2.0, tau_a=10.0, beta=0.3))
    model = nn.Sequential(nn.Linear(5, 6), mk()).double()
    with torch.no_grad():
        model[0].weight.mul_(40.0 if kind == "izhikevich" else 3.0)
    assert bind(model[1]).binding.how == "lifted"
    ref = copy.deepcopy(model)
    x = torch.rand(4, 5, dtype=torch.float64)
    out = snncc.compile(model, T=8)(x)
    out_e = _eager(ref, x, 8)
    assert torch.equal(out, out_e) and out_e.sum() > 0
    out.sum().backward()
    out_e.sum().backward()
    for pe, pc in zip(ref.parameters(), model.parameters()):
        torch.testing.assert_close(pc.grad, pe.grad)


@pytest.mark.parametrize("variant", ["leaky", "leaky_zero", "leaky_learn", "synaptic"])
def test_snntorch_neurons_compile(variant):
    snn = pytest.importorskip("snntorch")
    mk = {"leaky": lambda: snn.Leaky(beta=0.9, init_hidden=True),
          "leaky_zero": lambda: snn.Leaky(beta=0.8, init_hidden=True, reset_mechanism="zero"),
          "leaky_learn": lambda: snn.Leaky(beta=0.8, init_hidden=True, learn_beta=True, learn_threshold=True),
          "synaptic": lambda: snn.Synaptic(alpha=0.8, beta=0.9, init_hidden=True)}[variant]
    # NOTE: snnTorch's spikes are float32 whatever the input (`.float()`), so it is compared in float32,
    # where the generated kernel still gives eager's spikes exactly
    _check_golden(mk, torch.float32, exact=False)


@pytest.mark.parametrize("graded,learn,binary", [(1.0, False, True), (2.0, False, False), (1.0, True, False)])
def test_snntorch_spikes_are_binary_only_with_a_0_1_graded_factor_buffer(graded, learn, binary):
    """snnTorch's output is ``spike * graded_spikes_factor``: binary (the next conv keeps its input as
    bits) when that factor is a buffer holding 1.0 (its value is in the recognition key, so changing it
    re-specializes), not when it is 2.0 or a learnable Parameter. Regression: a snnTorch net's conv after
    a Leaky kept its float input and never took the spike-input convolutions."""
    snn = pytest.importorskip("snntorch")
    from snncc.recognize import config_key
    m = snn.Leaky(beta=0.9, init_hidden=True, graded_spikes_factor=graded, learn_graded_spikes_factor=learn)
    b = bind(m).binding
    assert b is not None and b.how == "lifted" and b.binary == binary
    if not learn:                 # the factor's value is part of the key
        k0 = config_key(m)
        m.graded_spikes_factor.fill_(3.0)
        assert config_key(m) != k0 and bind(m).binding.binary is False


def test_snntorch_output_tuple_runs_opaque_and_says_why():
    snn = pytest.importorskip("snntorch")
    m = snn.Leaky(beta=0.9, init_hidden=True, output=True)
    r = bind(m)
    assert r.binding is None and "tuple" in r.reason


def test_not_liftable_reasons():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.v = None

        def reset(self):
            self.v = None

        def forward(self, x):
            self.v = x if self.v is None else self.v + x
            if self.v.max() > 1:
                self.v = self.v * 0.5
            return (self.v > 1).float()

    class Noisy(DataDependent):
        def forward(self, x):
            self.v = x if self.v is None else self.v * 0.5 + x + 0.1 * torch.randn_like(x)
            return (self.v > 1).float()

    class Mixing(DataDependent):
        def forward(self, x):
            self.v = x if self.v is None else self.v * 0.5 + x.mean(dim=1, keepdim=True)
            return (self.v > 1).float()

    assert "data-dependent" in bind(DataDependent()).reason
    assert "random" in bind(Noisy()).reason
    assert "elementwise" in bind(Mixing()).reason
    model = nn.Sequential(nn.Linear(3, 4), Noisy())
    with pytest.warns(snncc.frontend.OpaqueModuleWarning, match=r"module '1' \(.*Noisy\) is not compiled: .*random"):
        snncc.compile(model, T=3)(torch.rand(2, 3))


def test_lifting_leaves_the_module_untouched():
    m = ChannelDecayNeuron(3)
    m.v = torch.full((2, 3, 4, 4), 0.25)
    before = m.v
    rng = torch.get_rng_state()
    lift_neuron(m, torch.float32)
    assert m.v is before and torch.equal(torch.get_rng_state(), rng) and m.w.grad is None


def test_generated_kernel_from_a_given_state_and_broadcast_input():
    m = sj.CUBALIFNode()
    L = lift_neuron(m, torch.float64)
    x = torch.rand(7, 3, 5, dtype=torch.float64, requires_grad=True) * 3
    s0 = tuple(torch.rand(7, 3, 5, dtype=torch.float64, requires_grad=True) for _ in L.state_attrs)
    params = L.params(m)
    # broadcast: the same x at every step; start from a given state
    out_c, st_c = ir_c_scan(L.first, L.steady, x, 6, True, s0, params)
    from snncc.runtime.reference import lifted_scan
    out_r, st_r = lifted_scan(L.first, L.steady, x, 6, True, s0, params)
    assert torch.equal(out_c, out_r) and all(torch.equal(a, b) for a, b in zip(st_c, st_r))
    gc = torch.autograd.grad(out_c.sum() + sum(s.sum() for s in st_c), (x,) + s0)
    gr = torch.autograd.grad(out_r.sum() + sum(s.sum() for s in st_r), (x,) + s0)
    for a, b in zip(gc, gr):
        torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------- property test
_UNARY = ["sigmoid", "tanh", "abs", "exp_clamped", "neg", "relu", "square"]
_BINARY = ["add", "sub", "mul", "max", "min", "where"]


def _apply_unary(name: str, a: torch.Tensor) -> torch.Tensor:
    if name == "exp_clamped":
        return torch.exp(torch.clamp(a, -3.0, 3.0))
    if name == "square":
        return a * a
    if name == "neg":
        return -a
    return getattr(torch, name)(a)


def _apply_binary(name: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if name == "add":
        return a + b
    if name == "sub":
        return a - b
    if name == "mul":
        return a * b
    if name == "max":
        return torch.maximum(a, b)
    if name == "min":
        return torch.minimum(a, b)
    return torch.where(a > b, a, b * 0.5)


class RandomNeuron(nn.Module):
    """A random elementwise step: ``h = v * decay + x + f(program)``, spike, hard or soft reset."""

    def __init__(self, program: List[tuple], soft: bool, surrogate: str, channels: int, per_channel: bool) -> None:
        super().__init__()
        self.program, self.soft = program, soft
        shape = (channels,) if per_channel else ()
        self.decay = nn.Parameter(torch.full(shape, 0.3) + (torch.linspace(0, 0.4, channels)
                                                             if per_channel else 0.0))
        self.spike_fn = {"superspike": snncc.surrogate.SuperSpike(), "atan": snncc.surrogate.ATan(),
                         "user": FastSigmoidSpike.apply}[surrogate]
        self.v = None

    def reset(self) -> None:
        self.v = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.v is None:
            self.v = torch.zeros_like(x)
        vals = [x, self.v, torch.sigmoid(self.decay) + 0 * x]
        for op in self.program:
            if op[0] in _UNARY:
                vals.append(_apply_unary(op[0], vals[op[1] % len(vals)]))
            else:
                vals.append(_apply_binary(op[0], vals[op[1] % len(vals)], vals[op[2] % len(vals)]))
        extra = torch.tanh(vals[-1]) * 0.3
        h = self.v * torch.sigmoid(self.decay) + x + extra
        s = self.spike_fn(h - 1.0)
        self.v = h - s if self.soft else h * (1.0 - s)
        return s


_ops = st.one_of(st.tuples(st.sampled_from(_UNARY), st.integers(0, 10)),
                 st.tuples(st.sampled_from(_BINARY), st.integers(0, 10), st.integers(0, 10)))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(program=st.lists(_ops, min_size=1, max_size=6), soft=st.booleans(),
       surrogate=st.sampled_from(["superspike", "atan", "user"]), per_channel=st.booleans(),
       seed=st.integers(0, 1000))
def test_random_elementwise_neurons_compile_to_kernels_equal_to_eager(program, soft, surrogate, per_channel, seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 5), RandomNeuron(program, soft, surrogate, 5, per_channel)).double()
    with torch.no_grad():
        model[0].weight.mul_(3.0)
    b = bind(model[1]).binding
    assert b is not None and b.how == "lifted", bind(model[1]).reason
    lifted = b.lifted.get(model[1], torch.float64)
    assert c_supports_ir(lifted.first, lifted.steady) is None
    ref = copy.deepcopy(model)
    x = torch.rand(4, 6, dtype=torch.float64)
    out = snncc.compile(model, T=5)(x)
    out_e = _eager(ref, x, 5)
    assert torch.equal(out, out_e)
    w = torch.randn(out.shape, dtype=torch.float64)
    (out * w).sum().backward()
    (out_e * w).sum().backward()
    for pe, pc in zip(ref.parameters(), model.parameters()):
        torch.testing.assert_close(pc.grad, pe.grad, rtol=1e-6, atol=1e-9)


def test_parameter_only_ops_are_hoisted_out_of_the_kernel():
    """``sigmoid(self.w)`` reads only a parameter: evaluated once per call by torch, not per neuron-step."""
    from snncc.neuron_ir import hoist_static
    L = lift_neuron(ChannelDecayNeuron(4), torch.float64)
    assert any(o.op == "sigmoid" for o in L.steady.ops)
    first, steady, prelude = hoist_static(L.first, L.steady)
    assert [o.op for o in prelude if o.op == "sigmoid"] and not any(o.op == "sigmoid" for o in steady.ops)
    assert first.params == steady.params and len(steady.params) > len(L.steady.params)


def test_switching_train_and_eval_does_not_lift_again(monkeypatch):
    """Regression: a train/eval switch re-lifted every neuron (the recognition cache held one configuration)."""
    from snncc import recognize
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), ChannelDecayNeuron(4))
    cm = snncc.compile(model, T=3)
    x = torch.rand(2, 2, 5, 5)
    cm(x)
    cm.eval()
    cm(x)
    calls = []
    real = recognize._recognize
    monkeypatch.setattr(recognize, "_recognize", lambda m: calls.append(m) or real(m))
    for mode in ("train", "eval", "train"):
        getattr(cm, mode)()
        cm(x)
    assert calls == []


def test_module_with_reset_but_no_state_compiles():
    """Regression: a resettable module whose forward keeps no state crashed recognition (IndexError)."""
    class Gate(nn.Module):
        def reset(self):
            pass

        def forward(self, x):
            return (x >= 0.5).to(x.dtype) * x

    model = nn.Sequential(nn.Linear(3, 4), Gate())
    b = bind(model[1]).binding
    assert b is not None and b.how == "lifted"
    x = torch.rand(2, 3)
    out = snncc.compile(model, T=3)(x)
    assert torch.equal(out, torch.stack([model(x)] * 3))


# ----------------------------------------------------------------------------- max-pool epilogue
@pytest.mark.parametrize("shape,k,channels_last", [((3, 4, 6, 6), 2, True), ((3, 4, 6, 6), 2, False),
                                                   ((2, 8, 7, 5), 2, True), ((2, 3, 9, 9), 3, False),
                                                   ((1, 16, 4, 8), 4, True)])
@pytest.mark.parametrize("broadcast,with_state", [(False, False), (True, False), (False, True)])
def test_pooled_generated_scan_equals_scan_then_pool(shape, k, channels_last, broadcast, with_state):
    """The generated scan with the k x k max pool as its epilogue (``ir_fwd_pool`` / ``ir_bwd_pool``):
    pooled spikes and final states identical to the plain scan followed by torch's max pool, and so are the
    gradients of the input, the initial states and the per-channel parameter (float64), rows and columns
    the pool drops included. Spike windows hold ties (several ones): the gradient must go to torch's pick."""
    torch.manual_seed(0)
    K, dtype = 4, torch.float64
    m = ChannelDecayNeuron(shape[1])
    L = lift_neuron(m, dtype)
    x = torch.rand((shape if broadcast else (K,) + shape), dtype=dtype) * 0.9
    if channels_last:
        x = (x.contiguous(memory_format=torch.channels_last) if broadcast else
             x.flatten(0, 1).contiguous(memory_format=torch.channels_last).view(x.shape))
    x.requires_grad_(True)
    s0 = tuple(torch.rand(shape, dtype=dtype, requires_grad=True) for _ in L.state_attrs) if with_state else None
    params = tuple(p.detach().clone().requires_grad_(True) for p in L.params(m))
    assert cpu_ir.ir_pool_ok(L.steady, x, broadcast, k)
    out_p, st_p = ir_c_scan(L.first, L.steady, x, K, broadcast, s0, params, pool=k)
    out, st = ir_c_scan(L.first, L.steady, x, K, broadcast, s0, params)
    ref = torch.nn.functional.max_pool2d(out.flatten(0, 1), k).view(K, *out_p.shape[1:])
    assert torch.equal(out_p, ref) and 0 < ref.mean() < 1
    assert all(torch.equal(a, b) for a, b in zip(st_p, st))
    g = torch.randn(ref.shape, dtype=dtype)
    wrt = (x,) + (s0 or ()) + params
    gp = torch.autograd.grad((out_p * g).sum() + sum(s.sum() for s in st_p), wrt)
    gr = torch.autograd.grad((ref * g).sum() + sum(s.sum() for s in st), wrt)
    for a, b in zip(gp, gr):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("make", [lambda c: ChannelDecayNeuron(c, OddSpike.apply),     # a surrogate only
                                  lambda c: sj.IzhikevichNode()],                     # two state variables
                         ids=["user-surrogate", "izhikevich"])
def test_pooled_generated_scan_with_saved_derivatives_and_two_states(make):
    """The pooled scans where the forward also saves the spike function's input for a user surrogate's
    own backward, and where the neuron carries two states: equal to the plain scan then torch's pool."""
    torch.manual_seed(0)
    K, shape, dtype = 3, (2, 4, 6, 6), torch.float64
    m = make(shape[1])
    L = lift_neuron(m, dtype)
    x = (torch.rand((K,) + shape, dtype=dtype) * 3.0).requires_grad_(True)
    params = tuple(p.detach().clone().requires_grad_(p.is_floating_point()) for p in L.params(m))
    out_p, st_p = ir_c_scan(L.first, L.steady, x, K, False, None, params, pool=2)
    out, st = ir_c_scan(L.first, L.steady, x, K, False, None, params)
    ref = torch.nn.functional.max_pool2d(out.flatten(0, 1), 2).view(out_p.shape)
    assert torch.equal(out_p, ref) and 0 < ref.mean() < 1
    assert all(torch.equal(a, b) for a, b in zip(st_p, st))
    g = torch.randn(ref.shape, dtype=dtype)
    wrt = (x,) + tuple(p for p in params if p.requires_grad)
    gp = torch.autograd.grad((out_p * g).sum() + sum(s.sum() for s in st_p), wrt, allow_unused=True)
    gr = torch.autograd.grad((ref * g).sum() + sum(s.sum() for s in st), wrt, allow_unused=True)
    for a, b in zip(gp, gr):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_pooled_scan_outside_its_domain_declines():
    m = ChannelDecayNeuron(4)
    L = lift_neuron(m, torch.float32)
    x = torch.rand(3, 2, 4, 5)                            # 3-d steps: no pooled geometry
    assert not cpu_ir.ir_pool_ok(L.steady, x, False, 2)
    assert ir_c_scan(L.first, L.steady, x, 3, False, None, L.params(m), pool=2) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_conv_neuron_pool_net_runs_the_pooled_kernel_and_matches_eager(dtype, monkeypatch):
    from snncc.runtime import dispatch
    calls = []
    real = dispatch.lifted_neuron_scan_pooled
    monkeypatch.setattr(snncc.runtime.executor, "lifted_neuron_scan_pooled",
                        lambda *a, **kw: calls.append(1) or real(*a, **kw))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), ChannelDecayNeuron(8), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(8 * 4 * 4, 5)).to(dtype)
    with torch.no_grad():
        model[0].weight.mul_(3.0)
    ref = copy.deepcopy(model)
    x = torch.rand(3, 2, 8, 8, dtype=dtype) * 2
    cm = snncc.compile(model, T=4, verify=True)
    out = cm(x)
    out_e = _eager(ref, x, 4)
    assert calls, "the pooled kernel did not run"
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, out_e, **tol)
    w = torch.randn(out.shape, dtype=dtype)
    (out * w).sum().backward()
    (out_e * w).sum().backward()
    for (n, pe), pc in zip(ref.named_parameters(), model.parameters()):
        torch.testing.assert_close(pc.grad, pe.grad, msg=n, **(tol if dtype == torch.float64 else
                                                                 dict(rtol=1e-4, atol=1e-5)))


class HardThresholdNeuron(_LazyStateNeuron):
    """A neuron with a hard threshold and no surrogate: its spikes carry no gradient in eager."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = 0.5 * self._v(x) + x
        s = (h >= 1.0).float()
        self.v = h * (1 - s)
        return s


def test_hard_threshold_neuron_gives_no_gradient_upstream_as_in_eager():
    """Regression: the compiled scan gave the layers before a hard-threshold neuron zero gradients where
    eager gives none (``grad is None``), which optimizers treat differently (weight decay, skipping)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), HardThresholdNeuron(), nn.Linear(8, 3))
    with torch.no_grad():
        model[0].weight.mul_(3.0)
    ref = copy.deepcopy(model)
    x = torch.rand(5, 4)
    xc, xe = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out = snncc.compile(model, T=3)(xc)
    out_e = _eager(ref, xe, 3)
    assert torch.equal(out, out_e) and out_e.abs().sum() > 0
    out.sum().backward()
    out_e.sum().backward()
    assert xe.grad is None and ref[0].weight.grad is None          # eager: nothing before the threshold
    assert xc.grad is None and model[0].weight.grad is None
    torch.testing.assert_close(model[2].weight.grad, ref[2].weight.grad)
    assert lift_neuron(HardThresholdNeuron(), torch.float32).output_grad is False
    assert lift_neuron(ChannelDecayNeuron(3), torch.float32).output_grad is True
