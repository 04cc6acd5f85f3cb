"""build_task_graph: turn the groups of ``batch_over_time`` into a TaskGraph (networkx DAG).

Requires: an acyclic list of groups. Guarantees: one Task per group, arguments rewritten from fx nodes to
``Ref``/``Steps``, data edges for every value used, state edges between consecutive chunks of a stateful
layer, order edges keeping random draws and opaque modules in eager's order, and ``output`` set.
"""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

import torch.fx as fx

from snncc.frontend import Traced
from snncc.ir import Fusion, Ref, SliceConst, Steps, Task, TaskGraph
from .batch_over_time import Group, _ordered_nodes
from .tag_timesteps import NodeTag

__all__ = ["build_task_graph"]


def _task_name(g: Group, tags: Dict[str, NodeTag]) -> str:
    if len(g.nodes) == 1:
        return g.nodes[0]
    return f"{g.nodes[0]}__t{tags[g.nodes[0]].t}_{tags[g.nodes[-1]].t + 1}"


def _convert(a: Any, where: Dict[str, Ref]) -> Any:
    """fx argument -> task argument (nodes become Refs, slices SliceConsts, lists tuples)."""
    if isinstance(a, fx.Node):
        return where[a.name]
    if isinstance(a, (list, tuple)):
        return tuple(_convert(x, where) for x in a) if isinstance(a, tuple) else \
            ("__list__",) + tuple(_convert(x, where) for x in a)
    if isinstance(a, dict):
        return ("__dict__",) + tuple((k, _convert(v, where)) for k, v in a.items())
    if isinstance(a, slice):
        return SliceConst(_convert(a.start, where), _convert(a.stop, where), _convert(a.step, where))
    return a


def _merge(items: List[Any]) -> Any:
    """Per-member converted arguments -> one argument of the batched task."""
    first = items[0]
    if isinstance(first, Ref):
        return first if all(i == first for i in items) else Steps(tuple(items))
    if isinstance(first, tuple) and first and not isinstance(first, (Ref, Steps, SliceConst)):
        return tuple(_merge([i[k] for i in items]) for k in range(len(first)))
    return first


def _kind(node: fx.Node, g: Group, traced: Traced) -> str:
    if g.kind in ("scan", "recurrent"):
        return "neuron"
    if node.op == "call_module":
        return "opaque" if node.target in traced.stateful or node.target in traced.opaque else "module"
    return {"placeholder": "placeholder", "get_attr": "get_attr", "call_function": "function",
            "call_method": "method", "output": "output"}[node.op]


def _cell_args(g: Group, members: List[fx.Node], nodes: Dict[str, fx.Node], where: Dict[str, Ref]
               ) -> Tuple[Any, ...]:
    """A recurrent cell's arguments: ``(Steps(e_t), previous spikes)``. ``e_t`` is each step's input
    without the recurrent term; the previous spikes (the last step of the chunk before, a ``Ref``) are None
    when the chunk starts at step 0, whose input has no recurrent term to compute."""
    absorbed = set(g.absorbed)
    es: List[Ref] = []
    prev: Any = None
    for i, m in enumerate(members):
        z = m.args[0]
        if z.name in absorbed:
            a, b = z.args
            r, e = (b, a) if b.name in absorbed else (a, b)
            es.append(where[e.name])
            if i == 0:
                prev = where[r.args[0].name]
        else:
            es.append(where[z.name])
    return (Steps(tuple(es)), prev)


def build_task_graph(traced: Traced, tags: Dict[str, NodeTag], groups: List[Group]) -> TaskGraph:
    """One task per group (see the module docstring)."""
    nodes = {n.name: n for n in traced.graph.nodes}
    where: Dict[str, Ref] = {}
    owner: Dict[str, str] = {}
    tg = TaskGraph()
    for g in groups:
        name = _task_name(g, tags)
        multi = g.kind in ("scan", "recurrent") or len(g.nodes) > 1
        for i, n in enumerate(g.nodes):
            where[n] = Ref(name, i if multi else None)
            owner[n] = name
        for n in g.absorbed:      # folded into the cell: nothing outside reads them
            owner[n] = name
    for g in groups:
        members = [nodes[n] for n in g.nodes]
        first = members[0]
        name = owner[first.name]
        fused: Tuple[Fusion, ...] = ()
        if g.kind == "recurrent":
            args, fused = _cell_args(g, members, nodes, where), (Fusion("recurrent", g.linear, ""),)
            kwargs: Any = ()
        else:
            conv = [(_convert(m.args, where), _convert(m.kwargs, where)) for m in members]
            args = _merge([c[0] for c in conv]) if len(members) > 1 else conv[0][0]
            kwargs = _merge([c[1] for c in conv]) if len(members) > 1 else conv[0][1]
        ts = [tags[m.name].t for m in members]
        t0, t1 = (None, None) if ts[0] is None else (ts[0], ts[-1] + 1)
        if g.kind == "scan" and len(set(ts)) != len(ts):   # several calls per step: index by call, not by t
            t0, t1 = None, None
        tg.add_task(Task(name=name, kind=_kind(first, g, traced), layer=g.layer, target=first.target,
                         args=args, kwargs=tuple(kwargs[1:]) if kwargs and kwargs[0] == "__dict__" else (),
                         t0=t0, t1=t1, batched=g.kind in ("scan", "batched", "recurrent"),
                         order=tags[first.name].order, nodes=g.nodes, fused=fused))
        if first.op == "output":
            tg.output = name
    # NOTE: edges only once every task exists: a batched group may read a task later in program order.
    for node in traced.graph.nodes:
        for a in node.all_input_nodes:
            if owner[a.name] != owner[node.name]:
                tg.add_edge(owner[a.name], owner[node.name], "data")
    prev: Dict[str, str] = {}
    for g in groups:
        if g.target is not None:
            if g.target in prev:
                tg.add_edge(prev[g.target], owner[g.nodes[0]], "state")
            prev[g.target] = owner[g.nodes[0]]
    chain = _ordered_nodes(traced)
    for a, b in zip(chain, chain[1:]):
        if owner[a.name] != owner[b.name]:
            tg.add_edge(owner[a.name], owner[b.name], "order")
    return tg
