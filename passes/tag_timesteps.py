"""tag_timesteps: give every node of the unrolled graph its timestep and its layer.

Requires: an unrolled (and CSE'd) fx graph. Guarantees: for each node, ``t`` (None when the node does not
depend on time: inputs, parameters, hoisted work) and a ``layer`` shared by the copies of one op at different
timesteps. The i-th call of a stateful module is timestep i; a pure node lives at the latest timestep of its
inputs; an integer index into a time-invariant tensor (``x_seq[t]``) starts timestep t. Layers are found
structurally (same op, same target, arguments from the same layers), so a model that loops over time itself
is understood as well as the step forms. Tags only steer batching: any tagging gives correct results.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch.fx as fx

from snncc.frontend import Traced
from .hoist_time_invariant import is_pure

__all__ = ["NodeTag", "tag_timesteps"]


@dataclass(frozen=True)
class NodeTag:
    t: Optional[int]
    layer: str          # readable layer name: the first node of the layer
    order: int          # program order


def _time_index(node: fx.Node, tags: Dict[str, NodeTag]) -> Optional[Tuple[Any, int]]:
    """``(pattern, t)`` if node is ``x[t]`` / ``x[:, t]`` on a time-invariant x, else None."""
    if node.op != "call_function" or getattr(node.target, "__name__", "") != "getitem" or len(node.args) != 2:
        return None
    src, idx = node.args
    if not isinstance(src, fx.Node) or tags[src.name].t is not None or _is_shape(src):
        return None
    if isinstance(idx, int):
        return ("i",), idx
    if isinstance(idx, tuple) and sum(isinstance(i, int) for i in idx) == 1 and \
            all(isinstance(i, int) or i == slice(None) for i in idx):
        pos = next(k for k, i in enumerate(idx) if isinstance(i, int))
        return ("s", len(idx), pos), idx[pos]
    return None


def _is_shape(node: fx.Node) -> bool:
    """``x.shape`` / ``x.size()``: indexing it reads a size, not a timestep.

    NOTE (regression): ``B, L, D = x.shape`` on the static input was tagged timesteps 0, 1, 2, which put
    the first three steps' ``reshape(B, L, D)`` and everything after it at t = 2, so those layers were
    never batched over time."""
    if node.op == "call_function" and getattr(node.target, "__name__", "") == "getattr":
        return len(node.args) == 2 and node.args[1] == "shape"
    return node.op == "call_method" and node.target == "size"


def _arg_layers(a: Any, layer_of: Dict[str, Any]) -> Any:
    if isinstance(a, fx.Node):
        return ("n", layer_of[a.name])
    if isinstance(a, (list, tuple)):
        return tuple(_arg_layers(x, layer_of) for x in a)
    if isinstance(a, dict):
        return tuple((k, _arg_layers(v, layer_of)) for k, v in sorted(a.items()))
    if isinstance(a, slice):
        return ("slice", repr(a))
    return repr(a)


def tag_timesteps(traced: Traced) -> Dict[str, NodeTag]:
    """Timestep and layer of every node (see the module docstring)."""
    tags: Dict[str, NodeTag] = {}
    key_of: Dict[str, Any] = {}            # node name -> structural layer key
    layer_name: Dict[Any, str] = {}        # structural key -> readable layer name
    occurrences: Dict[Any, int] = {}
    used: set = set()
    for order, node in enumerate(traced.graph.nodes):
        ins = [a for a in node.all_input_nodes]
        t_in = max((tags[a.name].t for a in ins if tags[a.name].t is not None), default=None)
        tidx = _time_index(node, tags)
        if node.op in ("placeholder", "get_attr", "output"):
            key = (node.op, node.name)
        elif tidx is not None:
            key = ("time_index", key_of[node.args[0].name], tidx[0])
        elif node.op == "call_module" and node.target in traced.stateful:
            key = ("state", node.target)
        else:
            target = node.target if isinstance(node.target, str) else id(node.target)
            key = (node.op, target, _arg_layers(node.args, key_of), _arg_layers(node.kwargs, key_of))
        key_of[node.name] = key
        occ = occurrences.get(key, 0)
        occurrences[key] = occ + 1
        if node.op in ("placeholder", "get_attr"):
            t = None
        elif tidx is not None:
            t = tidx[1]
        elif not is_pure(node, traced) and node.op != "output":
            t = max(occ, t_in if t_in is not None else 0)
        else:
            t = t_in
        if key not in layer_name:
            name = str(node.target) if node.op == "call_module" else node.name
            layer_name[key] = name if name not in used else f"{name}#{occ}{order}"
            used.add(layer_name[key])
        tags[node.name] = NodeTag(t, layer_name[key], order)
    return tags
