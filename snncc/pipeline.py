"""The pass pipeline, in order, in one function: read it top to bottom to know what snncc does.

Every pass is a plain function from ``snncc.passes``; with ``verify=True`` the verifier runs after each
pass that produces a graph, and every pass's result is summarized in ``snapshots`` (for snncc-viz and for
tests that check what a pass did).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Tuple

from snncc import passes
from .frontend import Traced
from .ir import Schedule, TaskGraph
from .verify import verify_schedule, verify_task_graph

__all__ = ["Compiled", "compile_graph"]


@dataclass
class Compiled:
    """What the pipeline produced for one specialization."""

    traced: Traced
    task_graph: TaskGraph
    schedule: Schedule
    snapshots: List[Tuple[str, Dict[str, Any]]] = field(default_factory=list)


def compile_graph(traced: Traced, verify: bool = False) -> Compiled:
    """Unrolled fx graph -> TaskGraph -> Schedule."""
    snaps: List[Tuple[str, Dict[str, Any]]] = [("trace", {"nodes": len(traced.graph.nodes)})]
    # 1. Hoist: CSE on the unrolled graph, so work on static inputs (the first conv) runs once.
    traced, merged = passes.hoist_time_invariant(traced)
    snaps.append(("hoist_time_invariant", {"nodes": len(traced.graph.nodes), "merged": merged}))
    # 2. Tag: every node gets its timestep (None = time-invariant) and its layer.
    tags = passes.tag_timesteps(traced)
    snaps.append(("tag_timesteps", {"timesteps": len({t.t for t in tags.values() if t.t is not None}),
                                    "layers": len({t.layer for t in tags.values()})}))
    # 3. Batch: the T copies of a stateless op become one op over [T*N, ...]; a neuron's calls one scan.
    groups = passes.batch_over_time(traced, tags)
    snaps.append(("batch_over_time", {"groups": len(groups),
                                      "batched": sum(g.kind != "single" for g in groups)}))
    # 4. Build: groups -> tasks in a networkx DAG with data, state and order edges.
    tg = passes.build_task_graph(traced, tags, groups)
    if verify:
        verify_task_graph(tg, "build_task_graph")
    snaps.append(("build_task_graph", tg.summary()))
    # 5. Schedule: layer-major order (one chunk K = T per layer) and its independent waves.
    schedule = passes.schedule_layer_major(tg)
    if verify:
        verify_schedule(tg, schedule)
    snaps.append(("schedule_layer_major", {"tasks": len(schedule.order), "waves": len(schedule.waves)}))
    return Compiled(traced, tg, schedule, snaps)
