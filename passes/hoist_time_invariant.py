"""hoist_time_invariant: common-subexpression elimination on the unrolled graph.

Requires: an unrolled fx graph (frontend). Guarantees: a new graph where pure nodes with identical targets
and identical (already merged) arguments exist once. On an unrolled loop that is exactly hoisting: the first
conv of a static image appears T times with the same input and is now computed once. Impure nodes (neurons,
opaque modules, random draws, in-place methods, BatchNorm in training mode) are never merged, so eager's
side effects (T running-statistic updates, T dropout draws) are kept.
"""
from __future__ import annotations

from typing import Any, Dict, Tuple

import torch
import torch.fx as fx
from torch import nn
import torch.nn.functional as F

from snncc.frontend import Traced

__all__ = ["hoist_time_invariant", "is_pure", "is_random", "RANDOM_FUNCTIONS"]

RANDOM_FUNCTIONS = frozenset({
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
    torch.dropout, torch.rand, torch.randn, torch.rand_like, torch.randn_like, torch.randint,
    torch.randint_like, torch.bernoulli, torch.multinomial, torch.normal, torch.poisson, torch.randperm,
})
_RANDOM_METHODS = frozenset({"bernoulli", "bernoulli_", "uniform_", "normal_", "random_", "exponential_",
                             "geometric_", "cauchy_", "log_normal_"})
_RANDOM_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


def is_random(node: fx.Node, traced: Traced) -> bool:
    """Whether the node draws random numbers (its draws must keep eager's order)."""
    if node.op == "call_function":
        return node.target in RANDOM_FUNCTIONS
    if node.op == "call_method":
        return node.target in _RANDOM_METHODS
    if node.op == "call_module":
        return isinstance(traced.root.get_submodule(node.target), _RANDOM_MODULES)
    return False


def _mutates(node: fx.Node, traced: Traced) -> bool:
    """Whether the node writes into one of its inputs (in-place method, ``inplace=True``)."""
    if node.op == "call_method" and str(node.target).endswith("_"):
        return True
    if node.op == "call_function" and node.kwargs.get("inplace", False):
        return True
    if node.op == "call_module" and node.target not in traced.stateful:
        return bool(getattr(traced.root.get_submodule(node.target), "inplace", False))
    return False


def is_pure(node: fx.Node, traced: Traced) -> bool:
    """Whether two calls with the same arguments give the same value and no side effect.

    A value later modified in place is not pure either: merging its copies would share one buffer.
    """
    if node.op in ("placeholder", "output") or is_random(node, traced):
        return False
    if any(_mutates(u, traced) and u.args and u.args[0] is node for u in node.users):
        return False
    if node.op == "call_method" and str(node.target).endswith("_"):
        return False
    if node.op == "call_function" and node.kwargs.get("inplace", False):
        return False
    if node.op == "call_module":
        if node.target in traced.stateful or node.target in traced.opaque:
            return False
        m = traced.root.get_submodule(node.target)
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
            return False
        if getattr(m, "inplace", False):
            return False
    return True


def _freeze(a: Any, canon: Dict[fx.Node, fx.Node]) -> Any:
    """A hashable form of an fx argument, with nodes replaced by their canonical representative."""
    if isinstance(a, fx.Node):
        return ("node", canon[a].name)
    if isinstance(a, (list, tuple)):
        return (type(a).__name__,) + tuple(_freeze(x, canon) for x in a)
    if isinstance(a, dict):
        return ("dict",) + tuple((k, _freeze(v, canon)) for k, v in sorted(a.items()))
    if isinstance(a, slice):
        return ("slice", _freeze(a.start, canon), _freeze(a.stop, canon), _freeze(a.step, canon))
    if isinstance(a, torch.Tensor):
        return ("tensor", id(a))
    try:
        hash(a)
        return (type(a).__name__, a)
    except TypeError:
        return ("object", id(a))


def hoist_time_invariant(traced: Traced) -> Tuple[Traced, int]:
    """Merge duplicate pure nodes; returns the new Traced (fresh graph) and how many nodes were merged."""
    graph = fx.Graph()
    env: Dict[fx.Node, fx.Node] = {}
    seen: Dict[Tuple, fx.Node] = {}
    merged = 0
    for node in traced.graph.nodes:
        if is_pure(node, traced):
            key = (node.op, node.target if not callable(node.target) else id(node.target),
                   _freeze(node.args, env), _freeze(node.kwargs, env))
            if key in seen:
                env[node] = seen[key]
                merged += 1
                continue
        new = graph.node_copy(node, lambda n: env[n])
        env[node] = new
        if is_pure(node, traced):
            seen[key] = new
    graph.lint()
    return Traced(traced.root, graph, traced.stateful, traced.bindings, traced.opaque, traced.form,
                  traced.reasons), merged
