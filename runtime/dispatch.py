"""Backends claim neuron scans: the dispatcher asks them in priority order (cuda, cpu, reference).

Each backend is a :class:`Backend` with a checker (``claims_*``: can it run this scan on these tensors?)
and an implementation (``scan_*``), as Lightning Thunder's executors register theirs. A backend whose
library is missing is simply absent: ``cuda`` is listed only when ``runtime.cuda`` imports (it imports
CuPy lazily, at the first launch), ``cpu`` claims nothing without a C compiler, and ``reference`` (plain
torch, any device) claims everything: it is the fallback and the oracle the others are tested against.

Two kinds of scan: a built-in spec's (:class:`~snncc.neurons.NeuronSpec`, hand-tuned kernels with their
fusions) and a lifted neuron's (its own step code, :mod:`snncc.lift`; kernels generated from the IR).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from snncc.neuron_ir import hoist_static, run_prelude
from snncc.neurons import NeuronSpec
from . import cpu, cpu_ir, cpu_recurrent, reference

__all__ = ["Backend", "BACKENDS", "neuron_scan", "lifted_neuron_scan", "lifted_neuron_scan_pooled", "recurrent_cell_scan",
           "backend_for"]

Result = Tuple[torch.Tensor, Tuple[torch.Tensor, ...]]


@dataclass(frozen=True)
class Backend:
    """A target's claim on neuron scans (checker + implementation for each kind of scan)."""

    name: str
    claims_spec: Callable[..., bool]
    scan_spec: Callable[..., Result]
    claims_lifted: Callable[..., bool]
    scan_lifted: Callable[..., Result]


_WARNED: set = set()


def _warn_once(msg: str) -> None:
    if msg not in _WARNED:
        _WARNED.add(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=4)


def _plif_w(spec: NeuronSpec, params: Sequence[torch.Tensor]) -> Optional[torch.Tensor]:
    return params[0] if spec.kind == "plif" and len(params) == 1 else None


# ----------------------------------------------------------------------------- cuda
def _cuda_backend() -> Optional[Backend]:
    try:
        from . import cuda
    except ImportError:
        return None

    def claims_spec(spec: NeuronSpec, x: torch.Tensor, state: Any, params: Sequence[torch.Tensor], **kw: Any) -> bool:
        w = _plif_w(spec, params)
        v0 = None if state is None else state[0]
        return x.is_cuda and cuda.supports(spec, x, v0, w) and (w is None or w.numel() == 1)

    def scan_spec(spec: NeuronSpec, x: torch.Tensor, K: int, broadcast: bool, state: Any,
                  params: Sequence[torch.Tensor], pool: Optional[int] = None, h_dtype: Any = None,
                  recompute: bool = False, pool_cf: bool = False) -> Result:
        from .cuda.launch import cuda_scan       # imports cupy: only when a CUDA scan actually runs
        if recompute:
            _warn_once("snncc: memory='min' is not implemented by the CUDA kernels yet; they keep H for "
                       "backward as memory='default' does (same results, more memory).")
        v0 = None if state is None else state[0]
        spikes, v = cuda_scan(spec, x, K, broadcast, v0, _plif_w(spec, params), pool, h_dtype)
        return spikes, (v,)

    def claims_lifted(lifted: Any, x: torch.Tensor, **kw: Any) -> bool:
        if not x.is_cuda:
            return False
        try:
            from .cuda.ir_scan import cuda_supports_ir
        except ImportError:
            return False
        return cuda_supports_ir(lifted.first, lifted.steady, x) is None

    def scan_lifted(lifted: Any, x: torch.Tensor, K: int, broadcast: bool, state: Any, params: Any) -> Result:
        from .cuda.ir_scan import cuda_ir_scan
        return cuda_ir_scan(lifted.first, lifted.steady, x, K, broadcast, state, params)

    return Backend("cuda", claims_spec, scan_spec, claims_lifted, scan_lifted)


# ----------------------------------------------------------------------------- cpu (C/OpenMP)
def _cpu_claims_spec(spec: NeuronSpec, x: torch.Tensor, state: Any, params: Sequence[torch.Tensor],
                     **kw: Any) -> bool:
    w = _plif_w(spec, params)
    v0 = None if state is None else state[0]
    return cpu.supports(spec, x, v0, w) and (w is None or w.numel() == 1)


def _cpu_scan_spec(spec: NeuronSpec, x: torch.Tensor, K: int, broadcast: bool, state: Any,
                   params: Sequence[torch.Tensor], pool: Optional[int] = None, h_dtype: Any = None,
                   recompute: bool = False, pool_cf: bool = False) -> Result:
    v0 = None if state is None else state[0]
    spikes, v = cpu.c_scan(spec, x, K, broadcast, v0, _plif_w(spec, params), pool, h_dtype, recompute, pool_cf)
    return spikes, (v,)


def _cpu_claims_lifted(lifted: Any, x: torch.Tensor, **kw: Any) -> bool:
    return x.device.type == "cpu" and cpu_ir.c_supports_ir(lifted.first, lifted.steady) is None


def _cpu_scan_lifted(lifted: Any, x: torch.Tensor, K: int, broadcast: bool, state: Any, params: Any) -> Any:
    return cpu_ir.ir_c_scan(lifted.first, lifted.steady, x, K, broadcast, state, params)


# ----------------------------------------------------------------------------- reference (torch)
def _ref_scan_spec(spec: NeuronSpec, x: torch.Tensor, K: int, broadcast: bool, state: Any,
                   params: Sequence[torch.Tensor], pool: Optional[int] = None, h_dtype: Any = None,
                   recompute: bool = False, pool_cf: bool = False) -> Result:
    return reference.neuron_scan(spec, x, K, broadcast, state, params, pool=pool)


def _ref_scan_lifted(lifted: Any, x: torch.Tensor, K: int, broadcast: bool, state: Any, params: Any) -> Result:
    return reference.lifted_scan(lifted.first, lifted.steady, x, K, broadcast, state, params)


def _always(*a: Any, **k: Any) -> bool:
    return True


def _backends() -> List[Backend]:
    out = [b for b in (_cuda_backend(),) if b is not None]
    out.append(Backend("cpu", _cpu_claims_spec, _cpu_scan_spec, _cpu_claims_lifted, _cpu_scan_lifted))
    out.append(Backend("reference", _always, _ref_scan_spec, _always, _ref_scan_lifted))
    return out


#: the backends in the order they are asked
BACKENDS: List[Backend] = _backends()


def backend_for(kind: str, *args: Any, **kwargs: Any) -> Backend:
    """The first backend that claims a ``"spec"`` or ``"lifted"`` scan of these arguments."""
    for b in BACKENDS:
        if (b.claims_spec if kind == "spec" else b.claims_lifted)(*args, **kwargs):
            return b
    raise AssertionError("the reference backend claims every scan")


# ----------------------------------------------------------------------------- entry points
def neuron_scan(spec: NeuronSpec, x: torch.Tensor, K: int, broadcast: bool,
                state: Optional[Sequence[torch.Tensor]], params: Sequence[torch.Tensor],
                pool: Optional[int] = None, h_dtype: Optional[torch.dtype] = None, recompute: bool = False,
                pool_cf: bool = False) -> Result:
    """A built-in neuron layer over K steps on the first backend that claims it. ``x`` is ``[K, *S]`` (or
    ``[*S]`` fed at every step when ``broadcast``); ``state`` None means the reset state. Returns spikes
    ``[K, *S]`` and the final state.

    ``pool=k``: the spikes' k x k max pool (stride k, no padding) is returned instead, ``[K, N, C, H/k,
    W/k]``: fused into the kernel when it runs, ``F.max_pool2d`` after the scan otherwise. ``h_dtype``:
    the dtype H is kept in for backward by the C kernel (float16 = ``memory="half"``); ``recompute``: the
    C kernel keeps only its input and initial V and reruns the forward in backward (``memory="min"``).
    """
    if x.dtype in (torch.float16, torch.bfloat16) and backend_for("spec", spec, x, state, params).name != "cuda":
        # NOTE: AMP (autocast gives the neurons half-precision input): the state is kept in float32, as the
        # CUDA kernels do, so V does not lose the small increments a half-precision sum rounds away; spikes
        # (exactly 0/1) go back in the input's dtype and the gradient back to it through autograd.
        st = None if state is None else tuple(s.float() for s in state)
        spikes, out_state = neuron_scan(spec, x.float(), K, broadcast, st, params, pool, h_dtype, recompute,
                                        pool_cf)
        return spikes.to(x.dtype), out_state
    b = backend_for("spec", spec, x, state, params)
    return b.scan_spec(spec, x, K, broadcast, state, params, pool=pool, h_dtype=h_dtype, recompute=recompute,
                       pool_cf=pool_cf)


def lifted_neuron_scan(lifted: Any, x: torch.Tensor, K: int, broadcast: bool,
                       state: Optional[Sequence[torch.Tensor]], params: Sequence[torch.Tensor]) -> Result:
    """A lifted neuron (:class:`snncc.lift.Lifted`) over K steps on the first backend that claims it:
    ``(outputs [K, *S], final states)``."""
    kernel, prelude = _kernel_steps(lifted)
    b = backend_for("lifted", kernel, x)
    res = None
    if b.name != "reference":
        derived = run_prelude(prelude, dict(zip(lifted.steady.params, params)), x,
                              kernel.steady.params[len(params):])
        res = b.scan_lifted(kernel, x, K, broadcast, state, tuple(params) + derived)
    if res is None:                 # a backend may decline at run time (a dtype it does not generate)
        res = _ref_scan_lifted(lifted, x, K, broadcast, state, params)
    return res


def lifted_neuron_scan_pooled(lifted: Any, x: torch.Tensor, K: int, broadcast: bool,
                              state: Optional[Sequence[torch.Tensor]], params: Sequence[torch.Tensor],
                              k: int) -> Optional[Result]:
    """``lifted_neuron_scan`` with the outputs' k x k, stride-k max pool computed by the kernel itself
    (``cpu_ir``'s pooled scans: ``(pooled outputs [K, N, C, H // k, W // k], final states)``), where the
    C backend claims the scan and the geometry fits; None otherwise (the caller pools the full outputs)."""
    kernel, prelude = _kernel_steps(lifted)
    if backend_for("lifted", kernel, x).name != "cpu":
        return None
    derived = run_prelude(prelude, dict(zip(lifted.steady.params, params)), x, kernel.steady.params[len(params):])
    return cpu_ir.ir_c_scan(kernel.first, kernel.steady, x, K, broadcast, state, tuple(params) + derived, pool=k)


def recurrent_cell_scan(lifted: Any, e: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor],
                        sp0: Optional[torch.Tensor], state: Optional[Sequence[torch.Tensor]],
                        params: Sequence[torch.Tensor], tap: Optional[str] = None) -> Result:
    """A recurrent cell (a neuron fed back its spikes through ``w``, ``b``) over ``e``'s K steps: the CUDA
    cell of ``cuda.rec_scan`` or the C loop of ``cpu_recurrent`` when one claims the tensors, else the torch
    reference loop (any device; and under autocast, where eager's Linear runs in lower precision). ``tap``
    None: the neuron's input is ``e + linear(s)`` (a user's add); else the lifted step's parameter that is
    the recurrent drive (the module computes it itself, as snnTorch's RLeaky does) and ``params`` are its
    other parameters.
    Returns ``(spikes [K, N, H], final states)``."""
    first, steady = _tapped(lifted.first, lifted.steady, tap)
    name = tap or cpu_recurrent.TAP
    res = None
    if not torch.is_autocast_enabled(e.device.type):
        kernel, prelude = _kernel_steps(lifted)
        kfirst, ksteady = _tapped(kernel.first, kernel.steady, tap)
        own = [p for p in lifted.steady.params if p != name]

        def derived() -> Tuple[torch.Tensor, ...]:
            return run_prelude(prelude, dict(zip(own, params)), e[0],
                               [p for p in kernel.steady.params if p != name][len(params):])
        if e.is_cuda:               # the CUDA cell (runtime/cuda/rec_scan.py) where CuPy is installed
            try:
                from .cuda import rec_scan
            except ImportError:
                rec_scan = None
            if rec_scan is not None and rec_scan.cuda_supports_rec(kfirst, ksteady, e, name) is None:
                res = rec_scan.rec_cuda_scan(kfirst, ksteady, name, e, w, b, sp0, state, tuple(params) + derived())
        if res is None and cpu_recurrent.c_supports_rec(kfirst, ksteady) is None:
            res = cpu_recurrent.rec_c_scan(kfirst, ksteady, name, e, w, b, sp0, state, tuple(params) + derived())
    if res is None:
        res = reference.recurrent_scan(first, steady, name, e, w, b, sp0, state, params)
    return res


def _tapped(first: Any, steady: Any, tap: Optional[str]) -> Tuple[Any, Any]:
    """The cell's steps: a user's add ``e + tap`` before the neuron's later steps (its first step, from
    the reset state, has no recurrent term), or the module's own steps when they read the tap."""
    if tap is not None:
        return first, steady
    return first, cpu_recurrent.with_tap(steady)


@dataclass(frozen=True)
class _KernelSteps:
    """What a kernel backend runs: the steps with their parameter-only ops hoisted (``hoist_static``)."""

    first: Any
    steady: Any


_KERNEL_STEPS: Dict[int, Tuple[Any, _KernelSteps, Tuple[Any, ...]]] = {}


def _kernel_steps(lifted: Any) -> Tuple[_KernelSteps, Tuple[Any, ...]]:
    hit = _KERNEL_STEPS.get(id(lifted))
    if hit is None or hit[0] is not lifted:
        first, steady, prelude = hoist_static(lifted.first, lifted.steady)
        hit = _KERNEL_STEPS[id(lifted)] = (lifted, _KernelSteps(first, steady), prelude)
    return hit[1], hit[2]
