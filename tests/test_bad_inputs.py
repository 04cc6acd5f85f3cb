"""Every public argument and call form with wrong values: the error class and the words that name the problem.

What a user meets first (issue 13): an input that does not fit the compiled form is an ``InputError`` at the
call, before any task runs, saying what was given, what the first layer that reads it expects and which
call form fits (``snncc/inputs.py``); an error from inside a layer stays a ``TaskFailure`` naming the
module, with a hint only where the hint is right; code torch.fx cannot trace is a ``TraceFailure`` whose
ways out work where it failed, the model's own forward included. Inputs the eager model takes are never
refused (an unbatched image to a conv-only model, extra leading dimensions to a Linear, a cast in the
model's forward).
"""
from __future__ import annotations

import copy
import inspect
import os
import re

import numpy as np
import pytest
import torch
from torch import nn

import snncc
from conftest import assert_same_training
from snncc.errors import InputError, TaskFailure, TraceFailure


# --------------------------------------------------------------------------------------------- models
def csnn(c: int = 3, hw: int = 16) -> nn.Module:
    """conv -> LIF -> flatten -> linear -> LIF: the README's shape, for images [N, c, hw, hw]."""
    return nn.Sequential(nn.Conv2d(c, 8, 3, padding=1), snncc.LIF(), nn.Flatten(),
                         nn.Linear(8 * hw * hw, 10), snncc.LIF())


def mlp(features: int = 3 * 16 * 16) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(features, 10), snncc.LIF())


class Gate(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x * 2.0
        return x


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.gate = Gate()
        self.sn = snncc.LIF()

    def forward(self, x):
        return self.sn(self.gate(self.fc(x)) * 4.0)


def _img(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(0)).to(dtype)


def _raises(cls, fn, *words: str) -> str:
    """``fn()`` raises ``cls`` whose message contains every one of ``words``; returns the message."""
    with pytest.raises(cls) as info:
        fn()
    msg = str(info.value)
    for w in words:
        assert w in msg, f"{w!r} not in the message:\n{msg}"
    return msg


# --------------------------------------------------------------------------------------------- compile()
@pytest.mark.parametrize("model", [lambda x: x, "model", None, nn.Linear])
def test_model_must_be_a_module_instance(model):
    _raises(TypeError, lambda: snncc.compile(model, T=2), "nn.Module")


def test_compiling_a_compiled_model():
    cm = snncc.compile(mlp(), T=2)
    _raises(InputError, lambda: snncc.compile(cm, T=4), "already compiled", "cmodel.model")


@pytest.mark.parametrize("T, words", [(0, ">= 1"), (-3, ">= 1"), (2.0, "positive int"), ("4", "positive int"),
                                      (True, "positive int"), (1.5, "positive int"), ([4], "positive int")])
def test_T_values(T, words):
    _raises(InputError, lambda: snncc.compile(mlp(), T=T), "T must be", words, repr(T) if words != ">= 1" else "")


def test_T_numpy_integer_is_an_int():
    assert snncc.compile(mlp(), T=np.int64(3)).T == 3


def test_T_and_sequence_together():
    _raises(InputError, lambda: snncc.compile(mlp(), T=4, sequence=True), "not both", "T=", "sequence=True")


@pytest.mark.parametrize("name", ["sequence", "verify", "fuse", "bitpack", "cuda_graphs"])
@pytest.mark.parametrize("value", ["yes", 1, None])
def test_flags_must_be_bools(name, value):
    _raises(InputError, lambda: snncc.compile(mlp(), **{name: value}), name, "True or False", repr(value))


@pytest.mark.parametrize("memory", ["low", "", None, "HALF"])
def test_memory_values(memory):
    _raises(InputError, lambda: snncc.compile(mlp(), T=2, memory=memory), "memory must be one of", "default",
            "half", "min", repr(memory))


@pytest.mark.parametrize("chunk", [0, -2, 1.5, "big", True, "Auto"])
def test_chunk_values(chunk):
    _raises(InputError, lambda: snncc.compile(mlp(), T=2, chunk=chunk), "chunk must be a positive int", "auto",
            repr(chunk))


@pytest.mark.parametrize("streams", [0, -1, 2.5, True, "2", None])
def test_streams_values(streams):
    _raises(InputError, lambda: snncc.compile(mlp(), T=2, streams=streams), "streams must be a positive int",
            repr(streams))


def test_leaf_modules_must_be_a_list_of_classes():
    _raises(TypeError, lambda: snncc.compile(Net(), T=2, leaf_modules=Gate), "list of nn.Module classes",
            "leaf_modules=[Gate]")
    _raises(TypeError, lambda: snncc.compile(Net(), T=2, leaf_modules=[Gate()]), "nn.Module classes",
            "pass its class", "leaf_modules=[Gate]")
    _raises(TypeError, lambda: snncc.compile(Net(), T=2, leaf_modules=[int]), "nn.Module classes", "int")
    _raises(TypeError, lambda: snncc.compile(Net(), T=2, leaf_modules="Gate"), "list of nn.Module classes")


def test_unknown_leaf_module():
    msg = _raises(InputError, lambda: snncc.compile(Net(), T=2, leaf_modules=[nn.GRU]), "leaf_modules names GRU",
                  "no submodule", "Net")
    assert "Gate" in msg and "Linear" in msg and "LIF" in msg      # what the model does have


def test_leaf_module_that_is_the_root():
    _raises(InputError, lambda: snncc.compile(Net(), T=2, leaf_modules=[Net]), "class of the model itself",
            "cannot be a leaf", "submodule", "torch.where")


# --------------------------------------------------------------------------------------------- the call
def test_call_arguments():
    cm = snncc.compile(mlp(), T=2)
    x = _img(2, 3, 16, 16)
    _raises(InputError, lambda: cm(), "one tensor input", "got 0 arguments")
    _raises(InputError, lambda: cm(x, x), "one tensor input", "got 2 arguments")
    _raises(InputError, lambda: cm(x.tolist()), "one tensor input", "got a list", "torch.as_tensor")
    _raises(InputError, lambda: cm(x.numpy()), "one tensor input", "got a ndarray", "torch.as_tensor")
    _raises(InputError, lambda: cm(3.0), "one tensor input", "got a float")
    _raises(InputError, lambda: cm(x=x), "positional")
    _raises(InputError, lambda: cm(torch.tensor(1.0)), "T=2", "[N, ...]", "0-d")
    cs = snncc.compile(mlp(), sequence=True)
    _raises(InputError, lambda: cs(x, x), "sequence=True", "one tensor input")
    _raises(InputError, lambda: cs(torch.rand(5)), "[T, N, ...]", "(5,)", "T=")
    _raises(InputError, lambda: cs(torch.rand(0, 2, 3, 16, 16)), "T = 0")


def test_image_without_batch_dimension_to_T_model():
    """Issue 13: [3, 16, 16] to compile(model, T=4) -- not a TaskFailure from inside a Linear."""
    for model, module in ((csnn(), "module '3' (Linear, in_features=2048)"),
                          (mlp(), "module '1' (Linear, in_features=768)")):
        cm = snncc.compile(model, T=4)
        msg = _raises(InputError, lambda: cm(_img(3, 16, 16)), "given: [3, 16, 16]", module, "batch dimension",
                      "x.unsqueeze(0)", "[1, 3, 16, 16]", "T=4")
        assert "sequence=True" not in msg


def test_batch_without_time_dimension_to_sequence_model():
    """Issue 13: [N, C, H, W] to compile(model, sequence=True) -- N is not silently taken as T."""
    cm = snncc.compile(csnn(), sequence=True)
    _raises(InputError, lambda: cm(_img(32, 3, 16, 16)), "sequence=True", "given: [32, 3, 16, 16]",
            "without a time dimension", "read as T=32 steps of [3, 16, 16]", "snncc.compile(model, T=...)")


def test_time_dimension_given_to_T_model():
    """Issue 13: [T, N, C, H, W] to a T= model: an InputError naming the first conv and sequence=True."""
    cm = snncc.compile(csnn(), T=4)
    _raises(InputError, lambda: cm(_img(4, 2, 3, 16, 16)), "module '0' (Conv2d, in_channels=3)",
            "4-d input [N, C, H, W]", "(5-d)", "looks like a sequence", "sequence=True")


def test_sequence_steps_without_batch_dimension():
    cm = snncc.compile(mlp(), sequence=True)
    _raises(InputError, lambda: cm(_img(4, 3, 16, 16)), "without its batch dimension", "x.unsqueeze(1)",
            "[4, 1, 3, 16, 16]")


def test_wrong_channels_and_channels_last():
    cm = snncc.compile(csnn(), T=2)
    msg = _raises(InputError, lambda: cm(_img(2, 1, 16, 16)), "module '0' (Conv2d, in_channels=3)",
                  "3 channels at dim 1", "(1 channels there)")
    assert "fix:" not in msg                          # no call form makes 1 channel into 3
    _raises(InputError, lambda: cm(_img(2, 16, 16, 3)), "channels-last", "x.permute(0, 3, 1, 2)")


def test_wrong_features_at_first_linear():
    cm = snncc.compile(mlp(), T=2)
    _raises(InputError, lambda: cm(_img(2, 1, 32, 32)), "module '1' (Linear, in_features=768)",
            "768 features in the last dimension", "[2, 1024]")


def test_batchnorm_first_needs_its_rank_and_channels():
    model = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3), snncc.LIF())
    cm = snncc.compile(model, T=2)
    _raises(InputError, lambda: cm(_img(3, 8, 8)), "BatchNorm2d", "4-d input [N, C, H, W]", "x.unsqueeze(0)")
    _raises(InputError, lambda: cm(_img(2, 4, 8, 8)), "BatchNorm2d", "3 channels at dim 1")
    bn1 = snncc.compile(nn.Sequential(nn.BatchNorm1d(5), nn.Linear(5, 2), snncc.LIF()), T=2)
    _raises(InputError, lambda: bn1(_img(5)), "BatchNorm1d", "2-d or 3-d", "x.unsqueeze(0)")


def test_dtype_of_the_input():
    cm = snncc.compile(csnn(), T=2)
    _raises(InputError, lambda: cm(_img(2, 3, 16, 16, dtype=torch.float64)), "dtype torch.float32",
            "torch.float64", "x.to(torch.float32)", "cmodel.to(torch.float64)")
    _raises(InputError, lambda: cm((_img(2, 3, 16, 16) * 255).to(torch.uint8)), "floating-point",
            "torch.uint8", "/ 255")
    _raises(InputError, lambda: cm(_img(2, 3, 16, 16) > 0.5), "floating-point", "torch.bool")
    cm.to(torch.float64)              # the model changed: the float32 input is checked again, not run stale
    _raises(InputError, lambda: cm(_img(2, 3, 16, 16)), "dtype torch.float64", "torch.float32")
    assert cm(_img(2, 3, 16, 16, dtype=torch.float64)).dtype == torch.float64


def test_device_of_the_input():
    cm = snncc.compile(csnn(), T=2)
    x = torch.empty(2, 3, 16, 16, device="meta")
    _raises(InputError, lambda: cm(x), "on cpu", "on meta", "x.to('cpu')", "cmodel.to('meta')")


def test_stream_inputs():
    stream = snncc.compile(csnn(), T=2).stream()
    _raises(InputError, lambda: stream(_img(4, 2, 3, 16, 16)), "stream(x_t) takes one step [N, ...]",
            "module '0' (Conv2d")
    _raises(InputError, lambda: stream.feed(_img(2, 3, 16, 16)), "stream", "without a time dimension",
            "stream(x_t)")
    _raises(InputError, lambda: stream.feed(torch.rand(6)), "chunk [k, N, ...]")
    _raises(InputError, lambda: stream("x"), "tensor")
    assert stream(_img(2, 3, 16, 16)).shape == (2, 10)


def test_explain_checks_inputs_too():
    _raises(InputError, lambda: snncc.explain(csnn(), _img(3, 16, 16), T=2), "x.unsqueeze(0)")


class LoopNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = mlp(12)

    def forward(self, x):
        snncc.reset(self.net)
        return torch.stack([self.net(x) for _ in range(3)]).mean(0)


def test_loop_model_input():
    cm = snncc.compile(LoopNet())
    _raises(InputError, lambda: cm(_img(3, 2, 2)), "snncc.compile(model)", "module 'net.1' (Linear",
            "x.unsqueeze(0)")
    assert cm(_img(5, 3, 2, 2)).shape == (5, 10)


# --------------------------------------------------------------------------------------------- never refused
def test_inputs_eager_takes_are_not_refused():
    """Unbatched images to a conv-only model, extra dims to a Linear, a cast in the forward, autocast."""
    conv = nn.Sequential(nn.Conv2d(3, 4, 3), snncc.LIF(), nn.MaxPool2d(2), nn.Conv2d(4, 2, 3), snncc.LIF())
    x = _img(3, 12, 12, dtype=torch.float64) * 3
    assert_same_training(lambda: copy.deepcopy(conv), x, T=2, check_spikes=False)
    xs = _img(2, 3, 12, 12, dtype=torch.float64) * 3
    assert_same_training(lambda: copy.deepcopy(conv), xs, sequence=True, check_spikes=False)

    seq_lin = nn.Sequential(nn.Linear(5, 3), snncc.LIF())
    assert snncc.compile(seq_lin, T=2)(_img(4, 7, 5)).shape == (2, 4, 7, 3)

    class Casts(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.sn = nn.Linear(4, 2), snncc.LIF()

        def forward(self, x):
            return self.sn(self.fc(x.float() / 255.0))
    assert snncc.compile(Casts(), T=2)(torch.randint(0, 255, (3, 4), dtype=torch.uint8)).shape == (2, 3, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert snncc.compile(csnn(), T=2)(_img(2, 3, 16, 16).bfloat16()).shape == (2, 2, 10)
    # torch's CPU BatchNorm takes a bfloat16 input with float32 parameters
    bn = nn.Sequential(nn.BatchNorm1d(4), snncc.LIF())
    assert snncc.compile(bn, T=2)(_img(3, 4).bfloat16()).dtype == torch.bfloat16

    class PoolIndices(nn.Module):                 # a pool that returns (values, indices)
        def __init__(self) -> None:
            super().__init__()
            self.pool, self.fc, self.sn = nn.MaxPool2d(2, return_indices=True), nn.Linear(3 * 4 * 4, 2), snncc.LIF()

        def forward(self, x):
            return self.sn(self.fc(self.pool(x)[0].flatten(1)))
    assert snncc.compile(PoolIndices(), T=2)(_img(2, 3, 8, 8)).shape == (2, 2, 2)


# --------------------------------------------------------------------------------------------- TaskFailure
def test_layers_that_disagree_are_a_task_failure_without_a_wrong_hint():
    model = nn.Sequential(nn.Linear(6, 4), snncc.LIF(), nn.Linear(5, 3))     # 4 -> 5: the model's own bug
    msg = _raises(TaskFailure, lambda: snncc.compile(model, T=2)(_img(3, 6)), "module '2' (Linear)", "(3, 6)")
    assert "sequence=True" not in msg and "batch dimension" not in msg
    deep = nn.Sequential(nn.Conv2d(3, 4, 3), snncc.LIF(), nn.Flatten(), nn.Linear(4 * 14 * 14, 5), snncc.LIF())
    msg = _raises(TaskFailure, lambda: snncc.compile(deep, T=2)(_img(2, 3, 12, 12)), "module '3' (Linear)")
    assert "Hint" not in msg and "sequence=True" not in msg


def test_task_failure_hint_for_a_model_of_mixed_dtypes():
    model = nn.Sequential(nn.Linear(6, 4), snncc.LIF(), nn.Linear(4, 3).double())
    _raises(TaskFailure, lambda: snncc.compile(model, T=2)(_img(3, 6)), "module '2' (Linear)", "several dtypes",
            "float32, float64", "cmodel.to(")


# --------------------------------------------------------------------------------------------- TraceFailure
class Root(nn.Module):
    """Data-dependent control flow in the root module's own forward."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.sn = snncc.LIF()

    def forward(self, x):
        h = self.fc(x)
        if h.sum() > 0:
            h = h * 2.0
        return self.sn(h)


ROOT_LINE = inspect.getsourcelines(Root.forward)[1] + 2


class RootWhere(Root):
    """The first way out: the condition as a tensor op."""

    def forward(self, x):
        h = self.fc(x)
        h = torch.where(h.sum() > 0, h * 2.0, h)
        return self.sn(h)


class Branch(nn.Module):
    def forward(self, h):
        if h.sum() > 0:
            h = h * 2.0
        return h


class RootBranch(Root):
    """The second way out: the branch moved into a submodule, declared a leaf."""

    def __init__(self) -> None:
        super().__init__()
        self.branch = Branch()

    def forward(self, x):
        return self.sn(self.branch(self.fc(x)))


@pytest.mark.parametrize("form", ["static", "loop"])
def test_trace_failure_in_the_root_gives_ways_out_that_work_for_the_root(form):
    model = Root() if form == "static" else LoopOf(Root())
    cm = snncc.compile(model, T=2) if form == "static" else snncc.compile(model)
    msg = _raises(TraceFailure, lambda: cm(_img(3, 6)), f"{os.path.basename(__file__)}:{ROOT_LINE}",
                  "`if h.sum() > 0:`", "torch.where")
    if form == "static":
        for words in ("the model's forward (Root)", "cannot be a leaf", "leaf_modules=[Root] would change nothing",
                      "submodule", "leaf_modules=[Branch]"):
            assert words in msg, msg
    else:
        assert "module 'net' (Root)" in msg       # a submodule of the looping model: it can be the leaf
        assert "pass leaf_modules=[Root]" in msg


class LoopOf(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x):
        snncc.reset(self.net)
        return torch.stack([self.net(x) for _ in range(2)])


def test_the_ways_out_of_a_root_trace_failure_compile_like_eager():
    x = _img(3, 6, dtype=torch.float64) * 2 - 0.5
    assert_same_training(RootWhere, x, T=3, check_spikes=False)
    assert_same_training(RootBranch, x, T=3, leaf_modules=[Branch], check_spikes=False)
    _raises(InputError, lambda: snncc.compile(Root(), T=2, leaf_modules=[Root]), "class of the model itself")


class RootIter(Root):
    def forward(self, x):
        h = self.fc(x)
        rows = [r * 2.0 for r in h]               # iterating a tensor: needs its value, not control flow
        return self.sn(torch.stack(rows))


def test_trace_failure_that_is_not_control_flow():
    msg = _raises(TraceFailure, lambda: snncc.compile(RootIter(), T=2)(_img(3, 6)),
                  "for r in h", "needs a tensor's value", "submodule")
    assert re.search(r"iterat", msg)
