"""Helpers the task-graph rewrites share: renaming refs, absorbing one task into another."""
from __future__ import annotations

import dataclasses
from typing import Any, Dict

from snncc.ir import Ref, SliceConst, Steps, Task, TaskGraph

__all__ = ["rename_refs", "absorb", "consumers"]


def rename_refs(a: Any, old: str, new: str) -> Any:
    """``a`` with every ``Ref(old, i)`` replaced by ``Ref(new, i)``."""
    if isinstance(a, Ref):
        return Ref(new, a.step) if a.task == old else a
    if isinstance(a, Steps):
        return Steps(tuple(rename_refs(r, old, new) for r in a.refs))
    if isinstance(a, SliceConst):
        return SliceConst(*(rename_refs(x, old, new) for x in (a.start, a.stop, a.step)))
    if isinstance(a, tuple):
        return tuple(rename_refs(x, old, new) for x in a)
    return a


def consumers(tg: TaskGraph, name: str) -> list:
    """Tasks with a data edge from ``name``."""
    return [v for _, v, k in tg.graph.out_edges(name, data="kind") if k == "data"]


def absorb(tg: TaskGraph, into: Task, gone: Task) -> TaskGraph:
    """A copy of ``tg`` where ``gone`` (which only ``into`` fed) is removed, its readers read ``into``
    instead (same steps), and ``into`` is replaced by the given (updated) task."""
    out = TaskGraph(output=into.name if tg.output == gone.name else tg.output)
    renamed: Dict[str, Task] = {}
    for t in tg.tasks():
        if t.name == gone.name:
            continue
        if t.name == into.name:
            t = into
        else:
            t = dataclasses.replace(t, args=rename_refs(t.args, gone.name, into.name),
                                    kwargs=rename_refs(t.kwargs, gone.name, into.name))
        renamed[t.name] = t
        out.add_task(t)
    for u, v, kind in tg.graph.edges(data="kind"):
        u2 = into.name if u == gone.name else u
        v2 = into.name if v == gone.name else v
        if u2 != v2:
            out.add_edge(u2, v2, kind)
    return out
