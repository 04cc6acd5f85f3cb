"""Run snncc's generated CUDA kernels on the CPU: a host emulation of just the CUDA they use, built with g++.

Why: the CUDA kernels (``runtime/cuda/kernels.py``) and the code that marshals tensors into them
(``runtime/cuda/scan.py``) must be numerically checked in CI, which has no GPU. The generated source is
compiled as host C++17 against ``cuda_emu.h`` (``__global__``, ``threadIdx``..., ``__ballot_sync`` with
warp-lockstep semantics -- the 32 lanes of a warp are fibers that meet at each ballot --, ``atomicOr``,
``__half``, ``__nv_bfloat16``), each kernel gets a host wrapper
``emu_<name>(grid, block, <the kernel's parameters>)`` that runs it over the grid, and
:class:`EmuLauncher` implements ``runtime.cuda.scan.Launcher`` on top, so ``scan.cuda_scan`` runs
unchanged on CPU tensors (their ``data_ptr()`` are host pointers).

The launcher is strict where CuPy is silent: every argument must be the numpy scalar type of the C
parameter's exact width (CuPy packs arguments by their numpy dtype, so an ``np.int32`` for a
``long long`` is garbage on the GPU), every pointer must be aligned for its element type, a 0-block grid
is refused (as CUDA does), and a ballot whose mask names lanes that have returned is an error.

What this cannot check: memory coalescing, real warp scheduling and timing, performance, races (warps run
one after another, lanes only interleave at ballots), out-of-bounds accesses, what NVRTC itself does
(FMA contraction, header availability: tests/test_cuda_codegen.py checks those with nvcc / NVRTC), and
differences of the device math library (CUDA's ``expf`` is within 2 ulp, glibc's is correctly rounded)
or of half-precision intrinsics.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

__all__ = ["EmuError", "EmuLauncher", "EmuModule", "Kernel", "available", "parse_kernels", "CXX_FLAGS"]

HEADER = Path(__file__).with_name("cuda_emu.h")
#: host compile flags. No FMA contraction: CUDA is launched with ``--fmad=false`` so that spikes and V are
#: bit-identical to torch's separate multiply and add; the emulator must not contract either.
#: Hidden visibility: each library keeps its own emulator state (C++ inline variables would otherwise be
#: unified across the libraries loaded into one process); only the wrappers are exported.
CXX_FLAGS = ("-std=c++17", "-O1", "-shared", "-fPIC", "-pthread", "-ffp-contract=off", "-fvisibility=hidden",
             "-w")
CACHE_DIR = Path(os.environ.get("SNNCC_EMU_CACHE", Path.home() / ".cache" / "snncc" / "emu"))

_KERNEL = re.compile(r'extern\s+"C"\s+__global__\s+void\s+(\w+)\s*\((.*?)\)\s*\{', re.S)
_TYPEDEF = re.compile(r"typedef\s+([\w ]+?)\s+(\w+)\s*;")
_INCLUDE = re.compile(r"^\s*#\s*include\s*<(cuda[\w.]*|math\.h|cmath)>\s*$", re.M)
#: what a per-warp schedule cannot run: these need the warps of a block to run concurrently
_UNSUPPORTED = ("__syncthreads", "__shared__", "cooperative_groups", "__syncwarp", "__shfl", "__any_sync",
                "__all_sync", "__match_")
#: warp collectives the emulator implements: a kernel using one runs its lanes as fibers in lockstep
_COLLECTIVES = ("__ballot_sync",)
_SIZES = {"float": 4, "double": 8, "__half": 2, "__nv_bfloat16": 2, "unsigned int": 4, "int": 4,
          "long long": 8, "unsigned long long": 8, "char": 1, "unsigned char": 1}
# C parameter type -> (the numpy scalar type the launch must pass, the ctypes type of the wrapper's parameter)
_SCALARS = {"long long": (np.int64, ctypes.c_longlong), "int": (np.int32, ctypes.c_int),
            "unsigned int": (np.uint32, ctypes.c_uint), "double": (np.float64, ctypes.c_double),
            "float": (np.float32, ctypes.c_float)}


class EmuError(RuntimeError):
    """A launch the emulator refused or a kernel error it detected (bad arguments, ballot misuse...)."""


def available() -> bool:
    """g++ is on PATH (the emulator's only requirement)."""
    return shutil.which(os.environ.get("CXX", "g++")) is not None


@dataclass
class Param:
    ctype: str          # the declared type without qualifiers, e.g. "snncc_T*" or "long long"
    name: str
    pointee: Optional[str] = None   # element type of a pointer, typedefs resolved ("float", "__half", ...)


@dataclass
class Kernel:
    name: str
    params: List[Param]
    decl: str           # the parameter list as written (reused verbatim by the host wrapper)
    body: str = ""


def _resolve(t: str, typedefs: Dict[str, str]) -> str:
    seen = 0
    while t in typedefs and seen < 8:
        t, seen = typedefs[t], seen + 1
    return t


def parse_kernels(src: str) -> List[Kernel]:
    """Every ``extern "C" __global__ void name(params)`` of ``src`` with its parameters."""
    typedefs = {alias: base.strip() for base, alias in _TYPEDEF.findall(src)}
    kernels = []
    matches = list(_KERNEL.finditer(src))
    for j, m in enumerate(matches):
        params = []
        for raw in m.group(2).split(","):
            raw = " ".join(raw.split())
            if not raw:
                continue
            tokens = raw.replace("*", " * ").split()
            name, rest = tokens[-1], [t for t in tokens[:-1] if t not in ("const", "volatile", "__restrict__")]
            stars, base = rest.count("*"), " ".join(t for t in rest if t != "*")
            if not re.fullmatch(r"\w+", name) or not base or stars > 1:
                raise EmuError(f"cannot parse parameter {raw!r} of {m.group(1)}")
            pointee = _resolve(base, typedefs) if stars else None
            params.append(Param(base + "*" * stars, name, pointee))
        end = matches[j + 1].start() if j + 1 < len(matches) else len(src)
        kernels.append(Kernel(m.group(1), params, m.group(2), src[m.end():end]))
    return kernels


def _check_source(src: str) -> None:
    for word in _UNSUPPORTED:
        if word in src:
            raise EmuError(f"the emulator runs the warps of a block one after another and cannot run "
                           f"{word!r}; extend cuda_emu before generating it")


def _unit(src: str, tag: str) -> Tuple[str, List[Kernel]]:
    """C++ for one source: its kernels renamed ``<tag>_<name>`` inside ``namespace <tag>`` (several sources
    share one library), plus an ``extern "C"`` host wrapper ``emu_<tag>_<name>`` per kernel."""
    _check_source(src)
    src = _INCLUDE.sub("", src)
    kernels = parse_kernels(src)
    if not kernels:
        raise EmuError("no extern \"C\" __global__ kernels in the source")
    for k in kernels:
        src = re.sub(rf"\b{k.name}\b", f"{tag}_{k.name}", src)
    out = [f"namespace {tag} {{", src]
    for k in kernels:
        args = ", ".join(p.name for p in k.params)
        lockstep = "true" if any(c in k.body for c in _COLLECTIVES) else "false"
        out.append(f'extern "C" EMU_EXPORT int emu_{tag}_{k.name}(long long emu_grid, long long emu_block, {k.decl}) {{\n'
                   f"  return emu::launch(emu_grid, emu_block, {lockstep}, [&]() {{ {tag}_{k.name}({args}); }});\n}}")
    out.append(f"}}  // namespace {tag}\n")
    return "\n".join(out), kernels


class EmuModule:
    """One compiled source: its kernels by name, callable through :meth:`EmuLauncher.launch`."""

    def __init__(self, lib: ctypes.CDLL, tag: str, kernels: Sequence[Kernel]) -> None:
        self.lib, self.tag = lib, tag
        self.kernels: Dict[str, Kernel] = {k.name: k for k in kernels}
        self._fns: Dict[str, Any] = {}
        for k in kernels:
            fn = getattr(lib, f"emu_{tag}_{k.name}")
            fn.restype = ctypes.c_int
            unknown = [p.ctype for p in k.params if p.pointee is None and p.ctype not in _SCALARS]
            if unknown:
                raise EmuError(f"{k.name}: no launch marshalling for parameter types {unknown}")
            fn.argtypes = [ctypes.c_longlong, ctypes.c_longlong] + [
                ctypes.c_void_p if p.pointee is not None else _SCALARS[p.ctype][1] for p in k.params]
            self._fns[k.name] = fn

    def call(self, name: str, grid: int, block: int, *args: Any) -> None:
        if name not in self.kernels:
            raise EmuError(f"no kernel {name!r} (has {sorted(self.kernels)})")
        k = self.kernels[name]
        if len(args) != len(k.params):
            raise EmuError(f"{name}: {len(args)} arguments for {len(k.params)} parameters")
        conv = []
        for p, a in zip(k.params, args):
            if p.pointee is not None:
                if type(a) is not np.uint64:
                    raise EmuError(f"{name}({p.name}): pointer passed as {type(a).__name__}, not np.uint64")
                size = _SIZES.get(p.pointee)
                if size is None:
                    raise EmuError(f"{name}({p.name}): unknown element type {p.pointee!r}")
                if int(a) % size:
                    raise EmuError(f"{name}({p.name}): address {int(a):#x} not aligned for {p.pointee}")
                conv.append(int(a) or None)
            else:
                want = _SCALARS[p.ctype][0]
                if type(a) is not want:
                    raise EmuError(f"{name}({p.name}): {p.ctype} passed as {type(a).__name__}, not "
                                   f"np.{want.__name__} (CuPy would pack the wrong width)")
                conv.append(a.item())
        if self._fns[name](grid, block, *conv) != 0:
            self.lib.emu_last_error.restype = ctypes.c_char_p
            raise EmuError(f"{name}: " + self.lib.emu_last_error().decode())


@dataclass
class EmuLauncher:
    """``runtime.cuda.scan.Launcher`` on the host emulator: ``module(src)`` compiles (or finds the
    library :meth:`prepare` built), ``launch`` checks the arguments and runs the kernel over the grid."""

    cache_dir: Path = CACHE_DIR
    threads_per_block: int = 256        # runtime.cuda.scan.THREADS_PER_BLOCK (the harness imports no snncc)
    launches: List[Tuple[str, int]] = field(default_factory=list)
    _modules: Dict[str, EmuModule] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def prepare(self, sources: Sequence[str], jobs: Optional[int] = None) -> None:
        """Compile many sources at once: a few shared libraries built in parallel (one compiler run per
        source would cost a second each, mostly parsing the same C++ headers)."""
        todo = list(dict.fromkeys(s for s in sources if s not in self._modules))
        if not todo:
            return
        jobs = max(1, min(jobs or (os.cpu_count() or 1), len(todo)))
        chunks = [todo[i::jobs] for i in range(jobs)]
        with ThreadPoolExecutor(jobs) as ex:
            for mods in ex.map(self._build, chunks):
                with self._lock:
                    self._modules.update(mods)

    def module(self, src: str) -> EmuModule:
        with self._lock:
            mod = self._modules.get(src)
        if mod is None:
            mod = self._build([src])[src]
            with self._lock:
                self._modules[src] = mod
        return mod

    def launch(self, handle: EmuModule, name: str, n_threads: int, *args: Any) -> None:
        block = self.threads_per_block
        self.launches.append((name, int(n_threads)))
        handle.call(name, (int(n_threads) + block - 1) // block, block, *args)

    def _build(self, sources: Sequence[str]) -> Dict[str, EmuModule]:
        units, kernels = [], []
        for i, src in enumerate(sources):
            text, ks = _unit(src, f"u{i}")
            units.append(text)
            kernels.append(ks)
        cpp = (f'#include "{HEADER.name}"\n' + "\n".join(units) +
               '\nextern "C" EMU_EXPORT const char* emu_last_error() { return emu::last_error_text().c_str(); }\n')
        cxx = os.environ.get("CXX", "g++")
        key = hashlib.sha256("\0".join([HEADER.read_text(), cpp, cxx, *CXX_FLAGS]).encode()).hexdigest()[:24]
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        so = self.cache_dir / f"emu_{key}.so"
        if not so.exists():
            with tempfile.TemporaryDirectory(dir=self.cache_dir) as tmp:
                cpp_path = Path(tmp) / "unit.cpp"
                cpp_path.write_text(cpp)
                out = Path(tmp) / "unit.so"
                r = subprocess.run([cxx, *CXX_FLAGS, f"-I{HEADER.parent}", str(cpp_path), "-o", str(out)],
                                   capture_output=True, text=True)
                if r.returncode != 0:
                    raise EmuError("g++ failed on the emulated source:\n" + r.stderr[-6000:])
                os.replace(out, so)       # atomic: a concurrent test run sees the whole library or none
        lib = ctypes.CDLL(str(so))
        return {src: EmuModule(lib, f"u{i}", ks) for i, (src, ks) in enumerate(zip(sources, kernels))}


def stand_in_cupy(monkeypatch: Any, raw_module: Any, external_stream: Any) -> Any:
    """Install a stand-in ``cupy`` (``RawModule``, ``cuda.ExternalStream``) and re-import snncc's CuPy
    launcher (``runtime/cuda/launch.py``) against it, with torch's current stream (7) and device (0) faked;
    returns the launcher module. Everything is undone by ``monkeypatch`` after the test."""
    import importlib
    import sys
    import types

    import torch
    import snncc.runtime.cuda as cuda_pkg
    fake = types.ModuleType("cupy")
    fake.RawModule = raw_module
    fake.cuda = types.SimpleNamespace(ExternalStream=external_stream)
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.delitem(sys.modules, "snncc.runtime.cuda.launch", raising=False)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: types.SimpleNamespace(cuda_stream=7))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    launch = importlib.import_module("snncc.runtime.cuda.launch")
    monkeypatch.setitem(sys.modules, "snncc.runtime.cuda.launch", launch)     # removed again afterwards
    monkeypatch.setattr(cuda_pkg, "launch", launch, raising=False)
    return launch
