"""A neuron layer's input recomputed in backward from its producer's kept input (runtime/recompute.py,
keep "source" in passes/plan_memory.py): the bytes it saves, bit-identical gradients, and its guards."""
from __future__ import annotations

import copy
import dataclasses
import sys

import pytest
import torch
from torch import nn

import snncc
from snncc.errors import SNNCCError
from snncc.passes import ScanCost, plan_memory
from snncc.runtime import recompute
from snncc.runtime.calibrate import Calibration
from snncc.tools._memory import saved_bytes_and_output

CAL = Calibration("cpu-test", 5.0, (1 << 20, 1 << 26), (100.0, 6400.0), 1.0)


class TwoConvNet(nn.Module):
    """conv -> LIF -> pool -> conv -> LIF -> pool -> linear -> LIF, big enough that the spike inputs are
    bit-packed (the executor packs inputs of 32k elements and more)."""

    def __init__(self) -> None:
        super().__init__()
        sg = snncc.surrogate.Sigmoid()
        self.c1 = nn.Conv2d(2, 16, 3, padding=1)
        self.n1 = snncc.LIF(surrogate_function=sg)
        self.p1 = nn.MaxPool2d(2)
        self.c2 = nn.Conv2d(16, 16, 3, padding=1)
        self.n2 = snncc.LIF(surrogate_function=sg)
        self.p2 = nn.MaxPool2d(2)
        self.fc = nn.Linear(16 * 8 * 8, 8)
        self.n3 = snncc.LIF(surrogate_function=sg)
        with torch.no_grad():           # enough drive that every layer fires
            for m in (self.c1, self.c2, self.fc):
                m.weight.mul_(6.0)
                m.bias.add_(0.5)

    def forward(self, x):
        x = self.p1(self.n1(self.c1(x)))
        x = self.p2(self.n2(self.c2(x)))
        return self.n3(self.fc(x.flatten(1)))


def _executor(cm):
    (_, ex), = cm._snncc_cache.values()
    return ex


def _grads(cm, x):
    cm.zero_grad(set_to_none=True)
    n_saved, y = saved_bytes_and_output(lambda: cm(x))
    w = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)
    (y * w).sum().backward()
    return y.detach(), [p.grad.clone() for p in cm.parameters()], n_saved


def _sources(cm):
    return {p.layer: p.keep for p in _executor(cm).memory_plan.layers}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("sparse", ["never", "always", "table"])
def test_min_recomputes_inputs_from_their_producers_bit_identically(dtype, sparse, monkeypatch):
    """memory='min': every neuron layer fed by a conv/linear keeps no input (keep "source"); outputs and
    every gradient equal memory='max' bit for bit (the same kernels on the same values), in float32 too,
    whether the convs run dense, spike-driven or by table lookup (both from the bits, into pooled buffers:
    a regression, the recipe was not found through a pooled output's views); it keeps less than
    recomputing from the kept input."""
    monkeypatch.setenv("SNNCC_SPARSE", sparse)
    from snncc.runtime import packed
    monkeypatch.setattr(packed, "SPARSE_DENSITY", 1.0)   # "always": spike lists for every spike conv
    # every producer rerun, even the fc's (measured, it saves a kilobyte: min would keep that input)
    monkeypatch.setattr(sys.modules["snncc.passes.plan_memory"], "MIN_RATE_MIN", 0.0)
    torch.manual_seed(0)
    m = TwoConvNet().to(dtype)
    x = torch.rand(8, 2, 32, 32, dtype=dtype)
    ref = snncc.compile(copy.deepcopy(m), T=4, memory="max")
    mn = snncc.compile(copy.deepcopy(m), T=4, memory="min")
    for _ in range(2):
        y0, g0, s0 = _grads(ref, x)
        y, g, s = _grads(mn, x)
    assert _sources(mn) == {"n1": "source", "n2": "source", "n3": "source"}
    assert torch.equal(y, y0)
    for a, b in zip(g, g0):
        assert torch.equal(a, b)
    assert float(y0.mean()) > 0.0
    # nothing float is kept for n1 and n2: at least their H (max) is gone
    assert s0 - s >= 4 * 8 * 16 * (32 * 32 + 16 * 16) * dtype.itemsize
    # and it keeps less than rerunning the scans from their kept inputs
    inp = snncc.compile(copy.deepcopy(m), T=4)
    for _ in range(3):
        _grads(inp, x)
    ex = _executor(inp)
    ex._plan = plan_memory([dataclasses.replace(c, source=None) for c in ex._scans.values()], "min")
    y1, g1, s1 = _grads(inp, x)
    assert set(_sources(inp).values()) == {"input"}
    assert torch.equal(y1, y0) and all(torch.equal(a, b) for a, b in zip(g1, g0))
    assert s1 - s >= 8 * 16 * 32 * 32 * dtype.itemsize + 4 * 8 * 16 * 16 * 16 * dtype.itemsize


@pytest.mark.parametrize("sparse", ["never", "table"])
def test_time_chunks_with_min_and_default_bit_identical_to_max(sparse, monkeypatch):
    """chunk=2 (T=4: two chunks per layer): memory='min' checkpoints each time chunk as a whole (sources
    are off inside; the plan reads "input"), the default may recompute from producers per chunk; both
    equal memory='max' bit for bit, min keeping under half of max's bytes."""
    monkeypatch.setenv("SNNCC_SPARSE", sparse)
    monkeypatch.setattr(sys.modules["snncc.passes.plan_memory"], "MIN_RATE_MIN", 0.0)
    torch.manual_seed(0)
    m = TwoConvNet()
    x = torch.rand(16, 2, 32, 32)
    ref = snncc.compile(copy.deepcopy(m), T=4, memory="max", chunk=2)
    mn = snncc.compile(copy.deepcopy(m), T=4, memory="min", chunk=2)
    df = snncc.compile(copy.deepcopy(m), T=4, chunk=2)
    for _ in range(4):                       # the default's plan is measured on the first calls
        y0, g0, s0 = _grads(ref, x)
        y, g, s = _grads(mn, x)
        yd, gd, sd = _grads(df, x)
    assert len(_executor(mn).memory_plan.layers) == 6          # 3 layers x 2 chunks
    assert torch.equal(y, y0) and all(torch.equal(a, b) for a, b in zip(g, g0))
    assert torch.equal(yd, y0) and all(torch.equal(a, b) for a, b in zip(gd, g0))
    assert s < s0 / 2 and sd <= s0          # measured: 0.44 of max (the chunks keep their inputs)


def test_the_recomputed_tensor_replaces_the_saved_input(monkeypatch):
    """The saved-tensor hook really replaces the scan's input (Source.hits), and a Source rerun is
    called once per replaced layer in backward."""
    monkeypatch.setattr(sys.modules["snncc.passes.plan_memory"], "MIN_RATE_MIN", 0.0)   # every producer
    torch.manual_seed(0)
    m = TwoConvNet()
    x = torch.rand(8, 2, 32, 32)
    mn = snncc.compile(copy.deepcopy(m), T=4, memory="min")
    _grads(mn, x)
    hits = []
    real = recompute.Source.recompute

    def spy(self, tensors):
        hits.append(self.what)
        return real(self, tensors)
    monkeypatch.setattr(recompute.Source, "recompute", spy)
    _grads(mn, x)
    assert sorted(hits) == ["convolution 'c1'", f"convolution '{_conv_task(mn, 'c2')}'",
                            f"linear '{_conv_task(mn, 'fc')}'"]


def _conv_task(cm, target):
    return next(t.name for t in _executor(cm).tasks if t.target == target and t.kind == "module")


def test_in_place_change_between_forward_and_backward_is_an_error():
    """A weight changed in place after the forward: the recomputed input would differ, so backward raises
    (eager autograd raises for the same reason) instead of returning a wrong gradient."""
    torch.manual_seed(0)
    mn = snncc.compile(TwoConvNet(), T=4, memory="min")
    x = torch.rand(8, 2, 32, 32)
    _grads(mn, x)
    y = mn(x)
    with torch.no_grad():
        mn.model.c2.weight.add_(0.01)
    with pytest.raises((SNNCCError, RuntimeError), match="modified"):
        y.sum().backward()


def test_outer_saved_tensor_hooks_see_what_is_kept():
    """A user's saved_tensors_hooks around the call still see every kept tensor (the bits a Source holds
    among them) and get to unpack them: the results are unchanged."""
    torch.manual_seed(0)
    m = TwoConvNet()
    x = torch.rand(8, 2, 32, 32)
    ref = snncc.compile(copy.deepcopy(m), T=4, memory="max")
    mn = snncc.compile(copy.deepcopy(m), T=4, memory="min")
    _grads(ref, x)
    _grads(mn, x)
    _, g0, _ = _grads(ref, x)
    seen, unpacked = [], []

    def pack(t):
        seen.append(t.dtype)
        return ("boxed", t)

    def unpack(p):
        unpacked.append(1)
        return p[1]
    mn.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        y = mn(x)
    w = torch.linspace(-1, 1, y.numel()).view_as(y)
    (y * w).sum().backward()
    assert torch.uint8 in seen and unpacked
    for a, b in zip((p.grad for p in mn.parameters()), g0):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------- the plan
def _scan(name, M, **kw):
    return ScanCost(name, name.split("_")[0], M, 8, 4, **kw)


def test_min_plans_source_where_there_is_a_producer():
    plan = plan_memory([_scan("a_t0", 1 << 20, source="conv_a"), _scan("b_t0", 1 << 18)], "min", CAL)
    assert [p.keep for p in plan.layers] == ["source", "input"]
    assert plan.layers[0].kept_bytes == 0 and plan.from_source("a_t0") and not plan.from_source("b_t0")
    assert "1 with their input, from its producer" in plan.summary()


def test_min_keeps_an_input_whose_producer_rerun_is_measured_not_worth_it():
    """memory='min' reruns a measured producer unless that saves under 1 MiB per 10 ms (seed 001's fc1:
    2.7 ms for 0.13 MiB); unmeasured, it reruns (the least memory)."""
    conv = _scan("a_t0", 1 << 20, source="conv_a", source_us=10000.0)     # 4 MiB input for 10 ms: rerun
    fc = _scan("b_t0", 1 << 12, source="fc_b", source_us=2700.0)          # 16 KiB for 2.7 ms: kept
    plan = plan_memory([conv, fc, _scan("c_t0", 1 << 12, source="fc_c")], "min", CAL)
    assert [p.keep for p in plan.layers] == ["source", "input", "source"]
    assert "under 1 MiB per 10 ms" in plan.layers[1].why and "'fc_b'" in plan.layers[1].why
    assert plan.layers[1].kept_bytes == fc.kept_bytes("input") > 0


def test_default_reruns_a_producer_only_within_budget_and_when_worth_it():
    big = _scan("a_t0", 1 << 20, broadcast=True, source="conv_a", source_us=500.0)   # H 32 MiB, input 4 MiB
    tiny = _scan("b_t0", 1 << 10, source="fc_b", source_us=2000.0)       # 32 KiB for 2 ms: not worth it
    rerun = big.recompute_us(CAL)
    plan = plan_memory([big, tiny], "default", CAL, step_us=1e6)
    assert [p.keep for p in plan.layers] == ["source", "h"]
    assert plan.layers[0].recompute_us == pytest.approx(500.0 + rerun)
    assert "1 MiB per ms" in plan.layers[1].why
    # a step with budget for the scan's rerun but not the producer's: keep the input
    plan = plan_memory([big], "default", CAL, step_us=(rerun + 100.0) / 0.05)
    assert plan.layers[0].keep == "input"
    # unmeasured producer: never planned by the default
    assert plan_memory([_scan("a_t0", 1 << 20, broadcast=True, source="conv_a")], "default", CAL,
                       1e9).layers[0].keep == "input"


def test_own_pooled_buffer_is_the_base_of_its_views():
    """``buffers.empty(own=True)``: views of it name it as their ``_base`` (where a recipe is attached), and
    the pool still hands its memory out again only once nothing uses it."""
    from snncc.runtime import buffers
    y = buffers.empty((4, 8, 6, 6), torch.float32, torch.device("cpu"), channels_last=True, own=True)
    assert y._base is None and y.is_contiguous(memory_format=torch.channels_last)
    v = y.view(2, 2, 8, 6, 6)
    assert v._base is y
    ptr = y.untyped_storage().data_ptr()
    del y
    z = buffers.empty((4, 8, 6, 6), torch.float32, torch.device("cpu"), channels_last=True, own=True)
    assert z.untyped_storage().data_ptr() != ptr          # still in use through the view
    del v, z
    w = buffers.empty((4, 8, 6, 6), torch.float32, torch.device("cpu"), channels_last=True, own=True)
    w2 = buffers.empty((4, 8, 6, 6), torch.float32, torch.device("cpu"), channels_last=True, own=True)
    assert ptr in (w.untyped_storage().data_ptr(), w2.untyped_storage().data_ptr())   # free again: reused
