"""CPU backend for recurrent cells: a neuron layer fed back its own spikes through a Linear, all T steps in
one generated C loop (OpenMP over samples), forward and backward.

Per step ``t`` and sample ``n`` (``passes/fuse_recurrence.py`` found the pattern)::

    r_t = b + W s_{t-1}                     (s_{-1} = 0: a sequence starts without spikes)
    s_t, state_t = neuron(e_t, r_t, state_{t-1})

``neuron`` is the lifted neuron IR with the recurrent drive as one more named value, the *tap*
(:func:`with_tap`): for a user's ``h = fc_in(x) + fc_rec(self.s)`` it is the IR of ``neuron(e + tap)``
(and the first step from the reset state is the model's own, without it); for snnTorch's ``RLeaky`` it is
the module's own step, in which ``self.recurrent(self.spk)`` was read as the tap, so the sum keeps
eager's order.

The matmul is spike-driven: ``r += s_j * W^T[j, :]`` only for the ``j`` that fired (~10% of them at
realistic rates), so forward costs a tenth of the dense product. A sample's recurrence never touches
another sample's, so threads take samples (forward) or blocks of ``SB`` samples (backward, where the dense
``W^T g_r`` product reads each row of ``W`` once per block).

Backward (BPTT) keeps only ``e`` and the initial states and spikes (exact, like ``memory="min"``): per
block it recomputes the forward (same code, same bits), keeping the states per step, then walks time
backwards through ``ir_codegen.backward_body``; the gradient reaching ``s_t`` is the downstream one plus
``W^T g_{r_{t+1}}``. It writes ``g_e``, ``g_r`` per step, the recomputed spikes and the neuron parameters'
gradients; ``W``'s and ``b``'s gradients are then one GEMM and one sum over all steps in torch.
"""
from __future__ import annotations

import ctypes
import threading
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from snncc.neuron_ir import NeuronIR, Op
from . import ir_codegen as cg
from .codegen import EXP_FLOAT
from .cbuild import _library, compiler_available
from .cpu_ir import _ptrs

__all__ = ["rec_source", "rec_c_scan", "c_supports_rec", "with_tap", "TAP"]

_SB = 8
_LIBS: Dict[Any, Any] = {}
_LOCK = threading.Lock()
_TORCH_CT = {torch.float32: "float32", torch.float64: "float64"}


TAP = "rec_tap"


_TAPPED: Dict[Tuple[int, str], Tuple[NeuronIR, NeuronIR]] = {}
_CHECKED: Dict[Tuple[int, int], Tuple[NeuronIR, NeuronIR, Optional[str]]] = {}


def with_tap(ir: NeuronIR, tap: str = TAP) -> NeuronIR:
    """``ir`` run on ``x + tap`` instead of ``x``: the neuron of a user's ``e + fc_rec(s)`` (one add first,
    in eager's order, then the neuron's own ops on the sum).

    NOTE: asked at every cell call: memoized per IR, so the kernel cache sees the same object each time."""
    hit = _TAPPED.get((id(ir), tap))
    if hit is None or hit[0] is not ir:
        hit = _TAPPED[(id(ir), tap)] = (ir, _with_tap(ir, tap))
    return hit[1]


def _with_tap(ir: NeuronIR, tap: str) -> NeuronIR:
    z = "rec_z"
    dt = ir.dtype(ir.x)

    def sub(a: object) -> object:
        return z if a == ir.x else a
    ops = (Op(z, "add", (ir.x, tap), dt, dt),) + tuple(
        Op(o.out, o.op, tuple(sub(a) for a in o.args), o.dtype, o.cdtype, o.attrs) for o in ir.ops)
    return NeuronIR(ir.x, ir.states, ir.params + (tap,), ops, tuple(sub(o) for o in ir.outputs),
                    tuple(sub(v) for v in ir.new_states), ir.surrogates, ir.dtypes + ((tap, dt), (z, dt)))


def c_supports_rec(first: NeuronIR, steady: NeuronIR) -> Optional[str]:
    """None when the C cell can run these steps; else why not (the reference loop runs them).

    NOTE: asked at every cell call: the walk over the IR is memoized per (first, steady) pair."""
    if not compiler_available():
        return "no C compiler"
    hit = _CHECKED.get((id(first), id(steady)))
    if hit is None or hit[0] is not first or hit[1] is not steady:
        hit = _CHECKED[(id(first), id(steady))] = (first, steady, _rec_unsupported(first, steady))
    return hit[2]


def _rec_unsupported(first: NeuronIR, steady: NeuronIR) -> Optional[str]:
    why = cg.supported_ir(first) or cg.supported_ir(steady)
    if why:
        return why
    dts = {steady.dtype("x"), steady.dtype(steady.outputs[0])} | {steady.dtype(s) for s in steady.states}
    if len(dts) != 1 or dts.pop() not in ("float32", "float64"):
        return "input, output and states do not share one float dtype"
    if first.states:
        return "the first step reads a state"
    for ir in (first, steady):
        if any(ir.surrogates[o.attr("surrogate")].opaque for o in ir.spike_ops):
            return "a user surrogate function (its derivative is taken by its own backward)"
    return None


def rec_source(first: NeuronIR, steady: NeuronIR, full: Tuple[bool, ...], tap: str = TAP) -> str:
    """C source of ``rec_fwd`` / ``rec_bwd``; ``tap``: the IR parameter that is the recurrent drive ``r``;
    ``full[j]``: the j-th other parameter is per neuron ``[N, H]`` (else one scalar). Arrays are passed in
    one ``void**`` in the order documented at each function."""
    others = [p for p in steady.params if p != tap]
    ns, npar = len(steady.states), len(others)
    T = cg.ctype(steady.dtype(steady.x))
    PT = [cg.ctype(steady.dtype(p)) for p in others]

    def params(r: str = "r[h]") -> str:
        out = [f"const {PT[j]} {p} = PAR{j}[{'i' if full[j] else '0'}]; (void){p};" for j, p in enumerate(others)]
        return " ".join(out + [f"const {T} {tap} = {r}; (void){tap};"])

    def states(ir: NeuronIR, src: str) -> str:
        return " ".join(f"const {T} {s} = {src.format(j=j)}; (void){s};" for j, s in enumerate(ir.states))

    def fwd(ir: NeuronIR, st_src: Optional[str], store: str) -> str:
        return "\n".join([
            "        for (int64_t h = 0; h < H; ++h) {",
            "          const int64_t i = n * H + h; (void)i;",
            f"          const {T} {steady.x} = E[eo + h]; (void){steady.x};",
            "          " + params(),
            "          " + (states(ir, st_src) if st_src else ""),
            cg.forward_body(ir, "          "),
            "          " + store.format(out=ir.outputs[0]),
            "          " + " ".join(f"st{j}[h] = {v};" for j, v in enumerate(ir.new_states)),
            "        }"])

    def bwd(ir: NeuronIR, steady_step: bool) -> str:
        lines = ["        for (int64_t h = 0; h < H; ++h) {",
                 "          const int64_t i = n * H + h; (void)i;",
                 f"          const {T} {steady.x} = E[eo + h]; (void){steady.x};",
                 "          " + params("rh[t * H + h]")]
        if steady_step:
            lines.append("          " + states(ir, "hist{j}[t * H + h]"))
        lines.append(cg.forward_body(ir, "          "))
        lines.append("          " + " ".join(f"{cg.ctype(ir.dtype(v))} g_{v} = 0;" for v in cg.float_values(ir)))
        lines.append(f"          g_{ir.outputs[0]} += GOUT[eo + h] + grec[h];")
        for j, v in enumerate(ir.new_states):
            lines.append(f"          g_{v} += gst{j}[h];")
        lines.append(cg.backward_body(ir, "          ", exp_float="snn_expf"))
        gx = f"g_{ir.x}" if ir.x in cg.float_values(ir) else "0"
        gr = f"g_{tap}" if tap in cg.float_values(ir) and tap in ir.params else "0"
        # NOTE: GR before GE: for a user's add they may be one buffer (the first step then keeps g_e)
        lines.append(f"          GR[eo + h] = {gr}; GE[eo + h] = {gx}; gzn[h] = {gr};")
        for j, s in enumerate(ir.states):
            lines.append(f"          gst{j}[h] = g_{s};")
        if not ir.states:
            lines += [f"          gst{j}[h] = 0;" for j in range(ns)]
        for j, p in enumerate(others):
            if p in ir.params and ir.dtype(p) in ("float32", "float64"):
                lines.append(f"          gp{j}[h] += g_{p};")
        lines.append("        }")
        return "\n".join(lines)

    common = [f"const {T}* E = (const {T}*)P[0];"]
    common += [f"const {T}* S0{j} = (const {T}*)P[{1 + j}];" for j in range(ns)]
    common += [f"const {PT[j]}* PAR{j} = (const {PT[j]}*)P[{1 + ns + j}];" for j in range(npar)]
    b = 1 + ns + npar
    common += [f"const {T}* WT = (const {T}*)P[{b}];", f"const {T}* W = (const {T}*)P[{b + 1}];",
               f"const {T}* B = (const {T}*)P[{b + 2}];", f"const {T}* SP0 = (const {T}*)P[{b + 3}];"]
    b += 4
    unpack_f = common + [f"{T}* OUT = ({T}*)P[{b}];"] + \
        [f"{T}* SN{j} = ({T}*)P[{b + 1 + j}];" for j in range(ns)]
    unpack_b = common + [f"const {T}* GOUT = (const {T}*)P[{b}];"] + \
        [f"const {T}* GSN{j} = (const {T}*)P[{b + 1 + j}];" for j in range(ns)]
    b2 = b + 1 + ns
    unpack_b += [f"{T}* GE = ({T}*)P[{b2}];", f"{T}* GR = ({T}*)P[{b2 + 1}];", f"{T}* SH = ({T}*)P[{b2 + 2}];",
                 f"{T}* GSP0 = ({T}*)P[{b2 + 3}];"]
    unpack_b += [f"{T}* GS0{j} = ({T}*)P[{b2 + 4 + j}];" for j in range(ns)]
    unpack_b += [f"{PT[j]}* GP{j} = ({PT[j]}*)P[{b2 + 4 + ns + j}];" for j in range(npar)]

    st_alloc = " ".join(f"{T}* st{j} = ({T}*)malloc(sizeof({T}) * H);" for j in range(ns))
    st_init = " ".join(f"for (int64_t h = 0; h < H; ++h) st{j}[h] = S0{j}[n * H + h];" for j in range(ns))
    st_free = " ".join(f"free(st{j});" for j in range(ns))
    recur = f"""
        {{                                /* r = b + W s_prev, spike-driven: only the rows that fired */
          const {T}* sp = t > 0 ? {{PREV}} : (SP0 ? SP0 + n * H : 0);
          for (int64_t h = 0; h < H; ++h) r[h] = B ? B[h] : ({T})0;
          for (int64_t j = 0; sp && j < H; ++j) {{
            const {T} a = sp[j];
            if (a != 0) {{ const {T}* w = WT + j * H; for (int64_t h = 0; h < H; ++h) r[h] += a * w[h]; }}
          }}
        }}
        const int64_t eo = (t * N + n) * H;"""
    fwd_prev = "OUT + ((t - 1) * N + n) * H"
    bwd_prev = "SH + ((t - 1) * N + n) * H"
    gp_all = " ".join(f"{PT[j]}* gp{j}_all = ({PT[j]}*)calloc(SB * H, sizeof({PT[j]}));" for j in range(npar))
    return f"""// generated by snncc.runtime.cpu_recurrent from a lifted neuron step
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#define SB {_SB}
{EXP_FLOAT}

/* P: E, S0[ns], PAR[np], WT, W, B, SP0, OUT, SN[ns]; E/OUT [K, N, H]; has_st0: S0 given (later chunk) */
void rec_fwd(int64_t N, int64_t H, int64_t K, int has_st0, void** P) {{
  {" ".join(unpack_f)}
  #pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) {{
    {T}* r = ({T}*)malloc(sizeof({T}) * H);
    {st_alloc}
    if (has_st0) {{ {st_init} }}
    for (int64_t t = 0; t < K; ++t) {{{recur.replace("{PREV}", fwd_prev)}
      if (t == 0 && !has_st0) {{
{fwd(first, None, "OUT[eo + h] = {out};")}
      }} else {{
{fwd(steady, "st{j}[h]", "OUT[eo + h] = {out};")}
      }}
    }}
    {" ".join(f"for (int64_t h = 0; h < H; ++h) SN{j}[n * H + h] = st{j}[h];" for j in range(ns))}
    free(r); {st_free}
  }}
}}

/* P: E, S0[ns], PAR[np], WT, W, B, SP0, GOUT, GSN[ns], GE, GR, SH, GSP0, GS0[ns], GP[np] */
void rec_bwd(int64_t N, int64_t H, int64_t K, int has_st0, void** P) {{
  {" ".join(unpack_b)}
  const int64_t nblk = (N + SB - 1) / SB;
  #pragma omp parallel for schedule(static)
  for (int64_t blk = 0; blk < nblk; ++blk) {{
    const int64_t n0 = blk * SB, nb = N - n0 < SB ? N - n0 : SB;
    {T}* r = ({T}*)malloc(sizeof({T}) * H);
    {T}* zall = ({T}*)malloc(sizeof({T}) * SB * K * H);
    {T}* hall = ({T}*)malloc(sizeof({T}) * (SB * K * H * {max(ns, 1)}));
    {T}* gz = ({T}*)calloc(SB * H, sizeof({T}));      /* g_z of step t + 1, per sample of the block */
    {T}* gr = ({T}*)malloc(sizeof({T}) * SB * H);     /* W^T g_z: what reaches s_t through r_(t+1) */
    for (int64_t q = 0; q < nb; ++q) {{              /* recompute the forward: z and states per step */
      const int64_t n = n0 + q;
      {T}* rh = zall + q * K * H;
      {st_alloc}
      if (has_st0) {{ {st_init} }}
      for (int64_t t = 0; t < K; ++t) {{{recur.replace("{PREV}", bwd_prev)}
        {" ".join(f"for (int64_t h = 0; h < H; ++h) hall[(({j} * SB + q) * K + t) * H + h] = st{j}[h];" for j in range(ns))}
        for (int64_t h = 0; h < H; ++h) rh[t * H + h] = r[h];
        if (t == 0 && !has_st0) {{
{fwd(first, None, "SH[eo + h] = {out};")}
        }} else {{
{fwd(steady, "st{j}[h]", "SH[eo + h] = {out};")}
        }}
      }}
      {st_free}
    }}
    {T}** gsts = ({T}**)malloc(sizeof({T}*) * SB * {max(ns, 1)});
    for (int64_t q = 0; q < nb * {ns}; ++q) gsts[q] = ({T}*)malloc(sizeof({T}) * H);
    {" ".join(f"for (int64_t q = 0; q < nb; ++q) for (int64_t h = 0; h < H; ++h) gsts[{j} * nb + q][h] = GSN{j}[(n0 + q) * H + h];" for j in range(ns))}
    {gp_all}
    for (int64_t t = K - 1; t >= 0; --t) {{
      /* gr = W^T g_z(t+1) for the block: each row of W read once for all its samples */
      memset(gr, 0, sizeof({T}) * SB * H);
      if (t + 1 < K) {{
        for (int64_t hh = 0; hh < H; ++hh) {{
          const {T}* w = W + hh * H;
          for (int64_t q = 0; q < nb; ++q) {{
            const {T} g = gz[q * H + hh];
            if (g != 0) {{ {T}* o = gr + q * H; for (int64_t j = 0; j < H; ++j) o[j] += g * w[j]; }}
          }}
        }}
      }}
      for (int64_t q = 0; q < nb; ++q) {{
        const int64_t n = n0 + q;
        const int64_t eo = (t * N + n) * H;
        const {T}* rh = zall + q * K * H;
        const {T}* grec = gr + q * H;
        {T}* gzn = gz + q * H;
        {" ".join(f"{T}* gst{j} = gsts[{j} * nb + q]; const {T}* hist{j} = hall + ({j} * SB + q) * K * H;" for j in range(ns))}
        {" ".join(f"{PT[j]}* gp{j} = gp{j}_all + q * H;" for j in range(npar))}
        if (t == 0 && !has_st0) {{
{bwd(first, False)}
        }} else {{
{bwd(steady, True)}
        }}
      }}
    }}
    for (int64_t q = 0; q < nb; ++q) {{
      const int64_t n = n0 + q;
      if (GSP0) {{             /* the chunk's first step read the previous chunk's spikes */
        {T}* o = GSP0 + n * H;
        for (int64_t j = 0; j < H; ++j) o[j] = 0;
        for (int64_t hh = 0; hh < H; ++hh) {{
          const {T} g = gz[q * H + hh]; const {T}* w = W + hh * H;
          if (g != 0) for (int64_t j = 0; j < H; ++j) o[j] += g * w[j];
        }}
      }}
      {" ".join(f"if (GS0{j}) for (int64_t h = 0; h < H; ++h) GS0{j}[n * H + h] = gsts[{j} * nb + q][h];" for j in range(ns))}
      {" ".join(f"for (int64_t h = 0; h < H; ++h) GP{j}[n * H + h] = gp{j}_all[q * H + h];" for j in range(npar))}
    }}
    for (int64_t q = 0; q < nb * {ns}; ++q) free(gsts[q]);
    free(gsts); free(r); free(zall); free(hall); free(gz); free(gr);
    {" ".join(f"free(gp{j}_all);" for j in range(npar))}
  }}
}}
"""


def _lib(first: NeuronIR, steady: NeuronIR, full: Tuple[bool, ...], tap: str) -> Any:
    key = (first, steady, full, tap)
    lib = _LIBS.get(key)
    if lib is None:
        with _LOCK:
            lib = _LIBS.get(key)
            if lib is None:
                lib = _library(rec_source(first, steady, full, tap))
                for fn in (lib.rec_fwd, lib.rec_bwd):
                    fn.argtypes = [ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.c_void_p]
                    fn.restype = None
                _LIBS[key] = lib
    return lib


class _RecCell(torch.autograd.Function):
    """The cell over K steps. Inputs: e ``[K, N, H]``, W ``[H, H]``, b ``[H]`` or None, previous spikes
    ``[N, H]`` or None (a sequence's start: none), states ``[N, H]`` (none: from the reset state), the
    neuron's other parameters."""

    @staticmethod
    def forward(ctx: Any, first: NeuronIR, steady: NeuronIR, tap: str, ns: int, has_st0: bool, e: torch.Tensor,
                w: torch.Tensor, b: Optional[torch.Tensor], sp0: Optional[torch.Tensor], *rest: torch.Tensor):
        K, N, H = e.shape
        st0 = [s.contiguous() for s in rest[:ns]] if has_st0 else []
        params = rest[ns:] if has_st0 else rest
        full = tuple(p.numel() > 1 for p in params)
        pars = [(p.expand(N, H).contiguous() if f else p.reshape(1).contiguous()) for p, f in zip(params, full)]
        e, w = e.contiguous(), w.contiguous()
        wt = w.t().contiguous()
        b = None if b is None else b.contiguous()
        # NOTE: the previous chunk's last step is a view of that chunk's whole output: keep a copy of
        # the one step, not the chunk, for backward
        sp0 = None if sp0 is None else sp0.clone(memory_format=torch.contiguous_format)
        out = torch.empty_like(e)
        sn = [torch.empty(N, H, dtype=e.dtype) for _ in range(ns)]
        lib = _lib(first, steady, full, tap)
        lib.rec_fwd(N, H, K, int(has_st0),
                    _ptrs([e] + (st0 or [None] * ns) + pars + [wt, w, b, sp0, out] + sn))
        ctx.meta = (first, steady, tap, ns, has_st0, full, b is not None, sp0 is not None)
        ctx.param_shapes = [p.shape for p in params]
        ctx.save_for_backward(e, w, b, sp0, *st0, *pars)
        return (out,) + tuple(sn)

    @staticmethod
    def backward(ctx: Any, g_out: torch.Tensor, *g_sn: torch.Tensor):
        first, steady, tap, ns, has_st0, full, has_b, has_sp = ctx.meta
        e, w, b, sp0, *rest = ctx.saved_tensors
        st0, pars = rest[:len(rest) - len(full)], rest[len(rest) - len(full):]
        K, N, H = e.shape
        g_out = g_out.contiguous() if g_out is not None else torch.zeros_like(e)
        gsn = [torch.zeros(N, H, dtype=e.dtype) if g is None else g.contiguous() for g in g_sn]
        ge, sh = torch.empty_like(e), torch.empty_like(e)
        # NOTE: for a user's add (the tap form of with_tap) the gradients of e and r are the same values:
        # one buffer (the kernel writes both, equal)
        gr = ge if tap == TAP else torch.empty_like(e)
        gsp = torch.empty(N, H, dtype=e.dtype) if has_sp else None
        gs0 = [torch.empty(N, H, dtype=e.dtype) for _ in range(ns)] if has_st0 else [None] * ns
        gp = [torch.empty(N, H, dtype=p.dtype) for p in pars]
        wt = w.t().contiguous()
        lib = _lib(first, steady, full, tap)
        lib.rec_bwd(N, H, K, int(has_st0),
                    _ptrs([e] + (list(st0) or [None] * ns) + list(pars) + [wt, w, b, sp0, g_out] + gsn +
                          [ge, gr, sh, gsp] + gs0 + gp))
        # W and b: r_t = b + W s_{t-1} at every step (s_{-1}: the previous chunk's spikes, or none), as
        # one GEMM over [steps * N, H]
        # step 0 counts where its IR reads the tap (r_0 = b + W sp0, sp0 = 0 without previous spikes); a
        # user's first step from the reset state does not (and gr[0] is then g_e[0]: the buffers are shared)
        reads0 = tap in (steady if has_st0 else first).params
        if reads0 and has_sp:
            gw = gr.reshape(-1, H).t() @ torch.cat([sp0.unsqueeze(0), sh[:-1]]).reshape(-1, H)
        else:
            gw = gr[1:].reshape(-1, H).t() @ sh[:-1].reshape(-1, H)
        gb = (gr if reads0 else gr[1:]).sum((0, 1)) if has_b else None
        g_params = [g.sum_to_size(shape) if len(shape) else g.sum() for g, shape in zip(gp, ctx.param_shapes)]
        g_states = tuple(gs0) if has_st0 else ()
        return (None, None, None, None, None, ge, gw, gb, gsp) + g_states + tuple(g_params)


def rec_c_scan(first: NeuronIR, steady: NeuronIR, tap: str, e: torch.Tensor, w: torch.Tensor,
               b: Optional[torch.Tensor], sp0: Optional[torch.Tensor], state: Optional[Sequence[torch.Tensor]],
               params: Sequence[torch.Tensor]) -> Optional[Tuple[torch.Tensor, Tuple[torch.Tensor, ...]]]:
    """The cell over ``e``'s K steps with the generated C loop: ``(spikes [K, N, H], final states)``; None
    when the tensors do not fit it (device, dtypes, shapes) and the caller runs the reference loop.
    ``params``: the IR's parameters other than ``tap``, in order."""
    dt = _TORCH_CT.get(e.dtype)
    if e.device.type != "cpu" or dt != steady.dtype(steady.x) or e.dim() != 3 or c_supports_rec(first, steady):
        return None
    ts = [w] + ([b] if b is not None else []) + ([sp0] if sp0 is not None else []) + list(state or ())
    if any(t.device.type != "cpu" or t.dtype != e.dtype for t in ts):
        return None
    if w.shape != (e.shape[2], e.shape[2]):
        return None
    for p, name in zip(params, [q for q in steady.params if q != tap]):
        if p.device.type != "cpu" or _TORCH_CT.get(p.dtype) != steady.dtype(name):
            return None
        if p.numel() > 1 and torch.broadcast_shapes(p.shape, e.shape[1:]) != e.shape[1:]:
            return None
    ns = len(steady.states)
    has_st0 = state is not None
    res = _RecCell.apply(first, steady, tap, ns, has_st0, e, w, b, sp0, *(tuple(state) if has_st0 else ()),
                         *params)
    return res[0], tuple(res[1:])
