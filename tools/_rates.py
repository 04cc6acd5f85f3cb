"""Realistic firing for benchmarks: find a model's neuron layers, record their firing rates over the T steps
of an eager run, and scale what feeds each layer until it fires about a target rate (DESIGN.md, "Testing and
measuring": a freshly initialized net fires ~0% past its first layer, which flatters spike-driven paths).

The feeder of a neuron layer is what its input is proportional to: by default the last module with weights
(Conv, Linear, BatchNorm) called after the previous neuron layer and before it, found from the call order of
one eager step. Scaling a Conv/Linear's weight and bias, or a BatchNorm's affine weight and bias, by ``g``
scales the neuron's input by ``g`` (a training-mode BatchNorm undoes a scaled convolution, hence the last
module, the BatchNorm). Where no such module exists (a neuron after a matmul of spikes) the caller passes a
:class:`Gain` of its own, e.g. on an attention ``scale`` attribute; otherwise the layer is left uncalibrated
and says so.

Layers are calibrated one at a time in forward order (a layer's rate depends only on the layers before it),
each by a bisection on ``log g`` under ``no_grad``, in the model's current train/eval mode.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

__all__ = ["Gain", "ParamGain", "AttrGain", "is_neuron", "neuron_layers", "RateRecorder", "record_rates",
           "find_feeders", "calibrate", "CalibrationResult"]


def is_neuron(m: nn.Module) -> bool:
    """A spiking neuron layer: a SpikingJelly ``BaseNode``, an snnTorch ``SpikingNeuron``, an snncc neuron, or
    any leaf module with a ``reset()`` and a state attribute (``v`` / ``mem``): the user-written kind."""
    try:
        from spikingjelly.activation_based import neuron as sjn
        if isinstance(m, sjn.BaseNode):
            return True
    except Exception:   # noqa: BLE001 -- SpikingJelly absent or broken: not one of its neurons
        pass
    try:
        import snntorch
        if isinstance(m, snntorch.SpikingNeuron):
            return True
    except Exception:   # noqa: BLE001
        pass
    try:
        from snncc.frontend import is_stateful
        from snncc.neurons import BaseNeuron
        # NOTE: a neuron may have children (its surrogate module); a block with neurons inside is not one
        if isinstance(m, BaseNeuron) or (is_stateful(m) and not any(
                d is not m and is_stateful(d) for d in m.modules())):
            return True
    except Exception:   # noqa: BLE001 -- the frontend is being edited; the duck-typed test below still works
        pass
    return (callable(getattr(m, "reset", None)) and not any(True for _ in m.children())
            and any(hasattr(m, a) for a in ("v", "mem", "syn")))


def neuron_layers(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """``(qualname, module)`` of every neuron layer, in registration order."""
    return [(n, m) for n, m in model.named_modules() if m is not model and is_neuron(m)]


def _spikes(out: Any) -> Optional[torch.Tensor]:
    s = out[0] if isinstance(out, (tuple, list)) else out
    return s if isinstance(s, torch.Tensor) and s.is_floating_point() else None


class RateRecorder:
    """Forward hooks on the neuron layers: the fraction of nonzero outputs, pooled over all calls."""

    def __init__(self, model: nn.Module, names: Optional[Sequence[str]] = None) -> None:
        mods = dict(model.named_modules())
        self.names = list(names) if names is not None else [n for n, _ in neuron_layers(model)]
        self.fired: Dict[str, float] = {n: 0.0 for n in self.names}
        self.count: Dict[str, int] = {n: 0 for n in self.names}
        self.handles = [mods[n].register_forward_hook(self._hook(n)) for n in self.names]

    def _hook(self, name: str) -> Callable:
        def hook(_m: nn.Module, _inp: Any, out: Any) -> None:
            s = _spikes(out)
            if s is not None:
                self.fired[name] += float((s.detach() != 0).sum())
                self.count[name] += s.numel()
        return hook

    def rates(self) -> Dict[str, float]:
        return {n: (self.fired[n] / self.count[n] if self.count[n] else float("nan")) for n in self.names}

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def __enter__(self) -> "RateRecorder":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def record_rates(model: nn.Module, run: Callable[[], Any], names: Optional[Sequence[str]] = None) -> Dict[str, float]:
    """Per-layer firing rates of one ``run()`` (an eager loop over T steps), under ``no_grad``."""
    with RateRecorder(model, names) as rec, torch.no_grad():
        run()
    return rec.rates()


# --------------------------------------------------------------------------- gains
class Gain:
    """Multiplies a neuron layer's input by ``g`` (absolute: ``set(1.0)`` restores the original)."""

    what: str = "?"

    def set(self, g: float) -> None:
        raise NotImplementedError


class ParamGain(Gain):
    """Scales a module's ``weight`` and ``bias`` (a Conv, a Linear, an affine BatchNorm)."""

    def __init__(self, name: str, module: nn.Module) -> None:
        self.what = name
        self.params = [p for p in (getattr(module, "weight", None), getattr(module, "bias", None))
                       if isinstance(p, torch.Tensor)]
        self.orig = [p.detach().clone() for p in self.params]

    def set(self, g: float) -> None:
        with torch.no_grad():
            for p, o in zip(self.params, self.orig):
                p.copy_(o * g)


class AttrGain(Gain):
    """Scales a float attribute (an attention ``scale``); ``inverse``: divides it (a neuron's threshold: with
    ``v_reset = 0`` a threshold divided by g fires exactly like the input multiplied by g)."""

    def __init__(self, name: str, obj: Any, attr: str, inverse: bool = False) -> None:
        self.what, self.obj, self.attr, self.inverse = f"{name}.{attr}", obj, attr, inverse
        self.orig = float(getattr(obj, attr))

    def set(self, g: float) -> None:
        setattr(self.obj, self.attr, self.orig / g if self.inverse else self.orig * g)


def _has_weights(m: nn.Module) -> bool:
    return isinstance(getattr(m, "weight", None), torch.Tensor) and not any(True for _ in m.children())


def find_feeders(model: nn.Module, step: Callable[[], Any]) -> Dict[str, Optional[Tuple[str, nn.Module]]]:
    """For each neuron layer, the last module with weights called after the previous neuron layer and before
    it, in one ``step()`` (None: there is none, e.g. a neuron after a matmul of spikes)."""
    neurons = {n for n, _ in neuron_layers(model)}
    order: List[Tuple[str, nn.Module]] = []
    handles = []
    for name, m in model.named_modules():
        if m is model:
            continue
        if name in neurons or _has_weights(m):
            handles.append(m.register_forward_pre_hook(lambda mod, inp, name=name: order.append((name, mod))))
    try:
        with torch.no_grad():
            step()
    finally:
        for h in handles:
            h.remove()
    feeders: Dict[str, Optional[Tuple[str, nn.Module]]] = {}
    last: Optional[Tuple[str, nn.Module]] = None
    for name, m in order:
        if name in neurons:
            feeders.setdefault(name, last)
            last = None
        else:
            last = (name, m)
    return feeders


# --------------------------------------------------------------------------- calibration
@dataclass
class CalibrationResult:
    rates: Dict[str, float]             # per layer, after calibration
    gains: Dict[str, float]             # the factor applied to each layer's feeder (1.0: untouched)
    feeders: Dict[str, str]             # what was scaled ('' if nothing could be)


def calibrate(model: nn.Module, run: Callable[[], Any], step: Callable[[], Any], *, target: float = 0.10,
              tol: float = 0.025, iters: int = 12, overrides: Optional[Dict[str, Gain]] = None,
              g_range: Tuple[float, float] = (1e-3, 1e3)) -> CalibrationResult:
    """Scale each neuron layer's feeder so that it fires about ``target`` in ``run()`` (the eager loop over
    T steps); ``step()`` is one eager step from the reset state (to see the call order). Best effort: a layer
    that cannot reach the target within ``iters`` runs keeps the closest gain found."""
    names = [n for n, _ in neuron_layers(model)]
    overrides = dict(overrides or {})
    found = find_feeders(model, step)
    gains: Dict[str, Gain] = {}
    for n in names:
        if n in overrides:
            gains[n] = overrides[n]
        elif found.get(n) is not None:
            fname, fmod = found[n]
            gains[n] = ParamGain(fname, fmod)
    applied: Dict[str, float] = {n: 1.0 for n in names}
    for n in names:
        if n not in gains:
            continue
        gain = gains[n]

        def rate_at(g: float) -> float:
            gain.set(g)
            return record_rates(model, run, [n])[n]

        lo, hi = None, None            # log-gains with rate below / above the target
        best_g, best_err = 1.0, math.inf
        lg = 0.0
        for _ in range(iters):
            g = math.exp(lg)
            r = rate_at(g)
            err = abs(r - target) if not math.isnan(r) else math.inf
            if err < best_err:
                best_g, best_err = g, err
            if err <= tol:
                break
            if r < target:
                lo = lg
                lg = lg + math.log(4.0) if hi is None else (lg + hi) / 2
            else:
                hi = lg
                lg = lg - math.log(4.0) if lo is None else (lg + lo) / 2
            lg = min(max(lg, math.log(g_range[0])), math.log(g_range[1]))
        gain.set(best_g)
        applied[n] = best_g
    rates = record_rates(model, run, names)
    return CalibrationResult(rates, applied, {n: (gains[n].what if n in gains else "") for n in names})
