"""batch_over_time: group the T copies of each layer into one task over a chunk of timesteps.

Requires: tags from ``tag_timesteps``. Guarantees: a list of groups (each becomes one task) such that the
graph of groups is acyclic. A group of a stateless, batch-independent op (conv, linear, pool, BN-apply,
elementwise) runs its K steps as one op on ``[K*N, ...]``; a recognized neuron's calls become one scan.
Everything else (opaque modules, random draws, ops that mix the batch) stays one task per node. A group
whose members feed each other (recurrence through the graph) or that would close a cycle with other groups
is split back into single steps, so correctness never depends on the grouping.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import networkx as nx
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from snncc.frontend import Traced
from .fold_matmul_scale import scaled_matmul
from .hoist_time_invariant import is_random
from .tag_timesteps import NodeTag

__all__ = ["Group", "batch_over_time", "batchable_module", "GROUP_KINDS", "GUARDED_FUNCTIONS", "GUARDED_METHODS"]

#: what a group runs as: "batched" (one op over K steps), "scan" (a neuron over K steps), "recurrent" (a
#: neuron fed back its own spikes through a Linear, as one fused loop), "single".
GROUP_KINDS = ("batched", "scan", "recurrent", "single")

_BATCHABLE_MODULES = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool2d,
    nn.Identity, nn.ReLU, nn.LeakyReLU, nn.Sigmoid, nn.Tanh, nn.GELU, nn.SiLU, nn.ELU, nn.Hardtanh,
    nn.Softplus, nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm, nn.Flatten, nn.ZeroPad2d,
)
_ELEMENTWISE_FUNCTIONS = {operator.add, operator.sub, operator.mul, operator.truediv, operator.neg,
                          torch.add, torch.sub, torch.mul, torch.div, torch.relu, torch.sigmoid, torch.tanh,
                          torch.clamp, F.relu, F.leaky_relu, F.gelu, F.silu, F.sigmoid, F.tanh}
_LAYER_FUNCTIONS = {F.conv1d, F.conv2d, F.conv3d, F.linear, F.max_pool1d, F.max_pool2d, F.max_pool3d,
                    F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
                    F.adaptive_avg_pool3d}
_METHODS = {"relu", "sigmoid", "tanh", "add", "sub", "mul", "div", "clamp", "float", "half", "double"}
#: shape, matmul and reduction ops that are batch-independent only for some shapes or dims: grouped here,
#: and run as one call per chunk when ``runtime/batched_ops.py``'s guard holds for the actual tensors (else
#: step by step, the same values). ``reshape(B, L, H, D // H)`` with ``B, L, D = x.shape`` is one of them.
GUARDED_FUNCTIONS = {torch.reshape, torch.transpose, torch.swapaxes, torch.permute, torch.matmul, operator.matmul,
                     torch.bmm, scaled_matmul, torch.mean, torch.sum, torch.amax, torch.amin, torch.softmax, torch.log_softmax,
                     F.softmax, F.log_softmax}
GUARDED_METHODS = {"reshape", "view", "transpose", "swapaxes", "permute", "matmul", "bmm", "mean", "sum", "amax",
                   "amin", "softmax", "log_softmax", "contiguous"}


@dataclass(frozen=True)
class Group:
    """Nodes (program order) that one task runs; ``kind`` in GROUP_KINDS."""

    layer: str
    nodes: Tuple[str, ...]
    kind: str
    target: Optional[str] = None     # stateful module qualname (state edges chain its groups)
    #: recurrent groups: the nodes folded into the cell (the adds and the recurrent Linear's calls) and
    #: that Linear's qualname (see passes/fuse_recurrence.py)
    absorbed: Tuple[str, ...] = ()
    linear: Optional[str] = None

    @property
    def all_nodes(self) -> Tuple[str, ...]:
        """Every fx node this group's task runs: its members and what it absorbed."""
        return self.nodes + self.absorbed


def batchable_module(m: nn.Module) -> bool:
    """A module whose output rows depend only on the same input rows (safe on ``[K*N, ...]``)."""
    if getattr(m, "step_mode", "s") != "s" or not isinstance(m, _BATCHABLE_MODULES):
        return False
    if isinstance(m, nn.Flatten):
        return m.start_dim >= 1
    if isinstance(m, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)):
        return not m.return_indices
    return not getattr(m, "inplace", False)


def _start_dim_ok(node: fx.Node, pos: int, key: str) -> bool:
    dim = node.args[pos] if len(node.args) > pos else node.kwargs.get(key, 0)
    return isinstance(dim, int) and dim >= 1


def _batchable_node(node: fx.Node, traced: Traced) -> bool:
    if node.op == "call_module":
        return node.target not in traced.opaque and batchable_module(traced.root.get_submodule(node.target))
    if node.op == "call_function":
        if node.target in (torch.flatten,):
            return _start_dim_ok(node, 1, "start_dim")
        if node.target is torch.cat:
            return _start_dim_ok(node, 1, "dim")
        return node.target in _ELEMENTWISE_FUNCTIONS or node.target in _LAYER_FUNCTIONS or \
            node.target in GUARDED_FUNCTIONS
    if node.op == "call_method":
        if node.target == "flatten":
            return _start_dim_ok(node, 1, "start_dim")
        return node.target in _METHODS or node.target in GUARDED_METHODS
    return False


def _is_size(node: fx.Node) -> bool:
    """A number computed from tensor sizes (``x.shape[0]``, ``x.size(1)``, ``D // H``): not a tensor."""
    if node.op == "call_function" and getattr(node.target, "__name__", "") == "getitem" and node.args and \
            isinstance(node.args[0], fx.Node):
        src = node.args[0]
        return (src.op == "call_function" and getattr(src.target, "__name__", "") == "getattr" and
                len(src.args) == 2 and src.args[1] == "shape") or (src.op == "call_method" and src.target == "size")
    if node.op == "call_method" and node.target == "size":
        return len(node.args) > 1 or "dim" in node.kwargs
    if node.op == "call_function" and node.target in (operator.floordiv, operator.mul, operator.add, operator.sub):
        return all(_is_size(a) if isinstance(a, fx.Node) else isinstance(a, int) for a in node.args)
    return False


def _same_structure(nodes: List[fx.Node]) -> bool:
    """Each argument position is either the same value for every member or a per-member node; an
    invariant tensor argument must be a parameter (get_attr), which broadcasts over ``[K*N, ...]``; an
    invariant size (``B`` of ``B, L, D = x.shape`` on a static input) is passed as it is."""
    def walk(items: List[Any]) -> bool:
        first = items[0]
        if isinstance(first, fx.Node):
            if not all(isinstance(i, fx.Node) for i in items):
                return False
            if all(i is first for i in items):
                return first.op == "get_attr" or _is_size(first)
            return len(set(items)) == len(items)
        if isinstance(first, (list, tuple)):
            return all(isinstance(i, type(first)) and len(i) == len(first) for i in items) and \
                all(walk([i[k] for i in items]) for k in range(len(first)))
        if isinstance(first, dict):
            return all(walk([i[k] for i in items]) for k in first)
        return all(i == first for i in items)
    return walk([n.args for n in nodes]) and walk([n.kwargs for n in nodes])


def _static_batch_norm(nodes: List[fx.Node], traced: Traced, tags: Dict[str, NodeTag]) -> bool:
    """The T calls of one training-mode BatchNorm on the same time-invariant tensor (a hoisted first conv's
    output: ``conv -> BN -> LIF`` on a static image). Not pure (each call updates the running statistics),
    so hoisting leaves T calls; as one task they run as K steps of that one input (the executor expands it):
    K running-statistics updates, as eager, and a neuron after it can take the BatchNorm as its prologue."""
    first = nodes[0]
    if first.op != "call_module" or any(n.op != "call_module" or n.target != first.target for n in nodes):
        return False
    m = traced.root.get_submodule(first.target)
    if not isinstance(m, nn.modules.batchnorm._BatchNorm) or not m.training:
        return False
    src = first.args[0] if len(first.args) == 1 else None
    return isinstance(src, fx.Node) and tags[src.name].t is None and \
        all(len(n.args) == 1 and n.args[0] is src and not n.kwargs for n in nodes)


def _initial_groups(traced: Traced, tags: Dict[str, NodeTag]) -> List[Group]:
    by_layer: Dict[str, List[fx.Node]] = {}
    for node in traced.graph.nodes:
        by_layer.setdefault(tags[node.name].layer, []).append(node)
    groups: List[Group] = []
    for layer, nodes in by_layer.items():
        first = nodes[0]
        target = first.target if first.op == "call_module" and first.target in traced.stateful else None
        if target is not None and target in traced.bindings and \
                all(len(n.args) == 1 and not n.kwargs for n in nodes):
            groups.append(Group(layer, tuple(n.name for n in nodes), "scan", target))
        elif len(nodes) > 1 and all(_batchable_node(n, traced) for n in nodes) and \
                (_same_structure(nodes) or _static_batch_norm(nodes, traced, tags)) and \
                len({tags[n.name].t for n in nodes}) == len(nodes):
            groups.append(Group(layer, tuple(n.name for n in nodes), "batched"))
        else:
            groups.extend(Group(layer, (n.name,), "single", target) for n in nodes)
    return groups


def _ordered_nodes(traced: Traced) -> List[fx.Node]:
    """Nodes whose relative order must stay eager's: random draws and opaque modules."""
    return [n for n in traced.graph.nodes if is_random(n, traced) or
            (n.op == "call_module" and (n.target in traced.opaque or
                                        (n.target in traced.stateful and n.target not in traced.bindings)))]


def _group_graph(traced: Traced, groups: List[Group]) -> nx.DiGraph:
    owner = {n: i for i, g in enumerate(groups) for n in g.all_nodes}
    gg = nx.DiGraph()
    gg.add_nodes_from(range(len(groups)))
    for node in traced.graph.nodes:
        for a in node.all_input_nodes:
            if owner[a.name] != owner[node.name] or groups[owner[a.name]].kind != "recurrent":
                gg.add_edge(owner[a.name], owner[node.name])
    chain = _ordered_nodes(traced)
    for a, b in zip(chain, chain[1:]):
        gg.add_edge(owner[a.name], owner[b.name])
    by_target: Dict[str, List[int]] = {}  # a stateful module's calls run in program order
    for i, g in enumerate(groups):
        if g.target is not None:
            by_target.setdefault(g.target, []).append(i)
    for idx in by_target.values():
        for a, b in zip(idx, idx[1:]):
            gg.add_edge(a, b)
    return gg


def _chunked(groups: List[Group], chunk: Optional[int], tags: Dict[str, NodeTag]) -> List[Group]:
    """Groups of more than ``chunk`` steps split into consecutive chunks (tasks = (layer, time-chunk))."""
    if chunk is None:
        return groups
    out: List[Group] = []
    for g in groups:
        if g.kind == "single" or len(g.nodes) <= chunk:
            out.append(g)
            continue
        if g.kind == "recurrent":
            # each chunk takes the add and the Linear call of each of its steps (``absorbed`` holds them
            # in step order, two per step from step 1: see fuse_recurrence)
            for i in range(0, len(g.nodes), chunk):
                part = g.nodes[i:i + chunk]
                lo, hi = max(i, 1), i + len(part)
                out.append(Group(g.layer, part, "recurrent", g.target, g.absorbed[2 * (lo - 1):2 * (hi - 1)],
                                 g.linear))
            continue
        for i in range(0, len(g.nodes), chunk):
            part = g.nodes[i:i + chunk]
            out.append(Group(g.layer, part, g.kind if len(part) > 1 or g.kind == "scan" else "single", g.target))
    return out


def batch_over_time(traced: Traced, tags: Dict[str, NodeTag], chunk: Optional[int] = None) -> List[Group]:
    """Groups in program order, split until the group graph is a DAG (see the module docstring).

    ``chunk``: at most this many timesteps per group (None: all T), so a layer becomes T/chunk tasks that
    a wavefront schedule can overlap with the next layer's earlier chunks.
    """
    if chunk is not None and chunk < 1:
        raise ValueError(f"batch_over_time: chunk must be >= 1, got {chunk}")
    from .fuse_recurrence import fuse_recurrence
    groups = _chunked(fuse_recurrence(traced, tags, _initial_groups(traced, tags)), chunk, tags)
    while True:
        gg = _group_graph(traced, groups)
        cyclic = {i for comp in nx.strongly_connected_components(gg) if len(comp) > 1 for i in comp}
        cyclic |= {u for u, v in gg.edges if u == v}
        cyclic = {i for i in cyclic if len(groups[i].all_nodes) > 1}
        if not cyclic:
            break
        new: List[Group] = []
        for i, g in enumerate(groups):
            if i in cyclic:
                # NOTE: a recurrent cell caught in a larger cycle (fed back from a later layer) goes back
                # to its parts, one task per step, like any other group in a cycle
                new.extend(Group(g.layer, (n,), "scan" if g.kind in ("scan", "recurrent") else "single", g.target)
                           for n in g.nodes)
                new.extend(Group(tags[n].layer, (n,), "single") for n in g.absorbed)
            else:
                new.append(g)
        groups = new
    order = {n.name: i for i, n in enumerate(traced.graph.nodes)}
    return sorted(groups, key=lambda g: order[g.nodes[0]])
