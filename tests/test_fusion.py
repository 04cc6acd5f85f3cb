"""fuse_conv_bn_neuron and insert_bitpack: structure of the rewritten graph, and compiled == eager through
every fused path (max-pool epilogue, eval BatchNorm folding, spike inputs kept as bits)."""
from __future__ import annotations

import copy
import ctypes
import os
import platform

import pytest
import torch
from torch import nn

import snncc
from snncc import passes
from snncc.frontend import trace_unrolled
from snncc.pipeline import compile_graph
from snncc.runtime.packed import pack_spikes, packed_conv, packed_linear, unpack_spikes

from conftest import assert_same_training


class ConvPoolNet(nn.Module):
    """conv -> [BN] -> LIF -> maxpool(2) -> conv -> LIF -> maxpool(2) -> flatten -> linear -> LIF."""

    def __init__(self, bn: bool = False, pool: nn.Module = None, surrogate=None) -> None:
        super().__init__()
        sg = surrogate or snncc.surrogate.Sigmoid()
        self.c1 = nn.Conv2d(2, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6) if bn else nn.Identity()
        self.n1 = snncc.LIF(surrogate_function=sg)
        self.p1 = pool if pool is not None else nn.MaxPool2d(2)
        self.c2 = nn.Conv2d(6, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8) if bn else nn.Identity()
        self.n2 = snncc.LIF(surrogate_function=sg, v_reset=None)
        self.p2 = nn.MaxPool2d(2)
        self.fc = nn.Linear(8 * 2 * 2, 5)
        self.n3 = snncc.IF(surrogate_function=sg, v_threshold=0.3)
        with torch.no_grad():           # enough drive that every layer fires (the tests are not vacuous)
            for m in (self.c1, self.c2, self.fc):
                m.weight.mul_(3.0)
                m.bias.add_(0.2)

    def forward(self, x):
        x = self.p1(self.n1(self.bn1(self.c1(x))))
        x = self.p2(self.n2(self.bn2(self.c2(x))))
        return self.n3(self.fc(x.flatten(1)))


def _compiled(model, T=4, train=True, **kw):
    model.train(train)
    return compile_graph(trace_unrolled(model, "static", T), verify=True).task_graph


def test_maxpool_becomes_the_neurons_epilogue():
    tg = _compiled(ConvPoolNet())
    neurons = {t.target: t for t in tg.tasks() if t.kind == "neuron"}
    assert neurons["n1"].fusion("maxpool_epilogue").module == "p1"
    assert neurons["n2"].fusion("maxpool_epilogue").params == (2,)
    assert neurons["n3"].fusion("maxpool_epilogue") is None
    assert not [t for t in tg.tasks() if t.kind == "module" and t.target in ("p1", "p2")]


@pytest.mark.parametrize("pool", [nn.MaxPool2d(2, stride=1), nn.MaxPool2d(3, padding=1, stride=3),
                                  nn.AvgPool2d(2), nn.MaxPool2d(2, ceil_mode=True)])
def test_other_pools_are_not_fused(pool):
    tg = _compiled(ConvPoolNet(pool=pool))
    n1 = next(t for t in tg.tasks() if t.target == "n1")
    assert n1.fusion("maxpool_epilogue") is None
    assert any(t.target == "p1" for t in tg.tasks())


def test_pool_read_by_two_layers_is_not_fused():
    class TwoReaders(nn.Module):
        def __init__(self):
            super().__init__()
            self.n = snncc.LIF()
            self.p = nn.MaxPool2d(2)

        def forward(self, x):
            s = self.n(x)
            return self.p(s).sum() + s.sum()
    tg = _compiled(TwoReaders())
    assert all(not t.fused for t in tg.tasks())


def test_bn_folds_into_conv_in_eval_only():
    tg = _compiled(ConvPoolNet(bn=True), train=False)
    convs = {t.target: t for t in tg.tasks() if t.kind == "module" and t.target in ("c1", "c2")}
    assert convs["c1"].fusion("bn_fold").module == "bn1" and convs["c2"].fusion("bn_fold").module == "bn2"
    assert not any(t.target in ("bn1", "bn2") for t in tg.tasks())
    tg_train = _compiled(ConvPoolNet(bn=True), train=True)
    # in training bn1 (on the hoisted c1's output) and bn2 are the neurons' prologues, never folded
    assert {t.fusion("bn_train").module for t in tg_train.tasks() if t.fusion("bn_train")} == {"bn1", "bn2"}
    assert not any(t.fusion("bn_fold") for t in tg_train.tasks())


def test_bitpack_marks_spike_fed_conv_and_linear():
    tg = _compiled(ConvPoolNet())
    marked = {t.target for t in tg.tasks() if t.spike_input}
    assert marked == {"c2", "fc"}      # c1 reads the (analog) input


class _Step(torch.autograd.Function):
    """A user's surrogate: spike z >= 0 (or z > 0 with ``strict``), straight-through backward."""

    @staticmethod
    def forward(ctx, z, strict=False):
        return ((z > 0) if strict else (z >= 0)).to(z.dtype)

    @staticmethod
    def backward(ctx, g):
        return g, None


def test_user_surrogate_spikes_marked_binary_only_when_plain():
    """A user's surrogate that spikes at z >= 0 gives 0/1 spikes (marked); one spiking at z > 0 is not a
    plain step (it disagrees at the threshold) and its layer stays on the reference scan, unmarked."""
    tg = _compiled(ConvPoolNet(surrogate=_Step.apply))
    assert {t.target for t in tg.tasks() if t.spike_input} == {"c2", "fc"}
    tg = _compiled(ConvPoolNet(surrogate=lambda z: _Step.apply(z, True)))
    assert not any(t.spike_input for t in tg.tasks())


@pytest.mark.parametrize("bn", [False, True])
@pytest.mark.parametrize("train", [True, False])
def test_fused_model_matches_eager_float64(bn, train):
    torch.manual_seed(0)
    x = torch.rand(3, 2, 8, 8) * 3
    assert_same_training(lambda: ConvPoolNet(bn=bn), x, T=4, train=train, backward=True)


def test_fused_model_matches_eager_float32_channels_last():
    x = torch.rand(3, 2, 8, 8) * 3
    assert_same_training(lambda: ConvPoolNet(bn=True), x, T=4, train=True, dtype=torch.float32)


def test_fusion_off_gives_the_same_result():
    torch.manual_seed(1)
    m = ConvPoolNet(bn=True).double()
    x = torch.rand(3, 2, 8, 8, dtype=torch.float64) * 3
    a = snncc.compile(copy.deepcopy(m), T=4)(x)
    b = snncc.compile(copy.deepcopy(m), T=4, fuse=False, bitpack=False)(x)
    assert torch.equal(a, b)


# --------------------------------------------------------------------------- packed inputs
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("backend", ["c", "reference"])
def test_pack_unpack_roundtrip(channels_last, backend, monkeypatch):
    """The C packer and the torch fallback agree on the format (memory order, LSB first)."""
    if backend == "reference":
        monkeypatch.setenv("SNNCC_BACKEND", "reference")
    x = (torch.rand(3, 5, 7, 6) > 0.5).float()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    bits = pack_spikes(x)
    assert bits.dtype == torch.uint8 and bits.numel() == (x.numel() + 7) // 8
    y = unpack_spikes(bits, tuple(x.shape), x.stride(), x.dtype)
    assert torch.equal(x, y) and y.stride() == x.stride()


@pytest.mark.parametrize("n", [8 * 256, 8 * 256 + 5])
def test_unpack_every_byte_value_c_vs_torch(n, monkeypatch):
    """The C unpacker (a lookup table, 8 values per byte) against the torch fallback for all 256 byte
    values, with a tail that is not a whole byte (regression cover for the table and the tail loop)."""
    bits = torch.tensor([b for b in range(256)] + ([0b10110] if n % 8 else []), dtype=torch.uint8)
    c = unpack_spikes(bits, (n,), (1,), torch.float32)
    monkeypatch.setenv("SNNCC_BACKEND", "reference")
    ref = unpack_spikes(bits, (n,), (1,), torch.float32)
    assert torch.equal(c, ref)
    assert torch.equal(c[8:16], torch.tensor([1., 0, 0, 0, 0, 0, 0, 0]))       # byte 1: bit 0 first


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 instruction-set variants")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("march", ["x86-64", "x86-64-v3", "native"])
def test_bit_packer_every_instruction_set_equals_torch(march, dtype, monkeypatch):
    """The packer/unpacker's scalar, AVX2 and AVX-512 paths (chosen at compile time by ``-march``; this
    machine's native build takes one of the vector paths) against the torch packer: sizes that end inside a
    vector and inside a byte, -0.0 (a zero), and a NaN or a 2 at a vector lane and in the tail (refused)."""
    import numpy as np
    from snncc.runtime import cbuild
    from snncc.runtime.cpu_source import bits_source
    from snncc.runtime.packed import _pack_torch
    if march != "native":
        import subprocess
        probe = subprocess.run([os.environ.get("CC", "gcc"), f"-march={march}", "-x", "c", "-E", "-"],
                               input="", capture_output=True, text=True)
        if probe.returncode != 0:
            pytest.skip(f"the C compiler does not know -march={march}")
    monkeypatch.setattr(cbuild, "_FLAGS", [f if not f.startswith("-march=") else f"-march={march}"
                                           for f in cbuild._FLAGS])
    lib = cbuild._library(bits_source(dtype))
    i64, ptr, cint = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.pack_check.argtypes, lib.pack_check.restype = [ptr, i64, ptr, cint], i64
    lib.unpack.argtypes = [ptr, i64, ptr, cint]
    g = torch.Generator().manual_seed(3)
    for n in (7, 16, 37, 8 * 4096 * 2 + 29):
        x = (torch.rand(n, generator=g) < 0.3).to(dtype)
        x[torch.rand(n, generator=g) < 0.2] = -0.0
        out = torch.empty((n + 7) // 8, dtype=torch.uint8)
        ones = lib.pack_check(x.data_ptr(), n, out.data_ptr(), 2)
        assert ones == int(x.sum()) and torch.equal(out, _pack_torch(x))
        back = torch.empty(n, dtype=dtype)
        lib.unpack(out.data_ptr(), n, back.data_ptr(), 2)
        assert torch.equal(back, x) and not np.signbit(back.numpy()).any()
        for bad_at in (n // 2, n - 1):
            for bad in (float("nan"), 2.0):
                y = x.clone()
                y[bad_at] = bad
                assert lib.pack_check(y.data_ptr(), n, out.data_ptr(), 2) == -1


@pytest.mark.parametrize("backend", ["c", "reference"])
def test_pack_refuses_non_binary_values(backend, monkeypatch):
    if backend == "reference":
        monkeypatch.setenv("SNNCC_BACKEND", "reference")
    assert pack_spikes(torch.tensor([0.0, 1.0, 0.5])) is None
    assert pack_spikes(torch.tensor([0.0] * 9 + [2.0])) is None
    assert pack_spikes(torch.tensor([[0.0, 1.0], [1.0, 0.0]]).t()) is None     # not dense


def test_device_side_pack_check_never_syncs_but_fails_loudly():
    """GPU path (regression: it synchronized the stream twice per packed layer): the 0/1 check is an
    asynchronous device assert; exercised here on CPU, where the same assert raises at once."""
    from snncc.runtime.packed import _pack_torch
    x = (torch.rand(2, 8, 5, 3) > 0.5).float().contiguous(memory_format=torch.channels_last)
    bits = _pack_torch(x, check_on_device=True)
    assert torch.equal(unpack_spikes(bits, tuple(x.shape), x.stride(), x.dtype), x)
    with pytest.raises(RuntimeError, match="bitpack=False"):
        _pack_torch(x * 0.5, check_on_device=True)


@pytest.mark.parametrize("binary", [True, False])
def test_packed_conv_and_linear_gradients_equal_dense(binary):
    torch.manual_seed(0)
    x = torch.rand(4, 3, 6, 6, dtype=torch.float64)
    x = (x > 0.5).double() if binary else x
    x.requires_grad_(True)
    conv = nn.Conv2d(3, 5, 3, padding=1, stride=2).double()
    lin = nn.Linear(6, 4).double()
    for fast, slow, inp in ((lambda t: packed_conv(conv, t), conv, x), (lambda t: packed_linear(lin, t), lin, x)):
        y1 = fast(inp)
        g = torch.randn_like(y1)
        params = list(slow.parameters())
        g1 = torch.autograd.grad((y1 * g).sum(), [inp] + params)
        y2 = slow(inp)
        g2 = torch.autograd.grad((y2 * g).sum(), [inp] + params)
        assert torch.equal(y1, y2)
        for a, b in zip(g1, g2):
            torch.testing.assert_close(a, b)


def test_packed_conv_saves_bits_not_floats():
    x = (torch.rand(8, 16, 16, 16) > 0.5).float().requires_grad_(True)
    conv = nn.Conv2d(16, 8, 3, padding=1)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        packed_conv(conv, x)
    assert sum(t.numel() * t.element_size() for t in saved if t.dtype == torch.uint8) == x.numel() // 8
    assert not any(t.shape == x.shape for t in saved)


def test_memory_half_option_validated_and_close():
    with pytest.raises(snncc.errors.InputError, match="memory"):
        snncc.compile(ConvPoolNet(), T=2, memory="tiny")
    torch.manual_seed(0)
    m = ConvPoolNet()
    x = torch.rand(3, 2, 8, 8) * 3
    a, b = snncc.compile(copy.deepcopy(m), T=4), snncc.compile(copy.deepcopy(m), T=4, memory="half")
    ya, yb = a(x), b(x)
    assert torch.equal(ya, yb)                     # forward unchanged
    ga = torch.autograd.grad(ya.sum(), list(a.parameters()))
    gb = torch.autograd.grad(yb.sum(), list(b.parameters()))
    for p, q in zip(ga, gb):
        torch.testing.assert_close(p, q, rtol=2e-2, atol=2e-3)


def test_memory_min_recomputes_exactly_and_saves_less():
    """memory="min": same outputs and the same gradients (bit-for-bit: the forward kernel reruns), less saved."""
    torch.manual_seed(0)
    m = ConvPoolNet()
    x = torch.rand(3, 2, 8, 8) * 3
    a, b = snncc.compile(copy.deepcopy(m), T=4), snncc.compile(copy.deepcopy(m), T=4, memory="min")

    def run(cm):
        from snncc.tools._memory import saved_bytes_and_output
        n_saved, y = saved_bytes_and_output(lambda: cm(x))
        return y, torch.autograd.grad((y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum(),
                                      list(cm.parameters())), n_saved
    ya, ga, sa = run(a)
    yb, gb, sb = run(b)
    assert torch.equal(ya, yb)
    for p, q in zip(ga, gb):
        assert torch.equal(p, q)
    assert sb < sa


# --------------------------------------------------------------------------- training BatchNorm over steps
@pytest.mark.parametrize("bn_cls,shape", [(nn.BatchNorm2d, (3, 4, 5, 6)), (nn.BatchNorm1d, (5, 4)),
                                          (nn.BatchNorm1d, (5, 4, 7))])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm_steps_equals_per_step_module(bn_cls, shape, momentum, affine):
    """One op over K steps == K eager calls: outputs, input/weight/bias gradients, running stats."""
    from snncc.runtime.batchnorm import batch_norm_steps
    torch.manual_seed(0)
    K = 4
    a = bn_cls(shape[1], momentum=momentum, affine=affine).double()
    if affine:
        with torch.no_grad():
            a.weight.uniform_(0.5, 1.5)
            a.bias.uniform_(-0.5, 0.5)
    b = copy.deepcopy(a)
    x = (torch.randn(K, *shape, dtype=torch.float64) * 2 + 1).requires_grad_(True)
    g = torch.randn(K, *shape, dtype=torch.float64)
    y1 = torch.stack([a(x[t]) for t in range(K)])
    y2 = batch_norm_steps(x, b)
    torch.testing.assert_close(y1, y2)
    p1 = [x] + list(a.parameters())
    p2 = [x] + list(b.parameters())
    for u, v in zip(torch.autograd.grad((y1 * g).sum(), p1), torch.autograd.grad((y2 * g).sum(), p2)):
        torch.testing.assert_close(u, v)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name))


# --------------------------------------------------------------------------- chunks and the wavefront
@pytest.mark.parametrize("chunk", [1, 3])
@pytest.mark.parametrize("train", [True, False])
def test_chunked_wavefront_matches_eager(chunk, train):
    """(layer, time-chunk) tasks with state edges between chunks, run wave by wave: still compiled == eager."""
    x = torch.rand(3, 2, 8, 8) * 3
    torch.manual_seed(0)
    model = ConvPoolNet(bn=True).double().train(train)
    ref = copy.deepcopy(model)
    cm = snncc.compile(model, T=5, chunk=chunk, verify=True)
    y = cm(x.double())
    from conftest import eager_run
    y_ref = eager_run(ref, x.double(), T=5)
    assert torch.equal(y, y_ref)
    if train:
        g = torch.linspace(-1, 1, y.numel(), dtype=torch.float64).view_as(y)
        for p, q in zip(torch.autograd.grad((y * g).sum(), list(cm.parameters())),
                        torch.autograd.grad((y_ref * g).sum(), list(ref.parameters()))):
            torch.testing.assert_close(p, q)
        for name, buf in model.named_buffers():
            torch.testing.assert_close(buf, dict(ref.named_buffers())[name])
    c = cm.specialize(x.double())
    assert c.schedule.policy == "wavefront"
    n1 = sorted((t for t in c.task_graph.tasks() if t.target == "n1"), key=lambda t: t.t0)
    assert [(t.t0, t.t1) for t in n1] == [(i, min(i + chunk, 5)) for i in range(0, 5, chunk)]
    wave = {n: i for i, w in enumerate(c.schedule.waves) for n in w}
    n2 = sorted((t for t in c.task_graph.tasks() if t.target == "n2"), key=lambda t: t.t0)
    # anti-diagonal: chunk c of layer 2 runs in a later wave than chunk c of layer 1, and chunk c+1 of
    # layer 1 may run beside chunk c of layer 2
    assert all(wave[a.name] < wave[b.name] for a, b in zip(n1, n2))
    if len(n1) > 1:
        assert any(wave[n1[i + 1].name] <= wave[n2[i].name] for i in range(len(n1) - 1))


def test_chunk_option_validated():
    with pytest.raises(snncc.errors.InputError, match="chunk"):
        snncc.compile(ConvPoolNet(), T=2, chunk=0)


# --------------------------------------------------------------------------- spike-driven convolution
def _same_as_dense(fast, layer: nn.Module, x: torch.Tensor, tol: float) -> None:
    """``fast(x)`` equals ``layer(x)``, and so do the input and parameter gradients (to ``tol``)."""
    xg = x.clone().requires_grad_(True)
    y = fast(xg)
    torch.testing.assert_close(y, layer(x), rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    g1 = torch.autograd.grad((y * g).sum(), [xg] + list(layer.parameters()))
    xr = x.clone().requires_grad_(True)
    g2 = torch.autograd.grad((layer(xr) * g).sum(), [xr] + list(layer.parameters()))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("stride,padding,k", [(1, 1, 3), (2, 1, 3), (1, 0, 1), (2, 2, 5), (1, (1, 2), (3, 5))])
@pytest.mark.parametrize("density", [0.02, 0.2])
def test_sparse_conv_equals_dense(stride, padding, k, density, monkeypatch):
    """Spike-driven forward (from the bits) == F.conv2d to float tolerance; backward as the dense conv."""
    monkeypatch.setenv("SNNCC_SPARSE", "always")   # the spike-driven kernel itself, not the measured choice
    from snncc.runtime import packed
    torch.manual_seed(0)
    x = (torch.rand(3, 16, 9, 11) < density).float().contiguous(memory_format=torch.channels_last)
    conv = nn.Conv2d(16, 24, k, stride=stride, padding=padding)
    assert packed._sparse_ok(x, conv.weight, conv.dilation, conv.groups, conv.padding)
    _same_as_dense(lambda t: packed_conv(conv, t), conv, x, tol=1e-4)


@pytest.mark.parametrize("stride,padding,k,cin,cout", [(1, 1, 3, 16, 24), (2, 1, 3, 8, 8), (1, 0, 1, 32, 64),
                                                    (2, 2, 5, 24, 16), (1, (1, 2), (3, 5), 16, 128)])
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
def test_table_conv_equals_dense(stride, padding, k, cin, cout, density, monkeypatch):
    """Table-lookup forward (4-channel spike patterns) == F.conv2d to float tolerance at any density, with
    and without bias; backward as the dense conv."""
    monkeypatch.setenv("SNNCC_SPARSE", "table")
    from snncc.runtime import packed
    torch.manual_seed(0)
    x = (torch.rand(3, cin, 9, 11) < density).float().contiguous(memory_format=torch.channels_last)
    for bias in (True, False):
        conv = nn.Conv2d(cin, cout, k, stride=stride, padding=padding, bias=bias)
        _same_as_dense(lambda t: packed_conv(conv, t), conv, x, tol=1e-4)
        with torch.no_grad():
            packed_conv(conv, x)
        assert packed._CHOICE.last_path == "table"


def test_pattern_table_sums_the_selected_weight_rows():
    """Row (tap, group, pattern v) of the table is the sum of the weights of the channels v's bits name."""
    from snncc.runtime import packed
    torch.manual_seed(0)
    w = torch.randn(16, 8, 3, 2, dtype=torch.float64)
    tab = packed._pattern_table(w)                   # [Cout/16][KH][KW][Cin/4][16][16]
    assert tab.shape == (1, 3, 2, 2, 16, 16)
    for v in (0, 1, 6, 9, 15):
        chans = [b for b in range(4) if v >> b & 1]
        want = sum((w[:, 4 + c, 2, 1] for c in chans), torch.zeros(16, dtype=w.dtype))
        torch.testing.assert_close(tab[0, 2, 1, 1, v], want)


def test_table_conv_sees_weight_updates(monkeypatch):
    """The cached pattern table is rebuilt after an in-place weight update (an optimizer step)."""
    monkeypatch.setenv("SNNCC_SPARSE", "table")
    conv = nn.Conv2d(8, 8, 3, padding=1)
    xc = (torch.rand(2, 8, 5, 5) < 0.3).float().contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(packed_conv(conv, xc), conv(xc), rtol=1e-5, atol=1e-5)
            conv.weight.mul_(-2.0)


def test_sparse_conv_is_used_only_when_sparse(monkeypatch):
    monkeypatch.setenv("SNNCC_SPARSE", "always")   # the spike-driven kernel itself, not the measured choice
    from snncc.runtime import packed
    calls = []
    real = packed._sparse_conv2d
    monkeypatch.setattr(packed, "_sparse_conv2d", lambda *a: calls.append(1) or real(*a))
    conv = nn.Conv2d(8, 8, 3, padding=1)
    sparse = (torch.rand(2, 8, 6, 6) < 0.05).float().contiguous(memory_format=torch.channels_last)
    dense = (torch.rand(2, 8, 6, 6) < 0.9).float().contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        packed_conv(conv, sparse)
        assert calls == [1]
        packed_conv(conv, dense)
        assert calls == [1]
        packed_conv(conv, sparse.contiguous())          # NCHW: the dense path
        assert calls == [1]


@pytest.mark.parametrize("density", [0.0, 0.05, 0.5])
@pytest.mark.parametrize("fin,fout,rows", [(64, 24, (5, 3)), (128, 192, (7,)), (1024, 64, (3, 1))])
def test_sparse_linear_equals_dense(density, fin, fout, rows, monkeypatch):
    """Several output blocks (192 = 3 x 64), row counts that do not split evenly over the threads."""
    monkeypatch.setenv("SNNCC_SPARSE", "always")   # the spike-driven kernel itself, not the measured choice
    torch.manual_seed(0)
    lin = nn.Linear(fin, fout)
    x = (torch.rand(*rows, fin) < density).float()
    _same_as_dense(lambda t: packed_linear(lin, t), lin, x, tol=1e-5)


@pytest.mark.parametrize("density", [0.0, 0.05, 0.5])
@pytest.mark.parametrize("fin,fout,rows", [(64, 24, (5, 3)), (1024, 1024, (33,)), (136, 16, (9,))])
def test_sparse_linear_weight_gradient_from_the_bits(density, fin, fout, rows, monkeypatch):
    """The weight gradient of a spike input from its bits (the sum of the gradient rows where each input
    spiked) equals the dense ``gy^T x``; it runs where the spikes are sparse enough, else the matmul.
    Input channel ranges split unevenly over the threads (136 = 17 bytes), output blocks of 8 and 64."""
    from snncc.runtime import packed
    monkeypatch.setenv("SNNCC_SPARSE", "always")   # the spike-driven kernel itself, not the measured choice
    calls = []
    real = packed._sparse_linear_gw
    monkeypatch.setattr(packed, "_sparse_linear_gw", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    lin = nn.Linear(fin, fout)
    x = (torch.rand(*rows, fin) < density).float()
    _same_as_dense(lambda t: packed_linear(lin, t), lin, x, tol=1e-5)
    assert bool(calls) == (density <= packed.SPARSE_DENSITY)


@pytest.mark.parametrize("shape", [(1024, 1024), (10, 1024), (1024, 784), (37, 53), (1, 1)])
def test_tiled_transpose_equals_torch(shape):
    """The batched tiled transpose: one block (a plain transpose) and the spike-input linear's
    [Cout / block][Cin][block] weights; other dtypes by torch."""
    from snncc.runtime import cpu
    w = torch.randn(*shape)
    assert torch.equal(cpu.blocked_transposed(w, shape[0])[0], w.t())
    assert torch.equal(cpu.blocked_transposed(w.double(), shape[0])[0], w.double().t())
    for block in (8, 16):
        if shape[0] % block == 0:
            want = w.reshape(shape[0] // block, block, shape[1]).transpose(1, 2)
            assert torch.equal(cpu.blocked_transposed(w, block), want)
            assert torch.equal(cpu.blocked_transposed(w.double(), block), want.double())


@pytest.mark.parametrize("shape", [(3, 2, 32, 8, 8), (2, 5, 33, 7, 9), (4, 16, 3, 3)])
def test_nchw_gradient_copied_to_channels_last_equals_torch(shape):
    """A neuron scan's NCHW output gradient (a SEW add / average pool's) copied into its channels-last
    buffer by the batched tiled transpose, partial tiles included; float64 and odd layouts by torch."""
    from snncc.runtime import cpu
    for dtype in (torch.float32, torch.float64):
        src = torch.randn(*shape, dtype=dtype)
        flat = (shape[0] * shape[1],) + shape[2:] if len(shape) == 5 else shape
        dst = torch.empty(flat, dtype=dtype).contiguous(memory_format=torch.channels_last).view(shape)
        cpu._copy_to_channels_last(dst, src)
        assert torch.equal(dst, src) and dst.stride() != src.stride()


def test_sparse_kernels_see_weight_updates(monkeypatch):
    """The cached weight layout follows in-place updates (optimizer steps): never a stale weight."""
    monkeypatch.setenv("SNNCC_SPARSE", "always")   # the spike-driven kernel itself, not the measured choice
    torch.manual_seed(0)
    lin = nn.Linear(16, 8)
    conv = nn.Conv2d(8, 8, 3, padding=1)
    x = (torch.rand(4, 16) < 0.1).float()
    xc = (torch.rand(2, 8, 5, 5) < 0.1).float().contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(packed_linear(lin, x), lin(x))
            torch.testing.assert_close(packed_conv(conv, xc), conv(xc), rtol=1e-5, atol=1e-5)
            lin.weight.add_(1.0)
            conv.weight.mul_(-2.0)


def test_autocast_training_runs_and_tracks_eager():
    """Under torch.autocast (bfloat16 on CPU) a compiled training step runs, gradients come back in the
    parameters' dtype, and the loss is eager's to bfloat16 precision (a spike may flip at bf16 rounding)."""
    torch.manual_seed(0)
    m = ConvPoolNet(bn=True)
    ref = copy.deepcopy(m)
    x = torch.rand(3, 2, 8, 8) * 3
    cm = snncc.compile(m, T=4)
    from conftest import eager_run
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = cm(x)
        y_ref = eager_run(ref, x, T=4)
    assert y.dtype == y_ref.dtype == torch.bfloat16
    loss, loss_ref = y.float().mean(), y_ref.float().mean()
    assert abs(loss.item() - loss_ref.item()) < 0.05
    grads = torch.autograd.grad(loss, list(cm.parameters()))
    assert all(g.dtype == p.dtype and torch.isfinite(g).all() for g, p in zip(grads, cm.parameters()))


class _WideNet(nn.Module):
    """Spike inputs big enough (>= executor._SMALL elements) for the packed and spike-driven paths."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 8, 3, padding=1)
        self.n1 = snncc.LIF(v_threshold=0.5)
        self.p1 = nn.MaxPool2d(2)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.n2 = snncc.LIF(v_threshold=0.5)
        self.fc = nn.Linear(8 * 16 * 16, 10)
        with torch.no_grad():
            self.c1.weight.mul_(3.0)
            self.c2.weight.mul_(3.0)

    def forward(self, x):
        return self.fc(self.n2(self.c2(self.p1(self.n1(self.c1(x))))).flatten(1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_large_spike_inputs_take_the_packed_and_sparse_paths(dtype, monkeypatch):
    """Through the executor: conv/linear inputs kept as bits (both dtypes), the spike-driven conv used
    (float32), and still compiled == eager (float64: exactly the same spikes)."""
    monkeypatch.setenv("SNNCC_SPARSE", "always")   # the spike-driven kernel itself, not the measured choice
    from snncc.runtime import executor, packed
    calls = {"pack": 0, "sparse": 0}
    real_pack, real_sparse = packed.pack_count, packed._sparse_conv2d

    def count_pack(x):
        calls["pack"] += 1
        return real_pack(x)

    def count_sparse(*a):
        calls["sparse"] += 1
        return real_sparse(*a)
    monkeypatch.setattr(packed, "pack_count", count_pack)
    monkeypatch.setattr(packed, "_sparse_conv2d", count_sparse)
    monkeypatch.setattr(packed, "SPARSE_DENSITY", 1.0)
    torch.manual_seed(0)
    x = torch.rand(8, 2, 32, 32)
    assert 4 * 8 * 8 * 16 * 16 >= executor._SMALL
    assert_same_training(_WideNet, x, T=4, dtype=dtype, every_layer=False)
    assert calls["pack"] >= 2
    assert (calls["sparse"] >= 1) == (dtype == torch.float32)


# --------------------------------------------------------------------------- training BatchNorm in the kernel
class _BNNet(nn.Module):
    """conv -> BN -> LIF -> maxpool, conv -> BN -> IF (soft reset): both BatchNorms fusable in training."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 8, 3, padding=1)
        self.b1 = nn.BatchNorm2d(8)
        self.n1 = snncc.LIF(v_threshold=0.6)
        self.p1 = nn.MaxPool2d(2)
        self.c2 = nn.Conv2d(8, 6, 3, padding=1)
        self.b2 = nn.BatchNorm2d(6, momentum=None)
        self.n2 = snncc.IF(v_reset=None, v_threshold=0.8)
        with torch.no_grad():
            for b in (self.b1, self.b2):
                b.weight.uniform_(0.5, 1.5)
                b.bias.uniform_(-0.2, 0.4)

    def forward(self, x):
        return self.n2(self.b2(self.c2(self.p1(self.n1(self.b1(self.c1(x)))))))


def test_bn_train_is_fused_into_the_neuron():
    """(With a sequence input, so the first BatchNorm is batched over time too; on a static input the first
    layer's BatchNorm sees the same hoisted tensor at each step and runs step by step.)"""
    model = _BNNet().train()
    tg = compile_graph(trace_unrolled(model, "sequence", 4, (), (torch.rand(4, 3, 2, 8, 8),)),
                       verify=True).task_graph
    n1 = next(t for t in tg.tasks() if t.target == "n1")
    assert n1.fusion("bn_train").module == "b1" and n1.fusion("maxpool_epilogue").module == "p1"
    assert not any(t.target in ("b1", "b2") for t in tg.tasks())
    assert next(t for t in tg.tasks() if t.target == "n2").fusion("bn_train").module == "b2"


def _assert_bn_net_is_eager(model, ref, y, y_ref, dtype) -> None:
    """Outputs (identical in float64), every parameter's gradient and the BatchNorm buffers as eager's."""
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-3, atol=1e-4)
    if dtype == torch.float64:
        assert torch.equal(y, y_ref)
    g = torch.linspace(-1, 1, y.numel(), dtype=dtype).view_as(y)
    for (name, p), q in zip(model.named_parameters(), torch.autograd.grad((y_ref * g).sum(), list(ref.parameters()))):
        (gp,) = torch.autograd.grad((y * g).sum(), [p], retain_graph=True)
        torch.testing.assert_close(gp, q, **tol, msg=name)
    for name, buf in model.named_buffers():
        torch.testing.assert_close(buf, dict(ref.named_buffers())[name], **tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("chunk", [None, 2])
def test_bn_train_fused_matches_eager(dtype, chunk, monkeypatch):
    """Outputs, all gradients and the running statistics (T updates per forward) as eager; the fused
    kernel really runs (counted)."""
    from snncc.runtime import executor
    calls = []
    real = executor.c_bn_scan
    monkeypatch.setattr(executor, "c_bn_scan", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    x = torch.rand(4, 4, 2, 8, 8) * 2                # [T, N, ...]: both BatchNorms batched over time
    torch.manual_seed(0)
    model = _BNNet().to(dtype)
    ref = copy.deepcopy(model)
    cm = snncc.compile(model, sequence=True, chunk=chunk, verify=True)
    from conftest import eager_run
    y, y_ref = cm(x.to(dtype)), eager_run(ref, x.to(dtype), sequence=True)
    assert calls, "the fused BatchNorm + scan kernel did not run"
    assert 0 < y_ref.mean() < 1
    # float32: a conv bias right before a training BatchNorm has a gradient that is zero up to rounding
    # (the normalization removes the mean), so only an absolute tolerance means anything for it
    _assert_bn_net_is_eager(model, ref, y, y_ref, dtype)


class _StaticStem(nn.Module):
    """conv -> BN -> LIF on a static image (every ResNet/VGG/Spikformer stem), then a second layer."""

    def __init__(self, pool: bool = False) -> None:
        super().__init__()
        self.c1, self.b1, self.n1 = nn.Conv2d(2, 8, 3, padding=1), nn.BatchNorm2d(8), snncc.LIF(v_threshold=0.5)
        self.p1 = nn.MaxPool2d(2) if pool else nn.Identity()
        self.c2, self.b2, self.n2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), snncc.LIF(v_threshold=0.5)

    def forward(self, x):
        return self.n2(self.b2(self.c2(self.p1(self.n1(self.b1(self.c1(x)))))))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("chunk,memory,pool", [(None, "default", False), (2, "default", True),
                                               (None, "min", True), (None, "max", False)])
def test_bn_train_on_a_static_input_is_one_fused_task(dtype, chunk, memory, pool, monkeypatch):
    """The T training BatchNorm calls on a hoisted conv's output become one task fused into the neuron
    (broadcast input): eager's outputs (identical in float64), gradients and running statistics (T
    updates per forward)."""
    from snncc.runtime import executor
    calls = []
    real = executor.c_bn_scan
    monkeypatch.setattr(executor, "c_bn_scan", lambda *a, **k: calls.append(k.get("broadcast")) or real(*a, **k))
    torch.manual_seed(0)
    x = torch.rand(4, 2, 8, 8, dtype=dtype) * 2
    model = _StaticStem(pool).to(dtype)
    ref = copy.deepcopy(model)
    cm = snncc.compile(model, T=4, chunk=chunk, memory=memory, verify=True)
    from conftest import eager_run
    y, y_ref = cm(x), eager_run(ref, x, T=4)
    assert True in calls, "the stem's BatchNorm did not run fused, as a broadcast input"
    _, ex = next(iter(cm._snncc_cache.values()))
    assert not [t.name for t in ex.tg.tasks() if t.target == "b1"]          # absorbed into n1
    assert 0 < y_ref.mean() < 1
    _assert_bn_net_is_eager(model, ref, y, y_ref, dtype)
    assert int(model.b1.num_batches_tracked) == 4


def test_bn_train_on_a_static_input_unfused_is_eager():
    """The same grouped BatchNorm without the fusion (its output read by something else than a neuron):
    K normalizations of the one input, K running-statistics updates."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c, self.b, self.n = nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), snncc.LIF(v_threshold=0.5)

        def forward(self, x):
            y = self.b(self.c(x))
            return self.n(y) + y
    torch.manual_seed(0)
    x = torch.rand(3, 2, 6, 6, dtype=torch.float64)
    model = Net().double()
    ref = copy.deepcopy(model)
    from conftest import eager_run
    y, y_ref = snncc.compile(model, T=3, verify=True)(x), eager_run(ref, x, T=3)
    assert torch.equal(y, y_ref)
    for p, q in zip(torch.autograd.grad(y.sum(), list(model.parameters())),
                    torch.autograd.grad(y_ref.sum(), list(ref.parameters()))):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-9)
    for name, buf in model.named_buffers():
        torch.testing.assert_close(buf, dict(ref.named_buffers())[name], rtol=1e-12, atol=1e-12)


def test_weight_cache_never_confuses_a_new_weight_with_a_freed_one(monkeypatch):
    """Regression: the cache was keyed by id + address + version, which a new weight allocated where a
    freed one lived (same shape, version) could match; entries now hold a weak reference, are checked
    against it, and go with their weight."""
    monkeypatch.setenv("SNNCC_SPARSE", "always")   # the spike-driven kernel itself, not the measured choice
    import gc
    from snncc.runtime import packed
    x = (torch.rand(4, 16) < 0.1).float()
    lin = nn.Linear(16, 8)
    with torch.no_grad():
        torch.testing.assert_close(packed_linear(lin, x), lin(x))
    key = (id(lin.weight), "linear")
    assert key in packed._LAYOUTS
    del lin
    gc.collect()
    assert key not in packed._LAYOUTS
    for i in range(10):                    # fresh layers, likely reusing ids and addresses
        lin = nn.Linear(16, 8)
        with torch.no_grad():
            lin.weight.fill_(float(i))
            torch.testing.assert_close(packed_linear(lin, x), lin(x))
        del lin


def test_sparse_choice_takes_each_paths_fastest_of_its_rounds():
    """With several timing rounds a path's one slow call (a busy machine) does not decide: the fastest of
    its rounds counts, and until the last round the dense result is returned."""
    from snncc.runtime import packed
    now = [0.0]
    costs = {"dense": [0.0, 9.0, 2.0, 2.5], "table": [0.0, 1.0, 3.0, 3.0]}     # warm-up, then 3 rounds

    def path(name):
        def run():
            now[0] += costs[name].pop(0) if costs[name] else 1.0
            return name
        return run
    choice = packed._SparseChoice(clock=lambda: now[0])
    assert choice.rounds == 3
    dense, table = path("dense"), path("table")
    for _ in range(4):                                               # warm-up + 3 rounds
        assert choice.run("k", 10, dense, None, table) == "dense"
    assert choice.cost["k"] == {"dense": 2.0, "table": 1.0}
    assert choice.run("k", 10, dense, None, table) == "table"


def test_sparse_choice_follows_the_measured_costs(monkeypatch):
    """The spike-driven/dense choice (``packed._SparseChoice``): the first call warms both paths and returns
    the dense result, the second times both (one round), then the cheaper one runs; ``SNNCC_SPARSE`` pins
    it. (A fake clock: each path advances it by its cost.)"""
    from snncc.runtime import packed
    now = [0.0]
    ran = []

    def path(name, cost):
        def run():
            ran.append(name)
            now[0] += cost
            return name
        return run
    choice = packed._SparseChoice(clock=lambda: now[0])
    choice.rounds = 1
    dense, sparse = path("dense", 2.0), path("sparse", 0.5)        # sparse: 0.5 for 100 spikes
    assert choice.run("k", 100, dense, sparse) == "dense" and ran == ["sparse", "dense"]
    ran.clear()
    assert choice.run("k", 100, dense, sparse) == "dense" and ran == ["dense", "sparse"]
    assert choice.cost["k"] == {"dense": 2.0, "sparse": 0.005}
    ran.clear()
    assert choice.run("k", 100, dense, sparse) == "sparse" and ran == ["sparse"]
    assert choice.last_path == "sparse" and choice.last_sparse
    assert choice.run("k", 399, dense, sparse) == "sparse"          # 1.995 < 2.0
    assert choice.run("k", 401, dense, sparse) == "dense"           # denser than the break-even point
    assert choice.last_path == "dense" and not choice.last_sparse
    assert choice.run("k", 401, dense, None) == "dense"             # spike-driven not offered (too dense)
    # a third path at a fixed cost: cheapest of the three by the measured costs
    table = path("table", 1.0)
    ran.clear()
    assert choice.run("t", 100, dense, sparse, table) == "dense" and ran == ["sparse", "table", "dense"]
    ran.clear()
    assert choice.run("t", 100, dense, sparse, table) == "dense" and ran == ["dense", "sparse", "table"]
    assert choice.cost["t"] == {"dense": 2.0, "sparse": 0.005, "table": 1.0}
    assert choice.run("t", 100, dense, sparse, table) == "sparse"   # 0.5 < 1.0 < 2.0
    assert choice.run("t", 300, dense, sparse, table) == "table"    # 1.5 > 1.0
    assert choice.last_path == "table"
    assert choice.run("t", 300, dense, None, table) == "table"
    monkeypatch.setenv("SNNCC_SPARSE", "never")
    assert choice.run("k", 1, dense, sparse) == "dense"
    monkeypatch.setenv("SNNCC_SPARSE", "table")
    assert choice.run("t", 1, dense, sparse, table) == "table"
    assert choice.run("k", 1, dense, sparse) == "sparse"            # no table offered: the measured choice
    monkeypatch.setenv("SNNCC_SPARSE", "always")
    assert choice.run("k", 10 ** 6, dense, sparse) == "sparse"
