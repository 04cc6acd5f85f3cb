"""snncc-viz: see what the compiler did -- the task DAG, the wavefront schedule, the graph after each pass.

    snncc-viz examples/csnn.py:StepCSNN --input-shape 3,32,32 -T 4 -o csnn.html

The output's extension picks the format:

* ``.html``: one self-contained page (no network, no JavaScript): a header with the model, T, batch and task
  counts, the table of pass snapshots, (a) the task DAG, (b) the schedule timeline, (c) the graph after
  each pass, and the task table; pictures are inline SVG.
* ``.svg`` / ``.png`` / ``.dot``: one picture, chosen with ``--view``: ``dag`` (default), ``timeline``
  (SVG only), or a pass name such as ``batch_over_time`` (``--list-views`` prints them).

(a) Task DAG: one node per task, coloured by layer; a task that runs several timesteps at once (batched
    over time, or a neuron scan) is a box around its timesteps -- what runs as one kernel is boxed. Edges:
    data (solid), state (dashed red: a layer's chunk after its previous chunk), order (dotted: random draws
    and opaque modules keep eager's order). A neuron says which kernel it runs (built-in, or generated from
    its step code); an opaque module (orange border) says why it is opaque under its first step's label
    (the tooltip has the whole reason). The page's "What became of each layer" table is ``snncc.explain``'s
    fate column.
(b) Timeline: lanes are the *planned* streams (task i of a wave -> lane i; the CPU runtime runs one
    stream), bars are tasks, x is measured time (``--time measured``, default: medians of ``--repeat`` runs
    timed through the executor's task hook) or an estimate from shapes (``--time estimated``); the picture
    says which. Measured runs add the real serial forward (and backward) rows.
(c) Passes: the graph each pass of ``snncc/pipeline.py`` produced (``Compiled.snapshots``); fx-level graphs
    above ``--max-nodes`` are collapsed to one node per layer, with a note.

Graphviz's ``dot`` renders the graphs. Without it, ``.dot`` still works, ``.html`` embeds the DOT sources
as text with a note, ``.svg`` writes the ``.dot`` beside it, and each says how to render
(``dot -Tsvg file.dot -o file.svg``; ``apt-get install graphviz``); ``.png`` fails with that message.
"""
from __future__ import annotations

import argparse
import datetime
import html
import math
import os
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import networkx as nx
import torch
from torch import nn

import snncc

from snncc.explain import task_fates

from ._loader import ModelSpecError, add_workload_args, annotate_fates, shorten, workload_from_args
from ._taskprof import (TaskRow, median_run, memory_notes, memory_plan_of, module_class, planned_lanes,
                        profile_compiled, task_describe, task_rows)

__all__ = ["main", "find_dot", "DotMissing", "render_dot", "layer_colors", "task_dag_dot", "fx_graph_dot",
           "snapshot_dot", "layer_fates", "task_descriptions", "timeline_svg", "estimate_ms", "Bar", "build_page",
           "DOT_HELP"]

DOT_HELP = ("graphviz's `dot` was not found: render with `dot -Tsvg FILE.dot -o FILE.svg` once it is installed "
            "(Debian/Ubuntu: `apt-get install graphviz`; macOS: `brew install graphviz`; conda: "
            "`conda install graphviz`; `bash tools/setup.sh` installs it where it can)")

#: fill colours per layer (pastel, readable under black text), cycled in order of first appearance
PALETTE = ("#8ecae6", "#ffb703", "#90be6d", "#f4a3a8", "#cdb4db", "#f9c74f", "#a3c4f3", "#ffcb77",
           "#b5e48c", "#f7b2bd", "#c8b6ff", "#98f5e1", "#fde4cf", "#bde0fe", "#e9c46a", "#caffbf")
_GRAY = "#e0e0e0"
_EDGE_STYLE = {"data": 'color="#555555"', "state": 'color="#c0392b", style=dashed, penwidth=1.6',
               "order": 'color="#7f8c8d", style=dotted, penwidth=1.4'}

#: the estimate's roofline (see DESIGN.md's measured 2-core CPU): FLOP/s for conv/linear, bytes/s otherwise
EST_FLOPS = 50e9
EST_BYTES = 20e9


# --------------------------------------------------------------------------- graphviz
class DotMissing(RuntimeError):
    """graphviz's ``dot`` is not installed (or failed): the message says how to render the .dot file."""


def find_dot() -> Optional[str]:
    """Path of graphviz's ``dot`` (``$SNNCC_DOT`` names another binary), or None when it is not there."""
    return shutil.which(os.environ.get("SNNCC_DOT") or "dot")


def render_dot(src: str, fmt: str = "svg", timeout: float = 60.0) -> bytes:
    """Run ``dot -T<fmt>`` on DOT source; bounded in time so a huge graph cannot hang the tool."""
    dot = find_dot()
    if dot is None:
        raise DotMissing(DOT_HELP)
    try:
        proc = subprocess.run([dot, f"-T{fmt}"], input=src.encode(), capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise DotMissing(f"dot took more than {timeout:.0f} s; render the .dot file yourself: "
                         f"dot -T{fmt} FILE.dot -o FILE.{fmt}")
    except OSError as exc:
        raise DotMissing(f"could not run {dot}: {exc}. {DOT_HELP}")
    if proc.returncode != 0:
        raise DotMissing(f"dot failed ({proc.returncode}): {proc.stderr.decode(errors='replace')[:500]}")
    return proc.stdout


def _q(text: Any) -> str:
    """A DOT double-quoted string."""
    return '"' + str(text).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _label(*lines: Any) -> str:
    """A multi-line DOT label (lines escaped, joined by DOT's newline)."""
    return '"' + "\\n".join(str(l).replace("\\", "\\\\").replace('"', '\\"') for l in lines if l != "") + '"'


def layer_colors(layers: Iterable[str]) -> Dict[str, str]:
    """A fill colour per layer, in first-appearance order; the same layer has the same colour everywhere."""
    out: Dict[str, str] = {}
    for layer in layers:
        if layer not in out:
            out[layer] = PALETTE[len(out) % len(PALETTE)]
    return out


def _darker(hex_color: str, f: float = 0.6) -> str:
    r, g, b = (int(hex_color[i:i + 2], 16) for i in (1, 3, 5))
    return "#%02x%02x%02x" % (int(r * f), int(g * f), int(b * f))


def _lighter(hex_color: str, f: float = 0.55) -> str:
    r, g, b = (int(hex_color[i:i + 2], 16) for i in (1, 3, 5))
    return "#%02x%02x%02x" % (int(r + (255 - r) * f), int(g + (255 - g) * f), int(b + (255 - b) * f))


def _steps_text(t0: Optional[int], t1: Optional[int]) -> str:
    if t0 is None:
        return "t=* (once)"
    return f"t={t0}" if t1 - t0 == 1 else f"t={t0}..{t1 - 1}"


def _ms(x: Optional[float]) -> str:
    if x is None:
        return ""
    return f"{x * 1e3:.0f} us" if x < 0.1 else f"{x:.2f} ms"


# --------------------------------------------------------------------------- (a) the task DAG
def task_descriptions(tasks: Iterable[Any], root: Optional[nn.Module],
                      fates: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """Task name -> what it runs; ``'<task>#fused<j>'`` -> what its j-th fusion absorbed.

    With ``fates`` (``snncc.explain.task_fates``) a neuron says which kernel it runs (built-in, or generated
    from its step code); an opaque module's reason is drawn by ``task_dag_dot`` from its ``notes``."""
    out: Dict[str, str] = {}
    fates = fates or {}
    for t in tasks:
        out[t.name] = _with_fate(t, task_describe(t, root), fates.get(t.name))
        for j, f in enumerate(getattr(t, "fused", ())):
            out[f"{t.name}#fused{j}"] = f"{module_class(root, f.module)} ({f.kind.replace('_', ' ')})"
    return out


def _with_fate(task: Any, text: str, fate: Optional[str]) -> str:
    if not fate:
        return text
    if task.kind == "opaque":       # the reason goes on lines of its own (task_dag_dot's notes)
        return text if "(opaque)" in text else f"{text} (opaque)"
    if task.kind == "neuron" and fate.startswith("compiled (") and fate.endswith(")"):
        kernel = fate[len("compiled ("):-1]
        return text.replace(" scan", f" scan ({kernel})", 1) if " scan" in text else f"{text} ({kernel})"
    return text


def task_dag_dot(graph: nx.DiGraph, *, title: str = "", describe: Optional[Dict[str, str]] = None,
                 colors: Optional[Dict[str, str]] = None, times: Optional[Dict[str, float]] = None,
                 waves: Optional[Dict[str, int]] = None, lanes: Optional[Dict[str, int]] = None,
                 max_steps: int = 6, notes: Optional[Dict[str, str]] = None) -> str:
    """DOT for a task-level graph (nodes carry ``task``; edges ``kind``): batched tasks are clusters.

    A batched task's cluster holds one small node per timestep (at most ``max_steps``, with an ellipsis),
    so the picture shows which timesteps run as one task. Edges between clusters attach to a middle step
    node and are clipped at the box (``compound=true`` with ``ltail``/``lhead``). ``notes``: task name ->
    its fate, added to its tooltip whole; an opaque task's reason is also drawn under its label (shortened).
    """
    describe = describe or {}
    notes = notes or {}
    tasks = [graph.nodes[n]["task"] for n in graph.nodes]
    colors = colors or layer_colors(t.layer for t in tasks)
    waves = waves if waves is not None else {n: d["wave"] for n, d in graph.nodes(data=True) if "wave" in d}
    lanes = lanes or {}
    lines = ["digraph tasks {",
             f'  graph [rankdir=TB, compound=true, fontname="Helvetica", fontsize=12, nodesep=0.18, ranksep=0.32, '
             f'labelloc=t, label={_q(title)}];',
             '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=10, margin="0.08,0.03", '
             'height=0.3];',
             '  edge [fontname="Helvetica", fontsize=8, arrowsize=0.6];']
    anchor: Dict[str, Tuple[str, Optional[str]]] = {}
    first_opaque: Dict[str, str] = {}        # layer -> its earliest opaque task: the one labelled with the reason
    for t in sorted((t for t in tasks if t.kind == "opaque"), key=lambda t: (t.t0 is not None, t.t0 or 0)):
        first_opaque.setdefault(t.layer, t.name)
    for t in tasks:
        fill = colors.get(t.layer, _GRAY)
        op = describe.get(t.name, t.kind)
        extra = []
        if t.name in waves:
            extra.append(f"wave {waves[t.name]}" + (f", lane {lanes[t.name]}" if t.name in lanes else ""))
        tip = f"{t.name}: {op}, {t.kind}, {_steps_text(t.t0, t.t1)}" + (f", {extra[0]}" if extra else "") + \
            (f", {_ms(times[t.name])}" if times and t.name in times else "") + \
            (f" -- {notes[t.name]}" if notes.get(t.name) else "")
        timing = _ms(times.get(t.name)) if times else ""
        fused = tuple(getattr(t, "fused", ()))          # NOTE: getattr: older IRs have no fusions
        bits = " · input kept as bits" if getattr(t, "spike_input", False) else ""
        if t.batched or fused:
            cluster = f"cluster_{t.name}"
            k = t.steps
            head = f"{op} · {_steps_text(t.t0, t.t1)} · one task" + (f" · {timing}" if timing else "")
            lines.append(f"  subgraph {_q(cluster)} {{")
            lines.append(f'    label={_label(t.layer, head + bits)}; '
                         f'labeljust=l; style="rounded,filled"; fillcolor="{_lighter(fill)}"; color="{_darker(fill)}"; '
                         f'penwidth=1.4; fontsize=10; tooltip={_q(tip)};')
            if t.t0 is None:
                shown: List[Optional[int]] = [0]
            else:
                shown = list(range(k)) if k <= max_steps else list(range(max_steps - 2)) + [None, k - 1]
            ids = []
            for i in shown:
                nid = f"{t.name}#{'more' if i is None else i}"
                text = "…" if i is None else ("t=*" if t.t0 is None else f"t={t.t0 + i}")
                lines.append(f'    {_q(nid)} [label={_q(text)}, fillcolor="{fill}", fontsize=8, width=0.35, '
                             f'height=0.22, tooltip={_q(tip)}];')
                ids.append(nid)
            row = list(ids)
            for j, f in enumerate(fused):            # the work absorbed into this task, boxed with it
                fid = f"{t.name}#fused{j}"
                ffill = colors.get(f.module, _GRAY)
                what = describe.get(f"{t.name}#fused{j}", f.kind.replace("_", " "))
                lines.append(f'    {_q(fid)} [label={_label("+ " + f.module, what)}, fillcolor="{ffill}", '
                             f'fontsize=8, height=0.22, style="rounded,filled,dashed", '
                             f'tooltip={_q(f"{f.module} fused into {t.name} ({f.kind}); was task {f.task}")}];')
                row.append(fid)
            lines.append("    {rank=same; " + " ".join(_q(i) for i in row) + "}")
            for a, b in zip(row, row[1:]):          # steps in time order, left to right, then the fusions
                lines.append(f"    {_q(a)} -> {_q(b)} [style=invis];")
            lines.append("  }")
            anchor[t.name] = (ids[len(ids) // 2], cluster)
        else:
            shape = ', shape=ellipse' if t.kind in ("placeholder", "output") else ""
            why: List[str] = []
            note = notes.get(t.name, "")
            if t.kind == "opaque" and note and first_opaque.get(t.layer) == t.name:      # once per layer
                why = textwrap.wrap(shorten(note[len("opaque: "):] if note.startswith("opaque: ") else note, 120), 44)
            border = ', color="#d35400", penwidth=1.6' if t.kind == "opaque" and note else ""
            label = _label(t.layer, f"{op} · {_steps_text(t.t0, t.t1)}{bits}", *why, timing)
            lines.append(f'  {_q(t.name)} [label={label}, fillcolor="{fill}"{shape}{border}, tooltip={_q(tip)}];')
            anchor[t.name] = (t.name, None)
    for u, v, kind in graph.edges(data="kind"):
        (tu, cu), (tv, cv) = anchor[u], anchor[v]
        attrs = [_EDGE_STYLE.get(kind or "data", _EDGE_STYLE["data"])]
        if cu:
            attrs.append(f"ltail={_q(cu)}")
        if cv:
            attrs.append(f"lhead={_q(cv)}")
        if kind in ("state", "order"):
            attrs.append(f"xlabel={_q(kind)}, fontcolor=\"#7f8c8d\"")
            if kind == "state":
                attrs.append("constraint=true")
        lines.append(f"  {_q(tu)} -> {_q(tv)} [{', '.join(attrs)}];")
    lines.append("}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- (c) fx-level pass graphs
def _fx_key(name: str, d: Dict[str, Any], layer_of: Dict[str, str]) -> str:
    """The layer an fx node belongs to: its tag, else the tag the same node gets later, else its target."""
    if d.get("layer") is not None:
        return str(d["layer"])
    if name in layer_of:
        return layer_of[name]
    return str(d.get("target", name)) if d.get("op") == "call_module" else name


def fx_graph_dot(graph: nx.DiGraph, *, title: str = "", colors: Optional[Dict[str, str]] = None,
                 layer_of: Optional[Dict[str, str]] = None, max_nodes: int = 150) -> str:
    """DOT for an fx-level snapshot: one node per fx node (label: layer and timestep), clusters for the
    groups ``batch_over_time`` formed; above ``max_nodes``, one node per layer instead (a note says so)."""
    layer_of = layer_of or {}
    colors = dict(colors or {})
    keys = {n: _fx_key(n, d, layer_of) for n, d in graph.nodes(data=True)}
    for k in keys.values():
        if k not in colors:
            colors[k] = PALETTE[len(colors) % len(PALETTE)]
    head = ["digraph passgraph {",
            f'  graph [rankdir=TB, fontname="Helvetica", fontsize=12, nodesep=0.12, ranksep=0.25, labelloc=t, '
            f'label={_q(title)}];',
            '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=9, margin="0.05,0.02", '
            'height=0.22];',
            '  edge [color="#666666", arrowsize=0.5];']
    lines = list(head)
    if graph.number_of_nodes() > max_nodes:
        counts: Dict[str, int] = {}
        for n in graph.nodes:
            counts[keys[n]] = counts.get(keys[n], 0) + 1
        lines[1] = lines[1][:-2] + "];"
        for k, c in counts.items():
            lines.append(f'  {_q("L:" + k)} [label={_label(k, f"x{c} nodes")}, fillcolor="{colors[k]}"];')
        seen = set()
        for u, v in graph.edges:
            e = (keys[u], keys[v])
            if e[0] != e[1] and e not in seen:
                seen.add(e)
                lines.append(f'  {_q("L:" + e[0])} -> {_q("L:" + e[1])};')
        lines.append("}")
        return "\n".join(lines) + "\n"
    groups: Dict[Any, List[str]] = {}
    for n, d in graph.nodes(data=True):
        if "group" in d:
            groups.setdefault(d["group"], []).append(n)

    def node_line(n: str, indent: str = "  ") -> str:
        d = graph.nodes[n]
        t = d.get("t", "?") if "t" in d else None
        target = str(d.get("target", ""))
        top = keys[n] if d.get("op") != "call_module" or target == keys[n] else f"{keys[n]} ({target})"
        sub = "" if "t" not in d else ("t=*" if t is None else f"t={t}")
        shape = ", shape=ellipse" if d.get("op") in ("placeholder", "output") else ""
        tip = f"{n}: {d.get('op', '')} {target}"
        return (f'{indent}{_q(n)} [label={_label(top, sub)}, fillcolor="{colors.get(keys[n], _GRAY)}"{shape}, '
                f'tooltip={_q(tip)}];')

    in_cluster = set()
    for gid, members in groups.items():
        if len(members) < 2:
            continue
        key = keys[members[0]]
        fill = colors.get(key, _GRAY)
        lines.append(f"  subgraph {_q(f'cluster_g{gid}')} {{")
        lines.append(f'    label={_q(f"{key} x{len(members)}: one task")}; style="rounded,filled"; '
                     f'fillcolor="{_lighter(fill, 0.7)}"; color="{_darker(fill)}"; fontsize=9;')
        for n in sorted(members, key=lambda m: (graph.nodes[m].get("t") is None, graph.nodes[m].get("t") or 0)):
            lines.append(node_line(n, "    "))
            in_cluster.add(n)
        lines.append("  }")
    for n in graph.nodes:
        if n not in in_cluster:
            lines.append(node_line(n))
    for u, v in graph.edges:
        lines.append(f"  {_q(u)} -> {_q(v)};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _is_task_level(graph: nx.DiGraph) -> bool:
    return graph.number_of_nodes() > 0 and all("task" in d for _, d in graph.nodes(data=True))


def snapshot_dot(snap: Any, *, colors: Dict[str, str], layer_of: Dict[str, str], root: Optional[nn.Module] = None,
                 max_nodes: int = 150, fates: Optional[Dict[str, str]] = None) -> str:
    """DOT for one pass snapshot, task-level or fx-level."""
    g = snap.graph
    stats = ", ".join(f"{k}={v}" for k, v in snap.stats.items())
    n = g.number_of_nodes()
    collapsed = (not _is_task_level(g)) and n > max_nodes
    title = "\n".join(textwrap.wrap(f"after {snap.name}: {stats}", 60))
    if collapsed:
        title += f"\n({n} nodes > --max-nodes {max_nodes}: one node per layer)"
    if _is_task_level(g):
        describe = task_descriptions((d["task"] for _, d in g.nodes(data=True)), root, fates)
        notes = {n: (fates or {}).get(n, "") for n in g.nodes if g.nodes[n]["task"].kind in ("opaque", "neuron")}
        return task_dag_dot(g, title=title, describe=describe, colors=colors, notes=notes)
    return fx_graph_dot(g, title=title, colors=colors, layer_of=layer_of, max_nodes=max_nodes)


def layers_from_snapshots(snapshots: Sequence[Any]) -> Dict[str, str]:
    """fx node name -> layer, from the first snapshot that tags layers (names persist across fx passes),
    so graphs drawn before tagging get the same colours."""
    for s in snapshots:
        if not _is_task_level(s.graph) and any("layer" in d for _, d in s.graph.nodes(data=True)):
            return {n: str(d["layer"]) for n, d in s.graph.nodes(data=True) if d.get("layer") is not None}
    return {}


# --------------------------------------------------------------------------- (b) the timeline
@dataclass
class Bar:
    """One bar of the timeline: a task on a lane, from ``start`` for ``dur`` (ms)."""

    row: str
    label: str
    layer: str
    start: float
    dur: float
    tooltip: str


def estimate_ms(task: Any, row: TaskRow, root: Optional[nn.Module]) -> float:
    """A rough cost from shapes: 2 FLOP per MAC for conv/linear at EST_FLOPS, bytes moved at EST_BYTES.

    Only for drawing a schedule before (or instead of) timing it; the picture labels it as an estimate.
    """
    out_numel = sum(math.prod(s) for s in row.out_shape)
    macs = 0
    m = None
    if task.kind == "module" and root is not None and isinstance(task.target, str):
        try:
            m = root.get_submodule(task.target)
        except AttributeError:
            m = None
    if isinstance(m, nn.modules.conv._ConvNd):
        macs = out_numel * (m.in_channels // m.groups) * math.prod(m.kernel_size)
    elif isinstance(m, nn.Linear):
        macs = out_numel * m.in_features
    moved = row.out_bytes * (3 if task.kind == "neuron" else 2)
    return (2 * macs / EST_FLOPS + moved / EST_BYTES) * 1e3


def planned_bars(rows: List[TaskRow], durations: Dict[str, float]) -> List[Bar]:
    """The wavefront plan: wave w starts when wave w-1's longest task ends; task i of a wave on lane i."""
    by_wave: Dict[int, List[TaskRow]] = {}
    for r in rows:
        by_wave.setdefault(r.wave, []).append(r)
    bars, t = [], 0.0
    for w in sorted(by_wave):
        longest = 0.0
        for r in by_wave[w]:
            d = durations.get(r.name, 0.0)
            bars.append(Bar(f"stream {r.lane} (planned)", r.layer if r.t0 is None else f"{r.layer} {_steps_text(r.t0, r.t1)[2:]}",
                            r.layer, t, d, f"{r.name}: {r.op}, {_steps_text(r.t0, r.t1)}, wave {w}, lane {r.lane}, "
                                           f"{_ms(d)}"))
            longest = max(longest, d)
        t += longest
    return bars


def measured_bars(prof: Any, rows: List[TaskRow]) -> List[Bar]:
    """The median profiled run as it happened: forward tasks on one row, backward autograd nodes on another."""
    run = median_run(prof)
    if run is None:
        return []
    by = {r.name: r for r in rows}
    bars = []
    for name, (s, e) in run.fwd.items():
        r = by.get(name)
        if r is None:
            continue
        bars.append(Bar("CPU forward (measured)", r.layer, r.layer, s * 1e3, (e - s) * 1e3,
                        f"{name}: {r.op}, forward {_ms((e - s) * 1e3)}"))
    for name, spans in run.bwd.items():
        r = by.get(name)
        if r is None:
            continue
        for s, e, node in spans:
            bars.append(Bar("CPU backward (measured)", r.layer, r.layer, s * 1e3, (e - s) * 1e3,
                            f"{name} backward: {node}, {_ms((e - s) * 1e3)}"))
    return bars


def _nice_step(span: float, target_ticks: int = 8) -> float:
    raw = span / max(target_ticks, 1)
    mag = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1.0
    for m in (1, 2, 5, 10):
        if raw <= m * mag:
            return m * mag
    return 10 * mag


def timeline_svg(bars: List[Bar], colors: Dict[str, str], title: str, unit_note: str, width: int = 1320) -> str:
    """A self-contained SVG Gantt chart: one row per lane, one bar per task (tooltips via <title>)."""
    rows: List[str] = []
    for b in bars:
        if b.row not in rows:
            rows.append(b.row)
    left, right, top, row_h, bar_h = 170, 20, 46, 30, 22
    plot_w = width - left - right
    end = max((b.start + b.dur for b in bars), default=1.0) or 1.0
    height = top + row_h * len(rows) + 44
    scale = plot_w / end
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="Helvetica, Arial, sans-serif" font-size="11">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="8" y="18" font-size="13" font-weight="bold">{html.escape(title)}</text>',
           f'<text x="8" y="35" fill="#555">{html.escape(unit_note)}</text>']
    step = _nice_step(end)
    tick = 0.0
    while tick <= end * 1.0001:
        x = left + tick * scale
        out.append(f'<line x1="{x:.1f}" y1="{top - 4}" x2="{x:.1f}" y2="{top + row_h * len(rows)}" stroke="#eee"/>')
        out.append(f'<text x="{x:.1f}" y="{top + row_h * len(rows) + 14}" text-anchor="middle" fill="#555">'
                   f'{tick:g}</text>')
        tick += step
    out.append(f'<text x="{left + plot_w / 2:.0f}" y="{top + row_h * len(rows) + 32}" text-anchor="middle" '
               f'fill="#333">ms</text>')
    for i, row in enumerate(rows):
        y = top + i * row_h
        out.append(f'<text x="{left - 8}" y="{y + row_h / 2 + 4:.1f}" text-anchor="end">{html.escape(row)}</text>')
        out.append(f'<line x1="{left}" y1="{y + row_h}" x2="{left + plot_w}" y2="{y + row_h}" stroke="#ddd"/>')
    for b in bars:
        i = rows.index(b.row)
        x, w = left + b.start * scale, max(b.dur * scale, 1.0)
        y = top + i * row_h + (row_h - bar_h) / 2
        fill = colors.get(b.layer, _GRAY)
        out.append(f'<g><title>{html.escape(b.tooltip)}</title>'
                   f'<rect x="{x:.1f}" y="{y:.1f}" width="{w:.1f}" height="{bar_h}" rx="3" fill="{fill}" '
                   f'stroke="{_darker(fill)}" stroke-width="0.8"/>')
        if w > 6.2 * len(b.label) + 6:
            out.append(f'<text x="{x + w / 2:.1f}" y="{y + bar_h / 2 + 4:.1f}" text-anchor="middle">'
                       f'{html.escape(b.label)}</text>')
        out.append("</g>")
    out.append("</svg>")
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- the page
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:18px 24px;color:#222;background:#fafafa}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:22px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
.sub{color:#555;margin-bottom:12px} .note{color:#555;font-size:13px;margin:4px 0 8px}
.warn{background:#fff4e5;border:1px solid #f0b45a;padding:8px 10px;border-radius:6px;font-size:13px}
table{border-collapse:collapse;font-size:13px;background:white} td,th{border:1px solid #ddd;padding:3px 8px;text-align:left}
th{background:#f0f0f0} td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap} td.nw{white-space:nowrap}
.facts{display:grid;grid-template-columns:repeat(auto-fill,minmax(190px,1fr));gap:6px;margin:8px 0 4px}
.fact{background:white;border:1px solid #ddd;border-radius:6px;padding:6px 10px}
.fact b{display:block;font-size:18px} .fact span{color:#666;font-size:12px}
.row{display:flex;gap:18px;align-items:flex-start;flex-wrap:wrap}
.card{background:white;border:1px solid #ddd;border-radius:8px;padding:8px;overflow:auto}
.card svg{max-width:100%;height:auto;display:block;margin:auto}
.passes{display:grid;grid-template-columns:repeat(auto-fill,minmax(420px,1fr));gap:12px}
.passes .card svg{max-height:760px}
.legend span{display:inline-block;margin-right:14px;font-size:13px}
.sw{display:inline-block;width:12px;height:12px;border-radius:3px;vertical-align:-1px;margin-right:4px;border:1px solid #0003}
pre{background:#f4f4f4;border:1px solid #ddd;padding:8px;font-size:11px;max-height:360px;overflow:auto}
"""


def _svg_inline(src: str, dot_ok: bool) -> str:
    """dot's SVG without the XML prologue (for inlining), or the DOT source as text when dot is missing."""
    if not dot_ok:
        return f"<pre>{html.escape(src)}</pre>"
    try:
        svg = render_dot(src, "svg").decode()
    except DotMissing as exc:
        return f'<p class="warn">{html.escape(str(exc))}</p><pre>{html.escape(src)}</pre>'
    return svg[svg.find("<svg"):]


def layer_fates(tg: Any, root: Optional[nn.Module], fates: Dict[str, str]) -> List[Tuple[str, str, str]]:
    """(layer, class, fate) per layer in program order, modules fused into a task included: the table of
    ``snncc.explain`` without the measurements."""
    out: Dict[str, Tuple[str, List[str]]] = {}
    for t in sorted(tg.tasks(), key=lambda t: t.order):
        if t.kind in ("placeholder", "get_attr", "output"):
            continue
        cls = module_class(root, t.target) if t.kind in ("module", "neuron", "opaque") else \
            getattr(t.target, "__name__", str(t.target))
        entry = out.setdefault(t.layer, (cls, []))
        fate = fates.get(t.name)
        if fate and fate not in entry[1]:
            entry[1].append(fate)
        for j, f in enumerate(t.fused):
            fe = out.setdefault(f.module, (module_class(root, f.module), []))
            ff = fates.get(f"{t.name}#fused{j}")
            if ff and ff not in fe[1]:
                fe[1].append(ff)
    return [(layer, cls, "; ".join(fs)) for layer, (cls, fs) in out.items()]


def build_page(meta: Dict[str, Any], facts: List[Tuple[str, str]], snapshots: Sequence[Any], dag_dot: str,
               timeline: str, pass_dots: List[Tuple[str, str]], rows: List[TaskRow], colors: Dict[str, str],
               dot_ok: bool, layers: Optional[List[Tuple[str, str, str]]] = None) -> str:
    """The self-contained HTML page (inline SVG and CSS only: it opens offline, attaches to an issue)."""
    e = html.escape
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>snncc-viz: {e(meta['model'])}</title><style>{_CSS}</style></head><body>",
             f"<h1>snncc-viz &mdash; {e(meta['model'])}</h1>",
             f'<div class="sub">{e(meta["subtitle"])}</div>']
    if not dot_ok:
        parts.append(f'<p class="warn">{e(DOT_HELP)}. The graphs below are DOT sources: save one as FILE.dot '
                     f'and run <code>dot -Tsvg FILE.dot -o FILE.svg</code>.</p>')
    parts.append('<div class="facts">' + "".join(f'<div class="fact"><b>{e(v)}</b><span>{e(k)}</span></div>'
                                                 for k, v in facts) + "</div>")
    legend = " ".join(f'<span><i class="sw" style="background:{c}"></i>{e(layer)}</span>' for layer, c in colors.items())
    parts.append('<div class="card"><h2 style="margin-top:0">Schedule timeline</h2>'
                 f'<div class="note">{e(meta["timeline_note"])}</div>{timeline}'
                 f'<div class="legend">{legend}</div></div>')
    parts.append('<div class="row" style="margin-top:14px">')
    parts.append('<div class="card" style="flex:0 1 520px"><h2 style="margin-top:0">Task DAG</h2>'
                 '<div class="note">one node per task, coloured by layer; a box = one task over several timesteps '
                 '(batched / neuron scan); edges: data (solid), state (dashed red), order (dotted)</div>'
                 + _svg_inline(dag_dot, dot_ok) + "</div>")
    parts.append('<div style="flex:1 1 560px;min-width:0">')
    parts.append('<div class="card"><h2 style="margin-top:0">Pass snapshots</h2><table>'
                 "<tr><th>#</th><th>pass</th><th>what it recorded</th><th>graph</th></tr>")
    for i, s in enumerate(snapshots):
        stats = ", ".join(f"{k}={v}" for k, v in s.stats.items())
        parts.append(f"<tr><td>{i}</td><td>{e(s.name)}</td><td>{e(stats)}</td>"
                     f"<td>{s.graph.number_of_nodes()} nodes, {s.graph.number_of_edges()} edges</td></tr>")
    parts.append("</table></div>")
    if layers:
        parts.append('<div class="card" style="margin-top:14px"><h2 style="margin-top:0">What became of each '
                     'layer</h2><div class="note">as <code>snncc.explain(model, x)</code> prints it: compiled '
                     'neurons (built-in kernel or generated from their step code), fused, batched over time, '
                     'or opaque and why</div><table><tr><th>layer</th><th>class</th><th>fate</th></tr>')
        for layer, cls, fate in layers:
            sw = f'<i class="sw" style="background:{colors.get(layer, _GRAY)}"></i>'
            style = ' style="background:#fff4e5"' if fate.startswith("opaque") else ""
            parts.append(f"<tr{style}><td class=nw>{sw}{e(layer)}</td><td>{e(cls)}</td><td>{e(fate)}</td></tr>")
        parts.append("</table></div>")
    parts.append('<div class="card" style="margin-top:14px"><h2 style="margin-top:0">Tasks</h2><table>'
                 "<tr><th>task</th><th>layer</th><th>op</th><th>steps</th><th>wave/lane</th><th>fwd</th>"
                 "<th>bwd</th><th>spike rate</th><th>output</th></tr>")
    for r in rows:
        sw = f'<i class="sw" style="background:{colors.get(r.layer, _GRAY)}"></i>'
        parts.append(f"<tr><td>{e(r.name)}</td><td class=nw>{sw}{e(r.layer)}</td><td>{e(r.op)}</td>"
                     f"<td class=nw>{e(_steps_text(r.t0, r.t1))}</td><td class=num>{r.wave}/{r.lane}</td>"
                     f"<td class=num>{e(_ms(r.fwd_ms) if meta['measured'] else '')}</td>"
                     f"<td class=num>{e(_ms(r.bwd_ms))}</td>"
                     f"<td class=num>{'' if r.spike_rate is None else f'{r.spike_rate:.3f}'}</td>"
                     f"<td>{e(' '.join('x'.join(map(str, s)) for s in r.out_shape))}</td></tr>")
    parts.append("</table></div></div></div>")
    parts.append("<h2>The graph after each pass</h2>"
                 '<div class="note">from <code>Compiled.snapshots</code> (snncc/pipeline.py), in pipeline order; '
                 "fx-level graphs: one node per fx node (layer, timestep), boxes = the groups batch_over_time "
                 "made into one task</div><div class=\"passes\">")
    for name, src in pass_dots:
        parts.append(f'<div class="card"><b>{e(name)}</b>{_svg_inline(src, dot_ok)}</div>')
    parts.append("</div>")
    parts.append(f'<p class="note">generated by snncc-viz on {e(meta["date"])} &middot; snncc {e(meta["snncc"])} '
                 f"&middot; torch {e(meta['torch'])}</p></body></html>")
    return "\n".join(parts) + "\n"


# --------------------------------------------------------------------------- entry point
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="snncc-viz", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_args(ap)
    ap.add_argument("-o", "--output", default="snncc-viz.html",
                    help="output file; its extension picks the format: .html (default snncc-viz.html), .svg, "
                         ".png, .dot")
    ap.add_argument("--view", default="dag",
                    help="for .svg/.png/.dot: dag (default), timeline (.svg only) or a pass name")
    ap.add_argument("--list-views", action="store_true", help="print the views (pass names) and exit")
    ap.add_argument("--time", choices=("measured", "estimated"), default="measured",
                    help="timeline x: measured task times (default) or an estimate from shapes")
    ap.add_argument("--repeat", type=int, default=3, help="measured runs (medians; default 3, after 1 warm-up)")
    ap.add_argument("--eval", action="store_true", help="compile and draw the model in eval() mode")
    ap.add_argument("--max-nodes", type=int, default=150,
                    help="fx-level pass graphs with more nodes are drawn one node per layer (default 150)")
    return ap


def _say(msg: str) -> None:
    print(f"snncc-viz: {msg}", file=sys.stderr)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run snncc-viz; returns the exit status (0 written; 1 the model failed, or the requested picture needs
    dot, whose source was written instead; 2 bad arguments or model spec)."""
    args = build_parser().parse_args(argv)
    out = args.output
    ext = os.path.splitext(out)[1].lower()
    if ext not in (".html", ".htm", ".svg", ".png", ".dot", ".gv"):
        _say(f"-o {out}: unknown extension {ext or '(none)'}; use .html, .svg, .png or .dot")
        return 2
    try:
        w = workload_from_args(args)
    except ModelSpecError as exc:
        _say(str(exc))
        return 2
    cm = w.compile()
    train = not args.eval
    x = w.make_input()
    measured = args.time == "measured"
    if args.list_views:
        cm.train(train)
        print("\n".join(["dag", "timeline"] + [s.name for s in cm.specialize(x).snapshots]))
        return 0
    try:
        prof, compiled = profile_compiled(cm, x, runs=max(1, args.repeat) if measured else 1,
                                          warmup=1 if measured else 0, train=train,
                                          backward=train and measured)
    except snncc.SNNCCError as exc:
        _say(f"{w.spec}: compiling or running the model failed: {exc}")
        return 1
    rows = task_rows(prof, compiled)
    fates = task_fates(cm, x)                  # snncc.explain's words: kernels, fusions, opaque reasons
    annotate_fates(rows, fates)
    root = getattr(compiled.traced, "root", None)
    tg = compiled.task_graph
    describe = task_descriptions(tg.tasks(), root, fates)
    notes = {t.name: fates.get(t.name, "") for t in tg.tasks() if t.kind in ("opaque", "neuron")}
    wave, lane = planned_lanes(compiled.schedule)
    layer_of = layers_from_snapshots(compiled.snapshots)
    colors = layer_colors(list(layer_of.values()) + [r.layer for r in rows])     # program order first
    if measured:
        durations = {r.name: r.fwd_ms for r in rows}
        unit_note = (f"x = measured forward time per task (median of {max(1, args.repeat)} runs, "
                     f"{'training' if train else 'eval'} mode, {w.device}); planned lanes use these durations")
    else:
        durations = {r.name: estimate_ms(tg.task(r.name), r, root) for r in rows}
        unit_note = (f"x = ESTIMATED time from shapes (2 FLOP/MAC at {EST_FLOPS / 1e9:.0f} GFLOP/s for conv/linear, "
                     f"bytes moved at {EST_BYTES / 1e9:.0f} GB/s otherwise), not measured")
    bars = planned_bars(rows, durations) + (measured_bars(prof, rows) if measured else [])
    width = max(len(ws) for ws in compiled.schedule.waves) if compiled.schedule.waves else 0
    timeline = timeline_svg(bars, colors, f"schedule '{compiled.schedule.policy}': {len(compiled.schedule.waves)} "
                                          f"waves, up to {width} task(s) per wave", unit_note)
    n_batched = sum(1 for t in tg.tasks() if t.batched)
    title = (f"{w.spec}: {len(tg)} tasks ({n_batched} batched over time), "
             f"{len(compiled.schedule.waves)} waves")
    dag = task_dag_dot(tg.graph, title=title, describe=describe, colors=colors,
                       times=durations if measured else None, waves=wave, lanes=lane, notes=notes)
    pass_dots = [(s.name, snapshot_dot(s, colors=colors, layer_of=layer_of, root=root,
                                       max_nodes=args.max_nodes, fates=fates)) for s in compiled.snapshots]
    dot_ok = find_dot() is not None
    if ext in (".html", ".htm"):
        edges = {k: sum(1 for _ in tg.edges(k)) for k in ("data", "state", "order")}
        facts = [("model", type(w.model).__name__), ("form", w.form), ("T (timesteps)", str(w.T)),
                 ("batch", str(w.batch)), ("input", "x".join(map(str, x.shape))), ("tasks", str(len(tg))),
                 ("batched tasks", str(n_batched)), ("waves", str(len(compiled.schedule.waves))),
                 ("edges data/state/order", f"{edges['data']}/{edges['state']}/{edges['order']}"),
                 ("mode", "train" if train else "eval")]
        if measured and prof.runs:
            fwd = sorted(r.forward_wall for r in prof.runs)[len(prof.runs) // 2] * 1e3
            facts.append(("forward (measured)", _ms(fwd)))
        meta = {"model": w.spec, "date": datetime.datetime.now().isoformat(timespec="seconds"),
                "snncc": getattr(snncc, "__version__", "?"), "torch": torch.__version__, "measured": measured,
                "subtitle": f"{type(w.model).__name__}, compiled in the {w.form} form, T={w.T}, batch={w.batch}, "
                            f"{w.dtype}, {w.device}, {torch.get_num_threads()} threads",
                "timeline_note": "lanes = planned streams (task i of a wave -> stream i); the CPU runtime runs "
                                 "one stream" + ("; the measured rows show one real run as it happened, the median of the "
                                                  "profiled runs (gaps: executor and profiler work between "
                                                  "tasks)" if measured else "")}
        plan = memory_plan_of(cm)
        layers = layer_fates(tg, root, fates)
        if plan is not None:      # what each neuron layer keeps for backward (passes/plan_memory.py)
            facts.append(("memory plan", f"{plan.mode}: {sum(p.keep != 'h' for p in plan.layers)}/"
                                         f"{len(plan.layers)} scans recompute, {plan.kept_bytes / 2 ** 20:.1f} MiB kept"))
            notes_m = memory_notes(plan)
            layers = [(layer, cls, f"{fate}; {notes_m[layer]}" if layer in notes_m else fate)
                      for layer, cls, fate in layers]
        page = build_page(meta, facts, compiled.snapshots, dag, timeline, pass_dots, rows, colors, dot_ok,
                          layers=layers)
        with open(out, "w", encoding="utf-8") as f:
            f.write(page)
        _say(f"wrote {out}" + ("" if dot_ok else f" (graphs as DOT text: {DOT_HELP})"))
        return 0
    view = args.view
    names = {s.name: src for s, (_, src) in zip(compiled.snapshots, pass_dots)}
    if view == "timeline":
        if ext != ".svg":
            _say(f"--view timeline is drawn as SVG only; use -o {os.path.splitext(out)[0]}.svg (or .html)")
            return 2
        with open(out, "w", encoding="utf-8") as f:
            f.write(timeline)
        _say(f"wrote {out}")
        return 0
    if view == "dag":
        src = dag
    elif view in names:
        src = names[view]
    else:
        _say(f"--view {view!r}: choose dag, timeline or a pass: {', '.join(names)}")
        return 2
    if ext in (".dot", ".gv"):
        with open(out, "w", encoding="utf-8") as f:
            f.write(src)
        _say(f"wrote {out}; render with: dot -Tsvg {out} -o {os.path.splitext(out)[0]}.svg")
        return 0
    fmt = ext[1:]
    try:
        data = render_dot(src, fmt)
    except DotMissing as exc:
        dot_path = os.path.splitext(out)[0] + ".dot"
        with open(dot_path, "w", encoding="utf-8") as f:
            f.write(src)
        _say(f"cannot write {out}: {exc}\nwrote the DOT source to {dot_path} instead; once graphviz is "
             f"installed: dot -T{fmt} {dot_path} -o {out}")
        return 1
    with open(out, "wb") as f:
        f.write(data)
    _say(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
