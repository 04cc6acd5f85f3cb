"""Step-mode spiking neurons and the declarative spec the compiler reads from them.

A neuron is described once, by a :class:`NeuronSpec` (charge, fire, reset, state, learnable parameters).
:func:`step` is the reference torch implementation of one timestep of any spec; the eager modules below
call it, the compiler's reference scan calls it, so eager and compiled share one definition.

LIF follows SpikingJelly's equations and defaults exactly (same float operations, so spikes are
bit-identical in float64)::

    decay_input, v_reset = 0 or None:   H = V + (X - V) / tau
    decay_input, v_reset = V_r:         H = V + (X - (V - V_r)) / tau
    no decay_input, v_reset = 0/None:   H = V * (1 - 1 / tau) + X
    no decay_input, v_reset = V_r:      H = V - (V - V_r) / tau + X
    S = heaviside(H - V_th)
    hard reset (V_r given):             V = (1 - S) * H + S * V_r
    soft reset (v_reset=None):          V = H - S * V_th
"""
from __future__ import annotations

from dataclasses import dataclass
import math
from typing import Callable, Optional, Tuple

import torch
from torch import nn

from .surrogate import Sigmoid, SurrogateSpec, _SpikeFn, heaviside

__all__ = [
    "NeuronSpec", "step", "initial_state", "fire", "spec_from_surrogate",
    "BaseNeuron", "IF", "LIF", "ParametricLIF", "Izhikevich", "AdaptiveLIF",
]

State = Tuple[torch.Tensor, ...]

NEURON_KINDS = ("if", "lif", "plif", "izhikevich", "alif")


@dataclass(frozen=True)
class NeuronSpec:
    """Everything the compiler needs to run a neuron layer without calling its module.

    ``kind`` selects the charge equation; ``state_names`` the state variables carried between steps
    (the first is always the membrane potential ``v``); ``learnable`` names the module's parameters the
    charge reads (passed to :func:`step` in that order). ``extra`` holds kind-specific constants as
    ``(name, value)`` pairs so the spec stays hashable.
    """

    kind: str
    surrogate: SurrogateSpec
    v_threshold: float = 1.0
    v_reset: Optional[float] = 0.0
    detach_reset: bool = False
    tau: float = 2.0
    decay_input: bool = True
    state_names: Tuple[str, ...] = ("v",)
    learnable: Tuple[str, ...] = ()
    extra: Tuple[Tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in NEURON_KINDS:
            raise ValueError(f"unknown neuron kind {self.kind!r}; known: {NEURON_KINDS}")

    def const(self, name: str) -> float:
        return dict(self.extra)[name]

    @property
    def lif_family(self) -> bool:
        """True when H is affine in (V, X): the scans have a closed-form backward for these."""
        return self.kind in ("if", "lif", "plif")


def spec_from_surrogate(fn: Callable[[torch.Tensor], torch.Tensor]) -> SurrogateSpec:
    """snncc surrogates by name; anything else kept as an opaque callable."""
    spec = getattr(fn, "spec", None)
    if isinstance(spec, SurrogateSpec):
        return spec
    return SurrogateSpec("callable", 1.0, fn)


def fire(sur: SurrogateSpec, z: torch.Tensor) -> torch.Tensor:
    """Spike from ``z = H - V_th``; differentiable (surrogate gradient) when grad mode is on."""
    if sur.opaque:
        return sur.fn(z)
    if torch.is_grad_enabled() and z.requires_grad:
        return _SpikeFn.apply(z, sur.name, sur.alpha)
    return heaviside(z)


def initial_state(spec: NeuronSpec, x: torch.Tensor) -> State:
    """The reset state for an input like ``x`` (SpikingJelly: ``v = v_reset``, or 0 for soft reset)."""
    v0 = 0.0 if spec.v_reset is None else spec.v_reset
    v = torch.full_like(x, v0)
    if spec.kind == "izhikevich":
        return v, torch.full_like(x, spec.const("b") * v0)
    if spec.kind == "alif":
        return v, torch.zeros_like(x)
    return (v,)


def charge(spec: NeuronSpec, x: torch.Tensor, v: torch.Tensor, params: Tuple[torch.Tensor, ...],
           u: Optional[torch.Tensor] = None) -> torch.Tensor:
    """H from the previous V and the input X (the charge equations of the module docstring)."""
    reset0 = spec.v_reset is None or spec.v_reset == 0.0
    if spec.kind == "if":
        return v + x
    if spec.kind in ("lif", "alif"):
        tau = spec.tau
        if spec.decay_input:
            return v + (x - v) / tau if reset0 else v + (x - (v - spec.v_reset)) / tau
        return v * (1.0 - 1.0 / tau) + x if reset0 else v - (v - spec.v_reset) / tau + x
    if spec.kind == "plif":
        k = params[0].sigmoid()
        if spec.decay_input:
            return v + (x - v) * k if reset0 else v + (x - (v - spec.v_reset)) * k
        return v * (1.0 - k) + x if reset0 else v - (v - spec.v_reset) * k + x
    if spec.kind == "izhikevich":
        dt = spec.const("dt")
        return v + dt * (0.04 * v * v + 5.0 * v + 140.0 - u + x)
    raise AssertionError(spec.kind)


def reset(spec: NeuronSpec, h: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """V after the spike ``s``: hard reset to V_r or soft reset by subtracting V_th."""
    if spec.detach_reset:
        s = s.detach()
    if spec.v_reset is None:
        return h - s * spec.v_threshold
    return (1.0 - s) * h + s * spec.v_reset


def step(spec: NeuronSpec, x: torch.Tensor, state: State,
         params: Tuple[torch.Tensor, ...] = ()) -> Tuple[torch.Tensor, State, torch.Tensor]:
    """One timestep: returns ``(spike, new_state, h)``; the reference every backend is tested against."""
    v = state[0]
    if spec.kind == "izhikevich":
        u = state[1]
        h = charge(spec, x, v, params, u)
        u_h = u + spec.const("dt") * spec.const("a") * (spec.const("b") * v - u)
        s = fire(spec.surrogate, h - spec.v_threshold)
        s_r = s.detach() if spec.detach_reset else s
        return s, (reset(spec, h, s), u_h + spec.const("d") * s_r), h
    if spec.kind == "alif":
        a = state[1]
        h = charge(spec, x, v, params)
        s = fire(spec.surrogate, h - (spec.v_threshold + spec.const("beta") * a))
        s_r = s.detach() if spec.detach_reset else s
        if spec.v_reset is None:
            v_new = h - s_r * spec.v_threshold
        else:
            v_new = (1.0 - s_r) * h + s_r * spec.v_reset
        return s, (v_new, a * (1.0 - 1.0 / spec.const("tau_a")) + s), h
    h = charge(spec, x, v, params)
    s = fire(spec.surrogate, h - spec.v_threshold)
    return s, (reset(spec, h, s),), h


class BaseNeuron(nn.Module):
    """A step-mode neuron: call it once per timestep; state persists until :meth:`reset`.

    Subclasses only say what their :class:`NeuronSpec` is; the dynamics live in :func:`step`.
    """

    def __init__(self, v_threshold: float = 1.0, v_reset: Optional[float] = 0.0,
                 surrogate_function: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                 detach_reset: bool = False) -> None:
        super().__init__()
        self.v_threshold = float(v_threshold)
        self.v_reset = None if v_reset is None else float(v_reset)
        self.surrogate_function = Sigmoid() if surrogate_function is None else surrogate_function
        self.detach_reset = bool(detach_reset)
        self.state: Optional[State] = None

    def _spec_kwargs(self) -> dict:
        return dict(surrogate=spec_from_surrogate(self.surrogate_function), v_threshold=self.v_threshold,
                    v_reset=self.v_reset, detach_reset=self.detach_reset)

    @property
    def spec(self) -> NeuronSpec:
        raise NotImplementedError

    def spec_params(self) -> Tuple[torch.Tensor, ...]:
        """The learnable tensors named by ``spec.learnable``, in order."""
        return tuple(getattr(self, n) for n in self.spec.learnable)

    @property
    def v(self) -> Optional[torch.Tensor]:
        """Membrane potential after the last step (None right after a reset)."""
        return None if self.state is None else self.state[0]

    def reset(self) -> None:
        self.state = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        if self.state is None:
            self.state = initial_state(spec, x)
        s, self.state, _ = step(spec, x, self.state, self.spec_params())
        return s

    def extra_repr(self) -> str:
        return f"v_threshold={self.v_threshold}, v_reset={self.v_reset}, detach_reset={self.detach_reset}"


class IF(BaseNeuron):
    """Integrate-and-fire: ``H = V + X``."""

    @property
    def spec(self) -> NeuronSpec:
        return NeuronSpec("if", **self._spec_kwargs())


class LIF(BaseNeuron):
    """Leaky integrate-and-fire with SpikingJelly's equations and defaults (tau=2, decay_input)."""

    def __init__(self, tau: float = 2.0, decay_input: bool = True, v_threshold: float = 1.0,
                 v_reset: Optional[float] = 0.0, surrogate_function=None, detach_reset: bool = False) -> None:
        super().__init__(v_threshold, v_reset, surrogate_function, detach_reset)
        if not tau > 1.0:
            raise ValueError(f"LIF: tau must be > 1 (a decay per step), got {tau}")
        self.tau, self.decay_input = float(tau), bool(decay_input)

    @property
    def spec(self) -> NeuronSpec:
        return NeuronSpec("lif", tau=self.tau, decay_input=self.decay_input, **self._spec_kwargs())

    def extra_repr(self) -> str:
        return f"tau={self.tau}, decay_input={self.decay_input}, " + super().extra_repr()


class ParametricLIF(BaseNeuron):
    """LIF with a learnable decay ``k = sigmoid(w)`` (PLIF, Fang et al. 2021), ``w`` from ``init_tau``."""

    def __init__(self, init_tau: float = 2.0, decay_input: bool = True, v_threshold: float = 1.0,
                 v_reset: Optional[float] = 0.0, surrogate_function=None, detach_reset: bool = False) -> None:
        super().__init__(v_threshold, v_reset, surrogate_function, detach_reset)
        if not init_tau > 1.0:
            raise ValueError(f"ParametricLIF: init_tau must be > 1, got {init_tau}")
        self.decay_input = bool(decay_input)
        self.w = nn.Parameter(torch.tensor(-math.log(init_tau - 1.0)))

    @property
    def spec(self) -> NeuronSpec:
        return NeuronSpec("plif", decay_input=self.decay_input, learnable=("w",), **self._spec_kwargs())


class Izhikevich(BaseNeuron):
    """Izhikevich (2003), Euler step ``dt``: ``v += dt (0.04 v^2 + 5 v + 140 - u + x)``,
    ``u += dt a (b v - u)``; on a spike (``v >= v_threshold``) ``v = c``, ``u += d``.
    """

    def __init__(self, a: float = 0.02, b: float = 0.2, c: float = -65.0, d: float = 8.0, dt: float = 0.5,
                 v_threshold: float = 30.0, surrogate_function=None, detach_reset: bool = False) -> None:
        super().__init__(v_threshold, c, surrogate_function, detach_reset)
        self.a, self.b, self.d, self.dt = float(a), float(b), float(d), float(dt)

    @property
    def spec(self) -> NeuronSpec:
        extra = (("a", self.a), ("b", self.b), ("d", self.d), ("dt", self.dt))
        return NeuronSpec("izhikevich", state_names=("v", "u"), extra=extra, **self._spec_kwargs())


class AdaptiveLIF(BaseNeuron):
    """LIF whose threshold rises by ``beta`` per recent spike: ``V_th + beta a``, ``a`` decaying with
    ``tau_a`` (``a = a (1 - 1/tau_a) + S``), as in Bellec et al.'s ALIF."""

    def __init__(self, tau: float = 2.0, tau_a: float = 20.0, beta: float = 0.2, decay_input: bool = True,
                 v_threshold: float = 1.0, v_reset: Optional[float] = 0.0, surrogate_function=None,
                 detach_reset: bool = False) -> None:
        super().__init__(v_threshold, v_reset, surrogate_function, detach_reset)
        if not (tau > 1.0 and tau_a > 1.0):
            raise ValueError(f"AdaptiveLIF: tau and tau_a must be > 1, got {tau}, {tau_a}")
        self.tau, self.tau_a, self.beta, self.decay_input = float(tau), float(tau_a), float(beta), bool(decay_input)

    @property
    def spec(self) -> NeuronSpec:
        return NeuronSpec("alif", tau=self.tau, decay_input=self.decay_input, state_names=("v", "a"),
                          extra=(("beta", self.beta), ("tau_a", self.tau_a)), **self._spec_kwargs())
