"""The neuron IR: one timestep of a neuron as an elementwise graph over per-neuron scalars.

A neuron is its step code. :mod:`snncc.lift` records a stateful module's forward into a :class:`NeuronIR`:
values are named SSA slots, each produced by one :class:`Op` from a small elementwise vocabulary
(:data:`OPS`); the inputs are the step's input ``x``, the state variables before the step and the
module's tensors (parameters and buffers, broadcast against ``x``); the outputs are the module's return
value and the state variables after the step. The spike nonlinearity is one op, ``spike(z)``, whose
forward is ``z >= 0`` and whose backward is its surrogate (:class:`~snncc.surrogate.SurrogateSpec`: a known
formula, or the user's own function whose derivative is taken through its backward).

Every backend generates its scan from this one graph: :func:`interpret` is the torch reference (the same
torch calls eager makes, in eager's order, so it is bit-identical to the module); ``runtime.ir_codegen``
writes C and CUDA from it, forward and backward (reverse-mode differentiation of the graph, op by op).

The IR holds no tensors: parameters are named by attribute path, constants are Python numbers, dtypes are
strings. It is hashable and can key kernel caches.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from .surrogate import SurrogateSpec, derivative

__all__ = ["Op", "NeuronIR", "OPS", "UNARY", "BINARY", "COMPARE", "interpret", "dtype_of", "DTYPES",
           "used_values", "binary_values", "hoist_static", "run_prelude"]

Arg = Union[str, float, int, bool, None]

#: ops with one value argument (and, for some, constant attributes in ``Op.attrs``)
UNARY = ("neg", "exp", "log", "sigmoid", "tanh", "abs", "sqrt", "rsqrt", "reciprocal", "relu", "sign",
         "pow", "clamp", "cast", "detach", "copy", "logical_not", "spike", "floor", "ceil", "round")
#: ops with two value arguments (``add``/``sub`` carry torch's ``alpha`` in attrs)
BINARY = ("add", "sub", "mul", "div", "minimum", "maximum", "logical_and", "logical_or", "logical_xor",
          "heaviside")
#: comparisons: bool results, no gradient
COMPARE = ("ge", "gt", "le", "lt", "eq", "ne")
#: ``where(cond, a, b)``, ``fill`` (a constant broadcast like x: ``zeros_like``/``full_like``...)
OTHER = ("where", "fill")
OPS = UNARY + BINARY + COMPARE + OTHER

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
          "float64": torch.float64, "bool": torch.bool}


def dtype_of(name: str) -> torch.dtype:
    return DTYPES[name]


@dataclass(frozen=True)
class Op:
    """``out = op(*args)``. ``args`` are value names (str) or constants (Python numbers); ``attrs`` are
    the op's constant attributes as ``(key, value)`` pairs (``alpha`` of add/sub, ``exponent`` of pow,
    ``min``/``max`` of clamp, ``value`` of fill, ``surrogate`` index of spike); ``dtype`` is the result's
    dtype and ``cdtype`` the dtype torch computes in (they differ for comparisons: bool out, float math)."""

    out: str
    op: str
    args: Tuple[Arg, ...]
    dtype: str
    cdtype: str
    attrs: Tuple[Tuple[str, Any], ...] = ()

    def attr(self, key: str, default: Any = None) -> Any:
        for k, v in self.attrs:
            if k == key:
                return v
        return default

    def value_args(self) -> Tuple[str, ...]:
        return tuple(a for a in self.args if isinstance(a, str))


@dataclass(frozen=True)
class NeuronIR:
    """One step: ``(x, states, params) -> (outputs, new_states)`` as a list of :class:`Op`.

    ``states`` are empty for the step from the reset state (the module's own code creates them, e.g. SpikingJelly's
    ``v = full_like(x, v_reset)`` or snnTorch's ``zeros_like``); ``new_states`` line up with the module's
    state attributes. ``surrogates[i]`` is the surrogate of the spike op whose ``attrs`` say ``surrogate=i``.
    ``dtypes`` gives every value's dtype (inputs included)."""

    x: str
    states: Tuple[str, ...]
    params: Tuple[str, ...]
    ops: Tuple[Op, ...]
    outputs: Tuple[str, ...]
    new_states: Tuple[str, ...]
    surrogates: Tuple[SurrogateSpec, ...]
    dtypes: Tuple[Tuple[str, str], ...] = field(default=())

    def dtype(self, value: str) -> str:
        return dict(self.dtypes)[value]

    @property
    def spike_ops(self) -> Tuple[Op, ...]:
        return tuple(o for o in self.ops if o.op == "spike")

    def describe(self) -> str:
        """A readable listing (``snncc.explain`` and error messages)."""
        lines = [f"step({self.x}; states={list(self.states)}; params={list(self.params)})"]
        for o in self.ops:
            extra = "".join(f", {k}={v}" for k, v in o.attrs)
            lines.append(f"  {o.out}: {o.dtype} = {o.op}({', '.join(map(str, o.args))}{extra})")
        lines.append(f"  return {list(self.outputs)}, new states {list(self.new_states)}")
        return "\n".join(lines)


def used_values(ir: NeuronIR) -> frozenset:
    """Values some op, output or new state reads (a state never read is only written: no need to load it)."""
    used = set(ir.outputs) | set(ir.new_states)
    for o in ir.ops:
        used.update(o.value_args())
    return frozenset(used)


def binary_values(ir: NeuronIR, binary_params: frozenset = frozenset()) -> frozenset:
    """Values that can only be 0 or 1: spikes, comparisons and their casts/copies/products (bit-packing).
    ``binary_params``: parameters known to hold only 0/1 (a product with one stays binary)."""
    out = set(binary_params)
    for o in ir.ops:
        if o.op in ("spike",) + COMPARE + ("logical_not", "logical_and", "logical_or", "logical_xor"):
            out.add(o.out)
        elif o.op in ("cast", "copy", "detach") and o.args[0] in out:
            out.add(o.out)
        elif o.op == "mul" and all((a in out) if isinstance(a, str) else a in (0, 1) for a in o.args):
            out.add(o.out)
    return frozenset(out - set(binary_params))


# ----------------------------------------------------------------------------------------- interpreter
class _Spike(torch.autograd.Function):
    """``z >= 0`` (or ``z > 0``: snnTorch's convention) in ``dtype`` forward, the surrogate backward."""

    @staticmethod
    def forward(ctx: Any, z: torch.Tensor, name: str, alpha: float, strict: bool, dtype: torch.dtype) -> torch.Tensor:
        ctx.save_for_backward(z)
        ctx.name, ctx.alpha = name, alpha
        return ((z > 0) if strict else (z >= 0)).to(dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        (z,) = ctx.saved_tensors
        return grad * derivative(ctx.name, ctx.alpha, z), None, None, None, None


def _spike(sur: SurrogateSpec, z: torch.Tensor, dtype: torch.dtype, strict: bool = False) -> torch.Tensor:
    if sur.opaque:
        s = sur.fn(z)
        return s if s.dtype == dtype else s.to(dtype)
    if torch.is_grad_enabled() and z.requires_grad:
        return _Spike.apply(z, sur.name, sur.alpha, strict, dtype)
    return ((z > 0) if strict else (z >= 0)).to(dtype)


def _apply(o: Op, a: Sequence[Any], ir: NeuronIR, like: torch.Tensor) -> torch.Tensor:
    """One op with the torch call eager made (same function, same argument order: same rounding)."""
    op = o.op
    if op == "add":
        al = o.attr("alpha")
        return torch.add(a[0], a[1]) if al is None else torch.add(a[0], a[1], alpha=al)
    if op == "sub":
        al = o.attr("alpha")
        if not isinstance(a[0], torch.Tensor):          # c - x: torch.rsub(x, c)
            return torch.rsub(a[1], a[0]) if al is None else torch.rsub(a[1], a[0], alpha=al)
        return torch.sub(a[0], a[1]) if al is None else torch.sub(a[0], a[1], alpha=al)
    if op == "mul":
        return torch.mul(a[0], a[1]) if isinstance(a[0], torch.Tensor) else torch.mul(a[1], a[0])
    if op == "div":
        return torch.div(a[0], a[1])
    if op in ("minimum", "maximum", "logical_and", "logical_or", "logical_xor", "heaviside"):
        t = [x if isinstance(x, torch.Tensor) else torch.tensor(x, dtype=like.dtype) for x in a]
        return getattr(torch, op)(t[0], t[1])
    if op in COMPARE:
        return getattr(torch, op)(a[0], a[1]) if isinstance(a[0], torch.Tensor) else \
            getattr(torch, {"ge": "le", "gt": "lt", "le": "ge", "lt": "gt", "eq": "eq", "ne": "ne"}[op])(a[1], a[0])
    if op == "where":
        return torch.where(a[0], a[1], a[2])
    if op == "fill":
        return torch.full_like(like, o.attr("value"), dtype=dtype_of(o.dtype))
    if op == "cast":
        return a[0].to(dtype_of(o.dtype))
    if op == "detach":
        return a[0].detach()
    if op == "copy":
        return a[0].clone()
    if op == "pow":
        return torch.pow(a[0], o.attr("exponent"))
    if op == "clamp":
        return torch.clamp(a[0], o.attr("min"), o.attr("max"))
    if op == "spike":
        return _spike(ir.surrogates[o.attr("surrogate")], a[0], dtype_of(o.dtype), bool(o.attr("strict")))
    if op in ("neg", "exp", "log", "sigmoid", "tanh", "abs", "sqrt", "rsqrt", "reciprocal", "relu", "sign",
              "logical_not", "floor", "ceil", "round"):
        return getattr(torch, op)(a[0])
    raise ValueError(f"neuron IR: unknown op {op!r}")


def interpret(ir: NeuronIR, x: torch.Tensor, states: Sequence[torch.Tensor], params: Mapping[str, torch.Tensor]
              ) -> Tuple[Tuple[torch.Tensor, ...], Tuple[torch.Tensor, ...]]:
    """Run one step of ``ir`` with torch: ``(outputs, new_states)``. Differentiable (spike ops carry
    their surrogate), so autograd of this is the BPTT of the module."""
    env: Dict[str, Any] = {ir.x: x}
    env.update(zip(ir.states, states))
    env.update(params)
    for o in ir.ops:
        args = [env[a] if isinstance(a, str) else a for a in o.args]
        env[o.out] = _apply(o, args, ir, x)
    return tuple(env[n] for n in ir.outputs), tuple(env[n] for n in ir.new_states)


# ----------------------------------------------------------------------------- loop-invariant ops
def hoist_static(first: NeuronIR, steady: NeuronIR) -> Tuple[NeuronIR, NeuronIR, Tuple[Op, ...]]:
    """Move the ops that read only parameters (``sigmoid(self.w)`` of a learnable decay, ``beta.clamp(0, 1)``)
    out of the per-step graphs: they become a prelude run once per call by torch on the parameter tensors
    (the same torch calls eager makes each step, so the same values), whose results are extra parameters.
    Returns ``(first', steady', prelude)``; both steps get the same, longer, ``params``.

    NOTE: a kernel would otherwise evaluate them per neuron per step (an ``exp`` per element for a
    per-channel sigmoid decay); autograd differentiates the prelude, the kernel only sees its results."""
    from dataclasses import replace
    prelude: List[Op] = []
    outs: List[List[Op]] = []
    extra: List[str] = []
    dts: Dict[str, str] = {}
    for tag, ir in (("hf", first), ("hs", steady)):
        static = set(ir.params)
        rename: Dict[str, str] = {}
        keep: List[Op] = []
        for o in ir.ops:
            vals = o.value_args()
            if vals and o.op != "spike" and all(v in static for v in vals):
                new = f"{tag}_{o.out}"
                rename[o.out] = new
                static.add(o.out)
                prelude.append(replace(o, out=new, args=tuple(rename.get(a, a) if isinstance(a, str) else a
                                                              for a in o.args)))
                dts[new] = o.dtype
            else:
                keep.append(replace(o, args=tuple(rename.get(a, a) if isinstance(a, str) else a for a in o.args)))
        used = {a for o in keep for a in o.value_args()} | set(ir.outputs) | set(ir.new_states)
        extra += [rename[k] for k in rename if rename[k] in used or k in used]
        outs.append(keep)
        dts.update(dict(ir.dtypes))
    extra = list(dict.fromkeys(extra))
    params = first.params + tuple(extra)

    def rebuild(ir: NeuronIR, ops: List[Op], tag: str) -> NeuronIR:
        ren = {o.out[len(tag) + 1:]: o.out for o in prelude if o.out.startswith(tag + "_")}
        outputs = tuple(ren.get(n, n) for n in ir.outputs)
        new_states = tuple(ren.get(n, n) for n in ir.new_states)
        dtypes = dict(ir.dtypes)
        dtypes.update({p: dts[p] for p in extra})
        return replace(ir, params=params, ops=tuple(ops), outputs=outputs, new_states=new_states,
                       dtypes=tuple(sorted(dtypes.items())))
    return rebuild(first, outs[0], "hf"), rebuild(steady, outs[1], "hs"), tuple(prelude)


def run_prelude(prelude: Sequence[Op], params: Mapping[str, torch.Tensor], like: torch.Tensor,
                names: Sequence[str]) -> Tuple[torch.Tensor, ...]:
    """Evaluate :func:`hoist_static`'s prelude with torch on the parameter tensors; the values of ``names``."""
    env: Dict[str, Any] = dict(params)
    dummy = NeuronIR("x", (), (), tuple(prelude), (), (), ())
    for o in prelude:
        env[o.out] = _apply(o, [env[a] if isinstance(a, str) else a for a in o.args], dummy, like)
    return tuple(env[n] for n in names)
