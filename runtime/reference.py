"""Reference backend: plain torch ops on any device; the oracle every other backend is tested against.

A neuron layer's scan over a chunk of K timesteps is one ``torch.autograd.Function`` (one autograd node,
not K x ops): forward runs :func:`snncc.neurons.step`'s equations under no_grad; backward is BPTT.

* IF / LIF / ParametricLIF (H affine in V and X): closed-form backward from the saved H per step and the
  spikes. A surrogate snncc knows is evaluated directly; an opaque one (a user's ``autograd.Function``) is
  called through autograd on ``H - V_th``, so its own backward runs, as in eager.
* Other kinds (Izhikevich, adaptive LIF): backward recomputes each step from its saved input and state
  and differentiates :func:`snncc.neurons.step` with autograd.

Everything kept for backward goes through ``ctx.save_for_backward``.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

import torch

from snncc.neurons import NeuronSpec, charge, fire, initial_state, reset, step
from snncc.surrogate import derivative

__all__ = ["neuron_scan"]


def _surrogate_grad(spec: NeuronSpec, z: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``grad * d spike / d z``; through the user's own backward when the surrogate is opaque."""
    sur = spec.surrogate
    if not sur.opaque:
        return grad * derivative(sur.name, sur.alpha, z)
    with torch.enable_grad():
        zz = z.detach().requires_grad_(True)
        s = sur.fn(zz)
        (g,) = torch.autograd.grad(s, zz, grad)
    return g


def _lif_charge_grads(spec: NeuronSpec, g_h: torch.Tensor, k: Optional[torch.Tensor]
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(dL/dX, dL/dV_prev) from dL/dH for the affine charges (same float ops as autograd of eager's)."""
    reset0 = spec.v_reset is None or spec.v_reset == 0.0
    if spec.kind == "if":
        return g_h, g_h
    if spec.kind == "lif":
        if spec.decay_input:
            g_x = g_h / spec.tau
            return g_x, g_h - g_x
        if reset0:
            return g_h, g_h * (1.0 - 1.0 / spec.tau)
        return g_h, g_h - g_h / spec.tau
    # plif, k = sigmoid(w)
    if spec.decay_input:
        g_x = g_h * k
        return g_x, g_h - g_x
    if reset0:
        return g_h, g_h * (1.0 - k)
    return g_h, g_h - g_h * k


class _AffineScan(torch.autograd.Function):
    """IF/LIF/PLIF over K steps. Inputs: x ``[K, M]`` (or ``[M]`` broadcast), v0 ``[M]``, optional w."""

    @staticmethod
    def forward(ctx: Any, spec: NeuronSpec, broadcast: bool, K: int, x: torch.Tensor, v0: torch.Tensor,
                w: Optional[torch.Tensor]):
        params = (w,) if w is not None else ()
        v = v0
        hs, ss = [], []
        for t in range(K):
            xt = x if broadcast else x[t]
            h = charge(spec, xt, v, params)
            s = fire(spec.surrogate, h - spec.v_threshold)
            v = reset(spec, h, s)
            hs.append(h)
            ss.append(s)
        spikes = torch.stack(ss)
        h_seq = torch.stack(hs)
        ctx.spec, ctx.broadcast, ctx.K = spec, broadcast, K
        ctx.has_w = w is not None
        need_x = spec.kind == "plif"
        ctx.save_for_backward(h_seq, spikes, v0, x if need_x else None, w)
        return spikes, v

    @staticmethod
    def backward(ctx: Any, g_spikes: torch.Tensor, g_v_last: Optional[torch.Tensor]):
        h_seq, spikes, v0, x, w = ctx.saved_tensors
        spec, K = ctx.spec, ctx.K
        k = w.sigmoid() if w is not None else None
        g_v = torch.zeros_like(v0) if g_v_last is None else g_v_last
        g_xs = []
        g_k = torch.zeros((), dtype=h_seq.dtype, device=h_seq.device) if k is not None else None
        for t in range(K - 1, -1, -1):
            h, s = h_seq[t], spikes[t]
            if spec.v_reset is None:
                g_s = g_spikes[t] if spec.detach_reset else g_spikes[t] - g_v * spec.v_threshold
                g_h = g_v
            else:
                g_s = g_spikes[t] if spec.detach_reset else g_spikes[t] + g_v * (spec.v_reset - h)
                g_h = g_v * (1.0 - s)
            g_h = g_h + _surrogate_grad(spec, h - spec.v_threshold, g_s)
            g_x, g_v = _lif_charge_grads(spec, g_h, k)
            if k is not None:
                v_prev = v0 if t == 0 else reset(spec, h_seq[t - 1], spikes[t - 1])
                xt = x if ctx.broadcast else x[t]
                vr = 0.0 if spec.v_reset is None else spec.v_reset
                dh_dk = (xt - (v_prev - vr)) if spec.decay_input else -(v_prev - vr)
                g_k = g_k + (g_h * dh_dk).sum()
            g_xs.append(g_x)
        if ctx.broadcast:
            g_x_all = torch.stack(g_xs).sum(0)
        else:
            g_xs.reverse()
            g_x_all = torch.stack(g_xs)
        g_w = g_k * k * (1.0 - k) if k is not None else None
        return None, None, None, g_x_all, g_v, g_w


class _GenericScan(torch.autograd.Function):
    """Any spec over K steps; backward recomputes each step and differentiates it with autograd."""

    @staticmethod
    def forward(ctx: Any, spec: NeuronSpec, broadcast: bool, K: int, n_state: int, x: torch.Tensor, *rest):
        state = tuple(rest[:n_state])
        params = tuple(rest[n_state:])
        states = [state]
        ss = []
        for t in range(K):
            s, state, _ = step(spec, x if broadcast else x[t], state, params)
            ss.append(s)
            states.append(state)
        ctx.spec, ctx.broadcast, ctx.K, ctx.n_state = spec, broadcast, K, n_state
        flat_states = [torch.stack([st[i] for st in states[:-1]]) for i in range(n_state)]
        ctx.save_for_backward(x, *flat_states, *params)
        return (torch.stack(ss),) + tuple(state)

    @staticmethod
    def backward(ctx: Any, g_spikes: torch.Tensor, *g_state_last):
        spec, K, n = ctx.spec, ctx.K, ctx.n_state
        saved = ctx.saved_tensors
        x, seqs, params = saved[0], saved[1:1 + n], saved[1 + n:]
        g_state = [torch.zeros_like(seqs[i][0]) if g is None else g for i, g in enumerate(g_state_last)]
        g_params = [torch.zeros_like(p) for p in params]
        g_xs = []
        for t in range(K - 1, -1, -1):
            with torch.enable_grad():
                xt = (x if ctx.broadcast else x[t]).detach().requires_grad_(True)
                st = tuple(seqs[i][t].detach().requires_grad_(True) for i in range(n))
                ps = tuple(p.detach().requires_grad_(True) for p in params)
                s, new_state, _ = step(spec, xt, st, ps)
                grads = torch.autograd.grad((s,) + tuple(new_state), (xt,) + st + ps,
                                            (g_spikes[t],) + tuple(g_state), allow_unused=True)
            g_xs.append(grads[0] if grads[0] is not None else torch.zeros_like(xt))
            g_state = [g if g is not None else torch.zeros_like(st[i]) for i, g in enumerate(grads[1:1 + n])]
            g_params = [gp + g if g is not None else gp for gp, g in zip(g_params, grads[1 + n:])]
        if ctx.broadcast:
            g_x_all = torch.stack(g_xs).sum(0)
        else:
            g_xs.reverse()
            g_x_all = torch.stack(g_xs)
        return (None, None, None, None, g_x_all) + tuple(g_state) + tuple(g_params)


def neuron_scan(spec: NeuronSpec, x: torch.Tensor, K: int, broadcast: bool,
                state: Optional[Sequence[torch.Tensor]], params: Sequence[torch.Tensor]
                ) -> Tuple[torch.Tensor, Tuple[torch.Tensor, ...]]:
    """Run a neuron layer over K steps. ``x`` is ``[K, *S]`` (or ``[*S]`` fed at every step when
    ``broadcast``); ``state`` None means the reset state. Returns spikes ``[K, *S]`` and the final state."""
    x0 = x if broadcast else x[0]
    if state is None:
        state = initial_state(spec, x0)
    if spec.lif_family and (spec.kind != "plif" or len(params) == 1):
        w = params[0] if spec.kind == "plif" else None
        spikes, v = _AffineScan.apply(spec, broadcast, K, x, state[0], w)
        return spikes, (v,)
    out = _GenericScan.apply(spec, broadcast, K, len(state), x, *state, *params)
    return out[0], tuple(out[1:])
