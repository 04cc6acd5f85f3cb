"""The stream plan: which stream runs each task of a Schedule, and which events it must wait for.

A wavefront schedule's waves hold independent tasks (chunk c of layer l beside chunk c+1 of layer l-1); on
a GPU they overlap when they run on different CUDA streams. The plan puts the i-th task of a wave on stream
``i % n_streams`` and orders the streams with events: a task waits for a predecessor on another stream
only if its stream does not already know that predecessor is done (vector clocks over the streams), so
chains of dependencies cost one wait, not one per edge.

The plan is pure data, tested on any machine. A backend carries it out: ``NullBackend`` records what it
was asked to do (the tests replay that record to prove every dependency is honoured); ``CudaBackend``
issues the same calls on ``torch.cuda.Stream``/``Event`` objects, and marks tensors consumed on another
stream with ``record_stream`` so the caching allocator does not reuse them early.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from snncc.ir import Schedule, TaskGraph

__all__ = ["StreamPlan", "plan_streams", "NullBackend", "CudaBackend", "check_plan"]


@dataclass(frozen=True)
class StreamPlan:
    """``stream_of[task]``: its stream; ``waits[task]``: tasks (on other streams) whose completion event it
    waits for before running; ``record``: tasks after which an event is recorded (someone waits on it)."""

    order: Tuple[str, ...]
    stream_of: Dict[str, int]
    waits: Dict[str, Tuple[str, ...]]
    record: frozenset
    n_streams: int

    def summary(self) -> Dict[str, int]:
        return {"streams": self.n_streams, "tasks": len(self.order),
                "waits": sum(len(w) for w in self.waits.values()), "events": len(self.record)}


def _assign(schedule: Schedule, n_streams: int) -> Dict[str, int]:
    stream_of: Dict[str, int] = {}
    for wave in schedule.waves:
        for i, name in enumerate(wave):
            stream_of[name] = i % n_streams
    return stream_of


def plan_streams(tg: TaskGraph, schedule: Schedule, n_streams: int = 1) -> StreamPlan:
    """Streams by wave position, minimal cross-stream waits (see the module docstring)."""
    if n_streams < 1:
        raise ValueError(f"plan_streams: n_streams must be >= 1, got {n_streams}")
    stream_of = _assign(schedule, n_streams)
    pos: Dict[str, int] = {}                       # a task's position in its stream's issue order
    count = [0] * n_streams
    clock = [[-1] * n_streams for _ in range(n_streams)]   # clock[s][r]: last pos of stream r known done on s
    clock_at: Dict[str, List[int]] = {}              # the issuing stream's clock right after the task
    waits: Dict[str, Tuple[str, ...]] = {}
    record = set()
    for name in schedule.order:
        s = stream_of[name]
        mine: List[str] = []
        preds = sorted(tg.graph.predecessors(name), key=lambda u: pos.get(u, -1), reverse=True)
        for u in preds:
            r = stream_of[u]
            if r == s or clock[s][r] >= pos[u]:
                continue                             # same stream (in order) or already known done
            mine.append(u)
            record.add(u)
            clock[s] = [max(a, b) for a, b in zip(clock[s], clock_at[u])]
        pos[name] = count[s]
        count[s] += 1
        clock[s][s] = pos[name]
        clock_at[name] = list(clock[s])
        waits[name] = tuple(mine)
    return StreamPlan(tuple(schedule.order), stream_of, waits, frozenset(record), n_streams)


@dataclass
class NullBackend:
    """Records the stream operations a plan asks for; runs nothing concurrently (any device)."""

    log: List[Tuple[str, ...]] = field(default_factory=list)

    def wait(self, stream: int, task: str) -> None:
        self.log.append(("wait", str(stream), task))

    def launch(self, stream: int, task: str) -> Any:
        self.log.append(("launch", str(stream), task))
        return None

    def record(self, stream: int, task: str) -> None:
        self.log.append(("record", str(stream), task))

    def consumed(self, stream: int, values: Iterable[Any]) -> None:
        pass

    def join(self) -> None:
        self.log.append(("join", "0", ""))


class CudaBackend:
    """The plan on real CUDA streams: ``launch`` returns the context to run the task in."""

    def __init__(self, n_streams: int, device: Any = None) -> None:
        import torch
        self.torch = torch
        self.streams = [torch.cuda.current_stream(device)] + \
            [torch.cuda.Stream(device) for _ in range(n_streams - 1)]
        self.events: Dict[str, Any] = {}

    def wait(self, stream: int, task: str) -> None:
        self.streams[stream].wait_event(self.events[task])

    def launch(self, stream: int, task: str) -> Any:
        return self.torch.cuda.stream(self.streams[stream])

    def record(self, stream: int, task: str) -> None:
        ev = self.torch.cuda.Event()
        ev.record(self.streams[stream])
        self.events[task] = ev

    def consumed(self, stream: int, values: Iterable[Any]) -> None:
        """Tensors produced on another stream and read on ``stream``: keep the allocator from reusing them
        before ``stream`` is done with them."""
        for v in values:
            if isinstance(v, self.torch.Tensor) and v.is_cuda:
                v.record_stream(self.streams[stream])

    def join(self) -> None:
        """The caller's stream waits for every other stream (the output is read there)."""
        main = self.streams[0]
        for s in self.streams[1:]:
            main.wait_stream(s)


def check_plan(tg: TaskGraph, plan: StreamPlan, log: Sequence[Tuple[str, ...]]) -> None:
    """Replay a backend's log and raise AssertionError if a task could start before a predecessor is done.

    Semantics of CUDA streams: operations on one stream run in order; ``wait(s, u)`` makes everything
    issued later on stream s wait for the event recorded after u.
    """
    known: Dict[int, Dict[str, bool]] = {}
    done_on: Dict[int, List[str]] = {}
    events: Dict[str, frozenset] = {}
    for entry in log:
        if entry[0] == "join":
            continue
        op, s, task = entry[0], int(entry[1]), entry[2]
        done_on.setdefault(s, [])
        known.setdefault(s, {})
        if op == "launch":
            for u in tg.graph.predecessors(task):
                ok = u in done_on[s] or known[s].get(u, False)
                assert ok, f"{task} on stream {s} may start before {u} (stream {plan.stream_of[u]}) is done"
            done_on[s].append(task)
        elif op == "record":
            events[task] = frozenset(done_on[s]) | frozenset(k for k, v in known[s].items() if v)
        elif op == "wait":
            assert task in events, f"stream {s} waits for {task}'s event before it is recorded"
            for k in events[task]:
                known[s][k] = True
