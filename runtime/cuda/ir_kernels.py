"""CUDA C++ for the scan of any lifted neuron (:class:`~snncc.neuron_ir.NeuronIR`), forward and backward.

The CUDA counterpart of ``runtime/cpu_ir.py``'s ``ir_fwd``/``ir_bwd``, generated from the same per-step C
statements (``runtime/ir_codegen.py``: target-neutral C, libm names that CUDA device code has too). No CuPy
here: this module only writes source, so CI compile-checks it with ``nvcc`` and runs it on the host emulator
(tests/cuda_emu); ``launch.py`` compiles it with NVRTC (``kernels.NVRTC_OPTIONS``: ``--fmad=false``, so a
multiply followed by an add rounds twice, as torch's separate ops do).

Work layout: one thread per neuron, time inside the thread, the neuron's states and parameters in
registers. Step 0 from the reset state runs the module's own first step (``Lifted.first``), every other
step ``Lifted.steady``. Arrays (``M`` neurons per step, step ``t`` of a per-step array at ``t * M``):

* ``X``: the input, step t at ``X + t * xts`` (``xts = 0``: the same input at every step);
* ``S0<j>``: the initial states ``[M]`` (read only when ``has_st0``; else the first step creates them);
* ``PAR<j>``: the parameters, per neuron ``[M]`` or one scalar ``[1]`` (``full[j]``, baked into the source);
* forward writes ``OUT [K, M]``, the final states ``SN<j> [M]`` and, where non-null, ``Z<k> [K, M]``: the
  input of spike op k at every step (only user surrogates need it: their derivative is taken by their own
  backward, over all steps at once, before ``ir_bwd`` runs);
* backward reads ``GOUT [K, M]`` and ``GSN<j> [M]`` (null: a zero gradient) and ``D<k> [K, M]`` (the user
  surrogates' derivatives), and writes ``GX`` (``[K, M]``, or ``[M]`` summed over steps when ``xts = 0``),
  ``GS0<j> [M]`` (when ``has_st0``) and ``GP<j> [M]``: each neuron's share of parameter j's gradient (the
  caller sums them to the parameter's shape).

Backward recomputes the forward (only the input and the initial states are kept, as on the CPU). A thread
cannot keep K steps of states in registers or local memory, so it stores the states before each step in
``H``, a global scratch buffer ``[K, ns, M]`` (element ``(t * ns + j) * M + i``: consecutive threads touch
consecutive addresses) of :func:`scratch_dtype`, **allocated by the caller** for the duration of the
backward launch (its step-0 slot is unused when the scan starts from the reset state; null when the neuron
has no states), then walks time backwards through ``ir_codegen.backward_body``.

NVRTC compiles without any include path: no ``<math.h>``, hence no ``INFINITY``/``NAN`` macros (defined
below from their bit patterns when absent) and no ``M_PI`` (``ir_codegen`` writes the number); the math
functions and ``isnan(float)``/``isnan(double)`` are NVRTC built-ins.

Division by a constant: torch's CUDA ``div`` computes ``a / c`` for a Python-number ``c`` as
``a * (1 / c)`` (``div_true_kernel_cuda``: a CPU-scalar divisor becomes a multiplication by its reciprocal,
in the op's math type), while its CPU kernel divides. :func:`torch_cuda_semantics` rewrites the IR that way,
so a CUDA scan gives the bits eager gives on the same device; ``division="true"`` keeps IEEE division
(the CPU's bits). The two agree whenever ``c`` is a power of two (SpikingJelly's default ``tau = 2``).
"""
from __future__ import annotations

import dataclasses
from functools import lru_cache
from typing import Callable, List, Optional, Tuple

import numpy as np

from snncc.neuron_ir import NeuronIR, Op
from .. import ir_codegen as cg

__all__ = ["ir_cuda_source", "ir_kernel_names", "scratch_dtype", "torch_cuda_semantics", "NVRTC_PRELUDE",
           "DIVISIONS"]

_FLOAT = ("float32", "float64")
#: how a division by a constant is computed: as torch does on CUDA (``reciprocal``) or IEEE (``true``)
DIVISIONS = ("reciprocal", "true")

#: What NVRTC lacks without host headers. ``__int_as_float`` is a device built-in; the guards keep nvcc's
#: (and the host emulator's) math.h definitions where those exist.
NVRTC_PRELUDE = """#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif
#ifndef NAN
#define NAN __int_as_float(0x7fc00000)
#endif
"""


def ir_kernel_names(prefix: str) -> Tuple[str, str]:
    return f"{prefix}_fwd", f"{prefix}_bwd"


def scratch_dtype(steady: NeuronIR) -> Optional[str]:
    """The dtype of the backward's state scratch ``H``: the widest state dtype (every state converts to it
    and back exactly: bool and float32 to float32 or float64); None without states."""
    dts = [steady.dtype(s) for s in steady.states]
    for d in ("float64", "float32", "bool"):
        if d in dts:
            return d
    return None


@lru_cache(maxsize=None)
def torch_cuda_semantics(ir: NeuronIR) -> NeuronIR:
    """``ir`` with every ``div(a, c)`` by a constant ``c`` as ``mul(a, 1 / c)``, the reciprocal rounded in
    the op's computation dtype: what torch's CUDA kernels compute (forward, and backward: ``grad / c`` is
    ``grad * (1 / c)`` there too). Other ops are unchanged."""
    ops: List[Op] = []
    changed = False
    for o in ir.ops:
        if o.op == "div" and len(o.args) == 2 and isinstance(o.args[0], str) and \
                isinstance(o.args[1], (int, float)) and not isinstance(o.args[1], bool) and o.cdtype in _FLOAT:
            np_t = np.float32 if o.cdtype == "float32" else np.float64
            with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
                inv = float(np_t(1.0) / np_t(o.args[1]))
            ops.append(dataclasses.replace(o, op="mul", args=(o.args[0], inv)))
            changed = True
        else:
            ops.append(o)
    return dataclasses.replace(ir, ops=tuple(ops)) if changed else ir


def _zt(ir: NeuronIR, k: int, xt: str) -> str:
    """C type of spike op k's input (a constant input: x's type)."""
    z = ir.spike_ops[k].args[0]
    return cg.ctype(ir.dtype(z)) if isinstance(z, str) else xt


def _opaque(ir: NeuronIR, k: int) -> bool:
    return ir.surrogates[ir.spike_ops[k].attr("surrogate")].opaque


def ir_cuda_source(first: NeuronIR, steady: NeuronIR, full: Tuple[bool, ...], prefix: str = "snncc_ir",
                   header: bool = True) -> str:
    """CUDA C++ with ``extern "C" __global__`` kernels ``<prefix>_fwd`` and ``<prefix>_bwd`` for these steps
    (parameters in the order documented in the module docstring and above each kernel); ``full[j]``:
    parameter j is per neuron (else one scalar). Several sources (distinct prefixes) may share one
    translation unit. The IRs are used as given: apply :func:`torch_cuda_semantics` first for torch-CUDA
    division."""
    why = cg.supported_ir(first) or cg.supported_ir(steady)
    if why:
        raise ValueError(f"no CUDA scan for this neuron: {why}")
    if len(full) != len(steady.params) or first.params != steady.params:
        raise ValueError("full must give one flag per parameter, and both steps take the same parameters")
    ns, npar, nsp = len(steady.states), len(steady.params), len(steady.spike_ops)
    XT = cg.ctype(steady.dtype(steady.x))
    ST = [cg.ctype(steady.dtype(s)) for s in steady.states]
    PT = [cg.ctype(steady.dtype(p)) for p in steady.params]
    OT = cg.ctype(steady.dtype(steady.outputs[0]))
    ZT = [_zt(steady, k, XT) for k in range(nsp)]
    hdt = scratch_dtype(steady)
    HT = cg.ctype(hdt) if hdt else XT
    ind = "      "

    def load_params() -> str:
        return "\n".join(f"  const {PT[j]} {p} = PAR{j}[{'i' if full[j] else '0'}]; (void){p};"
                         for j, p in enumerate(steady.params))

    def bind_states(ir: NeuronIR, src: Callable[[int], str]) -> List[str]:
        return [f"{ind}const {ST[j]} {s} = {src(j)}; (void){s};" for j, s in enumerate(ir.states)]

    def fwd_step(ir: NeuronIR, states_src: Optional[Callable[[int], str]], store: bool) -> str:
        lines = [f"{ind}const {XT} {ir.x} = X[t * xts + i]; (void){ir.x};"]
        if states_src:
            lines += bind_states(ir, states_src)
        lines.append(cg.forward_body(ir, ind))
        if store:
            lines.append(f"{ind}OUT[toff] = ({OT}){ir.outputs[0]};")
            for k, o in enumerate(ir.spike_ops):
                if _opaque(ir, k):
                    lines.append(f"{ind}if (Z{k}) Z{k}[toff] = ({ZT[k]}){o.args[0]};")
        lines += [f"{ind}st{j} = ({ST[j]}){v};" for j, v in enumerate(ir.new_states)]
        return "\n".join(lines)

    def bwd_step(ir: NeuronIR, steady_step: bool) -> str:
        lines = [f"{ind}const {XT} {ir.x} = X[t * xts + i]; (void){ir.x};"]
        if steady_step:
            lines += bind_states(ir, lambda j: f"({ST[j]})H[(t * NS + {j}) * M + i]")
        lines.append(cg.forward_body(ir, ind))
        lines += [f"{ind}{cg.ctype(ir.dtype(v))} g_{v} = 0;" for v in cg.float_values(ir)]
        o = ir.outputs[0]
        if ir.dtype(o) in _FLOAT:
            lines.append(f"{ind}if (GOUT) g_{o} += ({cg.ctype(ir.dtype(o))})GOUT[toff];")
        for j, v in enumerate(ir.new_states):
            if ir.dtype(v) in _FLOAT:
                lines.append(f"{ind}g_{v} += ({cg.ctype(ir.dtype(v))})gs{j};")
        for k in range(len(ir.spike_ops)):
            if _opaque(ir, k):
                lines.append(f"{ind}const {_zt(ir, k, XT)} DSUR{k} = D{k}[toff];")
        lines.append(cg.backward_body(ir, ind))
        gx = f"g_{ir.x}" if ir.dtype(ir.x) in _FLOAT else "0"
        lines.append(f"{ind}if (xts) GX[toff] = ({XT}){gx}; else gxacc += ({XT}){gx};")
        if steady_step:
            for j, s in enumerate(ir.states):
                lines.append(f"{ind}gs{j} = " + (f"({ST[j]})g_{s};" if ir.dtype(s) in _FLOAT else "0;"))
        else:
            lines += [f"{ind}gs{j} = 0;" for j in range(ns)]
        for j, p in enumerate(ir.params):
            if ir.dtype(p) in _FLOAT:
                lines.append(f"{ind}gp{j} += ({PT[j]})g_{p};")
        return "\n".join(lines)

    p = prefix
    fwd_params = [f"const {XT}* __restrict__ X", "long long xts"]
    fwd_params += [f"const {ST[j]}* __restrict__ S0{j}" for j in range(ns)]
    fwd_params += [f"const {PT[j]}* __restrict__ PAR{j}" for j in range(npar)]
    fwd_params += [f"{OT}* __restrict__ OUT"]
    fwd_params += [f"{ST[j]}* __restrict__ SN{j}" for j in range(ns)]
    fwd_params += [f"{ZT[k]}* __restrict__ Z{k}" for k in range(nsp)]
    fwd_params += ["long long K", "long long M", "int has_st0"]

    bwd_params = [f"const {XT}* __restrict__ X", "long long xts"]
    bwd_params += [f"const {ST[j]}* __restrict__ S0{j}" for j in range(ns)]
    bwd_params += [f"const {PT[j]}* __restrict__ PAR{j}" for j in range(npar)]
    bwd_params += [f"const {OT}* __restrict__ GOUT"]
    bwd_params += [f"const {ST[j]}* __restrict__ GSN{j}" for j in range(ns)]
    bwd_params += [f"const {ZT[k]}* __restrict__ D{k}" for k in range(nsp)]
    bwd_params += [f"{XT}* __restrict__ GX"]
    bwd_params += [f"{ST[j]}* __restrict__ GS0{j}" for j in range(ns)]
    bwd_params += [f"{PT[j]}* __restrict__ GP{j}" for j in range(npar)]
    bwd_params += [f"{HT}* __restrict__ H", "long long K", "long long M", "int has_st0"]

    def sig(name: str, params: List[str]) -> str:
        return f'extern "C" __global__ void {name}(\n    ' + ",\n    ".join(params) + ") {"

    init_states = "\n".join(f"  {ST[j]} st{j} = has_st0 ? S0{j}[i] : ({ST[j]})0;" for j in range(ns))
    save_states = "\n".join(f"{ind}H[(t * NS + {j}) * M + i] = ({HT})st{j};" for j in range(ns))
    head = f"// generated by snncc.runtime.cuda.ir_kernels from a lifted neuron step\n{NVRTC_PRELUDE}" \
        if header else ""
    fwd_name, bwd_name = ir_kernel_names(p)
    return f"""{head}
/* X, xts, S0[ns], PAR[np], OUT, SN[ns], Z[nsp], K, M, has_st0 */
{sig(fwd_name, fwd_params)}
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= M) return;
{load_params()}
{init_states}
  long long t = 0;
  if (!has_st0 && K > 0) {{                /* step 0 from the reset state: the module's own first step */
    const long long toff = i; (void)toff;
    {{
{fwd_step(first, None, True)}
    }}
    t = 1;
  }}
  for (; t < K; ++t) {{
    const long long toff = t * M + i; (void)toff;
    {{
{fwd_step(steady, lambda j: f"st{j}", True)}
    }}
  }}
  {" ".join(f"SN{j}[i] = st{j};" for j in range(ns))}
}}

/* X, xts, S0[ns], PAR[np], GOUT, GSN[ns], D[nsp], GX, GS0[ns], GP[np], H (scratch [K, ns, M]), K, M, has_st0 */
{sig(bwd_name, bwd_params)}
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= M) return;
  const long long NS = {ns}; (void)NS;
{load_params()}
{init_states}
  const long long t0 = (!has_st0 && K > 0) ? 1 : 0;
  long long t = 0;
  if (t0) {{                               /* recompute the forward, keeping the states before each step */
    {{
{fwd_step(first, None, False)}
    }}
    t = 1;
  }}
  for (; t < K; ++t) {{
{save_states}
    {{
{fwd_step(steady, lambda j: f"st{j}", False)}
    }}
  }}
{chr(10).join(f"  {ST[j]} gs{j} = GSN{j} ? GSN{j}[i] : ({ST[j]})0;" for j in range(ns))}
  {XT} gxacc = 0;
{chr(10).join(f"  {PT[j]} gp{j} = 0;" for j in range(npar))}
  for (t = K - 1; t >= t0; --t) {{          /* the reverse sweep */
    const long long toff = t * M + i; (void)toff;
    {{
{bwd_step(steady, True)}
    }}
  }}
  if (t0) {{
    t = 0;
    const long long toff = i; (void)toff;
    {{
{bwd_step(first, False)}
    }}
  }}
  if (!xts) GX[i] = gxacc;
  {" ".join(f"GP{j}[i] = gp{j};" for j in range(npar))}
  if (has_st0) {{ {" ".join(f"GS0{j}[i] = gs{j};" for j in range(ns))} }}
}}
"""
