"""compile(chunk="auto"): the cost model (passes/choose_chunk.py), the device calibration
(runtime/calibrate.py) and the switch to a chunked schedule after the first call, numerics unchanged."""
from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from torch import nn

import snncc
from snncc import passes
from snncc.errors import InputError
from snncc.neurons import LIF
from snncc.passes.choose_chunk import LayerCost, predict_us
from snncc.runtime import calibrate as calib
from snncc.runtime.calibrate import Calibration

from conftest import eager_run

#: a GPU-like device: small ops cost a flat 5 us (not filled) up to 1 MiB, then 1.5 TB/s
FAKE_GPU = Calibration("FakeGPU", host_us=0.2, sizes=(8192, 1 << 20, 1 << 28),
                       op_us=(5.0, 5.0, 5.0 + (1 << 28) / 1.5e6), step_us=4.0)


def _chain(n_layers: int, step_bytes: float, scan_every: int = 2):
    return [LayerCost(f"l{i}", step_bytes, i % scan_every == 1, i) for i in range(n_layers)]


def test_one_stream_or_cpu_keeps_all_timesteps():
    layers = _chain(6, 4096)
    assert passes.choose_chunk(layers, 8, FAKE_GPU, 1).K == 8
    cpu = Calibration("cpu-2threads", 4.0, (8192, 1 << 26), (3.0, 600.0), 0.3)
    choice = passes.choose_chunk(layers, 8, cpu, 4)
    assert choice.K == 8 and "CPU" in choice.reason


def test_small_layers_with_long_scans_are_chunked():
    choice = passes.choose_chunk(_chain(6, 4096), 8, FAKE_GPU, 4)
    assert choice.K < 8 and 8 % choice.K == 0
    assert [k for k, _ in choice.predicted_us] == [8, 4, 2, 1]
    pred = dict(choice.predicted_us)
    assert pred[choice.K] < 0.95 * pred[8]


def test_layers_that_fill_the_device_keep_all_timesteps():
    # 64 MiB per step: every op is bandwidth-bound, splitting only adds waves
    choice = passes.choose_chunk(_chain(6, 64 << 20), 8, FAKE_GPU, 4)
    assert choice.K == 8, choice


def test_host_bound_model_keeps_all_timesteps():
    slow_host = Calibration("FakeGPU", host_us=50.0, sizes=FAKE_GPU.sizes, op_us=FAKE_GPU.op_us, step_us=4.0)
    assert passes.choose_chunk(_chain(6, 4096), 8, slow_host, 4).K == 8


@pytest.mark.parametrize("T", [2, 3, 6, 8])
def test_one_stream_never_predicts_a_gain(T):
    layers = _chain(5, 1 << 16)
    times = {K: predict_us(layers, T, K, FAKE_GPU, 1) for K in range(1, T + 1) if T % K == 0}
    assert min(times, key=lambda k: (times[k], -k)) == T


def test_op_time_is_flat_then_linear():
    assert FAKE_GPU.op_time(10) == FAKE_GPU.op_time(4096) == 5.0
    big = FAKE_GPU.op_time(1 << 29)
    assert big > FAKE_GPU.op_time(1 << 28) > FAKE_GPU.op_time(1 << 24) > 5.0


def test_calibration_is_measured_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("SNNCC_CACHE", str(tmp_path))
    monkeypatch.delenv("SNNCC_CALIBRATION", raising=False)
    monkeypatch.setattr(calib, "_MEMO", {})
    cal = calib.calibrate(torch.device("cpu"))
    assert cal.device.startswith("cpu") and cal.host_us > 0 and len(cal.op_us) == len(cal.sizes)
    assert list(cal.op_us) == sorted(cal.op_us)
    table = json.loads((tmp_path / "calibration.json").read_text())
    assert len(table) == 1 and next(iter(table.values()))["device"] == cal.device
    monkeypatch.setattr(calib, "_MEMO", {})

    def no_measure(device):
        raise AssertionError("re-measured although cached on disk")
    monkeypatch.setattr(calib, "measure", no_measure)
    assert calib.calibrate(torch.device("cpu")) == cal


def test_pinned_calibration(tmp_path, monkeypatch):
    path = tmp_path / "cal.json"
    path.write_text(json.dumps({"device": "X", "host_us": 1, "sizes": [1, 2], "op_us": [3, 4], "step_us": 0}))
    monkeypatch.setenv("SNNCC_CALIBRATION", str(path))
    assert calib.calibrate(torch.device("cpu")).device == "X"


def test_bad_chunk_names_the_choices():
    with pytest.raises(InputError, match="auto"):
        snncc.compile(nn.Linear(2, 2), T=2, chunk="fast")


class SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1, self.sn1 = nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), LIF()
        self.conv2, self.sn2 = nn.Conv2d(4, 4, 3, padding=1), LIF()
        self.fc, self.sn3 = nn.Linear(4 * 6 * 6, 5), LIF()

    def forward(self, x):
        x = self.sn1(self.bn1(self.conv1(x)))
        x = self.sn2(self.conv2(x))
        return self.sn3(self.fc(x.flatten(1)))


@pytest.mark.parametrize("pinned", [False, True])
def test_auto_chunk_trains_like_eager(pinned, tmp_path, monkeypatch):
    """First call layer-major, then (with the GPU-like calibration) a wavefront of chunks: both == eager."""
    if pinned:
        path = tmp_path / "cal.json"
        path.write_text(json.dumps({"device": FAKE_GPU.device, "host_us": FAKE_GPU.host_us,
                                    "sizes": FAKE_GPU.sizes, "op_us": FAKE_GPU.op_us, "step_us": 4.0}))
        monkeypatch.setenv("SNNCC_CALIBRATION", str(path))
    else:
        monkeypatch.setenv("SNNCC_CACHE", str(tmp_path))
        monkeypatch.delenv("SNNCC_CALIBRATION", raising=False)
    torch.manual_seed(0)
    model = SmallNet().double().train()
    with torch.no_grad():                      # every layer spikes (so the check below is not vacuous)
        for m in (model.conv2, model.fc):
            m.weight.mul_(3.0)
            m.bias.add_(1.2)
    ref = copy.deepcopy(model)
    cm = snncc.compile(model, T=8, chunk="auto", streams=4, verify=True)
    x = torch.rand(3, 2, 6, 6, dtype=torch.float64) * 2
    policies = []
    for call in range(3):
        out_e = eager_run(ref, x, T=8)
        out_c = cm(x)
        policies.append(cm.specialize(x).schedule.policy)
        assert torch.equal(out_e, out_c), f"call {call}"
        assert out_e.sum() > 0
        w = torch.randn(out_e.shape, generator=torch.Generator().manual_seed(call), dtype=torch.float64)
        (out_e * w).sum().backward()
        (out_c * w).sum().backward()
    for (n, pe), pc in zip(ref.named_parameters(), model.parameters()):
        torch.testing.assert_close(pe.grad, pc.grad, msg=n)
    torch.testing.assert_close(ref.bn1.running_mean, model.bn1.running_mean)
    (choice,) = cm.chunk_choices.values()
    if pinned:
        assert choice.K < 8 and policies[1:] == ["wavefront", "wavefront"]
        tasks = cm.specialize(x).task_graph.tasks()
        assert max(t.steps for t in tasks if t.batched) == choice.K
    else:
        assert choice.K == 8 and "CPU" in choice.reason and set(policies) == {"layer_major"}


def test_auto_on_one_stream_never_measures(monkeypatch):
    monkeypatch.setattr(calib, "calibrate", lambda device: (_ for _ in ()).throw(AssertionError("measured")))
    # NOTE: memory="max": the default memory plan (passes/plan_memory.py) reads the calibration too
    cm = snncc.compile(SmallNet(), T=4, chunk="auto", memory="max")
    cm(torch.rand(2, 2, 6, 6))
    assert cm.chunk_choices == {}
