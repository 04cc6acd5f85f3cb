"""Property tests (hypothesis): random small feedforward SNNs compiled == eager in float64.

Each example draws a depth (1-3) of Linear or Conv layers, a neuron kind with its reset/decay/detach
options and tau, a surrogate, T (1-4), the batch size and the entry form; outputs must be identical and
gradients (parameters and input) equal to eager's. Examples where no neuron fires (or all fire) are
discarded, so that every accepted example compares meaningful spikes.
"""
from __future__ import annotations

import os

from typing import List

import pytest
import torch
from torch import nn

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, assume, given, note, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import snncc  # noqa: E402
from snncc import surrogate as sg  # noqa: E402

from conftest import assert_same_training  # noqa: E402

SURROGATES = {"sigmoid": sg.Sigmoid, "atan": sg.ATan, "superspike": sg.SuperSpike,
              "piecewise_linear": sg.PiecewiseLinear, "triangle": sg.Triangle, "rectangular": sg.Rectangular,
              "erf": sg.Erf}
KINDS = ("if", "lif", "plif", "izhikevich", "alif")

#: examples per property (derandomized: the same cases every run). NOTE: 25/15/15 cost 70 s of the suite's
#: ~10 minutes on the 2-core CI machine; a deeper run: SNNCC_PROPERTY_EXAMPLES=100 (the others get 60%)
EXAMPLES = int(os.environ.get("SNNCC_PROPERTY_EXAMPLES", "16"))
FEWER = max(1, EXAMPLES * 3 // 5)
SETTINGS = dict(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                       HealthCheck.data_too_large])


class Affine(nn.Module):
    """``x * gain + bias``: puts a layer's input in the neuron's firing range."""

    def __init__(self, gain: float, bias: float) -> None:
        super().__init__()
        self.gain, self.bias = gain, bias

    def forward(self, x):
        return x * self.gain + self.bias


@st.composite
def neurons(draw):
    kind = draw(st.sampled_from(KINDS))
    sur = SURROGATES[draw(st.sampled_from(sorted(SURROGATES)))](
        alpha=draw(st.sampled_from([None, 0.5, 2.0, 5.0])))
    detach = draw(st.booleans())
    if kind == "izhikevich":
        return (lambda: snncc.Izhikevich(surrogate_function=sur, detach_reset=detach)), 80.0, 60.0, kind
    v_reset = draw(st.sampled_from([0.0, 0.5, -0.2, None]))
    v_th = draw(st.sampled_from([1.0, 0.7]))
    common = dict(v_threshold=v_th, v_reset=v_reset, surrogate_function=sur, detach_reset=detach)
    if kind == "if":
        return (lambda: snncc.IF(**common)), 1.0, 0.0, kind
    tau = draw(st.sampled_from([1.5, 2.0, 3.0, 10.0]))
    decay_input = draw(st.booleans())
    gain = 1.0 if not decay_input else tau / 1.2
    if kind == "lif":
        return (lambda: snncc.LIF(tau=tau, decay_input=decay_input, **common)), gain, 0.0, kind
    if kind == "plif":
        return (lambda: snncc.ParametricLIF(init_tau=tau, decay_input=decay_input, **common)), gain, 0.0, kind
    beta = draw(st.sampled_from([0.1, 0.5]))
    tau_a = draw(st.sampled_from([2.0, 20.0]))
    return (lambda: snncc.AdaptiveLIF(tau=tau, tau_a=tau_a, beta=beta, decay_input=decay_input, **common)), \
        gain, 0.0, kind


@st.composite
def snns(draw):
    """(factory, input, T, form, description) for a random feedforward SNN."""
    depth = draw(st.integers(1, 3))
    conv_first = draw(st.booleans())
    n = draw(st.integers(1, 3))
    T = draw(st.integers(1, 4))
    # NOTE: a loop of one step looks like a step model (snncc warns): covered in test_api
    form = draw(st.sampled_from(["static", "loop_stack", "loop_mean"] if T > 1 else ["static"]))
    readout = draw(st.booleans())
    seed = draw(st.integers(0, 2 ** 16))
    specs = []
    image = conv_first
    ch, size, width = 2, 6, 5
    for i in range(depth):
        make_neuron, gain, bias, kind = draw(neurons())
        if image and draw(st.booleans()) or (image and i == 0):
            out_ch = draw(st.integers(2, 4))
            pool = draw(st.sampled_from([None, "avg", "max"])) if size >= 4 else None
            specs.append(("conv", ch, out_ch, pool, make_neuron, gain, bias, kind))
            ch = out_ch
            size = size // 2 if pool else size
        else:
            din = ch * size * size if image else width
            dout = draw(st.integers(3, 8))
            specs.append(("linear", din, dout, image, make_neuron, gain, bias, kind))
            image, width = False, dout
    out_dim = (ch * size * size) if image else width

    def factory() -> nn.Module:
        layers: List[nn.Module] = []
        for spec in specs:
            if spec[0] == "conv":
                _, cin, cout, pool, make_neuron, gain, bias, _ = spec
                layers += [nn.Conv2d(cin, cout, 3, padding=1), Affine(2.0 * gain, bias), make_neuron()]
                if pool == "avg":
                    layers.append(nn.AvgPool2d(2))
                elif pool == "max":
                    layers.append(nn.MaxPool2d(2))
            else:
                _, din, dout, flatten, make_neuron, gain, bias, _ = spec
                if flatten:
                    layers.append(nn.Flatten())
                layers += [nn.Linear(din, dout), Affine(3.0 * gain, bias), make_neuron()]
        if readout:
            if image:
                layers.append(nn.Flatten())
            layers.append(nn.Linear(out_dim, 3))
        net = nn.Sequential(*layers)
        if form == "static":
            return net
        return _Loop(net, T, form == "loop_mean")

    g = torch.Generator().manual_seed(seed)
    shape = (n, 2, 6, 6) if conv_first else (n, 5)
    x = torch.randn(*shape, generator=g, dtype=torch.float64) + 0.3
    desc = f"form={form} T={T} n={n} readout={readout} layers={[s[0] + ':' + s[-1] for s in specs]}"
    return factory, x, T, form, desc


class _Loop(nn.Module):
    def __init__(self, net: nn.Module, T: int, mean: bool) -> None:
        super().__init__()
        self.net, self.T, self.mean = net, T, mean

    def forward(self, x):
        out = torch.stack([self.net(x) for _ in range(self.T)])
        return out.mean(0) if self.mean else out


def _check(factory, x, T, form, desc, train: bool = True):
    note(desc)
    kw = dict(T=T) if form == "static" else {}
    torch.manual_seed(0)
    r = assert_same_training(factory, x, train=train, check_spikes=False, **kw)
    total = r["recorder"].total()
    note(f"spike rate {total}")
    assume(0.0 < total < 1.0)


@settings(**SETTINGS)
@given(snns())
def test_random_feedforward_snn_train(case):
    _check(*case)


@settings(**dict(SETTINGS, max_examples=FEWER))
@given(snns())
def test_random_feedforward_snn_eval(case):
    _check(*case, train=False)


@st.composite
def sequence_snns(draw):
    factory, x, T, _, desc = draw(snns())
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 16)))
    xs = x.unsqueeze(0) + 0.5 * torch.randn((T,) + tuple(x.shape), generator=g, dtype=x.dtype)
    return factory, xs, desc


@settings(**dict(SETTINGS, max_examples=FEWER))
@given(sequence_snns())
def test_random_feedforward_snn_sequence_form(case):
    factory, xs, desc = case
    note(desc)

    def step_factory():
        m = factory()
        return m.net if isinstance(m, _Loop) else m

    torch.manual_seed(0)
    r = assert_same_training(step_factory, xs, sequence=True, check_spikes=False)
    total = r["recorder"].total()
    note(f"spike rate {total}")
    assume(0.0 < total < 1.0)
