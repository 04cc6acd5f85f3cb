"""Which stateful modules snncc compiles, and how: by behaviour, never by import path.

For each stateful leaf module the frontend asks :func:`bind`:

1. snncc's own neurons carry their :class:`~snncc.neurons.NeuronSpec`.
2. Any other module's step is lifted into the neuron IR (:mod:`snncc.lift`: recorded from its own forward
   and checked against it on probe inputs). That covers SpikingJelly's nodes (0.0.0.0.14 and 2.x alike),
   snnTorch's ``Leaky``/``Synaptic``, and users' neurons.
3. When a lifted module behaves exactly like one of the built-in IF / LIF / ParametricLIF specs (its
   attributes give the candidate; the candidate is run against the module on probe inputs: same spikes,
   same V, same gradients), it is bound to that spec, whose hand-tuned kernels carry more fusions
   (max-pool epilogue, training BatchNorm prologue, ``memory=`` modes). Otherwise the scan is generated
   from the lifted IR on every backend.
4. What cannot be lifted runs opaque, step by step, with the reason (``Recognition.reason``), which the
   frontend warns about once and ``snncc.explain`` lists.

Results are cached per module and configuration (:func:`config_key`): changing a neuron's threshold or
train/eval flag re-recognizes it.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from .lift import Lifted, LiftFailure, _get_state, _probe_inputs, _reset, lift_neuron, restore_attrs, \
    snapshot_attrs
from .lift import known_surrogate
from .neurons import BaseNeuron, NeuronSpec, initial_state, step
from .surrogate import SurrogateSpec, plain_step_surrogate

__all__ = ["NeuronBinding", "Recognition", "bind", "bind_keyed", "config_key", "LiftedSteps"]


class LiftedSteps:
    """A module's lifted step, per input dtype (lifted and checked on first use of each dtype); ``lift``:
    how another dtype is lifted (default :func:`snncc.lift.lift_neuron`)."""

    def __init__(self, base: Lifted, lift: Optional[Any] = None) -> None:
        self.base = base
        self._lift = lift or lift_neuron
        self._by_dtype: Dict[torch.dtype, Any] = {base.dtype: base}

    def get(self, m: nn.Module, dtype: torch.dtype) -> Lifted:
        """The step for ``dtype``; raises LiftFailure when the module's own ``dtype`` run differs from it."""
        hit = self._by_dtype.get(dtype)
        if hit is None:
            try:
                hit = self._lift(m, dtype)
            except LiftFailure as exc:
                hit = exc
            self._by_dtype[dtype] = hit
        if isinstance(hit, LiftFailure):
            raise hit
        return hit

    @property
    def state_attrs(self) -> Tuple[str, ...]:
        return self.base.state_attrs

    @property
    def param_attrs(self) -> Tuple[str, ...]:
        return self.base.param_attrs


@dataclass(frozen=True)
class NeuronBinding:
    """How a compiled neuron layer runs: a built-in ``spec`` (hand-tuned kernels) or its ``lifted`` step
    (kernels generated from the IR). ``param_names``: module attributes passed to the scan as parameters;
    ``state_attr``: where a spec-bound module keeps V (written back after a run)."""

    spec: Optional[NeuronSpec]
    param_names: Tuple[str, ...]
    state_attr: Optional[str]
    lifted: Optional[LiftedSteps] = field(default=None, compare=False, hash=False)
    binary: bool = True           # outputs only 0/1 (spikes): the next layer may keep them as bits
    #: a neuron with its own recurrent Linear (snnTorch's RLeaky/RSynaptic): that child's name, and the IR
    #: parameter its output was read as while lifting (the recurrent drive: see passes/fuse_recurrence.py)
    recurrent: Optional[str] = None
    tap: Optional[str] = None

    @property
    def how(self) -> str:
        """``"builtin:<kind>"`` or ``"lifted"`` (snncc.explain)."""
        return f"builtin:{self.spec.kind}" if self.spec is not None else "lifted"


@dataclass(frozen=True)
class Recognition:
    binding: Optional[NeuronBinding]
    reason: str = ""              # why the module runs opaque (binding None)


def config_key(m: nn.Module) -> Tuple[Any, ...]:
    """What a module's recognition depends on: class, train flags, plain attributes, surrogate callables,
    parameter shapes and small static buffers (state tensors excluded: they change every call)."""
    items: List[Any] = []
    known = _STATE_NAMES.get(id(m))
    states = known[1] if known is not None and known[0]() is m else ()
    for prefix, sub in m.named_modules():
        items.append((prefix, type(sub).__qualname__, sub.training))
        for k, v in vars(sub).items():
            if k.startswith("_") or (not prefix and k in states):
                continue
            if isinstance(v, (int, float, bool, str, type(None))):
                items.append((prefix, k, v))
            elif callable(v) and not isinstance(v, (nn.Module, torch.Tensor)):
                items.append((prefix, k, id(v)))
        for k, p in sub._parameters.items():
            if p is not None:
                items.append((prefix, k, tuple(p.shape), p.dtype))
        persistent = set(sub._buffers) - set(getattr(sub, "_non_persistent_buffers_set", ()))
        for k in sorted(persistent):
            b = sub._buffers[k]
            if b is not None and b.numel() <= 16 and not b.requires_grad:
                items.append((prefix, k, b.dtype, tuple(b.detach().cpu().reshape(-1).tolist())))
    if isinstance(m, BaseNeuron):
        items.append(m.spec)
    return tuple(items)


#: module id -> (weakref, {config key: recognition}): every configuration seen (train and eval both stay
#: cached, so switching modes does not lift the neuron again)
_CACHE: Dict[int, Tuple[Any, Dict[Tuple[Any, ...], Recognition]]] = {}
#: module id -> (weakref, its state attributes): left out of config_key (they change at every call)
_STATE_NAMES: Dict[int, Tuple[Any, Tuple[str, ...]]] = {}


def bind(m: nn.Module) -> Recognition:
    """Recognize ``m`` (see the module docstring); cached per module and configuration."""
    return bind_keyed(m)[0]


def bind_keyed(m: nn.Module) -> Tuple[Recognition, Tuple[Any, ...]]:
    """:func:`bind` and the module's :func:`config_key` after it (its state attributes then known and left
    out): what a compiled model's specialization key needs, computed once per call."""
    key = config_key(m)
    hit = _CACHE.get(id(m))
    if hit is not None and hit[0]() is m:
        found = hit[1].get(key)
        if found is not None:
            return found, key
    else:
        hit = _CACHE[id(m)] = (weakref.ref(m), {})
    rec = _recognize(m)
    b = rec.binding
    names: Tuple[str, ...] = ("state",) if isinstance(m, BaseNeuron) else \
        (b.lifted.state_attrs if b is not None and b.lifted is not None else ())
    hit[1][key] = rec
    if names:
        _STATE_NAMES[id(m)] = (weakref.ref(m), names)
        key = config_key(m)
        hit[1][key] = rec
    if len(hit[1]) > 16:                       # a module reconfigured many times: keep the recent ones
        hit[1].pop(next(iter(hit[1])))
    return rec, key


def _recognize(m: nn.Module) -> Recognition:
    if isinstance(m, BaseNeuron) and m.spec.lif_family:
        spec = m.spec
        return Recognition(NeuronBinding(spec, spec.learnable, None))
    # NOTE: snncc's two-state neurons (Izhikevich, adaptive LIF) are lifted like any user's neuron: their
    # kernels are generated from their step code, as every neuron's but the LIF family's hand-tuned ones
    if getattr(m, "step_mode", "s") != "s":
        return Recognition(None, f"step_mode='{m.step_mode}' (snncc compiles single-step modules; use "
                                 "step_mode='s')")
    if getattr(m, "store_v_seq", False):
        return Recognition(None, "store_v_seq=True (the voltage sequence is kept by the module itself)")
    dtype = next((t.dtype for t in list(m.parameters()) + list(m.buffers()) if t.is_floating_point()),
                 torch.float32)
    dtype = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    try:
        lifted = lift_neuron(m, dtype)
    except LiftFailure as exc:
        # NOTE: a step snncc cannot see into (SpikingJelly 0.0.0.0.14 runs TorchScript functions) may still
        # behave exactly like a built-in spec: its attributes name the candidate, a probe run decides
        spec_b = _builtin(m, None)
        if spec_b is not None:
            return Recognition(NeuronBinding(spec_b[0], spec_b[1], "v"))
        rec = _recurrent_binding(m, dtype)
        return rec if rec is not None else Recognition(None, str(exc))
    steps = LiftedSteps(lifted)
    spec_b = _builtin(m, lifted)
    if spec_b is not None:
        return Recognition(NeuronBinding(spec_b[0], spec_b[1], lifted.state_attrs[0], steps))
    return Recognition(NeuronBinding(None, lifted.param_attrs, None, steps, lifted.binary_output_for(m)))


# ----------------------------------------------------------------------------- built-in specs by behaviour
def _surrogate_of(m: nn.Module) -> Optional[SurrogateSpec]:
    """The module's ``surrogate_function`` as a spec: a known formula when its derivative is one (probed),
    else the callable itself if it is a plain spike function."""
    fn = getattr(m, "surrogate_function", None)
    if not callable(fn):
        return None
    spec = getattr(fn, "spec", None)
    if isinstance(spec, SurrogateSpec):
        return spec
    alpha = getattr(fn, "alpha", None)
    known = known_surrogate(fn, [float(alpha)] if isinstance(alpha, (int, float)) else [])
    if known is not None:
        return known
    return SurrogateSpec("callable", 1.0, fn) if plain_step_surrogate(fn) else None


def _candidates(m: nn.Module, lifted: Optional[Lifted]) -> List[Tuple[NeuronSpec, Tuple[str, ...]]]:
    """Built-in specs the module's attributes suggest (to be confirmed by running both)."""
    if lifted is not None and (len(lifted.state_attrs) != 1 or len(lifted.steady.spike_ops) != 1):
        return []
    vth, vr = getattr(m, "v_threshold", None), getattr(m, "v_reset", 0.0)
    det = getattr(m, "detach_reset", False)
    if not isinstance(vth, float) or not (vr is None or isinstance(vr, float)) or not isinstance(det, bool):
        return []
    if lifted is not None:
        sur = lifted.steady.surrogates[0]
        if lifted.steady.spike_ops[0].attr("strict"):
            return []
    else:
        sur = _surrogate_of(m)
        if sur is None or not isinstance(vars(m).get("_memories"), dict) or "v" not in m._memories:
            return []
    common = dict(surrogate=sur, v_threshold=vth, v_reset=vr, detach_reset=det)
    out: List[Tuple[NeuronSpec, Tuple[str, ...]]] = []
    di = getattr(m, "decay_input", True)
    if not isinstance(di, bool):
        return []
    tau = getattr(m, "tau", None)
    w = getattr(m, "w", None)
    if isinstance(w, nn.Parameter) and w.numel() == 1:
        out.append((NeuronSpec("plif", decay_input=di, learnable=("w",), **common), ("w",)))
    if isinstance(tau, float) and tau > 1.0 and w is None:
        out.append((NeuronSpec("lif", tau=tau, decay_input=di, **common), ()))
    if tau is None and w is None:
        out.append((NeuronSpec("if", **common), ()))
    return out


def _builtin(m: nn.Module, lifted: Optional[Lifted]) -> Optional[Tuple[NeuronSpec, Tuple[str, ...]]]:
    snap = snapshot_attrs(m)
    if lifted is not None and len(lifted.state_attrs) != 1:
        return None
    attr = lifted.state_attrs[0] if lifted is not None else "v"
    try:
        with torch.random.fork_rng(devices=[]):
            for spec, pnames in _candidates(m, lifted):
                if _behaves_like(m, attr, spec, pnames):
                    return spec, pnames
    finally:
        restore_attrs(m, snap)
    return None


def _behaves_like(m: nn.Module, attr: str, spec: NeuronSpec, pnames: Tuple[str, ...]) -> bool:
    """The module and ``neurons.step(spec)`` on probe inputs: identical spikes and V (float64, and float32),
    gradients to rounding (training)."""
    dev = next((p.device for p in m.parameters()), torch.device("cpu"))
    snap = snapshot_attrs(m)
    for dtype in (torch.float64, torch.float32):
        restore_attrs(m, snap)
        grad = m.training
        xs = [x.requires_grad_(grad) for x in _probe_inputs((2, 5), dtype, dev)]
        params = tuple(getattr(m, n) for n in pnames)
        with torch.set_grad_enabled(grad):
            _reset(m)
            eager = [m(x) for x in xs]
            v_e = _get_state(m, attr)
            state = initial_state(spec, xs[0])
            ours = []
            for x in xs:
                s, state, _ = step(spec, x, state, params)
                ours.append(s)
        if not all(isinstance(a, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
                   for a, b in zip(eager, ours)):
            return False
        if not isinstance(v_e, torch.Tensor) or not torch.equal(v_e, state[0]):
            return False
        if grad:
            inputs = xs + [p for p in params if p.requires_grad]
            gen = torch.Generator().manual_seed(7)
            us = [torch.randn(o.shape, generator=gen, dtype=dtype).to(dev) for o in eager]
            try:
                g1 = torch.autograd.grad(eager, inputs, us, allow_unused=True)
                g2 = torch.autograd.grad(ours, inputs, us, allow_unused=True)
            except RuntimeError:
                return False
            tol = dict(rtol=1e-7, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-6)
            for a, b in zip(g1, g2):
                if (a is None) != (b is None) or (a is not None and not torch.allclose(a, b, **tol)):
                    return False
    return True


# ----------------------------------------------------------------------------- neurons with their own recurrence
class _Tap(nn.Module):
    """Stands in for a neuron's recurrent Linear while its step is lifted: returns a buffer, which the lift
    records as one more parameter (the recurrent drive, computed by the cell at run time)."""

    def __init__(self, like: torch.Tensor) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(99)
        self.register_buffer("value", torch.randn(like.shape[0], generator=gen, dtype=torch.float64)
                             .to(like.dtype).to(like.device))

    def forward(self, spikes: torch.Tensor) -> torch.Tensor:
        return self.value


def _recurrent_child(m: nn.Module) -> Optional[Tuple[str, nn.Linear]]:
    """The one square ``nn.Linear`` child of ``m`` (snnTorch's ``recurrent``), if that is its only child
    with weights."""
    kids = [(n, c) for n, c in m.named_children() if any(True for _ in c.parameters())]
    if len(kids) != 1 or type(kids[0][1]) is not nn.Linear or kids[0][1].in_features != kids[0][1].out_features:
        return None
    return kids[0]  # type: ignore[return-value]


def lift_with_tap(m: nn.Module, dtype: torch.dtype) -> Tuple[Lifted, str]:
    """``m``'s step lifted with its recurrent Linear read as a tap, and the tap's IR parameter name;
    checked against the real module on probe inputs (spikes and states identical; raises LiftFailure)."""
    found = _recurrent_child(m)
    if found is None:
        raise LiftFailure("it is not a neuron with one recurrent Linear")
    name, lin = found
    m._modules[name] = _Tap(lin.weight.detach().to(dtype))
    try:
        lifted = lift_neuron(m, dtype)
    finally:
        m._modules[name] = lin
    path = f"{name}.value"
    if path not in lifted.param_attrs:
        raise LiftFailure(f"its recurrent Linear '{name}' does not feed its step")
    tap = lifted.steady.params[lifted.param_attrs.index(path)]
    if lifted.steady.outputs[0] not in lifted.steady.new_states:
        raise LiftFailure("its recurrent input is not its own output spikes")
    _check_tapped(m, lifted, lin, tap, dtype)
    return lifted, tap


def _check_tapped(m: nn.Module, lifted: Lifted, lin: nn.Linear, tap: str, dtype: torch.dtype) -> None:
    """The real module over 8 probe steps equals the lifted step fed ``lin(previous spikes)``."""
    from .neuron_ir import interpret
    dev = lin.weight.device
    snap = snapshot_attrs(m)
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            xs = _probe_inputs((2, lin.in_features), dtype, dev)
            _reset(m)
            eager = [m(x) for x in xs]
            pmap = dict(zip([p for p in lifted.steady.params if p != tap], lifted.params_except(m, tap)))
            st: Tuple[torch.Tensor, ...] = ()
            prev = torch.zeros_like(xs[0])
            for t, x in enumerate(xs):
                ir = lifted.first if t == 0 else lifted.steady
                pmap[tap] = torch.nn.functional.linear(prev.to(lin.weight.dtype), lin.weight, lin.bias)
                (o,), st = interpret(ir, x, st, pmap)
                if not (isinstance(eager[t], torch.Tensor) and torch.equal(o, eager[t])):
                    raise LiftFailure(f"its recurrent step differs from the lifted one at probe step {t}")
                prev = o
    finally:
        restore_attrs(m, snap)


def _recurrent_binding(m: nn.Module, dtype: torch.dtype) -> Optional[Recognition]:
    """A neuron that applies its own recurrent Linear to its previous spikes (snnTorch's RLeaky), bound
    as a recurrent cell; None when ``m`` is not one (the caller reports the first lift's failure)."""
    found = _recurrent_child(m)
    if found is None:
        return None
    try:
        lifted, tap = lift_with_tap(m, dtype)
    except LiftFailure:
        return None
    steps = LiftedSteps(lifted, lambda mod, dt: lift_with_tap(mod, dt)[0])
    return Recognition(NeuronBinding(None, lifted.param_attrs, None, steps, lifted.binary_output_for(m),
                                     recurrent=found[0], tap=tap))
