"""fuse_conv_bn_neuron: absorb work into the kernels that can do it for free.

Requires: a verified TaskGraph. Guarantees: the same values, fewer tasks:
* a ``MaxPool2d`` (kernel = stride, no padding/dilation/ceil_mode) whose only input is all the steps of a
  neuron task, and which is that task's only reader, becomes the neuron's ``maxpool_epilogue``: the kernel
  writes the pooled spikes (max of 0/1 values = OR) and the full-size spike tensor never exists;
* in eval, a ``BatchNorm`` whose only input is a convolution's output, and which is its only reader, is
  folded into the convolution's weights (``bn_fold``): one op instead of two, per call, from the current
  parameters and running statistics (so later training and ``eval()`` again see fresh values).
* in training, a ``BatchNorm2d`` whose only reader is a neuron task reading all its steps becomes the
  neuron's ``bn_train`` prologue: the kernel normalizes each step with that step's batch statistics as it
  reads the input (step mode's semantics, running statistics updated once per step), and the
  normalized tensor never exists;
* in training, a ``MaxPool2d`` (as above) whose only input is a ``Conv2d``'s output, and which is its only
  reader, runs with the convolution as one op (``conv_maxpool``, ``runtime/conv_pool.py``): its backward
  works from the pooled gradient, which reaches one conv output per window, instead of eager's dense
  backward of a gradient that is mostly zeros.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from torch import nn

from snncc.frontend import Traced
from snncc.ir import Fusion, Ref, Steps, Task, TaskGraph
from ._rewrite import absorb, consumers

__all__ = ["fuse_conv_bn_neuron", "pool_kernel"]


def pool_kernel(m: nn.Module) -> Optional[int]:
    """k when ``m`` is a k x k max pool with stride k and nothing else set (what the epilogue computes)."""
    if type(m).__name__ not in ("MaxPool2d",) or not isinstance(m, nn.MaxPool2d):
        return None
    pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)   # noqa: E731
    k, s = pair(m.kernel_size), pair(m.stride if m.stride is not None else m.kernel_size)
    if k[0] != k[1] or s != k or pair(m.padding) != (0, 0) or pair(m.dilation) != (1, 1) or m.ceil_mode \
            or m.return_indices:
        return None
    return k[0]


def _reads_all_steps(reader: Task, src: Task) -> bool:
    """``reader``'s only argument is every step of ``src``, in order (a batched op over its output)."""
    want = Steps(tuple(Ref(src.name, i) for i in range(len(src.nodes))))
    return reader.batched and not reader.kwargs and reader.args == (want,) and \
        len(reader.nodes) == len(src.nodes)


def _sole_reader(tg: TaskGraph, task: Task) -> Optional[Task]:
    readers = consumers(tg, task.name)
    return tg.task(readers[0]) if len(readers) == 1 and tg.output != task.name else None


def _fuse_pool(tg: TaskGraph, traced: Traced) -> TaskGraph:
    for task in list(tg.tasks()):
        if task.kind != "neuron" or task.fusion("maxpool_epilogue") or task.fusion("recurrent") or \
                task.name not in tg.graph:
            continue
        reader = _sole_reader(tg, task)
        if reader is None or reader.kind != "module" or not _reads_all_steps(reader, task):
            continue
        k = pool_kernel(traced.root.get_submodule(reader.target))
        if k is None:
            continue
        fused = dataclasses.replace(task, fused=task.fused + (
            Fusion("maxpool_epilogue", reader.target, reader.name, (k,)),))
        tg = absorb(tg, fused, reader)
    return tg


def _bn_after(tg: TaskGraph, traced: Traced, conv: Task) -> Optional[Task]:
    reader = _sole_reader(tg, conv)
    if reader is None or reader.kind != "module" or reader.kwargs:
        return None
    bn = traced.root.get_submodule(reader.target)
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or bn.training or bn.running_mean is None:
        return None
    if conv.batched:
        ok = _reads_all_steps(reader, conv)
    else:
        ok = not reader.batched and reader.args == (Ref(conv.name),)
    return reader if ok else None


def _fold_bn(tg: TaskGraph, traced: Traced) -> TaskGraph:
    for task in list(tg.tasks()):
        if task.kind != "module" or task.name not in tg.graph or task.fused or task.kwargs:
            continue
        m = traced.root.get_submodule(task.target)
        if type(m) not in (nn.Conv1d, nn.Conv2d, nn.Conv3d) or m.training:
            continue
        bn = _bn_after(tg, traced, task)
        if bn is None or traced.root.get_submodule(bn.target).num_features != m.out_channels:
            continue
        fused = dataclasses.replace(task, fused=(Fusion("bn_fold", bn.target, bn.name),))
        tg = absorb(tg, fused, bn)
    return tg


def _fuse_bn_train(tg: TaskGraph, traced: Traced) -> TaskGraph:
    for task in list(tg.tasks()):
        if task.kind != "neuron" or task.name not in tg.graph or task.fusion("bn_train") or \
                task.t0 is None or not task.args or not isinstance(task.args[0], Steps):
            continue
        src = {r.task for r in task.args[0].refs}
        if len(src) != 1:
            continue
        bn_task = tg.task(next(iter(src)))
        if bn_task.kind != "module" or bn_task.kwargs or not _reads_all_steps(task, bn_task) or \
                _sole_reader(tg, bn_task) is None or _sole_reader(tg, bn_task).name != task.name:
            continue
        bn = traced.root.get_submodule(bn_task.target)
        # the input: per step (Steps), or one time-invariant tensor every step reads (a Ref: the neuron
        # then takes it as a broadcast input, see batch_over_time._static_batch_norm)
        if not isinstance(bn, nn.BatchNorm2d) or not bn.training or len(bn_task.args) != 1 or \
                not (isinstance(bn_task.args[0], Steps) or (isinstance(bn_task.args[0], Ref) and bn_task.batched)):
            continue
        fused = dataclasses.replace(task, args=bn_task.args, fused=(
            Fusion("bn_train", bn_task.target, bn_task.name),) + task.fused)
        tg = absorb(tg, fused, bn_task)
    return tg


def _fuse_conv_pool(tg: TaskGraph, traced: Traced) -> TaskGraph:
    for task in list(tg.tasks()):
        if task.kind != "module" or task.name not in tg.graph or task.fused or task.kwargs or len(task.args) != 1:
            continue
        m = traced.root.get_submodule(task.target)
        if type(m) is not nn.Conv2d or not m.training or m.padding_mode != "zeros" or isinstance(m.padding, str):
            continue
        reader = _sole_reader(tg, task)
        if reader is None or reader.kind != "module" or reader.kwargs:
            continue
        k = pool_kernel(traced.root.get_submodule(reader.target))
        ok = _reads_all_steps(reader, task) if task.batched else \
            (not reader.batched and reader.args == (Ref(task.name),))
        if k is None or not ok:
            continue
        fused = dataclasses.replace(task, fused=(Fusion("conv_maxpool", reader.target, reader.name, (k,)),))
        tg = absorb(tg, fused, reader)
    return tg


def fuse_conv_bn_neuron(tg: TaskGraph, traced: Traced) -> TaskGraph:
    """Max pools into their neuron's kernel; eval BatchNorm into its convolution; training BatchNorm into
    the neuron's kernel; a max pool after a training convolution into it (module docstring)."""
    return _fuse_conv_pool(_fuse_bn_train(_fold_bn(_fuse_pool(tg, traced), traced), traced), traced)
