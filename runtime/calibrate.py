"""A short on-device measurement of what the chunk cost model (``passes/choose_chunk.py``) needs, cached.

Three numbers decide whether splitting a layer's T steps into chunks can pay:

* ``host_us``: what issuing one op costs the Python thread (the runtime issues every task from it). More,
  smaller tasks cost more of these; on a GPU this is what makes a small-batch model launch-bound.
* ``op_us``: the device time of an op as a function of the bytes it touches, measured on a size sweep of
  one elementwise op. It is flat for small ops (the device is not filled: a 4 KiB and a 1 MiB add take the
  same few microseconds on a GPU) and linear for big ones (bandwidth-bound); tasks that run side by side
  on different streams fill the flat part together.
* ``step_us``: the extra time per timestep of a neuron scan over a small layer: a scan carries its state
  from step to step, so its time grows with the chunk length K even when the layer is small, and that
  sequential part is what a wavefront of chunks overlaps across layers.

The measurement takes a few tens of milliseconds and is cached per device name and torch version in
``$SNNCC_CACHE/calibration.json`` (default ``~/.cache/snncc``); ``SNNCC_CALIBRATION=<json file>`` pins the
numbers (tests, or to reproduce another machine's decisions).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from typing import Any, Dict, Tuple

import torch

__all__ = ["Calibration", "calibrate", "measure", "cache_path"]

#: bytes touched by the sweep's ops (read + write of float32): 8 KiB ... 64 MiB
_SIZES = tuple(1 << k for k in range(13, 27, 2))


@dataclass(frozen=True)
class Calibration:
    """Measured costs of one device (microseconds); ``sizes``/``op_us`` is the sweep, bytes -> device time."""

    device: str
    host_us: float
    sizes: Tuple[int, ...]
    op_us: Tuple[float, ...]
    step_us: float

    def op_time(self, nbytes: float) -> float:
        """Device time of an op touching ``nbytes``: flat below the sweep, linear above, interpolated in
        between (piecewise linear in the bytes)."""
        s, t = self.sizes, self.op_us
        if nbytes <= s[0]:
            return t[0]
        for i in range(1, len(s)):
            if nbytes <= s[i]:
                f = (nbytes - s[i - 1]) / (s[i] - s[i - 1])
                return t[i - 1] + f * (t[i] - t[i - 1])
        slope = (t[-1] - t[-2]) / (s[-1] - s[-2])          # bandwidth-bound beyond the sweep
        return t[-1] + (nbytes - s[-1]) * max(slope, 0.0)

    @staticmethod
    def from_dict(d: Dict[str, Any]) -> "Calibration":
        return Calibration(str(d["device"]), float(d["host_us"]), tuple(int(v) for v in d["sizes"]),
                           tuple(float(v) for v in d["op_us"]), float(d["step_us"]))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_time(fn: Any, device: torch.device, reps: int) -> float:
    """Mean device time of ``fn()`` in microseconds (best of three batches of ``reps`` back-to-back calls)."""
    best = float("inf")
    for _ in range(3):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        _sync(device)
        best = min(best, (time.perf_counter() - t0) / reps * 1e6)
    return best


def _host_time(device: torch.device) -> float:
    """What issuing a tiny op costs the calling thread (no synchronization inside the timed loop)."""
    x = torch.ones(8, device=device)
    out = torch.empty_like(x)
    reps = 200
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        torch.add(x, 1.0, out=out)
    t1 = time.perf_counter()
    _sync(device)
    return (t1 - t0) / reps * 1e6


def _scan_step_time(device: torch.device) -> float:
    """Per-step cost of a neuron scan over a small layer (4096 neurons): the slope between K=2 and K=32."""
    from snncc.neurons import NeuronSpec
    from snncc.surrogate import SurrogateSpec
    from .dispatch import neuron_scan
    spec = NeuronSpec("lif", SurrogateSpec("sigmoid", 4.0))
    times = []
    with torch.no_grad():
        for K in (2, 32):
            x = torch.rand(K, 4096, device=device)
            neuron_scan(spec, x, K, False, None, ())            # warm-up (compiles/loads the kernel)
            times.append(_device_time(lambda: neuron_scan(spec, x, K, False, None, ()), device, 20))
    return max((times[1] - times[0]) / 30.0, 0.0)


def measure(device: torch.device) -> Calibration:
    """Run the measurement on ``device`` now (no cache)."""
    op_us = []
    for nbytes in _SIZES:
        x = torch.ones(max(nbytes // 8, 1), device=device)      # read 4 B + write 4 B per element
        out = torch.empty_like(x)
        torch.add(x, 1.0, out=out)
        reps = max(3, min(50, (1 << 24) // nbytes))
        op_us.append(_device_time(lambda: torch.add(x, 1.0, out=out), device, reps))
    # device time never decreases with size; a noisy spike (another process) is cut down to the next
    # bigger size's time, which is the more reliable measurement
    for i in range(len(op_us) - 2, -1, -1):
        op_us[i] = min(op_us[i], op_us[i + 1])
    return Calibration(device_name(device), _host_time(device), _SIZES, tuple(op_us), _scan_step_time(device))


def device_name(device: torch.device) -> str:
    """What a calibration is cached under: the GPU's name, or the CPU with its thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu-{torch.get_num_threads()}threads"


def cache_path() -> str:
    root = os.environ.get("SNNCC_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "snncc")
    return os.path.join(root, "calibration.json")


_MEMO: Dict[str, Calibration] = {}


def calibrate(device: torch.device) -> Calibration:
    """The calibration of ``device``: pinned by ``SNNCC_CALIBRATION``, else cached on disk, else measured."""
    pinned = os.environ.get("SNNCC_CALIBRATION")
    if pinned:
        with open(pinned) as f:
            return Calibration.from_dict(json.load(f))
    key = f"{device_name(device)} | torch {torch.__version__}"
    if key in _MEMO:
        return _MEMO[key]
    path = cache_path()
    table: Dict[str, Any] = {}
    try:
        with open(path) as f:
            table = json.load(f)
        if key in table:
            _MEMO[key] = Calibration.from_dict(table[key])
            return _MEMO[key]
    except (OSError, ValueError, KeyError, TypeError):
        table = {}
    cal = measure(device)
    _MEMO[key] = cal
    table[key] = asdict(cal)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(table, f, indent=1)
        os.replace(tmp, path)
    except OSError:
        pass                                   # a read-only cache only costs a re-measurement next time
    return cal

