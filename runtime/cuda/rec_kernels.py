"""CUDA C++ for a recurrent cell (a neuron layer fed back its own spikes through a square Linear), forward
and backward: the CUDA counterpart of ``runtime/cpu_recurrent.py``'s ``rec_fwd``/``rec_bwd``, generated from
the same per-step C statements (``runtime/ir_codegen.py``) and with the same semantics, per step ``t`` and
sample ``n``::

    r_t = b + W s_{t-1}                   (s_{-1}: the previous chunk's spikes SP0, or none: r_0 = b)
    s_t, state_t = neuron(e_t, r_t, state_{t-1})     (the lifted step; ``r_t`` is its parameter ``tap``)

No CuPy here: this module only writes source (CI compile-checks it with ``nvcc`` and runs it on the host
emulator, tests/test_cuda_rec.py); ``rec_scan.py`` launches it.

Work layout. The recurrence couples all ``H`` neurons of a sample from one step to the next and never two
samples, so **one thread block per sample** (grid ``N``), its threads taking neurons ``h = tid, tid +
blockDim, ...`` (any ``blockDim`` that is a multiple of 32: the launcher picks it), the time loop inside the
kernel, one ``__syncthreads`` per step. Which neurons of the sample fired at the previous step is kept in
shared memory as bit words (one ``__ballot_sync`` per warp and 32 neurons, double-buffered by the step's
parity so that writing step t's bits never races with reading step t-1's); the spike values themselves are
read back from the output (``OUT``/``SH`` of step t-1, written by the block's own threads before the
barrier, or ``SP0``).

Spike-driven matmul, exactly as the C loop sums: ``r = b; for j ascending with s_{t-1}[j] != 0: r += s[j] *
W[h, j]`` (one multiply and one add each, ``--fmad=false``), so with IEEE division (``division="true"``)
the spikes, states and ``r`` are bit-identical to ``rec_fwd``'s. Every thread walks the same set bits (a
uniform branch, no divergence), and reads ``W^T`` (``WT``, ``[H_in, H_out]`` row-major: ``WT[j * H + h]``),
so that the threads of a warp read 32 consecutive words of row ``j``: coalesced; ``W`` itself would be a
stride-``H`` gather. Backward's dense product ``g_s += W^T g_r`` reads ``W`` row-major for the same reason
(thread ``h`` reads ``W[hh * H + h]``, consecutive across threads), in the C loop's order (``hh``
ascending, zero ``g_r`` skipped).

Backward (BPTT) keeps only what the C loop keeps (``e``, the initial states and spikes): each block first
recomputes its sample's forward (same code, same bits), writing the recomputed spikes to ``SH``, each
step's ``r`` into ``GR`` (overwritten by ``g_r`` of that step in the reverse sweep, by the thread that read
it, just before) and the states before each step into the global scratch ``SCR`` (allocated by the caller,
see :func:`scratch_elems`); then it walks time backwards through ``ir_codegen.backward_body``. The gradient
reaching ``s_t`` is ``GOUT[t] + W^T g_r(t + 1)``, computed from ``g_r`` of the sample kept in shared memory
(double-buffered by parity). Outputs as ``rec_bwd``: ``GE`` (``g_e``), ``GR`` (``g_r`` per step; may be
the same buffer as ``GE``: ``GR`` is written first), ``SH``, ``GSP0 = W^T g_r(0)`` (when ``SP0`` is given),
``GS0<j>`` (when ``has_st0``) and ``GP<j>`` (each neuron's share of parameter j's gradient); ``W``'s and
``b``'s gradients are torch GEMMs over ``GR`` and ``SH`` (``rec_scan.py``).

CUDA float rules as ``ir_kernels.py``: the IRs are compiled as given, so apply
``ir_kernels.torch_cuda_semantics`` first for torch-CUDA division by a constant (times the reciprocal);
``NVRTC_PRELUDE`` for ``INFINITY``/``NAN`` (no headers under NVRTC); a known surrogate's derivative calls
CUDA's ``expf`` (the C target's vectorizable ``snn_expf`` is host code).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

from snncc.neuron_ir import NeuronIR
from .. import ir_codegen as cg
from ..cpu_recurrent import TAP
from .ir_kernels import NVRTC_PRELUDE

__all__ = ["rec_cuda_source", "rec_kernel_names", "rec_shared_bytes", "scratch_elems", "PREFIX", "TAP",
           "SHARED_DECL", "WARP"]

#: the kernels' name prefix (``<PREFIX>_fwd``, ``<PREFIX>_bwd``)
PREFIX = "snncc_rec"
WARP = 32
#: the one dynamic shared-memory declaration of each kernel (the host emulator substitutes it)
SHARED_DECL = "extern __shared__ double rk_smem[];"
_FLOAT = ("float32", "float64")
_SIZE = {"float32": 4, "float64": 8}

#: bit iteration: CUDA's __ffs on the device, the compiler's builtin in a host build (the emulator)
_FFS = """#ifndef SNNCC_REC_FFS
#if defined(__CUDA_ARCH__)
#define SNNCC_REC_FFS(m) __ffs((int)(m))
#else
#define SNNCC_REC_FFS(m) __builtin_ffs((int)(m))
#endif
#endif
"""


def rec_kernel_names(prefix: str = PREFIX) -> Tuple[str, str]:
    return f"{prefix}_fwd", f"{prefix}_bwd"


def rec_shared_bytes(steady: NeuronIR, H: int) -> Tuple[int, int]:
    """Dynamic shared memory of (forward, backward) for ``H`` neurons: two parity buffers of spike bits
    (``ceil(H / 32)`` words each), and in backward two of ``g_r`` (``H`` values each) before them."""
    words = 2 * 4 * ((H + WARP - 1) // WARP)
    return words, 2 * H * _SIZE[steady.dtype(steady.x)] + words


def scratch_elems(steady: NeuronIR, K: int, N: int, H: int) -> int:
    """Elements (of the state dtype) of backward's global scratch ``SCR``: the states before each step
    ``[K, ns, N, H]`` then the state gradients carried from step to step ``[ns, N, H]`` (0 without states)."""
    return (K + 1) * len(steady.states) * N * H


def _check(first: NeuronIR, steady: NeuronIR, tap: str, full: Tuple[bool, ...]) -> None:
    why = cg.supported_ir(first) or cg.supported_ir(steady)
    if why:
        raise ValueError(f"no CUDA recurrent cell for this neuron: {why}")
    dt = steady.dtype(steady.x)
    dts = {dt, steady.dtype(steady.outputs[0])} | {steady.dtype(s) for s in steady.states}
    if len(dts) != 1 or dt not in _FLOAT:
        raise ValueError("the cell's input, output and states must share one float dtype")
    if first.states:
        raise ValueError("the first step (from the reset state) must not read a state")
    if tap not in steady.params:
        raise ValueError(f"the steady step does not read the tap {tap!r}")
    others = [p for p in steady.params if p != tap]
    if len(full) != len(others) or any(p not in steady.params for p in first.params):
        raise ValueError("full must give one flag per parameter other than the tap, and the first step may "
                         "only read the steady step's parameters")
    for ir in (first, steady):
        if any(ir.surrogates[o.attr("surrogate")].opaque for o in ir.spike_ops):
            raise ValueError("a user surrogate function (its derivative is taken by its own backward)")


def rec_cuda_source(first: NeuronIR, steady: NeuronIR, full: Tuple[bool, ...], tap: str = TAP,
                    prefix: str = PREFIX, header: bool = True) -> str:
    """CUDA C++ with ``extern "C" __global__`` kernels ``<prefix>_fwd`` and ``<prefix>_bwd`` (parameters as
    documented above each; the CPU's ``rec_fwd``/``rec_bwd`` order, ``W`` only where read); ``tap``: the
    IR parameter that is the recurrent drive ``r``; ``full[j]``: the j-th other parameter is per neuron
    ``[N, H]`` (else one scalar). Launch: grid ``N``, a block of a multiple of 32 threads, dynamic shared
    memory :func:`rec_shared_bytes`. Several sources (distinct prefixes) may share one translation unit."""
    _check(first, steady, tap, full)
    others = [p for p in steady.params if p != tap]
    ns, npar = len(steady.states), len(others)
    T = cg.ctype(steady.dtype(steady.x))
    PT = [cg.ctype(steady.dtype(p)) for p in others]
    ind = "          "

    def bind(ir: NeuronIR, r: str, states: Optional[List[str]]) -> List[str]:
        """The step's inputs as the IR names them: x, every parameter (the tap is ``r``), the states."""
        out = [f"{ind}const {T} {ir.x} = E[rk_eo + rk_h]; (void){ir.x};"]
        out += [f"{ind}const {PT[j]} {p} = PAR{j}[{'rk_i' if full[j] else '0'}]; (void){p};"
                for j, p in enumerate(others)]
        out.append(f"{ind}const {T} {tap} = {r}; (void){tap};")
        if states is not None:
            out += [f"{ind}const {T} {s} = {states[j]}; (void){s};" for j, s in enumerate(ir.states)]
        return out

    def fwd_step(ir: NeuronIR, states: Optional[List[str]], store: str, new_state: List[str]) -> str:
        lines = bind(ir, "rk_r", states)
        lines.append(cg.forward_body(ir, ind))
        lines.append(f"{ind}rk_o = {ir.outputs[0]};")
        lines.append(f"{ind}{store}[rk_eo + rk_h] = rk_o;")
        lines += [f"{ind}{new_state[j]} = {v};" for j, v in enumerate(ir.new_states)]
        return "\n".join(lines)

    def bwd_step(ir: NeuronIR, steady_step: bool) -> str:
        lines = bind(ir, "GR[rk_eo + rk_h]", [_hist(j, "rk_t") for j in range(ns)] if steady_step else None)
        lines.append(cg.forward_body(ir, ind))
        fv = cg.float_values(ir)
        lines += [f"{ind}{cg.ctype(ir.dtype(v))} g_{v} = 0;" for v in fv]
        lines.append(f"{ind}g_{ir.outputs[0]} += (GOUT ? GOUT[rk_eo + rk_h] : ({T})0) + rk_grec;")
        for j, v in enumerate(ir.new_states):
            lines.append(f"{ind}g_{v} += {_gst(j)};")
        lines.append(cg.backward_body(ir, ind))
        gx = f"g_{ir.x}" if ir.x in fv else f"({T})0"
        gr = f"g_{tap}" if tap in fv and tap in ir.params else f"({T})0"
        # NOTE: GR before GE: for a user's add they may be one buffer (the first step then keeps g_e)
        lines.append(f"{ind}{{ const {T} rk_gr = {gr}; GR[rk_eo + rk_h] = rk_gr; GE[rk_eo + rk_h] = {gx}; "
                     f"rk_gzc[rk_h] = rk_gr; }}")
        for j in range(ns):
            g = f"g_{ir.states[j]}" if steady_step and j < len(ir.states) else f"({T})0"
            lines.append(f"{ind}{_gst(j)} = {g};")
        for j, p in enumerate(others):
            if p in ir.params and ir.dtype(p) in _FLOAT:
                lines.append(f"{ind}GP{j}[rk_i] += g_{p};")
        return "\n".join(lines)

    def sig(name: str, params: List[str]) -> str:
        return f'extern "C" __global__ void {name}(\n    ' + ",\n    ".join(params) + ") {"

    inputs = [f"const {T}* __restrict__ E"] + [f"const {T}* __restrict__ S0{j}" for j in range(ns)]
    inputs += [f"const {PT[j]}* __restrict__ PAR{j}" for j in range(npar)]
    fwd_params = inputs + [f"const {T}* __restrict__ WT", f"const {T}* __restrict__ B",
                           f"const {T}* __restrict__ SP0", f"{T}* OUT"] + [f"{T}* SN{j}" for j in range(ns)]
    fwd_params += ["long long N", "long long H", "long long K", "int has_st0"]
    # NOTE: no __restrict__ on what the kernels write: GE and GR may be one buffer, and OUT/SH are read
    # back (the previous step's spikes) through another pointer
    bwd_params = inputs + [f"const {T}* __restrict__ WT", f"const {T}* __restrict__ W",
                           f"const {T}* __restrict__ B", f"const {T}* __restrict__ SP0",
                           f"const {T}* __restrict__ GOUT"] + [f"const {T}* __restrict__ GSN{j}" for j in range(ns)]
    bwd_params += [f"{T}* GE", f"{T}* GR", f"{T}* SH", f"{T}* GSP0"] + [f"{T}* GS0{j}" for j in range(ns)]
    bwd_params += [f"{PT[j]}* GP{j}" for j in range(npar)] + [f"{T}* SCR"]
    bwd_params += ["long long N", "long long H", "long long K", "int has_st0"]

    def recurrence(out: str, body_first: str, body_steady: str, keep_r: str = "") -> str:
        """The time loop both kernels run (backward's recompute stores into SH, forward's into OUT;
        ``keep_r``: a statement run after ``r`` is summed)."""
        return f"""  for (long long rk_b = 0; rk_b < H; rk_b += rk_bd) {{   /* the spikes before step 0, as bits */
    const long long rk_h = rk_b + rk_tid;
    const unsigned int rk_word = __ballot_sync(0xffffffffu, SP0 != 0 && rk_h < H && SP0[n * H + rk_h] != ({T})0);
    if (rk_lane == 0 && rk_b + 32 * rk_warp < H) rk_words[NW + ((rk_b + 32 * rk_warp) >> 5)] = rk_word;
  }}
  __syncthreads();
  for (long long rk_t = 0; rk_t < K; ++rk_t) {{
    const unsigned int* rk_wp = rk_words + ((rk_t + 1) & 1) * NW;      /* fired at step t - 1 */
    unsigned int* rk_wc = rk_words + (rk_t & 1) * NW;                   /* fired at step t */
    const {T}* rk_sp = rk_t > 0 ? {out} + ((rk_t - 1) * N + n) * H : (SP0 ? SP0 + n * H : ({T}*)0);
    const long long rk_eo = (rk_t * N + n) * H;
    for (long long rk_b = 0; rk_b < H; rk_b += rk_bd) {{
      const long long rk_h = rk_b + rk_tid;
      {T} rk_o = 0;
      if (rk_h < H) {{
        const long long rk_i = n * H + rk_h; (void)rk_i;
        {T} rk_r = B ? B[rk_h] : ({T})0;          /* r = b + W s_prev over the neurons that fired */
        for (long long rk_q = 0; rk_q < NW; ++rk_q) {{
          unsigned int rk_m = rk_wp[rk_q];
          while (rk_m) {{
            const long long rk_j = (rk_q << 5) + (SNNCC_REC_FFS(rk_m) - 1);
            rk_m &= rk_m - 1u;
            rk_r += rk_sp[rk_j] * WT[rk_j * H + rk_h];
          }}
        }}{keep_r}
        if (rk_t == 0 && !has_st0) {{
{body_first}
        }} else {{
{body_steady}
        }}
      }}
      const unsigned int rk_word = __ballot_sync(0xffffffffu, rk_h < H && rk_o != ({T})0);
      if (rk_lane == 0 && rk_b + 32 * rk_warp < H) rk_wc[(rk_b + 32 * rk_warp) >> 5] = rk_word;
    }}
    __syncthreads();
  }}"""

    sn = [f"SN{j}[rk_i]" for j in range(ns)]
    fwd_states = [f"(rk_t == 0 ? S0{j}[rk_i] : SN{j}[rk_i])" for j in range(ns)]
    fwd_loop = recurrence("OUT", fwd_step(first, None, "OUT", sn), fwd_step(steady, fwd_states, "OUT", sn))
    # backward's recompute: the states before step t live in SCR (step 0's are S0's, copied there)
    nxt = [f"rk_nx{j}" for j in range(ns)]
    save_next = "\n".join(f"{ind}if (rk_t + 1 < K) {_hist(j, 'rk_t + 1')} = rk_nx{j};" for j in range(ns))
    decl_next = " ".join(f"{T} rk_nx{j};" for j in range(ns))
    re_first = f"{ind}{decl_next}\n" + fwd_step(first, None, "SH", nxt) + "\n" + save_next
    copy0 = "\n".join(f"{ind}if (rk_t == 0) {_hist(j, '0')} = S0{j}[rk_i];" for j in range(ns))
    re_steady = f"{ind}{decl_next}\n{copy0}\n" + \
        fwd_step(steady, [_hist(j, "rk_t") for j in range(ns)], "SH", nxt) + "\n" + save_next
    re_loop = recurrence("SH", re_first, re_steady,
                         "\n        GR[rk_eo + rk_h] = rk_r;              /* r, kept for the reverse sweep */")

    fwd_name, bwd_name = rec_kernel_names(prefix)
    head = f"// generated by snncc.runtime.cuda.rec_kernels from a lifted neuron step\n{NVRTC_PRELUDE}{_FFS}" \
        if header else ""
    prologue = f"""  const long long n = blockIdx.x;                 /* one block per sample */
  const long long rk_tid = threadIdx.x, rk_bd = blockDim.x;   /* a multiple of 32 (full warps) */
  const int rk_lane = (int)(rk_tid & 31), rk_warp = (int)(rk_tid >> 5);
  const long long NW = (H + 31) >> 5;             /* bit words per step */
  const long long NS = {ns}; (void)NS;"""
    gst_init = "\n".join(f"    {_gst(j)} = GSN{j} ? GSN{j}[rk_i] : ({T})0;" for j in range(ns))
    gp_init = "\n".join(f"    GP{j}[rk_i] = ({PT[j]})0;" for j in range(npar))
    gs0_out = "\n".join(f"    if (has_st0 && GS0{j}) GS0{j}[rk_i] = {_gst(j)};" for j in range(ns))
    return f"""{head}
/* E, S0[ns], PAR[np], WT, B, SP0, OUT, SN[ns], N, H, K, has_st0; E/OUT [K, N, H]; grid N */
{sig(fwd_name, fwd_params)}
  {SHARED_DECL}
  unsigned int* rk_words = (unsigned int*)rk_smem;   /* [2][NW]: who fired, by step parity */
{prologue}
{fwd_loop}
}}

/* E, S0[ns], PAR[np], WT, W, B, SP0, GOUT, GSN[ns], GE, GR, SH, GSP0, GS0[ns], GP[np], SCR, N, H, K,
   has_st0; SCR: [K, ns, N, H] states before each step, then [ns, N, H] carried state gradients */
{sig(bwd_name, bwd_params)}
  {SHARED_DECL}
  {T}* rk_gz = ({T}*)rk_smem;                        /* [2][H]: g_r of the sample, by step parity */
  unsigned int* rk_words = (unsigned int*)(rk_gz + 2 * H);
{prologue}
{re_loop}
  for (long long rk_b = 0; rk_b < H; rk_b += rk_bd) {{     /* the reverse sweep's per-neuron carries */
    const long long rk_h = rk_b + rk_tid;
    if (rk_h >= H) continue;
    const long long rk_i = n * H + rk_h; (void)rk_i;
{gst_init}
{gp_init}
  }}
  for (long long rk_t = K - 1; rk_t >= 0; --rk_t) {{
    const {T}* rk_gzn = rk_gz + ((rk_t + 1) & 1) * H;     /* g_r of step t + 1 */
    {T}* rk_gzc = rk_gz + (rk_t & 1) * H;                 /* g_r of step t */
    const long long rk_eo = (rk_t * N + n) * H;
    for (long long rk_b = 0; rk_b < H; rk_b += rk_bd) {{
      const long long rk_h = rk_b + rk_tid;
      if (rk_h < H) {{
        const long long rk_i = n * H + rk_h; (void)rk_i;
        {T} rk_grec = 0;                       /* W^T g_r(t + 1): what reaches s_t through r_(t+1) */
        if (rk_t + 1 < K) {{
          for (long long rk_k = 0; rk_k < H; ++rk_k) {{
            const {T} rk_g = rk_gzn[rk_k];
            if (rk_g != ({T})0) rk_grec += rk_g * W[rk_k * H + rk_h];
          }}
        }}
        if (rk_t == 0 && !has_st0) {{
{bwd_step(first, False)}
        }} else {{
{bwd_step(steady, True)}
        }}
      }}
    }}
    __syncthreads();
  }}
  for (long long rk_b = 0; rk_b < H; rk_b += rk_bd) {{
    const long long rk_h = rk_b + rk_tid;
    if (rk_h >= H) continue;
    const long long rk_i = n * H + rk_h; (void)rk_i;
    if (GSP0) {{                  /* the chunk's first step read the previous chunk's spikes */
      {T} rk_acc = 0;
      for (long long rk_k = 0; rk_k < H; ++rk_k) {{
        const {T} rk_g = rk_gz[rk_k];
        if (rk_g != ({T})0) rk_acc += rk_g * W[rk_k * H + rk_h];
      }}
      GSP0[rk_i] = rk_acc;
    }}
{gs0_out}
  }}
}}
"""


def _hist(j: int, t: str) -> str:
    """Backward's scratch: state j before step t of neuron (n, h)."""
    return f"SCR[((({t}) * NS + {j}) * N + n) * H + rk_h]"


def _gst(j: int) -> str:
    """Backward's scratch: the gradient reaching state j from the later steps (neuron (n, h))."""
    return f"SCR[((K * NS + {j}) * N + n) * H + rk_h]"
