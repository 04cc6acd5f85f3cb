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

import warnings
from typing import Any, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from snncc.neurons import NeuronSpec, charge, fire, initial_state, reset, step
from snncc.surrogate import derivative

__all__ = ["neuron_scan", "lifted_scan"]


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


def _charge_into(spec: NeuronSpec, x: torch.Tensor, v: torch.Tensor, k: Optional[torch.Tensor],
                 out: torch.Tensor, tmp: torch.Tensor) -> None:
    """``out = charge(spec, x, v)`` with the same float operations in the same order, without allocating."""
    reset0 = spec.v_reset is None or spec.v_reset == 0.0
    if spec.kind == "if":
        torch.add(v, x, out=out)
        return
    if spec.decay_input:                       # v + (x - v) / tau   or   v + (x - (v - v_r)) / tau
        if reset0:
            torch.sub(x, v, out=tmp)
        else:
            torch.sub(v, spec.v_reset, out=tmp)
            torch.sub(x, tmp, out=tmp)
        if k is None:
            tmp.div_(spec.tau)
        else:
            tmp.mul_(k)
        torch.add(v, tmp, out=out)
        return
    if reset0:                                 # v * (1 - 1/tau) + x   (plif: v * (1 - k) + x)
        torch.mul(v, (1.0 - 1.0 / spec.tau) if k is None else (1.0 - k), out=tmp)
        torch.add(tmp, x, out=out)
        return
    torch.sub(v, spec.v_reset, out=tmp)        # v - (v - v_r) / tau + x
    if k is None:
        tmp.div_(spec.tau)
    else:
        tmp.mul_(k)
    torch.sub(v, tmp, out=tmp)
    torch.add(tmp, x, out=out)


def _empty_steps(x_step: torch.Tensor, K: int) -> torch.Tensor:
    """``[K, *S]`` buffer laid out like ``x_step`` (channels-last stays channels-last)."""
    cl = x_step.dim() == 4 and not x_step.is_contiguous() and \
        x_step.is_contiguous(memory_format=torch.channels_last)
    flat = torch.empty((K * x_step.shape[0],) + tuple(x_step.shape[1:]), dtype=x_step.dtype,
                       device=x_step.device, memory_format=torch.channels_last if cl else torch.contiguous_format)
    return flat.view((K,) + tuple(x_step.shape))


def _same_layout(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` with ``like``'s strides (a copy only when they differ)."""
    if t.stride() == like.stride():
        return t
    out = torch.empty_like(like)
    out.copy_(t)
    return out


class _AffineScan(torch.autograd.Function):
    """IF/LIF/PLIF over K steps. Inputs: x ``[K, *S]`` (or ``[*S]`` broadcast), v0 ``[*S]``, optional w.

    Forward writes H and spikes into preallocated ``[K, *S]`` buffers with in-place ops (H is kept only
    when a gradient is needed); values are bit-identical to :func:`snncc.neurons.step`.
    """

    @staticmethod
    def forward(ctx: Any, spec: NeuronSpec, broadcast: bool, K: int, need_grad: bool, x: torch.Tensor,
                v0: torch.Tensor, w: Optional[torch.Tensor]):
        k = w.sigmoid() if w is not None else None
        x_step = x if broadcast else x[0]
        spikes = _empty_steps(x_step, K)
        h_seq = _empty_steps(x_step, K) if need_grad else None
        v = torch.empty_like(x_step)
        v.copy_(v0)
        tmp = torch.empty_like(x_step)
        h_buf = torch.empty_like(x_step) if not need_grad else None
        mask = torch.empty(x_step.shape, dtype=torch.bool, device=x.device)
        opaque = spec.surrogate.opaque
        for t in range(K):
            h = h_seq[t] if need_grad else h_buf
            _charge_into(spec, x if broadcast else x[t], v, k, h, tmp)
            if opaque:
                s = fire(spec.surrogate, h - spec.v_threshold)
                spikes[t].copy_(s)
                v = reset(spec, h, s)
                continue
            torch.ge(h, spec.v_threshold, out=mask)    # == heaviside(h - v_th): same sign, exactly
            spikes[t].copy_(mask)
            if spec.v_reset is None:
                torch.sub(h, spikes[t], alpha=spec.v_threshold, out=v)
            else:                                   # (1 - s) h + s v_r with s in {0, 1}
                v.copy_(h)
                v.masked_fill_(mask, spec.v_reset)
        ctx.spec, ctx.broadcast, ctx.K = spec, broadcast, K
        if need_grad:
            ctx.save_for_backward(h_seq, spikes, v0, x if spec.kind == "plif" else None, w)
        return spikes, v

    @staticmethod
    def backward(ctx: Any, g_spikes: torch.Tensor, g_v_last: Optional[torch.Tensor]):
        h_seq, spikes, v0, x, w = ctx.saved_tensors
        spec, K = ctx.spec, ctx.K
        k = w.sigmoid() if w is not None else None
        # NOTE: elementwise ops on operands of different layouts (NCHW grads, NHWC activations) fall off
        # torch's vectorized path: bring the incoming gradients to the activations' layout once.
        g_spikes = _same_layout(g_spikes, h_seq)
        g_v = torch.zeros_like(h_seq[0]) if g_v_last is None else _same_layout(g_v_last, h_seq[0])
        g_x_all = torch.zeros_like(h_seq[0]) if ctx.broadcast else torch.empty_like(h_seq)
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
            if ctx.broadcast:
                g_x_all += g_x
            else:
                g_x_all[t] = g_x
        g_w = g_k * k * (1.0 - k) if k is not None else None
        return None, None, None, None, g_x_all, g_v, g_w


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


_WARNED: set = set()


def _warn_once(msg: str) -> None:
    if msg not in _WARNED:
        _WARNED.add(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def neuron_scan(spec: NeuronSpec, x: torch.Tensor, K: int, broadcast: bool,
                state: Optional[Sequence[torch.Tensor]], params: Sequence[torch.Tensor],
                pool: Optional[int] = None, h_dtype: Optional[torch.dtype] = None, recompute: bool = False,
                pool_cf: bool = False) -> Tuple[torch.Tensor, Tuple[torch.Tensor, ...]]:
    """A built-in neuron layer over K steps with torch ops (the oracle; ``runtime.dispatch.neuron_scan``
    picks the backend). ``x`` is ``[K, *S]`` (or ``[*S]`` fed at every step when ``broadcast``); ``state``
    None means the reset state. Returns spikes ``[K, *S]`` (``pool=k``: their k x k max pool) and the final
    state. ``h_dtype``/``recompute`` are the kernels' memory options: the reference keeps what it needs."""
    x0 = x if broadcast else x[0]
    w = params[0] if spec.kind == "plif" and len(params) == 1 else None
    if state is None:
        state = initial_state(spec, x0)
    if spec.lif_family and (spec.kind != "plif" or len(params) == 1):
        need_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, state[0], w))
        spikes, v = _AffineScan.apply(spec, broadcast, K, need_grad, x, state[0], w)
        out: Tuple[torch.Tensor, ...] = (v,)
    else:
        res = _GenericScan.apply(spec, broadcast, K, len(state), x, *state, *params)
        spikes, out = res[0], tuple(res[1:])
    if pool is not None:
        pooled = F.max_pool2d(spikes.flatten(0, 1), pool, pool)
        spikes = pooled.view(K, spikes.shape[1], *pooled.shape[1:])
    return spikes, out


def lifted_scan(first: Any, steady: Any, x: torch.Tensor, K: int, broadcast: bool,
                state: Optional[Sequence[torch.Tensor]], params: Sequence[torch.Tensor]
                ) -> Tuple[torch.Tensor, Tuple[torch.Tensor, ...]]:
    """A lifted neuron (:mod:`snncc.lift`) over K steps with torch: the IR interpreted step by step, the
    same torch calls eager makes, recorded by autograd as eager's are (the oracle of the generated kernels).
    ``state`` None: step 0 is the module's own first step from its reset state (``first``)."""
    from snncc.neuron_ir import interpret
    pmap = dict(zip(steady.params, params))
    outs = []
    st: Tuple[torch.Tensor, ...] = tuple(state) if state is not None else ()
    for t in range(K):
        ir = first if (t == 0 and state is None) else steady
        (o,), st = interpret(ir, x if broadcast else x[t], st, pmap)
        outs.append(o)
    return torch.stack(outs), st


def recurrent_scan(first: Any, steady: Any, tap: str, e: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor],
                   sp0: Optional[torch.Tensor], state: Optional[Sequence[torch.Tensor]],
                   params: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, Tuple[torch.Tensor, ...]]:
    """A recurrent cell (``passes/fuse_recurrence.py``) over ``e``'s K steps with torch, the calls eager
    makes: the recurrent drive ``linear(s_{t-1}, w, b)`` (``s_{-1}``: ``sp0``, or zeros at a sequence's
    start) is the IR value ``tap``; then the neuron's step. ``params``: the IR's other parameters.
    Returns ``(spikes [K, N, H], final states)``."""
    from snncc.neuron_ir import interpret
    pmap = dict(zip([p for p in steady.params if p != tap], params))
    outs = []
    st: Tuple[torch.Tensor, ...] = tuple(state) if state is not None else ()
    prev = sp0
    for t in range(e.shape[0]):
        ir = first if (t == 0 and state is None) else steady
        if tap in ir.params:
            pmap[tap] = F.linear(prev if prev is not None else torch.zeros_like(e[t]), w, b)
        (o,), st = interpret(ir, e[t], st, pmap)
        outs.append(o)
        prev = o
    return torch.stack(outs), st
