"""CUDA graphs (runtime/graphs.py): the warm-up / capture / replay / fall-back policy, run on CPU through
the NullGraphs backend (capture = keep the function), and on a GPU for real (marked cuda)."""
from __future__ import annotations

import copy
import importlib.util
import warnings

import pytest
import torch
from torch import nn

import snncc
from snncc.errors import InputError
from snncc.neurons import LIF, ParametricLIF
from snncc.runtime.executor import TaskObserver
from snncc.runtime.graphs import WARMUP, NullGraphs, blockers

from conftest import eager_run


class Net(nn.Module):
    def __init__(self, drop: float = 0.0, plif: bool = False) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.sn1 = ParametricLIF() if plif else LIF()
        self.drop = nn.Dropout(drop) if drop else nn.Identity()
        self.fc, self.sn2 = nn.Linear(4 * 5 * 5, 3), LIF()
        with torch.no_grad():
            self.fc.weight.mul_(3.0)
            self.fc.bias.add_(1.0)

    def forward(self, x):
        x = self.drop(self.sn1(self.bn(self.conv(x))))
        return self.sn2(self.fc(x.flatten(1)))


def _null(cm) -> NullGraphs:
    be = NullGraphs()
    cm._snncc_graphs.backend = be
    return be


def test_warm_then_capture_then_replay_trains_like_eager():
    torch.manual_seed(0)
    model = Net().double().train()
    ref = copy.deepcopy(model)
    cm = snncc.compile(model, T=4, cuda_graphs=True)
    be = _null(cm)
    x = torch.rand(3, 2, 5, 5, dtype=torch.float64) * 2
    for call in range(WARMUP + 3):
        out_e, out_c = eager_run(ref, x, T=4), cm(x)
        assert torch.equal(out_e, out_c) and out_e.sum() > 0, f"call {call}"
        w = torch.randn(out_e.shape, generator=torch.Generator().manual_seed(call), dtype=torch.float64)
        (out_e * w).sum().backward()
        (out_c * w).sum().backward()
    assert be.log == [("capture", True)] + [("replay", True)] * 3
    for (n, pe), pc in zip(ref.named_parameters(), model.parameters()):
        torch.testing.assert_close(pe.grad, pc.grad, msg=n)
    # the capture's own run did not count: as many BatchNorm updates as the user's calls
    assert int(model.bn.num_batches_tracked) == int(ref.bn.num_batches_tracked) == 4 * (WARMUP + 3)
    torch.testing.assert_close(model.bn.running_mean, ref.bn.running_mean)


def test_new_shape_is_warmed_and_captured_on_its_own_and_old_graph_kept():
    cm = snncc.compile(Net().eval(), T=4, cuda_graphs=True)
    be = _null(cm)
    a, b = torch.rand(2, 2, 5, 5), torch.rand(5, 2, 5, 5)
    with torch.no_grad():
        for _ in range(WARMUP + 1):
            cm(a)
        for _ in range(WARMUP + 1):
            cm(b)
        cm(a)
    assert be.log == [("capture", False), ("replay", False)] * 2 + [("replay", False)]


def test_grad_mode_is_part_of_the_graph_key():
    cm = snncc.compile(Net().train(), T=2, cuda_graphs=True)
    be = _null(cm)
    x = torch.rand(2, 2, 5, 5)
    for _ in range(WARMUP + 1):
        cm(x)
    with torch.no_grad():
        for _ in range(WARMUP + 1):
            cm(x)
    assert [e for e in be.log if e[0] == "capture"] == [("capture", True), ("capture", False)]


@pytest.mark.parametrize("make,reason", [(lambda: Net(drop=0.3).train(), "random"),
                                         (lambda: Net(plif=True), "PLIF")])
def test_what_cannot_be_captured_warns_once_and_runs_as_usual(make, reason):
    torch.manual_seed(0)
    model = make().double()
    ref = copy.deepcopy(model)
    cm = snncc.compile(model, T=3, cuda_graphs=True)
    be = _null(cm)
    x = torch.rand(2, 2, 5, 5, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match=reason):
        for call in range(WARMUP + 2):
            torch.manual_seed(call)
            out_e = eager_run(ref, x, T=3)
            torch.manual_seed(call)
            assert torch.equal(out_e, cm(x))
    assert be.log == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cm(x)                                         # warned once, not at every call


def test_cpu_inputs_with_real_cuda_graphs_say_why():
    model = Net().double().eval()
    ref = copy.deepcopy(model)
    cm = snncc.compile(model, T=2, cuda_graphs=True)
    x = torch.rand(2, 2, 5, 5, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="not CUDA tensors"):
        for _ in range(WARMUP + 1):
            y = cm(x)
    assert torch.equal(y, eager_run(ref, x, T=2))


def test_failed_capture_falls_back_and_restores_buffers():
    class Broken(NullGraphs):
        def capture(self, fn, inputs, training, params):
            fn(*inputs)                                   # ran (BatchNorm updated), then failed
            raise RuntimeError("operation not permitted when stream is capturing")
    torch.manual_seed(0)
    model = Net().train()
    ref = copy.deepcopy(model)
    cm = snncc.compile(model, T=2, cuda_graphs=True)
    cm._snncc_graphs.backend = Broken()
    x = torch.rand(2, 2, 5, 5)
    with pytest.warns(RuntimeWarning, match="capture failed.*not permitted"):
        for _ in range(WARMUP + 2):
            torch.testing.assert_close(cm(x), eager_run(ref, x, T=2))
    assert int(model.bn.num_batches_tracked) == int(ref.bn.num_batches_tracked)
    torch.testing.assert_close(model.bn.running_var, ref.bn.running_var)


def test_observer_bypasses_graphs():
    cm = snncc.compile(Net().eval(), T=2, cuda_graphs=True)
    be = _null(cm)
    x = torch.rand(2, 2, 5, 5)
    seen = []

    class Count(TaskObserver):
        def after(self, task, value):
            seen.append(task.name)
    with torch.no_grad(), cm.observing(Count()):
        for _ in range(WARMUP + 2):
            cm(x)
    assert be.log == [] and seen


def test_blockers_name_streams_and_devices():
    cm = snncc.compile(Net().eval(), T=2)
    x = torch.rand(2, 2, 5, 5)
    compiled = cm.specialize(x)
    why = blockers(compiled, cm.model, (x,), streams=3, observed=True)
    assert any("streams" in w for w in why) and any("observer" in w for w in why)
    assert any("CUDA" in w for w in why)
    assert blockers(compiled, cm.model, (x,), 1, False, need_cuda=False) == []


def test_bad_cuda_graphs_argument():
    with pytest.raises(InputError, match="cuda_graphs"):
        snncc.compile(Net(), T=2, cuda_graphs="yes")


_HAS_GPU = torch.cuda.is_available()


@pytest.mark.cuda
@pytest.mark.skipif(not _HAS_GPU, reason="needs a CUDA device")
@pytest.mark.parametrize("train", [False, True])
def test_real_cuda_graphs_match_eager(train):
    torch.manual_seed(0)
    model = Net().cuda().train(train)
    ref = copy.deepcopy(model)
    cm = snncc.compile(model, T=4, cuda_graphs=True)
    x = torch.rand(8, 2, 5, 5, device="cuda") * 2
    for call in range(WARMUP + 3):
        with torch.set_grad_enabled(train):
            out_e, out_c = eager_run(ref, x, T=4), cm(x)
        torch.testing.assert_close(out_c, out_e)
        if train:
            w = torch.randn(out_e.shape, device="cuda", generator=torch.Generator("cuda").manual_seed(call))
            (out_e * w).sum().backward()
            (out_c * w).sum().backward()
    if train:
        for (n, pe), pc in zip(ref.named_parameters(), model.parameters()):
            torch.testing.assert_close(pc.grad, pe.grad, rtol=1e-4, atol=1e-5, msg=n)
        torch.testing.assert_close(model.bn.running_mean, ref.bn.running_mean)
    assert cm._snncc_graphs.entries and all(e.replay is not None for e in cm._snncc_graphs.entries.values())
