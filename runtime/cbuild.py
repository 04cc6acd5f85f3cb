"""Compiling generated C and caching the shared libraries: the only place snncc runs the C compiler.

Why a module of its own: every C backend (the hand-tuned scans of ``runtime/cpu.py``, the scans of lifted
neurons in ``runtime/cpu_ir.py``, spike bit-packing and the spike-driven convolution) compiles the same
way, with the same flags and the same on-disk cache, and asks the same question first (is there a
compiler?). Sources come from elsewhere (``runtime/cpu_source.py``, ``runtime/ir_codegen.py``); callers
type the entry points of what they load.

A source is compiled once with the system C compiler (``$CC``, default gcc) and cached on disk
(``$SNNCC_CACHE/kernels``, default ``~/.cache/snncc/kernels``) under a hash of the source and the flags, so a new
process loads it without recompiling; within a process the loaded library is memoized by the same key.

Exactness: ``-O3 -march=native -fno-trapping-math -ffp-contract=off`` and no ``-ffast-math``: the compiler
keeps the IEEE operations in the order the source writes them (no FMA contraction, no reassociation).
No compiler: :func:`compiler_available` says so, with one warning, and the reference backend runs.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import warnings
from typing import Any, Dict, Tuple

__all__ = ["CACHE_DIR", "compiler_available"]

#: NOTE: ``SNNCC_CACHE`` is snncc's cache root everywhere (calibration.json sits there too); kernels go below it
CACHE_DIR = os.path.join(os.environ.get("SNNCC_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "snncc"),
                         "kernels")
# -fno-math-errno lets gcc call glibc's vector exp (libmvec) in the backward loop; it changes no result.
_FLAGS = ["-O3", "-march=native", "-fno-trapping-math", "-fno-math-errno", "-ffp-contract=off", "-fopenmp",
          "-shared", "-fPIC"]
_LOCK = threading.Lock()
_LIBS: Dict[str, Any] = {}
_WARNED = False
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


def _library(src: str) -> Any:
    """The shared library compiled from ``src`` (a ``ctypes.CDLL``, its functions untyped: the caller types
    them): from this process's memo, else from the disk cache, else compiled now and stored there.

    NOTE: the key hashes the source and ``_FLAGS``: the same text and flags load the same library in every
    process; the .so is moved into the cache atomically, so concurrent processes never load a partial one.
    """
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
        return lib
