"""Recurrent SNNs (issue: recurrence as a first-class pattern; tracing leaves nothing behind).

Golden tests: a user-written recurrent model (``h = fc_in(x) + fc_rec(self.s)``, state kept by the model
itself) and snnTorch's RLeaky / RSynaptic, compiled with ``sequence=True``, equal the eager loop in outputs,
every gradient (the recurrent weights included) and the final state; float64 spikes identical. Structure
tests check that the recurrence runs as one task per chunk (not one per step), through the C loop.
"""
from __future__ import annotations

import copy
from typing import Any, List

import pytest
import torch
from torch import nn

import snncc
from snncc.errors import InputError
from snncc.runtime import cpu_recurrent, reference
from conftest import requires_snntorch


class UserRSNN(nn.Module):
    """A recurrent SNN as users write it in step mode: the model keeps its last spikes in ``self.s``."""

    def __init__(self, i: int = 12, h: int = 10, o: int = 4, bias: bool = True, neuron: Any = None) -> None:
        super().__init__()
        self.fc_in = nn.Linear(i, h)
        self.fc_rec = nn.Linear(h, h, bias=bias)
        self.lif = neuron if neuron is not None else snncc.LIF(tau=2.0)
        self.fc_out = nn.Linear(h, o)
        self.lif_out = snncc.LIF(tau=3.0)
        self.s = None

    def reset(self) -> None:
        self.s = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc_in(x)
        if self.s is not None:
            h = h + self.fc_rec(self.s)
        self.s = self.lif(h)
        return torch.cat([self.s, self.lif_out(self.fc_out(self.s))], -1)


def _eager(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    for mod in m.modules():
        if hasattr(mod, "reset") and callable(mod.reset):
            mod.reset()
    snncc.reset(m)
    return torch.stack([m(x[t]) for t in range(x.shape[0])])


def _model(dtype: torch.dtype, seed: int = 0, **kw: Any) -> UserRSNN:
    torch.manual_seed(seed)
    m = UserRSNN(**kw).to(dtype)
    with torch.no_grad():               # fire: ~10-30% of the hidden layer, recurrence that matters
        m.fc_in.weight.mul_(6.0)
        m.fc_rec.weight.mul_(3.0)
        m.fc_out.weight.mul_(3.0)
    return m


def _spikes(T: int, N: int, i: int, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(T, N, i, generator=g) < 0.3).to(dtype)


def _compare(m: nn.Module, c: nn.Module, x: torch.Tensor, exact: bool) -> None:
    ye, yc = _eager(m, x), c(x)
    if exact:
        assert torch.equal(ye, yc)
    else:
        assert torch.allclose(ye, yc, atol=1e-6)
    assert 0.02 < ye[..., :-4].mean().item() < 0.6          # the hidden layer really fires
    g = torch.randn(ye.shape, generator=torch.Generator().manual_seed(3), dtype=ye.dtype)
    (ye * g).sum().backward()
    (yc * g).sum().backward()
    tol = dict(rtol=1e-9, atol=1e-11) if x.dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    for (name, p), q in zip(m.named_parameters(), c.model.parameters()):
        assert p.grad is not None and q.grad is not None, name
        assert p.grad.abs().sum() > 0, f"{name}: no gradient reached it"
        assert torch.allclose(p.grad, q.grad, **tol), name


@pytest.mark.parametrize("chunk", [None, 3])
@pytest.mark.parametrize("bias", [True, False])
def test_user_recurrence_equals_eager_float64(chunk: Any, bias: bool) -> None:
    m = _model(torch.float64, bias=bias)
    c = snncc.compile(copy.deepcopy(m), sequence=True, chunk=chunk, verify=True)
    _compare(m, c, _spikes(9, 3, 12, torch.float64), exact=True)
    assert torch.equal(m.lif.state[0], c.model.lif.state[0])     # final membrane state


def test_user_recurrence_float32_and_memory_min() -> None:
    m = _model(torch.float32)
    c = snncc.compile(copy.deepcopy(m), sequence=True, memory="min", chunk=4)
    _compare(m, c, _spikes(11, 3, 12, torch.float32), exact=True)


def test_recurrence_is_one_task_per_chunk_run_by_the_c_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    m = _model(torch.float64)
    c = snncc.compile(copy.deepcopy(m), sequence=True)
    x = _spikes(9, 3, 12, torch.float64)
    tg = c.specialize(x).task_graph
    cells = [t for t in tg.tasks() if t.fusion("recurrent") is not None]
    assert [(t.target, t.steps, t.fusion("recurrent").module) for t in cells] == [("lif", 9, "fc_rec")]
    assert not any(t.target == "fc_rec" for t in tg.tasks())          # the Linear runs inside the loop

    def no_reference(*a: Any, **k: Any) -> None:
        raise AssertionError("the reference loop ran: the C loop should have")
    monkeypatch.setattr(reference, "recurrent_scan", no_reference)
    _compare(m, c, x, exact=True)


def test_reference_loop_equals_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_recurrent, "c_supports_rec", lambda *a: "forced off by the test")
    m = _model(torch.float64, seed=4)
    c = snncc.compile(copy.deepcopy(m), sequence=True, chunk=4)
    _compare(m, c, _spikes(9, 3, 12, torch.float64), exact=True)


def test_generated_neuron_in_a_cell() -> None:
    """A lifted neuron (snncc's adaptive LIF: two states, generated kernels) inside the recurrent loop."""
    m = _model(torch.float64, neuron=snncc.AdaptiveLIF() if hasattr(snncc, "AdaptiveLIF") else None)
    c = snncc.compile(copy.deepcopy(m), sequence=True, chunk=5)
    _compare(m, c, _spikes(10, 2, 12, torch.float64), exact=True)


def test_feedback_from_a_later_layer_runs_step_by_step_and_equals_eager() -> None:
    """Not a self-recurrence (the second layer's spikes feed the first): correct, one task per step."""

    class Feedback(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(6, 5), nn.Linear(5, 5)
            self.fb = nn.Linear(5, 5)
            self.l1, self.l2 = snncc.LIF(), snncc.LIF()
            self.s2 = None

        def reset(self) -> None:
            self.s2 = None

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.a(x)
            if self.s2 is not None:
                h = h + self.fb(self.s2)
            self.s2 = self.l2(self.b(self.l1(h)))
            return self.s2

    torch.manual_seed(0)
    m = Feedback().double()
    with torch.no_grad():
        for lin in (m.a, m.b, m.fb):
            lin.weight.mul_(4.0)
    c = snncc.compile(copy.deepcopy(m), sequence=True, verify=True)
    x = _spikes(6, 3, 6, torch.float64)
    ye, yc = _eager(m, x), c(x)
    assert torch.equal(ye, yc) and ye.mean() > 0
    assert not any(t.fusion("recurrent") for t in c.specialize(x).task_graph.tasks())


# --------------------------------------------------------------------------- tracing leaves nothing behind
def test_tracing_restores_state_the_model_keeps_and_respecializes() -> None:
    """The bug: ``self.s`` was left holding an fx Proxy, so every later specialization failed (KeyError)
    and the eager model broke. Now: train -> eval -> new batch -> new T -> train, each equal to eager."""
    m = _model(torch.float64, seed=2)
    twin = copy.deepcopy(m)
    c = snncc.compile(twin, sequence=True)
    sentinel = torch.ones(1)
    twin.s = sentinel                       # whatever the user's attribute holds survives compiled calls
    for step, (T, N, train) in enumerate([(6, 3, True), (6, 3, False), (6, 5, False), (4, 5, True), (6, 3, True)]):
        m.train(train)
        c.train(train)
        x = _spikes(T, N, 12, torch.float64, seed=10 + step)
        with torch.set_grad_enabled(train):
            ye, yc = _eager(m, x), c(x)
        assert torch.equal(ye, yc), (T, N, train)
        assert twin.s is sentinel
    twin.reset()
    assert torch.equal(_eager(twin, x), _eager(m, x))        # the eager twin still runs, unchanged


# --------------------------------------------------------------------------- streaming
def test_stream_of_a_recurrent_model_equals_the_whole_sequence() -> None:
    m = _model(torch.float64, seed=5)
    x = _spikes(12, 3, 12, torch.float64)
    with torch.no_grad():
        ye = _eager(m, x)
        st = snncc.compile(m, sequence=True).stream()
        ys = torch.cat([st.feed(x[:5]), st.feed(x[5:7]), st.feed(x[7:])])
    assert torch.equal(ys, ye)


def test_one_step_stream_of_a_model_keeping_its_spikes_is_refused() -> None:
    m = _model(torch.float64)
    st = snncc.compile(m, sequence=True).stream()
    with pytest.raises(InputError, match=r"'lif'.*chunks of two or more steps"):
        st(_spikes(1, 2, 12, torch.float64)[0])


# --------------------------------------------------------------------------- snnTorch
def _snntorch_net(kind: str) -> nn.Module:
    import snntorch

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = nn.Linear(12, 10)
            if kind == "rleaky":
                self.r = snntorch.RLeaky(beta=0.8, linear_features=10, init_hidden=True)
            else:
                self.r = snntorch.RSynaptic(alpha=0.7, beta=0.8, linear_features=10, init_hidden=True)
            self.fc2 = nn.Linear(10, 4)
            self.out = snntorch.Leaky(beta=0.9, init_hidden=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.r(self.fc1(x))
            return torch.cat([h, self.out(self.fc2(h))], -1)

    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():
        net.fc1.weight.mul_(4.0)
        net.r.recurrent.weight.mul_(2.0)
        net.fc2.weight.mul_(3.0)
    return net


@requires_snntorch
@pytest.mark.parametrize("kind", ["rleaky", "rsynaptic"])
@pytest.mark.parametrize("chunk", [None, 4])
def test_snntorch_recurrent_neurons_equal_eager(kind: str, chunk: Any) -> None:
    """float32: snnTorch's spikes are float32 whatever the model's dtype, so its own RLeaky cannot run in
    float64 (its recurrent Linear gets float32 spikes); spikes are still identical here."""
    m = _snntorch_net(kind)
    c = snncc.compile(copy.deepcopy(m), sequence=True, chunk=chunk, verify=True)
    x = _spikes(10, 3, 12, torch.float32)
    tg = c.specialize(x).task_graph
    assert any(t.fusion("recurrent") and t.fusion("recurrent").module == "r.recurrent" for t in tg.tasks())
    _compare(m, c, x, exact=True)
    assert torch.allclose(m.r.mem, c.model.r.mem, atol=1e-5)


@requires_snntorch
def test_snntorch_rleaky_streams_one_step_at_a_time() -> None:
    m = _snntorch_net("rleaky")
    x = _spikes(7, 3, 12, torch.float32)
    with torch.no_grad():
        ye = _eager(m, x)
        st = snncc.compile(m, sequence=True).stream()
        ys = torch.stack([st(x[t]) for t in range(7)])
    assert torch.equal(ys, ye)


# --------------------------------------------------------------------------- memory="min" with chunks
from snncc.tools._memory import saved_bytes_and_output as _saved_bytes  # noqa: E402  (bytes kept, output)


def test_memory_min_chunks_checkpoint_each_chunk_with_identical_gradients() -> None:
    """memory="min" + chunk: each time chunk runs under activation checkpointing (runtime/executor.py,
    _time_regions): backward keeps only what crosses chunk boundaries, and the gradients are bit-identical
    to the same chunks' without it (the recomputation is the same computation)."""
    from tools.bench_rsnn import RecurrentSNN
    torch.manual_seed(6)
    m = RecurrentSNN(inputs=12, hidden=64, classes=4).double()
    with torch.no_grad():
        m.fc_in.weight.mul_(6.0)
        m.fc_rec.weight.mul_(3.0)
        m.fc_out.weight.mul_(3.0)
    x = _spikes(40, 4, 12, torch.float64)
    runs = {}
    for name, kw in (("default", dict(chunk=5)), ("min", dict(memory="min", chunk=5))):
        twin = copy.deepcopy(m)
        c = snncc.compile(twin, sequence=True, **kw)
        c(x)
        nbytes, y = _saved_bytes(lambda: c(x))
        y.sum().backward()
        runs[name] = (nbytes, y, [p.grad for p in twin.parameters()], c)
    assert runs["min"][3]._specialization((x,))[1].regions is not None
    assert torch.equal(runs["default"][1], runs["min"][1])
    for a, b in zip(runs["default"][2], runs["min"][2]):
        assert torch.equal(a, b)
    x_bytes = x.untyped_storage().nbytes()           # the input itself is saved by both (the caller's)
    assert runs["default"][1].sum() > 0
    assert runs["min"][0] - x_bytes < (runs["default"][0] - x_bytes) / 3


def test_memory_min_chunks_with_training_batchnorm_run_without_checkpointing() -> None:
    """Recomputing a chunk would update BatchNorm's running statistics twice: such graphs run as usual."""
    from test_golden_zoo import BNConvNet
    torch.manual_seed(0)
    m = BNConvNet("lif").double()
    twin = copy.deepcopy(m)
    c = snncc.compile(twin, sequence=True, memory="min", chunk=2)
    x = torch.randn(4, 2, 2, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert c._specialization((x,))[1].regions is None
    ye, yc = _eager(m, x), c(x)
    assert torch.allclose(ye, yc)
    for a, b in zip([b for n, b in m.named_buffers() if "running" in n],
                    [b for n, b in twin.named_buffers() if "running" in n]):
        assert torch.allclose(a, b)


def test_explain_names_the_recurrent_cell() -> None:
    m = _model(torch.float32)
    e = snncc.explain(m, _spikes(6, 2, 12, torch.float32), sequence=True)
    assert e.layer("lif").fate.startswith("compiled (recurrent cell with fc_rec")
    assert e.layer("fc_rec").fate == "fused into lif (recurrent)"


@pytest.mark.parametrize("has_sp,has_st", [(False, False), (True, True), (False, True), (True, False)])
def test_cell_gradients_for_every_start(has_sp: bool, has_st: bool) -> None:
    """Regression (found by the CUDA cell's author): step 0 contributes to W's and b's gradients exactly
    when its IR reads the recurrent drive; a state without previous spikes (r_0 = b) and previous spikes
    without a state (a user's first step: no recurrent term, g_e[0] in the shared buffer) were wrong."""
    from snncc.lift import lift_neuron
    lifted = lift_neuron(snncc.LIF(), torch.float64)
    first, steady = lifted.first, cpu_recurrent.with_tap(lifted.steady)
    g = torch.Generator().manual_seed(0)
    K, N, H = 5, 3, 7
    e = (torch.randn(K, N, H, generator=g, dtype=torch.float64) * 2 + 0.5).requires_grad_(True)
    w = torch.randn(H, H, generator=g, dtype=torch.float64).requires_grad_(True)
    b = torch.randn(H, generator=g, dtype=torch.float64).requires_grad_(True)
    sp0 = (torch.rand(N, H, generator=g, dtype=torch.float64) < 0.5).double() if has_sp else None
    st = (torch.randn(N, H, generator=g, dtype=torch.float64),) if has_st else None
    ours = cpu_recurrent.rec_c_scan(first, steady, cpu_recurrent.TAP, e, w, b, sp0, st, ())
    ref = reference.recurrent_scan(first, steady, cpu_recurrent.TAP, e, w, b, sp0, st, ())
    assert torch.equal(ours[0], ref[0])
    u = torch.randn(K, N, H, generator=g, dtype=torch.float64)
    for a, r in zip(torch.autograd.grad((ours[0] * u).sum(), [e, w, b]),
                    torch.autograd.grad((ref[0] * u).sum(), [e, w, b])):
        assert torch.allclose(a, r, rtol=1e-10, atol=1e-12)


def test_blocks_with_reset_are_traced_into_and_untraceable_ones_stay_opaque() -> None:
    """A module with ``reset()`` around neurons is traced into (its neurons compile); one whose forward
    cannot be traced (data-dependent control flow) runs as one opaque leaf, as before, with the reason."""

    class Block(nn.Module):
        def __init__(self, traceable: bool) -> None:
            super().__init__()
            self.fc, self.lif, self.traceable = nn.Linear(4, 4), snncc.LIF(), traceable

        def reset(self) -> None:
            self.lif.reset()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.fc(x) * 3
            if not self.traceable and h.sum() > 0:
                h = h * 2
            return self.lif(h)

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4), Block(False), Block(True)).double()
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    with pytest.warns(snncc.frontend.OpaqueModuleWarning, match=r"'1'.*contains neurons but its forward cannot be traced"):
        c = snncc.compile(copy.deepcopy(m), sequence=True)
        y = c(x)
    assert torch.equal(y, _eager(m, x))
    kinds = {(t.target, t.kind) for t in c.specialize(x).task_graph.tasks() if t.kind in ("neuron", "opaque")}
    assert kinds == {("1", "opaque"), ("2.lif", "neuron")}


def test_user_recurrence_in_the_static_form() -> None:
    """compile(model, T=7): the input projection is hoisted (the same at every step), the cell still forms."""
    m = _model(torch.float64)
    c = snncc.compile(copy.deepcopy(m), T=7)
    x = _spikes(1, 3, 12, torch.float64)[0]
    ye, yc = _eager(m, x.expand(7, 3, 12)), c(x)
    assert torch.equal(ye, yc) and ye[..., :10].mean() > 0.02
    assert any(t.fusion("recurrent") for t in c.specialize(x).task_graph.tasks())
