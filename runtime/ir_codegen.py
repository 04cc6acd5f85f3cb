"""The neuron IR as C statements, forward and backward: what the C/OpenMP and CUDA scans of every lifted
neuron are generated from (one generator per target, not one per neuron kind).

:func:`forward_body` writes one step for one neuron: each :class:`~snncc.neuron_ir.Op` becomes one C
statement over per-neuron scalars, computed in the dtype torch computed it in (``Op.cdtype``), with the
same operation and operand order as the torch call eager made, so that +, -, *, / and comparisons give the
same bits as eager (transcendental functions such as ``exp`` agree to an ulp or so: libm vs torch's
vectorized ones). :func:`backward_body` is its reverse-mode derivative, op by op, with the formulas of
torch's own derivatives (``derivatives.yaml``), and the spike op's surrogate derivative (a known formula,
or the user's function's derivative precomputed by its own backward and read from ``DSUR<k>``).

Names: IR values keep their names (``x``, ``state_v``, ``p_beta``, ``v7``); their adjoints are ``g_<name>``.
The target (C or CUDA) supplies the loops around these bodies.
"""
from __future__ import annotations

import re
from typing import Dict, List, Optional, Sequence, Tuple

from snncc.neuron_ir import COMPARE, NeuronIR, Op
from .codegen import SURROGATES

__all__ = ["CTYPES", "ctype", "literal", "forward_body", "backward_body", "supported_ir", "float_values"]

CTYPES = {"float32": "float", "float64": "double", "bool": "unsigned char"}
_FLOAT = ("float32", "float64")
_NO_GRAD = set(COMPARE) | {"detach", "fill", "logical_not", "logical_and", "logical_or", "logical_xor",
                           "heaviside", "sign", "floor", "ceil", "round"}


def ctype(dtype: str) -> str:
    return CTYPES[dtype]


def supported_ir(ir: NeuronIR) -> Optional[str]:
    """None if the C/CUDA generators handle ``ir``; else why not (the reference scan runs it)."""
    for name, dt in ir.dtypes:
        if dt not in CTYPES:
            return f"value {name} has dtype {dt}"
    for o in ir.ops:
        if o.dtype not in CTYPES or o.cdtype not in CTYPES:
            return f"op {o.op} computes in {o.cdtype}"
    return None


def literal(value: object, dtype: str) -> str:
    """A C constant with exactly the value torch would use in ``dtype`` (hex floats: no decimal rounding)."""
    if dtype == "bool":
        return "1" if value else "0"
    v = float(value)          # type: ignore[arg-type]
    if v != v:
        return f"(({ctype(dtype)})NAN)"
    if v in (float("inf"), float("-inf")):
        return f"(({ctype(dtype)}){'' if v > 0 else '-'}INFINITY)"
    return f"(({ctype(dtype)}){v.hex()})"


def _fn(name: str, dtype: str) -> str:
    """libm's name for ``name`` in ``dtype`` (float: the ``f`` variants)."""
    return name + ("f" if dtype == "float32" else "")


def float_values(ir: NeuronIR) -> List[str]:
    """Every value with a floating dtype (those have adjoints)."""
    return [n for n, dt in ir.dtypes if dt in _FLOAT and _defined(ir, n)]


def _defined(ir: NeuronIR, name: str) -> bool:
    return name == ir.x or name in ir.states or name in ir.params or any(o.out == name for o in ir.ops)


#: d(op)/d(a) times the incoming adjoint ``gy``, for one-argument ops (``y`` is the op's value), as torch's
#: derivatives.yaml writes them
_UNARY_ADJOINTS = {
    "neg": "-{gy}",
    "exp": "{gy} * {y}",
    "log": "{gy} / {a}",
    "sigmoid": "{gy} * ({one} - {y}) * {y}",
    "tanh": "{gy} * ({one} - {y} * {y})",
    "abs": "{gy} * ({ct})(({a} > 0) - ({a} < 0))",
    "sqrt": "{gy} / ({two} * {y})",
    "rsqrt": "{mhalf} * {gy} * ({y} * {y} * {y})",
    "reciprocal": "-{gy} * ({y} * {y})",
    "relu": "{y} > 0 ? {gy} : {zero}",
}


class _Emitter:
    def __init__(self, ir: NeuronIR, exp_float: str = "expf") -> None:
        self.ir = ir
        self.exp_float = exp_float
        self.dt: Dict[str, str] = dict(ir.dtypes)

    def arg(self, a: object, to: str) -> str:
        """An operand converted to the computation dtype ``to`` (as torch's type promotion does)."""
        if isinstance(a, str):
            src = self.dt[a]
            if src == to:
                return a
            if to == "bool":
                return f"({a} != 0)"
            return f"(({ctype(to)}){a})"
        return literal(a, to)

    # ---------------------------------------------------------------- forward
    def expr(self, o: Op) -> str:
        op, cd, args = o.op, o.cdtype, o.args
        A = [self.arg(a, cd) for a in args] if op not in ("where", "cast", "copy", "detach") else []
        f = lambda n: _fn(n, cd)  # noqa: E731
        if op == "add":
            al = o.attr("alpha")
            return f"{A[0]} + {A[1]}" if al is None else f"{A[0]} + {literal(al, cd)} * {A[1]}"
        if op == "sub":
            al = o.attr("alpha")
            return f"{A[0]} - {A[1]}" if al is None else f"{A[0]} - {literal(al, cd)} * {A[1]}"
        if op == "mul":
            return f"{A[0]} * {A[1]}"
        if op == "div":
            return f"{A[0]} / {A[1]}"
        if op in ("minimum", "maximum"):
            c = "<" if op == "minimum" else ">"
            return f"(isnan({A[0]}) ? {A[0]} : (isnan({A[1]}) ? {A[1]} : ({A[0]} {c} {A[1]} ? {A[0]} : {A[1]})))"
        if op in COMPARE:
            c = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<", "eq": "==", "ne": "!="}[op]
            return f"({A[0]} {c} {A[1]})"
        if op == "logical_and":
            return f"(({A[0]} != 0) & ({A[1]} != 0))"
        if op == "logical_or":
            return f"(({A[0]} != 0) | ({A[1]} != 0))"
        if op == "logical_xor":
            return f"(({A[0]} != 0) != ({A[1]} != 0))"
        if op == "logical_not":
            return f"({A[0]} == 0)"
        if op == "heaviside":
            return f"({A[0]} > 0 ? ({ctype(cd)})1 : ({A[0]} == 0 ? {A[1]} : ({ctype(cd)})0))"
        if op == "where":
            c = self.arg(args[0], "bool")
            return f"({c} ? {self.arg(args[1], o.dtype)} : {self.arg(args[2], o.dtype)})"
        if op == "fill":
            return literal(o.attr("value"), o.dtype)
        if op in ("cast", "copy", "detach"):
            return self.arg(args[0], o.dtype)
        if op == "neg":
            return f"-{A[0]}"
        if op in ("exp", "log", "tanh", "sqrt", "floor", "ceil"):
            return f"{f(op)}({A[0]})"
        if op == "round":
            return f"{f('rint')}({A[0]})"          # torch rounds half to even, as rint does
        if op == "abs":
            return f"{f('fabs')}({A[0]})"
        if op == "sigmoid":
            one = literal(1, cd)
            return f"{one} / ({one} + {f('exp')}(-{A[0]}))"
        if op == "rsqrt":
            return f"{literal(1, cd)} / {f('sqrt')}({A[0]})"
        if op == "reciprocal":
            return f"{literal(1, cd)} / {A[0]}"
        if op == "relu":
            return f"((({A[0]} > 0) | isnan({A[0]})) ? {A[0]} : {literal(0, cd)})"
        if op == "sign":
            return f"(({ctype(cd)})(({A[0]} > 0) - ({A[0]} < 0)))"
        if op == "pow":
            e = o.attr("exponent")
            a = A[0]
            one = literal(1, cd)
            special = {2.0: f"{a} * {a}", 3.0: f"{a} * {a} * {a}", 0.5: f"{f('sqrt')}({a})",
                       -0.5: f"{one} / {f('sqrt')}({a})", -1.0: f"{one} / {a}", -2.0: f"{one} / ({a} * {a})",
                       1.0: a, 0.0: one}
            return special.get(e, f"{f('pow')}({a}, {literal(e, cd)})")
        if op == "clamp":
            lo, hi = o.attr("min"), o.attr("max")
            e = A[0]
            if lo is not None:
                e = f"({e} < {literal(lo, cd)} ? {literal(lo, cd)} : {e})"
            if hi is not None:
                e = f"({e} > {literal(hi, cd)} ? {literal(hi, cd)} : {e})"
            return e
        if op == "spike":
            c = ">" if o.attr("strict") else ">="
            return f"({A[0]} {c} {literal(0, cd)} ? ({ctype(o.dtype)})1 : ({ctype(o.dtype)})0)"
        raise NotImplementedError(op)

    def forward(self, indent: str) -> List[str]:
        out = []
        for o in self.ir.ops:
            e = self.expr(o)
            if o.dtype != o.cdtype and o.op not in COMPARE + ("logical_and", "logical_or", "logical_xor",
                                                                 "logical_not", "spike", "where", "fill",
                                                                 "cast", "copy", "detach"):
                e = f"({ctype(o.dtype)})({e})"
            out.append(f"{indent}const {ctype(o.dtype)} {o.out} = {e};")
        return out

    # ---------------------------------------------------------------- backward
    def acc(self, target: object, expr: str) -> Optional[str]:
        """``g_target += expr`` in the target's dtype (None for constants and bool values)."""
        if not isinstance(target, str) or self.dt.get(target) not in _FLOAT:
            return None
        return f"g_{target} += ({ctype(self.dt[target])})({expr});"

    def adjoint(self, o: Op, spike_index: Dict[str, int]) -> List[str]:
        op, a, y = o.op, o.args, o.out
        if o.dtype not in _FLOAT or op in _NO_GRAD:
            return []
        cd = o.cdtype
        gy = f"(({ctype(cd)})g_{y})"
        A = [self.arg(v, cd) for v in a] if op not in ("where", "cast", "copy") else []
        f = lambda n: _fn(n, cd)  # noqa: E731
        lit = lambda v: literal(v, cd)  # noqa: E731
        s: List[Optional[str]] = []
        if op == "add":
            al = o.attr("alpha")
            s += [self.acc(a[0], gy), self.acc(a[1], gy if al is None else f"{lit(al)} * {gy}")]
        elif op == "sub":
            al = o.attr("alpha")
            s += [self.acc(a[0], gy), self.acc(a[1], f"-{gy}" if al is None else f"-({lit(al)} * {gy})")]
        elif op == "mul":
            s += [self.acc(a[0], f"{gy} * {A[1]}"), self.acc(a[1], f"{gy} * {A[0]}")]
        elif op == "div":
            s += [self.acc(a[0], f"{gy} / {A[1]}"), self.acc(a[1], f"-{gy} * {A[0]} / ({A[1]} * {A[1]})")]
        elif op in ("minimum", "maximum"):
            c0, c1 = (">", "<") if op == "maximum" else ("<", ">")
            half = f"{gy} / {lit(2)}"
            s += [self.acc(a[0], f"{A[0]} == {A[1]} ? {half} : ({A[0]} {c0} {A[1]} ? {gy} : {lit(0)})"),
                  self.acc(a[1], f"{A[0]} == {A[1]} ? {half} : ({A[0]} {c1} {A[1]} ? {gy} : {lit(0)})")]
        elif op == "where":
            c = self.arg(a[0], "bool")
            s += [self.acc(a[1], f"{c} ? {gy} : {lit(0)}"), self.acc(a[2], f"{c} ? {lit(0)} : {gy}")]
        elif op in ("cast", "copy"):
            s += [self.acc(a[0], f"g_{y}")]
        elif op in _UNARY_ADJOINTS:
            s += [self.acc(a[0], _UNARY_ADJOINTS[op].format(gy=gy, y=y, a=A[0], ct=ctype(cd), one=lit(1),
                                                             two=lit(2), mhalf=lit(-0.5), zero=lit(0)))]
        elif op == "pow":
            e = o.attr("exponent")
            if e == 0:
                pass
            elif e == 2.0:
                s += [self.acc(a[0], f"{gy} * {lit(2)} * {A[0]}")]
            elif e == 1.0:
                s += [self.acc(a[0], gy)]
            else:
                s += [self.acc(a[0], f"{gy} * {lit(e)} * {f('pow')}({A[0]}, {lit(e - 1)})")]
        elif op == "clamp":
            lo, hi = o.attr("min"), o.attr("max")
            conds = [f"({A[0]} >= {lit(lo)})"] if lo is not None else []
            conds += [f"({A[0]} <= {lit(hi)})"] if hi is not None else []
            # NOTE: `&`, not `&&`: a short-circuit is a branch, which kept gcc from vectorizing the loop
            cond = " & ".join(conds) or "1"
            s += [self.acc(a[0], f"({cond}) ? {gy} : {lit(0)}")]
        elif op == "spike":
            zd = self.dt[a[0]] if isinstance(a[0], str) else cd
            s += self.spike_adjoint(o, a[0], zd, spike_index[o.out])
        else:
            raise NotImplementedError(f"no derivative for {op}")
        return [x for x in s if x]

    def spike_adjoint(self, o: Op, z: object, zd: str, k: int) -> List[Optional[str]]:
        sur = self.ir.surrogates[o.attr("surrogate")]
        gy = f"(({ctype(zd)})g_{o.out})"
        if sur.opaque:
            return [self.acc(z, f"{gy} * ({ctype(zd)})DSUR{k}")]
        snippet = SURROGATES[sur.name]
        t = ctype(zd)
        exp = self.exp_float if zd == "float32" else _fn("exp", zd)
        snippet = snippet.replace("(T)", f"({t})").replace("EXP(", exp + "(")
        snippet = snippet.replace("FABS(", _fn("fabs", zd) + "(").replace("M_PI", "3.141592653589793")
        snippet = re.sub(r"\bA\b", literal(sur.alpha, zd), snippet)
        snippet = re.sub(r"\bT\b", t, snippet)
        snippet = re.sub(r"\bz\b", f"zz_{o.out}", snippet)
        acc = self.acc(z, f"{gy} * d")
        return [f"{{ const {t} zz_{o.out} = {z}; {t} d; {snippet} {acc} }}" if acc else None]

    def backward(self, indent: str) -> List[str]:
        spike_index = {o.out: i for i, o in enumerate(self.ir.spike_ops)}
        out = []
        for o in reversed(self.ir.ops):
            out += [indent + line for line in self.adjoint(o, spike_index)]
        return out


def forward_body(ir: NeuronIR, indent: str = "        ") -> str:
    """C statements computing every op of one step; inputs (``x``, states, params) must be in scope."""
    return "\n".join(_Emitter(ir).forward(indent))


def backward_body(ir: NeuronIR, indent: str = "        ", exp_float: str = "expf") -> str:
    """C statements accumulating ``g_<value>`` for every value, from the adjoints of the outputs and new
    states (which the caller has added to their ``g_`` variables), after :func:`forward_body`. A spike op
    with a user surrogate reads its precomputed derivative ``DSUR<k>`` (k: its index among spike ops).
    ``exp_float``: the float ``exp`` a known surrogate's derivative calls (the C target passes its
    vectorizable ``snn_expf``: gradients are to float tolerance; forward values never use it)."""
    return "\n".join(_Emitter(ir, exp_float).backward(indent))
