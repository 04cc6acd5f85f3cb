"""The pass pipeline, in order, in one function: read it top to bottom to know what snncc does.

Every pass is a plain function from ``snncc.passes``; with ``verify=True`` the verifier runs after each
pass that produces a graph, and every pass's result is summarized in ``snapshots`` (for snncc-viz and for
tests that check what a pass did).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Tuple

import networkx as nx
import torch.fx as fx

from snncc import passes
from .config import Options
from .frontend import Traced
from .ir import Schedule, TaskGraph
from .verify import verify_schedule, verify_task_graph

__all__ = ["Compiled", "Snapshot", "compile_graph"]


@dataclass(frozen=True)
class Snapshot:
    """What one pass left behind: its name, counts, and the graph it produced (for snncc-viz and tests).

    ``graph`` is a ``networkx.DiGraph`` whose nodes carry readable attributes: for the fx-level passes one
    node per fx node (``op``, ``target``, and after tagging ``t`` and ``layer``; after batching ``group``),
    for the task-level passes the TaskGraph itself (``task`` on nodes, ``kind`` on edges; after scheduling
    ``wave`` on nodes).
    """

    name: str
    stats: Dict[str, Any]
    graph: nx.DiGraph


def _fx_graph(graph: fx.Graph, tags: Optional[Dict[str, Any]] = None,
              groups: Optional[Iterable[Any]] = None) -> nx.DiGraph:
    """The fx graph as a networkx DiGraph of readable attributes (no tensors kept alive)."""
    group_of: Dict[str, int] = {}
    for i, g in enumerate(groups or ()):
        for n in g.nodes:
            group_of[n] = i
    g = nx.DiGraph()
    for n in graph.nodes:
        attrs: Dict[str, Any] = {"op": n.op, "target": n.target if isinstance(n.target, str)
                                 else getattr(n.target, "__name__", str(n.target))}
        if tags is not None and n.name in tags:
            attrs["t"], attrs["layer"] = tags[n.name].t, tags[n.name].layer
        if n.name in group_of:
            attrs["group"] = group_of[n.name]
        g.add_node(n.name, **attrs)
        for a in n.all_input_nodes:
            g.add_edge(a.name, n.name)
    return g


@dataclass
class Compiled:
    """What the pipeline produced for one specialization."""

    traced: Traced
    task_graph: TaskGraph
    schedule: Schedule
    snapshots: List[Snapshot] = field(default_factory=list)

    def snapshot(self, name: str) -> Snapshot:
        """The snapshot a pass recorded, by pass name."""
        for s in self.snapshots:
            if s.name == name:
                return s
        raise KeyError(f"no snapshot named {name!r}; have {[s.name for s in self.snapshots]}")


def compile_graph(traced: Traced, verify: bool = False, options: Options = Options()) -> Compiled:
    """Unrolled fx graph -> TaskGraph -> Schedule."""
    snaps: List[Snapshot] = [Snapshot("trace", {"nodes": len(traced.graph.nodes)}, _fx_graph(traced.graph))]
    # 1. Hoist: CSE on the unrolled graph, so work on static inputs (the first conv) runs once.
    traced, merged = passes.hoist_time_invariant(traced)
    snaps.append(Snapshot("hoist_time_invariant", {"nodes": len(traced.graph.nodes), "merged": merged},
                          _fx_graph(traced.graph)))
    # 1b. Fold: a power-of-two scale of a matmul's product onto its smaller operand (exact).
    traced, folded = passes.fold_matmul_scale(traced)
    snaps.append(Snapshot("fold_matmul_scale", {"nodes": len(traced.graph.nodes), "folded": folded},
                          _fx_graph(traced.graph)))
    # 2. Tag: every node gets its timestep (None = time-invariant) and its layer.
    tags = passes.tag_timesteps(traced)
    snaps.append(Snapshot("tag_timesteps", {"timesteps": len({t.t for t in tags.values() if t.t is not None}),
                                            "layers": len({t.layer for t in tags.values()})},
                          _fx_graph(traced.graph, tags)))
    # 3. Batch: the T copies of a stateless op become one op over [T*N, ...]; a neuron's calls one scan.
    groups = passes.batch_over_time(traced, tags, options.chunk)
    snaps.append(Snapshot("batch_over_time", {"groups": len(groups),
                                              "batched": sum(g.kind != "single" for g in groups)},
                          _fx_graph(traced.graph, tags, groups)))
    # 4. Build: groups -> tasks in a networkx DAG with data, state and order edges.
    tg = passes.build_task_graph(traced, tags, groups)
    if verify:
        verify_task_graph(tg, "build_task_graph")
    snaps.append(Snapshot("build_task_graph", tg.summary(), tg.graph.copy()))
    if options.fuse:
        # 5. Fuse: max pools of spikes into their neuron's kernel; eval BatchNorm into the conv's weights.
        tg = passes.fuse_conv_bn_neuron(tg, traced)
        if verify:
            verify_task_graph(tg, "fuse_conv_bn_neuron")
        snaps.append(Snapshot("fuse_conv_bn_neuron", dict(tg.summary(), fused=sum(len(t.fused) for t in tg.tasks())),
                              tg.graph.copy()))
    if options.bitpack:
        # 6. Bitpack: convs/linears fed by spikes keep their input for backward as 1 bit per element.
        tg = passes.insert_bitpack(tg, traced)
        if verify:
            verify_task_graph(tg, "insert_bitpack")
        snaps.append(Snapshot("insert_bitpack", {"packed_inputs": sum(t.spike_input for t in tg.tasks())},
                              tg.graph.copy()))
    # 7. Schedule: layer-major (one chunk K = T per layer) or, with chunks, wavefront; plus the waves.
    chunked = options.chunk is not None and any(
        t.batched and t.t0 is not None and t.t0 > 0 for t in tg.tasks())
    schedule = passes.schedule_wavefront(tg) if chunked else passes.schedule_layer_major(tg)
    if verify:
        verify_schedule(tg, schedule)
    waved = tg.graph.copy()
    for i, wave in enumerate(schedule.waves):
        for name in wave:
            waved.nodes[name]["wave"] = i
    snaps.append(Snapshot(f"schedule_{schedule.policy}", {"tasks": len(schedule.order), "waves": len(schedule.waves)},
                          waved))
    return Compiled(traced, tg, schedule, snaps)
