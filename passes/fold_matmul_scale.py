"""fold_matmul_scale: move a power-of-two scale of a matmul's product onto its smaller operand.

Requires: an unrolled fx graph (after ``hoist_time_invariant``). Guarantees: every ``(a @ b) * c``,
``c * (a @ b)`` and ``(a @ b) / c`` (``operator``/``torch`` functions or tensor methods; ``matmul``, ``@``
or ``bmm``) where ``c`` is a Python number that is a power of two and the product has no other reader
becomes one ``scaled_matmul(a, b, c)`` node, which scales whichever of ``a``, ``b`` and the product has the
fewest elements.

Why: in spiking attention (``attn = q @ k.transpose(-2, -1) * 0.125``, Spikformer's scale) the product is
[N, H, L, L] while q is [N, H, L, d]. Batched over T steps the product is 8 MiB at the zoo's sizes and the
separate multiply (and its backward) cost 2.6-3.5 ms each way on 2 cores, a tenth of a training step; on q
it is a quarter of that.

Exact: multiplying by a power of two only changes exponents, so it commutes with every rounding of the
products and sums (barring overflow and subnormals): ``(c * a) @ b`` equals ``c * (a @ b)`` bit for bit.
The scaled operand keeps its strides (an elementwise op preserves a dense layout), so the matmul takes
the same BLAS path as in eager. Other scales are left alone: their products would round differently.
"""
from __future__ import annotations

import math
import operator
from typing import Any, Optional, Tuple

import torch
import torch.fx as fx

from snncc.frontend import Traced

__all__ = ["fold_matmul_scale", "scaled_matmul", "power_of_two"]

_MATMUL_FUNCTIONS = {operator.matmul, torch.matmul, torch.bmm}
_MATMUL_METHODS = {"matmul", "bmm"}
_MUL_FUNCTIONS = {operator.mul, torch.mul}
_DIV_FUNCTIONS = {operator.truediv, torch.div, torch.true_divide}


def power_of_two(c: Any) -> bool:
    """Whether ``c`` is a Python int/float equal to +-2**e, with |e| small enough that scaling normal
    float32 activations by it neither overflows nor goes subnormal."""
    if isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c) or c == 0:
        return False
    mantissa, exponent = math.frexp(c)
    return abs(mantissa) == 0.5 and abs(exponent - 1) <= 32


def _matmul_numel(a: torch.Tensor, b: torch.Tensor) -> Optional[int]:
    """Elements of ``a @ b`` for operands of rank >= 2 (None for vectors: those are not folded)."""
    if a.dim() < 2 or b.dim() < 2:
        return None
    batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    return math.prod(batch) * a.shape[-2] * b.shape[-1]


def scaled_matmul(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """``torch.matmul(a, b) * scale`` for a power-of-two ``scale``, bit for bit, with the multiply on the
    smallest of ``a``, ``b`` and the product (its backward too)."""
    n = _matmul_numel(a, b) if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) else None
    if n is not None and a.numel() <= b.numel() and a.numel() < n:
        return torch.matmul(a * scale, b)
    if n is not None and b.numel() < n:
        return torch.matmul(a, b * scale)
    return torch.matmul(a, b) * scale


def _is_matmul(node: Any) -> bool:
    if not isinstance(node, fx.Node) or node.kwargs or len(node.args) != 2:
        return False
    return (node.op == "call_function" and node.target in _MATMUL_FUNCTIONS) or \
        (node.op == "call_method" and node.target in _MATMUL_METHODS)


def _scaled_product(node: fx.Node) -> Optional[Tuple[fx.Node, float]]:
    """(the matmul node, the scale) when ``node`` multiplies or divides a matmul's product by a power of
    two, else None."""
    if node.kwargs or len(node.args) != 2:
        return None
    x, y = node.args
    fn = node.target
    is_mul = (node.op == "call_function" and fn in _MUL_FUNCTIONS) or (node.op == "call_method" and fn == "mul")
    is_div = (node.op == "call_function" and fn in _DIV_FUNCTIONS) or (node.op == "call_method" and fn == "div")
    if is_mul:
        for m, c in ((x, y), (y, x)):
            if _is_matmul(m) and power_of_two(c):
                return m, float(c)
    if is_div and _is_matmul(x) and power_of_two(y):
        return x, 1.0 / float(y)
    return None


def fold_matmul_scale(traced: Traced) -> Tuple[Traced, int]:
    """Fold power-of-two scales into their matmuls (in place on ``traced.graph``); returns it and how many
    were folded."""
    graph = traced.graph
    folded = 0
    for node in list(graph.nodes):
        hit = _scaled_product(node)
        if hit is None:
            continue
        mm, scale = hit
        if len(mm.users) != 1:          # the unscaled product is read elsewhere too: keep it
            continue
        with graph.inserting_before(node):
            new = graph.call_function(scaled_matmul, (mm.args[0], mm.args[1], scale))
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        graph.erase_node(mm)
        folded += 1
    graph.lint()
    return traced, folded
