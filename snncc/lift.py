"""Lift a stateful module's step into the neuron IR, by running its own forward and recording it.

A neuron is its step code: SpikingJelly's nodes (0.0.0.0.14 and 2.x), snnTorch's ``Leaky``/``Synaptic``, or
a user's class with its state in an attribute and a ``reset()``. Recognition is by behaviour, never by
import path:

1. **States** are the attributes a forward call replaces with tensors shaped like the input (SpikingJelly's
   memories such as ``v``, snnTorch's ``mem``/``syn`` buffers, a user's ``self.v``), found by one probe call.
2. **The step** is recorded at the ``__torch_function__`` level (``TorchFunctionMode``) with the states set to
   probe tensors: every torch call becomes an :class:`~snncc.neuron_ir.Op`; the module's parameters and
   buffers become named inputs. A custom ``autograd.Function`` (a surrogate spike) is recorded as one
   ``spike`` op after probing that its forward is ``z >= 0`` (or ``z > 0``) and its backward elementwise;
   its derivative is matched against snncc's known formulas, else the user's backward is used as is.
   The step from the reset state is recorded too, so lazily created state (``None``, SpikingJelly's float
   ``v``, snnTorch's empty ``mem``) starts exactly as the module would start it.
3. **Checked** against the module run eagerly for several steps on probe inputs (float64 and the run's
   dtype): identical outputs and states, and gradients to rounding.

What cannot be lifted exactly gets a reason (``LiftFailure``) and the module runs opaque, step by step:
data-dependent Python control flow (``if v.max() > 1``), ops mixing neurons (sums, views, matmuls),
random draws, non-tensor state (a step counter), TorchScript bodies the recorder cannot see, tuple outputs.
Lifting leaves nothing behind: every attribute is restored and the global RNG is untouched.
"""
from __future__ import annotations

import functools
import math
import re
import sys
import threading
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .neuron_ir import COMPARE, NeuronIR, Op, interpret
from .surrogate import KNOWN_SURROGATES, SurrogateSpec, derivative, plain_step_surrogate

__all__ = ["LiftFailure", "Lifted", "lift_neuron", "state_attrs", "restore_attrs", "snapshot_attrs",
           "module_tensors"]

_DEFAULT_ALPHA = {"sigmoid": 4.0, "atan": 2.0, "superspike": 10.0, "piecewise_linear": 1.0, "triangle": 1.0,
                  "rectangular": 1.0, "erf": 2.0}
_RANDOM = {"rand", "rand_like", "randn", "randn_like", "randint", "randint_like", "bernoulli", "bernoulli_",
           "normal", "normal_", "uniform_", "exponential_", "poisson", "multinomial", "dropout",
           "random_", "cauchy_", "geometric_", "log_normal_"}
_DATA_DEPENDENT = {"__bool__", "item", "tolist", "__float__", "__int__", "__index__", "nonzero", "__len__",
                   "numpy"}


class LiftFailure(Exception):
    """Why a module's step could not be lifted exactly (it then runs opaque, step by step)."""


@dataclass(frozen=True)
class Lifted:
    """A module's step in the neuron IR, for one dtype.

    ``state_attrs``: where the module keeps each state (``first.new_states``/``steady.states`` line up with
    them); ``param_attrs``: the module attribute path of each IR parameter (``steady.params`` order);
    ``first``: the step from the reset state; ``steady``: every later step. ``output_grad``: the module's
    output carries a gradient in training (False for a hard threshold without a surrogate: eager's output
    then has no ``grad_fn``, so nothing before the neuron gets a gradient, not even a zero one)."""

    state_attrs: Tuple[str, ...]
    param_attrs: Tuple[str, ...]
    first: NeuronIR
    steady: NeuronIR
    dtype: torch.dtype
    output_grad: bool = True

    def params(self, m: nn.Module) -> Tuple[torch.Tensor, ...]:
        return tuple(_get_path(m, p) for p in self.param_attrs)

    def params_except(self, m: nn.Module, name: str) -> Tuple[torch.Tensor, ...]:
        """The parameters but IR parameter ``name`` (a recurrent cell's tap, computed at run time)."""
        return tuple(_get_path(m, p) for p, n in zip(self.param_attrs, self.steady.params) if n != name)

    @property
    def binary_output(self) -> bool:
        from .neuron_ir import binary_values
        return all(o in binary_values(ir) for ir in (self.first, self.steady) for o in ir.outputs)

    def binary_output_for(self, m: nn.Module) -> bool:
        """``binary_output``, also counting as 0/1 the parameters of ``m`` that are small persistent
        buffers holding only 0 and 1 (snnTorch's ``graded_spikes_factor``, 1.0 unless learned: its output
        is ``spike * graded_spikes_factor``).

        NOTE: only such buffers: their values are part of the module's recognition key
        (``recognize.config_key``), so a new value re-specializes; a Parameter's values are not."""
        from .neuron_ir import binary_values
        ones = frozenset(name for name, path in zip(self.steady.params, self.param_attrs)
                         if _binary_buffer(m, path))
        return all(o in binary_values(ir, ones) for ir in (self.first, self.steady) for o in ir.outputs)


def _binary_buffer(m: nn.Module, path: str) -> bool:
    """``path`` names a persistent buffer of <= 16 elements, no grad, every value 0 or 1."""
    owner_path, _, leaf = path.rpartition(".")
    try:
        owner = m.get_submodule(owner_path) if owner_path else m
    except AttributeError:
        return False
    b = owner._buffers.get(leaf)
    if b is None or leaf in getattr(owner, "_non_persistent_buffers_set", ()) or b.requires_grad or b.numel() > 16:
        return False
    v = b.detach().cpu()
    return bool(((v == 0) | (v == 1)).all())


# ----------------------------------------------------------------------------- module attributes
_MISSING = object()


def snapshot_attrs(m: nn.Module) -> Dict[Tuple[str, str], Any]:
    """Everything a forward may reassign: plain attributes, buffers, SpikingJelly memories (shallow)."""
    snap: Dict[Tuple[str, str], Any] = {}
    for k, v in vars(m).items():
        if k not in ("_parameters", "_buffers", "_modules", "_memories", "_memories_rv") and \
                not k.startswith(("_forward", "_backward", "_state_dict", "_load")):
            snap[("attr", k)] = v
    for k, v in m._buffers.items():
        snap[("buffer", k)] = v
    mem = vars(m).get("_memories")
    if isinstance(mem, dict):
        for k, v in mem.items():
            snap[("memory", k)] = v
    return snap


def restore_attrs(m: nn.Module, snap: Dict[Tuple[str, str], Any]) -> None:
    """Put back what :func:`snapshot_attrs` saw; drop attributes that appeared since."""
    now = snapshot_attrs(m)
    for (kind, k), v in snap.items():
        if now.get((kind, k), _MISSING) is v:
            continue
        if kind == "attr":
            object.__setattr__(m, k, v)
        elif kind == "buffer":
            m._buffers[k] = v
        else:
            m._memories[k] = v
    for (kind, k) in now:
        if (kind, k) not in snap:
            if kind == "attr":
                object.__delattr__(m, k)
            elif kind == "buffer":
                del m._buffers[k]
            else:
                del m._memories[k]


def _set_state(m: nn.Module, name: str, value: Any) -> None:
    """Write state ``name`` (``attr#i``: element i of a tuple attribute, as snncc's neurons keep ``state``)."""
    if "#" in name:
        base, i = name.split("#")
        cur = _get_state(m, base)
        lst = list(cur) if isinstance(cur, (tuple, list)) else []
        lst += [None] * (int(i) + 1 - len(lst))
        lst[int(i)] = value
        _set_state(m, base, tuple(lst))
        return
    mem = vars(m).get("_memories")
    if isinstance(mem, dict) and name in mem:
        mem[name] = value
    elif name in m._buffers:
        m._buffers[name] = value
    else:
        object.__setattr__(m, name, value)


def _get_state(m: nn.Module, name: str) -> Any:
    if "#" in name:
        base, i = name.split("#")
        cur = _get_state(m, base)
        return cur[int(i)] if isinstance(cur, (tuple, list)) and len(cur) > int(i) else None
    mem = vars(m).get("_memories")
    if isinstance(mem, dict) and name in mem:
        return mem[name]
    if name in m._buffers:
        return m._buffers[name]
    return vars(m).get(name, getattr(m, name, None))


def _get_path(m: nn.Module, path: str) -> Any:
    obj: Any = m
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def module_tensors(m: nn.Module, skip: Sequence[str] = ()) -> Dict[str, torch.Tensor]:
    """Tensors the step may read: parameters, buffers and tensor attributes of ``m`` and its children."""
    out: Dict[str, torch.Tensor] = {}
    for prefix, sub in m.named_modules():
        pre = prefix + "." if prefix else ""
        for k, v in list(sub._parameters.items()) + list(sub._buffers.items()):
            if v is not None and (pre + k) not in skip:
                out[pre + k] = v
        for k, v in vars(sub).items():
            if isinstance(v, torch.Tensor) and not k.startswith("_") and (pre + k) not in skip:
                out.setdefault(pre + k, v)
    return out


def _reset(m: nn.Module) -> None:
    from .frontend import reset_module
    reset_module(m)


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return False
    try:
        return bool(a == b)
    except Exception:
        return False


def state_attrs(m: nn.Module, x: torch.Tensor) -> Tuple[str, ...]:
    """The attributes one forward call replaces with tensors shaped like ``x``: the module's state.

    Raises LiftFailure if the forward changes anything else (a step counter, a list it appends to)."""
    _reset(m)
    before = snapshot_attrs(m)
    try:
        with torch.no_grad():
            out = m(x)
        after = snapshot_attrs(m)
    finally:
        restore_attrs(m, before)
    states, other = [], []
    for key, v in after.items():
        old = before.get(key, _MISSING)
        if _same(v, old):
            continue
        if isinstance(v, torch.Tensor) and v.shape == x.shape:
            states.append(key[1])
        elif isinstance(v, tuple) and v and all(isinstance(e, torch.Tensor) and e.shape == x.shape for e in v):
            states += [f"{key[1]}#{i}" for i in range(len(v))]      # a tuple of states (snncc's `state`)
        else:
            other.append(key[1])
    if other:
        raise LiftFailure(f"its forward changes non-tensor or differently shaped state {other} "
                          "(only state shaped like the input can be scanned)")
    if not isinstance(out, torch.Tensor):
        raise LiftFailure(f"its forward returns {type(out).__name__}, not one tensor (snncc compiles neurons "
                          "that return their spikes; a tuple such as snnTorch's output=True runs opaque)")
    return tuple(dict.fromkeys(states))


# ----------------------------------------------------------------------------- recording
class _Value:
    __slots__ = ("name", "dynamic")

    def __init__(self, name: str, dynamic: bool) -> None:
        self.name, self.dynamic = name, dynamic


_TLS = threading.local()


class _Recorder(TorchFunctionMode):
    """Records the torch calls of one forward as neuron-IR ops (see the module docstring)."""

    def __init__(self, x_shape: torch.Size) -> None:
        super().__init__()
        self.vals: Dict[int, _Value] = {}
        self.alive: List[torch.Tensor] = []
        self.ops: List[Op] = []
        self.dtypes: Dict[str, str] = {}
        self.surrogates: List[Tuple[SurrogateSpec, bool]] = []
        self.error: Optional[str] = None
        self.suspended = 0
        self.mixed: Dict[int, str] = {}          # id -> op: results of reductions and other non-elementwise ops
        self.x_shape = x_shape
        self._n = 0

    # values
    def leaf(self, t: torch.Tensor, name: str, dynamic: bool) -> None:
        self.vals[id(t)] = _Value(name, dynamic)
        self.alive.append(t)
        self.dtypes[name] = _dname(t.dtype)

    def _new(self, t: torch.Tensor, dynamic: bool) -> str:
        self._n += 1
        name = f"v{self._n}"
        self.vals[id(t)] = _Value(name, dynamic)
        self.alive.append(t)
        self.dtypes[name] = _dname(t.dtype)
        return name

    def value(self, t: torch.Tensor) -> Optional[_Value]:
        return self.vals.get(id(t))

    def _arg(self, a: Any) -> Tuple[Any, bool]:
        """(IR argument, dynamic) for a call argument."""
        if isinstance(a, torch.Tensor):
            if id(a) in self.mixed:
                raise LiftFailure(f"`{self.mixed[id(a)]}` is not an elementwise op snncc can lift (it mixes "
                                  "neurons)")
            v = self.value(a)
            if v is not None:
                return v.name, v.dynamic
            if a.numel() >= 1 and a.dim() <= len(self.x_shape) and _uniform(a) and \
                    _broadcasts(tuple(a.shape), tuple(self.x_shape)):
                c = a.reshape(-1)[0].item()      # a constant the forward made (zeros_like, torch.tensor(0.5))
                return c, False
            raise LiftFailure(f"it reads a tensor of shape {tuple(a.shape)} that is neither its input, a state, "
                              "a parameter nor a buffer")
        if isinstance(a, (bool, int, float)) or a is None:
            return a, False
        raise LiftFailure(f"an argument of type {type(a).__name__} is not supported in a neuron step")

    def __torch_function__(self, func: Callable, types: Any, args: Tuple = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.suspended or self.error is not None:
            return out
        try:
            self._record(func, args, kwargs, out)
        except LiftFailure as exc:
            self.error = str(exc)
        return out

    def emit(self, op: str, args: Sequence[Any], out: torch.Tensor, dynamic: bool, cdtype: torch.dtype,
             attrs: Tuple[Tuple[str, Any], ...] = ()) -> str:
        if dynamic and not _broadcasts(tuple(out.shape), tuple(self.x_shape)):
            raise LiftFailure(f"`{op}` gives shape {tuple(out.shape)} from an input of shape "
                              f"{tuple(self.x_shape)}: not elementwise")
        name = self._new(out, dynamic)
        self.ops.append(Op(name, op, tuple(args), _dname(out.dtype), _dname(cdtype), attrs))
        return name

    def _record(self, func: Callable, args: Tuple, kwargs: Dict[str, Any], out: Any) -> None:
        name = getattr(func, "__name__", str(func))
        if name == "__get__":                                   # a property: .data, .shape, .dtype ...
            owner = getattr(func, "__self__", None)
            pname = getattr(owner, "__name__", "")
            if pname == "data" and isinstance(out, torch.Tensor) and args and self.value(args[0]):
                v = self.value(args[0])
                self.emit("detach", (v.name,), out, v.dynamic, out.dtype)
            return
        tensors = [a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)]
        tracked = [self.value(t) for t in tensors if self.value(t) is not None]
        dynamic = any(v.dynamic for v in tracked)
        if name in _DATA_DEPENDENT:
            if dynamic or any(id(t) in self.mixed for t in tensors):
                raise LiftFailure(f"data-dependent Python control flow (`Tensor.{name}` on a value that depends on "
                                  "the input or state); rewrite it with torch.where")
            return
        if name in _RANDOM:
            raise LiftFailure(f"it draws random numbers (`{name}`)")
        if name == "unbind" and isinstance(out, tuple) and len(out) == 1 and args and \
                isinstance(args[0], torch.Tensor) and self.value(args[0]) is not None:
            self.vals[id(out[0])] = self.value(args[0])      # `for x in x_seq` over a sequence of one
            self.alive.append(out[0])
            return
        if name == "__setitem__":
            _setitem(self, args, dynamic)
            return
        if name in _ALIASES and isinstance(out, torch.Tensor):
            _alias(self, name, args, kwargs, out, dynamic)
            return
        if not isinstance(out, torch.Tensor):
            if dynamic and not isinstance(out, (torch.Size, torch.dtype, torch.device, int, bool, str)):
                raise LiftFailure(f"`{name}` returns {type(out).__name__}")
            return
        mixed = [self.mixed[id(t)] for t in tensors if id(t) in self.mixed]
        if mixed:
            self.mixed[id(out)] = mixed[0]          # derived from a value that mixes neurons
            self.alive.append(out)
            return
        if not tracked and not any(isinstance(a, torch.Tensor) for a in tensors):
            return          # a factory (torch.tensor, torch.zeros): a constant if used later
        rule = _RULES.get(name)
        if rule is None:
            if not dynamic:
                return      # work on buffers only: its result is a constant to the step (or unused)
            # NOTE: not an error yet: a reduction feeding an `if` is data-dependent control flow, and the
            # message should say so; using it in the step is the error (see _arg)
            self.mixed[id(out)] = name
            self.alive.append(out)
            return
        rule(self, name, args, kwargs, out, dynamic)


def _dname(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


def _uniform(t: torch.Tensor) -> bool:
    flat = t.detach().reshape(-1)
    return bool((flat == flat[0]).all()) or bool(torch.isnan(flat).all())


def _broadcasts(shape: Tuple[int, ...], to: Tuple[int, ...]) -> bool:
    while len(shape) > len(to) and shape[0] == 1:
        shape = shape[1:]
    if len(shape) > len(to):
        return False
    return all(a == 1 or a == b for a, b in zip(reversed(shape), reversed(to)))


_ALIASES = {"unsqueeze", "squeeze", "view", "reshape", "reshape_as", "view_as", "flatten", "__getitem__",
            "expand", "expand_as", "stack", "cat", "select", "unflatten", "movedim", "permute", "contiguous"}


def _same_elements(a: Tuple[int, ...], b: Tuple[int, ...]) -> bool:
    """Same elements in the same order: the shapes differ only by size-1 dimensions."""
    return [d for d in a if d != 1] == [d for d in b if d != 1]


def _alias(rec: _Recorder, name: str, args: Tuple, kwargs: Dict, out: torch.Tensor, dyn: bool) -> None:
    """Reshapes that only add or drop size-1 dimensions (SpikingJelly 2.x runs a single step as a
    sequence of one: ``x.unsqueeze(0)`` ... ``spikes[0]``): the same per-neuron value."""
    src = args[0]
    if name in ("stack", "cat"):
        seq = args[0]
        if not isinstance(seq, (list, tuple)) or len(seq) != 1:
            if dyn:
                raise LiftFailure(f"`{name}` of several tensors is not elementwise")
            return
        src = seq[0]
    if not isinstance(src, torch.Tensor):
        return
    v = rec.value(src)
    if v is None:
        return
    if out.numel() != src.numel() or not _same_elements(tuple(out.shape), tuple(src.shape)):
        if dyn:
            raise LiftFailure(f"`{name}` moves values between neurons (shape {tuple(src.shape)} -> "
                              f"{tuple(out.shape)})")
        return
    rec.vals[id(out)] = v
    rec.alive.append(out)


def _setitem(rec: _Recorder, args: Tuple, dyn: bool) -> None:
    """``buf[0] = value`` into a sequence of one step: the buffer now holds that value."""
    dst, idx, val = args[0], args[1], args[2]
    if not isinstance(dst, torch.Tensor) or not (dyn or rec.value(dst) is not None):
        return
    if isinstance(idx, int) and dst.shape[:1] == (1,) and isinstance(val, torch.Tensor) and \
            tuple(val.shape) == tuple(dst.shape[1:]):
        (vv, _) = rec._arg(val)
        if isinstance(vv, str) and val.dtype == dst.dtype:
            rec.vals[id(dst)] = rec.vals[id(val)]
            return
        if isinstance(vv, str):
            rec.emit("cast", (vv,), dst, dyn, dst.dtype)
            return
    raise LiftFailure("indexed assignment into a tensor is not elementwise")


def _binary(op: str, swap: bool = False) -> Callable:
    def rule(rec: _Recorder, name: str, args: Tuple, kwargs: Dict, out: torch.Tensor, dyn: bool) -> None:
        a = args[0]
        b = args[1] if len(args) > 1 else kwargs.get("other")
        if name in ("div", "div_", "divide", "true_divide") and kwargs.get("rounding_mode") is not None:
            raise LiftFailure("division with a rounding mode")
        alpha = kwargs.get("alpha")
        if len(args) > 2:
            raise LiftFailure(f"`{name}` with {len(args)} arguments")
        (aa, _), (bb, _) = rec._arg(a), rec._arg(b)
        if swap:
            aa, bb = bb, aa
        attrs = (("alpha", alpha),) if alpha is not None and alpha != 1 else ()
        rec.emit(op, (aa, bb), out, dyn, out.dtype, attrs)
    return rule


def _compare(op: str) -> Callable:
    def rule(rec: _Recorder, name: str, args: Tuple, kwargs: Dict, out: torch.Tensor, dyn: bool) -> None:
        a, b = args[0], args[1] if len(args) > 1 else kwargs.get("other")
        cd = torch.result_type(a, b)
        (aa, _), (bb, _) = rec._arg(a), rec._arg(b)
        rec.emit(op, (aa, bb), out, dyn, cd)
    return rule


def _unary(op: str) -> Callable:
    def rule(rec: _Recorder, name: str, args: Tuple, kwargs: Dict, out: torch.Tensor, dyn: bool) -> None:
        if len(args) != 1 or kwargs:
            raise LiftFailure(f"`{name}` with extra arguments")
        (aa, _) = rec._arg(args[0])
        rec.emit(op, (aa,), out, dyn, out.dtype)
    return rule


def _rdiv(rec: _Recorder, name: str, args: Tuple, kwargs: Dict, out: torch.Tensor, dyn: bool) -> None:
    """``c / x`` is ``x.reciprocal() * c`` in torch (Tensor.__rdiv__): recorded as those two ops."""
    (aa, _) = rec._arg(args[0])
    (cc, _) = rec._arg(args[1])
    recip = torch.reciprocal(args[0])
    r = rec.emit("reciprocal", (aa,), recip, dyn, recip.dtype)
    rec.emit("mul", (r, cc), out, dyn, out.dtype)


def _pow(rec: _Recorder, name: str, args: Tuple, kwargs: Dict, out: torch.Tensor, dyn: bool) -> None:
    e = args[1] if len(args) > 1 else kwargs.get("exponent")
    if not isinstance(e, (int, float)) or isinstance(e, bool) or not isinstance(args[0], torch.Tensor):
        raise LiftFailure("`pow` with a tensor exponent")
    (aa, _) = rec._arg(args[0])
    rec.emit("pow", (aa,), out, dyn, out.dtype, (("exponent", float(e)),))


def _clamp(rec: _Recorder, name: str, args: Tuple, kwargs: Dict, out: torch.Tensor, dyn: bool) -> None:
    lo = args[1] if len(args) > 1 else kwargs.get("min")
    hi = args[2] if len(args) > 2 else kwargs.get("max")
    if name == "clamp_max":
        lo, hi = None, lo
    if isinstance(lo, torch.Tensor) or isinstance(hi, torch.Tensor):
        raise LiftFailure("`clamp` with tensor bounds")
    (aa, _) = rec._arg(args[0])
    rec.emit("clamp", (aa,), out, dyn, out.dtype,
             (("min", None if lo is None else float(lo)), ("max", None if hi is None else float(hi))))


def _cast(rec: _Recorder, name: str, args: Tuple, kwargs: Dict, out: torch.Tensor, dyn: bool) -> None:
    src = args[0]
    if out is src:
        return                                   # .to(same dtype) / .float() of a float: the same tensor
    if out.shape != src.shape:
        raise LiftFailure(f"`{name}` changes the shape")
    (aa, _) = rec._arg(src)
    if not isinstance(aa, str):
        rec.emit("fill", (), out, False, out.dtype, (("value", aa),))
    elif out.dtype == src.dtype:
        rec.emit("copy", (aa,), out, dyn, out.dtype)
    else:
        rec.emit("cast", (aa,), out, dyn, out.dtype)


def _detach(rec: _Recorder, name: str, args: Tuple, kwargs: Dict, out: torch.Tensor, dyn: bool) -> None:
    (aa, _) = rec._arg(args[0])
    rec.emit("detach", (aa,), out, dyn, out.dtype)


def _copy(rec: _Recorder, name: str, args: Tuple, kwargs: Dict, out: torch.Tensor, dyn: bool) -> None:
    if name == "contiguous" and out is args[0]:
        return
    (aa, _) = rec._arg(args[0])
    rec.emit("copy", (aa,), out, dyn, out.dtype)


def _fill_like(value: Optional[float]) -> Callable:
    def rule(rec: _Recorder, name: str, args: Tuple, kwargs: Dict, out: torch.Tensor, dyn: bool) -> None:
        v = value if value is not None else (args[1] if len(args) > 1 else kwargs.get("fill_value"))
        if isinstance(v, torch.Tensor):
            raise LiftFailure("`full_like` with a tensor value")
        rec.emit("fill", (), out, False, out.dtype, (("value", float(v)),))
    return rule


def _where(rec: _Recorder, name: str, args: Tuple, kwargs: Dict, out: torch.Tensor, dyn: bool) -> None:
    if len(args) != 3:
        raise LiftFailure("`where` with one argument (indices) is not elementwise")
    c, a, b = (rec._arg(t)[0] for t in args)
    rec.emit("where", (c, a, b), out, dyn, out.dtype)


def _masked_fill(rec: _Recorder, name: str, args: Tuple, kwargs: Dict, out: torch.Tensor, dyn: bool) -> None:
    x, mask = args[0], args[1]
    val = args[2] if len(args) > 2 else kwargs.get("value")
    (xx, _), (mm, _), (vv, _) = rec._arg(x), rec._arg(mask), rec._arg(val)
    rec.emit("where", (mm, vv, xx), out, dyn, out.dtype)


def _minmax(op: str) -> Callable:
    def rule(rec: _Recorder, name: str, args: Tuple, kwargs: Dict, out: Any, dyn: bool) -> None:
        if len(args) != 2 or not isinstance(args[1], torch.Tensor):
            for t in (out if isinstance(out, tuple) else (out,)):     # a reduction: see _Recorder._record
                if isinstance(t, torch.Tensor):
                    rec.mixed[id(t)] = name
                    rec.alive.append(t)
            return
        (aa, _), (bb, _) = rec._arg(args[0]), rec._arg(args[1])
        rec.emit(op, (aa, bb), out, dyn, out.dtype)
    return rule


def _copy_(rec: _Recorder, name: str, args: Tuple, kwargs: Dict, out: torch.Tensor, dyn: bool) -> None:
    (ss, _) = rec._arg(args[1])
    src = args[1]
    if isinstance(src, torch.Tensor) and src.dtype == out.dtype:
        rec.emit("copy", (ss,), out, dyn, out.dtype)
    else:
        rec.emit("cast", (ss,), out, dyn, out.dtype)


def _fill_(value: Optional[float]) -> Callable:
    def rule(rec: _Recorder, name: str, args: Tuple, kwargs: Dict, out: torch.Tensor, dyn: bool) -> None:
        v = value if value is not None else args[1]
        if isinstance(v, torch.Tensor):
            raise LiftFailure("`fill_` with a tensor")
        rec.emit("fill", (), out, False, out.dtype, (("value", float(v)),))
    return rule


_RULES: Dict[str, Callable] = {}
for _n in ("add", "__add__", "__radd__", "__iadd__"):
    _RULES[_n] = _binary("add")
for _n in ("sub", "__sub__", "subtract", "__isub__"):
    _RULES[_n] = _binary("sub")
for _n in ("__rsub__", "rsub"):
    _RULES[_n] = _binary("sub", swap=True)
for _n in ("mul", "__mul__", "__rmul__", "multiply", "__imul__"):
    _RULES[_n] = _binary("mul")
for _n in ("div", "__truediv__", "true_divide", "divide", "__itruediv__", "__div__"):
    _RULES[_n] = _binary("div")
for _n in ("__rtruediv__", "__rdiv__"):
    _RULES[_n] = _rdiv
for _n, _op in (("logical_and", "logical_and"), ("__and__", "logical_and"), ("logical_or", "logical_or"),
                ("__or__", "logical_or"), ("logical_xor", "logical_xor"), ("__xor__", "logical_xor"),
                ("heaviside", "heaviside")):
    _RULES[_n] = _binary(_op)
for _op in COMPARE:
    for _n in (_op, f"__{_op}__"):
        _RULES[_n] = _compare(_op)
for _n, _op in (("greater_equal", "ge"), ("greater", "gt"), ("less_equal", "le"), ("less", "lt"),
                ("not_equal", "ne")):
    _RULES[_n] = _compare(_op)
for _op in ("neg", "exp", "log", "sigmoid", "tanh", "abs", "sqrt", "rsqrt", "reciprocal", "relu", "sign",
            "logical_not", "floor", "ceil", "round"):
    _RULES[_op] = _unary(_op)
_RULES.update({"__neg__": _unary("neg"), "negative": _unary("neg"), "__abs__": _unary("abs"),
               "__invert__": _unary("logical_not"), "pow": _pow, "__pow__": _pow, "clamp": _clamp,
               "clip": _clamp, "clamp_min": _clamp, "clamp_max": _clamp, "float": _cast, "double": _cast,
               "half": _cast, "bfloat16": _cast, "to": _cast, "type_as": _cast, "type": _cast, "bool": _cast,
               "detach": _detach, "clone": _copy, "zeros_like": _fill_like(0.0),
               "ones_like": _fill_like(1.0), "full_like": _fill_like(None), "where": _where,
               "masked_fill": _masked_fill, "minimum": _minmax("minimum"), "maximum": _minmax("maximum"),
               "max": _minmax("maximum"), "min": _minmax("minimum"), "fmax": _minmax("maximum"),
               "fmin": _minmax("minimum"), "copy_": _copy_, "zero_": _fill_(0.0), "fill_": _fill_(None)})
for _n, _base in (("add_", "add"), ("sub_", "sub"), ("mul_", "mul"), ("div_", "div"), ("neg_", "neg"),
                  ("exp_", "exp"), ("sigmoid_", "sigmoid"), ("tanh_", "tanh"), ("abs_", "abs"),
                  ("clamp_", "clamp"), ("clamp_min_", "clamp_min"), ("clamp_max_", "clamp_max"),
                  ("relu_", "relu"), ("masked_fill_", "masked_fill"), ("pow_", "pow"), ("sqrt_", "sqrt"),
                  ("reciprocal_", "reciprocal"), ("detach_", "detach")):
    _RULES[_n] = _RULES[_base]      # in place: the tensor's name moves to the new value


# ----------------------------------------------------------------------------- custom Functions = spikes
_ORIG_APPLY = torch.autograd.Function.__dict__["apply"]


def _recording_apply(cls: type, *args: Any, **kwargs: Any) -> Any:
    rec: Optional[_Recorder] = getattr(_TLS, "recorder", None)
    if rec is None or rec.suspended or rec.error is not None:
        return _ORIG_APPLY.__get__(None, cls)(*args, **kwargs)
    rec.suspended += 1
    try:
        out = _ORIG_APPLY.__get__(None, cls)(*args, **kwargs)
    finally:
        rec.suspended -= 1
    try:
        _record_spike(rec, cls, args, kwargs, out)
    except LiftFailure as exc:
        rec.error = str(exc)
    return out


def _record_spike(rec: _Recorder, cls: type, args: Tuple, kwargs: Dict, out: Any) -> None:
    tens = [(i, a) for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
    tracked = [(i, a) for i, a in tens if rec.value(a) is not None]
    if not tracked:
        return
    if len(tens) != 1 or kwargs or not isinstance(out, torch.Tensor):
        raise LiftFailure(f"custom autograd.Function {cls.__qualname__} takes {len(tens)} tensors "
                          "(a spike function takes one)")
    i, z = tens[0]
    rest = tuple(args[:i]), tuple(args[i + 1:])
    if any(not isinstance(a, (int, float, bool, str, type(None))) for a in rest[0] + rest[1]):
        raise LiftFailure(f"custom autograd.Function {cls.__qualname__} takes non-constant arguments")

    def fn(t: torch.Tensor) -> torch.Tensor:
        return cls.apply(*rest[0], t, *rest[1])

    rec.suspended += 1           # probing runs torch ops of its own: not part of the step
    try:
        kind = plain_step_surrogate(fn, strict_ok=True)
        alphas = [float(a) for a in rest[0] + rest[1] if isinstance(a, (int, float)) and not isinstance(a, bool)]
        sur = (known_surrogate(fn, alphas) or SurrogateSpec("callable", 1.0, fn)) if kind else None
    finally:
        rec.suspended -= 1
    if not kind or sur is None:
        raise LiftFailure(f"custom autograd.Function {cls.__qualname__} is not a spike function "
                          "(forward z >= 0 or z > 0, elementwise backward)")
    rec.surrogates.append((sur, kind == "strict"))
    v = rec.value(z)
    rec.emit("spike", (v.name,), out, v.dynamic, z.dtype,
             (("surrogate", len(rec.surrogates) - 1), ("strict", kind == "strict")))


def known_surrogate(fn: Callable[[torch.Tensor], torch.Tensor], alphas: Sequence[float] = ()
                    ) -> Optional[SurrogateSpec]:
    """The snncc surrogate whose derivative equals ``fn``'s (probed in float64), if any: then the kernels
    evaluate the formula inline instead of calling the user's backward."""
    z = torch.linspace(-3, 3, 97, dtype=torch.float64)
    z = torch.cat([z, torch.tensor([0.0, 1e-3, -1e-3, 0.25, -0.7], dtype=torch.float64)])
    try:
        with torch.enable_grad():
            zz = z.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(fn(zz), zz, torch.ones_like(z))
    except Exception:
        return None
    for name in KNOWN_SURROGATES:
        for alpha in list(alphas) + [_DEFAULT_ALPHA[name]]:
            if alpha <= 0:
                continue
            ref = derivative(name, alpha, z)
            if torch.allclose(g, ref, rtol=1e-9, atol=1e-12):
                return SurrogateSpec(name, float(alpha))
    return None


class _patched_apply:
    """Route custom ``autograd.Function`` calls through the recorder while a forward is being recorded.

    ``Function.apply`` looked up on the class (``Spike.apply(x)``) is replaced for the duration; an
    ``apply`` bound earlier (``self.spike = Spike.apply`` in ``__init__``) is caught by a profile hook
    on the Function's ``forward(ctx, ...)`` frame (its ``ctx`` names the Function class)."""

    def __init__(self, rec: _Recorder) -> None:
        self.rec = rec
        self.stack: List[Tuple[Any, type, Tuple[Any, ...]]] = []
        self.previous: Any = None

    def _profile(self, frame: Any, event: str, arg: Any) -> None:
        rec = self.rec
        if event == "call" and frame.f_code.co_name == "forward" and not rec.suspended and rec.error is None:
            code = frame.f_code
            if code.co_argcount >= 1:
                ctx = frame.f_locals.get(code.co_varnames[0])
                cls = getattr(type(ctx), "_forward_cls", None)
                if isinstance(cls, type) and issubclass(cls, torch.autograd.Function):
                    names = code.co_varnames[1:code.co_argcount]
                    args = tuple(frame.f_locals[n] for n in names)
                    if code.co_flags & 0x04:                      # *args
                        args += tuple(frame.f_locals[code.co_varnames[code.co_argcount]])
                    rec.suspended += 1
                    self.stack.append((frame, cls, args))
        elif event == "return" and self.stack and self.stack[-1][0] is frame:
            _, cls, args = self.stack.pop()
            rec.suspended -= 1
            if rec.error is None:
                try:
                    _record_spike(rec, cls, args, {}, arg)
                except LiftFailure as exc:
                    rec.error = str(exc)

    def __enter__(self) -> None:
        _TLS.recorder = self.rec
        torch.autograd.Function.apply = classmethod(_recording_apply)
        self.previous = sys.getprofile()
        sys.setprofile(self._profile)

    def __exit__(self, *exc: Any) -> None:
        previous = self.previous
        if previous is None or callable(previous):
            sys.setprofile(previous)
        else:
            # a C-level profiler (``cProfile.Profile``: ``sys.getprofile`` returns the object, which
            # ``sys.setprofile`` cannot take back); it re-installs itself. Regression: compiling under
            # cProfile raised "'Profile' object is not callable" and every lifted neuron ran opaque.
            sys.setprofile(None)
            enable = getattr(previous, "enable", None)
            if enable is not None:
                enable()
        torch.autograd.Function.apply = _ORIG_APPLY
        _TLS.recorder = None


# ----------------------------------------------------------------------------- the lift
def _probe_shape(tensors: Dict[str, torch.Tensor]) -> Tuple[int, ...]:
    """An input shape every parameter broadcasts against (a per-channel ``[C,1,1]`` gets ``[2, C, 3, 3]``)."""
    shape: Tuple[int, ...] = ()
    for t in tensors.values():
        if t.numel() > 1:
            try:
                shape = tuple(torch.broadcast_shapes(shape, tuple(t.shape)))
            except RuntimeError:
                raise LiftFailure(f"its tensors' shapes do not broadcast together ({tuple(t.shape)} vs {shape})")
    while shape and shape[0] == 1:
        shape = shape[1:]
    if not shape:
        return (2, 5)
    return (2,) + tuple(d if d > 1 else 3 for d in shape)


def _record(m: nn.Module, x: torch.Tensor, states: Dict[str, torch.Tensor], names: Sequence[str],
            tensors: Dict[str, torch.Tensor]) -> Tuple[_Recorder, Any]:
    rec = _Recorder(x.shape)
    rec.leaf(x, "x", True)
    for k, t in states.items():
        rec.leaf(t, _state_value(k), True)
    for path, t in tensors.items():
        rec.leaf(t, f"p_{path.replace('.', '_')}", t.requires_grad)
    with _patched_apply(rec), rec:
        out = m(x)
    if rec.error is not None:
        raise LiftFailure(rec.error)
    return rec, out


def _build(rec: _Recorder, out: Any, state_names: Sequence[str], m: nn.Module, states_in: Tuple[str, ...],
           tensors: Dict[str, torch.Tensor]) -> Tuple[NeuronIR, Tuple[str, ...]]:
    """The recorded ops as a NeuronIR, with dead ops dropped and only the parameters it reads."""
    if not isinstance(out, torch.Tensor):
        raise LiftFailure(f"its forward returns {type(out).__name__}, not one tensor")
    ov = rec.value(out)
    for t in [out] + [_get_state(m, k) for k in state_names]:
        if id(t) in rec.mixed:
            raise LiftFailure(f"`{rec.mixed[id(t)]}` is not an elementwise op snncc can lift (it mixes neurons)")
    if ov is None:
        raise LiftFailure("its output was not computed by torch ops snncc can see (TorchScript, C++ or "
                          "another extension)")
    new_states = []
    for k in state_names:
        v = _get_state(m, k)
        vv = rec.value(v) if isinstance(v, torch.Tensor) else None
        if vv is None:
            raise LiftFailure(f"its state '{k}' was not computed by torch ops snncc can see")
        new_states.append(vv.name)
    needed = {ov.name, *new_states}
    keep: List[Op] = []
    for o in reversed(rec.ops):
        if o.out in needed:
            keep.append(o)
            needed.update(o.value_args())
    keep.reverse()
    pnames = {f"p_{p.replace('.', '_')}": p for p in tensors}
    params = tuple(n for n in pnames if n in needed)
    sur = tuple(s for s, _ in rec.surrogates)
    live = {"x", *states_in, *params, *(o.out for o in keep)}
    ir = NeuronIR("x", states_in, params, tuple(keep), (ov.name,), tuple(new_states), sur,
                  tuple(sorted((k, v) for k, v in rec.dtypes.items() if k in live)))
    return ir, tuple(pnames[p] for p in params)


def _state_value(attr: str) -> str:
    """The IR value name of a state attribute (a C identifier: ``state#1`` -> ``state_state_1``)."""
    return "state_" + re.sub(r"\W", "_", attr)


def _with_params(ir: NeuronIR, params: Tuple[str, ...]) -> NeuronIR:
    from dataclasses import replace
    return replace(ir, params=params)


def lift_neuron(m: nn.Module, dtype: torch.dtype = torch.float32, check: bool = True) -> Lifted:
    """Lift ``m``'s step for inputs of ``dtype`` (see the module docstring); raises LiftFailure with the reason.

    The module is left exactly as it was (attributes restored, global RNG untouched, no ``.grad`` written)."""
    snap = snapshot_attrs(m)
    # NOTE: identity saved-tensor hooks: a lift may happen inside a checkpointed chunk (memory="min"), whose
    # hooks would otherwise swallow the probes' saved tensors
    with torch.random.fork_rng(devices=[]), torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        try:
            return _lift(m, dtype, check, snap)
        except LiftFailure:
            raise
        except Exception as exc:
            raise LiftFailure(f"its forward failed on a probe input ({type(exc).__name__}: {exc})") from exc
        finally:
            restore_attrs(m, snap)


def _lift(m: nn.Module, dtype: torch.dtype, check: bool, snap: Dict[Tuple[str, str], Any]) -> Lifted:
    """Record in ``dtype`` itself; if that cannot be seen or does not hold, record in float64 and retarget.

    NOTE: the float64 route exists because some libraries run a registered custom op in float32
    (SpikingJelly 2.x) but their plain torch formulas in float64, which snncc can see; the checks then prove
    the retargeted step equals the module in ``dtype`` too."""
    try:
        lifted = _record_steps(m, dtype)
        if check:
            restore_attrs(m, snap)
            verify_lifted(m, lifted, _probe_shape(module_tensors(m)), dtype, lifted_device(m))
        return lifted
    except LiftFailure as exc:
        if dtype == torch.float64:
            raise
        first_error = exc
    restore_attrs(m, snap)
    try:
        lifted = _record_steps(m, torch.float64)
    except LiftFailure:
        raise first_error
    shape, dev = _probe_shape(module_tensors(m)), lifted_device(m)
    # NOTE: each check starts from the module as the user left it (snnTorch's reset keeps the old state's
    # dtype, so a float64 check would leak into the next one)
    if check:
        restore_attrs(m, snap)
        verify_lifted(m, lifted, shape, torch.float64, dev)
    lifted = retarget(lifted, dtype)
    if check:
        restore_attrs(m, snap)
        verify_lifted(m, lifted, shape, dtype, dev)
    return lifted


def lifted_device(m: nn.Module) -> torch.device:
    return next((t.device for t in module_tensors(m).values()), torch.device("cpu"))


def _record_steps(m: nn.Module, dtype: torch.dtype) -> Lifted:
    """Record the first step (from the reset state) and a later step (states as inputs) in ``dtype``."""
    dev = lifted_device(m)
    shape = _probe_shape(module_tensors(m))
    gen = torch.Generator().manual_seed(1234)
    x0 = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).to(dev)
    names = state_attrs(m, x0)
    tensors = module_tensors(m, skip=names)
    _reset(m)
    grad = m.training
    with torch.set_grad_enabled(grad):
        xf = x0.clone().requires_grad_(grad)
        rec, out = _record(m, xf, {}, names, tensors)
        first, fparams = _build(rec, out, names, m, (), tensors)
        st = {}
        for k in names:
            v = _get_state(m, k)
            st[k] = (torch.randn(shape, generator=gen, dtype=torch.float64).to(dev) * 0.5).to(v.dtype)
            if grad and v.dtype.is_floating_point:
                st[k].requires_grad_(True)
            _set_state(m, k, st[k])
        xs = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).to(dev).requires_grad_(grad)
        rec2, out2 = _record(m, xs, st, names, tensors)
        steady, sparams = _build(rec2, out2, names, m, tuple(_state_value(k) for k in names), tensors)
    for k, s_in, s_out in zip(names, steady.states, steady.new_states):
        if steady.dtype(s_in) != steady.dtype(s_out):
            raise LiftFailure(f"its state '{k}' changes dtype across a step")
    pattrs = tuple(dict.fromkeys(fparams + sparams))
    pnames = tuple(f"p_{p.replace('.', '_')}" for p in pattrs)
    # recorded with gradients (training): whether eager's output had any; unknown (True) otherwise
    out_grad = not grad or any(isinstance(o, torch.Tensor) and o.requires_grad for o in (out, out2))
    return Lifted(names, pattrs, _with_params(first, pnames), _with_params(steady, pnames), dtype, out_grad)


def retarget(lifted: Lifted, dtype: torch.dtype) -> Lifted:
    """The same step for inputs of ``dtype``: every float64 value of the float64 recording becomes ``dtype``."""
    from dataclasses import replace
    d = _dname(dtype)

    def sub(name: str) -> str:
        return d if name == "float64" else name

    def one(ir: NeuronIR) -> NeuronIR:
        ops = tuple(replace(o, dtype=sub(o.dtype), cdtype=sub(o.cdtype)) for o in ir.ops)
        return replace(ir, ops=ops, dtypes=tuple((k, sub(v)) for k, v in ir.dtypes))
    return replace(lifted, first=one(lifted.first), steady=one(lifted.steady), dtype=dtype)


def _probe_inputs(shape: Tuple[int, ...], dtype: torch.dtype, dev: torch.device, steps: int = 8
                  ) -> List[torch.Tensor]:
    """Inputs at several scales, so thresholds from 0.1 to 100 are crossed and resets exercised."""
    gen = torch.Generator().manual_seed(4321)
    scales = (0.5, 2.0, 0.1, 8.0, 40.0, 1.0, 200.0, 0.3)
    return [(torch.randn(shape, generator=gen, dtype=torch.float64) * scales[t % len(scales)] + 0.3 * scales[t % 8])
            .to(dtype).to(dev) for t in range(steps)]


def run_lifted(lifted: Lifted, m: nn.Module, xs: Sequence[torch.Tensor]
               ) -> Tuple[List[torch.Tensor], Tuple[torch.Tensor, ...]]:
    """The lifted steps over ``xs`` from the reset state, with torch (the reference semantics)."""
    params = dict(zip(lifted.steady.params, lifted.params(m)))
    outs, states = [], ()
    for t, x in enumerate(xs):
        ir = lifted.first if t == 0 else lifted.steady
        (o,), states = interpret(ir, x, states, params)
        outs.append(o)
    return outs, states


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and bool(((a == b) | (torch.isnan(a) & torch.isnan(b))).all())


def verify_lifted(m: nn.Module, lifted: Lifted, shape: Tuple[int, ...], dtype: torch.dtype,
                  dev: torch.device) -> None:
    """Eager module vs lifted step on probe inputs: identical outputs and states, matching gradients."""
    grad = m.training
    xs = [x.requires_grad_(grad) for x in _probe_inputs(shape, dtype, dev)]
    with torch.set_grad_enabled(grad):
        _reset(m)
        eager = [m(x) for x in xs]
        e_states = [_get_state(m, k) for k in lifted.state_attrs]
        outs, states = run_lifted(lifted, m, xs)
    for t, (a, b) in enumerate(zip(eager, outs)):
        if not isinstance(a, torch.Tensor) or not _equal(a, b):
            raise LiftFailure(f"the lifted step differs from the module at step {t} (probe check, {dtype})")
    for k, a, b in zip(lifted.state_attrs, e_states, states):
        if not _equal(a, b):
            raise LiftFailure(f"the lifted state '{k}' differs from the module's (probe check, {dtype})")
    if not grad:
        return
    ps = [p for p in lifted.params(m) if p.requires_grad]
    gen = torch.Generator().manual_seed(99)
    us = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype).to(dev) for o in eager]
    fin = [s for s in e_states if s.requires_grad]
    inputs = xs + ps
    if not any(o.requires_grad for o in eager):
        return
    ge = torch.autograd.grad([o for o in eager if o.requires_grad] + fin,
                             inputs, [u for o, u in zip(eager, us) if o.requires_grad] + [torch.ones_like(s) for s in fin],
                             allow_unused=True)
    fin2 = [s for s, e in zip(states, e_states) if e.requires_grad]
    gl = torch.autograd.grad([o for o, e in zip(outs, eager) if e.requires_grad] + fin2, inputs,
                             [u for o, u in zip(eager, us) if o.requires_grad] + [torch.ones_like(s) for s in fin2],
                             allow_unused=True)
    tol = dict(rtol=1e-6, atol=1e-9) if dtype == torch.float64 else dict(rtol=2e-3, atol=1e-4)
    for a, b in zip(ge, gl):
        a = torch.zeros(()) if a is None else a
        b = torch.zeros(()) if b is None else b
        if not torch.allclose(a.double(), b.double(), **tol, equal_nan=True):
            raise LiftFailure(f"the lifted step's gradients differ from the module's (probe check, {dtype})")
