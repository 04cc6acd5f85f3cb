"""snncc's IR: tasks over (layer, timestep range), wired in a networkx DAG, and the schedule that runs them.

Everything here is a frozen dataclass of hashable values. A task names the module it runs by qualname (a
key into the model), never by holding its tensors, so a TaskGraph can be printed, compared, snapshotted and
visualized without touching weights.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, Optional, Tuple

import networkx as nx

__all__ = ["Ref", "Steps", "SliceConst", "Fusion", "Task", "TaskGraph", "Schedule", "TASK_KINDS", "EDGE_KINDS",
           "FUSION_KINDS"]

#: placeholder: a model input; get_attr: a parameter/buffer/constant; module/function/method: one
#: stateless op (over one step, or over a chunk of steps when ``batched``); neuron: a neuron layer's scan
#: over a chunk of steps; opaque: a stateful module snncc does not know, called as is for one step;
#: output: the model's result.
TASK_KINDS = ("placeholder", "get_attr", "module", "function", "method", "neuron", "opaque", "output")
#: data: a value flows; state: a stateful layer's chunk follows its previous chunk; order: random-number
#: draws (and opaque modules) keep eager's program order.
EDGE_KINDS = ("data", "state", "order")
#: maxpool_epilogue: a max pool of a neuron's spikes computed by the neuron's kernel (max of spikes = OR);
#: bn_fold: an eval-mode BatchNorm folded into the preceding convolution's weights;
#: bn_train: a training-mode BatchNorm (per-step statistics) applied by the neuron's kernel to its input.
#: recurrent: a Linear of the neuron's own previous spikes added to its input, run inside its loop
#: (``module`` is the Linear; the task's args are ``(Steps(e_t), previous spikes or None)``);
#: conv_maxpool: the max pool after a training convolution, run with it as one op whose backward works
#: from the pooled gradient (``module`` is the pool; ``params`` its kernel size).
FUSION_KINDS = ("maxpool_epilogue", "bn_fold", "bn_train", "recurrent", "conv_maxpool")


@dataclass(frozen=True)
class Ref:
    """The value a task produced; ``step`` selects one timestep of a time-batched task's output."""

    task: str
    step: Optional[int] = None


@dataclass(frozen=True)
class Steps:
    """One value per timestep, packed along dim 0 (``[K*N, ...]``) for a time-batched task."""

    refs: Tuple[Ref, ...]


@dataclass(frozen=True)
class SliceConst:
    """A ``slice`` (not hashable before Python 3.12) inside a task's arguments."""

    start: Any
    stop: Any
    step: Any

    def to_slice(self) -> slice:
        return slice(self.start, self.stop, self.step)


@dataclass(frozen=True)
class Fusion:
    """Work another task used to do, absorbed into this one by ``fuse_conv_bn_neuron``.

    ``module`` is the absorbed module's qualname, ``task`` the name of the task it replaced (for the
    visualizer), ``params`` its hashable settings (the pool's kernel size).
    """

    kind: str
    module: str
    task: str
    params: Tuple[Any, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in FUSION_KINDS:
            raise ValueError(f"unknown fusion kind {self.kind!r}")


@dataclass(frozen=True)
class Task:
    """One unit of the schedule.

    ``t0``/``t1`` is the timestep range ``[t0, t1)``; both are None for time-invariant work (run once).
    ``batched`` tasks run ``t1 - t0`` steps at once and produce ``[K*N, ...]``; ``Ref(name, i)`` is step
    ``t0 + i`` of it. ``target`` is a module qualname (module, neuron, opaque, get_attr), a callable
    (function) or a method name. ``order`` is the position of its first fx node in program order.
    """

    name: str
    kind: str
    layer: str
    target: Any
    args: Tuple[Any, ...] = ()
    kwargs: Tuple[Tuple[str, Any], ...] = ()
    t0: Optional[int] = None
    t1: Optional[int] = None
    batched: bool = False
    order: int = 0
    nodes: Tuple[str, ...] = ()
    fused: Tuple[Fusion, ...] = ()
    spike_input: bool = False     # a conv/linear whose input is spikes: kept for backward as packed bits

    def fusion(self, kind: str) -> Optional[Fusion]:
        """The fusion of ``kind`` this task carries, if any."""
        return next((f for f in self.fused if f.kind == kind), None)

    def __post_init__(self) -> None:
        if self.kind not in TASK_KINDS:
            raise ValueError(f"unknown task kind {self.kind!r}")

    @property
    def steps(self) -> int:
        """Number of timesteps this task covers (1 for time-invariant tasks)."""
        return 1 if self.t0 is None else self.t1 - self.t0

    @property
    def label(self) -> str:
        time = "t=*" if self.t0 is None else (f"t={self.t0}" if self.steps == 1 else f"t={self.t0}..{self.t1 - 1}")
        return f"{self.layer} [{time}]"


@dataclass
class TaskGraph:
    """Tasks as nodes of a ``networkx.DiGraph``; edges carry ``kind`` in EDGE_KINDS."""

    graph: nx.DiGraph = field(default_factory=nx.DiGraph)
    output: Optional[str] = None

    def add_task(self, task: Task) -> None:
        if task.name in self.graph:
            raise ValueError(f"duplicate task {task.name}")
        self.graph.add_node(task.name, task=task)

    def add_edge(self, src: str, dst: str, kind: str) -> None:
        if kind not in EDGE_KINDS:
            raise ValueError(f"unknown edge kind {kind!r}")
        if self.graph.has_edge(src, dst) and self.graph.edges[src, dst]["kind"] != "data":
            return
        self.graph.add_edge(src, dst, kind=kind)

    def task(self, name: str) -> Task:
        return self.graph.nodes[name]["task"]

    def tasks(self) -> Iterator[Task]:
        for n in self.graph.nodes:
            yield self.graph.nodes[n]["task"]

    def edges(self, kind: Optional[str] = None) -> Iterator[Tuple[str, str]]:
        for u, v, k in self.graph.edges(data="kind"):
            if kind is None or k == kind:
                yield u, v

    def __len__(self) -> int:
        return self.graph.number_of_nodes()

    def summary(self) -> Dict[str, int]:
        """Counts by task kind plus batched tasks and edges: what a pass snapshot records."""
        out: Dict[str, int] = {}
        for t in self.tasks():
            out[t.kind] = out.get(t.kind, 0) + 1
            if t.batched:
                out["batched"] = out.get("batched", 0) + 1
        for kind in EDGE_KINDS:
            out[f"{kind}_edges"] = sum(1 for _ in self.edges(kind))
        return out


@dataclass(frozen=True)
class Schedule:
    """Tasks in execution order, grouped in waves (tasks of one wave do not depend on each other)."""

    order: Tuple[str, ...]
    waves: Tuple[Tuple[str, ...], ...]
    policy: str = "layer_major"
