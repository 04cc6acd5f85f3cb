"""Golden tests: a zoo of step-mode SNNs built with snncc's neurons, compiled vs eager in float64.

Every test compares outputs (identical spikes), parameter and input gradients, and BatchNorm running
statistics of ``snncc.compile(model, ..., verify=True)`` against the eager step loop, and checks that the
eager run actually spiked (some spikes, not all), so no comparison is vacuous.
"""
from __future__ import annotations

import copy
from typing import Callable, Dict

import pytest
import torch
from torch import nn

import snncc
from snncc import surrogate as sg

from conftest import assert_same_training, eager_run, requires_spikingjelly, seed_surrogate_functions


# --------------------------------------------------------------------------- neurons and surrogates
SURROGATES: Dict[str, Callable[[], nn.Module]] = {
    "sigmoid": lambda: sg.Sigmoid(),
    "atan": lambda: sg.ATan(),
    "superspike": lambda: sg.SuperSpike(),
    "piecewise_linear": lambda: sg.PiecewiseLinear(),
    "esser_alpha2": lambda: sg.Esser(alpha=2.0),
    "triangle": lambda: sg.Triangle(),
    "zif_gamma05": lambda: sg.ZIF(alpha=0.5),
    "rectangular": lambda: sg.Rectangular(),
    "erf": lambda: sg.Erf(),
}


def heaviside(x: torch.Tensor) -> torch.Tensor:
    return (x >= 0).to(x.dtype)


#: Seed 001's hand-written SuperSpike (dtype-preserving heaviside, so it runs in float64).
SuperSpikeFunction = seed_surrogate_functions(heaviside)["superspike"]


class HandSuperSpike(nn.Module):
    """A user's surrogate: an autograd.Function in an nn.Module, unknown to snncc (kept opaque)."""

    def __init__(self, alpha: float = 10.0, spiking: bool = True) -> None:
        super().__init__()
        self.alpha, self.spiking = alpha, spiking

    def forward(self, x):
        return SuperSpikeFunction.apply(x, self.alpha) if self.spiking else heaviside(x)


def straight_through(x: torch.Tensor) -> torch.Tensor:
    """A plain-function surrogate: heaviside forward, sigmoid' backward via the detach trick."""
    s = torch.sigmoid(4.0 * x)
    return heaviside(x).detach() + (s - s.detach())


ALL_SURROGATES = dict(SURROGATES, hand_superspike=lambda: HandSuperSpike(), function=lambda: straight_through)

# name -> (factory(surrogate) -> neuron, input gain, input bias): gains chosen so that the eager run of the
# zoo's nets spikes in every layer but not everywhere.
NEURONS: Dict[str, tuple] = {
    "if": (lambda s: snncc.IF(surrogate_function=s), 1.0, 0.0),
    "if_soft": (lambda s: snncc.IF(v_reset=None, surrogate_function=s), 1.0, 0.0),
    "if_detach": (lambda s: snncc.IF(surrogate_function=s, detach_reset=True), 1.0, 0.0),
    "lif": (lambda s: snncc.LIF(surrogate_function=s), 2.0, 0.0),
    "lif_nodecay": (lambda s: snncc.LIF(decay_input=False, surrogate_function=s), 1.0, 0.0),
    "lif_vr05": (lambda s: snncc.LIF(v_reset=0.5, surrogate_function=s), 2.0, 0.0),
    "lif_nodecay_vr05": (lambda s: snncc.LIF(decay_input=False, v_reset=0.5, surrogate_function=s), 1.0, 0.0),
    "lif_soft": (lambda s: snncc.LIF(v_reset=None, surrogate_function=s), 2.0, 0.0),
    "lif_soft_nodecay": (lambda s: snncc.LIF(v_reset=None, decay_input=False, surrogate_function=s), 1.0, 0.0),
    "lif_detach": (lambda s: snncc.LIF(detach_reset=True, surrogate_function=s), 2.0, 0.0),
    "lif_soft_detach": (lambda s: snncc.LIF(v_reset=None, detach_reset=True, surrogate_function=s), 2.0, 0.0),
    "lif_tau3_vth05": (lambda s: snncc.LIF(tau=3.0, v_threshold=0.5, surrogate_function=s), 2.0, 0.0),
    "plif": (lambda s: snncc.ParametricLIF(surrogate_function=s), 2.0, 0.0),
    "plif_nodecay_soft": (lambda s: snncc.ParametricLIF(init_tau=3.0, decay_input=False, v_reset=None,
                                                        surrogate_function=s), 1.0, 0.0),
    "plif_vr05_detach": (lambda s: snncc.ParametricLIF(v_reset=0.5, detach_reset=True, surrogate_function=s),
                         2.0, 0.0),
    "izhikevich": (lambda s: snncc.Izhikevich(surrogate_function=s), 80.0, 60.0),
    "izhikevich_detach": (lambda s: snncc.Izhikevich(surrogate_function=s, detach_reset=True), 80.0, 60.0),
    "alif": (lambda s: snncc.AdaptiveLIF(surrogate_function=s), 2.0, 0.0),
    "alif_soft_nodecay": (lambda s: snncc.AdaptiveLIF(v_reset=None, decay_input=False, beta=0.5, tau_a=5.0,
                                                      surrogate_function=s), 1.0, 0.0),
}


def make_neuron(kind: str, surrogate: str = "sigmoid") -> nn.Module:
    return NEURONS[kind][0](ALL_SURROGATES[surrogate]())


# --------------------------------------------------------------------------- the zoo's step models
class ConvNet(nn.Module):
    """conv -> neuron -> avgpool -> flatten -> linear -> neuron (spike output)."""

    def __init__(self, kind: str, surrogate: str = "sigmoid", cin: int = 2, size: int = 8) -> None:
        super().__init__()
        _, self.gain, self.bias = NEURONS[kind]
        self.conv = nn.Conv2d(cin, 4, 3, padding=1)
        self.sn1 = make_neuron(kind, surrogate)
        self.pool = nn.AvgPool2d(2)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(4 * (size // 2) ** 2, 6)
        self.sn2 = make_neuron(kind, surrogate)

    def forward(self, x):
        x = self.sn1(self.conv(x) * self.gain + self.bias)
        x = self.flat(self.pool(x))
        return self.sn2(self.fc(x) * (6.0 * self.gain) + self.bias)


class BNConvNet(nn.Module):
    """conv -> BN -> neuron -> maxpool -> conv -> BN -> neuron -> flatten -> linear (analog output)."""

    def __init__(self, kind: str = "lif", surrogate: str = "sigmoid") -> None:
        super().__init__()
        _, self.gain, self.bias = NEURONS[kind]
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.sn1 = make_neuron(kind, surrogate)
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.sn2 = make_neuron(kind, surrogate)
        self.fc = nn.Linear(4 * 4 * 4, 5)

    def forward(self, x):
        x = self.pool(self.sn1(self.bn1(self.conv1(x)) * self.gain + self.bias))
        x = self.sn2(self.bn2(self.conv2(x)) * self.gain + self.bias)
        return self.fc(torch.flatten(x, 1))


class MLP(nn.Module):
    def __init__(self, kind: str = "lif", surrogate: str = "sigmoid", din: int = 10, hidden: int = 12) -> None:
        super().__init__()
        _, self.gain, self.bias = NEURONS[kind]
        self.fc1 = nn.Linear(din, hidden)
        self.sn1 = make_neuron(kind, surrogate)
        self.fc2 = nn.Linear(hidden, 4)
        self.sn2 = make_neuron(kind, surrogate)

    def forward(self, x):
        x = self.sn1(self.fc1(x) * (2 * self.gain) + self.bias)
        return self.sn2(self.fc2(x) * (4 * self.gain) + self.bias)


class ResidualNet(nn.Module):
    """x + block(x) residual (SEW-style ADD on spikes), then avgpool and a linear readout."""

    def __init__(self, kind: str = "lif") -> None:
        super().__init__()
        _, self.gain, self.bias = NEURONS[kind]
        self.stem = nn.Conv2d(2, 4, 3, padding=1)
        self.sn0 = make_neuron(kind)
        self.block = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), make_neuron(kind),
                                   nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4))
        self.sn1 = make_neuron(kind)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = self.sn0(self.stem(x) * self.gain + self.bias)
        x = x + self.sn1(self.block(x) * self.gain + self.bias)
        return self.fc(self.pool(x).flatten(1))


class DropoutNet(nn.Module):
    """Linear -> neuron -> dropout -> linear -> neuron; a dropout1d on the input too."""

    def __init__(self, kind: str = "lif", p: float = 0.3) -> None:
        super().__init__()
        _, self.gain, self.bias = NEURONS[kind]
        self.fc1 = nn.Linear(10, 16)
        self.sn1 = make_neuron(kind)
        self.drop = nn.Dropout(p)
        self.fc2 = nn.Linear(16, 6)
        self.sn2 = make_neuron(kind)

    def forward(self, x):
        x = self.drop(self.sn1(self.fc1(x) * (2 * self.gain) + self.bias))
        return self.sn2(self.fc2(x) * (4 * self.gain) + self.bias)


# --------------------------------------------------------------------------- model-loops-itself wrappers
class LoopStack(nn.Module):
    """Loops over time itself and returns the stacked outputs ``[T, N, ...]``."""

    def __init__(self, step: nn.Module, T: int) -> None:
        super().__init__()
        self.step, self.T = step, T

    def forward(self, x):
        return torch.stack([self.step(x) for _ in range(self.T)])


class LoopMean(nn.Module):
    """Resets its neurons, loops, returns the mean over time (seed 001's readout)."""

    def __init__(self, step: nn.Module, T: int) -> None:
        super().__init__()
        self.step, self.T = step, T

    def forward(self, x):
        outs = []
        for t in range(self.T):
            outs.append(self.step(x))
        return torch.stack(outs).mean(dim=0)


class LoopSeq(nn.Module):
    """Loops over the time dimension of its input ``[T, N, ...]`` (``self.T`` steps); sums the outputs."""

    def __init__(self, step: nn.Module, T: int) -> None:
        super().__init__()
        self.step, self.T = step, T

    def forward(self, x_seq):
        acc = 0.0
        for t in range(self.T):
            acc = acc + self.step(x_seq[t])
        return acc


class LoopSeqShape(nn.Module):
    """SpikingJelly's multi-step idiom: ``T = x_seq.shape[0]; for t in range(T)``."""

    def __init__(self, step: nn.Module) -> None:
        super().__init__()
        self.step = step

    def forward(self, x_seq):
        T = x_seq.shape[0]
        outs = []
        for t in range(T):
            outs.append(self.step(x_seq[t]))
        return torch.stack(outs)


def with_bn_stats(factory: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    """The model with trained-looking BatchNorm statistics (eval mode then normalizes to O(1) values)."""
    def build() -> nn.Module:
        m = factory()
        g = torch.Generator().manual_seed(11)
        with torch.no_grad():
            for bn in m.modules():
                if isinstance(bn, nn.modules.batchnorm._BatchNorm):
                    n = bn.num_features
                    bn.running_mean.copy_(0.05 * torch.randn(n, generator=g))
                    bn.running_var.copy_(0.02 + 0.05 * torch.rand(n, generator=g))
                    bn.weight.copy_(0.8 + 0.4 * torch.rand(n, generator=g))
                    bn.bias.copy_(0.1 * torch.randn(n, generator=g))
        return m
    return build


def _img(n: int = 2, c: int = 2, size: int = 8, T: int = None, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (n, c, size, size) if T is None else (T, n, c, size, size)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def run_form(form: str, factory: Callable[[], nn.Module], x: torch.Tensor, T: int, **kw):
    """Run assert_same_training in one of the entry forms (x is the per-step input ``[N, ...]``)."""
    if form == "static":
        return assert_same_training(factory, x, T=T, **kw)
    if form == "sequence":
        g = torch.Generator().manual_seed(5)
        xs = x.unsqueeze(0) * (0.5 + torch.rand((T,) + (1,) * x.dim(), generator=g, dtype=x.dtype)) + \
            0.3 * torch.randn((T,) + tuple(x.shape), generator=g, dtype=x.dtype)
        return assert_same_training(factory, xs, sequence=True, **kw)
    if form == "loop_stack":
        return assert_same_training(lambda: LoopStack(factory(), T), x, **kw)
    if form == "loop_mean":
        return assert_same_training(lambda: LoopMean(factory(), T), x, **kw)
    raise ValueError(form)


FORMS = ("static", "sequence", "loop_stack", "loop_mean")


# --------------------------------------------------------------------------- every neuron x every surrogate
# One of each neuron kind and reset/decay/detach mode; the remaining variants run in test_forms_train.
MATRIX_KINDS = ["if", "if_soft", "lif", "lif_nodecay", "lif_vr05", "lif_soft", "lif_detach", "plif",
                "izhikevich", "alif"]


@pytest.mark.parametrize("surrogate", sorted(ALL_SURROGATES))
@pytest.mark.parametrize("kind", MATRIX_KINDS)
def test_neuron_x_surrogate_train(kind, surrogate):
    assert_same_training(lambda: ConvNet(kind, surrogate), _img(), T=3)


# --------------------------------------------------------------------------- every neuron in every form
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("kind", sorted(NEURONS))
def test_forms_train(kind, form):
    x = torch.randn(3, 10, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    run_form(form, lambda: MLP(kind), x, T=4)


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("kind", ["if", "if_soft", "lif", "lif_nodecay_vr05", "lif_soft_detach", "plif"])
def test_reference_backend_matches_eager(kind, train, monkeypatch):
    """With SNNCC_BACKEND=reference (no generated C scans) the compiled model matches eager as well."""
    monkeypatch.setenv("SNNCC_BACKEND", "reference")
    assert_same_training(lambda: ConvNet(kind, "atan"), _img(), T=3, train=train)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("kind", ["if", "lif", "plif", "izhikevich", "alif"])
def test_forms_eval(kind, form):
    r = run_form(form, with_bn_stats(lambda: BNConvNet(kind)), _img(n=3), T=3, train=False)
    assert not r["compiled"].training


def test_loop_over_sequence_input():
    xs = _img(T=4)
    assert_same_training(lambda: LoopSeq(ConvNet("lif"), 4), xs)


def test_loop_over_sequence_input_shape_dependent_range():
    """``for t in range(x_seq.shape[0])``: the shape is known when snncc specializes on the input."""
    xs = _img(T=4)
    assert_same_training(lambda: LoopSeqShape(ConvNet("lif")), xs)


def test_T1():
    assert_same_training(lambda: ConvNet("if"), _img() * 3, T=1)


def test_sequence_with_different_T_per_call():
    """One compiled model called with x_seq of T=2 then T=5: each call matches eager of that length."""
    torch.manual_seed(0)
    model = ConvNet("lif").double()
    ref = copy.deepcopy(model)
    cm = snncc.compile(model, sequence=True, verify=True)
    for T in (2, 5, 2):
        xs = _img(T=T, seed=T)
        out = cm(xs)
        assert out.shape[0] == T
        assert torch.equal(out, eager_run(ref, xs, sequence=True))


# --------------------------------------------------------------------------- architectures
@pytest.mark.parametrize("form", ["static", "sequence", "loop_mean"])
def test_conv_bn_pool_linear_train(form):
    r = run_form(form, lambda: BNConvNet("lif"), _img(n=3), T=3, every_layer=True)
    # step mode: the running statistics are updated once per step (T updates per forward)
    for m in (r["model"], r["eager"]):
        bns = [b for b in m.modules() if isinstance(b, nn.BatchNorm2d)]
        assert len(bns) == 2 and all(int(b.num_batches_tracked) == 3 for b in bns)


def test_bn_running_stats_T_updates_per_forward():
    T = 4
    r = assert_same_training(lambda: BNConvNet("lif"), _img(n=3), T=T, calls=2)
    for m in (r["model"], r["eager"]):
        assert int(m.bn1.num_batches_tracked) == 2 * T
        assert int(m.bn2.num_batches_tracked) == 2 * T
    # (assert_same_training compared running_mean/var with eager's: T momentum updates per call, one per step)
    assert not torch.allclose(r["model"].bn1.running_mean, torch.zeros(4, dtype=torch.float64))


def test_bn_eval_uses_running_stats():
    r = assert_same_training(with_bn_stats(lambda: BNConvNet("lif")), _img(n=2), T=3, train=False)
    assert int(r["model"].bn1.num_batches_tracked) == 0   # eval: no statistics update


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("form", ["static", "sequence", "loop_stack"])
def test_residual_add(form, train):
    run_form(form, with_bn_stats(lambda: ResidualNet("lif")), _img(), T=3, train=train)


@pytest.mark.parametrize("form", FORMS)
def test_dropout_eval_is_identity(form):
    x = torch.randn(3, 10, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    run_form(form, lambda: DropoutNet("lif"), x, T=3, train=False)


@pytest.mark.parametrize("form", ["static", "sequence", "loop_stack"])
def test_dropout_train_same_draws(form):
    """Dropout in training draws what eager draws (same seed -> same masks -> same spikes and grads)."""
    x = torch.randn(3, 10, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    run_form(form, lambda: DropoutNet("lif"), x, T=3, train=True)


@pytest.mark.parametrize("train", [True, False])
def test_eval_no_grad(train):
    torch.manual_seed(0)
    model = BNConvNet("lif").double().train(train)
    ref = copy.deepcopy(model)
    cm = snncc.compile(model, T=3, verify=True)
    x = _img()
    with torch.no_grad():
        out = cm(x)
        exp = eager_run(ref, x, T=3)
    assert not out.requires_grad
    torch.testing.assert_close(out, exp, rtol=1e-9, atol=1e-12)


def test_steps_share_neuron_with_two_calls_per_step():
    """One neuron module called twice per step (weight sharing through time and depth)."""

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(8, 8)
            self.fc2 = nn.Linear(8, 8)
            self.sn = snncc.IF()   # NOTE: one state, advanced twice per step, as in eager

        def forward(self, x):
            return self.sn(self.fc2(self.sn(self.fc1(x) * 2.0)) * 2.0)

    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    assert_same_training(Twice, x, T=3)


@pytest.mark.parametrize("form", ["static", "sequence"])
def test_functional_ops_and_methods(form):
    """F.conv2d / F.linear / torch.flatten / x.relu()-style ops inside a step model."""
    import torch.nn.functional as F

    class Fn(nn.Module):
        def __init__(self):
            super().__init__()
            self.w1 = nn.Parameter(torch.randn(4, 2, 3, 3) * 0.5)
            self.w2 = nn.Parameter(torch.randn(5, 64) * 0.3)
            self.sn1 = snncc.LIF(surrogate_function=sg.ATan())
            self.sn2 = snncc.LIF(v_reset=None, surrogate_function=sg.Erf())

        def forward(self, x):
            y = self.sn1(F.conv2d(x, self.w1, padding=1) * 2.0)
            y = F.avg_pool2d(y, 2)
            y = torch.flatten(y, 1)
            return self.sn2(F.linear(y, self.w2).mul(3.0).add(0.2))

    run_form(form, Fn, _img(), T=3)


# --------------------------------------------------------------------------- user-written surrogates / neurons
@pytest.mark.parametrize("form", ["static", "sequence", "loop_mean"])
@pytest.mark.parametrize("kind", ["lif", "lif_soft", "plif", "alif"])
def test_hand_written_surrogate_in_snncc_neuron(kind, form):
    run_form(form, lambda: ConvNet(kind, "hand_superspike"), _img(n=3), T=3, every_layer=True)


class SeedSuperSpikeFunction(torch.autograd.Function):
    """Seed 001's SuperSpike verbatim: ``(x >= 0).float()`` forward (float32 spikes)."""

    @staticmethod
    def forward(ctx, x, alpha):
        if x.requires_grad:
            ctx.save_for_backward(x)
            ctx.alpha = alpha
        return (x >= 0).float()

    @staticmethod
    def backward(ctx, grad_output):
        (x,) = ctx.saved_tensors
        denom = ctx.alpha * x.abs() + 1.0
        return grad_output * (1.0 / (denom * denom)), None


class SeedSuperSpike(nn.Module):
    def __init__(self, alpha: float = 10.0) -> None:
        super().__init__()
        self.alpha = alpha

    def forward(self, x):
        return SeedSuperSpikeFunction.apply(x, self.alpha)


@pytest.mark.parametrize("form", ["static", "loop_mean"])
def test_seed_superspike_verbatim_in_snncc_lif_float32(form):
    class Net(ConvNet):
        def __init__(self):
            super().__init__("lif")
            self.sn1.surrogate_function = SeedSuperSpike()
            self.sn2.surrogate_function = SeedSuperSpike()

    run_form(form, Net, _img().float(), T=3, dtype=torch.float32)


def test_hand_written_surrogate_with_batchnorm():
    assert_same_training(lambda: BNConvNet("lif", "hand_superspike"), _img(n=3), T=3)


@requires_spikingjelly
@pytest.mark.parametrize("form", ["static", "loop_mean"])
def test_hand_written_surrogate_in_spikingjelly_lif(form):
    from spikingjelly.activation_based import neuron

    class SJNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 4, 3, padding=1)
            self.sn1 = neuron.LIFNode(surrogate_function=HandSuperSpike(alpha=10.0))
            self.fc = nn.Linear(4 * 8 * 8, 6)
            self.sn2 = neuron.LIFNode(surrogate_function=HandSuperSpike(alpha=10.0))

        def forward(self, x):
            x = self.sn1(self.conv(x) * 2.0)
            return self.sn2(self.fc(x.flatten(1)) * 4.0)

    run_form(form, SJNet, _img(), T=3, every_layer=True)


class MyLIF(nn.Module):
    """A user's own step neuron, not snncc's: ``self.v`` state and a ``reset()`` method."""

    def __init__(self, tau: float = 2.0, v_th: float = 1.0) -> None:
        super().__init__()
        self.tau, self.v_th = tau, v_th
        self.v = None

    def reset(self) -> None:
        self.v = None

    def forward(self, x):
        if self.v is None:
            self.v = torch.zeros_like(x)
        self.v = self.v + (x - self.v) / self.tau
        s = SuperSpikeFunction.apply(self.v - self.v_th, 5.0)
        self.v = self.v * (1.0 - s)
        return s


class MyLIFNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.sn1 = MyLIF()
        self.fc = nn.Linear(4 * 8 * 8, 6)
        self.sn2 = MyLIF(tau=3.0)

    def forward(self, x):
        x = self.sn1(self.conv(x) * 2.0)
        return self.sn2(self.fc(x.flatten(1)) * 8.0)


@pytest.mark.parametrize("form", FORMS)
def test_user_defined_step_neuron(form):
    run_form(form, MyLIFNet, _img(), T=3, every_layer=True)


class RecurrentLoop(nn.Module):
    """Explicit recurrence in the model's own loop: spikes at t-1 are concatenated to the input at t."""

    def __init__(self, kind: str = "lif", T: int = 4, din: int = 6, hidden: int = 8) -> None:
        super().__init__()
        _, self.gain, self.bias = NEURONS[kind]
        self.T, self.hidden = T, hidden
        self.fc = nn.Linear(din + hidden, hidden)
        self.sn = make_neuron(kind)
        self.out = nn.Linear(hidden, 3)

    def forward(self, x):
        s = x.new_zeros((x.shape[0], self.hidden))
        outs = []
        for t in range(self.T):
            s = self.sn(self.fc(torch.cat([x, s], dim=1)) * (2 * self.gain) + self.bias)
            outs.append(self.out(s))
        return torch.stack(outs)


class RecurrentSeqLoop(nn.Module):
    """Recurrence over an input sequence ``[N, T, D]`` (time on dim 1), feeding back the previous spikes."""

    def __init__(self, hidden: int = 8) -> None:
        super().__init__()
        self.hidden = hidden
        self.fc = nn.Linear(6 + hidden, hidden)
        self.sn = snncc.LIF(v_reset=None, surrogate_function=sg.ATan())
        self.out = nn.Linear(hidden, 3)

    def forward(self, x):
        s = x.new_zeros(x.shape[0], self.hidden)
        acc = 0
        for t in range(x.shape[1]):   # NOTE: loop bound read from the input shape
            s = self.sn(self.fc(torch.cat([x[:, t], s], dim=1)) * 4.0)
            acc = acc + self.out(s)
        return acc / x.shape[1]


@pytest.mark.parametrize("kind", ["if", "lif", "plif", "alif", "izhikevich"])
def test_explicit_recurrence_in_own_loop(kind):
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    assert_same_training(lambda: RecurrentLoop(kind), x, every_layer=True)


def test_explicit_recurrence_over_sequence_shape_dependent_range():
    x = torch.randn(3, 5, 6, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    assert_same_training(RecurrentSeqLoop, x)


class RecurrentZerosLoop(RecurrentLoop):
    """The initial state built with ``torch.zeros(x.shape[0], ...)`` (the most common way to write it)."""

    def forward(self, x):
        s = torch.zeros(x.shape[0], self.hidden, dtype=x.dtype, device=x.device)
        outs = []
        for t in range(self.T):
            s = self.sn(self.fc(torch.cat([x, s], dim=1)) * (2 * self.gain) + self.bias)
            outs.append(self.out(s))
        return torch.stack(outs)


def test_explicit_recurrence_torch_zeros_of_batch_size():
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    assert_same_training(RecurrentZerosLoop, x)


# --------------------------------------------------------------------------- float32 with tolerances
@pytest.mark.parametrize("form", ["static", "sequence", "loop_mean"])
def test_float32_tolerances(form):
    run_form(form, lambda: ConvNet("lif"), _img().float(), T=3, dtype=torch.float32)


def test_float32_batchnorm_train():
    assert_same_training(lambda: BNConvNet("lif"), _img().float(), T=3, dtype=torch.float32)
