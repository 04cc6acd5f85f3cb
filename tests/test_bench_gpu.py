"""tools/bench_gpu.py on the CPU with tiny shapes: the records it writes have the schema issue 4 asks for
(timing itself is measured by running the script, never asserted in tests)."""
from __future__ import annotations

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))

import bench_gpu  # noqa: E402


def test_quick_run_writes_records(tmp_path):
    out = tmp_path / "cpu.json"
    bench_gpu.main(["--quick", "--device", "cpu", "--models", "csnn", "--variants", "eager,snncc,snncc-streams,ann_floor",
                    "--out", str(out)])
    records = json.loads(out.read_text())
    keys = {"model", "T", "batch", "mode", "variant", "ms", "peak_mem_mb", "device", "torch", "date"}
    assert records and all(keys <= set(r) for r in records)
    got = {(r["variant"], r["mode"]) for r in records}
    assert got == {(v, m) for v in ("eager", "snncc", "snncc-streams", "ann_floor") for m in ("train", "infer")}
    assert all(isinstance(r["ms"], float) and r["ms"] > 0 for r in records)
    assert all(r["device"] == "cpu" and r["peak_mem_mb"] is None for r in records)


def test_relu_copy_replaces_every_neuron():
    import torch
    from snncc.frontend import is_stateful
    m = bench_gpu.StepCSNN(16)
    r = bench_gpu.relu_copy(m)
    assert not any(is_stateful(x) for n, x in r.named_modules() if n)
    assert sum(isinstance(x, torch.nn.ReLU) for x in r.modules()) == 3
    assert any(is_stateful(x) for n, x in m.named_modules() if n)      # the original is untouched
