"""choose_chunk: the chunk size K (timesteps per task) for ``compile(chunk="auto")``, from a cost model.

Requires: the layer-major TaskGraph and Schedule of one specialization, the bytes each task touches per
timestep (measured on its first run), T, the device's ``Calibration`` (``runtime/calibrate.py``) and the
number of streams. Guarantees: a divisor K of T, the predicted time of every candidate, and why.

The model. With chunks of K steps a layer becomes C = T/K tasks; task (layer l, chunk c) runs in wave
``depth(l) + c`` (depth: the layer's wave in the layer-major schedule), beside the other layers' chunks of
that wave, spread over the streams. Per wave, each stream's tasks run one after another and the streams run
side by side: a wave's device time is the time of one op over the bytes of all its tasks (concurrent tasks
fill the device together: ``Calibration.op_time`` is flat for small ops) plus, for neuron scans, the
sequential part ``K * step_us`` of the longest stream. The host issues every task (``host_us`` per op, a
few ops per task); on a GPU host and device overlap (the total is the larger), on a CPU they add up.

What follows: with one stream, or on a CPU, K = T always wins (splitting only adds tasks); with streams,
smaller K wins only when the layers are too small to fill the device, their scans are long, and the host
is not already the bottleneck (small batches, inference).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, List, Mapping, Sequence, Tuple

from snncc.ir import Schedule, TaskGraph

if TYPE_CHECKING:
    from snncc.runtime.calibrate import Calibration

__all__ = ["LayerCost", "ChunkChoice", "layer_costs", "predict_us", "choose_chunk", "OPS_PER_TASK"]

#: host ops the executor issues per task (the op itself, views/concatenation, bookkeeping): an estimate
OPS_PER_TASK = 4
#: a smaller K must be predicted this much faster to be chosen (fewer tasks are the safer bet)
_MARGIN = 0.05


@dataclass(frozen=True)
class LayerCost:
    """One time-batched task of the layer-major graph: bytes touched per timestep, whether it is a neuron
    scan (sequential in time), and its wave in the layer-major schedule."""

    name: str
    step_bytes: float
    scan: bool
    depth: int


@dataclass(frozen=True)
class ChunkChoice:
    K: int
    predicted_us: Tuple[Tuple[int, float], ...]
    reason: str


def layer_costs(tg: TaskGraph, schedule: Schedule, step_bytes: Mapping[str, float]) -> Tuple[LayerCost, ...]:
    """The time-batched tasks of a layer-major graph with their measured bytes per step (read + write)."""
    depth = {n: i for i, wave in enumerate(schedule.waves) for n in wave}
    out: List[LayerCost] = []
    for name in schedule.order:
        task = tg.task(name)
        if not task.batched or name not in step_bytes:
            continue
        out.append(LayerCost(name, float(step_bytes[name]), task.kind == "neuron", depth[name]))
    return tuple(out)


def predict_us(layers: Sequence[LayerCost], T: int, K: int, cal: "Calibration", n_streams: int) -> float:
    """Predicted time of one forward with chunks of K steps (see the module docstring)."""
    C = -(-T // K)
    waves: Dict[int, List[LayerCost]] = {}
    for layer in layers:
        for c in range(C):
            waves.setdefault(layer.depth + c, []).append(layer)
    device = 0.0
    for tasks in waves.values():
        per_stream = [tasks[i::n_streams] for i in range(min(n_streams, len(tasks)))]
        nbytes = sum(t.step_bytes * K for t in tasks)
        seq = max(sum(K * cal.step_us for t in s if t.scan) for s in per_stream)
        device += cal.op_time(nbytes) + seq
    host = len(layers) * C * OPS_PER_TASK * cal.host_us
    on_cpu = cal.device.startswith("cpu")
    return device + host if on_cpu else max(device, host)


def _divisors(T: int) -> List[int]:
    return [k for k in range(T, 0, -1) if T % k == 0]


def choose_chunk(layers: Sequence[LayerCost], T: int, cal: "Calibration", n_streams: int) -> ChunkChoice:
    """The divisor K of T with the least predicted time (K = T unless a smaller K is clearly faster)."""
    if T < 2 or not layers:
        return ChunkChoice(max(T, 1), (), "nothing to split")
    if n_streams < 2 or cal.device.startswith("cpu"):
        where = "a CPU runs tasks one after another" if cal.device.startswith("cpu") else "one stream"
        return ChunkChoice(T, (), f"{where}: chunks cannot overlap, and K = T has the fewest tasks")
    pred = tuple((K, predict_us(layers, T, K, cal, n_streams)) for K in _divisors(T))
    best_K, best = pred[0]
    for K, us in pred[1:]:
        if us < best * (1.0 - _MARGIN):
            best_K, best = K, us
    why = ("layers fill the device (or the host is the bottleneck): K = T" if best_K == T else
           f"layers too small to fill the device: K = {best_K} overlaps {T // best_K} chunks across layers")
    return ChunkChoice(best_K, pred, why)
