"""Convolutions and linear layers that keep their spike input for backward as bits (1 per element).

A conv/linear needs its input only for the weight gradient. When that input is spikes (0/1), keeping it as
floats costs 32x what it carries: these autograd Functions run the op forward, keep the input packed
(``ctx.save_for_backward``, so saved-tensor hooks see it) and unpack it in backward for
``aten.convolution_backward`` / the matmuls. Packing checks every value; if one is not 0 or 1 the dense
input is kept instead, so the result is exact either way.
"""
from __future__ import annotations

import os
import threading
import time
import weakref
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from . import buffers

__all__ = ["pack_spikes", "unpack_spikes", "packed_conv", "packed_linear"]

def _bit_weights(device: torch.device) -> torch.Tensor:
    return torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=device)


def _dense(x: torch.Tensor) -> bool:
    return x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))


def _c_bits(x: torch.Tensor) -> bool:
    from . import cpu
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and cpu.compiler_available()


def pack_spikes(x: torch.Tensor) -> Optional[torch.Tensor]:
    """``x``'s values in memory order, 8 per byte; None when ``x`` is not all 0/1 or not dense."""
    return pack_count(x)[0]


def pack_count(x: torch.Tensor) -> Tuple[Optional[torch.Tensor], int]:
    """(``pack_spikes(x)``, number of ones); (None, -1) when ``x`` is not all 0/1 or not dense."""
    if not _dense(x):
        return None, -1
    if _c_bits(x):                    # one pass: pack, check and count together
        from . import cpu
        out = torch.empty((x.numel() + 7) // 8, dtype=torch.uint8)
        ones = cpu.bits_library(x.dtype).pack_check(x.data_ptr(), x.numel(), out.data_ptr(),
                                                     torch.get_num_threads())
        return (out, int(ones)) if ones >= 0 else (None, -1)
    if x.device.type != "cpu":
        return _pack_torch(x, check_on_device=True), -1
    bits = _pack_torch(x)
    return (bits, int(x.sum().item())) if bits is not None else (None, -1)


def _pack_torch(x: torch.Tensor, check_on_device: bool = False) -> Optional[torch.Tensor]:
    """Bits of ``x`` in memory order. The values are checked to be 0/1: on the host (None if not), or with
    ``check_on_device`` by an asynchronous device assert.

    NOTE: on a GPU a host-side check would synchronize the stream once per packed layer (the host waits for
    the GPU to catch up, killing the asynchronous launch pipeline and making CUDA-graph capture impossible);
    ``insert_bitpack`` proves the values are spikes, so the device assert only guards that proof, and a
    failure is loud (a CUDA error naming snncc), never a silently wrong gradient.
    """
    flat = x.permute(0, 2, 3, 1).reshape(-1) if not x.is_contiguous() else x.reshape(-1)
    binary = ((flat == 0) | (flat == 1)).all()
    if check_on_device:
        torch._assert_async(binary, "snncc: a convolution's input marked as spikes holds a value other than "
                                    "0 or 1 (bit-packing); please report it, and compile with bitpack=False")
    elif not bool(binary):     # a value other than 0 or 1: keep the dense input
        return None
    b = flat.to(torch.uint8)
    n = b.numel()
    pad = (-n) % 8
    if pad:
        b = torch.cat([b, b.new_zeros(pad)])
    return (b.view(-1, 8) * _bit_weights(x.device)).sum(1, dtype=torch.uint8)


def unpack_spikes(bits: torch.Tensor, shape: Tuple[int, ...], stride: Tuple[int, ...],
                  dtype: torch.dtype) -> torch.Tensor:
    """The tensor ``pack_spikes`` packed, with its shape, strides and dtype."""
    n = 1
    for s in shape:
        n *= s
    # NOTE: pooled on CPU: a fresh 4 MiB tensor per conv backward was page-faulted in every training step
    out = buffers.empty_strided(shape, stride, dtype, bits.device)
    if _c_bits(out):
        from . import cpu
        cpu.bits_library(dtype).unpack(bits.data_ptr(), n, out.data_ptr(), torch.get_num_threads())
        return out
    vals = bits.unsqueeze(1).bitwise_and(_bit_weights(bits.device)).ne(0).view(-1)[:n]
    if out.is_contiguous():
        out.view(-1).copy_(vals)
    else:       # channels-last: memory order is N, H, W, C
        out.permute(0, 2, 3, 1).copy_(vals.view(shape[0], shape[2], shape[3], shape[1]))
    return out


#: spike inputs denser than this (fraction of ones) never use the spike-driven kernels on CPU; below it,
#: the measured cost of both paths decides (``_SparseChoice``).
SPARSE_DENSITY = float(os.environ.get("SNNCC_SPARSE_DENSITY", "0.15"))


#: the pattern table of a conv is 4x its weights (16 patterns per 4 input channels); it is rebuilt after every
#: weight update, so the table path is only offered below this size (a 128 -> 128 3x3 conv: 2.4 MB)
TABLE_MAX_BYTES = 16 << 20


class _SparseChoice:
    """Dense, spike-driven or table lookup, by measurement: per layer geometry, the eligible calls after the
    first (which warms the paths: the C kernels are compiled on first use) time each available path, ``rounds``
    times, and from then on the cheapest runs: the dense and table paths at their fastest measured time,
    the spike-driven one at ``ones x its fastest measured time per spike``.

    NOTE: a fixed density threshold was wrong by a wide margin for small channel counts: at 10% firing,
    16 -> 32 channels, 3x3 on 16x16 the spike-driven conv took 6 ms where oneDNN's dense one took 2.5 ms
    (SEW-ResNet, 2-core CPU), and its win at large Cout is as real. The result is the same either way to
    float32 rounding (summation order); ``SNNCC_SPARSE=always|table|never`` pins the choice (``always``:
    the spike-driven path wherever it is offered).
    """

    #: timed calls per geometry before the choice is made; each path's fastest time counts.
    #: NOTE: one timing per path misjudged on a busy 2-core VM (oneDNN's 3.5 ms conv once read as slower
    #: than the 4.2 ms table path, and that layer ran the slower path for the rest of training)
    rounds = 3

    def __init__(self, clock: Any = time.perf_counter) -> None:
        self.clock = clock
        self.seen: Dict[Tuple[Any, ...], int] = {}
        #: key -> {path: measured ms ("sparse": ms per spike)}
        self.cost: Dict[Tuple[Any, ...], Dict[str, float]] = {}
        #: key -> the fastest times so far, while the geometry is being measured
        self.timing: Dict[Tuple[Any, ...], Dict[str, float]] = {}
        self.last_path = "dense"

    @property
    def last_sparse(self) -> bool:
        """Whether the last call ran a path computed from the bits (spike-driven or table)."""
        return self.last_path != "dense"

    def run(self, key: Tuple[Any, ...], ones: int, dense: Any, sparse: Any = None, table: Any = None) -> torch.Tensor:
        """The result of the path chosen for ``key`` among those given (``sparse``/``table`` None: not
        offered); ``self.last_path`` names it (a recomputation in backward must take the same path to be
        bit-identical)."""
        y, self.last_path = self._run(key, ones, {"dense": dense, "sparse": sparse, "table": table})
        return y

    def _run(self, key: Tuple[Any, ...], ones: int, paths: Dict[str, Any]) -> Tuple[torch.Tensor, str]:
        offered = {k: f for k, f in paths.items() if f is not None}
        pinned = {"always": "sparse", "table": "table", "never": "dense"}.get(os.environ.get("SNNCC_SPARSE", "auto"))
        if pinned in offered:
            return offered[pinned](), pinned
        hit = self.cost.get(key)
        if hit is not None:
            est = {k: hit[k] * (max(ones, 1) if k == "sparse" else 1) for k in offered if k in hit}
            best = min(est, key=est.__getitem__) if est else "dense"
            return offered[best](), best
        n = self.seen[key] = self.seen.get(key, 0) + 1
        if n == 1:                        # warm every path; the dense result is returned
            for k, f in offered.items():
                if k != "dense":
                    f()
            return offered["dense"](), "dense"
        costs = self.timing.setdefault(key, {})
        y = None
        for k, f in offered.items():      # dense first: its result is returned
            t0 = self.clock()
            out = f()
            t = (self.clock() - t0) / (max(ones, 1) if k == "sparse" else 1)
            costs[k] = min(t, costs.get(k, t))
            y = out if k == "dense" else y
        if n > self.rounds:
            if len(self.cost) > 4096:     # many geometries (varying batch sizes): start over
                self.cost.clear()
            self.cost[key] = self.timing.pop(key)
        return y, "dense"


_CHOICE = _SparseChoice()
#: what the last packed conv/linear forward ran on this thread: (its input's bits or None, the path taken)
_LAST = threading.local()


def _sparse_ok(x: torch.Tensor, weight: torch.Tensor, dilation: Tuple[int, ...], groups: int,
               padding: Any) -> bool:
    """The domain of the kernels computing a conv from its input's bits (spike-driven, table): CPU float32
    2-d conv, channels-last input, Cin % 8 == 0, Cout % 8 == 0."""
    return (x.dim() == 4 and x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and groups == 1 and tuple(dilation) == (1, 1) and not isinstance(padding, str)
            and x.shape[1] % 8 == 0 and weight.shape[0] % 8 == 0
            and x.is_contiguous(memory_format=torch.channels_last) and _c_bits(x))


def _sparse_conv2d(bits: torch.Tensor, shape: Tuple[int, ...], weight: torch.Tensor, bias: Optional[torch.Tensor],
                   stride: Tuple[int, ...], padding: Tuple[int, ...]) -> torch.Tensor:
    """``F.conv2d`` of spikes from their bits, work proportional to the spike count (``_sparse_ok``'s
    domain); ``shape`` is the input's (the input itself is not read)."""
    return _conv2d_from_bits("sparse", bits, shape, weight, bias, stride, padding)


def _conv2d_from_bits(kind: str, bits: torch.Tensor, shape: Tuple[int, ...], weight: torch.Tensor,
                      bias: Optional[torch.Tensor], stride: Tuple[int, ...], padding: Tuple[int, ...]) -> torch.Tensor:
    """The conv of spikes given by their bits with kernel ``kind`` ("sparse": spike lists over the weights
    as [KH][KW][Cin][Cout]; "table": pattern lookup); both kernels take the same arguments."""
    from . import cpu
    n, cin, h, w = shape
    cout, _, kh, kw = weight.shape
    sh, sw = stride
    ph, pw = padding
    oh, ow = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    if kind == "sparse":
        wt, fn = _weight_layout(weight, "conv"), cpu.sparse_conv_library(cout).sconv2d_fwd
    else:
        wt, fn = _weight_layout(weight, "table"), cpu.table_conv_library(cout).tconv2d_fwd
    b = None if bias is None else bias.detach().contiguous()
    out = buffers.empty((n, cout, oh, ow), weight.dtype, weight.device, channels_last=True, own=True)
    fn(bits.data_ptr(), wt.data_ptr(), None if b is None else b.data_ptr(), out.data_ptr(),
       n, h, w, cin, cout, kh, kw, sh, sw, ph, pw, oh, ow, torch.get_num_threads())
    return out


_LAYOUTS: Dict[Tuple[int, str], Tuple[Any, Tuple[Any, ...], torch.Tensor]] = {}


def _weight_layout(weight: torch.Tensor, kind: str) -> torch.Tensor:
    """The weight rearranged for the spike-driven kernels, cached until the weight changes.

    NOTE: keyed by the tensor's identity, checked through a weak reference (a new tensor that happens to
    get a freed one's id and address is never mistaken for it; the entry goes when the weight does), and
    stamped with its storage, version counter (bumped by every in-place update such as an optimizer step)
    and shape, so a stale copy is never used.
    """
    key = (id(weight), kind)
    stamp = (weight.data_ptr(), weight._version, tuple(weight.shape), weight.dtype)
    hit = _LAYOUTS.get(key)
    if hit is not None and hit[0]() is weight and hit[1] == stamp:
        return hit[2]
    w = weight.detach()
    if kind == "linear":                   # [Cout / block][Cin][block]: runtime/cpu_source.sparse_linear_source
        from . import cpu
        from .cpu_source import sparse_block
        out = cpu.blocked_transposed(w, sparse_block(w.shape[0]))
    elif kind == "table":
        out = _pattern_table(w)
    elif kind == "conv_pool":              # [Cout][KH][KW][Cin]: runtime/conv_pool.py's kernels
        out = w.permute(0, 2, 3, 1).contiguous()
    else:
        out = w.permute(2, 3, 1, 0).contiguous()
    ref = weakref.ref(weight, lambda _r, key=key: _LAYOUTS.pop(key, None))
    _LAYOUTS[key] = (ref, stamp, out)
    return out


def _pattern_table(w: torch.Tensor) -> torch.Tensor:
    """The table-lookup conv's weights (``cpu_source.table_conv_source``): for each output-channel block,
    tap, group of 4 input channels and 4-bit spike pattern, the sum of the weight rows the pattern selects,
    [Cout/COB][KH][KW][Cin/4][16][COB].

    NOTE: pattern v's row is pattern (v without its lowest bit)'s row plus that bit's weight row, so every
    sum is built in one fixed order (highest channel first) from the same float adds on every rebuild.
    """
    from .cpu_source import table_block
    cout, cin, kh, kw = w.shape
    cob = table_block(cout)
    rows = w.permute(2, 3, 1, 0).reshape(kh, kw, cin // 4, 4, cout)
    tab = w.new_zeros(kh, kw, cin // 4, 16, cout)
    for v in range(1, 16):
        low = v & -v
        tab[:, :, :, v] = tab[:, :, :, v ^ low] + rows[:, :, :, low.bit_length() - 1]
    return tab.view(kh, kw, cin // 4, 16, cout // cob, cob).permute(4, 0, 1, 2, 3, 5).contiguous()


def _conv_path(path: str, bits: torch.Tensor, shape: Tuple[int, ...], weight: torch.Tensor,
               bias: Optional[torch.Tensor], stride: Tuple[int, ...], padding: Tuple[int, ...]) -> Any:
    """The conv from its input's bits by ``path`` ("sparse": spike lists, "table": pattern lookup), as a
    thunk for ``_SparseChoice``."""
    fn = _sparse_conv2d if path == "sparse" else _table_conv2d
    return lambda: fn(bits, tuple(shape), weight, bias, tuple(stride), tuple(padding))


def _table_conv2d(bits: torch.Tensor, shape: Tuple[int, ...], weight: torch.Tensor, bias: Optional[torch.Tensor],
                  stride: Tuple[int, ...], padding: Tuple[int, ...]) -> torch.Tensor:
    """``F.conv2d`` of spikes from their bits by 4-channel table lookup (``_sparse_ok``'s domain); ``shape``
    is the input's."""
    return _conv2d_from_bits("table", bits, shape, weight, bias, stride, padding)


def _sparse_linear_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and x.shape[-1] % 8 == 0 and weight.shape[0] % 8 == 0 and x.is_contiguous() and _c_bits(x))


def _sparse_linear(bits: torch.Tensor, shape: Tuple[int, ...], weight: torch.Tensor,
                   bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``F.linear`` of spikes from their bits (input ``shape``), work proportional to the spike count
    (``cpu_source.sparse_linear_source``)."""
    from . import cpu
    fin, fout = weight.shape[1], weight.shape[0]
    rows = 1
    for d in shape[:-1]:
        rows *= d
    wt = _weight_layout(weight, "linear")                           # [Cout / block][Cin][block]
    b = None if bias is None else bias.detach().contiguous()
    out = buffers.empty((*shape[:-1], fout), weight.dtype, weight.device, own=True)   # rows x fout, no view
    cpu.sparse_linear_library(fout).slinear_fwd(bits.data_ptr(), wt.data_ptr(), None if b is None else b.data_ptr(),
                                                out.data_ptr(), rows, fin, fout, torch.get_num_threads())
    return out


def spike_conv_forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: Tuple[int, ...],
                       padding: Any, dilation: Tuple[int, ...], groups: int
                       ) -> Tuple[torch.Tensor, Optional[torch.Tensor], str]:
    """The conv of a (probable) spike input, without autograd: ``(y, the input's bits or None when it is not
    all 0/1, the path that computed y)``; on CPU from the bits where measured faster (``_SparseChoice``)."""
    bits, ones = pack_count(x)
    pad2 = tuple(padding) if not isinstance(padding, str) else padding
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[x.dim() - 2]

    def dense() -> torch.Tensor:
        return fn(x, weight, bias, stride, padding, dilation, groups)
    if bits is not None and _sparse_ok(x, weight, dilation, groups, padding):
        key = ("conv", tuple(x.shape), tuple(weight.shape), tuple(stride), pad2, torch.get_num_threads())
        y = _CHOICE.run(key, ones, dense, _conv_path("sparse", bits, x.shape, weight, bias, stride, pad2)
                        if ones <= SPARSE_DENSITY * x.numel() else None,
                        _conv_path("table", bits, x.shape, weight, bias, stride, pad2)
                        if weight.numel() * 16 <= TABLE_MAX_BYTES else None)
        return y, bits, _CHOICE.last_path
    return dense(), bits, "dense"


class _PackedConv(torch.autograd.Function):
    """A convolution of spikes: input kept as bits for backward; on CPU the forward itself may be computed
    from the bits, where measured faster (``_SparseChoice``): spike-driven (``cpu_source.sparse_conv_source``,
    work proportional to the number of spikes) or by pattern-table lookup (``table_conv_source``)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                stride: Tuple[int, ...], padding: Any, dilation: Tuple[int, ...], groups: int) -> torch.Tensor:
        y, bits, path = spike_conv_forward(x, weight, bias, stride, padding, dilation, groups)
        _LAST.value = (bits, path)
        keep = ctx.needs_input_grad[1] or ctx.needs_input_grad[0]
        ctx.meta = (tuple(x.shape), x.stride(), x.dtype, bits is not None, bias is not None,
                    stride, padding, dilation, groups)
        if keep:
            ctx.save_for_backward(bits if bits is not None else x, weight)
        return y

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor):
        shape, strides, dtype, packed, has_bias, stride, padding, dilation, groups = ctx.meta
        saved, weight = ctx.saved_tensors
        x = unpack_spikes(saved, shape, strides, dtype) if packed else saved
        if isinstance(padding, str):      # 'same' / 'valid': as numbers for convolution_backward
            k = weight.shape[2:]
            padding = tuple(0 for _ in k) if padding == "valid" else tuple(d * (s - 1) // 2 for s, d in zip(k, dilation))
        # NOTE: under autocast the forward ran in the autocast dtype (gy's); backward runs outside it
        gx, gw, gb = torch.ops.aten.convolution_backward(
            gy, x.to(gy.dtype), weight.to(gy.dtype), [weight.shape[0]] if has_bias else None, list(stride),
            list(padding), list(dilation), False, [0] * len(stride), groups,
            [ctx.needs_input_grad[0], ctx.needs_input_grad[1], has_bias and ctx.needs_input_grad[2]])
        return (_as(gx, dtype), _as(gw, weight.dtype), _as(gb, weight.dtype), None, None, None, None)


def _as(t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    return None if t is None else t.to(dtype)


def _sparse_linear_gw_ok(gy2: torch.Tensor, fin: int) -> bool:
    """The spike-driven weight gradient's domain: CPU float32, ``Cin % 8 == 0`` and ``Cout % 8 == 0`` (the
    input's bits are in row order: the forward packs only contiguous inputs)."""
    from . import cpu
    return (gy2.device.type == "cpu" and gy2.dtype == torch.float32 and fin % 8 == 0 and gy2.shape[-1] % 8 == 0
            and cpu.compiler_available())


def _sparse_linear_gw(bits: torch.Tensor, gy2: torch.Tensor, fin: int) -> torch.Tensor:
    """``gy2.t() @ x`` for a spike input ``x`` [rows, fin] given by its bits: per input channel, the sum of
    the gradient rows where it spiked (``cpu_source.sparse_linear_source``'s ``slinear_gw``), work
    proportional to the spike count, written in the weight's [Cout, Cin] layout."""
    from . import cpu
    gy2 = gy2.contiguous()
    rows, fout = gy2.shape
    gw = buffers.empty((fout, fin), torch.float32, gy2.device)     # pooled: no fresh 4 MiB to fault in per step
    cpu.sparse_linear_library(fout).slinear_gw(bits.data_ptr(), gy2.data_ptr(), gw.data_ptr(), rows, fin, fout,
                                               torch.get_num_threads())
    return gw


class _PackedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        bits, ones = pack_count(x) if x.is_contiguous() else (None, -1)
        if bits is not None and _sparse_linear_ok(x, weight) and ones <= SPARSE_DENSITY * x.numel():
            key = ("linear", tuple(x.shape), tuple(weight.shape), torch.get_num_threads())
            y = _CHOICE.run(key, ones, lambda: F.linear(x, weight, bias),
                            lambda: _sparse_linear(bits, tuple(x.shape), weight, bias))
            path = _CHOICE.last_path
        else:
            y = F.linear(x, weight, bias)
            path = "dense"
        _LAST.value = (bits, path)
        ctx.meta = (tuple(x.shape), x.stride(), x.dtype, bits is not None, ones)
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            ctx.save_for_backward(bits if bits is not None else x, weight)
        return y

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor):
        shape, strides, dtype, packed, ones = ctx.meta
        saved, weight = ctx.saved_tensors
        gy2 = gy.reshape(-1, gy.shape[-1])
        gx = gw = None
        if ctx.needs_input_grad[0]:
            gx = gy.matmul(weight.to(gy.dtype))      # autocast: the forward ran in gy's dtype
        if ctx.needs_input_grad[1]:
            def dense() -> torch.Tensor:
                x = unpack_spikes(saved, shape, strides, dtype) if packed else saved
                return gy2.t().matmul(x.to(gy.dtype).reshape(-1, shape[-1]))
            if packed and _sparse_linear_gw_ok(gy2, shape[-1]) and ones <= SPARSE_DENSITY * gy2.shape[0] * shape[-1]:
                key = ("linear_gw", tuple(shape), tuple(weight.shape), torch.get_num_threads())
                gw = _CHOICE.run(key, ones, dense, lambda: _sparse_linear_gw(saved, gy2, shape[-1]))
            else:
                gw = dense()
        gb = gy2.sum(0) if ctx.needs_input_grad[2] else None
        return _as(gx, dtype), _as(gw, weight.dtype), _as(gb, weight.dtype)


def packed_conv(m: torch.nn.Module, x: torch.Tensor, weight: Optional[torch.Tensor] = None,
                bias: Optional[torch.Tensor] = None, source: Optional[str] = None) -> torch.Tensor:
    """``m(x)`` for a Conv1d/2d/3d (zeros padding) whose input is spikes: the input kept as bits for
    backward, and on CPU a spike-driven forward when the spikes are sparse (with or without grad).
    ``source`` (a task name): the output is marked recomputable from those bits (``runtime/recompute.py``)."""
    w = m.weight if weight is None else weight
    b = m.bias if weight is None else bias
    y = _PackedConv.apply(x, w, b, m.stride, m.padding, m.dilation, m.groups)
    bits, path = getattr(_LAST, "value", (None, "dense"))
    _LAST.value = (None, "dense")
    if source is not None and bits is not None and torch.is_grad_enabled():
        _conv_source(y, m, x, w, b, bits, path, source)
    return y


def _conv_source(y: torch.Tensor, m: torch.nn.Module, x: torch.Tensor, w: torch.Tensor,
                 b: Optional[torch.Tensor], bits: torch.Tensor, path: str, task: str) -> None:
    """Mark ``y = conv(x)`` as recomputable from ``x``'s bits by the path the forward took (``path``)."""
    from .recompute import attach_source
    shape, strides, dtype = tuple(x.shape), x.stride(), x.dtype
    stride, padding, dilation, groups = m.stride, m.padding, m.dilation, m.groups
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[x.dim() - 2]

    def again(bits: torch.Tensor, w: torch.Tensor, *b: torch.Tensor) -> torch.Tensor:
        bias = b[0] if b else None
        if path != "dense":            # from the bits directly: no float copy of the input
            return _conv_path(path, bits, shape, w, bias, stride, padding)()
        return fn(unpack_spikes(bits, shape, strides, dtype), w, bias, stride, padding, dilation, groups)
    attach_source(y, again, (bits, w) + (() if b is None else (b,)), f"convolution '{task}'", task)


def packed_linear(m: torch.nn.Module, x: torch.Tensor, source: Optional[str] = None) -> torch.Tensor:
    """``m(x)`` for a Linear, keeping a spike input as bits for backward (``source``: as for packed_conv)."""
    y = _PackedLinear.apply(x, m.weight, m.bias)
    bits, path = getattr(_LAST, "value", (None, "dense"))
    _LAST.value = (None, "dense")
    if source is not None and bits is not None and torch.is_grad_enabled():
        from .recompute import attach_source
        shape, strides, dtype, w, b = tuple(x.shape), x.stride(), x.dtype, m.weight, m.bias

        def again(bits: torch.Tensor, w: torch.Tensor, *b: torch.Tensor) -> torch.Tensor:
            bias = b[0] if b else None
            if path != "dense":
                return _sparse_linear(bits, shape, w, bias)
            return F.linear(unpack_spikes(bits, shape, strides, dtype), w, bias)
        attach_source(y, again, (bits, w) + (() if b is None else (b,)), f"linear '{source}'", source)
    return y
