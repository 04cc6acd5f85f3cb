"""Compile (once per source, cached) and launch the generated CUDA kernels on torch's stream, with CuPy.

The only module of snncc that imports cupy, and all it does is compile and launch: which buffers and
scalars each kernel gets is ``scan.py``'s (device-independent, and run in CI through a host emulator of
the kernels, tests/cuda_emu). Tensors are passed as raw device pointers; the launch goes on
``torch.cuda.current_stream()`` so it orders with the surrounding torch work without synchronizing.
"""
from __future__ import annotations

import threading
from typing import Any, Dict, Optional, Sequence, Tuple

import cupy  # noqa: F401  (the only cupy import in snncc)
import torch

from snncc.neuron_ir import NeuronIR
from snncc.neurons import NeuronSpec
from . import ir_scan, scan
from .kernels import NVRTC_OPTIONS

__all__ = ["CupyLauncher", "LAUNCHER", "cuda_scan", "cuda_ir_scan"]


class CupyLauncher:
    """``scan.Launcher`` on CuPy: a ``RawModule`` per source and device (NVRTC with ``NVRTC_OPTIONS``; a
    module is loaded on the device current when it is built), launches on torch's current stream."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._modules: Dict[Tuple[int, str], Any] = {}

    def module(self, src: str) -> Any:
        # NOTE: keyed by the source itself: scan.kernel_source returns one memoized str per variant, whose
        # hash Python caches, so this lookup is cheap on every launch (a sha256 of it was not)
        key = (torch.cuda.current_device(), src)
        with self._lock:
            if key not in self._modules:
                self._modules[key] = cupy.RawModule(code=src, options=NVRTC_OPTIONS)
            return self._modules[key]

    def launch(self, handle: Any, name: str, n_threads: int, *args: Any) -> None:
        fn = handle.get_function(name)
        block = scan.THREADS_PER_BLOCK
        stream = cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream)
        with stream:
            fn(((n_threads + block - 1) // block,), (block,), args)


LAUNCHER = CupyLauncher()


def cuda_scan(spec: NeuronSpec, x: torch.Tensor, K: int, broadcast: bool, v0: Optional[torch.Tensor],
              w: Optional[torch.Tensor] = None, pool: Optional[int] = None,
              h_dtype: Optional[torch.dtype] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The CUDA counterpart of ``runtime.cpu.c_scan`` (same arguments and results).

    Runs with ``x``'s device current, so that the module is loaded on, and the launch goes to the stream
    of, the device that holds the tensors (not whichever device happened to be current). Backward runs on
    autograd's thread for that device, which makes it current itself.
    """
    with torch.cuda.device(x.device):
        return scan.cuda_scan(LAUNCHER, spec, x, K, broadcast, v0, w, pool, h_dtype)


def cuda_ir_scan(first: NeuronIR, steady: NeuronIR, x: torch.Tensor, K: int, broadcast: bool,
                 state: Optional[Sequence[torch.Tensor]], params: Sequence[torch.Tensor]
                 ) -> Optional[Tuple[torch.Tensor, Tuple[torch.Tensor, ...]]]:
    """The CUDA counterpart of ``runtime.cpu_ir.ir_c_scan`` for a lifted neuron (same arguments and
    results; None when the tensors do not fit and the caller runs the reference scan): ``ir_scan``'s on
    this launcher, with ``x``'s device current, as :func:`cuda_scan`. Check ``ir_scan.cuda_supports_ir``
    first."""
    with torch.cuda.device(x.device):
        return ir_scan.cuda_ir_scan(first, steady, x, K, broadcast, state, params, launcher=LAUNCHER)
