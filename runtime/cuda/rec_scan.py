"""The CUDA recurrent cell as an autograd Function, independent of how its kernels are compiled and launched
(a :class:`BlockLauncher`: CuPy's below, the host emulator in the tests). The counterpart of
``runtime.cpu_recurrent``'s ``_RecCell``/``rec_c_scan``: same arguments, same results, same gradients
(``e``, ``W``, ``b``, the previous spikes, the initial states, every parameter).

Why its own launcher protocol: the cell's kernels (``rec_kernels.py``) run one block per sample with a
block-wide barrier per step and dynamic shared memory, which ``scan.Launcher``'s "n threads in blocks of
256" cannot express. The launcher chooses the block size (any multiple of 32 up to its ``max_threads``;
the kernels loop over the sample's neurons), so the emulator runs them in one warp per block, where its
lockstep ballots are a block barrier.

Marshalling as ``ir_scan.py``: raw pointers as ``np.uint64``, ``long long`` as ``np.int64``, ``int`` as
``np.int32`` (CuPy packs by numpy dtype). ``W^T`` is made contiguous per call for the forward's
coalesced spike-driven reads. Kept for backward: ``e``, ``W``, ``b``, a copy of the previous chunk's last
spikes, the initial states and the parameters (as ``_RecCell``); backward allocates the kernel's scratch
(``rec_kernels.scratch_elems``) for its launch only. cupy is imported only inside the CuPy launcher, via
``launch.py`` (snncc's one cupy importer), and only when a cell runs on a GPU.
"""
from __future__ import annotations

import threading
from typing import Any, Dict, Optional, Protocol, Sequence, Tuple

import numpy as np
import torch

from snncc.neuron_ir import NeuronIR
from .. import ir_codegen as cg
from .ir_kernels import DIVISIONS, torch_cuda_semantics
from .rec_kernels import PREFIX, TAP, WARP, rec_cuda_source, rec_shared_bytes, scratch_elems

__all__ = ["BlockLauncher", "CupyBlockLauncher", "rec_cuda_scan", "cuda_supports_rec", "rec_kernel_source",
           "MAX_THREADS"]

#: the largest block the CuPy launcher uses (the kernels loop over neurons beyond it)
MAX_THREADS = 256
_SHARED_PORTABLE = 48 * 1024
_DT = {"float32": torch.float32, "float64": torch.float64}
_NAMES = {v: k for k, v in _DT.items()}
_LOCK = threading.Lock()
_SOURCES: Dict[Any, str] = {}


class BlockLauncher(Protocol):
    """How the cell's source reaches a device. ``module(src)`` compiles it once (cached by the launcher);
    ``launch_blocks(handle, name, grid, block, shared_bytes, *args)`` runs kernel ``name`` over ``grid``
    blocks of ``block`` threads (a multiple of 32; the launcher may lower it, never below 32) with
    ``shared_bytes`` of dynamic shared memory, in stream order with the surrounding torch work;
    ``max_threads``: the largest block it runs; ``max_shared_bytes(device)``: the most dynamic shared
    memory one block may have there."""

    max_threads: int

    def module(self, src: str) -> Any: ...

    def launch_blocks(self, handle: Any, name: str, grid: int, block: int, shared_bytes: int,
                      *args: Any) -> None: ...

    def max_shared_bytes(self, device: torch.device) -> int: ...


class CupyBlockLauncher:
    """:class:`BlockLauncher` on CuPy: modules from ``launch.LAUNCHER`` (NVRTC with ``NVRTC_OPTIONS``, one
    per source and device), launches on torch's current stream, shared memory beyond the portable 48 KiB
    opted into per kernel (``max_dynamic_shared_size_bytes``)."""

    max_threads = MAX_THREADS

    def module(self, src: str) -> Any:
        from . import launch                # imports cupy: only when a cell actually runs on a GPU
        return launch.LAUNCHER.module(src)

    def launch_blocks(self, handle: Any, name: str, grid: int, block: int, shared_bytes: int,
                      *args: Any) -> None:
        from .launch import cupy
        fn = handle.get_function(name)
        # NOTE: the kernels take any block of full warps: fewer threads if the compiled kernel needs so
        # many registers that this block would not launch
        block = max(WARP, min(block, int(fn.max_threads_per_block) // WARP * WARP))
        if shared_bytes > _SHARED_PORTABLE and fn.max_dynamic_shared_size_bytes < shared_bytes:
            fn.max_dynamic_shared_size_bytes = shared_bytes
        stream = cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream)
        with stream:
            fn((grid,), (block,), args, shared_mem=shared_bytes)

    def max_shared_bytes(self, device: torch.device) -> int:
        props = torch.cuda.get_device_properties(device)
        return int(getattr(props, "shared_memory_per_block_optin", _SHARED_PORTABLE))


_CUPY = CupyBlockLauncher()


def _supports(first: NeuronIR, steady: NeuronIR, tap: str) -> Optional[str]:
    """The device-independent checks (``cpu_recurrent.c_supports_rec``'s, without the compiler)."""
    why = cg.supported_ir(first) or cg.supported_ir(steady)
    if why:
        return why
    dts = {steady.dtype(steady.x), steady.dtype(steady.outputs[0])} | {steady.dtype(s) for s in steady.states}
    if len(dts) != 1 or dts.pop() not in _DT:
        return "input, output and states do not share one float dtype"
    if first.states:
        return "the first step reads a state"
    if tap not in steady.params or any(p not in steady.params for p in first.params):
        return "the steps do not read the tap, or the first step reads other parameters"
    if len(steady.outputs) != 1:
        return f"the step has {len(steady.outputs)} outputs"
    for ir in (first, steady):
        if any(ir.surrogates[o.attr("surrogate")].opaque for o in ir.spike_ops):
            return "a user surrogate function (its derivative is taken by its own backward)"
    return None


def cuda_supports_rec(first: NeuronIR, steady: NeuronIR, e: torch.Tensor, tap: str = TAP) -> Optional[str]:
    """None when the CUDA cell can run these steps on ``e``; else why not (the caller falls back)."""
    if e.device.type != "cuda":
        return "the input is not a CUDA tensor"
    from . import available
    if not available():
        return "CuPy is not installed (or SNNCC_BACKEND=reference)"
    return _supports(first, steady, tap)


def rec_kernel_source(first: NeuronIR, steady: NeuronIR, full: Tuple[bool, ...], tap: str) -> str:
    """The CUDA source the cell compiles for these steps (memoized: one str object per variant, which the
    launchers key their compiled modules by)."""
    key = (first, steady, full, tap)
    with _LOCK:
        src = _SOURCES.get(key)
        if src is None:
            src = _SOURCES[key] = rec_cuda_source(first, steady, full, tap, prefix=PREFIX)
    return src


def _ptr(t: Optional[torch.Tensor]) -> np.uint64:
    return np.uint64(0 if t is None else t.data_ptr())


def _block(launcher: BlockLauncher, H: int) -> int:
    """Full warps covering the sample's neurons, at most the launcher's largest block."""
    return max(WARP, min(int(launcher.max_threads) // WARP * WARP, (H + WARP - 1) // WARP * WARP))


def _launch(launcher: BlockLauncher, src: str, which: str, N: int, H: int, shared: int, *args: Any) -> None:
    if N > 0:                   # a grid of 0 blocks is an invalid launch on CUDA (an empty batch: no work)
        launcher.launch_blocks(launcher.module(src), f"{PREFIX}_{which}", N, _block(launcher, H), shared, *args)


def _reads_tap_at_0(first: NeuronIR, steady: NeuronIR, tap: str, has_st0: bool) -> bool:
    """Whether step 0's neuron reads ``r_0`` (so ``GR[0]`` is its gradient, and ``r_0 = b + W s_{-1}``
    contributes to ``b``'s and ``W``'s): the steady step does; the first step from the reset state does for
    a module's own step (snnTorch's RLeaky: ``r_0 = b``), not for a user's add, whose first step has no
    recurrent term (and whose ``GR`` is then ``GE``'s buffer: ``GR[0]`` holds ``g_e[0]``)."""
    return tap in (steady if has_st0 else first).params


class _CudaRecCell(torch.autograd.Function):
    """The cell over K steps on the generated CUDA kernels. Inputs as ``cpu_recurrent._RecCell``: e
    ``[K, N, H]``, W ``[H, H]``, b ``[H]`` or None, previous spikes ``[N, H]`` or None, states ``[N, H]``
    (none: from the reset state), the neuron's other parameters."""

    @staticmethod
    def forward(ctx: Any, launcher: BlockLauncher, first: NeuronIR, steady: NeuronIR, tap: str, ns: int,
                has_st0: bool, e: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor],
                sp0: Optional[torch.Tensor], *rest: torch.Tensor):
        K, N, H = e.shape
        st0 = [s.detach().contiguous() for s in rest[:ns]] if has_st0 else []
        params = rest[ns:] if has_st0 else rest
        full = tuple(p.numel() > 1 for p in params)
        pars = [(p.detach().expand(N, H).contiguous() if f else p.detach().reshape(1).contiguous())
                for p, f in zip(params, full)]
        e, w = e.detach().contiguous(), w.detach().contiguous()
        wt = w.t().contiguous()
        b = None if b is None else b.detach().contiguous()
        # NOTE: the previous chunk's last step is a view of that chunk's whole output: keep a copy of
        # the one step, not the chunk, for backward
        sp0 = None if sp0 is None else sp0.detach().clone(memory_format=torch.contiguous_format)
        out = torch.empty_like(e)
        sn = [torch.empty(N, H, dtype=e.dtype, device=e.device) for _ in range(ns)]
        src = rec_kernel_source(first, steady, full, tap)
        fwd_shared, _ = rec_shared_bytes(steady, H)
        _launch(launcher, src, "fwd", N, H, fwd_shared, _ptr(e), *[_ptr(s) for s in (st0 or [None] * ns)],
                *[_ptr(p) for p in pars], _ptr(wt), _ptr(b), _ptr(sp0), _ptr(out), *[_ptr(s) for s in sn],
                np.int64(N), np.int64(H), np.int64(K), np.int32(has_st0))
        ctx.launcher = launcher
        ctx.meta = (first, steady, tap, ns, has_st0, full, b is not None, sp0 is not None)
        ctx.param_shapes = [p.shape for p in params]
        ctx.save_for_backward(e, w, b, sp0, *st0, *pars)
        return (out,) + tuple(sn)

    @staticmethod
    def backward(ctx: Any, g_out: Optional[torch.Tensor], *g_sn: Optional[torch.Tensor]):
        first, steady, tap, ns, has_st0, full, has_b, has_sp = ctx.meta
        e, w, b, sp0, *rest = ctx.saved_tensors
        st0, pars = rest[:len(rest) - len(full)], rest[len(rest) - len(full):]
        K, N, H = e.shape
        dev = e.device
        g_out = None if g_out is None else g_out.contiguous()          # none: a zero gradient (kernel)
        gsn = [None if g is None else g.contiguous() for g in g_sn]
        ge, sh = torch.empty_like(e), torch.empty_like(e)
        # NOTE: for a user's add (the tap form of with_tap) the gradients of e and r are the same values:
        # one buffer (the kernel writes both, GR first)
        gr = ge if tap == TAP else torch.empty_like(e)
        gsp = torch.empty(N, H, dtype=e.dtype, device=dev) if has_sp else None
        gs0 = [torch.empty(N, H, dtype=e.dtype, device=dev) for _ in range(ns)] if has_st0 else [None] * ns
        gp = [torch.empty(N, H, dtype=p.dtype, device=dev) for p in pars]
        wt = w.t().contiguous()
        n_scr = scratch_elems(steady, K, N, H)
        scratch = torch.empty(n_scr, dtype=e.dtype, device=dev) if n_scr else None
        src = rec_kernel_source(first, steady, full, tap)
        _, bwd_shared = rec_shared_bytes(steady, H)
        _launch(ctx.launcher, src, "bwd", N, H, bwd_shared, _ptr(e), *[_ptr(s) for s in (list(st0) or [None] * ns)],
                *[_ptr(p) for p in pars], _ptr(wt), _ptr(w), _ptr(b), _ptr(sp0), _ptr(g_out),
                *[_ptr(g) for g in gsn], _ptr(ge), _ptr(gr), _ptr(sh), _ptr(gsp), *[_ptr(g) for g in gs0],
                *[_ptr(g) for g in gp], _ptr(scratch), np.int64(N), np.int64(H), np.int64(K), np.int32(has_st0))
        del scratch
        if N == 0:
            for t in [ge, gr, sh] + gp:
                t.zero_()
        # W and b: r_t = b + W s_{t-1} at every step whose neuron reads r_t (s_{-1}: the previous chunk's
        # spikes, or none), as one GEMM over [steps * N, H]
        g0 = _reads_tap_at_0(first, steady, tap, has_st0)
        if has_sp and g0:
            gw = gr.reshape(-1, H).t() @ torch.cat([sp0.unsqueeze(0), sh[:-1]]).reshape(-1, H)
        else:
            gw = gr[1:].reshape(-1, H).t() @ sh[:-1].reshape(-1, H)
        gb = (gr if g0 else gr[1:]).sum((0, 1)) if has_b else None
        g_params = [g.sum_to_size(shape) if len(shape) else g.sum() for g, shape in zip(gp, ctx.param_shapes)]
        g_states = tuple(gs0) if has_st0 else ()
        return (None, None, None, None, None, None, ge, gw, gb, gsp) + g_states + tuple(g_params)


def rec_cuda_scan(first: NeuronIR, steady: NeuronIR, tap: str, e: torch.Tensor, w: torch.Tensor,
                  b: Optional[torch.Tensor], sp0: Optional[torch.Tensor], state: Optional[Sequence[torch.Tensor]],
                  params: Sequence[torch.Tensor], *, launcher: Optional[BlockLauncher] = None,
                  division: str = "reciprocal") -> Optional[Tuple[torch.Tensor, Tuple[torch.Tensor, ...]]]:
    """The cell over ``e``'s K steps with the generated CUDA kernels: ``(spikes [K, N, H], final states)``,
    as ``cpu_recurrent.rec_c_scan`` (same arguments); None when the tensors do not fit (devices, dtypes,
    shapes, the shared memory a very wide layer's backward needs) and the caller runs the reference loop.
    ``params``: the IR's parameters other than ``tap``, in order.

    ``launcher``: where the kernels run; None is CuPy's (imported only then, with ``e``'s device current),
    the tests pass the host emulator. ``division``: ``"reciprocal"`` divides by constants as torch's CUDA
    kernels do (``ir_kernels.torch_cuda_semantics``: eager's bits on the device), ``"true"`` as its CPU
    kernels (the C cell's bits)."""
    if division not in DIVISIONS:
        raise ValueError(f"division must be one of {DIVISIONS}, not {division!r}")
    if launcher is None:
        if e.device.type != "cuda":
            return None
        with torch.cuda.device(e.device):
            return rec_cuda_scan(first, steady, tap, e, w, b, sp0, state, params, launcher=_CUPY,
                                 division=division)
    if _supports(first, steady, tap) is not None or e.dim() != 3 or e.shape[0] == 0:
        return None
    if _NAMES.get(e.dtype) != steady.dtype(steady.x):
        return None
    K, N, H = e.shape
    ts = [w] + ([b] if b is not None else []) + ([sp0] if sp0 is not None else []) + list(state or ())
    if any(t.device != e.device or t.dtype != e.dtype for t in ts):
        return None
    if w.shape != (H, H) or (b is not None and b.shape != (H,)) or (sp0 is not None and sp0.shape != (N, H)):
        return None
    others = [q for q in steady.params if q != tap]
    if len(params) != len(others):
        return None
    for p, name in zip(params, others):
        if p.device != e.device or _NAMES.get(p.dtype) != steady.dtype(name):
            return None
        if p.numel() > 1 and not _broadcasts(tuple(p.shape), (N, H)):
            return None
    ns = len(steady.states)
    # NOTE: as the C cell: None is the reset state; a tuple (even empty, a stateless neuron) is a later chunk
    state = None if state is None else tuple(state)
    if state is not None and (len(state) != ns or any(s.shape != (N, H) for s in state)):
        return None
    if rec_shared_bytes(steady, H)[1] > launcher.max_shared_bytes(e.device):
        return None
    if division == "reciprocal":
        first, steady = torch_cuda_semantics(first), torch_cuda_semantics(steady)
    has_st0 = state is not None
    res = _CudaRecCell.apply(launcher, first, steady, tap, ns, has_st0, e, w, b, sp0,
                             *(state if has_st0 else ()), *params)
    return res[0], tuple(res[1:])


def _broadcasts(shape: Tuple[int, ...], to: Tuple[int, ...]) -> bool:
    if len(shape) > len(to):
        return False
    return all(a in (1, b) for a, b in zip(reversed(shape), reversed(to)))
