"""CPU backend: a neuron layer's scan as one generated C kernel (OpenMP), forward and backward.

The C source is generated from the :class:`~snncc.neurons.NeuronSpec` (charge, fire, reset, surrogate),
compiled once with the system C compiler and cached on disk by a hash of the source and the flags. Each
thread takes a block of neurons, keeps their state in a local array and walks time inside the block: one
pass over memory per chunk each way (DESIGN.md measured ~21 GB/s for this layout on a 2-core machine).

Exactness: ``-O3 -march=native -fno-trapping-math -ffp-contract=off`` and no ``-ffast-math``: the same
IEEE operations in the same order as the torch formula, so spikes and states are bit-identical to the
reference. Supported: IF and LIF (every reset mode, ``decay_input``, ``detach_reset``) with a surrogate snncc
knows, float32/float64, dense tensors of one layout. Everything else runs on the reference backend.
No compiler: the reference backend, with one warning.
"""
from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import warnings
from typing import Any, Dict, Optional, Tuple

import torch

from snncc.neurons import NeuronSpec
from . import buffers, codegen

__all__ = ["supports", "c_scan", "c_bn_scan", "update_running_stats", "kernel_source", "compiler_available",
           "pool_geometry", "CACHE_DIR"]

CACHE_DIR = os.environ.get("SNNCC_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "snncc", "kernels"))
# -fno-math-errno lets gcc call glibc's vector exp (libmvec) in the backward loop; it changes no result.
_FLAGS = ["-O3", "-march=native", "-fno-trapping-math", "-fno-math-errno", "-ffp-contract=off", "-fopenmp",
          "-shared", "-fPIC"]
_BLOCK = 1024
_LOCK = threading.Lock()
_LIBS: Dict[str, Any] = {}
_WARNED = False

_CTYPE = {torch.float32: "float", torch.float64: "double"}
#: dtypes H may be kept in for backward: float32 by default, float16 opt-in (``memory="half"``).
_HTYPE = {torch.float32: "float", torch.float64: "double", torch.float16: "_Float16"}


def supports(spec: NeuronSpec, *tensors: Optional[torch.Tensor]) -> bool:
    """Whether the C scan can run this built-in spec on these tensors (else: reference backend). Other
    neurons (two-state kinds, users') run scans generated from their lifted step (``runtime/cpu_ir.py``)."""
    if not codegen.supported(spec):
        return False
    ts = [t for t in tensors if t is not None]
    if not ts or any(t.device.type != "cpu" or t.dtype not in _CTYPE or t.dtype != ts[0].dtype for t in ts):
        return False
    return compiler_available()


_FOUND: Dict[Tuple[str, str], bool] = {}


def compiler_available() -> bool:
    """A C compiler is on PATH (``$CC`` or gcc) and the reference backend is not forced. Looked up once
    per (CC, PATH): this is asked on every kernel call."""
    global _WARNED
    if os.environ.get("SNNCC_BACKEND", "") == "reference":
        return False
    key = (os.environ.get("CC", "gcc"), os.environ.get("PATH", ""))
    if key not in _FOUND:
        _FOUND[key] = shutil.which(key[0]) is not None
    ok = _FOUND[key]
    if not ok and not _WARNED:
        warnings.warn("snncc: no C compiler found (set CC or install gcc): neuron scans run on the reference "
                      "torch backend, slower but identical.", RuntimeWarning)
        _WARNED = True
    return ok


def kernel_source(spec: NeuronSpec, dtype: torch.dtype, h_dtype: Optional[torch.dtype] = None,
                  pool: Optional[int] = None) -> str:
    """The C source of the scans for ``spec`` in ``dtype`` (H kept in ``h_dtype``, default ``dtype``).

    Four entry points, two layouts of work:
    * ``scan_fwd`` / ``scan_bwd``: the flat scan; a thread takes blocks of BLK neurons, state in a local
      array, time inside the block. Spikes are kept for backward as bits, per (step, block).
    * ``pool_fwd`` / ``pool_bwd``: the scan with max pooling (kernel = stride = k) as its epilogue. A step
      tensor is seen as P planes x H rows x RW elements (NCHW: P = N*C, RW = W; channels-last: P = N,
      RW = W*C); a unit is the k rows one row of windows covers, so the pooled output (max of spikes = OR)
      is written straight from registers and the full-size spike tensor never exists. Backward routes each
      window's gradient to the element torch's max_pool2d picks (the first maximum in row-major order).
    """
    if spec.surrogate.opaque:       # the derivative is an input: one source for every user surrogate
        spec = dataclasses.replace(spec, surrogate=dataclasses.replace(spec.surrogate, fn=None))
    T = _CTYPE[dtype]
    HT = _HTYPE[h_dtype or dtype]
    plif = spec.kind == "plif"
    exp = "snn_expf" if T == "float" else "exp"
    fabs = "fabsf" if T == "float" else "fabs"
    cg = codegen
    # PLIF needs x and V before each step in backward for its weight gradient.
    plif_args = ", const T* xs, int64_t x_stride, const T* v0, double* gk_part" if plif else ""
    plif_init = "double gk = 0.0;" if plif else ""
    plif_step = (f"{{ const T x = xs[t * x_stride + start + i]; "
                 f"const T vp = t > 0 ? vprev[i] : (v0 ? v0[start + i] : VINIT); "
                 f"gk += (double)(gh * {cg.dh_dk(spec)}); }}"
                 if plif else "")
    plif_prev = r"""
      if (t > 0) {  // V before step t = reset(H[t-1], S[t-1]), bit-exact as in forward
        unpack_bits(bits + ((t - 1) * U + u) * UB, n, sp);
        const HT* hp = hs + (t - 1) * M + start;
        for (int64_t i = 0; i < n; ++i) { const T h = (T)hp[i]; const T s = (T)sp[i]; T v; RESET_STMT vprev[i] = v; }
      }""".replace("RESET_STMT", cg.reset(spec)) if plif else ""
    plif_done = "gk_part[u] = gk;" if plif else ""

    common = f"""// generated by snncc.runtime.cpu for {spec}
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
typedef {T} T;
typedef {HT} HT;
typedef uint8_t u8;
#define EXP {exp}
#define FABS {fabs}
#define BLK {_BLOCK}
#define PK {pool or 2}
{codegen.EXP_FLOAT if T == "float" else ""}
#define CONSTS \\
  const T TAU = (T)tau_, KC = (T)kc_, DEC = (T)(1.0 - 1.0 / tau_), VTH = (T)vth_, VR = (T)vr_; \\
  const T VINIT = {"VR" if spec.v_reset is not None else "(T)0"}; /* the reset state (v0 == NULL) */ \\
  (void)TAU; (void)KC; (void)DEC; (void)VR; (void)VINIT;

static inline void pack_bits(const u8* s, int64_t n, u8* out) {{
  for (int64_t j = 0; j < (n + 7) / 8; ++j) {{
    u8 b = 0;
    for (int k = 0; k < 8; ++k) b |= (u8)((j * 8 + k < n ? s[j * 8 + k] : 0) << k);
    out[j] = b;
  }}
}}

static inline void unpack_bits(const u8* in, int64_t n, u8* s) {{
  for (int64_t i = 0; i < n; ++i) s[i] = (in[i >> 3] >> (i & 7)) & 1;
}}

// One forward step over n neurons: H, spike byte and the new V; x from xt.
// With al (training BatchNorm fused in): x = xt * al[c] + be[c], c = cidx[i], the form torch's
// batch_norm computes (alpha = invstd * weight, beta = bias - mean * alpha) for this step.
static inline void step_fwd(const T* xt, T* vb, T* hb, u8* sb, int64_t n,
                            double tau_, double kc_, double vth_, double vr_,
                            const int32_t* cidx, const T* al, const T* be) {{
  CONSTS
  for (int64_t i = 0; i < n; ++i) {{
    const T x = al ? xt[i] * al[cidx[i]] + be[cidx[i]] : xt[i];
    T v = vb[i];
    const T h = {cg.charge(spec)};
    const T s = h >= VTH ? (T)1 : (T)0;
    hb[i] = h;
    sb[i] = (u8)(s != (T)0);
    {cg.reset(spec)}
    vb[i] = v;
  }}
}}

// One backward step over n neurons: from the spike grads gsb and H/spikes of the step, update gv; gx out
// (and, for PLIF's weight gradient, gh of the step when ghb is given).
static inline void step_bwd(const HT* ht, const u8* sb, const T* gsb, T* gvb, T* gxb, T* ghb, const T* dsur, int64_t n,
                            double tau_, double kc_, double vth_, double vr_, double alpha_) {{
  CONSTS
  const T A = (T)alpha_;
  (void)A; (void)dsur;
  for (int64_t i = 0; i < n; ++i) {{
    const T h = (T)ht[i], s = (T)sb[i], gs_in = gsb[i];
    T gv = gvb[i], gs, gh, gx, d;
    {cg.bwd_reset(spec)}
    const T z = h - VTH;
    {cg.surrogate(spec)}
    gh = gh + gs * d;
    {"ghb[i] = gh;" if plif else "(void)ghb;"}
    {cg.charge_grads(spec)}
    gvb[i] = gv;
    gxb[i] = gx;
  }}
}}
"""
    bwd_loop = f"""
      step_bwd(hs + t * M + start, sb, gsb, gvb, gxb, {"ghb" if plif else "0"}, dsur ? dsur + t * M + start : 0,
               n, tau_, kc_, vth_, vr_, alpha_);
      {plif_prev}
      {"" if not plif else "for (int64_t i = 0; i < n; ++i) { const T gh = ghb[i]; " + plif_step + " }"}
      if (broadcast) {{ for (int64_t i = 0; i < n; ++i) gacc[i] += gxb[i]; }}
      else {{ T* gxt = g_x + t * M + start; for (int64_t i = 0; i < n; ++i) gxt[i] = gxb[i]; }}"""
    nscratch = 4 if plif else 3
    # per-thread scratch of the backward scans: gradient state, accumulators, spikes of this/previous step
    common += ("#define BWD_SCRATCH \\\n"
               f"    T* scratch = (T*)malloc({nscratch + 1} * CAP * sizeof(T)); \\\n"
               "    u8* sb = (u8*)malloc(2 * CAP); u8* sp = sb + CAP; (void)sp; \\\n"
               "    T* gvb = scratch; T* gacc = scratch + CAP; T* gsb = scratch + 2 * CAP; "
               "T* gxb = scratch + 3 * CAP; \\\n"
               + ("    T* ghb = scratch + 4 * CAP; \\\n" if plif else "")
               + f"    T* vprev = {'(T*)malloc(CAP * sizeof(T))' if plif else '0'}; (void)vprev;\n")

    flat = f"""
void scan_fwd(const T* xs, int64_t x_stride, const T* v0, T* spikes, u8* bits, HT* hs, T* v_out,
              int64_t K, int64_t M, double tau_, double kc_, double vth_, double vr_, int nthreads,
              const T* bn_al, const T* bn_be, int64_t cdiv, int64_t cmod) {{
  const int64_t U = (M + BLK - 1) / BLK, UB = BLK / 8;
  #pragma omp parallel for schedule(static) num_threads(nthreads)
  for (int64_t u = 0; u < U; ++u) {{
    const int64_t start = u * BLK, n = (M - start) < BLK ? (M - start) : BLK;
    T vb[BLK], hb[BLK];
    u8 sb[BLK];
    int32_t cidx[BLK];
    if (bn_al) for (int64_t i = 0; i < n; ++i) cidx[i] = (int32_t)(((start + i) / cdiv) % cmod);
    if (v0) memcpy(vb, v0 + start, n * sizeof(T)); else {{ CONSTS for (int64_t i = 0; i < n; ++i) vb[i] = VINIT; }}
    for (int64_t t = 0; t < K; ++t) {{
      step_fwd(xs + t * x_stride + start, vb, hb, sb, n, tau_, kc_, vth_, vr_,
               cidx, bn_al ? bn_al + t * cmod : 0, bn_al ? bn_be + t * cmod : 0);
      if (spikes) {{ T* st = spikes + t * M + start; for (int64_t i = 0; i < n; ++i) st[i] = (T)sb[i]; }}
      if (hs) {{ HT* ht = hs + t * M + start; for (int64_t i = 0; i < n; ++i) ht[i] = (HT)hb[i]; }}
      if (bits) pack_bits(sb, n, bits + (t * U + u) * UB);
    }}
    memcpy(v_out + start, vb, n * sizeof(T));
  }}
}}

void scan_bwd(const T* g_spikes, const HT* hs, const T* dsur, const u8* bits, const T* g_vlast, T* g_x, int broadcast,
              T* g_v0, int64_t K, int64_t M, double tau_, double kc_, double vth_, double vr_, double alpha_,
              int nthreads{plif_args}) {{
  const int64_t U = (M + BLK - 1) / BLK, UB = BLK / 8, CAP = BLK;
  CONSTS (void)VTH;
  #pragma omp parallel num_threads(nthreads)
  {{
    BWD_SCRATCH
    #pragma omp for schedule(static)
    for (int64_t u = 0; u < U; ++u) {{
      const int64_t start = u * BLK, n = (M - start) < BLK ? (M - start) : BLK;
      {plif_init}
      for (int64_t i = 0; i < n; ++i) {{ gvb[i] = g_vlast ? g_vlast[start + i] : (T)0; gacc[i] = (T)0; }}
      for (int64_t t = K - 1; t >= 0; --t) {{
        unpack_bits(bits + (t * U + u) * UB, n, sb);
        if (g_spikes) memcpy(gsb, g_spikes + t * M + start, n * sizeof(T));
        else memset(gsb, 0, n * sizeof(T));
        {bwd_loop}
      }}
      for (int64_t i = 0; i < n; ++i) g_v0[start + i] = gvb[i];
      if (broadcast) memcpy(g_x + start, gacc, n * sizeof(T));
      {plif_done}
    }}
    free(scratch); free(sb); {"free(vprev);" if plif else ""}
  }}
}}
"""
    pool = f"""
// Geometry of the pooled scan (see kernel_source's docstring).
#define POOL_GEOM \\
  (void)k; /* == PK: the pool size is compiled in, so its loops unroll */ \\
  const int64_t Ho = H / k, Wo = W / k, rem = H - Ho * k, UP = Ho + (rem > 0), U = P * UP; \\
  const int64_t RW = W * C, M = P * H * RW, Mo = P * Ho * Wo * C, CAP = k * RW, UB = (CAP + 7) / 8; \\
  (void)Mo; (void)UB;
// where pooled output (p, j, wo, c) of a step lives: the input's layout, or channels-first (out_cf: the
// [N, C, Ho, Wo] contiguous order a following flatten reads without a copy)
#define OUT_INDEX (out_cf ? ((p * C + c) * Ho + j) * Wo + wo : ((p * Ho + j) * Wo + wo) * C + c)
#define POOL_UNIT \\
  const int64_t p = u / UP, j = u % UP, row0 = j < Ho ? j * k : Ho * k, nr = j < Ho ? k : rem; \\
  const int64_t n = nr * RW, start = p * H * RW + row0 * RW;

void pool_fwd(const T* xs, int64_t x_stride, const T* v0, T* out, u8* bits, HT* hs, T* v_out,
              int64_t K, int64_t P, int64_t H, int64_t W, int64_t C, int64_t k, int64_t out_cf,
              double tau_, double kc_, double vth_, double vr_, int nthreads,
              const T* bn_al, const T* bn_be, int64_t cdiv, int64_t cmod) {{
  POOL_GEOM
  #pragma omp parallel num_threads(nthreads)
  {{
    T* vb = (T*)malloc(2 * CAP * sizeof(T));
    T* hb = vb + CAP;
    u8* sb = (u8*)malloc(CAP);
    int32_t* cidx = (int32_t*)malloc(CAP * sizeof(int32_t));
    #pragma omp for schedule(static)
    for (int64_t u = 0; u < U; ++u) {{
      POOL_UNIT
      if (bn_al) for (int64_t i = 0; i < n; ++i) cidx[i] = (int32_t)(((start + i) / cdiv) % cmod);
      if (v0) memcpy(vb, v0 + start, n * sizeof(T)); else {{ CONSTS for (int64_t i = 0; i < n; ++i) vb[i] = VINIT; }}
      for (int64_t t = 0; t < K; ++t) {{
        step_fwd(xs + t * x_stride + start, vb, hb, sb, n, tau_, kc_, vth_, vr_,
               cidx, bn_al ? bn_al + t * cmod : 0, bn_al ? bn_be + t * cmod : 0);
        if (hs) {{ HT* ht = hs + t * M + start; for (int64_t i = 0; i < n; ++i) ht[i] = (HT)hb[i]; }}
        if (bits) pack_bits(sb, n, bits + (t * U + u) * UB);
        if (out && j < Ho) {{
          T* ot = out + t * Mo;
          if (!out_cf || C == 1) {{          // output in the input's order: contiguous in c
            T* row = ot + (p * Ho + j) * Wo * C;
            for (int64_t wo = 0; wo < Wo; ++wo) {{
              const u8* s0 = sb + wo * PK * C;
              T* o = row + wo * C;
              for (int64_t c = 0; c < C; ++c) {{
                u8 m = 0;
                for (int dh = 0; dh < PK; ++dh)
                  for (int dw = 0; dw < PK; ++dw) m |= s0[dh * RW + dw * C + c];
                o[c] = (T)m;
              }}
            }}
          }} else {{                           // channels-first output of a channels-last input
            for (int64_t c = 0; c < C; ++c) {{
              T* o = ot + ((p * C + c) * Ho + j) * Wo;
              for (int64_t wo = 0; wo < Wo; ++wo) {{
                u8 m = 0;
                for (int dh = 0; dh < PK; ++dh)
                  for (int dw = 0; dw < PK; ++dw) m |= sb[dh * RW + (wo * PK + dw) * C + c];
                o[wo] = (T)m;
              }}
            }}
          }}
        }}
      }}
      memcpy(v_out + start, vb, n * sizeof(T));
    }}
    free(vb); free(sb); free(cidx);
  }}
}}

void pool_bwd(const T* g_out, const HT* hs, const T* dsur, const u8* bits, const T* g_vlast, T* g_x, int broadcast,
              T* g_v0, int64_t K, int64_t P, int64_t H, int64_t W, int64_t C, int64_t k, int64_t out_cf,
              double tau_, double kc_, double vth_, double vr_, double alpha_, int nthreads{plif_args}) {{
  POOL_GEOM
  CONSTS (void)VTH;
  #pragma omp parallel num_threads(nthreads)
  {{
    BWD_SCRATCH
    #pragma omp for schedule(static)
    for (int64_t u = 0; u < U; ++u) {{
      POOL_UNIT
      {plif_init}
      for (int64_t i = 0; i < n; ++i) {{ gvb[i] = g_vlast ? g_vlast[start + i] : (T)0; gacc[i] = (T)0; }}
      for (int64_t t = K - 1; t >= 0; --t) {{
        unpack_bits(bits + (t * U + u) * UB, n, sb);
        memset(gsb, 0, n * sizeof(T));
        if (g_out && j < Ho) {{
          const T* gt = g_out + t * Mo;
          for (int64_t wo = 0; wo < Wo; ++wo)
            for (int64_t c = 0; c < C; ++c) {{
              int64_t sel = (wo * PK) * C + c;    // torch's pick: the first maximum, row-major
              int found = 0;
              for (int64_t dh = 0; dh < PK && !found; ++dh)
                for (int64_t dw = 0; dw < PK; ++dw) {{
                  const int64_t idx = dh * RW + (wo * PK + dw) * C + c;
                  if (sb[idx]) {{ sel = idx; found = 1; break; }}
                }}
              gsb[sel] = gt[OUT_INDEX];
            }}
        }}
        {bwd_loop}
      }}
      for (int64_t i = 0; i < n; ++i) g_v0[start + i] = gvb[i];
      if (broadcast) memcpy(g_x + start, gacc, n * sizeof(T));
      {plif_done}
    }}
    free(scratch); free(sb); {"free(vprev);" if plif else ""}
  }}
}}
"""
    return common + flat + pool


def _library(src: str) -> Any:
    key = hashlib.sha256((src + " ".join(_FLAGS)).encode()).hexdigest()[:20]
    with _LOCK:
        if key in _LIBS:
            return _LIBS[key]
        os.makedirs(CACHE_DIR, exist_ok=True)
        so = os.path.join(CACHE_DIR, f"scan_{key}.so")
        if not os.path.exists(so):
            with tempfile.TemporaryDirectory() as d:
                c = os.path.join(d, "scan.c")
                with open(c, "w") as f:
                    f.write(src)
                tmp_so = os.path.join(d, "scan.so")
                cc = os.environ.get("CC", "gcc")
                r = subprocess.run([cc, *_FLAGS, c, "-o", tmp_so, "-lm"], capture_output=True, text=True)
                if r.returncode != 0:
                    raise RuntimeError(f"snncc: compiling the CPU scan kernel failed:\n{r.stderr[-2000:]}")
                os.replace(tmp_so, so) if not os.path.exists(so) else None
        lib = ctypes.CDLL(so)
        _LIBS[key] = lib
        if "void scan_fwd(" not in src:        # another kind of source (bits_source): caller types it
            return lib
        i64, dbl, ptr, cint = ctypes.c_int64, ctypes.c_double, ctypes.c_void_p, ctypes.c_int
        extra = [ptr, i64, ptr, ptr] if "double* gk_part" in src else []     # PLIF: xs, x_stride, v0, gk
        lib.scan_fwd.argtypes = [ptr, i64, ptr, ptr, ptr, ptr, ptr, i64, i64, dbl, dbl, dbl, dbl, cint,
                                 ptr, ptr, i64, i64]
        lib.scan_bwd.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, cint, ptr, i64, i64, dbl, dbl, dbl, dbl, dbl,
                                 cint] + extra
        lib.pool_fwd.argtypes = [ptr, i64, ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64, i64, i64, i64,
                                 dbl, dbl, dbl, dbl, cint, ptr, ptr, i64, i64]
        lib.pool_bwd.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, cint, ptr, i64, i64, i64, i64, i64, i64, i64,
                                 dbl, dbl, dbl, dbl, dbl, cint] + extra
        _LIBS[key] = lib
        return lib


def bits_source(dtype: torch.dtype) -> str:
    """C for packing a dense 0/1 tensor into bits (checking every value) and unpacking it, in memory order.

    ``pack_check`` returns the number of ones, or -1 if a value is neither 0 nor 1 (then the caller keeps
    the dense tensor). Bit i of the output is element i in memory order, least significant bit first.
    """
    T = _CTYPE[dtype]
    return f"""// generated by snncc.runtime.cpu: spike bit-packing for {T}
#include <stdint.h>
typedef {T} T;
int64_t pack_check(const T* x, int64_t n, uint8_t* out, int nthreads) {{
  const int64_t nb = (n + 7) / 8;
  int64_t ones = 0, bad = 0;
  #pragma omp parallel for schedule(static) num_threads(nthreads) reduction(+:ones, bad)
  for (int64_t j = 0; j < nb; ++j) {{
    uint8_t b = 0;
    for (int k = 0; k < 8; ++k) {{
      const int64_t i = j * 8 + k;
      const T v = i < n ? x[i] : (T)0;
      bad += !((v == (T)0) | (v == (T)1));
      b |= (uint8_t)((v == (T)1) << k);
    }}
    out[j] = b;
    ones += __builtin_popcount(b);
  }}
  return bad ? -1 : ones;
}}
void unpack(const uint8_t* in, int64_t n, T* out, int nthreads) {{
  #pragma omp parallel for schedule(static) num_threads(nthreads)
  for (int64_t i = 0; i < n; ++i) out[i] = (T)((in[i >> 3] >> (i & 7)) & 1);
}}
"""


def sparse_conv_source(cob: int) -> str:
    """C for a 2-d convolution whose input is spikes, computed from their bits (float32, channels-last).

    Output-stationary: each output pixel adds, for every input spike its kernel window covers, the weight
    column of that (kh, kw, input channel) to an accumulator over a block of ``cob`` output channels kept
    in registers (``cob`` is a compile-time constant so the adds unroll). Work is proportional to the
    number of spikes, not to the input size: at the spike rates SNNs run at it does a fraction of a dense
    convolution's multiply-adds. Sums run in a different order than oneDNN's, so the result equals
    F.conv2d to float tolerance.
    """
    return r"""// generated by snncc.runtime.cpu: spike-input convolution, output-channel block COB
#include <stdint.h>
#define COB """ + str(cob) + r"""
// bits: the input [N, Cin, H, W] in channels-last memory order (n, h, w, c), 1 bit per element, Cin % 8 == 0
// wt: [KH][KW][Cin][Cout]; out: [N, Cout, OH, OW] channels-last (n, oh, ow, co); Cout % COB == 0
void sconv2d_fwd(const uint8_t* bits, const float* wt, const float* bias, float* out,
                 int64_t N, int64_t H, int64_t W, int64_t Cin, int64_t Cout, int64_t KH, int64_t KW,
                 int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t OH, int64_t OW, int nthreads) {
  const int64_t bpp = Cin / 8;      // bytes per input pixel
  #pragma omp parallel for schedule(static) collapse(2) num_threads(nthreads)
  for (int64_t n = 0; n < N; ++n)
    for (int64_t oh = 0; oh < OH; ++oh)
      for (int64_t ow = 0; ow < OW; ++ow)
        for (int64_t c0 = 0; c0 < Cout; c0 += COB) {
          float acc[COB];
          for (int co = 0; co < COB; ++co) acc[co] = bias ? bias[c0 + co] : 0.0f;
          for (int64_t kh = 0; kh < KH; ++kh) {
            const int64_t ih = oh * sh - ph + kh;
            if (ih < 0 || ih >= H) continue;
            for (int64_t kw = 0; kw < KW; ++kw) {
              const int64_t iw = ow * sw - pw + kw;
              if (iw < 0 || iw >= W) continue;
              const uint8_t* px = bits + ((n * H + ih) * W + iw) * bpp;
              const float* wk = wt + (kh * KW + kw) * Cin * Cout + c0;
              for (int64_t byte = 0; byte < bpp; ++byte) {
                unsigned b = px[byte];
                while (b) {
                  const int64_t ci = byte * 8 + __builtin_ctz(b);
                  b &= b - 1;
                  const float* wc = wk + ci * Cout;
                  for (int co = 0; co < COB; ++co) acc[co] += wc[co];
                }
              }
            }
          }
          float* o = out + ((n * OH + oh) * OW + ow) * Cout + c0;
          for (int co = 0; co < COB; ++co) o[co] = acc[co];
        }
}
"""


def sparse_block(cout: int) -> int:
    """The output-channel block of the spike-driven conv: the largest of 64, 32, 16, 8 dividing Cout."""
    return next((b for b in (64, 32, 16, 8) if cout % b == 0), 0)


def sparse_conv_library(cout: int) -> Any:
    lib = _library(sparse_conv_source(sparse_block(cout)))
    if not getattr(lib, "_snncc_typed", False):
        i64, ptr, cint = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
        lib.sconv2d_fwd.argtypes = [ptr, ptr, ptr, ptr] + [i64] * 13 + [cint]
        lib._snncc_typed = True
    return lib


def bits_library(dtype: torch.dtype) -> Any:
    """The compiled pack/unpack functions for ``dtype`` (float32/float64)."""
    lib = _library(bits_source(dtype))
    if not getattr(lib, "_snncc_typed", False):
        i64, ptr, cint = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
        lib.pack_check.argtypes = [ptr, i64, ptr, cint]
        lib.pack_check.restype = i64
        lib.unpack.argtypes = [ptr, i64, ptr, cint]
        lib._snncc_typed = True
    return lib


_BY_SPEC: Dict[Any, Any] = {}


def _kernels(spec: NeuronSpec, dtype: torch.dtype, pool: Optional[int]) -> Any:
    """The compiled scans for a spec, memoized by spec (generating and hashing the source every call
    costs more than the kernel on small layers)."""
    key = (spec if not spec.surrogate.opaque else dataclasses.replace(
        spec, surrogate=dataclasses.replace(spec.surrogate, fn=None)), dtype, pool)
    lib = _BY_SPEC.get(key)
    if lib is None:
        lib = _BY_SPEC[key] = _library(kernel_source(spec, dtype, pool=pool))
    return lib


def _p(t: Optional[torch.Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


def _channels_last(t: torch.Tensor) -> bool:
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def _dense_like(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` with ``like``'s (dense) strides, so both can be walked as flat arrays in the same order."""
    if t.shape == like.shape and t.stride() == like.stride():
        return t
    out = buffers.empty_like(like)
    out.copy_(t)
    return out


def _steps_like(x_step: torch.Tensor, K: int, shape: Optional[Tuple[int, ...]] = None,
                dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """A pooled ``[K, *shape]`` buffer laid out like ``x_step`` (channels-last stays channels-last)."""
    shape = tuple(x_step.shape) if shape is None else shape
    flat = buffers.empty((K * shape[0],) + shape[1:], dtype or x_step.dtype, x_step.device,
                         channels_last=_channels_last(x_step))
    return flat.view((K,) + shape)


def _consts(spec: NeuronSpec, w: Optional[torch.Tensor]) -> Tuple[float, float, float, float]:
    """(tau, k, v_th, v_r) as the kernels take them; k = sigmoid(w) computed by torch, as the reference."""
    kc = float(w.detach().sigmoid()) if w is not None else 0.0
    return float(spec.tau), kc, float(spec.v_threshold), 0.0 if spec.v_reset is None else float(spec.v_reset)


def pool_geometry(x_step: torch.Tensor, k: int) -> Tuple[int, int, int, int, int]:
    """(P, H, W, C_inner, units) of a 4-d step tensor for the pooled kernels (see kernel_source)."""
    n, c, h, w = x_step.shape
    P, C = (n, c) if _channels_last(x_step) else (n * c, 1)
    Ho, rem = h // k, h % k
    return P, h, w, C, P * (Ho + (rem > 0))


def _user_derivative(spec: NeuronSpec, hs: torch.Tensor) -> torch.Tensor:
    """d spike / d z of a user's surrogate at z = H - V_th for every step, through its own backward
    (``codegen.plain_step_surrogate`` checked it is elementwise and linear in the incoming gradient).

    NOTE: called a step at a time, as eager calls it: its temporaries stay step-sized (reused by the
    allocator) instead of chunk-sized (a fresh, page-faulted block per temporary per call).
    """
    out = _steps_like(hs[0], hs.shape[0], dtype=hs.dtype)
    for t in range(hs.shape[0]):
        with torch.enable_grad():
            z = (hs[t] - spec.v_threshold).detach().requires_grad_(True)
            s = spec.surrogate.fn(z)
            (d,) = torch.autograd.grad(s, z, torch.ones_like(s))
        out[t].copy_(d)
    return out


def _bn_args(bn: Optional[Tuple[torch.Tensor, torch.Tensor]], x_step: torch.Tensor) -> Tuple[Any, ...]:
    """(alpha, beta, cdiv, cmod): the channel of flat element g is (g / cdiv) % cmod in x's layout."""
    if bn is None:
        return None, None, 1, 1
    c = x_step.shape[1]
    cdiv = 1 if _channels_last(x_step) else int(x_step[0, 0].numel())
    return bn[0].data_ptr(), bn[1].data_ptr(), cdiv, c


def _forward_kernel(lib: Any, spec: NeuronSpec, x: torch.Tensor, x_step: torch.Tensor, broadcast: bool, K: int,
                    v0: Optional[torch.Tensor], w: Optional[torch.Tensor], pool: Optional[int], keep: bool,
                    h_dtype: Optional[torch.dtype], want_out: bool = True, pool_cf: bool = False,
                    bn: Optional[Tuple[torch.Tensor, torch.Tensor]] = None):
    """Run the forward kernel; returns (out, final V, H per step or None, bits or None). ``bn``: per-step,
    per-channel (alpha, beta) ``[K, C]`` of a training BatchNorm applied to the input inside the kernel."""
    M = x_step.numel()
    hs = _steps_like(x_step, K) if keep else None
    v = buffers.empty_like(x_step)
    tau, kc, vth, vr = _consts(spec, w)
    nt = torch.get_num_threads()
    x_stride = 0 if broadcast else M
    if pool is None:
        units, ub = (M + _BLOCK - 1) // _BLOCK, _BLOCK // 8
        bits = buffers.empty((K * units * ub,), torch.uint8, x.device) if keep else None
        out = _steps_like(x_step, K) if want_out else None
        lib.scan_fwd(x.data_ptr(), x_stride, _p(v0), _p(out), _p(bits), _p(hs), v.data_ptr(),
                     K, M, tau, kc, vth, vr, nt, *_bn_args(bn, x_step))
    else:
        P, H, W, C, units = pool_geometry(x_step, pool)
        ub = (pool * W * C + 7) // 8
        bits = buffers.empty((K * units * ub,), torch.uint8, x.device) if keep else None
        n, c = x_step.shape[:2]
        shape = (n, c, H // pool, W // pool)
        out = None
        if want_out:
            out = buffers.empty((K * n,) + shape[1:], x.dtype, x.device).view((K,) + shape) if pool_cf \
                else _steps_like(x_step, K, shape)
        lib.pool_fwd(x.data_ptr(), x_stride, _p(v0), _p(out), _p(bits), _p(hs), v.data_ptr(),
                     K, P, H, W, C, pool, int(pool_cf), tau, kc, vth, vr, nt, *_bn_args(bn, x_step))
    return out, v, hs, bits


def _scan_grads(lib: Any, spec: NeuronSpec, K: int, pool: Optional[int], pool_cf: bool, broadcast: bool,
                dtype: torch.dtype, out_meta: Tuple[Any, Any], hs: torch.Tensor, bits: torch.Tensor,
                g_out: Optional[torch.Tensor], g_v_last: Optional[torch.Tensor], x: Optional[torch.Tensor],
                v0: Optional[torch.Tensor], w: Optional[torch.Tensor]):
    """The backward kernel: (grad of the scan's input, grad of V0, PLIF's per-unit dL/dk or None)."""
    h0 = hs[0]
    dsur = _user_derivative(spec, hs) if spec.surrogate.opaque else None
    # the gradient of one step's input: laid out like H (and the input), in the input's dtype
    g_step = buffers.empty(tuple(h0.shape), dtype, h0.device, channels_last=_channels_last(h0))
    if g_out is not None:
        shape, stride = out_meta
        if g_out.stride() != stride:
            g = buffers.empty((shape[0] * shape[1],) + shape[2:], dtype, h0.device,
                              channels_last=_channels_last(h0) and not pool_cf).view(shape)
            g.copy_(g_out)
            g_out = g
    g_v_last = None if g_v_last is None else _dense_like(g_v_last, g_step)
    g_x = g_step if broadcast else _steps_like(g_step, K)
    g_v0 = buffers.empty_like(g_step)
    M = h0.numel()
    tau, kc, vth, vr = _consts(spec, w)
    nt = torch.get_num_threads()
    plif = spec.kind == "plif"
    units = (M + _BLOCK - 1) // _BLOCK if pool is None else pool_geometry(h0, pool)[4]
    gk_part = torch.zeros(units, dtype=torch.float64) if plif else None
    extra = [x.data_ptr(), 0 if broadcast else M, _p(v0), gk_part.data_ptr()] if plif else []
    if pool is None:
        lib.scan_bwd(_p(g_out), hs.data_ptr(), _p(dsur), bits.data_ptr(), _p(g_v_last), g_x.data_ptr(),
                     int(broadcast), g_v0.data_ptr(), K, M, tau, kc, vth, vr, float(spec.surrogate.alpha), nt,
                     *extra)
    else:
        P, H, W, C, _ = pool_geometry(h0, pool)
        lib.pool_bwd(_p(g_out), hs.data_ptr(), _p(dsur), bits.data_ptr(), _p(g_v_last), g_x.data_ptr(),
                     int(broadcast), g_v0.data_ptr(), K, P, H, W, C, pool, int(pool_cf), tau, kc, vth, vr,
                     float(spec.surrogate.alpha), nt, *extra)
    return g_x, g_v0, gk_part


class _CScan(torch.autograd.Function):
    """IF/LIF/PLIF scan over K steps with the generated C kernels, optionally with a max-pool epilogue.

    Kept for backward (through ``ctx.save_for_backward``): H per step (in ``h_dtype``) and the spikes as
    packed bits; PLIF also keeps its input and initial V for the weight gradient. With ``recompute``
    (``memory="min"``) only the input and the chunk's initial V are kept, and backward reruns the forward
    kernel to get H and the spikes back (bit-identical: the same kernel on the same values).
    """

    @staticmethod
    def forward(ctx: Any, spec: NeuronSpec, broadcast: bool, K: int, need_grad: bool,
                h_dtype: Optional[torch.dtype], recompute: bool, pool: Optional[int], pool_cf: bool,
                x: torch.Tensor, v0: Optional[torch.Tensor], w: Optional[torch.Tensor]):
        x_step = x if broadcast else x[0]
        if not (x_step.is_contiguous() or _channels_last(x_step)):
            x = x.contiguous()
            x_step = x if broadcast else x[0]
        v0 = None if v0 is None else _dense_like(v0, x_step)     # None: the reset state, set by the kernel
        lib = _kernels(spec, x.dtype, pool)
        keep = need_grad and not recompute
        out, v, hs, bits = _forward_kernel(lib, spec, x, x_step, broadcast, K, v0, w, pool, keep, None,
                                           pool_cf=pool_cf and pool is not None)
        if hs is not None and h_dtype is not None and h_dtype != hs.dtype:
            # NOTE: converted by torch (vectorized F16C) rather than in the kernel, where gcc emits a
            # library call per element; the full-precision H is a pooled buffer, reused next step.
            hs = hs.to(h_dtype)
        ctx.spec, ctx.broadcast, ctx.K, ctx.h_dtype, ctx.pool = spec, broadcast, K, h_dtype, pool
        ctx.x_dtype, ctx.recompute, ctx.pool_cf = x.dtype, recompute, pool_cf and pool is not None
        ctx.set_materialize_grads(False)       # an unused final state needs no zero gradient tensor
        if need_grad:
            plif = spec.kind == "plif"
            if recompute:
                ctx.save_for_backward(None, None, x, v0, w)
            else:
                ctx.save_for_backward(hs, bits, x if plif else None, v0 if plif else None, w)
        ctx.out_meta = (tuple(out.shape), out.stride())
        return out, v

    @staticmethod
    def backward(ctx: Any, g_out: Optional[torch.Tensor], g_v_last: Optional[torch.Tensor]):
        hs, bits, x, v0, w = ctx.saved_tensors
        spec, K, pool = ctx.spec, ctx.K, ctx.pool
        lib = _kernels(spec, ctx.x_dtype, pool)
        if ctx.recompute:
            x_step = x if ctx.broadcast else x[0]
            _, _, hs, bits = _forward_kernel(lib, spec, x, x_step, ctx.broadcast, K, v0, w, pool, True,
                                             None, want_out=False)
        elif hs.dtype != ctx.x_dtype:
            full = _steps_like(hs[0], K, dtype=ctx.x_dtype)
            full.copy_(hs)
            hs = full
        g_x, g_v0, gk_part = _scan_grads(lib, spec, K, pool, ctx.pool_cf, ctx.broadcast, ctx.x_dtype, ctx.out_meta,
                                         hs, bits, g_out, g_v_last, x, v0, w)
        plif = spec.kind == "plif"
        g_w = None
        if plif and w is not None and ctx.needs_input_grad[10]:
            k = w.detach().sigmoid()
            g_w = (gk_part.sum().to(w.dtype) * k * (1.0 - k)).reshape(w.shape)
        return None, None, None, None, None, None, None, None, g_x, g_v0 if ctx.needs_input_grad[9] else None, g_w


def c_scan(spec: NeuronSpec, x: torch.Tensor, K: int, broadcast: bool, v0: Optional[torch.Tensor],
           w: Optional[torch.Tensor] = None, pool: Optional[int] = None,
           h_dtype: Optional[torch.dtype] = None, recompute: bool = False,
           pool_cf: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Spikes ``[K, *S]`` (or, with ``pool=k``, their k x k max-pool ``[K, N, C, H/k, W/k]``) and the final
    V of an IF/LIF/PLIF layer (``supports`` must hold). ``v0`` None: the reset state. ``recompute``: keep
    only the input and initial V for backward (``memory="min"``). ``pool_cf``: the pooled output in
    channels-first order even for a channels-last input (what a following flatten reads without a copy)."""
    need_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, v0, w))
    return _CScan.apply(spec, broadcast, K, need_grad, h_dtype, recompute, pool, pool_cf, x, v0, w)


class _CBNScan(torch.autograd.Function):
    """Training BatchNorm + IF/LIF scan (+ max-pool epilogue) over K steps, fused.

    Step mode's BatchNorm: step t normalized with its own batch statistics. Forward computes the K steps'
    statistics in one pass, then the scan kernel applies each step's ``x * alpha + beta`` to its input as it
    reads it, so the normalized tensor never exists. Kept for backward: the input (BatchNorm's backward
    needs it, as in eager), the per-step mean and inverse std, H and the spike bits. Backward: the scan
    kernel gives the gradient of the normalized input, then BatchNorm's backward for the K steps at once.
    """

    @staticmethod
    def forward(ctx: Any, spec: NeuronSpec, K: int, need_grad: bool, pool: Optional[int], pool_cf: bool,
                eps: float, x: torch.Tensor, v0: Optional[torch.Tensor], weight: Optional[torch.Tensor],
                bias: Optional[torch.Tensor]):
        x_step = x[0]
        if not (x_step.is_contiguous() or _channels_last(x_step)):
            x = x.contiguous()
            x_step = x[0]
        v0 = None if v0 is None else _dense_like(v0, x_step)
        var, mean = torch.var_mean(x, dim=(1, 3, 4), unbiased=False)          # [K, C]
        invstd = torch.rsqrt(var + eps)
        alpha = invstd if weight is None else invstd * weight.detach()
        beta = -mean * alpha if bias is None else bias.detach() - mean * alpha
        alpha, beta = alpha.to(x.dtype).contiguous(), beta.to(x.dtype).contiguous()
        lib = _kernels(spec, x.dtype, pool)
        out, v, hs, bits = _forward_kernel(lib, spec, x, x_step, False, K, v0, None, pool, need_grad, None,
                                           pool_cf=pool_cf and pool is not None, bn=(alpha, beta))
        ctx.spec, ctx.K, ctx.pool, ctx.pool_cf, ctx.x_dtype = spec, K, pool, pool_cf and pool is not None, x.dtype
        ctx.out_meta = (tuple(out.shape), out.stride())
        ctx.has_bias = bias is not None
        ctx.set_materialize_grads(False)
        if need_grad:
            ctx.save_for_backward(hs, bits, x, v0, mean, invstd, weight)
        return out, v, mean, var

    @staticmethod
    def backward(ctx: Any, g_out: Optional[torch.Tensor], g_v_last: Optional[torch.Tensor], _gm: Any, _gv: Any):
        hs, bits, x, v0, mean, invstd, weight = ctx.saved_tensors
        lib = _kernels(ctx.spec, ctx.x_dtype, ctx.pool)
        g_y, g_v0, _ = _scan_grads(lib, ctx.spec, ctx.K, ctx.pool, ctx.pool_cf, False, ctx.x_dtype, ctx.out_meta,
                                   hs, bits, g_out, g_v_last, None, v0, None)
        # BatchNorm's backward for the K steps at once (the formula of runtime/batchnorm.py)
        shape = (ctx.K, 1, -1, 1, 1)
        m, istd = mean.view(shape), invstd.view(shape)
        n = x[0].numel() // x.shape[2]
        xhat = (x - m) * istd
        dims = (1, 3, 4)
        g_sum = g_y.sum(dims, keepdim=True)
        g_dot = (g_y * xhat).sum(dims, keepdim=True)
        scale = istd if weight is None else istd * weight.view(1, 1, -1, 1, 1)
        g_x = (g_y - g_sum / n - xhat * (g_dot / n)) * scale if ctx.needs_input_grad[6] else None
        g_w = g_dot.sum(0).view(-1) if weight is not None and ctx.needs_input_grad[8] else None
        g_b = g_sum.sum(0).view(-1) if ctx.has_bias and ctx.needs_input_grad[9] else None
        return (None, None, None, None, None, None, g_x, g_v0 if ctx.needs_input_grad[7] else None, g_w, g_b)


def c_bn_scan(spec: NeuronSpec, x: torch.Tensor, K: int, v0: Optional[torch.Tensor], bn: Any,
              pool: Optional[int] = None, pool_cf: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """``neuron(batch_norm(x[t]))`` over K steps for a BatchNorm2d in training mode, fused (``_CBNScan``):
    spikes (or their max pool) and the final V; the running statistics are updated K times, in order."""
    need_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                                for t in (x, v0, bn.weight, bn.bias))
    out, v, mean, var = _CBNScan.apply(spec, K, need_grad, pool, pool_cf, bn.eps, x, v0, bn.weight, bn.bias)
    update_running_stats(bn, mean.detach(), var.detach(), x[0].numel() // x.shape[2])
    return out, v


def update_running_stats(bn: Any, mean: torch.Tensor, var: torch.Tensor, n: int) -> None:
    """K running-statistics updates in time order, exactly as K training-mode module calls make."""
    if not (bn.track_running_stats and bn.running_mean is not None):
        return
    with torch.no_grad():
        unbiased = var * (n / max(n - 1, 1))
        for t in range(mean.shape[0]):
            bn.num_batches_tracked.add_(1)
            m = (1.0 / float(bn.num_batches_tracked)) if bn.momentum is None else bn.momentum
            bn.running_mean.mul_(1 - m).add_(mean[t].to(bn.running_mean.dtype), alpha=m)
            bn.running_var.mul_(1 - m).add_(unbiased[t].to(bn.running_var.dtype), alpha=m)
