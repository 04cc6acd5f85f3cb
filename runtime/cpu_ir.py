"""CPU backend for lifted neurons: the scan of any :class:`~snncc.neuron_ir.NeuronIR` as one generated C
kernel (OpenMP), forward and backward, compiled and cached like the built-in scans (``cbuild._library``).

Layout of work (as the built-in scans, DESIGN.md's measured best on this machine): a thread takes a block
of ``BLK`` neurons, keeps their states in local arrays and walks time inside the block. Step 0 from the
reset state runs the module's own first step (``Lifted.first``: lazily created state, ``v = v_reset``);
later steps run ``Lifted.steady``.

Backward (BPTT) keeps only the scan's input and initial state (like ``memory="min"``, exact): per block it
recomputes the forward, keeping the block's states per step in a local history, then walks time backwards
through :func:`runtime.ir_codegen.backward_body`. Gradients flow to the input, the initial state and every
parameter (per neuron, summed to the parameter's shape by torch). A user surrogate's derivative is taken by
its own backward over the saved ``z`` of all steps at once, as the built-in kernels do.
"""
from __future__ import annotations

import threading
from typing import Any, Dict, List, Optional, Sequence, Tuple

import ctypes
import torch

from snncc.neuron_ir import NeuronIR
from . import buffers, ir_codegen as cg
from .codegen import EXP_FLOAT
from .cbuild import _library, compiler_available

__all__ = ["ir_source", "ir_c_scan", "c_supports_ir", "ir_pool_ok"]

_BLOCK = 512
_LIBS: Dict[Any, Any] = {}
_LOCK = threading.Lock()
_TORCH_CT = {torch.float32: "float32", torch.float64: "float64", torch.bool: "bool"}


_CHECKED: Dict[Tuple[int, int], Tuple[NeuronIR, NeuronIR, Optional[str]]] = {}


def c_supports_ir(first: NeuronIR, steady: NeuronIR) -> Optional[str]:
    """None when the C scan can run these steps; else the reason (the reference scan runs them).

    NOTE: asked at every scan call: the walk over the IR is memoized per (first, steady) pair."""
    if not compiler_available():
        return "no C compiler"
    hit = _CHECKED.get((id(first), id(steady)))
    if hit is None or hit[0] is not first or hit[1] is not steady:
        hit = _CHECKED[(id(first), id(steady))] = (first, steady, _ir_unsupported(first, steady))
    return hit[2]


def _ir_unsupported(first: NeuronIR, steady: NeuronIR) -> Optional[str]:
    why = cg.supported_ir(first) or cg.supported_ir(steady)
    if why:
        return why
    kinds = [[ir.surrogates[o.attr("surrogate")].opaque for o in ir.spike_ops] for ir in (first, steady)]
    if kinds[0] != kinds[1][:len(kinds[0])]:
        return "the first step's spike functions differ from the later steps'"
    return None


def ir_source(first: NeuronIR, steady: NeuronIR, full: Tuple[bool, ...]) -> str:
    """C source of ``ir_fwd`` / ``ir_bwd`` for these steps; ``full[j]``: parameter j is per neuron (else one
    scalar). All arrays are passed in one ``void**`` in the order documented at each function."""
    ns, npar, nsp = len(steady.states), len(steady.params), len(steady.spike_ops)
    XT = cg.ctype(steady.dtype("x"))
    ST = [cg.ctype(steady.dtype(s)) for s in steady.states]
    PT = [cg.ctype(steady.dtype(p)) for p in steady.params]
    OT = cg.ctype(steady.dtype(steady.outputs[0]))

    def zt(ir: NeuronIR, k: int) -> str:
        z = ir.spike_ops[k].args[0]
        return cg.ctype(ir.dtype(z)) if isinstance(z, str) else XT

    def load_params(ir: NeuronIR) -> str:
        out = []
        for j, p in enumerate(steady.params):
            idx = "start + i" if full[j] else "0"
            out.append(f"const {PT[j]} {p} = PAR{j}[{idx}]; (void){p};")
        return " ".join(out)

    def load_states(ir: NeuronIR, src: str) -> str:
        return " ".join(f"const {ST[j]} {s} = {src.format(j=j)}; (void){s};" for j, s in enumerate(ir.states))

    def store(ir: NeuronIR, zsave: bool) -> str:
        s = [f"OUT[toff] = ({OT}){ir.outputs[0]};"]
        s += [f"st{j}[i] = {v};" for j, v in enumerate(ir.new_states)]
        if zsave:
            for k, o in enumerate(ir.spike_ops):
                if ir.surrogates[o.attr("surrogate")].opaque:
                    s.append(f"if (Z{k}) Z{k}[toff] = {o.args[0]};")
        return " ".join(s)

    def fwd_step(ir: NeuronIR, states_src: Optional[str], zsave: bool, out: str = "OUT[toff]") -> str:
        return "\n".join([
            "      for (int64_t i = 0; i < n; ++i) {",
            "        const int64_t toff = t * M + start + i;",
            f"        const {XT} x = X[t * xts + start + i]; (void)x;",
            "        " + load_params(ir),
            "        " + (load_states(ir, states_src) if states_src else ""),
            cg.forward_body(ir),
            "        " + store(ir, zsave).replace("OUT[toff] = ", f"{out} = "),
            "      }"])

    def adjoints(ir: NeuronIR) -> str:
        decl = [f"{cg.ctype(ir.dtype(v))} g_{v} = 0;" for v in cg.float_values(ir)]
        return " ".join(decl)

    def bwd_step(ir: NeuronIR, steady_step: bool, gout: str = "GOUT[toff]", cap: str = "BLK") -> str:
        lines = ["      for (int64_t i = 0; i < n; ++i) {",
                 "        const int64_t toff = t * M + start + i;",
                 f"        const {XT} x = X[t * xts + start + i]; (void)x;",
                 "        " + load_params(ir)]
        if steady_step:
            lines.append("        " + load_states(ir, "hist{j}[t * " + cap + " + i]"))
        lines.append(cg.forward_body(ir))
        lines.append("        " + adjoints(ir))
        o = ir.outputs[0]
        if ir.dtype(o) in ("float32", "float64"):
            lines.append(f"        g_{o} += ({cg.ctype(ir.dtype(o))}){gout};")
        for j, v in enumerate(ir.new_states):
            if ir.dtype(v) in ("float32", "float64"):
                lines.append(f"        g_{v} += gs{j}[i];")
        for k, sp in enumerate(ir.spike_ops):
            if ir.surrogates[sp.attr("surrogate")].opaque:
                lines.append(f"        const {zt(ir, k)} DSUR{k} = D{k}[toff];")
        lines.append(cg.backward_body(ir, exp_float="snn_expf"))
        gx = "g_x" if ir.dtype("x") in ("float32", "float64") else "0"
        # NOTE: g_x goes to a block buffer, written out after the loop: a store that depends on ``xts`` inside
        # the loop (GX[toff] or gxb[i]) kept gcc from vectorizing the whole backward step (7x the forward)
        lines.append(f"        gxt[i] = ({XT}){gx};")
        for j, s in enumerate(ir.states):
            lines.append(f"        gs{j}[i] = " + (f"g_{s};" if ir.dtype(s) in ("float32", "float64") else "0;"))
        if not ir.states:
            lines += [f"        gs{j}[i] = 0;" for j in range(ns)]
        for j, p in enumerate(ir.params):
            if ir.dtype(p) in ("float32", "float64"):
                lines.append(f"        gp{j}[i] += g_{p};")
        lines.append("      }")
        lines.append("      if (xts) { for (int64_t i = 0; i < n; ++i) GX[t * M + start + i] = gxt[i]; }")
        lines.append("      else { for (int64_t i = 0; i < n; ++i) gxb[i] += gxt[i]; }")
        return "\n".join(lines)

    # both entry points start with the same inputs: X, S0[ns], PAR[np]
    inputs = [f"const {XT}* X = (const {XT}*)P[0];"]
    inputs += [f"const {ST[j]}* S0{j} = (const {ST[j]}*)P[{1 + j}];" for j in range(ns)]
    inputs += [f"const {PT[j]}* PAR{j} = (const {PT[j]}*)P[{1 + ns + j}];" for j in range(npar)]
    unpack_f = list(inputs)
    base = 1 + ns + npar
    unpack_f += [f"{OT}* OUT = ({OT}*)P[{base}];"]
    unpack_f += [f"{ST[j]}* SN{j} = ({ST[j]}*)P[{base + 1 + j}];" for j in range(ns)]
    unpack_f += [f"{zt(steady, k)}* Z{k} = ({zt(steady, k)}*)P[{base + 1 + ns + k}];" for k in range(nsp)]
    local = " ".join(f"{ST[j]} st{j}[BLK];" for j in range(ns))
    init_st = " ".join(f"for (int64_t i = 0; i < n; ++i) st{j}[i] = S0{j}[start + i];" for j in range(ns))
    write_st = " ".join(f"for (int64_t i = 0; i < n; ++i) SN{j}[start + i] = st{j}[i];" for j in range(ns))

    unpack_b = list(inputs)
    b = 1 + ns + npar
    unpack_b += [f"const {OT}* GOUT = (const {OT}*)P[{b}];"]
    unpack_b += [f"const {ST[j]}* GSN{j} = (const {ST[j]}*)P[{b + 1 + j}];" for j in range(ns)]
    unpack_b += [f"const {zt(steady, k)}* D{k} = (const {zt(steady, k)}*)P[{b + 1 + ns + k}];" for k in range(nsp)]
    b2 = b + 1 + ns + nsp
    unpack_b += [f"{XT}* GX = ({XT}*)P[{b2}];"]
    unpack_b += [f"{ST[j]}* GS0{j} = ({ST[j]}*)P[{b2 + 1 + j}];" for j in range(ns)]
    unpack_b += [f"{PT[j]}* GP{j} = ({PT[j]}*)P[{b2 + 1 + ns + j}];" for j in range(npar)]
    local_b = " ".join(f"{ST[j]} st{j}[BLK]; {ST[j]} gs{j}[BLK]; {ST[j]}* hist{j} = ({ST[j]}*)malloc(sizeof({ST[j]}) * K * BLK);"
                       for j in range(ns))
    local_b += f" {XT} gxb[BLK]; {XT} gxt[BLK];" + "".join(f" {PT[j]} gp{j}[BLK];" for j in range(npar))
    zero_b = "for (int64_t i = 0; i < n; ++i) { gxb[i] = 0; " + \
        "".join(f"gp{j}[i] = 0; " for j in range(npar)) + \
        "".join(f"gs{j}[i] = GSN{j}[start + i]; " for j in range(ns)) + "}"
    save_hist = " ".join(f"for (int64_t i = 0; i < n; ++i) hist{j}[t * BLK + i] = st{j}[i];" for j in range(ns))
    free_b = " ".join(f"free(hist{j});" for j in range(ns))
    out_b = "for (int64_t i = 0; i < n; ++i) { if (!xts) GX[start + i] = gxb[i]; " + \
        "".join(f"GP{j}[start + i] = gp{j}[i]; " for j in range(npar)) + \
        "".join(f"if (has_st0) GS0{j}[start + i] = gs{j}[i]; " for j in range(ns)) + "}"
    return f"""// generated by snncc.runtime.cpu_ir from a lifted neuron step
#include <stdint.h>
#include <stdlib.h>
#include <math.h>
#define BLK {_BLOCK}
{EXP_FLOAT}

/* P: X, S0[ns], PAR[np], OUT, SN[ns], Z[nsp] */
void ir_fwd(int64_t M, int64_t K, int64_t xts, int has_st0, void** P) {{
  {" ".join(unpack_f)}
  const int64_t nblk = (M + BLK - 1) / BLK;
  #pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < nblk; ++b) {{
    const int64_t start = b * BLK, n = M - start < BLK ? M - start : BLK;
    {local}
    if (has_st0) {{ {init_st} }}
    for (int64_t t = 0; t < K; ++t) {{
      if (t == 0 && !has_st0) {{
{fwd_step(first, None, True)}
      }} else {{
{fwd_step(steady, "st{j}[i]", True)}
      }}
    }}
    {write_st}
  }}
}}

/* P: X, S0[ns], PAR[np], GOUT, GSN[ns], D[nsp], GX, GS0[ns], GP[np] */
void ir_bwd(int64_t M, int64_t K, int64_t xts, int has_st0, void** P) {{
  {" ".join(unpack_b)}
  const int64_t nblk = (M + BLK - 1) / BLK;
  #pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < nblk; ++b) {{
    const int64_t start = b * BLK, n = M - start < BLK ? M - start : BLK;
    {local_b}
    if (has_st0) {{ {init_st} }}
    for (int64_t t = 0; t < K; ++t) {{      /* recompute the forward, keeping the states before each step */
      {save_hist}
      if (t == 0 && !has_st0) {{
{fwd_step(first, None, False).replace("OUT[toff] = ", "(void)")}
      }} else {{
{fwd_step(steady, "st{j}[i]", False).replace("OUT[toff] = ", "(void)")}
      }}
    }}
    {zero_b}
    for (int64_t t = K - 1; t >= 0; --t) {{
      if (t == 0 && !has_st0) {{
{bwd_step(first, False)}
      }} else {{
{bwd_step(steady, True)}
      }}
    }}
    {out_b}
    {free_b}
  }}
}}
""" + _pooled_source(first, steady, ns, npar, XT, ST, PT, OT, unpack_f, unpack_b, init_st, write_st, zero_b,
                     out_b, fwd_step, bwd_step)


def _pooled_source(first: NeuronIR, steady: NeuronIR, ns: int, npar: int, XT: str, ST: List[str], PT: List[str],
                   OT: str, unpack_f: List[str], unpack_b: List[str], init_st: str, write_st: str, zero_b: str,
                   out_b: str, fwd_step: Any, bwd_step: Any) -> str:
    """``ir_fwd_pool`` / ``ir_bwd_pool``: the scan with a k x k, stride-k max pool of its output as the
    epilogue (the built-in scans' unit geometry, ``cpu_source.kernel_source``: a unit is the k rows one row
    of windows covers). Forward writes only the pooled output ``[K, Mo]``; backward recomputes each unit's
    outputs per step and routes each window's gradient to the element torch's max pool picks (the first
    maximum in row-major order; a NaN wins), so neither the full-size output nor its gradient exists.
    Per-thread buffers of ``CAP`` = k rows replace the flat kernels' ``BLK`` arrays."""
    alloc = " ".join(f"{ST[j]}* st{j} = ({ST[j]}*)malloc(sizeof({ST[j]}) * CAP);" for j in range(ns))
    free = " ".join(f"free(st{j});" for j in range(ns))
    alloc_b = alloc + " " + " ".join(
        f"{ST[j]}* gs{j} = ({ST[j]}*)malloc(sizeof({ST[j]}) * CAP); "
        f"{ST[j]}* hist{j} = ({ST[j]}*)malloc(sizeof({ST[j]}) * K * CAP);" for j in range(ns))
    alloc_b += f" {XT}* gxb = ({XT}*)malloc(sizeof({XT}) * CAP); {XT}* gxt = ({XT}*)malloc(sizeof({XT}) * CAP);"
    alloc_b += "".join(f" {PT[j]}* gp{j} = ({PT[j]}*)malloc(sizeof({PT[j]}) * CAP);" for j in range(npar))
    alloc_b += f" {OT}* oh = ({OT}*)malloc(sizeof({OT}) * K * CAP); {OT}* gl = ({OT}*)malloc(sizeof({OT}) * CAP);"
    alloc_b += f" {OT}* pm = ({OT}*)malloc(sizeof({OT}) * CAP); int64_t* psel = (int64_t*)malloc(sizeof(int64_t) * CAP);"
    free_b = free + " " + " ".join(f"free(gs{j}); free(hist{j});" for j in range(ns)) + \
        " free(gxb); free(gxt); free(oh); free(gl); free(pm); free(psel);" + "".join(f" free(gp{j});" for j in range(npar))
    save_hist = " ".join(f"for (int64_t i = 0; i < n; ++i) hist{j}[t * CAP + i] = st{j}[i];" for j in range(ns))
    return f"""
// the pooled scans' geometry: P planes x H rows x RW = W * C elements per step, windows of k x k
#define POOL_GEOM \\
  const int64_t Ho = H / k, Wo = W / k, rem = H - Ho * k, UP = Ho + (rem > 0), U = Pp * UP; \\
  const int64_t RW = W * C, M = Pp * H * RW, Mo = Pp * Ho * Wo * C, CAP = k * RW; (void)Mo;
#define POOL_UNIT \\
  const int64_t p = u / UP, j = u % UP, row0 = j < Ho ? j * k : Ho * k, nr = j < Ho ? k : rem; \\
  const int64_t n = nr * RW, start = p * H * RW + row0 * RW;
// ob: one step's outputs of the unit; pooled element (j, wo, c) of plane p -> o (the input's layout).
// Branch-free over c (contiguous in channels-last) so the max vectorizes; NCHW (C == 1) walks wo instead.
static inline void pool_out(const {OT}* ob, {OT}* o, int64_t RW, int64_t Wo, int64_t C, int64_t k) {{
  const int64_t L = Wo * C;
  for (int64_t q = 0; q < L; ++q) o[q] = -INFINITY;
  for (int64_t dh = 0; dh < k; ++dh)
    for (int64_t dw = 0; dw < k; ++dw) {{
      const {OT}* r = ob + dh * RW + dw * C;
      if (C == 1) {{
        for (int64_t wo = 0; wo < Wo; ++wo) {{ const {OT} v = r[wo * k]; o[wo] = (v > o[wo]) | (v != v) ? v : o[wo]; }}
      }} else {{
        for (int64_t wo = 0; wo < Wo; ++wo)
          for (int64_t c = 0; c < C; ++c) {{
            const {OT} v = r[wo * k * C + c];
            o[wo * C + c] = (v > o[wo * C + c]) | (v != v) ? v : o[wo * C + c];
          }}
      }}
    }}
}}
// the element of the unit each window picks (torch's rule: the first maximum in row-major order, a NaN
// wins), for windows (wo, c) -> sel[wo * C + c]; m: scratch of Wo * C
static inline void pool_pick(const {OT}* ob, {OT}* m, int64_t* sel, int64_t RW, int64_t Wo, int64_t C, int64_t k) {{
  const int64_t L = Wo * C;
  for (int64_t q = 0; q < L; ++q) {{ m[q] = -INFINITY; sel[q] = (q / C) * k * C + q % C; }}
  for (int64_t dh = 0; dh < k; ++dh)
    for (int64_t dw = 0; dw < k; ++dw)
      for (int64_t wo = 0; wo < Wo; ++wo)
        for (int64_t c = 0; c < C; ++c) {{
          const int64_t q = wo * C + c, e = dh * RW + (wo * k + dw) * C + c;
          const {OT} v = ob[e];
          const int take = (v > m[q]) | (v != v);
          m[q] = take ? v : m[q];
          sel[q] = take ? e : sel[q];
        }}
}}

/* P: as ir_fwd's, OUT pooled [K, Mo] */
void ir_fwd_pool(int64_t Pp, int64_t H, int64_t W, int64_t C, int64_t k, int64_t K, int64_t xts, int has_st0,
                 void** P) {{
  {" ".join(unpack_f)}
  POOL_GEOM
  #pragma omp parallel
  {{
    {alloc}
    {OT}* ob = ({OT}*)malloc(sizeof({OT}) * CAP);
    #pragma omp for schedule(static)
    for (int64_t u = 0; u < U; ++u) {{
      POOL_UNIT
      if (has_st0) {{ {init_st} }}
      for (int64_t t = 0; t < K; ++t) {{
        if (t == 0 && !has_st0) {{
{fwd_step(first, None, True, out="ob[i]")}
        }} else {{
{fwd_step(steady, "st{j}[i]", True, out="ob[i]")}
        }}
        if (j < Ho) pool_out(ob, OUT + t * Mo + (p * Ho + j) * Wo * C, RW, Wo, C, k);
      }}
      {write_st}
    }}
    {free} free(ob);
  }}
}}

/* P: as ir_bwd's, GOUT pooled [K, Mo] */
void ir_bwd_pool(int64_t Pp, int64_t H, int64_t W, int64_t C, int64_t k, int64_t K, int64_t xts, int has_st0,
                 void** P) {{
  {" ".join(unpack_b)}
  POOL_GEOM
  #pragma omp parallel
  {{
    {alloc_b}
    #pragma omp for schedule(static)
    for (int64_t u = 0; u < U; ++u) {{
      POOL_UNIT
      if (has_st0) {{ {init_st} }}
      for (int64_t t = 0; t < K; ++t) {{      /* recompute the forward: states before each step, outputs */
        {save_hist}
        if (t == 0 && !has_st0) {{
{fwd_step(first, None, False, out="oh[t * CAP + i]")}
        }} else {{
{fwd_step(steady, "st{j}[i]", False, out="oh[t * CAP + i]")}
        }}
      }}
      {zero_b}
      for (int64_t t = K - 1; t >= 0; --t) {{
        for (int64_t i = 0; i < n; ++i) gl[i] = 0;
        if (j < Ho) {{                        /* each window's gradient to torch's pick */
          const {OT}* g = GOUT + t * Mo + (p * Ho + j) * Wo * C;
          pool_pick(oh + t * CAP, pm, psel, RW, Wo, C, k);
          for (int64_t q = 0; q < Wo * C; ++q) gl[psel[q]] = g[q];
        }}
        if (t == 0 && !has_st0) {{
{bwd_step(first, False, gout="gl[i]", cap="CAP")}
        }} else {{
{bwd_step(steady, True, gout="gl[i]", cap="CAP")}
        }}
      }}
      {out_b}
    }}
    {free_b}
  }}
}}
"""


def _lib(first: NeuronIR, steady: NeuronIR, full: Tuple[bool, ...]) -> Any:
    key = (first, steady, full)
    lib = _LIBS.get(key)
    if lib is None:
        with _LOCK:
            lib = _LIBS.get(key)
            if lib is None:
                lib = _library(ir_source(first, steady, full))
                for fn in (lib.ir_fwd, lib.ir_bwd):
                    fn.argtypes = [ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.c_void_p]
                    fn.restype = None
                for fn in (lib.ir_fwd_pool, lib.ir_bwd_pool):
                    fn.argtypes = [ctypes.c_int64] * 7 + [ctypes.c_int, ctypes.c_void_p]
                    fn.restype = None
                _LIBS[key] = lib
    return lib


def _dense(t: torch.Tensor, like: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``t`` broadcast to ``like``'s shape with ``like``'s (dense) strides, in ``dtype`` (default t's)."""
    dtype = dtype or t.dtype
    if t.shape == like.shape and t.stride() == like.stride() and t.dtype == dtype:
        return t
    out = buffers.empty_strided(like.shape, like.stride(), dtype=dtype, device=like.device)
    out.copy_(t.expand(like.shape))
    return out


def _ptrs(ts: Sequence[Optional[torch.Tensor]]) -> Any:
    arr = (ctypes.c_void_p * max(1, len(ts)))()
    for i, t in enumerate(ts):
        arr[i] = None if t is None else t.data_ptr()
    return arr


def _is_dense(t: torch.Tensor) -> bool:
    return t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))


def _callable_derivative(sur: Any, z: torch.Tensor) -> torch.Tensor:
    with torch.enable_grad():
        zz = z.detach().requires_grad_(True)
        s = sur.fn(zz)
        (d,) = torch.autograd.grad(s, zz, torch.ones_like(s))
    return d


class _IRScan(torch.autograd.Function):
    """A lifted neuron over K steps. Inputs: x ``[K, *S]`` (or ``[*S]`` at every step), states ``[*S]``
    (none: from the reset state), parameters (broadcast to ``[*S]`` or one element)."""

    @staticmethod
    def forward(ctx: Any, first: NeuronIR, steady: NeuronIR, broadcast: bool, K: int, ns: int,
                need_grad: bool, pool: Optional[int], x: torch.Tensor, *rest: torch.Tensor):
        has_st0 = len(rest) > len(steady.params)
        st0 = rest[:ns] if has_st0 else ()
        params = rest[ns:] if has_st0 else rest
        like = x if broadcast else x[0]
        if not _is_dense(like) or (not broadcast and x.stride(0) != like.numel()):
            x = x.contiguous()
            like = x if broadcast else x[0]
        M = like.numel()
        full = tuple(p.numel() > 1 for p in params)
        pars = [(_dense(p, like) if f else p.reshape(1).contiguous()) for p, f in zip(params, full)]
        s0 = [_dense(s, like) for s in st0]
        out_dt = steady.dtype(steady.outputs[0])
        if pool is None:
            out = buffers.empty_strided((K,) + tuple(like.shape), (M,) + like.stride(),
                                      _dt(out_dt), x.device)
        else:
            out = _pooled_steps(like, K, pool, _dt(out_dt))
        sn = [buffers.empty_strided(like.shape, like.stride(), dtype=_dt(steady.dtype(s)), device=x.device)
              for s in steady.states]
        zs: List[Optional[torch.Tensor]] = []
        for o in steady.spike_ops:
            z = o.args[0]
            if need_grad and steady.surrogates[o.attr("surrogate")].opaque:
                zs.append(buffers.empty_strided((K,) + tuple(like.shape), (M,) + like.stride(),
                                              dtype=_dt(steady.dtype(z)), device=x.device))
            else:
                zs.append(None)
        lib = _lib(first, steady, full)
        P = _ptrs([x] + s0 + [None] * (ns - len(s0)) + pars + [out] + sn + zs)
        if pool is None:
            lib.ir_fwd(M, K, 0 if broadcast else M, int(has_st0), P)
        else:
            lib.ir_fwd_pool(*_geometry(like, pool), K, 0 if broadcast else M, int(has_st0), P)
        ctx.meta = (first, steady, broadcast, K, ns, has_st0, full, M, pool)
        ctx.param_shapes = [p.shape for p in params]
        if need_grad:
            ctx.save_for_backward(x, *s0, *pars, *[z for z in zs if z is not None])
            ctx.zmask = [z is not None for z in zs]
        return (out,) + tuple(sn)

    @staticmethod
    def backward(ctx: Any, g_out: torch.Tensor, *g_sn: torch.Tensor):
        first, steady, broadcast, K, ns, has_st0, full, M, pool = ctx.meta
        saved = ctx.saved_tensors
        x = saved[0]
        s0 = list(saved[1:1 + (ns if has_st0 else 0)])
        npar = len(steady.params)
        off = 1 + len(s0)
        pars = list(saved[off:off + npar])
        zs = iter(saved[off + npar:])
        like = x if broadcast else x[0]
        ds: List[Optional[torch.Tensor]] = []
        for o, has in zip(steady.spike_ops, ctx.zmask):
            ds.append(_callable_derivative(steady.surrogates[o.attr("surrogate")], next(zs)) if has else None)
        step = (K,) + tuple(like.shape)
        out_dt = _dt(steady.dtype(steady.outputs[0]))
        if pool is None:
            g_out = _dense(g_out, torch.empty_strided(step, (M,) + like.stride(), device=x.device),  # a template: never written
                           out_dt)
        else:
            t = _pooled_steps(like, K, pool, out_dt, template=True)
            g_out = _dense(g_out, t, out_dt)
        gsn = [_dense(g, like, _dt(steady.dtype(s))) for g, s in zip(g_sn, steady.states)]
        gx = buffers.empty_strided(step if not broadcast else tuple(like.shape),
                                 ((M,) + like.stride()) if not broadcast else like.stride(),
                                 dtype=x.dtype, device=x.device)
        gs0 = [torch.empty_like(s) for s in s0] + [None] * (ns - len(s0))
        gp = [buffers.empty_strided(like.shape, like.stride(), dtype=p.dtype, device=x.device) for p in pars]
        lib = _lib(first, steady, full)
        P = _ptrs([x] + s0 + [None] * (ns - len(s0)) + pars + [g_out] + gsn + ds + [gx] + gs0 + gp)
        if pool is None:
            lib.ir_bwd(M, K, 0 if broadcast else M, int(has_st0), P)
        else:
            lib.ir_bwd_pool(*_geometry(like, pool), K, 0 if broadcast else M, int(has_st0), P)
        g_params = [g.sum_to_size(shape) if len(shape) else g.sum() for g, shape in zip(gp, ctx.param_shapes)]
        g_states = tuple(gs0[:ns]) if has_st0 else ()
        return (None, None, None, None, None, None, None, gx) + g_states + tuple(g_params)


def _geometry(like: torch.Tensor, k: int) -> Tuple[int, int, int, int, int]:
    """(P, H, W, C, k) of a dense 4-d step for the pooled kernels: NCHW as N*C planes of one channel,
    channels-last as N planes of C interleaved channels."""
    n, c, h, w = like.shape
    return (n, h, w, c, k) if not like.is_contiguous() else (n * c, h, w, 1, k)


def _pooled_steps(like: torch.Tensor, K: int, k: int, dtype: torch.dtype, template: bool = False) -> torch.Tensor:
    """``[K, N, C, H // k, W // k]`` in ``like``'s layout (channels-last or contiguous per step), from the
    pool (``template``: a tensor never written, for ``_dense``'s shape and strides only)."""
    n, c, h, w = like.shape
    shape = (K * n, c, h // k, w // k)
    cl = not like.is_contiguous()
    if template:
        t = torch.empty(shape, device=like.device, memory_format=torch.channels_last if cl else torch.contiguous_format)
        return t.view(K, n, *shape[1:])
    return buffers.empty(shape, dtype, like.device, channels_last=cl).view(K, n, *shape[1:])


def ir_pool_ok(steady: NeuronIR, x: torch.Tensor, broadcast: bool, k: int) -> bool:
    """The pooled kernels can run this scan: a dense 4-d step (contiguous or channels-last) at least k x k,
    a float output (the pool's max), 2 <= k <= 15."""
    like = x if broadcast else (x[0] if x.dim() >= 1 else x)
    return (like.dim() == 4 and _is_dense(like) and like.shape[2] >= k and like.shape[3] >= k and 2 <= k <= 15
            and steady.dtype(steady.outputs[0]) in ("float32", "float64") and like.numel() > 0)


def _dt(name: str) -> torch.dtype:
    return {"float32": torch.float32, "float64": torch.float64, "bool": torch.bool}[name]


def ir_c_scan(first: NeuronIR, steady: NeuronIR, x: torch.Tensor, K: int, broadcast: bool,
              state: Optional[Sequence[torch.Tensor]], params: Sequence[torch.Tensor], pool: Optional[int] = None
              ) -> Optional[Tuple[torch.Tensor, Tuple[torch.Tensor, ...]]]:
    """Run K steps with the generated C kernel: ``(outputs [K, *S], final states)``; None when the
    tensors do not fit it (device, dtypes), and the caller runs the reference scan. ``pool=k`` (where
    ``ir_pool_ok``): the outputs' k x k max pool ``[K, N, C, H // k, W // k]`` instead, from the pooled
    kernels (the full-size outputs never exist)."""
    if x.device.type != "cpu" or _TORCH_CT.get(x.dtype) != steady.dtype("x"):
        return None
    ts = list(params) + list(state or ())
    if any(t.device.type != "cpu" for t in ts):
        return None
    for p, name in zip(params, steady.params):
        if _TORCH_CT.get(p.dtype) != steady.dtype(name):
            return None
    for s, name in zip(state or (), steady.states):
        if _TORCH_CT.get(s.dtype) != steady.dtype(name):
            return None
    ns = len(steady.states)
    need_grad = torch.is_grad_enabled() and any(t.requires_grad for t in [x] + ts)
    if pool is not None and not ir_pool_ok(steady, x, broadcast, pool):
        return None
    res = _IRScan.apply(first, steady, broadcast, K, ns, need_grad, pool, x, *(tuple(state) if state else ()),
                        *params)
    return res[0], tuple(res[1:])
