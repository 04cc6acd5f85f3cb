"""snncc-viz and snncc-prof on the example models: the files they write parse and hold what they promise.

Both tools are run in-process through ``main(argv)`` (fast), plus once each as the installed console script.
Small shapes (8x8 images, batch 2, T = 3) and few repetitions keep the file to a few seconds per test;
timings here are only checked to be numbers, never compared (tests do not measure speed).
"""
from __future__ import annotations

import html
import html
import html.parser
import json
import os
import shutil
import subprocess
import xml.etree.ElementTree as ET
from typing import List, Set

import pytest
import torch

import snncc
from snncc.tools import prof, viz
from snncc.tools._loader import ModelSpecError, build_model, load_factory, parse_shape

from conftest import requires_spikingjelly

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSNN = os.path.join(ROOT, "examples", "csnn.py")
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "tool_models.py")
EXPLAIN = os.path.join(ROOT, "tests", "fixtures", "explain_models.py")
EXPLAIN = os.path.join(ROOT, "tests", "fixtures", "explain_models.py")
STEP = [f"{CSNN}:StepCSNN", "--kw", "size=8", "--input-shape", "3,8,8", "--batch", "2", "-T", "3",
        "--input-scale", "4"]
requires_dot = pytest.mark.skipif(viz.find_dot() is None, reason="graphviz's dot is not installed")


def _expected_layers(model: torch.nn.Module, x: torch.Tensor, **compile_kw) -> Set[str]:
    """The layers of the task graph the tools draw, plus the modules fused into its tasks."""
    c = snncc.compile(model, **compile_kw).specialize(x)
    layers = {t.layer for t in c.task_graph.tasks()}
    layers |= {f.module for t in c.task_graph.tasks() for f in getattr(t, "fused", ())}
    return layers


def _step_layers() -> Set[str]:
    from examples.csnn import StepCSNN
    return _expected_layers(StepCSNN(size=8), torch.rand(2, 3, 8, 8), T=3)


class _Text(html.parser.HTMLParser):
    """All text of an HTML page, and the raw <svg> elements in it."""

    def __init__(self) -> None:
        super().__init__()
        self.text: List[str] = []
        self.svgs = 0
        self.pres = 0

    def handle_starttag(self, tag, attrs):
        self.svgs += tag == "svg"
        self.pres += tag == "pre"

    def handle_data(self, data):
        self.text.append(data)


def _svg_texts(root: ET.Element) -> str:
    return "\n".join(el.text or "" for el in root.iter() if el.tag.endswith(("text", "title")))


def _inline_svgs(page: str) -> List[str]:
    out, start = [], 0
    while (i := page.find("<svg", start)) >= 0:
        j = page.index("</svg>", i) + len("</svg>")
        out.append(page[i:j])
        start = j
    return out


# --------------------------------------------------------------------------- snncc-viz
@requires_dot
def test_viz_html_shows_every_layer(tmp_path):
    out = tmp_path / "csnn.html"
    assert viz.main(STEP + ["-o", str(out), "--repeat", "1"]) == 0
    page = out.read_text()
    parser = _Text()
    parser.feed(page)
    text = "\n".join(parser.text)
    svgs = _inline_svgs(page)
    assert parser.svgs == len(svgs) >= 3, "the DAG, the timeline and the pass graphs are inline SVG"
    for svg in svgs:                                  # every picture is well-formed XML
        ET.fromstring(svg)
    for layer in _step_layers():
        assert layer in text, f"layer {layer!r} missing from the page"
    for name in ("trace", "hoist_time_invariant", "batch_over_time", "build_task_graph"):
        assert name in text, f"pass {name!r} missing"
    assert "measured" in text and "planned" in text
    assert "memory plan" in text and "backward keeps" in text      # passes/plan_memory.py, per neuron layer
    assert "http://" not in page.replace("http://www.w3.org", ""), "the page must be self-contained"


@requires_dot
def test_viz_svg_dag_shows_every_layer(tmp_path):
    out = tmp_path / "dag.svg"
    assert viz.main(STEP + ["-o", str(out), "--time", "estimated"]) == 0
    texts = _svg_texts(ET.parse(out).getroot())
    for layer in _step_layers():
        assert layer in texts, f"layer {layer!r} missing from the SVG"
    assert "one task" in texts, "batched tasks are boxed"


def test_viz_dot_and_views(tmp_path, capsys):
    out = tmp_path / "dag.dot"
    assert viz.main(STEP + ["-o", str(out), "--time", "estimated"]) == 0
    src = out.read_text()
    assert src.startswith("digraph") and "cluster_" in src
    for layer in _step_layers():
        assert layer in src, f"layer {layer!r} missing from the DOT source"
    assert viz.main(STEP + ["-o", str(tmp_path / "b.dot"), "--view", "batch_over_time", "--time", "estimated"]) == 0
    assert "subgraph" in (tmp_path / "b.dot").read_text()
    assert viz.main(STEP + ["-o", str(tmp_path / "tl.svg"), "--view", "timeline", "--time", "estimated"]) == 0
    tl = ET.parse(tmp_path / "tl.svg").getroot()
    assert "ESTIMATED" in _svg_texts(tl), "an estimated timeline says so"
    assert viz.main(STEP + ["-o", str(tmp_path / "x.dot"), "--view", "nope", "--time", "estimated"]) == 2
    assert "choose dag, timeline" in capsys.readouterr().err


def test_viz_dag_marks_state_and_order_edges(tmp_path):
    out = tmp_path / "mlp.dot"
    assert viz.main([f"{FIXTURES}:dropout_mlp", "--input-shape", "16", "-T", "3", "--batch", "2",
                     "-o", str(out), "--time", "estimated"]) == 0
    src = out.read_text()
    assert "style=dashed" in src and 'xlabel="state"' in src
    assert "style=dotted" in src and 'xlabel="order"' in src


def test_viz_without_dot(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(viz, "find_dot", lambda: None)
    page = tmp_path / "p.html"
    assert viz.main(STEP + ["-o", str(page), "--time", "estimated"]) == 0
    text = page.read_text()
    assert "digraph tasks" in text and "dot -Tsvg" in text and "apt-get install graphviz" in text
    parser = _Text()
    parser.feed(text)
    assert parser.pres >= 2 and parser.svgs == 1, "DOT as text; only the timeline (no dot needed) is SVG"
    for layer in _step_layers():
        assert layer in "\n".join(parser.text)
    capsys.readouterr()
    assert viz.main(STEP + ["-o", str(tmp_path / "d.svg"), "--time", "estimated"]) == 1
    err = capsys.readouterr().err
    assert (tmp_path / "d.dot").exists() and not (tmp_path / "d.svg").exists()
    assert "dot -Tsvg" in err and "apt-get install graphviz" in err
    assert viz.main(STEP + ["-o", str(tmp_path / "d.png"), "--time", "estimated"]) == 1
    assert "dot -Tpng" in capsys.readouterr().err
    assert viz.main(STEP + ["-o", str(tmp_path / "t.svg"), "--view", "timeline", "--time", "estimated"]) == 0


@requires_dot
def test_viz_png(tmp_path):
    out = tmp_path / "dag.png"
    assert viz.main(STEP + ["-o", str(out), "--time", "estimated"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_viz_loop_model(tmp_path):
    """The example that loops over time itself (SpikingJelly LIF), compiled as is (--loop)."""
    pytest.importorskip("spikingjelly")
    out = tmp_path / "basic.dot"
    assert viz.main([f"{CSNN}:BasicCSNN", "--loop", "--kw", "size=8", "--input-shape", "3,8,8", "--batch", "2",
                     "-T", "3", "-o", str(out), "--time", "estimated"]) == 0
    from examples.csnn import BasicCSNN
    for layer in _expected_layers(BasicCSNN(T=3, size=8), torch.rand(2, 3, 8, 8)):
        assert layer in out.read_text()


# --------------------------------------------------------------------------- snncc-prof
def _numbers(d: dict) -> None:
    assert d["skipped"] is None, d["skipped"]
    for key in ("train_ms", "infer_ms", "saved_bytes", "ratio_train_vs_eager", "ratio_infer_vs_eager"):
        assert isinstance(d[key], (int, float)) and d[key] > 0, (key, d[key])


def test_prof_json_and_trace(tmp_path, capsys):
    js, tr = tmp_path / "p.json", tmp_path / "p.trace.json"
    assert prof.main(STEP + ["--compare", "eager,snncc", "--repeat", "2", "--steps", "2",
                             "--json", str(js), "--trace", str(tr)]) == 0
    out = capsys.readouterr().out
    assert "variants" in out and "net.1" in out              # the rich tables
    assert "memory plan" in out and "neuron scans recompute" in out
    rep = json.loads(js.read_text())
    assert rep["memory_plan"]["mode"] == "default" and rep["memory_plan"]["layers"]
    assert {d["keep"] for d in rep["memory_plan"]["layers"]} <= {"h", "input", "source"}
    for key in ("model", "T", "batch", "device", "torch", "date", "variants", "tasks", "totals"):
        assert key in rep
    assert rep["T"] == 3 and rep["batch"] == 2 and rep["device"] == "cpu"
    assert set(rep["variants"]) == {"eager", "snncc"}
    for d in rep["variants"].values():
        _numbers(d)
    assert rep["variants"]["eager"]["ratio_train_vs_eager"] == pytest.approx(1.0)
    assert rep["variants"]["snncc"]["max_abs_diff_vs_eager"] < 1e-4
    from examples.csnn import StepCSNN
    c = snncc.compile(StepCSNN(size=8), T=3).specialize(torch.rand(2, 3, 8, 8))
    assert [r["name"] for r in rep["tasks"]] == list(c.schedule.order)
    neurons = [r for r in rep["tasks"] if r["kind"] == "neuron"]
    assert neurons and all(0.0 <= r["spike_rate"] <= 1.0 for r in neurons)
    assert all(r["fwd_ms"] >= 0 for r in rep["tasks"])
    assert any(r["bwd_ms"] for r in rep["tasks"]) and sum(r["saved_bytes"] for r in rep["tasks"]) > 0
    assert rep["totals"]["saved_bytes"] > 0 and rep["totals"]["backward_wall_ms"] > 0
    trace = json.loads(tr.read_text())
    events = trace["traceEvents"]
    fwd = [e for e in events if e.get("ph") == "X" and e.get("cat") == "forward"]
    assert {e["args"]["task"] for e in fwd} == set(c.schedule.order), "one forward event per task"
    assert all(isinstance(e["ts"], (int, float)) and e["dur"] >= 0 for e in fwd)
    assert any(e.get("cat") == "backward" for e in events)


def test_backward_times_belong_to_their_run():
    """Each profiled run's backward events lie inside its own backward, and every run sees the same nodes:
    hooks on a parameter's AccumulateGrad (which outlives the graph) must not leak into later runs."""
    from examples.csnn import StepCSNN
    from snncc.tools._taskprof import param_storages, profile_compiled
    model = StepCSNN(size=8)
    p, _ = profile_compiled(snncc.compile(model, T=3), torch.rand(2, 3, 8, 8) * 4, runs=3, warmup=1,
                            exclude=param_storages(model))
    counts = [sum(len(v) for v in r.bwd.values()) for r in p.runs]
    assert counts[0] > 0 and len(set(counts)) == 1, counts
    for r in p.runs:
        end = r.forward_wall + r.backward_wall + 0.05
        assert all(r.forward_wall <= s <= e <= end for v in r.bwd.values() for s, e, _ in v)


@requires_spikingjelly
def test_prof_compare_all_variants(tmp_path):
    """eager, torch.compile, SpikingJelly's multi-step mode and snncc on a SpikingJelly step model.

    torch.compile runs with the ``eager`` backend here: inductor's first compile on a CPU takes minutes; the
    backend changes what torch.compile generates, not how snncc-prof times and reports the variant.
    """
    js = tmp_path / "all.json"
    assert prof.main([f"{FIXTURES}:sj_step_csnn", "--kw", "size=8", "--input-shape", "3,8,8", "--batch", "2", "-T", "3",
                      "--input-scale", "4", "--compare", "eager,torch.compile,spikingjelly,snncc", "--no-tasks",
                      "--repeat", "1", "--torch-compile-backend", "eager", "--quiet", "--json", str(js)]) == 0
    rep = json.loads(js.read_text())
    assert list(rep["variants"]) == ["eager", "torch.compile", "spikingjelly", "snncc"]
    for name in ("eager", "spikingjelly", "snncc"):
        _numbers(rep["variants"][name])
    for name in ("spikingjelly", "snncc"):
        assert rep["variants"][name]["max_abs_diff_vs_eager"] < 1e-4, name
    tc = rep["variants"]["torch.compile"]
    if tc["skipped"] is None:
        _numbers(tc)
    else:
        assert isinstance(tc["skipped"], str) and tc["skipped"]


def test_prof_skips_with_reasons(tmp_path):
    js = tmp_path / "s.json"
    assert prof.main(STEP + ["--compare", "eager,spikingjelly", "--no-tasks", "--repeat", "1", "--quiet",
                             "--json", str(js)]) == 0
    sj = json.loads(js.read_text())["variants"]["spikingjelly"]
    assert sj["train_ms"] is None and sj["skipped"] and ("no SpikingJelly neurons" in sj["skipped"]
                                                         or "not installed" in sj["skipped"])


# --------------------------------------------------------------------------- the loader's errors
@pytest.mark.parametrize("spec, message", [
    ("no_colon_here", "expected 'path/to/file.py:factory'"),
    ("missing/file.py:make", "does not exist"),
    (f"{CSNN}:NoSuchFactory", "has no attribute 'NoSuchFactory'"),
    (f"{FIXTURES}:not_a_module", "not a torch.nn.Module"),
    ("no_such_pkg_xyz.mod:make", "no module named 'no_such_pkg_xyz'"),
])
def test_loader_errors_name_the_spec(spec, message):
    with pytest.raises(ModelSpecError) as info:
        build_model(spec, {})
    assert spec in str(info.value) and message in str(info.value)


def test_loader_parses_and_cli_reports(capsys):
    assert parse_shape("3,32,32") == (3, 32, 32) and parse_shape("3x8x8") == (3, 8, 8)
    with pytest.raises(ModelSpecError):
        parse_shape("3,a")
    assert load_factory("examples.csnn:StepCSNN").__name__ == "StepCSNN"
    with pytest.raises(ModelSpecError, match="calling it with"):
        build_model(f"{CSNN}:StepCSNN", {"no_such_kwarg": 1})
    assert prof.main([f"{CSNN}:Nope", "--input-shape", "3,8,8"]) == 2
    assert f"{CSNN}:Nope" in capsys.readouterr().err
    assert prof.main(STEP + ["--compare", "eager,tvm"]) == 2
    assert "unknown variant 'tvm'" in capsys.readouterr().err
    assert viz.main(STEP + ["-o", "out.pdf"]) == 2
    assert "unknown extension" in capsys.readouterr().err


# --------------------------------------------------------------------------- the console scripts
def _script(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed as a console script (pip install -e . installs it)")
    return path


def test_console_script_viz(tmp_path):
    out = tmp_path / "v.dot"
    proc = subprocess.run([_script("snncc-viz")] + STEP + ["-o", str(out), "--time", "estimated"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert out.read_text().startswith("digraph") and "wrote" in proc.stderr


def test_console_script_prof(tmp_path):
    js = tmp_path / "p.json"
    proc = subprocess.run([_script("snncc-prof")] + STEP + ["--compare", "none", "--steps", "1", "--warmup", "0",
                                                            "--json", str(js)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(js.read_text())
    assert rep["variants"] == {} and rep["tasks"] and "forward" in proc.stdout


# --------------------------------------------------------------------------- the reasons (snncc.explain's words)
def _moody_reason() -> str:
    import sys
    sys.path.insert(0, os.path.dirname(EXPLAIN))
    import explain_models
    from snncc.recognize import bind
    reason = bind(explain_models.MoodyNeuron()).reason
    assert reason
    return reason


def _mlp(name: str) -> List[str]:
    return [f"{EXPLAIN}:{name}", "--input-shape", "8", "--batch", "2", "-T", "3", "--input-scale", "3"]


@pytest.mark.filterwarnings("ignore::snncc.frontend.OpaqueModuleWarning")
def test_prof_prints_why_a_module_is_opaque(tmp_path, capsys):
    reason = _moody_reason()
    js = tmp_path / "p.json"
    assert prof.main(_mlp("moody_mlp") + ["--compare", "none", "--steps", "1", "--warmup", "0", "--by", "task",
                                          "--json", str(js)]) == 0
    out = capsys.readouterr().out
    assert "opaque modules" in out and f"1: {reason}" in out
    assert "(opaque)" not in out
    rep = json.loads(js.read_text())
    opaque = [r for r in rep["tasks"] if r["kind"] == "opaque"]
    assert len(opaque) == 3
    for r in opaque:
        assert r["fate"] == f"opaque: {reason}" and f"(opaque: {reason})" in r["op"]
    neuron = [r for r in rep["tasks"] if r["kind"] == "neuron"]
    assert neuron and all(r["fate"] == "compiled (built-in LIF kernel)" and "built-in LIF kernel" in r["op"]
                          for r in neuron)
    layers = {d["layer"]: d for d in rep["layers"]}
    assert layers["1"]["fate"] == f"opaque: {reason}"


@pytest.mark.filterwarnings("ignore::snncc.frontend.OpaqueModuleWarning")
def test_viz_labels_opaque_reasons_and_neuron_kernels(tmp_path):
    reason = _moody_reason()
    dot = tmp_path / "m.dot"
    assert viz.main(_mlp("moody_mlp") + ["-o", str(dot), "--time", "estimated"]) == 0
    src = dot.read_text()
    assert "MoodyNeuron (opaque)" in src
    assert src.count(f"opaque: {reason}") == 3, "every opaque task's tooltip has the whole reason"
    assert reason.split()[0] in src.split("tooltip")[0] or "data-dependent" in src    # drawn under its label
    assert "LIF scan (built-in LIF kernel)" in src
    dot2 = tmp_path / "u.dot"
    assert viz.main(_mlp("user_mlp") + ["-o", str(dot2), "--time", "estimated"]) == 0
    src2 = dot2.read_text()
    assert "UserLIF scan (generated from its step code)" in src2 and "LIF scan (built-in LIF kernel)" in src2
    page = tmp_path / "m.html"
    assert viz.main(_mlp("moody_mlp") + ["-o", str(page), "--time", "estimated"]) == 0
    text = page.read_text()
    assert "What became of each layer" in text and html.escape(f"opaque: {reason}", quote=False) in text


# --------------------------------------------------------------------------- the reasons (snncc.explain's words)
def _moody_reason() -> str:
    import sys
    sys.path.insert(0, os.path.dirname(EXPLAIN))
    import explain_models
    from snncc.recognize import bind
    reason = bind(explain_models.MoodyNeuron()).reason
    assert reason
    return reason


def _mlp(name: str) -> List[str]:
    return [f"{EXPLAIN}:{name}", "--input-shape", "8", "--batch", "2", "-T", "3", "--input-scale", "3"]


@pytest.mark.filterwarnings("ignore::snncc.frontend.OpaqueModuleWarning")
def test_prof_prints_why_a_module_is_opaque(tmp_path, capsys):
    reason = _moody_reason()
    js = tmp_path / "p.json"
    assert prof.main(_mlp("moody_mlp") + ["--compare", "none", "--steps", "1", "--warmup", "0", "--by", "task",
                                          "--json", str(js)]) == 0
    out = capsys.readouterr().out
    assert "opaque modules" in out and f"1: {reason}" in out
    assert "(opaque)" not in out
    rep = json.loads(js.read_text())
    opaque = [r for r in rep["tasks"] if r["kind"] == "opaque"]
    assert len(opaque) == 3
    for r in opaque:
        assert r["fate"] == f"opaque: {reason}" and f"(opaque: {reason})" in r["op"]
    neuron = [r for r in rep["tasks"] if r["kind"] == "neuron"]
    assert neuron and all(r["fate"] == "compiled (built-in LIF kernel)" and "built-in LIF kernel" in r["op"]
                          for r in neuron)
    layers = {d["layer"]: d for d in rep["layers"]}
    assert layers["1"]["fate"] == f"opaque: {reason}"


@pytest.mark.filterwarnings("ignore::snncc.frontend.OpaqueModuleWarning")
def test_viz_labels_opaque_reasons_and_neuron_kernels(tmp_path):
    reason = _moody_reason()
    dot = tmp_path / "m.dot"
    assert viz.main(_mlp("moody_mlp") + ["-o", str(dot), "--time", "estimated"]) == 0
    src = dot.read_text()
    assert src.count(f"opaque: {reason}") == 3, "every opaque task's tooltip has the whole reason"
    labels = [line.split("tooltip=")[0] for line in src.splitlines() if "MoodyNeuron (opaque)" in line]
    first_words = " ".join(reason.split()[:3])
    assert len(labels) == 3 and sum(first_words in lab for lab in labels) == 1, \
        "the reason is drawn under the first step's label"
    assert "LIF scan (built-in LIF kernel)" in src
    dot2 = tmp_path / "u.dot"
    assert viz.main(_mlp("user_mlp") + ["-o", str(dot2), "--time", "estimated"]) == 0
    src2 = dot2.read_text()
    assert "UserLIF scan (generated from its step code)" in src2 and "LIF scan (built-in LIF kernel)" in src2
    page = tmp_path / "m.html"
    assert viz.main(_mlp("moody_mlp") + ["-o", str(page), "--time", "estimated"]) == 0
    text = page.read_text()
    assert "What became of each layer" in text and html.escape(f"opaque: {reason}", quote=False) in text
