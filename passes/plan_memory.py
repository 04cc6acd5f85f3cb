"""plan_memory: what each neuron layer keeps for backward, from a cost model (``memory="default"``).

Requires: the neuron scans of one specialization as :class:`ScanCost` (bytes per step, steps, dtype size,
whether the input is the same at every step, whether the scan can recompute), the measured training step
(``step_us``) and the device's ``Calibration`` (``runtime/calibrate.py``). Guarantees: a
:class:`MemoryPlan` with, per layer, ``keep`` ("h": H per step and the spikes as bits, as
``memory="max"`` keeps; "input": only the scan's input and initial V, backward reruns the forward scan, as
``memory="min"`` does without a producer to rerun; "source": not even the input -- the conv/linear that
produced it keeps its own input anyway (the spike bits, for its weight gradient), and backward computes
the scan's input again from those with the same kernel, then reruns the scan; ``runtime/recompute.py``),
the bytes it keeps and the predicted recompute time. All are exact: a rerun is the same kernel on the
same values, so gradients are bit-identical whichever a layer gets.

Why: keeping H costs ``K * M`` floats per layer (plus ``K * M`` bits of spikes), while the scan's input
is often much smaller (a hoisted first layer feeds the same input at every step: ``M`` floats) or the
same size, and the scan itself is a bandwidth-bound pass over memory that costs a few percent of a
training step dominated by convolutions. So recompute where it is cheap. The cost of recomputing a layer
a rerun of its forward scan in backward; what it writes (H and the spike bits, read at once by the
backward kernel) is what the forward no longer writes, so the extra time is reading the input again plus
the scan's sequential part, ``op_time(input bytes) + K * step_us`` (on this 2-core CPU: min and max
train equally fast on seed 001's CSNN, where a full rerun, writes included, predicted 10% of the step,
which the measurements do not show). The step time is
measured (the executor times a training forward; backward is taken as twice the forward, so a step is
about 3x the forward): a bytes-only prediction would leave out the convolutions, which are compute-bound,
and make every recomputation look expensive. Layers are taken in order of bytes saved per microsecond of
recompute while the total stays within ``budget`` (5%) of the step, so the whole plan, not each layer
alone, costs at most that much by the model; a layer that would save under ``MIN_GAIN`` (1/8) of what it
keeps is left alone (its input is as big as H: only the spike bits would go, for a rerun).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, Iterable, Optional, Tuple

if TYPE_CHECKING:
    from snncc.runtime.calibrate import Calibration

__all__ = ["ScanCost", "LayerPlan", "MemoryPlan", "plan_memory", "BUDGET", "STEP_PER_FORWARD", "MIN_GAIN",
           "MIN_RATE", "MIN_RATE_MIN"]

#: the default plan's recomputation may cost at most this fraction of a training step (by the model)
BUDGET = 0.05
#: a training step as a multiple of its forward (backward about twice the forward)
STEP_PER_FORWARD = 3.0
#: a layer is recomputed only when that saves at least this fraction of what it keeps with H (a layer
#: whose input is as big as H saves only the spike bits: 1/33 of it in float32, not worth a rerun)
MIN_GAIN = 0.125
#: and only when it saves at least this many bytes per microsecond of predicted cost (1 MiB per ms): the
#: budget is not spent on a layer whose recomputation costs milliseconds to save a few kilobytes
MIN_RATE = 2 ** 20 / 1000
#: memory="min" reruns a producer for a neuron layer's input unless, measured, that saves under this many
#: bytes per microsecond (1 MiB per 10 ms): seed 001's fc1 (4096 -> 128) rerun took 2.7 ms, 4% of a step,
#: to save 0.13 MiB, 0.06% of eager's saved bytes; kept, min is still 1/77 of eager
MIN_RATE_MIN = MIN_RATE / 10


@dataclass(frozen=True)
class ScanCost:
    """One neuron scan task: ``M`` neurons per step over ``K`` steps of ``itemsize``-byte floats.
    ``broadcast``: the same input at every step (kept once); ``has_v0``: starts from a carried state
    (a later chunk; its V is kept too); ``h_itemsize``: the bytes H is kept in per value (2 for
    ``memory="half"``); ``can_recompute``: the kernel that runs it can rerun its forward in backward
    (built-in C kernels; ``why`` says what it does instead otherwise); ``keeps_input``: it keeps its input
    whatever the plan (ParametricLIF's weight gradient)."""

    name: str
    layer: str
    M: int
    K: int
    itemsize: int
    broadcast: bool = False
    has_v0: bool = False
    h_itemsize: Optional[int] = None
    can_recompute: bool = True
    keeps_input: bool = False
    why: str = ""
    #: the scan's measured forward time (us), when the executor has timed it: the recompute cost then
    measured_us: Optional[float] = None
    #: the backward kernel reruns the forward itself, block by block (no H written and read back)
    in_kernel_rerun: bool = False
    #: the task that produced the scan's input and can compute it again from what it keeps (keep "source")
    source: Optional[str] = None
    #: that task's measured forward time (us): what recomputing the input costs
    source_us: Optional[float] = None

    @property
    def input_bytes(self) -> int:
        return self.M * self.itemsize * (1 if self.broadcast else self.K) + (self.M * self.itemsize if self.has_v0 else 0)

    @property
    def h_bytes(self) -> int:
        return self.K * self.M * (self.h_itemsize or self.itemsize) + (self.K * self.M + 7) // 8

    @property
    def v0_bytes(self) -> int:
        return self.M * self.itemsize if self.has_v0 else 0

    def kept_bytes(self, keep: str) -> int:
        """Bytes kept for backward with ``keep`` "h" (H + spike bits), "input" (input + initial V) or
        "source" (initial V only: the producer keeps what recomputes the input anyway)."""
        if keep == "source":
            return self.v0_bytes
        if keep == "input":
            return self.input_bytes
        return self.h_bytes + (self.input_bytes if self.keeps_input else 0)

    def recompute_us(self, cal: "Calibration") -> float:
        """Extra time of rerunning the forward scan in backward. A backward kernel that reruns the forward
        block by block (``in_kernel_rerun``) adds reading the input again and the scan's sequential part:
        the writes of H and the spike bits, and backward's reads of them, disappear. A separate rerun writes
        H for all steps and backward reads it back: it costs about a whole forward scan, its measured
        forward time when known.

        NOTE: the bytes-only prediction was once used for both, and put SEW-ResNet's separate reruns at
        42 us where they took 0.7 ms; with the in-kernel rerun memory='min' trains as fast as 'max' on seed
        001's CSNN (69.6 vs 71.7 ms), which is what the prediction says."""
        if self.measured_us is not None and not self.in_kernel_rerun:
            return self.measured_us
        return cal.op_time(self.M * self.itemsize * (1 if self.broadcast else self.K)) + self.K * cal.step_us

    def source_recompute_us(self, cal: "Calibration") -> Optional[float]:
        """Extra time of keep "source": the producer's forward again (measured) plus the scan's rerun;
        None when there is no producer to rerun or it was not timed."""
        if self.source is None or self.source_us is None:
            return None
        return self.source_us + self.recompute_us(cal)


@dataclass(frozen=True)
class LayerPlan:
    """One scan's decision: ``keep`` "h", "input" or "source", the bytes kept, the predicted recompute time
    (us, spent in backward unless ``keep == "h"``) and why."""

    name: str
    layer: str
    keep: str
    kept_bytes: int
    recompute_us: float
    why: str

    def as_dict(self) -> Dict[str, object]:
        return {"task": self.name, "layer": self.layer, "keep": self.keep, "kept_bytes": self.kept_bytes,
                "recompute_us": round(self.recompute_us, 1), "why": self.why}


@dataclass(frozen=True)
class MemoryPlan:
    """The plan of one specialization: ``mode`` (the ``memory=`` option), ``step_us`` (the training step it
    was planned against; None before one was measured), ``layers`` in schedule order."""

    mode: str
    step_us: Optional[float]
    layers: Tuple[LayerPlan, ...]

    def recompute(self, name: str) -> bool:
        return any(p.name == name and p.keep != "h" for p in self.layers)

    def from_source(self, name: str) -> bool:
        """Whether this scan's input is recomputed from its producer's kept input (keep "source")."""
        return any(p.name == name and p.keep == "source" for p in self.layers)

    @property
    def kept_bytes(self) -> int:
        return sum(p.kept_bytes for p in self.layers)

    @property
    def recompute_us(self) -> float:
        return sum(p.recompute_us for p in self.layers if p.keep != "h")

    def by_layer(self) -> Dict[str, Dict[str, object]]:
        """Per layer (module name): keep (one value, or "mixed" over its chunks), bytes kept, recompute us."""
        out: Dict[str, Dict[str, object]] = {}
        for p in self.layers:
            d = out.setdefault(p.layer, {"keep": p.keep, "kept_bytes": 0, "recompute_us": 0.0, "why": p.why})
            if d["keep"] != p.keep:
                d["keep"] = "mixed"
            d["kept_bytes"] += p.kept_bytes
            d["recompute_us"] += p.recompute_us if p.keep != "h" else 0.0
        return out

    def summary(self) -> str:
        n = sum(1 for p in self.layers if p.keep != "h")
        src = sum(1 for p in self.layers if p.keep == "source")
        step = "" if self.step_us is None else f", {100 * self.recompute_us / self.step_us:.1f}% of a {self.step_us / 1e3:.1f} ms step"
        return (f"memory={self.mode!r}: {n}/{len(self.layers)} neuron scans recompute in backward"
                f"{f' ({src} with their input, from its producer)' if src else ''} "
                f"(predicted {self.recompute_us / 1e3:.2f} ms{step}), {self.kept_bytes / 2 ** 20:.1f} MiB kept by neuron scans")

    def as_dict(self) -> Dict[str, object]:
        return {"mode": self.mode, "step_us": self.step_us, "kept_bytes": self.kept_bytes,
                "recompute_us": round(self.recompute_us, 1), "layers": [p.as_dict() for p in self.layers]}


def plan_memory(scans: Iterable[ScanCost], mode: str, cal: Optional["Calibration"] = None,
                step_us: Optional[float] = None, budget: float = BUDGET) -> MemoryPlan:
    """The per-scan plan for ``memory=mode``: "max"/"half" keep H everywhere, "min" recomputes every scan
    that can (from its producer where there is one: keep "source", unless measured to save under
    ``MIN_RATE_MIN``), "default" takes recomputations in
    order of bytes saved per microsecond of predicted cost (each saving at least ``MIN_GAIN`` of what the
    layer keeps) while their total stays within ``budget`` of ``step_us``: first keep "input" where it
    pays, then keep "source" (the producer's forward again) where that still fits. Keeps H everywhere
    while ``step_us`` or ``cal`` is unknown, i.e. before a training step was measured."""
    scans = tuple(scans)
    cost = {s.name: (s.recompute_us(cal) if cal is not None else 0.0) for s in scans}
    src_cost = {s.name: (s.source_recompute_us(cal) if cal is not None else None) for s in scans}
    chosen: Dict[str, Tuple[str, str]] = {}
    if mode == "min":
        for s in scans:
            if not s.can_recompute:
                continue
            keep, why = ("source" if s.source is not None else "input"), "memory='min'"
            if keep == "source" and s.source_us is not None:      # the producer's rerun, measured
                b = s.kept_bytes("input") - s.kept_bytes("source")
                if b < MIN_RATE_MIN * s.source_us:
                    keep, why = "input", (f"memory='min'; rerunning its producer '{s.source}' would cost "
                                          f"{s.source_us:.0f} us more to save {b / 2 ** 20:.2f} MiB "
                                          f"(under 1 MiB per 10 ms)")
            chosen[s.name] = (keep, why)
    elif mode == "default" and cal is not None and step_us is not None and step_us > 0:
        allowed = budget * step_us
        gain = {s.name: s.kept_bytes("h") - s.kept_bytes("input") for s in scans}
        order = sorted((s for s in scans if s.can_recompute and gain[s.name] > 0 and
                        gain[s.name] >= MIN_GAIN * s.kept_bytes("h") and gain[s.name] >= MIN_RATE * cost[s.name]),
                       key=lambda s: -gain[s.name] / max(cost[s.name], 1e-3))
        spent = 0.0
        for s in order:
            if spent + cost[s.name] <= allowed:
                spent += cost[s.name]
                chosen[s.name] = ("input", f"saves {gain[s.name] / 2 ** 20:.1f} MiB for {cost[s.name]:.0f} us")
        # then the producer's rerun, where the rest of the budget allows: (extra bytes, extra us) per layer
        extra: Dict[str, Tuple[int, float]] = {}
        for s in scans:
            sc = src_cost[s.name]
            if not s.can_recompute or sc is None:
                continue
            now = chosen.get(s.name, ("h", ""))[0]
            b = s.kept_bytes(now) - s.kept_bytes("source")
            us = sc - (cost[s.name] if now == "input" else 0.0)
            if b > 0 and b >= MIN_GAIN * s.kept_bytes(now) and b >= MIN_RATE * us:
                extra[s.name] = (b, us)
        for name in sorted(extra, key=lambda n: -extra[n][0] / max(extra[n][1], 1e-3)):
            b, us = extra[name]
            if spent + us <= allowed:
                spent += us
                chosen[name] = ("source", f"saves {b / 2 ** 20:.1f} MiB more by rerunning its producer "
                                          f"({src_cost[name]:.0f} us in all)")
    layers = []
    for s in scans:
        if s.name in chosen:
            keep, why = chosen[s.name]
            us = src_cost[s.name] if keep == "source" and src_cost[s.name] is not None else cost[s.name]
            layers.append(LayerPlan(s.name, s.layer, keep, s.kept_bytes(keep), us, why))
            continue
        if not s.can_recompute:
            why = s.why or "cannot recompute"
        elif mode in ("max", "half"):
            why = f"memory={mode!r}"
        elif step_us is None or cal is None:
            why = "no training step measured yet"
        elif s.kept_bytes("h") <= s.kept_bytes("input") and src_cost[s.name] is None:
            why = "recomputing saves nothing"
        elif s.kept_bytes("h") - s.kept_bytes("input") < MIN_GAIN * s.kept_bytes("h") and src_cost[s.name] is None:
            why = f"recomputing saves under {100 * MIN_GAIN:.1f}% of what it keeps"
        elif src_cost[s.name] is not None and s.kept_bytes("h") - s.kept_bytes("source") < MIN_RATE * src_cost[s.name]:
            why = (f"recomputing with its producer '{s.source}' would cost {src_cost[s.name]:.0f} us to save "
                   f"{(s.kept_bytes('h') - s.kept_bytes('source')) / 2 ** 20:.2f} MiB (under 1 MiB per ms)")
        elif src_cost[s.name] is not None:
            why = (f"over the {100 * budget:.0f}% budget ({src_cost[s.name]:.0f} us with its producer "
                   f"'{s.source}')")
        else:
            why = f"over the {100 * budget:.0f}% budget ({cost[s.name]:.0f} us)"
        layers.append(LayerPlan(s.name, s.layer, "h", s.kept_bytes("h"), cost[s.name], why))
    return MemoryPlan(mode, step_us, tuple(layers))
