"""Surrogate gradients: the spike is a Heaviside step forward, a smooth derivative backward.

Every surrogate here is described by a :class:`SurrogateSpec` (a name and its ``alpha``) so that the
compiler's scans can evaluate the derivative without calling back into Python modules. The same
:func:`derivative` function is used by the modules below (eager) and by the runtime (compiled), which is
what makes compiled gradients equal eager ones.

Formulas (``x = h - v_threshold``), with SpikingJelly's defaults where it has the surrogate:

=============== ========= ====================================================
name            alpha     d spike / d x
=============== ========= ====================================================
sigmoid         4.0       alpha * s * (1 - s),  s = sigmoid(alpha * x)
atan            2.0       alpha / 2 / (1 + (pi / 2 * alpha * x) ** 2)
superspike      10.0      1 / (alpha * |x| + 1) ** 2
piecewise_linear 1.0      max(0, 1 - alpha * |x|)           (Esser et al.)
triangle        1.0       max(0, alpha - |x|) / alpha ** 2  (TET's ZIF, gamma = alpha)
rectangular     1.0       [|x| < alpha / 2] / alpha
erf             2.0       alpha / sqrt(pi) * exp(-(alpha * x) ** 2)
=============== ========= ====================================================
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple, Union

import torch
from torch import nn

__all__ = [
    "SurrogateSpec", "derivative", "heaviside", "Surrogate", "Sigmoid", "ATan", "SuperSpike",
    "PiecewiseLinear", "Esser", "Triangle", "ZIF", "Rectangular", "Erf", "KNOWN_SURROGATES",
    "plain_step_surrogate",
]

KNOWN_SURROGATES = ("sigmoid", "atan", "superspike", "piecewise_linear", "triangle", "rectangular", "erf")


@dataclass(frozen=True)
class SurrogateSpec:
    """A surrogate the compiler understands (``name`` in KNOWN_SURROGATES), or an opaque callable.

    ``fn`` is set only for ``name == "callable"``: a user's surrogate (module or function) that snncc calls
    as is, forward for the spike and through autograd for the derivative.
    """

    name: str
    alpha: float = 1.0
    fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None

    @property
    def opaque(self) -> bool:
        return self.name == "callable"


def heaviside(x: torch.Tensor) -> torch.Tensor:
    """Spike = 1 where ``x >= 0`` (SpikingJelly's convention), in ``x``'s dtype."""
    return (x >= 0).to(x.dtype)


def derivative(name: str, alpha: float, x: torch.Tensor) -> torch.Tensor:
    """d spike / d x of the named surrogate, elementwise."""
    if name == "sigmoid":
        s = torch.sigmoid(x * alpha)
        return (1.0 - s) * s * alpha
    if name == "atan":
        return alpha / 2 / (1 + (math.pi / 2 * alpha * x) ** 2)
    if name == "superspike":
        d = alpha * x.abs() + 1.0
        return 1.0 / (d * d)
    if name == "piecewise_linear":
        return torch.clamp(1.0 - alpha * x.abs(), min=0.0)
    if name == "triangle":
        return torch.clamp(alpha - x.abs(), min=0.0) / (alpha * alpha)
    if name == "rectangular":
        return (x.abs() < alpha / 2).to(x.dtype) / alpha
    if name == "erf":
        return torch.exp(-(x * alpha) ** 2) * (alpha / math.sqrt(math.pi))
    raise ValueError(f"unknown surrogate {name!r}; known: {', '.join(KNOWN_SURROGATES)}")


class _SpikeFn(torch.autograd.Function):
    """Heaviside forward, ``derivative(name, alpha)`` backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, name: str, alpha: float) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.name, ctx.alpha = name, alpha
        return heaviside(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        return grad * derivative(ctx.name, ctx.alpha, x), None, None


class Surrogate(nn.Module):
    """Base class: ``forward(x)`` is the spike function with this surrogate's gradient."""

    name: str = ""
    default_alpha: float = 1.0

    def __init__(self, alpha: Optional[float] = None) -> None:
        super().__init__()
        self.alpha = float(self.default_alpha if alpha is None else alpha)
        if not self.alpha > 0:
            raise ValueError(f"{type(self).__name__}: alpha must be > 0, got {alpha}")

    @property
    def spec(self) -> SurrogateSpec:
        return SurrogateSpec(self.name, self.alpha)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _SpikeFn.apply(x, self.name, self.alpha)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}"


class Sigmoid(Surrogate):
    """Derivative of ``sigmoid(alpha x)`` (SpikingJelly's default surrogate)."""

    name, default_alpha = "sigmoid", 4.0


class ATan(Surrogate):
    """Derivative of ``atan(pi/2 alpha x) / pi + 1/2``."""

    name, default_alpha = "atan", 2.0


class SuperSpike(Surrogate):
    """Zenke & Ganguli's fast-sigmoid derivative ``1 / (alpha |x| + 1)^2``."""

    name, default_alpha = "superspike", 10.0


class PiecewiseLinear(Surrogate):
    """Esser et al.'s ``max(0, 1 - alpha |x|)``."""

    name, default_alpha = "piecewise_linear", 1.0


Esser = PiecewiseLinear


class Triangle(Surrogate):
    """TET's ZIF: ``max(0, gamma - |x|) / gamma^2`` with ``gamma = alpha``."""

    name, default_alpha = "triangle", 1.0


ZIF = Triangle


class Rectangular(Surrogate):
    """Box of width ``alpha`` and height ``1 / alpha`` around the threshold."""

    name, default_alpha = "rectangular", 1.0


class Erf(Surrogate):
    """Gaussian derivative ``alpha / sqrt(pi) exp(-(alpha x)^2)``."""

    name, default_alpha = "erf", 2.0


_PROBED: Dict[Tuple[int, bool], Tuple[Any, Union[bool, str]]] = {}


def plain_step_surrogate(fn: Any, strict_ok: bool = False) -> Union[bool, str]:
    """Is a user's surrogate a plain spike function: forward exactly ``z >= 0`` (or, with ``strict_ok``,
    exactly ``z > 0``, snnTorch's convention: then ``"strict"`` is returned) and backward an elementwise
    derivative times the incoming gradient? Checked once per callable on probe values (the threshold itself,
    +-0, tiny and large values, random ones) in float32 and float64: if so the kernels run its forward
    themselves and take its derivative from its backward; if not (a stochastic spike, a non-elementwise
    backward...) it is called as is, step by step.
    """
    hit = _PROBED.get((id(fn), strict_ok))
    if hit is not None and hit[0] is fn:
        return hit[1]
    ok: Union[bool, str] = True
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        fixed = torch.tensor([-1e3, -2.0, -1.0, -0.5, -1e-7, -0.0, 0.0, 1e-7, 0.5, 1.0, 2.0, 1e3], dtype=dtype)
        z = torch.cat([fixed, torch.randn(64, generator=gen, dtype=dtype) * 3])
        try:
            with torch.enable_grad():
                zz = z.clone().requires_grad_(True)
                s = fn(zz)
                if not isinstance(s, torch.Tensor) or s.shape != z.shape:
                    ok = False
                    break
                kind = _step_kind(s.detach(), z, strict_ok)
                if not kind or (ok is not True and kind != ok):
                    ok = False
                    break
                u = torch.randn(z.shape, generator=gen, dtype=dtype)
                (g1,) = torch.autograd.grad(s, zz, u, retain_graph=True)
                (g2,) = torch.autograd.grad(s, zz, torch.ones_like(z))
            with torch.no_grad():
                s0 = fn(z.clone())
            good = torch.allclose(g1, u * g2, rtol=1e-5, atol=1e-7) and bool(torch.isfinite(g2).all()) and \
                _step_kind(s0, z, strict_ok) == kind
            ok = (True if kind == "ge" else "strict") if good else False
        except Exception:
            ok = False
        if not ok:
            break
    _PROBED[(id(fn), strict_ok)] = (fn, ok)
    return ok


def _step_kind(s: torch.Tensor, z: torch.Tensor, strict_ok: bool) -> Union[bool, str]:
    if torch.equal(s, (z >= 0).to(s.dtype)):
        return "ge"
    if strict_ok and torch.equal(s, (z > 0).to(s.dtype)):
        return "strict"
    return False
