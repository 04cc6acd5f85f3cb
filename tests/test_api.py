"""The public API around ``snncc.compile``: a drop-in nn.Module sharing the model's parameters and state,
following train()/eval() and .to(), re-specializing on new inputs, and failing with clear errors."""
from __future__ import annotations

import copy
import inspect
import os

import pytest
import torch
from torch import nn

import snncc
from snncc import surrogate as sg

from conftest import assert_same_training, eager_run, requires_spikingjelly


class Net(nn.Module):
    """conv -> LIF -> avgpool -> flatten -> linear -> LIF -> linear (analog readout)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.sn1 = snncc.LIF(surrogate_function=sg.ATan())
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(4 * 4 * 4, 8)
        self.sn2 = snncc.ParametricLIF(surrogate_function=sg.Sigmoid())
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = self.pool(self.sn1(self.conv(x) * 2.0))
        return self.head(self.sn2(self.fc(x.flatten(1)) * 8.0))


class BNNet(Net):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        x = self.pool(self.sn1(self.bn(self.conv(x)) * 2.0))
        return self.head(self.sn2(self.fc(x.flatten(1)) * 8.0))


def _x(n: int = 2, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(n, 2, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def _pair(cls=Net, dtype=torch.float64, **kw):
    torch.manual_seed(0)
    model = cls().to(dtype)
    ref = copy.deepcopy(model)
    return model, ref, snncc.compile(model, verify=True, **kw)


# --------------------------------------------------------------------------- sharing, state_dict, modes
def test_parameters_are_the_same_objects():
    model, _, cm = _pair(T=3)
    assert [id(p) for p in cm.parameters()] == [id(p) for p in model.parameters()]
    assert dict(cm.named_parameters()).keys() == dict(model.named_parameters()).keys()
    for (n1, p1), (n2, p2) in zip(cm.named_parameters(), model.named_parameters()):
        assert n1 == n2 and p1 is p2
    for (n1, b1), (n2, b2) in zip(cm.named_buffers(), model.named_buffers()):
        assert n1 == n2 and b1 is b2
    assert cm.model is model
    assert cm.conv is model.conv


def test_state_dict_round_trip():
    model, _, cm = _pair(BNNet, T=3)
    sd = cm.state_dict()
    assert list(sd.keys()) == list(model.state_dict().keys())
    # compiled -> a fresh eager model
    fresh = BNNet().double()
    fresh.load_state_dict(sd)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, sd[k]), k
    # a trained eager model -> the compiled model (and through it, the shared eager model)
    other = BNNet().double()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    cm.load_state_dict(other.state_dict())
    for k, v in other.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    # and the compiled model computes with the loaded weights
    other.eval()
    cm.eval()
    x = _x()
    assert torch.equal(cm(x), eager_run(other, x, T=3))


def test_train_eval_propagate():
    model, _, cm = _pair(BNNet, T=2)
    assert cm.training and model.training
    assert cm.eval() is cm
    assert not cm.training and not model.training
    assert all(not m.training for m in model.modules())
    cm.train()
    assert cm.training and all(m.training for m in model.modules())
    model.eval()        # the other way round: the model's mode is what the compiled module runs with
    cm.train(False)
    assert not cm.training


def test_train_eval_switch_respecializes_and_matches():
    """One compiled module used for training steps then evaluation, then training again."""
    model, ref, cm = _pair(Net, T=2)
    x = _x(3)
    specs = []
    for mode in (True, False, True):
        cm.train(mode)
        ref.train(mode)
        with torch.no_grad():
            torch.testing.assert_close(cm(x), eager_run(ref, x, T=2), rtol=1e-9, atol=1e-12)
        specs.append(cm.specialize(x))
    assert specs[0] is specs[2] and specs[0] is not specs[1]


def test_batchnorm_train_then_eval_buffers():
    model, ref, cm = _pair(BNNet, T=2)
    x = _x(3)
    for mode in (True, False):
        cm.train(mode)
        ref.train(mode)
        with torch.no_grad():
            torch.testing.assert_close(cm(x), eager_run(ref, x, T=2), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(model.bn.running_mean, ref.bn.running_mean, rtol=1e-9, atol=1e-12)
    assert int(model.bn.num_batches_tracked) == 2


def test_to_float64_and_back():
    torch.manual_seed(0)
    model = Net()
    ref = copy.deepcopy(model).double()
    cm = snncc.compile(model, T=3, verify=True)
    assert cm.to(torch.float64) is cm
    assert all(p.dtype == torch.float64 for p in model.parameters())
    x = _x()
    torch.testing.assert_close(cm(x), eager_run(ref, x, T=3), rtol=1e-9, atol=1e-12)
    cm.float()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert cm(x.float()).dtype == torch.float32


def test_autocast_cpu_bfloat16():
    """``torch.autocast`` is followed: the compiled model gives eager's result under autocast."""
    model, ref, cm = _pair(Net, dtype=torch.float32, T=3)
    x = _x(dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_c = cm(x)
        out_e = eager_run(ref, x, T=3)
    assert out_c.dtype == out_e.dtype
    torch.testing.assert_close(out_c.float(), out_e.float(), rtol=2e-2, atol=2e-2)


def test_optimizer_on_compiled_parameters_trains():
    """Adam on compiled.parameters() lowers a toy loss, exactly as the same steps on the eager model do."""
    torch.manual_seed(0)
    model = Net().double()
    ref = copy.deepcopy(model)
    cm = snncc.compile(model, T=3, verify=True)
    x = _x(8, seed=3)
    y = torch.randint(0, 3, (8,), generator=torch.Generator().manual_seed(4))
    opt_c = torch.optim.Adam(cm.parameters(), lr=0.05)
    opt_e = torch.optim.Adam(ref.parameters(), lr=0.05)
    losses_c, losses_e = [], []
    for _ in range(10):
        for m, opt, losses, run in ((cm, opt_c, losses_c, lambda: cm(x)),
                                    (ref, opt_e, losses_e, lambda: eager_run(ref, x, T=3))):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(run().mean(0), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    assert losses_c[-1] < losses_c[0]
    assert min(losses_c[5:]) < 0.9 * losses_c[0]
    torch.testing.assert_close(torch.tensor(losses_c), torch.tensor(losses_e), rtol=1e-6, atol=1e-9)
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-9, msg=n)


# --------------------------------------------------------------------------- specialization and state
def test_respecializes_on_batch_size_and_dtype():
    model, ref, cm = _pair(Net, T=2)
    seen = []
    for n, dtype in ((2, torch.float64), (5, torch.float64), (2, torch.float64)):
        x = _x(n, seed=n, dtype=dtype)
        out = cm(x)
        assert out.shape == (2, n, 3)
        torch.testing.assert_close(out, eager_run(ref, x, T=2), rtol=1e-9, atol=1e-12)
        seen.append(cm.specialize(x))
    assert seen[0] is seen[2] and seen[0] is not seen[1]
    # a new dtype: cast the model, the next call re-specializes for float32 inputs
    cm.float()
    ref.float()
    x = _x(3, dtype=torch.float32)
    out = cm(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, eager_run(ref, x, T=2), rtol=1e-4, atol=1e-5)
    assert cm.specialize(x) is not seen[0]


def test_each_call_starts_from_reset_state():
    model, ref, cm = _pair(Net, T=3)
    x = _x()
    first = cm(x)
    second = cm(x)
    assert torch.equal(first, second)
    # leftover state from an eager run on the same modules does not leak into a compiled call
    model(x * 3.0)
    model(x * 3.0)
    assert torch.equal(cm(x), first)
    assert torch.equal(first, eager_run(ref, x, T=3))


def test_outputs_of_earlier_calls_are_not_overwritten():
    model, ref, cm = _pair(Net, T=3)
    x = _x()
    first = cm(x)
    kept = first.clone()
    cm(3.0 * x)
    cm(_x(5, seed=9))
    assert torch.equal(first, kept)


@pytest.mark.parametrize("form", ["static", "sequence"])
def test_output_can_be_modified_in_place(form):
    class SpikeOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(5, 6)
            self.sn = snncc.LIF()

        def forward(self, x):
            return self.sn(self.fc(x) * 3.0)

    torch.manual_seed(0)
    model = SpikeOut().double()
    ref = copy.deepcopy(model)
    cm = snncc.compile(model, **(dict(T=3) if form == "static" else dict(sequence=True)))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 5, generator=g, dtype=torch.float64) if form == "static" else \
        torch.randn(3, 4, 5, generator=g, dtype=torch.float64)
    out_e = eager_run(ref, x, **(dict(T=3) if form == "static" else dict(sequence=True)))
    out_c = cm(x)
    out_e.mul_(2.0)
    out_c.mul_(2.0)
    out_e.sum().backward()
    out_c.sum().backward()
    assert torch.equal(out_c, out_e)
    torch.testing.assert_close(model.fc.weight.grad, ref.fc.weight.grad, rtol=1e-9, atol=1e-12)


def test_snncc_reset_resets_states():
    torch.manual_seed(0)
    model = Net().double()
    x = _x()
    model(x)
    assert model.sn1.v is not None and model.sn2.v is not None
    assert snncc.reset(model) is model
    assert model.sn1.v is None and model.sn2.v is None
    # after a reset eager restarts: the same as a fresh copy
    fresh = copy.deepcopy(model)
    assert torch.equal(model(x), fresh(x))


@requires_spikingjelly
def test_snncc_reset_resets_spikingjelly_nodes():
    from spikingjelly.activation_based import neuron
    m = nn.Sequential(nn.Linear(4, 4), neuron.LIFNode(v_reset=0.5), neuron.IFNode(v_reset=None))
    m(torch.randn(2, 4))
    assert isinstance(m[1].v, torch.Tensor)
    snncc.reset(m)
    assert m[1].v == 0.5 and m[2].v == 0.0


def test_final_membrane_state_matches_eager_snncc():
    model, ref, cm = _pair(Net, T=3)
    x = _x()
    cm(x)
    eager_run(ref, x, T=3)
    for name in ("sn1", "sn2"):
        v_c, v_e = getattr(model, name).v, getattr(ref, name).v
        assert v_c is not None, f"{name}.v not set after a compiled call"
        torch.testing.assert_close(v_c, v_e, rtol=1e-9, atol=1e-12)


@requires_spikingjelly
@pytest.mark.parametrize("form", ["static", "loop"])
def test_final_membrane_state_matches_eager_spikingjelly(form):
    from spikingjelly.activation_based import neuron, surrogate

    class SJ(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 8)
            self.lif = neuron.LIFNode(tau=2.0, surrogate_function=surrogate.ATan())
            self.plif = neuron.ParametricLIFNode(v_reset=None)

        def forward(self, x):
            return self.plif(self.lif(self.fc(x) * 3.0) * 2.0)

    class Loop(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = SJ()

        def forward(self, x):
            return torch.stack([self.body(x) for _ in range(4)])

    torch.manual_seed(0)
    model = (SJ() if form == "static" else Loop()).double()
    ref = copy.deepcopy(model)
    cm = snncc.compile(model, T=4 if form == "static" else None, verify=True)
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = cm(x)
    exp = eager_run(ref, x, T=4 if form == "static" else None)
    assert torch.equal(out, exp) and 0 < out.mean() < 1
    body_c = model if form == "static" else model.body
    body_e = ref if form == "static" else ref.body
    for name in ("lif", "plif"):
        v_c, v_e = getattr(body_c, name).v, getattr(body_e, name).v
        assert isinstance(v_c, torch.Tensor), f"{name}.v is {v_c!r} after a compiled call"
        torch.testing.assert_close(v_c, v_e, rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------- stale specializations
# Regression tests: specializations once ignored model changes after the first call (stale graphs).


def test_changing_loop_T_after_first_call():
    """T curricula (e.g. TET-style) change a self-looping model's T between epochs."""
    torch.manual_seed(0)
    model = LoopT(2).double()
    ref = copy.deepcopy(model)
    cm = snncc.compile(model)
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.equal(cm(x), eager_run(ref, x))
    model.T = ref.T = 5
    assert torch.equal(cm(x), eager_run(ref, x)), "compiled still runs T=2"


def test_changing_neuron_threshold_after_first_call():
    torch.manual_seed(0)
    model = Net().double()
    ref = copy.deepcopy(model)
    cm = snncc.compile(model, T=3)
    x = _x()
    torch.testing.assert_close(cm(x), eager_run(ref, x, T=3), rtol=1e-9, atol=1e-12)
    model.sn1.v_threshold = ref.sn1.v_threshold = 0.4
    out_c, out_e = cm(x), eager_run(ref, x, T=3)
    assert torch.allclose(out_c, out_e, rtol=1e-9, atol=1e-12), "compiled still uses v_threshold=1.0"


def test_changing_surrogate_after_first_call():
    """Seed 001 compares surrogates; swapping one on a model after a first call must take effect."""
    torch.manual_seed(0)
    model = Net().double()
    ref = copy.deepcopy(model)
    cm = snncc.compile(model, T=3)
    x = _x()
    cm(x)
    for m in (model, ref):
        m.sn1.surrogate_function = sg.SuperSpike()
    xc, xe = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    cm(xc).sum().backward()
    eager_run(ref, xe, T=3).sum().backward()
    assert torch.allclose(xc.grad, xe.grad, rtol=1e-7, atol=1e-10), "compiled still uses the ATan surrogate"


def test_unfreezing_batchnorm_after_first_call():
    """First call with a frozen (eval) BatchNorm inside a training model, then unfrozen: T updates per call."""
    torch.manual_seed(0)
    model = BNNet().double()
    model.bn.eval()
    ref = copy.deepcopy(model)
    cm = snncc.compile(model, T=3)
    x = _x(3)
    cm(x)
    eager_run(ref, x, T=3)
    model.bn.train()
    ref.bn.train()
    cm(x)
    eager_run(ref, x, T=3)
    assert int(model.bn.num_batches_tracked) == int(ref.bn.num_batches_tracked) == 3, \
        (int(model.bn.num_batches_tracked), int(ref.bn.num_batches_tracked))


def test_freezing_batchnorm_after_first_call():
    """The other direction happens to work: BN per step, called with its current mode."""
    torch.manual_seed(0)
    model = BNNet().double()
    ref = copy.deepcopy(model)
    cm = snncc.compile(model, T=3)
    x = _x(3)
    for frozen in (False, True):
        model.bn.train(not frozen)
        ref.bn.train(not frozen)
        torch.testing.assert_close(cm(x), eager_run(ref, x, T=3), rtol=1e-9, atol=1e-12)
    assert int(model.bn.num_batches_tracked) == int(ref.bn.num_batches_tracked) == 3
    torch.testing.assert_close(model.bn.running_var, ref.bn.running_var, rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------- errors
class Gate(nn.Module):
    """Data-dependent control flow: not traceable by torch.fx."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x):
        if x.sum() > 0:
            return self.fc(x)
        return -x


GATE_LINE = inspect.getsourcelines(Gate.forward)[1] + 1     # the `if x.sum() > 0:` line


class GatedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 6)
        self.gate = Gate()
        self.sn = snncc.LIF()

    def forward(self, x):
        return self.sn(self.gate(self.inp(x)) * 4.0)


def test_trace_failure_names_file_line_and_leaf_modules():
    cm = snncc.compile(GatedNet(), T=2, verify=True)
    with pytest.raises(snncc.TraceFailure) as info:
        cm(torch.randn(3, 6))
    msg = str(info.value)
    assert f"{os.path.basename(__file__)}:{GATE_LINE}" in msg, msg
    assert "if x.sum() > 0:" in msg
    assert "leaf_modules" in msg
    assert isinstance(info.value, snncc.SNNCCError)
    assert isinstance(info.value.__cause__, Exception)


def test_trace_failure_names_the_failing_submodule():
    """The message names the innermost module whose forward failed and suggests it as a leaf module."""
    cm = snncc.compile(GatedNet(), T=2)
    with pytest.raises(snncc.TraceFailure) as info:
        cm(torch.randn(3, 6))
    msg = str(info.value)
    assert "module 'gate' (Gate)" in msg, msg
    assert "leaf_modules=[Gate]" in msg, msg


@pytest.mark.parametrize("form", ["static", "sequence"])
def test_leaf_modules_runs_untraceable_module(form):
    """leaf_modules=[Gate] runs it as a black box, step by step; results equal eager's."""
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    if form == "static":
        assert_same_training(GatedNet, x, T=3, leaf_modules=[Gate])
    else:
        xs = torch.randn(4, 3, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        assert_same_training(GatedNet, xs, sequence=True, leaf_modules=[Gate])


class GateLoop(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = GatedNet()

    def forward(self, x):
        return torch.stack([self.net(x) for _ in range(3)])


def test_trace_failure_in_own_loop_model():
    """The loop form raises TraceFailure too; with leaf_modules the model traces, Gate kept opaque."""
    with pytest.raises(snncc.TraceFailure, match="leaf_modules"):
        snncc.compile(GateLoop())(torch.randn(2, 6))
    from snncc.frontend import trace_unrolled
    traced = trace_unrolled(GateLoop(), "loop", None, [Gate])
    assert traced.opaque == frozenset({"net.gate"})
    calls = [n for n in traced.graph.nodes if n.op == "call_module" and n.target == "net.gate"]
    assert len(calls) == 3


def test_leaf_modules_in_own_loop_model_matches_eager():
    x = torch.randn(2, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert_same_training(GateLoop, x, leaf_modules=[Gate])


@pytest.mark.parametrize("T", [0, -1])
def test_T_must_be_positive(T):
    with pytest.raises(snncc.InputError, match="T must be >= 1"):
        snncc.compile(Net(), T=T)


@pytest.mark.parametrize("T", [2.0, "4", True, 1.5])
def test_T_must_be_int(T):
    with pytest.raises(snncc.InputError, match="positive int"):
        snncc.compile(Net(), T=T)


def test_T_and_sequence_exclusive():
    with pytest.raises(snncc.InputError, match="not both"):
        snncc.compile(Net(), T=4, sequence=True)


def test_input_error_is_a_value_error():
    with pytest.raises(ValueError):
        snncc.compile(Net(), T=0)


@pytest.mark.parametrize("shape", [(5,), ()])
def test_sequence_input_rank_below_2(shape):
    cm = snncc.compile(nn.Sequential(nn.Linear(5, 5), snncc.LIF()), sequence=True)
    with pytest.raises(snncc.InputError, match=r"\[T, N, \.\.\.\]"):
        cm(torch.randn(shape))


def test_static_input_0d():
    cm = snncc.compile(nn.Sequential(nn.Linear(1, 1), snncc.LIF()), T=2)
    with pytest.raises(snncc.InputError):
        cm(torch.tensor(1.0))


def test_step_model_without_T_or_sequence_warns():
    """A step model compiled with neither T nor sequence runs one step per call, with a warning saying so
    (only a warning: a model looping over time itself with T=1 looks the same)."""
    model, ref, cm = _pair(Net)
    x = _x()
    with pytest.warns(UserWarning) as rec:
        out = cm(x)
    msg = " ".join(str(w.message) for w in rec)
    assert "T=" in msg and "sequence=True" in msg and "Net" in msg
    torch.testing.assert_close(out, eager_run(ref, x), rtol=1e-9, atol=1e-12)


class LoopT(nn.Module):
    """Loops over time itself (reset, for t in range(self.T), mean), like seed 001's BasicCSNN."""

    def __init__(self, T: int) -> None:
        super().__init__()
        self.T = T
        self.fc = nn.Linear(4, 6)
        self.sn = snncc.LIF()

    def forward(self, x):
        snncc.reset(self)
        return torch.stack([self.sn(self.fc(x) * 4.0) for _ in range(self.T)]).mean(0)


def test_loop_model_T2_compiles_without_T():
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert_same_training(lambda: LoopT(2), x)


def test_loop_model_T1_compiles_without_T():
    """BasicCSNN(T=1)-like: a self-looping model with one step compiles (with a warning) and matches eager."""
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with pytest.warns(UserWarning, match="one timestep per call"):
        assert_same_training(lambda: LoopT(1), x)


def test_keyword_inputs_rejected():
    cm = snncc.compile(Net(), T=2)
    with pytest.raises(snncc.InputError, match="positional"):
        cm(x=_x(dtype=torch.float32))


def test_static_form_takes_one_tensor():
    cm = snncc.compile(Net(), T=2)
    with pytest.raises(snncc.InputError):
        cm(_x(dtype=torch.float32), _x(dtype=torch.float32))


def test_compile_rejects_non_modules_and_bad_leaf_modules():
    with pytest.raises(TypeError):
        snncc.compile(lambda x: x, T=2)
    with pytest.raises(TypeError):
        snncc.compile(Net(), T=2, leaf_modules=[Gate()])
    with pytest.raises(TypeError):
        snncc.compile(Net(), T=2, leaf_modules=[int])


def test_task_failure_names_module():
    """A wrong feature size fails inside the compiled schedule: the error names the module's qualname."""
    model = nn.Sequential(nn.Linear(6, 4), snncc.LIF(), nn.Linear(5, 3))   # 4 -> 5 mismatch
    cm = snncc.compile(model, T=2, verify=True)
    with pytest.raises(snncc.TaskFailure) as info:
        cm(torch.randn(3, 6))
    msg = str(info.value)
    assert "'2'" in msg and "Linear" in msg
    assert "(3, 6)" in msg


def test_time_dimension_given_to_T_model_is_an_input_error():
    """A [T, N, C, H, W] input given to a T= model: an InputError at the call (before any task), naming the
    nested conv that reads it and the call form that fits (sequence=True)."""
    class Inner(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 4, 3)
            self.sn = snncc.IF()

        def forward(self, x):
            return self.sn(self.conv(x))

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = Inner()

        def forward(self, x):
            return self.block(x)

    cm = snncc.compile(Outer(), T=2)
    with pytest.raises(snncc.InputError) as info:
        cm(torch.randn(4, 2, 2, 8, 8))     # [T, N, C, H, W] passed to the static form
    msg = str(info.value)
    assert "block.conv" in msg and "Conv2d" in msg
    assert "[4, 2, 2, 8, 8]" in msg and "4-d input [N, C, H, W]" in msg
    assert "sequence=True" in msg


def test_task_failure_in_opaque_module():
    class Boom(nn.Module):
        def __init__(self):
            super().__init__()
            self.calls = 0

        def reset(self):
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            if self.calls == 2:
                raise RuntimeError("kaboom at step 2")
            return x

    model = nn.Sequential(nn.Linear(3, 3), snncc.LIF(), Boom())
    cm = snncc.compile(model, T=3)
    with pytest.raises(snncc.TaskFailure) as info:
        cm(torch.randn(2, 3))
    msg = str(info.value)
    assert "'2'" in msg and "Boom" in msg and "kaboom at step 2" in msg
    assert isinstance(info.value.__cause__, RuntimeError)


def test_errors_are_snncc_errors():
    for cls in (snncc.TraceFailure, snncc.InputError, snncc.TaskFailure):
        assert issubclass(cls, snncc.SNNCCError) and issubclass(cls, RuntimeError)


def test_import_does_not_import_optional_ecosystems():
    import subprocess
    import sys
    code = ("import sys, snncc; bad = [m for m in ('cupy', 'spikingjelly', 'snntorch') if m in sys.modules]; "
            "print(','.join(bad)); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"import snncc imported: {r.stdout} {r.stderr}"


def test_observing_sees_every_task_in_schedule_order():
    """CompiledModule.observing: the hook snncc-prof uses; it sees each task once, before and after."""
    from snncc.runtime import TaskObserver

    class Log(TaskObserver):
        def __init__(self):
            self.events = []

        def before(self, task):
            self.events.append(("b", task.name))

        def after(self, task, value):
            self.events.append(("a", task.name))

    model = nn.Sequential(nn.Linear(4, 3), snncc.neurons.LIF())
    cm = snncc.compile(model, T=3)
    x = torch.randn(2, 4)
    log = Log()
    with cm.observing(log):
        y = cm(x)
    order = cm.specialize(x).schedule.order
    assert [n for k, n in log.events if k == "b"] == list(order)
    assert [n for k, n in log.events if k == "a"] == list(order)
    assert y.shape == (3, 2, 3)
    seen = len(log.events)
    cm(x)                                  # outside the block: not observed
    assert seen == len(log.events) == 2 * len(order)


# --------------------------------------------------------------------------- streaming inference
class _StreamNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.n1 = snncc.neurons.LIF(v_threshold=0.5)
        self.fc2 = nn.Linear(8, 3)
        self.n2 = snncc.neurons.Izhikevich()
        with torch.no_grad():
            self.fc1.weight.mul_(3)

    def forward(self, x):
        return self.n2(self.fc2(self.n1(self.fc1(x))) * 20)


@pytest.mark.parametrize("pattern", [[1] * 7, [3, 1, 3], [7], [2, 5]])
def test_stream_equals_one_long_eager_run(pattern):
    """Chunks of any sizes, state carried between calls: the same outputs as the eager step loop."""
    torch.manual_seed(0)
    model = _StreamNet().double().eval()
    x = torch.randn(7, 4, 6, dtype=torch.float64)
    ref = eager_run(copy.deepcopy(model), x, sequence=True)
    stream = snncc.compile(model, T=7).stream()
    outs, t = [], 0
    for k in pattern:
        if k == 1:
            outs.append(stream(x[t]).unsqueeze(0))
        else:
            outs.append(stream.feed(x[t:t + k]))
        t += k
    y = torch.cat(outs)
    assert stream.steps == 7
    assert 0 < ref.mean() < 1, "the output neurons must spike sometimes (or the test says little)"
    assert torch.equal(y, ref)
    stream.reset()
    assert torch.equal(stream.feed(x), ref)          # starts over from the reset state


def test_stream_errors_are_clear():
    class Loop(nn.Module):
        def __init__(self):
            super().__init__()
            self.n = snncc.neurons.LIF()

        def forward(self, x):
            return torch.stack([self.n(x) for _ in range(2)])
    with pytest.raises(snncc.errors.InputError, match="loops over time"):
        snncc.compile(Loop()).stream()
    stream = snncc.compile(_StreamNet(), T=2).stream()
    with pytest.raises(snncc.errors.InputError, match="chunk"):
        stream.feed(torch.randn(6))
