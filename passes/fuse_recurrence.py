"""fuse_recurrence: a neuron layer fed back its own previous spikes through a Linear becomes one cell.

Requires: the initial groups of ``batch_over_time`` (one ``scan`` group per neuron layer). Guarantees: for
every neuron layer ``L`` whose input at each step ``t >= 1`` is ``e_t + R(L_{t-1})`` (or ``R(L_{t-1}) + e_t``),
with ``R`` one ``nn.Linear`` of square weight whose only reader is that add, the scan group becomes a
``recurrent`` group: its nodes are still the neuron's calls (its value is the spikes, ``[K*N, H]``), and the
adds and ``R``'s calls are *absorbed* into it. The runtime then runs the whole recurrence as one fused loop
per chunk (per step: the recurrent matmul, spike-driven on CPU, and the neuron step), and its backward as
one autograd node that also accumulates ``R``'s weight and bias gradients.

A neuron module that applies a recurrent Linear of its own to its previous spikes (snnTorch's ``RLeaky``
and ``RSynaptic`` with ``init_hidden=True``; ``NeuronBinding.recurrent``) becomes a cell the same way, with
nothing to absorb.

Step 0 is whatever the model computes before any spike exists: ``e_0`` is the neuron's input at step 0
(the model's own ``if self.s is None`` branch, or ``e + R(zeros)``): nothing there is assumed.

Anything else (a later layer's spikes fed back, a recurrent op that is not a Linear, an add read twice)
is left to ``batch_over_time``, which runs such cycles one task per timestep: slower, never wrong.
"""
from __future__ import annotations

import operator
from typing import Dict, List, Optional, Tuple

import torch
import torch.fx as fx
from torch import nn

from snncc.frontend import Traced
from .tag_timesteps import NodeTag

__all__ = ["fuse_recurrence", "recurrent_operands"]

_ADDS = (operator.add, torch.add)


def _is_add(n: fx.Node) -> bool:
    if n.kwargs:
        return False
    if n.op == "call_function" and n.target in _ADDS:
        return len(n.args) == 2
    return n.op == "call_method" and n.target == "add" and len(n.args) == 2


def _linear_of(traced: Traced, n: object, prev: fx.Node) -> Optional[str]:
    """The qualname of the square ``nn.Linear`` that ``n`` calls on ``prev`` alone, else None."""
    if not isinstance(n, fx.Node) or n.op != "call_module" or n.args != (prev,) or n.kwargs:
        return None
    if n.target in traced.opaque:
        return None
    m = traced.root.get_submodule(n.target)
    if type(m) is not nn.Linear or m.in_features != m.out_features:
        return None
    return n.target


def recurrent_operands(traced: Traced, neuron: fx.Node, prev: fx.Node
                       ) -> Optional[Tuple[fx.Node, fx.Node, fx.Node, str]]:
    """``(add, linear call, e, linear qualname)`` when ``neuron``'s input is ``e + R(prev)``, else None."""
    z = neuron.args[0] if len(neuron.args) == 1 and not neuron.kwargs else None
    if not isinstance(z, fx.Node) or not _is_add(z) or len(z.users) != 1:
        return None
    a, b = z.args
    for r, e in ((b, a), (a, b)):
        q = _linear_of(traced, r, prev)
        if q is not None and isinstance(e, fx.Node) and len(r.users) == 1 and e is not r:
            return z, r, e, q
    return None


def fuse_recurrence(traced: Traced, tags: Dict[str, NodeTag], groups: List["Group"]) -> List["Group"]:
    """Scan groups of self-recurrent neuron layers become ``recurrent`` groups (see the module docstring)."""
    from .batch_over_time import Group
    nodes = {n.name: n for n in traced.graph.nodes}
    cells: Dict[int, Group] = {}
    absorbed: Dict[str, int] = {}
    for i, g in enumerate(groups):
        if g.kind != "scan" or g.target not in traced.bindings:
            continue
        calls = [nodes[n] for n in g.nodes]
        if len({tags[n.name].t for n in calls}) != len(calls):
            continue            # several calls per step: not a plain recurrence over time
        own = traced.bindings[g.target].recurrent
        if own is not None:     # the neuron applies its own recurrent Linear (snnTorch's RLeaky)
            cells[i] = Group(g.layer, g.nodes, "recurrent", g.target, linear=f"{g.target}.{own}")
            continue
        if len(calls) < 2:
            continue
        found = [recurrent_operands(traced, calls[t], calls[t - 1]) for t in range(1, len(calls))]
        if any(f is None for f in found) or len({f[3] for f in found}) != 1:
            continue
        # NOTE: in step order, (add, Linear call) per step from step 1: batch_over_time's chunking relies on it
        names = tuple(x for f in found for x in (f[0].name, f[1].name))
        cells[i] = Group(g.layer, g.nodes, "recurrent", g.target, absorbed=names, linear=found[0][3])
        for n in names:
            absorbed[n] = i
    if not cells:
        return groups
    out: List[Group] = []
    for i, g in enumerate(groups):
        if i in cells:
            out.append(cells[i])
            continue
        kept = tuple(n for n in g.nodes if n not in absorbed)
        if len(kept) == len(g.nodes):
            out.append(g)
        elif kept:      # part of a layer went into a cell: the rest runs step by step
            out.extend(Group(g.layer, (n,), "single", g.target) for n in kept)
    return out
