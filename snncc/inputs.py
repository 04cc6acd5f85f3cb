"""Does a call's input fit the compiled model? Checked once per specialization, before any task runs.

Why here and not in the layers: a wrong input (an image without its batch dimension, a sequence given to a
``T=`` model, a batch given to a ``sequence=True`` model, the wrong dtype or device) otherwise fails deep in
the schedule, inside a Linear or snncc's own kernels, with a message about matrix sizes. Here the traced
graph is read once, right after tracing: the shapes, dtypes and devices of one step are propagated through
the modules whose shape rules are known (conv, linear, BatchNorm, pools, flatten, dropout, activations,
recognized neurons, elementwise arithmetic, ``cat``, ``view``), stopping quietly at anything else. A module
that would reject what it gets is reported as an :class:`~snncc.errors.InputError` naming what was given,
what that module expects, and which call form fits, found by trying the alternatives (add a batch
dimension, ``sequence=True``, ``T=``, channels first) through the same propagation.

What is reported: a misfit at the first layer that reads the input (a conv, linear or BatchNorm reached
from the input through shape-preserving steps, pools and flattens), or a misfit anywhere when another call
form makes it go away. Anything else (a model whose layers do not fit each other) is left to the run, where
it fails as a :class:`~snncc.errors.TaskFailure` naming the module. Torch's own rules are followed
(unbatched conv inputs are accepted, as torch accepts them), so an input the eager model takes is never
refused: where a rule is not known, nothing is checked.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, replace
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .errors import InputError

__all__ = ["check_call", "Misfit", "infer_misfit"]


@dataclass(frozen=True)
class _Meta:
    """What is known of a tensor value: shape, dtype (None: unknown, e.g. after a cast or under autocast),
    device; ``direct``: it comes from the input through steps that keep its meaning (no conv/linear yet)."""

    shape: Tuple[int, ...]
    dtype: Optional[torch.dtype]
    device: Optional[torch.device]
    direct: bool = True


@dataclass(frozen=True)
class Misfit:
    """A module that would reject what it gets: ``need`` and ``got`` say it in words."""

    target: str                     # the module's qualname (or the function's name)
    what: str                       # e.g. "module '0' (Conv2d, in_channels=3)"
    need: str
    got: str
    kind: str                       # "rank" | "channels" | "features" | "dtype" | "device"
    direct: bool                    # at the first layer that reads the input
    expected: Any = None            # kind "dtype": the dtype wanted; "device": the device


class _Unknown:
    """A value whose shape (or value) the propagation does not know: nothing downstream is checked."""


UNKNOWN = _Unknown()


class _Stop(Exception):
    def __init__(self, misfit: Misfit) -> None:
        super().__init__(misfit.need)
        self.misfit = misfit


def _fmt(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(int(s)) for s in shape) + "]"


def _describe(target: str, m: nn.Module, extra: str = "") -> str:
    return f"module '{target}' ({type(m).__name__}{', ' + extra if extra else ''})"


# ----------------------------------------------------------------------------------------- shape rules
_ELEMENTWISE_MODULES: Tuple[type, ...] = (
    nn.Identity, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardsigmoid, nn.Hardswish, nn.Softplus, nn.Softsign,
    nn.Tanhshrink, nn.Threshold, nn.LogSigmoid, nn.Dropout, nn.AlphaDropout, nn.FeatureAlphaDropout)
_ELEMENTWISE_FUNCTIONS: Tuple[Any, ...] = (
    torch.relu, torch.sigmoid, torch.tanh, torch.abs, torch.neg, torch.exp, torch.clamp, torch.sign,
    torch.heaviside, torch.square, torch.sqrt, F.relu, F.relu6, F.leaky_relu, F.gelu, F.silu, F.elu,
    F.sigmoid, F.tanh, F.hardtanh, F.dropout, operator.neg, torch.clone, torch.detach)
_BINARY_FUNCTIONS: Tuple[Any, ...] = (operator.add, operator.sub, operator.mul, operator.truediv,
                                      torch.add, torch.sub, torch.mul, torch.div, torch.maximum,
                                      torch.minimum)
_ELEMENTWISE_METHODS = {"relu", "sigmoid", "tanh", "abs", "neg", "exp", "clamp", "sign", "clone",
                        "detach", "contiguous", "square", "sqrt"}
_BINARY_METHODS = {"add", "sub", "mul", "div"}
_CASTS = {"float": torch.float32, "double": torch.float64, "half": torch.float16, "bfloat16": torch.bfloat16}


def _norm_dim(d: int, rank: int) -> Optional[int]:
    d = d + rank if d < 0 else d
    return d if 0 <= d < rank else None


def _tup(v: Any, n: int) -> Tuple[Any, ...]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


def _conv_out(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def _pool_out(size: int, k: int, s: int, p: int, d: int, ceil_mode: bool) -> int:
    num = size + 2 * p - d * (k - 1) - 1
    out = (-(-num // s) if ceil_mode else num // s) + 1
    if ceil_mode and (out - 1) * s >= size + p:
        out -= 1
    return out


def _spatial_rank(m: nn.Module) -> Optional[int]:
    for suffix, n in (("1d", 1), ("2d", 2), ("3d", 3)):
        if type(m).__name__.endswith(suffix):
            return n
    return None


class _Propagation:
    """Walks the traced graph in order, one value per node (a _Meta, a python value, or UNKNOWN)."""

    def __init__(self, traced: Any, check_dtype: bool) -> None:
        self.traced = traced
        self.root = traced.root
        self.elementwise_targets = set(traced.bindings)       # recognized neurons: one value per neuron
        self.check_dtype = check_dtype

    # ------------------------------------------------------------------ checks shared by the layers
    def _params_fit(self, target: str, m: nn.Module, what: str, x: _Meta, dtype: bool = True) -> None:
        p = next((t for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False))
                  if isinstance(t, torch.Tensor) and t.is_floating_point()), None)
        if p is None:
            return
        if x.device is not None and p.device != x.device:
            raise _Stop(Misfit(target, what, f"an input on {p.device} (where its parameters are)",
                               f"an input on {x.device}", "device", x.direct, p.device))
        if x.dtype is not None and self.check_dtype and dtype:
            if not (x.dtype.is_floating_point or x.dtype.is_complex):
                raise _Stop(Misfit(target, what, f"a floating-point input ({p.dtype}, its parameters' dtype)",
                                   f"{x.dtype}", "dtype", x.direct, p.dtype))
            if x.dtype != p.dtype:
                raise _Stop(Misfit(target, what, f"an input of dtype {p.dtype} (its parameters' dtype)",
                                   f"{x.dtype}", "dtype", x.direct, p.dtype))

    def module(self, target: str, m: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        if kwargs or len(args) != 1 or not isinstance(args[0], _Meta):
            return UNKNOWN
        x: _Meta = args[0]
        if getattr(m, "step_mode", "s") != "s":           # SpikingJelly multi-step layers: other rules
            return UNKNOWN
        if target in self.elementwise_targets or isinstance(m, _ELEMENTWISE_MODULES):
            return x
        if isinstance(m, (nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)):
            return x
        if isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params():
            return UNKNOWN
        if isinstance(m, nn.modules.conv._ConvNd) and not isinstance(m, nn.modules.conv._ConvTransposeNd):
            return self._conv(target, m, x)
        if isinstance(m, nn.Linear):
            return self._linear(target, m, x)
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            return self._batchnorm(target, m, x)
        if getattr(m, "return_indices", False):
            return UNKNOWN                                 # a tuple (values, indices)
        if isinstance(m, (nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd)):
            return self._pool(m, x)
        if isinstance(m, (nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd)):
            return self._adaptive_pool(m, x)
        if isinstance(m, nn.Flatten):
            return self._flatten(x, m.start_dim, m.end_dim)
        return UNKNOWN

    def _conv(self, target: str, m: nn.Module, x: _Meta) -> Any:
        n = len(m.kernel_size)
        what = _describe(target, m, f"in_channels={m.in_channels}")
        layout = "[N, C, " + ", ".join("DHW"[3 - n:]) + "]"
        if len(x.shape) not in (n + 1, n + 2):
            raise _Stop(Misfit(target, what, f"a {n + 2}-d input {layout} (or {n + 1}-d for one sample)",
                               f"{_fmt(x.shape)} ({len(x.shape)}-d)", "rank", x.direct))
        c = x.shape[-n - 1]
        if c != m.in_channels:
            raise _Stop(Misfit(target, what, f"{m.in_channels} channels at dim {len(x.shape) - n - 1} of "
                                             f"{layout}", f"{_fmt(x.shape)} ({c} channels there)",
                               "channels", x.direct))
        self._params_fit(target, m, what, x)
        spatial = x.shape[-n:]
        if isinstance(m.padding, str):
            if m.padding == "same":
                out = tuple(spatial)
            else:
                out = tuple(_conv_out(s, k, st, 0, d) for s, k, st, d in
                            zip(spatial, m.kernel_size, m.stride, m.dilation))
        else:
            out = tuple(_conv_out(s, k, st, p, d) for s, k, st, p, d in
                        zip(spatial, m.kernel_size, m.stride, m.padding, m.dilation))
        if any(o < 1 for o in out):
            return UNKNOWN                         # torch says why (input smaller than the kernel)
        return _Meta(x.shape[:-n - 1] + (m.out_channels,) + out, x.dtype, x.device, False)

    def _linear(self, target: str, m: nn.Linear, x: _Meta) -> Any:
        what = _describe(target, m, f"in_features={m.in_features}")
        if len(x.shape) < 1 or x.shape[-1] != m.in_features:
            raise _Stop(Misfit(target, what, f"{m.in_features} features in the last dimension",
                               f"{_fmt(x.shape)} ({x.shape[-1] if x.shape else 'no'} features there)",
                               "features", x.direct))
        self._params_fit(target, m, what, x)
        return _Meta(x.shape[:-1] + (m.out_features,), x.dtype, x.device, False)

    def _batchnorm(self, target: str, m: nn.Module, x: _Meta) -> Any:
        n = _spatial_rank(m)
        if n is None:
            return UNKNOWN
        ranks = (2, 3) if n == 1 else (n + 2,)
        what = _describe(target, m, f"num_features={m.num_features}")
        layout = {1: "[N, C] or [N, C, L]", 2: "[N, C, H, W]", 3: "[N, C, D, H, W]"}[n]
        if len(x.shape) not in ranks:
            raise _Stop(Misfit(target, what, f"a {' or '.join(f'{r}-d' for r in ranks)} input {layout}",
                               f"{_fmt(x.shape)} ({len(x.shape)}-d)", "rank", x.direct))
        if x.shape[1] != m.num_features:
            raise _Stop(Misfit(target, what, f"{m.num_features} channels at dim 1 of {layout}",
                               f"{_fmt(x.shape)} ({x.shape[1]} channels there)", "channels", x.direct))
        # NOTE: device only: on CPU torch's BatchNorm takes a bfloat16/float16 input with float32 parameters
        self._params_fit(target, m, what, x, dtype=False)
        return x

    def _pool(self, m: nn.Module, x: _Meta) -> Any:
        n = _spatial_rank(m)
        if n is None or len(x.shape) not in (n + 1, n + 2):
            return UNKNOWN
        k = _tup(m.kernel_size, n)
        s = _tup(m.stride if m.stride is not None and m.stride != () else m.kernel_size, n)
        p = _tup(m.padding, n)
        d = _tup(getattr(m, "dilation", 1), n)
        out = tuple(_pool_out(sz, *a, bool(m.ceil_mode)) for sz, *a in zip(x.shape[-n:], k, s, p, d))
        if any(o < 1 for o in out):
            return UNKNOWN
        return replace(x, shape=x.shape[:-n] + out)

    def _adaptive_pool(self, m: nn.Module, x: _Meta) -> Any:
        n = _spatial_rank(m)
        if n is None or len(x.shape) not in (n + 1, n + 2):
            return UNKNOWN
        size = _tup(m.output_size, n)
        out = tuple(x.shape[-n + i] if o is None else int(o) for i, o in enumerate(size))
        return replace(x, shape=x.shape[:-n] + out)

    @staticmethod
    def _flatten(x: _Meta, start: int, end: int) -> Any:
        rank = len(x.shape)
        if rank == 0:
            return replace(x, shape=(1,))
        s, e = _norm_dim(start, rank), _norm_dim(end, rank)
        if s is None or e is None or s > e:
            return UNKNOWN
        return replace(x, shape=x.shape[:s] + (math.prod(x.shape[s:e + 1]),) + x.shape[e + 1:])

    # ------------------------------------------------------------------ functions and methods
    @staticmethod
    def _broadcast(a: Any, b: Any) -> Any:
        if isinstance(a, (int, float, bool)) and isinstance(b, _Meta):
            a, b = b, a
        if isinstance(a, _Meta) and isinstance(b, (int, float, bool)):
            dtype = a.dtype if a.dtype is not None and a.dtype.is_floating_point else None
            return replace(a, dtype=dtype)
        if not (isinstance(a, _Meta) and isinstance(b, _Meta)):
            return UNKNOWN
        try:
            shape = tuple(torch.broadcast_shapes(a.shape, b.shape))
        except RuntimeError:
            return UNKNOWN
        dtype = torch.promote_types(a.dtype, b.dtype) if a.dtype is not None and b.dtype is not None else None
        device = a.device if a.device == b.device else None
        return _Meta(shape, dtype, device, a.direct and b.direct)

    def function(self, fn: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        if fn is operator.getitem:
            return self._getitem(*args) if len(args) == 2 and not kwargs else UNKNOWN
        if any(fn is f for f in _ELEMENTWISE_FUNCTIONS):
            return args[0] if args and isinstance(args[0], _Meta) else UNKNOWN
        if any(fn is f for f in _BINARY_FUNCTIONS):
            return self._broadcast(*args) if len(args) == 2 and not kwargs else UNKNOWN
        if fn is torch.flatten and args and isinstance(args[0], _Meta):
            start = args[1] if len(args) > 1 else kwargs.get("start_dim", 0)
            end = args[2] if len(args) > 2 else kwargs.get("end_dim", -1)
            return self._flatten(args[0], start, end) if isinstance(start, int) and isinstance(end, int) \
                else UNKNOWN
        if fn is torch.cat:
            return self._cat(args[0] if args else kwargs.get("tensors"),
                             args[1] if len(args) > 1 else kwargs.get("dim", 0))
        return UNKNOWN

    @staticmethod
    def _getitem(x: Any, idx: Any) -> Any:
        if isinstance(x, (tuple, list, torch.Size)) and isinstance(idx, int):
            try:
                return x[idx]
            except IndexError:
                return UNKNOWN
        if isinstance(x, _Meta) and isinstance(idx, int) and not isinstance(idx, bool) and x.shape:
            if -x.shape[0] <= idx < x.shape[0]:
                return replace(x, shape=x.shape[1:])
        return UNKNOWN

    @staticmethod
    def _cat(tensors: Any, dim: Any) -> Any:
        if not isinstance(tensors, (list, tuple)) or not tensors or not isinstance(dim, int):
            return UNKNOWN
        if not all(isinstance(t, _Meta) for t in tensors):
            return UNKNOWN
        rank = len(tensors[0].shape)
        d = _norm_dim(dim, rank)
        if d is None or any(len(t.shape) != rank for t in tensors):
            return UNKNOWN
        rest = {t.shape[:d] + t.shape[d + 1:] for t in tensors}
        if len(rest) != 1:
            return UNKNOWN
        dtypes = {t.dtype for t in tensors}
        return _Meta(tensors[0].shape[:d] + (sum(t.shape[d] for t in tensors),) + tensors[0].shape[d + 1:],
                     dtypes.pop() if len(dtypes) == 1 else None, tensors[0].device,
                     all(t.direct for t in tensors))

    def method(self, name: str, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        if not args:
            return UNKNOWN
        x, rest = args[0], args[1:]
        if not isinstance(x, _Meta):
            return UNKNOWN
        if name in ("size", "dim") and not kwargs:
            if name == "dim":
                return len(x.shape)
            if not rest:
                return torch.Size(x.shape)
            d = _norm_dim(rest[0], len(x.shape)) if isinstance(rest[0], int) else None
            return UNKNOWN if d is None else x.shape[d]
        if name in _ELEMENTWISE_METHODS:
            return x
        if name in _BINARY_METHODS:
            return self._broadcast(x, rest[0]) if len(rest) == 1 and not kwargs else UNKNOWN
        if name in _CASTS:
            return replace(x, dtype=_CASTS[name])
        if name in ("to", "type"):
            return replace(x, dtype=None, device=None)
        if name == "flatten":
            start = rest[0] if rest else kwargs.get("start_dim", 0)
            end = rest[1] if len(rest) > 1 else kwargs.get("end_dim", -1)
            return self._flatten(x, start, end) if isinstance(start, int) and isinstance(end, int) else UNKNOWN
        if name in ("view", "reshape") and not kwargs:
            dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list, torch.Size)) else rest
            if not all(isinstance(d, int) for d in dims) or sum(d == -1 for d in dims) > 1:
                return UNKNOWN
            total = math.prod(x.shape)
            known = math.prod(d for d in dims if d != -1)
            if known == 0 or (-1 not in dims and known != total) or total % known:
                return UNKNOWN
            return replace(x, shape=tuple(total // known if d == -1 else d for d in dims))
        return UNKNOWN

    def attribute(self, x: Any, name: str) -> Any:
        if isinstance(x, _Meta) and name == "shape":
            return torch.Size(x.shape)
        if isinstance(x, _Meta) and name == "ndim":
            return len(x.shape)
        return UNKNOWN

    # ------------------------------------------------------------------ the walk
    def run(self, inputs: Sequence[Any]) -> Optional[Misfit]:
        env: Dict[fx.Node, Any] = {}
        placeholders = iter(inputs)

        def value(a: Any) -> Any:
            if isinstance(a, fx.Node):
                return env.get(a, UNKNOWN)
            if isinstance(a, (list, tuple)):
                vals = [value(v) for v in a]
                return type(a)(vals) if isinstance(a, tuple) else vals
            if isinstance(a, dict):
                return {k: value(v) for k, v in a.items()}
            return a

        try:
            for node in self.traced.graph.nodes:
                if node.op == "placeholder":
                    env[node] = next(placeholders, UNKNOWN)
                    continue
                if node.op == "output":
                    break
                args, kwargs = value(tuple(node.args)), value(dict(node.kwargs))
                if not any(_known(a) for a in list(args) + list(kwargs.values())):
                    env[node] = UNKNOWN
                    continue
                if node.op == "call_module":
                    m = self.root.get_submodule(node.target)
                    env[node] = self.module(str(node.target), m, args, kwargs)
                elif node.op == "call_function":
                    if node.target is getattr and len(args) == 2:
                        env[node] = self.attribute(*args)
                    else:
                        env[node] = self.function(node.target, args, kwargs)
                elif node.op == "call_method":
                    env[node] = self.method(str(node.target), args, kwargs)
                else:
                    env[node] = UNKNOWN
        except _Stop as stop:
            return stop.misfit
        except Exception:                      # a rule that does not apply: know nothing rather than guess
            return None
        return None


def _known(a: Any) -> bool:
    if isinstance(a, _Meta):
        return True
    if isinstance(a, (list, tuple)):
        return any(_known(v) for v in a)
    return False


def infer_misfit(traced: Any, inputs: Sequence[Any], check_dtype: bool = True) -> Optional[Misfit]:
    """The first module of ``traced`` that would reject ``inputs`` (tensors or ``(shape, dtype, device)``
    triples, one per placeholder; None for a non-tensor), or None when none would (or nothing is known)."""
    metas: List[Any] = []
    for a in inputs:
        if isinstance(a, torch.Tensor):
            metas.append(_Meta(tuple(a.shape), a.dtype, a.device))
        elif isinstance(a, tuple) and len(a) == 3:
            metas.append(_Meta(tuple(a[0]), a[1], a[2]))
        else:
            metas.append(UNKNOWN)
    return _Propagation(traced, check_dtype).run(metas)


# ----------------------------------------------------------------------------------------- the call check
def _form_line(form: str, T: Optional[int], stream: bool) -> str:
    if stream:
        return "a stream: stream(x_t) takes one step [N, ...], stream.feed(x) takes [k, N, ...]"
    if form == "static":
        return f"snncc.compile(model, T={T}): one step [N, ...] fed at each of the {T} steps"
    if form == "sequence":
        return "snncc.compile(model, sequence=True): a sequence [T, N, ...], step t gets x_seq[t]"
    return "snncc.compile(model): the model's own inputs"


def _alternatives(form: str, shape: Tuple[int, ...], stream: bool) -> List[Tuple[Tuple[int, ...], str]]:
    """Other readings of an input of ``shape`` (as the first placeholder's shape) and the advice for each."""
    alts: List[Tuple[Tuple[int, ...], str]] = []
    if form == "static" and len(shape) >= 2:
        alts.append((shape[1:], f"the input looks like a sequence [T, N, ...] (T={shape[0]} from its first "
                                "dimension): for an input with a time dimension compile with "
                                "snncc.compile(model, sequence=True); with T= pass one step [N, ...]"))
    if form == "sequence" and shape:
        if stream:
            alts.append(((1,) + shape, f"the input looks like one step [N, ...] without a time dimension: "
                                       "pass it to stream(x_t) (or x.unsqueeze(0) to stream.feed)"))
        else:
            alts.append(((1,) + shape, f"the input looks like one step [N, ...] without a time dimension (it "
                                       f"would be read as T={shape[0]} steps of {_fmt(shape[1:])}): for a "
                                       "static input fed at every step compile with snncc.compile(model, T=...); "
                                       "for a sequence stack the steps to [T, N, ...] (x.unsqueeze(0) for one "
                                       "step)"))
        alts.append((shape[:1] + (1,) + shape[1:], "each step looks like one sample without its batch "
                                                   "dimension: add one with x.unsqueeze(1) "
                                                   f"(shape {_fmt(shape[:1] + (1,) + shape[1:])})"))
    if form in ("static", "loop"):
        alts.append(((1,) + shape, "the input looks like one sample without its batch dimension: add one with "
                                   f"x.unsqueeze(0) (shape {_fmt((1,) + shape)})"))
    if len(shape) >= 3:
        cl = shape[:-3] + (shape[-1],) + shape[-3:-1]
        perm = ", ".join(str(i) for i in list(range(len(shape) - 3)) + [len(shape) - 1, len(shape) - 3,
                                                                         len(shape) - 2])
        alts.append((cl, "the input looks like channels-last images [..., H, W, C]: put the channels first "
                         f"with x.permute({perm})"))
    return alts


def _autocast(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:                       # a device type autocast does not know (meta)
        return False


def check_call(traced: Any, form: str, T: Optional[int], args: Tuple[Any, ...], stream: bool = False) -> None:
    """Raise :class:`InputError` when ``args`` do not fit the traced model (see the module docstring)."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if not tensors:
        return
    x = args[0] if isinstance(args[0], torch.Tensor) else None
    check_dtype = not any(_autocast(t.device.type) for t in tensors)
    misfit = infer_misfit(traced, args, check_dtype)
    if misfit is None:
        return
    fixes: List[str] = []
    if misfit.kind in ("rank", "channels", "features") and x is not None:
        for shape, advice in _alternatives(form, tuple(x.shape), stream):
            alt = (shape, x.dtype, x.device)
            if infer_misfit(traced, (alt,) + tuple(args[1:]), check_dtype) is None:
                fixes.append(advice)
        if not fixes and not misfit.direct:
            return                        # the model's own layers disagree: the run names the module
    elif not misfit.direct:
        return
    elif misfit.kind == "dtype":
        given_dtype = x.dtype if x is not None else "..."
        if x is not None and not x.dtype.is_floating_point:
            fixes.append(f"convert the input to floating point, scaled as the model expects (e.g. "
                         f"x.to({misfit.expected}) / 255 for 8-bit images)")
        else:
            fixes.append(f"convert the input (x.to({misfit.expected})) or the model (cmodel.to({given_dtype}))")
    elif misfit.kind == "device":
        fixes.append(f"move the input (x.to('{misfit.expected}')) or the model "
                     f"(cmodel.to('{x.device if x is not None else '...'}'))")
    given = "; ".join(f"{_fmt(t.shape)} {t.dtype} on {t.device}" for t in tensors)
    msg = (f"the input does not fit this compiled model ({_form_line(form, T, stream)}).\n"
           f"  given: {given}\n"
           f"  {misfit.what} expects {misfit.need}{' at each step' if form != 'loop' else ''}; it would get "
           f"{misfit.got}")
    if len(fixes) == 1:
        msg += f"\n  fix: {fixes[0]}"
    elif fixes:
        msg += "\n  fix, one of (each fits the model):" + "".join(f"\n  - {f}" for f in fixes)
    raise InputError(msg)
