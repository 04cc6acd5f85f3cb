"""Invariant checks run after passes (always in tests, on demand with ``verify=True``).

Each check raises :class:`VerificationError` naming the pass whose output broke the invariant.
"""
from __future__ import annotations

from typing import Any, Iterator

import networkx as nx

from .errors import SNNCCError
from .ir import Ref, Schedule, SliceConst, Steps, TaskGraph

__all__ = ["VerificationError", "verify_task_graph", "verify_schedule", "iter_refs"]


class VerificationError(SNNCCError):
    """A pass produced an invalid graph or schedule (a bug in snncc: please report it)."""


def iter_refs(a: Any) -> Iterator[Ref]:
    """Every Ref inside a task argument."""
    if isinstance(a, Ref):
        yield a
    elif isinstance(a, Steps):
        yield from a.refs
    elif isinstance(a, SliceConst):
        for x in (a.start, a.stop, a.step):
            yield from iter_refs(x)
    elif isinstance(a, tuple):
        for x in a:
            yield from iter_refs(x)


def verify_task_graph(tg: TaskGraph, after: str = "build_task_graph") -> None:
    """Acyclic; every Ref names an existing task and a step it produces, with a data edge; state edges
    link chunks of one layer in time order; exactly one output."""
    g = tg.graph
    if not nx.is_directed_acyclic_graph(g):
        raise VerificationError(f"after {after}: task graph has a cycle: {nx.find_cycle(g)}")
    if tg.output is None or tg.output not in g:
        raise VerificationError(f"after {after}: no output task")
    for task in tg.tasks():
        for ref in iter_refs((task.args, task.kwargs)):
            if ref.task not in g:
                raise VerificationError(f"after {after}: {task.name} reads missing task {ref.task}")
            src = tg.task(ref.task)
            if not g.has_edge(ref.task, task.name):
                raise VerificationError(f"after {after}: {task.name} reads {ref.task} without an edge")
            if (ref.step is None) == src.batched:
                raise VerificationError(f"after {after}: {task.name} reads {ref} but {src.name} is "
                                        f"{'batched' if src.batched else 'not batched'}")
            if ref.step is not None and not 0 <= ref.step < len(src.nodes):
                raise VerificationError(f"after {after}: {task.name} reads step {ref.step} of {src.name}")
    for u, v in tg.edges("state"):
        a, b = tg.task(u), tg.task(v)
        if a.target != b.target:
            raise VerificationError(f"after {after}: state edge {u} -> {v} joins different layers")
        if a.t1 is not None and b.t0 is not None and a.t1 > b.t0:
            raise VerificationError(f"after {after}: state edge {u} -> {v} goes back in time")


def verify_schedule(tg: TaskGraph, schedule: Schedule) -> None:
    """The schedule runs every task once, after all its predecessors."""
    pos = {n: i for i, n in enumerate(schedule.order)}
    if set(pos) != set(tg.graph.nodes) or len(pos) != len(schedule.order):
        raise VerificationError("schedule does not run every task exactly once")
    for u, v in tg.graph.edges:
        if pos[u] >= pos[v]:
            raise VerificationError(f"schedule runs {v} before its input {u}")
