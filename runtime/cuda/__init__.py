"""CUDA backend: the neuron scans as CUDA C++ (``kernels.py``, no CuPy needed to generate or compile-check
them), the autograd Function that marshals tensors into them (``scan.py``, device-independent: CI runs it
with the kernels on a host emulator, tests/cuda_emu), launched through CuPy on torch's current stream
(``launch.py``, the only module that imports cupy).

Without CuPy, CUDA tensors run on the reference backend (plain torch ops), and the first such call says how
to install CuPy (``pip install snncc[cuda12]`` or ``snncc[cuda13]``).
"""
from __future__ import annotations

import importlib.util
import os
import warnings
from typing import Optional

import torch

from snncc.neurons import NeuronSpec
from .. import codegen

__all__ = ["available", "supports"]

_WARNED = False
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def available() -> bool:
    """CuPy is importable and the reference backend was not forced (``SNNCC_BACKEND=reference``)."""
    global _WARNED
    if os.environ.get("SNNCC_BACKEND", "") == "reference":
        return False
    if importlib.util.find_spec("cupy") is None:
        if not _WARNED and torch.cuda.is_available():
            warnings.warn("snncc: CuPy is not installed, so CUDA neuron scans run on the reference torch "
                          "backend (correct, slower). Install it with `pip install cupy-cuda12x` (CUDA 12) or "
                          "`pip install cupy-cuda13x` (CUDA 13), or `pip install snncc[cuda12]`.", RuntimeWarning)
            _WARNED = True
        return False
    return True


def supports(spec: NeuronSpec, *tensors: Optional[torch.Tensor]) -> bool:
    """Whether the CUDA kernels can run ``spec`` on these tensors."""
    ts = [t for t in tensors if t is not None]
    if not ts or not codegen.supported(spec) or any(t.device.type != "cuda" for t in ts):
        return False
    if ts[0].dtype not in _DTYPES:
        return False
    return available()
