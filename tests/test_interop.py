"""Interop: SpikingJelly and snnTorch models compiled vs eager, unchanged (float64, identical spikes).

SpikingJelly's IF/LIF/ParametricLIF nodes with Sigmoid/ATan/Erf are recognized (mapped onto snncc's
neuron specs); other surrogates and every other stateful module (SJ's Dropout, snnTorch's neurons) are kept
opaque and called eagerly in step order. Either way the result must be the eager model's.
"""
from __future__ import annotations

import copy
from typing import Callable

import pytest
import torch
from torch import nn

import snncc

from conftest import (assert_same_training, eager_run, requires_snntorch, requires_spikingjelly,
                      seed_surrogate_functions)


def _img(n: int = 2, c: int = 3, size: int = 32, T: int = None, seed: int = 1, scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    shape = (n, c, size, size) if T is None else (T, n, c, size, size)
    return scale * torch.randn(*shape, generator=g, dtype=torch.float64)


# --------------------------------------------------------------------------- seed 001's surrogates
def _heaviside_f32(x: torch.Tensor) -> torch.Tensor:
    return (x >= 0).float()          # seed 001 exactly: spikes are float32 whatever the input dtype


def _heaviside_keep(x: torch.Tensor) -> torch.Tensor:
    return (x >= 0).to(x.dtype)      # the same, dtype-preserving (so the model runs in float64)


def _seed_surrogates(heaviside: Callable[[torch.Tensor], torch.Tensor]):
    """Seed 001's SuperSpike, SigmoidDerivative and Esser, as written there (autograd.Function + Module)."""

    fns = seed_surrogate_functions(heaviside)
    SuperSpikeFunction, SigmoidDerivativeFunction, EsserFunction = \
        fns["superspike"], fns["sigmoid_derivative"], fns["esser"]

    def module(fn, default_alpha):
        class Surrogate(nn.Module):
            def __init__(self, alpha=default_alpha, spiking=True):
                super().__init__()
                self.alpha, self.spiking = alpha, spiking

            def forward(self, x):
                return fn.apply(x, self.alpha) if self.spiking else heaviside(x)
        return Surrogate

    return {"superspike": lambda: module(SuperSpikeFunction, 100.0)(alpha=10.0),
            "sigmoid_derivative": lambda: module(SigmoidDerivativeFunction, 4.0)(alpha=4.0),
            "esser": lambda: module(EsserFunction, 1.0)(alpha=1.0)}


SEED_SURROGATES_F64 = _seed_surrogates(_heaviside_keep)
SEED_SURROGATES_F32 = _seed_surrogates(_heaviside_f32)


# --------------------------------------------------------------------------- seed 001's CSNN
@requires_spikingjelly
class TestBasicCSNN:
    """examples/csnn.py's BasicCSNN: the seed's network, looping over time itself with SJ LIF nodes."""

    @staticmethod
    def factory(surrogate=None, T: int = 4):
        """BasicCSNN with its 2nd conv and 1st linear weights scaled up x6, so that every LIF layer spikes
        on a random input within T=4 steps (at its default init the deeper layers stay silent)."""
        from examples.csnn import BasicCSNN

        def build():
            m = BasicCSNN(T=T, surrogate_function=None if surrogate is None else surrogate())
            with torch.no_grad():
                m.net[3].weight.mul_(6.0)
                m.net[7].weight.mul_(6.0)
            return m
        return build

    @pytest.mark.parametrize("train", [True, False])
    def test_default_sigmoid(self, train):
        assert_same_training(self.factory(), _img(scale=2.0), train=train)

    @pytest.mark.parametrize("name", sorted(SEED_SURROGATES_F64))
    def test_seed_surrogates_float64(self, name):
        assert_same_training(self.factory(SEED_SURROGATES_F64[name]), _img(scale=2.0))

    @pytest.mark.parametrize("name", sorted(SEED_SURROGATES_F32))
    def test_seed_surrogates_as_written_float32(self, name):
        """The seed's surrogates verbatim ((x >= 0).float()) on the seed's float32 model."""
        assert_same_training(self.factory(SEED_SURROGATES_F32[name]), _img(scale=2.0).float(),
                             dtype=torch.float32)

    @pytest.mark.parametrize("name", ["ATan", "Erf"])
    def test_sj_surrogates(self, name):
        from spikingjelly.activation_based import surrogate
        assert_same_training(self.factory(getattr(surrogate, name)), _img(scale=2.0))

    def test_eval_no_grad_and_repeat_calls(self):
        """Inference as the seed's test loop runs it: eval(), no_grad, several batches."""
        torch.manual_seed(0)
        model = self.factory()().double().eval()
        ref = copy.deepcopy(model)
        cm = snncc.compile(model, verify=True)
        with torch.no_grad():
            for seed in (1, 2):
                x = _img(seed=seed, scale=2.0)
                assert torch.equal(cm(x), eager_run(ref, x))

    def test_state_after_call_matches_eager(self):
        """After a compiled call the SJ LIFNodes' ``v`` is what eager leaves there."""
        torch.manual_seed(0)
        model = self.factory(T=3)().double()
        ref = copy.deepcopy(model)
        cm = snncc.compile(model, verify=True)
        x = _img(scale=2.0)
        cm(x)
        eager_run(ref, x)
        for i in (1, 4, 8):
            v_c, v_e = model.net[i].v, ref.net[i].v
            assert isinstance(v_c, torch.Tensor) and isinstance(v_e, torch.Tensor)
            torch.testing.assert_close(v_c, v_e, rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------- SJ neurons x SJ surrogates
MAPPED_SURROGATES = ["Sigmoid", "ATan", "Erf"]
# NOTE: SJ 0.0.0.0.14's NonzeroSignLogAbs fails its own backward in eager (a jit signature error): not used.
OPAQUE_SURROGATES = ["PiecewiseQuadratic", "PiecewiseExp", "SoftSign", "PiecewiseLeakyReLU", "QPseudoSpike",
                     "LeakyKReLU", "LogTailedReLU"]

SJ_NEURONS = {
    "IFNode": lambda sg: dict(cls="IFNode", surrogate_function=sg),
    "IFNode_soft_detach": lambda sg: dict(cls="IFNode", surrogate_function=sg, v_reset=None, detach_reset=True),
    "LIFNode": lambda sg: dict(cls="LIFNode", surrogate_function=sg),
    "LIFNode_tau3_nodecay": lambda sg: dict(cls="LIFNode", surrogate_function=sg, tau=3.0, decay_input=False),
    "LIFNode_soft": lambda sg: dict(cls="LIFNode", surrogate_function=sg, v_reset=None),
    "LIFNode_vr05_detach": lambda sg: dict(cls="LIFNode", surrogate_function=sg, v_reset=0.5, detach_reset=True),
    "ParametricLIFNode": lambda sg: dict(cls="ParametricLIFNode", surrogate_function=sg),
    "ParametricLIFNode_nodecay_soft": lambda sg: dict(cls="ParametricLIFNode", surrogate_function=sg,
                                                      init_tau=3.0, decay_input=False, v_reset=None),
}


def sj_node(kind: str, surrogate_name: str):
    from spikingjelly.activation_based import neuron, surrogate
    kw = SJ_NEURONS[kind](getattr(surrogate, surrogate_name)())
    return getattr(neuron, kw.pop("cls"))(**kw)


class SJStepNet(nn.Module):
    """SJ ``layer`` wrappers in step mode 's': Conv2d -> BN -> node -> MaxPool -> Flatten -> Linear -> node."""

    def __init__(self, kind: str, surrogate_name: str, bn: bool = False) -> None:
        super().__init__()
        from spikingjelly.activation_based import layer
        self.conv = layer.Conv2d(2, 4, 3, padding=1)
        self.bn = layer.BatchNorm2d(4) if bn else nn.Identity()
        self.sn1 = sj_node(kind, surrogate_name)
        self.pool = layer.MaxPool2d(2)
        self.flat = layer.Flatten()
        self.fc = layer.Linear(4 * 4 * 4, 6)
        self.sn2 = sj_node(kind, surrogate_name)

    def forward(self, x):
        x = self.pool(self.sn1(self.bn(self.conv(x)) * 2.0))
        return self.sn2(self.fc(self.flat(x)) * 4.0)


def _small(n=2, T=None, seed=1):
    return _img(n=n, c=2, size=8, T=T, seed=seed)


@requires_spikingjelly
@pytest.mark.parametrize("surrogate_name", MAPPED_SURROGATES + OPAQUE_SURROGATES[:2])
@pytest.mark.parametrize("kind", sorted(SJ_NEURONS))
def test_sj_neuron_x_surrogate(kind, surrogate_name):
    assert_same_training(lambda: SJStepNet(kind, surrogate_name), _small(), T=3)


@requires_spikingjelly
@pytest.mark.parametrize("surrogate_name", OPAQUE_SURROGATES)
def test_sj_opaque_surrogates(surrogate_name):
    """Surrogates snncc does not map run as the user's callable (forward and backward as eager)."""
    assert_same_training(lambda: SJStepNet("LIFNode", surrogate_name), _small(), T=3)


@requires_spikingjelly
def test_sj_mapped_surrogate_is_recognized():
    """Surrogates are recognized by their derivative, not their class: Sigmoid/ATan/Erf map to snncc's;
    PiecewiseQuadratic(alpha=1) *is* Esser's piecewise linear, SoftSign(alpha=2) is SuperSpike(2); a
    surrogate with no snncc formula (PiecewiseExp) keeps the user's callable (its own backward)."""
    from snncc.frontend import bind_neuron
    assert bind_neuron(sj_node("LIFNode", "ATan")).spec.surrogate.name == "atan"
    assert bind_neuron(sj_node("IFNode", "Sigmoid")).spec.surrogate.name == "sigmoid"
    assert bind_neuron(sj_node("ParametricLIFNode", "Erf")).spec.surrogate.name == "erf"
    pq = bind_neuron(sj_node("LIFNode", "PiecewiseQuadratic")).spec.surrogate
    assert (pq.name, pq.alpha) == ("piecewise_linear", 1.0)
    ss = bind_neuron(sj_node("LIFNode", "SoftSign")).spec.surrogate
    assert (ss.name, ss.alpha) == ("superspike", 2.0)
    assert bind_neuron(sj_node("LIFNode", "PiecewiseExp")).spec.surrogate.opaque


@requires_spikingjelly
@pytest.mark.parametrize("form", ["sequence", "static"])
@pytest.mark.parametrize("train", [True, False])
def test_sj_layers_eval_and_train_forms(form, train):
    kw = dict(T=3) if form == "static" else dict(sequence=True)
    x = _small(T=3) if form == "sequence" else _small()
    assert_same_training(lambda: SJStepNet("LIFNode", "Sigmoid"), x, train=train, **kw)


@requires_spikingjelly
def test_sj_layers_with_batchnorm_train():
    assert_same_training(lambda: SJStepNet("LIFNode", "ATan", bn=True), _small(n=3), T=3)


@requires_spikingjelly
def test_sj_layers_with_batchnorm_eval():
    def factory():
        m = SJStepNet("LIFNode", "ATan", bn=True)
        with torch.no_grad():
            m.bn.running_var.fill_(0.05)
        return m
    assert_same_training(factory, _small(n=3), T=3, train=False)


class SJNonSpiking(nn.Module):
    """SJ nodes with ``surrogate.Sigmoid(spiking=False)`` (the surrogate's primitive function forward)."""

    def __init__(self, cls: str) -> None:
        super().__init__()
        from spikingjelly.activation_based import neuron, surrogate
        self.fc = nn.Linear(5, 8)
        self.sn = getattr(neuron, cls)(surrogate_function=surrogate.Sigmoid(spiking=False))

    def forward(self, x):
        return self.sn(self.fc(x) * 3.0)


@requires_spikingjelly
@pytest.mark.parametrize("cls", ["IFNode", "LIFNode", "ParametricLIFNode"])
def test_sj_non_spiking_surrogate_train(cls):
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert_same_training(lambda: SJNonSpiking(cls), x, T=3, check_spikes=False)


@requires_spikingjelly
@pytest.mark.parametrize("cls", [
    "IFNode", "LIFNode", "ParametricLIFNode"])  # regression: SJ's IF/LIF eval path ignores the surrogate
def test_sj_non_spiking_surrogate_eval(cls):
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert_same_training(lambda: SJNonSpiking(cls), x, T=3, train=False, check_spikes=False)


@requires_spikingjelly
def test_sj_lif_eval_path():
    """SJ's LIFNode takes a separate (jit) code path in eval mode; compiled must still match it."""
    assert_same_training(lambda: SJStepNet("LIFNode_soft", "Sigmoid"), _small(), T=4, train=False)


@requires_spikingjelly
def test_sj_reset_net_model_in_own_loop():
    """A model calling functional.reset_net itself and looping with SJ layers (the seed's pattern)."""
    from spikingjelly.activation_based import functional

    class Loop(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = SJStepNet("ParametricLIFNode", "ATan")

        def forward(self, x):
            functional.reset_net(self)
            return torch.stack([self.body(x) for _ in range(3)]).sum(0)

    assert_same_training(Loop, _small())


# --------------------------------------------------------------------------- SJ model zoo
def _shrink_vgg_classifier(model: nn.Module, kw: dict) -> nn.Module:
    """Keep SpikingVGG (its features, avgpool and forward) but make its 100M-parameter classifier tiny."""
    from spikingjelly.activation_based import layer, neuron
    model.classifier = nn.Sequential(
        layer.Linear(512 * 7 * 7, 32), neuron.IFNode(**copy.deepcopy(kw)), layer.Dropout(),
        layer.Linear(32, 32), neuron.IFNode(**copy.deepcopy(kw)), layer.Dropout(),
        layer.Linear(32, 10))
    return model


@pytest.fixture(scope="module")
def vgg11_bn_small():
    """spiking_vgg11_bn(num_classes=10, IFNode, ATan, detach_reset) with a shrunk classifier, built once."""
    from conftest import import_sj_zoo
    (spiking_vgg,) = import_sj_zoo("spiking_vgg")
    from spikingjelly.activation_based import neuron, surrogate
    torch.manual_seed(0)
    kw = dict(surrogate_function=surrogate.ATan(), detach_reset=True)
    m = spiking_vgg.spiking_vgg11_bn(num_classes=10, spiking_neuron=neuron.IFNode, **kw)
    return _shrink_vgg_classifier(m, kw)


def _sj_bn_stats(m: nn.Module, var: float = 0.05) -> nn.Module:
    """Eval-mode BatchNorms with small running variance, so spikes reach the deep layers."""
    with torch.no_grad():
        for bn in m.modules():
            if isinstance(bn, nn.modules.batchnorm._BatchNorm):
                bn.running_var.fill_(var)
    return m


@requires_spikingjelly
def test_sj_zoo_spiking_vgg11_bn_train(vgg11_bn_small):
    assert_same_training(lambda: copy.deepcopy(vgg11_bn_small), _img(n=2, scale=1.0), T=2,
                         every_layer=False)


@requires_spikingjelly
def test_sj_zoo_spiking_vgg11_bn_full_eval(sj_model_zoo):
    """The unmodified zoo model (4096-wide classifier) in eval mode; float32 to keep it fast."""
    spiking_vgg, _ = sj_model_zoo
    from spikingjelly.activation_based import neuron, surrogate
    torch.manual_seed(0)
    model = spiking_vgg.spiking_vgg11_bn(num_classes=10, spiking_neuron=neuron.IFNode,
                                         surrogate_function=surrogate.ATan(), detach_reset=True)
    _sj_bn_stats(model).eval()
    cm = snncc.compile(model, T=2, verify=True)
    x = _img(n=1).float()
    with torch.no_grad():
        out_c = cm(x)
        out_e = eager_run(model, x, T=2)
    torch.testing.assert_close(out_c, out_e, rtol=1e-4, atol=1e-5)


def _sew18(**extra):
    from conftest import import_sj_zoo
    (sew_resnet,) = import_sj_zoo("sew_resnet")
    from spikingjelly.activation_based import neuron, surrogate
    return sew_resnet.sew_resnet18(num_classes=10, spiking_neuron=neuron.IFNode, cnf="ADD",
                                   surrogate_function=surrogate.ATan(), detach_reset=True, **extra)


@requires_spikingjelly
def test_sj_zoo_sew_resnet18_train(sj_model_zoo):
    assert_same_training(_sew18, _img(n=2), T=2, every_layer=False)


@requires_spikingjelly
def test_sj_zoo_sew_resnet18_eval(sj_model_zoo):
    assert_same_training(lambda: _sj_bn_stats(_sew18()), _img(n=1), T=2, train=False, every_layer=False)


# --------------------------------------------------------------------------- snnTorch
def _snntorch_spike_grad(default: bool):
    """snnTorch's default surrogate (ATan) emits float32 spikes ``(mem > thr).float()``, which breaks a
    float64 model in eager already; float64 tests pass a dtype-preserving surrogate instead."""
    return None if default else SEED_SURROGATES_F64["superspike"]()


class SnnTorchStepNet(nn.Module):
    """A conv net with ``snn.Leaky(beta=0.9, init_hidden=True)`` neurons, one step per call."""

    def __init__(self, reset_mechanism: str = "subtract", default_grad: bool = False) -> None:
        super().__init__()
        import snntorch as snn
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.lif1 = snn.Leaky(beta=0.9, init_hidden=True, reset_mechanism=reset_mechanism,
                              spike_grad=_snntorch_spike_grad(default_grad))
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(4 * 4 * 4, 6)
        self.lif2 = snn.Leaky(beta=0.9, init_hidden=True, reset_mechanism=reset_mechanism,
                              spike_grad=_snntorch_spike_grad(default_grad))

    def forward(self, x):
        x = self.pool(self.lif1(self.conv(x) * 1.5))
        return self.lif2(self.fc(x.flatten(1)) * 3.0)


class SnnTorchLoopNet(nn.Module):
    """snnTorch's tutorial style: explicit membranes, ``spk, mem = lif(cur, mem)`` in the model's own loop."""

    def __init__(self, T: int = 4, default_grad: bool = False) -> None:
        super().__init__()
        import snntorch as snn
        self.T = T
        self.fc1 = nn.Linear(10, 12)
        self.lif1 = snn.Leaky(beta=0.8, spike_grad=_snntorch_spike_grad(default_grad))
        self.fc2 = nn.Linear(12, 4)
        self.lif2 = snn.Leaky(beta=0.8, spike_grad=_snntorch_spike_grad(default_grad))

    def forward(self, x):
        mem1 = self.lif1.reset_mem()
        mem2 = self.lif2.reset_mem()
        spk_rec, mem_rec = [], []
        for _ in range(self.T):
            spk1, mem1 = self.lif1(self.fc1(x) * 2.0, mem1)
            spk2, mem2 = self.lif2(self.fc2(spk1) * 3.0, mem2)
            spk_rec.append(spk2)
            mem_rec.append(mem2)
        return torch.stack(spk_rec), torch.stack(mem_rec)


@requires_snntorch
@pytest.mark.parametrize("reset_mechanism", ["subtract", "zero"])
def test_snntorch_leaky_init_hidden_step_mode(reset_mechanism):
    assert_same_training(lambda: SnnTorchStepNet(reset_mechanism), _small(), T=3)


@requires_snntorch
def test_snntorch_default_surrogate_float32():
    assert_same_training(lambda: SnnTorchStepNet(default_grad=True), _small().float(), T=3, dtype=torch.float32)


@requires_snntorch
def test_snntorch_spk_mem_loop_default_surrogate_float32():
    x = torch.randn(3, 10, generator=torch.Generator().manual_seed(2))
    assert_same_training(lambda: SnnTorchLoopNet(default_grad=True), x, dtype=torch.float32)


class SnnTorchVariants(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        import snntorch as snn
        sgf = SEED_SURROGATES_F64["superspike"]
        make = {
            "leaky_learn_beta_threshold": lambda: snn.Leaky(beta=0.8, learn_beta=True, learn_threshold=True,
                                                            init_hidden=True, spike_grad=sgf()),
            "synaptic": lambda: snn.Synaptic(alpha=0.7, beta=0.8, init_hidden=True, spike_grad=sgf()),
            "leaky_no_reset_delay": lambda: snn.Leaky(beta=0.8, init_hidden=True, reset_delay=False,
                                                      spike_grad=sgf()),
        }[kind]
        self.fc1, self.sn1, self.fc2, self.sn2 = nn.Linear(5, 8), make(), nn.Linear(8, 4), make()

    def forward(self, x):
        return self.sn2(self.fc2(self.sn1(self.fc1(x) * 2.0)) * 3.0)


@requires_snntorch
@pytest.mark.parametrize("form", ["static", "sequence"])
@pytest.mark.parametrize("kind", ["leaky_learn_beta_threshold", "synaptic", "leaky_no_reset_delay"])
def test_snntorch_neuron_variants(kind, form):
    g = torch.Generator().manual_seed(3)
    if form == "static":
        assert_same_training(lambda: SnnTorchVariants(kind), torch.randn(3, 5, generator=g, dtype=torch.float64),
                             T=4)
    else:
        assert_same_training(lambda: SnnTorchVariants(kind), torch.randn(4, 3, 5, generator=g, dtype=torch.float64),
                             sequence=True)


@requires_snntorch
def test_snntorch_leaky_eval():
    assert_same_training(lambda: SnnTorchStepNet(), _small(), T=3, train=False)


@requires_snntorch
def test_snntorch_leaky_sequence():
    assert_same_training(lambda: SnnTorchStepNet(), _small(T=3), sequence=True)


@requires_snntorch
def test_snntorch_spk_mem_loop():
    x = torch.randn(3, 10, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert_same_training(SnnTorchLoopNet, x)


@requires_snntorch
def test_snntorch_batch_size_change():
    """snnTorch's Leaky re-initializes its membrane from the input shape: a new batch size must still work."""
    torch.manual_seed(0)
    model = SnnTorchStepNet().double()
    ref = copy.deepcopy(model)
    cm = snncc.compile(model, T=3, verify=True)
    for n in (2, 3, 2):
        x = _small(n=n, seed=n)
        assert torch.equal(cm(x), eager_run(ref, x, T=3))
