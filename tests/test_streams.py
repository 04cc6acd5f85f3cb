"""The stream plan (runtime/streams.py): every dependency honoured, few waits, same numbers; run through
the recording NullBackend, so no GPU is needed."""
from __future__ import annotations

import copy

import networkx as nx
import pytest
import torch
from torch import nn

import snncc
from snncc.ir import Schedule, Task, TaskGraph
from snncc.runtime.streams import NullBackend, check_plan, plan_streams

from test_fusion import ConvPoolNet


def _diamond() -> TaskGraph:
    tg = TaskGraph(output="d")
    for i, n in enumerate("abcd"):
        tg.add_task(Task(n, "function", n, None, order=i))
    for u, v in (("a", "b"), ("a", "c"), ("b", "d"), ("c", "d")):
        tg.add_edge(u, v, "data")
    return tg


def _waves(tg):
    from snncc.passes import schedule_wavefront
    return schedule_wavefront(tg)


def _replay(plan):
    """What an executor issues for ``plan``, recorded by the NullBackend."""
    be = NullBackend()
    for n in plan.order:
        for u in plan.waits[n]:
            be.wait(plan.stream_of[n], u)
        be.launch(plan.stream_of[n], n)
        if n in plan.record:
            be.record(plan.stream_of[n], n)
    return be.log


def test_one_stream_needs_no_events():
    tg = _diamond()
    plan = plan_streams(tg, _waves(tg), 1)
    assert plan.summary()["waits"] == 0 and not plan.record
    assert set(plan.stream_of.values()) == {0}


def test_diamond_on_two_streams_waits_where_needed():
    tg = _diamond()
    plan = plan_streams(tg, _waves(tg), 2)
    assert plan.stream_of["b"] != plan.stream_of["c"]
    # the task on the second stream waits for a; d waits for the task of the other stream
    other = "c" if plan.stream_of["c"] == 1 else "b"
    assert plan.waits[other] == ("a",)
    assert len(plan.waits["d"]) == 1
    check_plan(tg, plan, _replay(plan))


def test_check_plan_catches_a_missing_wait():
    tg = _diamond()
    plan = plan_streams(tg, _waves(tg), 2)
    other = "c" if plan.stream_of["c"] == 1 else "b"
    log = [("launch", "0", "a"), ("launch", "1", other)]
    with pytest.raises(AssertionError, match="before a"):
        check_plan(tg, plan, log)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("n_streams", [2, 3, 4])
def test_random_dags_plans_are_valid_and_waits_not_redundant(seed, n_streams):
    g = nx.gnp_random_graph(30, 0.15, seed=seed, directed=True)
    tg = TaskGraph()
    for n in range(30):
        tg.add_task(Task(f"t{n}", "function", f"l{n}", None, order=n))
    for u, v in g.edges:
        if u < v:
            tg.add_edge(f"t{u}", f"t{v}", "data")
    tg.output = "t29"
    sched = _waves(tg)
    plan = plan_streams(tg, sched, n_streams)
    check_plan(tg, plan, _replay(plan))
    cross = sum(1 for u, v in tg.graph.edges if plan.stream_of[u] != plan.stream_of[v])
    assert plan.summary()["waits"] <= cross


@pytest.mark.parametrize("chunk", [1, 2])
def test_executor_on_planned_streams_matches_eager(chunk):
    """The executor issues waits/launches/records per the plan (NullBackend on CPU): same values, and the
    log it produced honours every dependency of the real model's task graph."""
    torch.manual_seed(0)
    model = ConvPoolNet(bn=True).double()
    ref = copy.deepcopy(model)
    x = torch.rand(3, 2, 8, 8, dtype=torch.float64) * 3
    cm = snncc.compile(model, T=4, chunk=chunk)
    compiled, ex = cm._specialization((x,))
    plan = plan_streams(compiled.task_graph, compiled.schedule, 3)
    be = NullBackend()
    ex.use_streams(plan, be)
    y = cm(x)
    from conftest import eager_run
    assert torch.equal(y, eager_run(ref, x, T=4))
    launched = [e[2] for e in be.log if e[0] == "launch"]
    assert launched == list(compiled.schedule.order)
    assert len({e[1] for e in be.log if e[0] == "launch"}) > 1       # really spread over streams
    check_plan(compiled.task_graph, plan, be.log)
