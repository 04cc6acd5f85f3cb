"""schedule_layer_major: order the TaskGraph for execution, one layer's chunk after another.

Requires: an acyclic TaskGraph. Guarantees: a Schedule whose order is a topological order of the graph
(ties broken by program order, so a layer's chunk runs as soon as its inputs exist) and whose waves are the
graph's topological generations: tasks of one wave are independent, the unit a stream runtime overlaps.
With one chunk per layer (K = T) this is the layer-major schedule, best for big batches.
"""
from __future__ import annotations

import networkx as nx

from snncc.ir import Schedule, TaskGraph

__all__ = ["schedule_layer_major", "schedule_wavefront"]


def schedule_layer_major(tg: TaskGraph) -> Schedule:
    """Topological order by program order, plus the waves (see the module docstring)."""
    g = tg.graph
    order = tuple(nx.lexicographical_topological_sort(g, key=lambda n: (g.nodes[n]["task"].order, n)))
    waves = tuple(tuple(sorted(w, key=lambda n: g.nodes[n]["task"].order)) for w in nx.topological_generations(g))
    return Schedule(order=order, waves=waves, policy="layer_major")


def schedule_wavefront(tg: TaskGraph) -> Schedule:
    """Wave after wave: the anti-diagonals of a chunked (layer x time-chunk) graph, so chunk c of layer l
    runs beside chunk c+1 of layer l-1; within a wave, program order. With one chunk per layer this is the
    layer-major schedule's set of waves run in the same order."""
    g = tg.graph
    waves = tuple(tuple(sorted(w, key=lambda n: (g.nodes[n]["task"].order, n)))
                  for w in nx.topological_generations(g))
    order = tuple(n for w in waves for n in w)
    return Schedule(order=order, waves=waves, policy="wavefront")
