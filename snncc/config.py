"""Compile options: what ``snncc.compile`` may trade, all explicit, exact by default."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from .errors import InputError

__all__ = ["Options", "MEMORY_MODES"]

#: default: per neuron layer, a cost model (passes/plan_memory.py) picks what min keeps where rerunning the
#:   scan in backward costs little (<= 5% of the measured training step in all), else what max keeps (exact).
#: max: H kept in the input's dtype (float32) and the spikes as bits for every layer (fastest backward).
#: half: H kept in float16 for backward (forward and spikes unchanged; gradients to half precision).
#: min: neuron kernels keep only their input and initial V; backward reruns the forward scan (exact).
#: Spike inputs of conv/linear layers are kept as bits in every mode (``bitpack``).
MEMORY_MODES = ("default", "max", "half", "min")


@dataclass(frozen=True)
class Options:
    """``fuse``: run the fusion passes (max pool into the neuron kernel, eval BatchNorm into the conv).
    ``bitpack``: keep spike inputs of conv/linear layers as bits for backward. ``memory``: MEMORY_MODES.
    ``chunk``: timesteps per task (None: all T, layer-major); smaller chunks give a wavefront schedule;
    ``"auto"``: chosen per specialization by the cost model of ``passes/choose_chunk.py``.
    ``streams``: on CUDA, the waves' tasks are spread over this many streams (runtime/streams.py).
    ``cuda_graphs``: capture each specialization's steady-state call in a CUDA graph (runtime/graphs.py)."""

    fuse: bool = True
    bitpack: bool = True
    memory: str = "default"
    chunk: Union[int, str, None] = None   # timesteps per task; None = all T (layer-major); "auto"
    streams: int = 1                # CUDA streams the waves are spread over (CPU: always one)
    cuda_graphs: bool = False       # replay warm specializations from CUDA graphs (runtime/graphs.py)

    def __post_init__(self) -> None:
        if self.chunk is not None and self.chunk != "auto" and (
                isinstance(self.chunk, bool) or not isinstance(self.chunk, int) or self.chunk < 1):
            raise InputError(f"snncc.compile: chunk must be a positive int (timesteps per task), 'auto' or None, "
                             f"got {self.chunk!r}")
        if isinstance(self.streams, bool) or not isinstance(self.streams, int) or self.streams < 1:
            raise InputError(f"snncc.compile: streams must be a positive int, got {self.streams!r}")
        if not isinstance(self.cuda_graphs, bool):
            raise InputError(f"snncc.compile: cuda_graphs must be True or False, got {self.cuda_graphs!r}")
        if self.memory not in MEMORY_MODES:
            raise InputError(f"snncc.compile: memory must be one of {MEMORY_MODES}, got {self.memory!r}")
