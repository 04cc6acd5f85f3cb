"""The neuron spec as C statements: the one description both kernel targets (C/OpenMP, CUDA C++) expand.

Every function here turns a :class:`~snncc.neurons.NeuronSpec` into a C statement or expression over the
per-neuron scalars of one timestep, with the same floating-point operations in the same order as the
reference torch formulas in :mod:`snncc.neurons` (that is what makes spikes and V bit-identical). The loop
structure around them (blocks of neurons and OpenMP on CPU, one thread per neuron on CUDA) is the target's.

Names used in the snippets: ``x`` input, ``v`` membrane before the step, ``h`` after charging, ``s`` spike
(0/1), ``T`` the value type; constants ``TAU`` (LIF), ``KC`` (PLIF's sigmoid(w)), ``DEC`` (1 - 1/tau, as
torch computes it in double), ``VTH``, ``VR``, ``A`` (surrogate alpha). Backward: ``gs_in`` the incoming
gradient of the spike, ``gv`` of V after the step (in) / before it (out), ``gx`` of the input, ``d`` the
surrogate derivative, ``vp`` V before the step (PLIF's weight gradient).
"""
from __future__ import annotations

from typing import Any, Dict, Tuple

import torch

from snncc.neurons import NeuronSpec
from snncc.surrogate import plain_step_surrogate

__all__ = ["KINDS", "SURROGATES", "supported", "plain_step_surrogate", "charge", "reset", "bwd_reset", "surrogate", "charge_grads",
           "dh_dk", "EXP_FLOAT"]

#: neuron kinds with generated kernels: H affine in V and X with one state variable (both targets)...
KINDS = ("if", "lif", "plif")

#: d spike / d z as C, per surrogate (same formulas as snncc.surrogate.derivative); EXP is the target's exp.
SURROGATES = {
    "sigmoid": "{ T sg = (T)1 / ((T)1 + EXP(-(z * A))); d = ((T)1 - sg) * sg * A; }",
    "atan": "{ T q = (T)(M_PI / 2) * A * z; d = A / (T)2 / ((T)1 + q * q); }",
    "superspike": "{ T q = A * FABS(z) + (T)1; d = (T)1 / (q * q); }",
    "piecewise_linear": "{ T q = (T)1 - A * FABS(z); d = q > (T)0 ? q : (T)0; }",
    "triangle": "{ T q = A - FABS(z); d = (q > (T)0 ? q : (T)0) / (A * A); }",
    "rectangular": "{ d = FABS(z) < A / (T)2 ? (T)1 / A : (T)0; }",
    "erf": "{ T q = z * A; d = EXP(-(q * q)) * (A / (T)1.7724538509055159); }",
    # a user's surrogate (snncc.surrogate: name "callable"): its derivative is computed by its own
    # backward before the kernel runs, for all steps at once, and read here
    "callable": "{ d = dsur[i]; }",
}

#: A branch-free expf (Cephes' polynomial, ~2 ulp) that gcc vectorizes; libm's expf is a scalar call. Used
#: only in the backward (the surrogate derivative), where float tolerance is the contract.
EXP_FLOAT = r"""
static inline float snn_expf(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float n = floorf(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500E-4f;
  p = p * r + 1.3981999507E-3f;
  p = p * r + 8.3334519073E-3f;
  p = p * r + 4.1665795894E-2f;
  p = p * r + 1.6666665459E-1f;
  p = p * r + 5.0000001201E-1f;
  const float e = p * r * r + r + 1.0f;
  const int32_t bits = ((int32_t)n + 127) << 23;
  float scale;
  __builtin_memcpy(&scale, &bits, 4);
  return e * scale;
}
"""


def supported(spec: NeuronSpec) -> bool:
    """Whether the hand-tuned kernels run ``spec`` (else: the reference scan). A user's surrogate is
    supported when :func:`plain_step_surrogate` accepts it."""
    if spec.surrogate.opaque:
        return spec.kind in KINDS and plain_step_surrogate(spec.surrogate.fn)
    return spec.kind in KINDS and spec.surrogate.name in SURROGATES


def _reset0(spec: NeuronSpec) -> bool:
    return spec.v_reset is None or spec.v_reset == 0.0


def charge(spec: NeuronSpec) -> str:
    """H from v, x (snncc.neurons.charge, same operation order)."""
    r0 = _reset0(spec)
    if spec.kind == "if":
        return "v + x"
    if spec.kind == "izhikevich":       # same operation order as snncc.neurons.charge
        return "v + DT * ((T)0.04 * v * v + (T)5 * v + (T)140 - u + x)"
    if spec.kind in ("lif", "alif"):
        if spec.decay_input:
            return "v + (x - v) / TAU" if r0 else "v + (x - (v - VR)) / TAU"
        return "v * DEC + x" if r0 else "v - (v - VR) / TAU + x"
    if spec.decay_input:        # plif
        return "v + (x - v) * KC" if r0 else "v + (x - (v - VR)) * KC"
    return "v * ((T)1 - KC) + x" if r0 else "v - (v - VR) * KC + x"


def reset(spec: NeuronSpec) -> str:
    """V after the spike (hard: to VR; soft: minus VTH)."""
    return "v = s != (T)0 ? VR : h;" if spec.v_reset is not None else "v = h - s * VTH;"


def bwd_reset(spec: NeuronSpec) -> str:
    """(gs, gh) from gs_in and gv through the reset (detach_reset drops the reset's spike path)."""
    if spec.v_reset is not None:
        gs = "gs = gs_in;" if spec.detach_reset else "gs = gs_in + gv * (VR - h);"
        return gs + " gh = gv * ((T)1 - s);"
    gs = "gs = gs_in;" if spec.detach_reset else "gs = gs_in - gv * VTH;"
    return gs + " gh = gv;"


def surrogate(spec: NeuronSpec) -> str:
    """d = surrogate'(z) with z = h - VTH."""
    return SURROGATES[spec.surrogate.name]


def charge_grads(spec: NeuronSpec) -> str:
    """(gx, gv) from gh (the same float ops as reference._lif_charge_grads)."""
    r0 = _reset0(spec)
    if spec.kind == "if":
        return "gx = gh; gv = gh;"
    coef = "/ TAU" if spec.kind in ("lif", "alif") else "* KC"
    if spec.decay_input:
        return f"gx = gh {coef}; gv = gh - gx;"
    if spec.kind in ("lif", "alif"):
        return "gx = gh; gv = gh * DEC;" if r0 else "gx = gh; gv = gh - gh / TAU;"
    return "gx = gh; gv = gh * ((T)1 - KC);" if r0 else "gx = gh; gv = gh - gh * KC;"


def dh_dk(spec: NeuronSpec) -> str:
    """PLIF: dH/dk at one neuron-step, from x and vp (V before the step)."""
    vr = "(vp - VR)" if not _reset0(spec) else "vp"
    return f"(x - {vr})" if spec.decay_input else f"(-{vr})"
