"""insert_bitpack: mark convolutions and linear layers whose input is spikes, so they keep it as bits.

Requires: a TaskGraph after fusion. Guarantees: ``spike_input=True`` on every conv/linear task whose input
is the output of a neuron whose spikes are exactly 0 or 1 (a surrogate snncc knows, or a user's that
``plain_step_surrogate`` accepts), possibly through max
pooling and flattening (which keep values in {0, 1}). Such a task keeps its input for the weight gradient
as 1 bit per element instead of a float, 32x less; the executor checks the values while packing and keeps
the dense tensor if any is not 0/1, so a wrong mark costs memory, never correctness.
"""
from __future__ import annotations

import dataclasses
from typing import Dict

import networkx as nx
import torch
from torch import nn

from snncc.frontend import Traced
from snncc.ir import Ref, Steps, Task, TaskGraph
from snncc.surrogate import plain_step_surrogate

__all__ = ["insert_bitpack", "spike_valued"]

_KEEP_BINARY_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.Flatten, nn.Identity)
_KEEP_BINARY_METHODS = {"flatten", "view", "reshape", "contiguous", "float"}
_KEEP_BINARY_FUNCTIONS = {torch.flatten, torch.reshape}
_PACKABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def _source(a) -> str:
    """The task an argument comes from (one task for all steps), or ''."""
    if isinstance(a, Ref):
        return a.task
    if isinstance(a, Steps) and len({r.task for r in a.refs}) == 1:
        return a.refs[0].task
    return ""


def spike_valued(tg: TaskGraph, traced: Traced) -> Dict[str, bool]:
    """For each task: does it produce only 0/1 values (spikes, or spikes pooled/reshaped)?"""
    out: Dict[str, bool] = {}
    for name in nx.topological_sort(tg.graph):
        t = tg.task(name)
        src = _source(t.args[0]) if t.args else ""
        if t.kind == "neuron":
            b = traced.bindings.get(t.target)
            out[name] = b is not None and (b.binary if b.spec is None else
                                           (not b.spec.surrogate.opaque or plain_step_surrogate(b.spec.surrogate.fn)))
        elif t.kind == "module":
            m = traced.root.get_submodule(t.target)
            out[name] = isinstance(m, _KEEP_BINARY_MODULES) and out.get(src, False) and not t.fused
        elif t.kind == "method":
            out[name] = t.target in _KEEP_BINARY_METHODS and out.get(src, False)
        elif t.kind == "function":
            out[name] = t.target in _KEEP_BINARY_FUNCTIONS and out.get(src, False)
        else:
            out[name] = False
    return out


def insert_bitpack(tg: TaskGraph, traced: Traced) -> TaskGraph:
    """Set ``spike_input`` on conv/linear tasks fed by spikes (see the module docstring)."""
    binary = spike_valued(tg, traced)
    out = TaskGraph(output=tg.output)
    for t in tg.tasks():
        if t.kind == "module" and t.args and binary.get(_source(t.args[0]), False) and \
                isinstance(traced.root.get_submodule(t.target), _PACKABLE):
            t = dataclasses.replace(t, spike_input=True)
        out.add_task(t)
    for u, v, kind in tg.graph.edges(data="kind"):
        out.add_edge(u, v, kind)
    return out
