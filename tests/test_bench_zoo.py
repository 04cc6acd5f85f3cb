"""tools/bench_zoo.py: its model builders build step-mode models that run, and one ``--quick`` model run
in-process yields a record with every field the table and the JSON promise. Failures are reported in the
record, never raised. Timings are only checked to be numbers, never compared (tests do not measure speed).
"""
from __future__ import annotations

import importlib.util
import json
import math
from types import SimpleNamespace

import pytest
import torch

import snncc
from snncc.tools import _rates, bench_zoo

HAS = {m: importlib.util.find_spec(m) is not None for m in ("spikingjelly", "snntorch")}
NEEDS = {"sj_vgg": "spikingjelly", "sj_sew": "spikingjelly", "sj_mlp_zoo": "spikingjelly",
         "spikformer": "spikingjelly", "snn_leaky": "snntorch", "snn_synaptic": "snntorch", "custom": None}


def test_every_builder_is_listed():
    assert set(NEEDS) == set(bench_zoo.BUILDERS)


@pytest.mark.parametrize("name", sorted(NEEDS))
def test_builder_runs_in_step_mode(name):
    if NEEDS[name] and not HAS[NEEDS[name]]:
        pytest.skip(f"{NEEDS[name]} is not installed")
    torch.manual_seed(0)
    zm = bench_zoo.build(name, quick=True)
    assert zm.name == name and zm.description
    neurons = _rates.neuron_layers(zm.model)
    assert neurons, f"{name}: no neuron layer found"
    x = torch.rand(2, *zm.input_shape)
    loop = bench_zoo.EagerLoop(zm.model, 3, zm.reset)
    out = loop(x)
    assert out.shape == (3, 2, zm.num_classes)
    out.mean().backward()
    rates = _rates.record_rates(zm.model, lambda: loop(x))
    assert set(rates) == {n for n, _ in neurons}
    assert all(0.0 <= r <= 1.0 for r in rates.values())
    # the eager loop resets: two calls from the same weights agree
    with torch.no_grad():
        torch.testing.assert_close(loop(x), loop(x), rtol=0, atol=0)


def _check_record(rec):
    assert set(bench_zoo.RECORD_FIELDS) <= set(rec)
    assert rec["n_neurons"] == len(rec["neurons"]) > 0
    assert set(rec["rates"]) == set(rec["neurons"])
    assert all(0.0 <= r <= 1.0 for r in rec["rates"].values())
    assert set(rec["gains"]) == set(rec["neurons"])
    eager = rec["times_ms"]["eager"]
    assert isinstance(eager["train"], float) and isinstance(eager["infer"], float)
    if "snncc" in rec["errors"]:            # a failure is reported, with the eager numbers still there
        return
    assert rec["n_compiled"] + rec["n_opaque"] <= rec["n_neurons"]
    assert rec["coverage_source"]
    snn = rec["times_ms"]["snncc"]
    assert snn["train"] > 0 and snn["infer"] > 0
    sp = rec["speedup"]["snncc"]
    assert math.isclose(sp["train"], eager["train"] / snn["train"])
    assert set(rec["switch_ms"]["snncc"]) == {"to_train", "to_eval"}
    eq = rec["equal"]
    for k in ("out_diff_train", "out_diff_eval", "grad_diff", "held"):
        assert k in eq, k


def test_quick_run_in_process(tmp_path, capsys):
    path = tmp_path / "zoo.json"
    records = bench_zoo.run(["--quick", "--models", "custom", "--markdown", "--json", str(path)])
    assert [r["model"] for r in records] == ["custom"]
    rec = records[0]
    _check_record(rec)
    assert rec["n_neurons"] == 2
    out = capsys.readouterr().out
    assert "| custom |" in out and "eager train ms" in out
    data = json.loads(path.read_text())
    assert data["records"][0]["model"] == "custom"
    assert set(bench_zoo.RECORD_FIELDS) <= set(data["records"][0])


def _args(**kw):
    base = dict(T=3, batch=2, quick=True, repeat=1, reps=1, rate=0.1, seed=0, lr=1e-4, torch_compile=False,
                verbose=False)
    base.update(kw)
    return SimpleNamespace(**base)


def test_failures_are_reported_not_raised(monkeypatch):
    def broken(quick=False):
        raise RuntimeError("no such model today")
    monkeypatch.setitem(bench_zoo.BUILDERS, "broken", broken)
    rec = bench_zoo.bench_model("broken", _args(), log=lambda s: None)
    assert "build" in rec["errors"] and set(bench_zoo.RECORD_FIELDS) <= set(rec)

    def failing_compile(*a, **k):
        raise snncc.TraceFailure("cannot trace this")
    monkeypatch.setattr(bench_zoo.snncc, "compile", failing_compile)
    rec = bench_zoo.bench_model("custom", _args(), log=lambda s: None)
    assert "TraceFailure" in rec["errors"]["snncc"]
    _check_record(rec)
    table = bench_zoo.table([rec], markdown=True, torch_compile=False)
    assert "TraceFailure" in table


def test_coverage_from_an_explanation():
    layers = [SimpleNamespace(qualname="conv", kind="module", kernel=None),
              SimpleNamespace(qualname="sn1", kind="neuron", kernel="lifted"),
              SimpleNamespace(qualname="sn2", kind="opaque", kernel=None)]
    rep = SimpleNamespace(layers=layers, opaque={"sn2": "its step draws random numbers"})
    cov = bench_zoo._from_explanation(rep, ["sn1", "sn2"])
    assert cov.compiled == ["sn1"] and cov.opaque == ["sn2"]
    assert cov.kernels == {"sn1": "lifted"} and "random" in cov.reasons["sn2"]
    assert bench_zoo._from_explanation("a plain string", ["sn1"]) is None
