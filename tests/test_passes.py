"""Unit tests per pass: structure of what each pass produces, and the verifier's invariants.

Uses the pieces directly: ``snncc.frontend.trace_unrolled`` -> ``snncc.passes.*`` -> ``snncc.pipeline``.
"""
from __future__ import annotations

from collections import Counter
from typing import List

import networkx as nx
import pytest
import torch
from torch import nn

import snncc
from snncc import passes
from snncc.frontend import trace_unrolled
from snncc.ir import Ref, Schedule, Task, TaskGraph
from snncc.pipeline import compile_graph
from snncc.runtime import neuron_scan
from snncc.verify import VerificationError, verify_schedule, verify_task_graph

from conftest import assert_same_training


class FF(nn.Module):
    """A feedforward step model: conv -> LIF -> flatten -> linear -> IF."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.sn1 = snncc.LIF()
        self.fc = nn.Linear(4 * 8 * 8, 5)
        self.sn2 = snncc.IF()

    def forward(self, x):
        return self.sn2(self.fc(self.sn1(self.conv(x) * 2.0).flatten(1)) * 4.0)


class BNFF(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.sn = snncc.LIF()

    def forward(self, x):
        return self.sn(self.bn(self.conv(x)))


class Recurrent(nn.Module):
    """Loops itself; spikes of step t-1 are concatenated to the input of step t."""

    def __init__(self, T: int = 4) -> None:
        super().__init__()
        self.T = T
        self.fc = nn.Linear(6 + 8, 8)
        self.sn = snncc.LIF()

    def forward(self, x):
        s = x.new_zeros((x.shape[0], 8))
        outs = []
        for _ in range(self.T):
            s = self.sn(self.fc(torch.cat([x, s], dim=1)) * 4.0)
            outs.append(s)
        return torch.stack(outs)


class LoopFF(nn.Module):
    def __init__(self, T: int = 4) -> None:
        super().__init__()
        self.T, self.body = T, FF()

    def forward(self, x):
        return torch.stack([self.body(x) for _ in range(self.T)]).mean(0)


def _pipeline(model: nn.Module, form: str, T=None):
    traced = trace_unrolled(model, form, T)
    hoisted, merged = passes.hoist_time_invariant(traced)
    tags = passes.tag_timesteps(hoisted)
    groups = passes.batch_over_time(hoisted, tags)
    return traced, hoisted, merged, tags, groups


def _module_calls(graph, target: str) -> List:
    return [n for n in graph.nodes if n.op == "call_module" and n.target == target]


# --------------------------------------------------------------------------- frontend
@pytest.mark.parametrize("form,T", [("static", 3), ("sequence", 3)])
def test_trace_unrolls_T_steps(form, T):
    traced = trace_unrolled(FF(), form, T)
    assert len(_module_calls(traced.graph, "conv")) == T
    assert len(_module_calls(traced.graph, "sn1")) == T
    assert set(traced.stateful) == {"sn1", "sn2"}
    assert set(traced.bindings) == {"sn1", "sn2"}
    assert traced.bindings["sn1"].spec.kind == "lif" and traced.bindings["sn2"].spec.kind == "if"
    assert traced.form == form


def test_trace_loop_form_unrolls_models_own_loop():
    traced = trace_unrolled(LoopFF(T=5), "loop", None)
    assert len(_module_calls(traced.graph, "body.sn1")) == 5


def test_trace_keeps_unknown_stateful_module_opaque():
    class Counter_(nn.Module):
        def __init__(self):
            super().__init__()
            self.n = 0

        def reset(self):
            self.n = 0

        def forward(self, x):
            self.n += 1
            return x * self.n

    m = nn.Sequential(nn.Linear(3, 3), Counter_(), snncc.LIF())
    traced = trace_unrolled(m, "static", 3)
    assert "1" in traced.stateful and "1" not in traced.bindings
    assert "2" in traced.bindings


# --------------------------------------------------------------------------- hoist_time_invariant
def test_hoist_merges_first_conv_on_static_input():
    T = 4
    traced, hoisted, merged, tags, _ = _pipeline(FF(), "static", T)
    assert len(_module_calls(traced.graph, "conv")) == T
    convs = _module_calls(hoisted.graph, "conv")
    assert len(convs) == 1
    assert merged >= T - 1
    assert tags[convs[0].name].t is None               # time-invariant: runs once
    assert len(_module_calls(hoisted.graph, "sn1")) == T  # neurons are never merged
    assert len(_module_calls(hoisted.graph, "fc")) == T   # fc reads per-step spikes: not invariant


def test_hoist_does_not_merge_sequence_input():
    _, hoisted, merged, tags, _ = _pipeline(FF(), "sequence", 4)
    convs = _module_calls(hoisted.graph, "conv")
    assert len(convs) == 4
    assert sorted(tags[n.name].t for n in convs) == [0, 1, 2, 3]


def test_hoist_returns_new_graph_and_keeps_the_input():
    traced = trace_unrolled(FF(), "static", 3)
    before = len(traced.graph.nodes)
    hoisted, merged = passes.hoist_time_invariant(traced)
    assert hoisted is not traced and hoisted.graph is not traced.graph
    assert len(traced.graph.nodes) == before
    assert len(hoisted.graph.nodes) == before - merged


@pytest.mark.parametrize("train,expected", [(True, 4), (False, 1)])
def test_batchnorm_in_training_is_never_merged(train, expected):
    """Training BN updates running stats per call (T updates): never CSE'd. In eval it is pure and merged."""
    m = BNFF().train(train)
    _, hoisted, _, _, _ = _pipeline(m, "static", 4)
    assert len(_module_calls(hoisted.graph, "bn")) == expected
    assert len(_module_calls(hoisted.graph, "conv")) == 1


def test_dropout_is_never_merged_even_in_eval():
    m = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5), snncc.LIF())
    for mode in (True, False):
        m.train(mode)
        _, hoisted, _, _, _ = _pipeline(m, "static", 3)
        assert len(_module_calls(hoisted.graph, "1")) == 3


def test_is_pure_and_is_random():
    from snncc.passes.hoist_time_invariant import is_pure, is_random
    m = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5), snncc.LIF())
    traced = trace_unrolled(m, "static", 2)
    by_target = {}
    for n in traced.graph.nodes:
        by_target.setdefault(n.target, n)
    assert is_pure(by_target["0"], traced) and not is_random(by_target["0"], traced)
    assert is_random(by_target["1"], traced) and not is_pure(by_target["1"], traced)
    assert not is_pure(by_target["2"], traced)


# --------------------------------------------------------------------------- tag_timesteps
@pytest.mark.parametrize("form,T,model", [pytest.param("static", 4, FF, id="static"),
                                          pytest.param("sequence", 3, FF, id="sequence"),
                                          pytest.param("loop", None, LoopFF, id="loop")])
def test_tag_timesteps_neuron_calls_are_0_to_T_minus_1(form, T, model):
    _, hoisted, _, tags, _ = _pipeline(model(), form, T)
    steps = T or 4
    for target in ("sn1", "sn2") if form != "loop" else ("body.sn1", "body.sn2"):
        calls = _module_calls(hoisted.graph, target)
        assert [tags[n.name].t for n in calls] == list(range(steps))
        assert len({tags[n.name].layer for n in calls}) == 1        # one layer across time
    for n in hoisted.graph.nodes:
        if n.op in ("placeholder", "get_attr"):
            assert tags[n.name].t is None
    orders = [tags[n.name].order for n in hoisted.graph.nodes]
    assert orders == sorted(orders) == list(range(len(orders)))


def test_tag_timesteps_sequence_index_starts_step():
    _, hoisted, _, tags, _ = _pipeline(FF(), "sequence", 3)
    getitems = [n for n in hoisted.graph.nodes if n.op == "call_function" and "getitem" in n.name]
    assert [tags[n.name].t for n in getitems] == [0, 1, 2]


# --------------------------------------------------------------------------- batch_over_time
def test_batch_over_time_one_group_per_layer_feedforward():
    T = 4
    _, hoisted, _, tags, groups = _pipeline(FF(), "static", T)
    layers = Counter(g.layer for g in groups)
    assert all(c == 1 for c in layers.values()), layers
    by_layer = {g.layer: g for g in groups}
    assert by_layer["sn1"].kind == "scan" and len(by_layer["sn1"].nodes) == T
    assert by_layer["sn1"].target == "sn1"
    assert by_layer["sn2"].kind == "scan" and len(by_layer["sn2"].nodes) == T
    assert by_layer["fc"].kind == "batched" and len(by_layer["fc"].nodes) == T
    assert by_layer["conv"].kind == "single"            # hoisted: one node
    # every node is in exactly one group
    grouped = [n for g in groups for n in g.nodes]
    assert sorted(grouped) == sorted(n.name for n in hoisted.graph.nodes)


def test_batch_over_time_groups_are_in_program_order_and_acyclic():
    _, hoisted, _, tags, groups = _pipeline(FF(), "static", 3)
    firsts = [tags[g.nodes[0]].order for g in groups]
    assert firsts == sorted(firsts)
    owner = {n: i for i, g in enumerate(groups) for n in g.nodes}
    gg = nx.DiGraph()
    gg.add_nodes_from(range(len(groups)))
    for node in hoisted.graph.nodes:
        for a in node.all_input_nodes:
            if owner[a.name] != owner[node.name]:
                gg.add_edge(owner[a.name], owner[node.name])
    assert nx.is_directed_acyclic_graph(gg)


def test_batch_over_time_splits_recurrence():
    T = 4
    _, hoisted, _, tags, groups = _pipeline(Recurrent(T), "loop")
    fc = [g for g in groups if any(n in {c.name for c in _module_calls(hoisted.graph, "fc")} for n in g.nodes)]
    assert len(fc) == T and all(len(g.nodes) == 1 for g in fc)      # step t needs spikes of t-1
    sn = [g for g in groups if g.target == "sn"]
    assert len(sn) == T and all(len(g.nodes) == 1 and g.kind == "scan" for g in sn)


# --------------------------------------------------------------------------- build_task_graph and verify
@pytest.mark.parametrize("model,form,T", [
    pytest.param(FF, "static", 3, id="ff-static"), pytest.param(LoopFF, "loop", None, id="ff-loop"),
    pytest.param(Recurrent, "loop", None, id="recurrent-loop"),
    pytest.param(FF, "sequence", 3, id="ff-sequence"),
    pytest.param(lambda: BNFF().train(), "static", 3, id="bn-train-static"),
])
def test_build_task_graph_passes_verify(model, form, T):
    _, hoisted, _, tags, groups = _pipeline(model(), form, T)
    tg = passes.build_task_graph(hoisted, tags, groups)
    verify_task_graph(tg, "build_task_graph")
    assert len(tg) == len(groups)
    assert tg.output is not None and tg.task(tg.output).kind == "output"
    for u, v in tg.edges("state"):
        assert tg.task(u).target == tg.task(v).target


def test_build_task_graph_state_edges_chain_split_neuron():
    _, hoisted, _, tags, groups = _pipeline(Recurrent(4), "loop")
    tg = passes.build_task_graph(hoisted, tags, groups)
    chain = [(u, v) for u, v in tg.edges("state")]
    assert len(chain) == 3
    times = sorted((tg.task(u).t0, tg.task(v).t0) for u, v in chain)
    assert times == [(0, 1), (1, 2), (2, 3)]


def test_build_task_graph_minimal_sequence_model():
    """Regression: a batched group (Linear) reading single-step tasks later in program order (x_seq[t])
    used to add its edges before those tasks existed ('ValueError: duplicate task getitem_1')."""
    m = nn.Sequential(nn.Linear(4, 3), snncc.LIF())
    _, hoisted, _, tags, groups = _pipeline(m, "sequence", 3)
    tg = passes.build_task_graph(hoisted, tags, groups)
    verify_task_graph(tg)


def _tiny_graph() -> TaskGraph:
    tg = TaskGraph()
    tg.add_task(Task("x", "placeholder", "x", None))
    tg.add_task(Task("f", "function", "f", torch.relu, args=(Ref("x"),)))
    tg.add_task(Task("out", "output", "out", "output", args=(Ref("f"),)))
    tg.add_edge("x", "f", "data")
    tg.add_edge("f", "out", "data")
    tg.output = "out"
    return tg


def test_verify_task_graph_rejects_broken_graphs():
    verify_task_graph(_tiny_graph())
    tg = _tiny_graph()
    tg.graph.remove_edge("x", "f")
    with pytest.raises(VerificationError, match="without an edge"):
        verify_task_graph(tg)
    tg = _tiny_graph()
    tg.add_edge("out", "x", "order")
    with pytest.raises(VerificationError, match="cycle"):
        verify_task_graph(tg)
    tg = _tiny_graph()
    tg.output = None
    with pytest.raises(VerificationError, match="no output"):
        verify_task_graph(tg)
    tg = _tiny_graph()
    tg.graph.nodes["f"]["task"] = Task("f", "function", "f", torch.relu, args=(Ref("x", 0),))
    with pytest.raises(VerificationError, match="not batched"):
        verify_task_graph(tg)


def test_verify_schedule_rejects_bad_orders():
    tg = _tiny_graph()
    verify_schedule(tg, Schedule(("x", "f", "out"), (("x",), ("f",), ("out",))))
    with pytest.raises(VerificationError, match="before its input"):
        verify_schedule(tg, Schedule(("f", "x", "out"), ()))
    with pytest.raises(VerificationError, match="exactly once"):
        verify_schedule(tg, Schedule(("x", "out"), ()))
    with pytest.raises(VerificationError, match="exactly once"):
        verify_schedule(tg, Schedule(("x", "f", "f", "out"), ()))


def test_ir_rejects_unknown_kinds():
    with pytest.raises(ValueError):
        Task("a", "bogus", "a", None)
    with pytest.raises(ValueError):
        TaskGraph().add_edge("a", "b", "bogus")
    tg = TaskGraph()
    tg.add_task(Task("a", "placeholder", "a", None))
    with pytest.raises(ValueError, match="duplicate"):
        tg.add_task(Task("a", "placeholder", "a", None))


# --------------------------------------------------------------------------- schedule_layer_major
@pytest.mark.parametrize("model,form,T", [pytest.param(FF, "static", 4, id="ff-static"),
                                          pytest.param(LoopFF, "loop", None, id="ff-loop"),
                                          pytest.param(Recurrent, "loop", None, id="recurrent-loop")])
def test_schedule_is_topological_and_waves_partition(model, form, T):
    _, hoisted, _, tags, groups = _pipeline(model(), form, T)
    tg = passes.build_task_graph(hoisted, tags, groups)
    sched = passes.schedule_layer_major(tg)
    verify_schedule(tg, sched)
    pos = {n: i for i, n in enumerate(sched.order)}
    assert all(pos[u] < pos[v] for u, v in tg.graph.edges)
    flat = [n for w in sched.waves for n in w]
    assert sorted(flat) == sorted(sched.order)
    wave_of = {n: i for i, w in enumerate(sched.waves) for n in w}
    assert all(wave_of[u] < wave_of[v] for u, v in tg.graph.edges)   # a wave's tasks are independent
    assert sched.policy == "layer_major"


# --------------------------------------------------------------------------- the pipeline
def test_compile_graph_snapshots_every_pass_in_order():
    c = compile_graph(trace_unrolled(FF(), "static", 3), verify=True)
    assert [s.name for s in c.snapshots] == ["trace", "hoist_time_invariant", "fold_matmul_scale", "tag_timesteps",
                                             "batch_over_time", "build_task_graph", "fuse_conv_bn_neuron",
                                             "insert_bitpack", "schedule_layer_major"]
    snap = {s.name: s.stats for s in c.snapshots}
    assert snap["hoist_time_invariant"]["merged"] >= 2
    assert snap["tag_timesteps"]["timesteps"] == 3
    assert snap["build_task_graph"]["neuron"] == 2
    assert snap["schedule_layer_major"]["tasks"] == len(c.task_graph)
    # each snapshot carries the graph the pass produced
    assert c.snapshot("trace").graph.number_of_nodes() == snap["trace"]["nodes"]
    assert c.snapshot("hoist_time_invariant").graph.number_of_nodes() == snap["hoist_time_invariant"]["nodes"]
    tagged = c.snapshot("tag_timesteps").graph
    assert {d["t"] for _, d in tagged.nodes(data=True)} - {None} == {0, 1, 2}
    assert len({d["group"] for _, d in c.snapshot("batch_over_time").graph.nodes(data=True)
                if "group" in d}) == snap["batch_over_time"]["groups"]
    waves = c.snapshot("schedule_layer_major").graph.nodes(data="wave")
    assert all(w is not None for _, w in waves) and len(waves) == len(c.task_graph)


def test_compiled_specialize_exposes_the_pipeline_result():
    cm = snncc.compile(FF(), T=3, verify=True)
    c = cm.specialize(torch.randn(2, 2, 8, 8))
    kinds = Counter(t.kind for t in c.task_graph.tasks())
    assert kinds["neuron"] == 2 and kinds["placeholder"] == 1 and kinds["output"] == 1
    neuron_tasks = [t for t in c.task_graph.tasks() if t.kind == "neuron"]
    assert all(t.batched and (t.t0, t.t1) == (0, 3) for t in neuron_tasks)


# --------------------------------------------------------------------------- dropout keeps eager's draws
class DropAtEnd(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 16)
        self.sn = snncc.LIF()
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return self.drop(self.sn(self.fc(x) * 4.0))


class FunctionalDropout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 16)
        self.sn = snncc.IF()

    def forward(self, x):
        h = self.sn(self.fc(x) * 3.0)
        return torch.nn.functional.dropout(h, 0.3, training=self.training)


@pytest.mark.parametrize("model", [DropAtEnd, FunctionalDropout])
def test_dropout_train_keeps_eager_rng_draws(model):
    """Compiled output == eager output under the same torch.manual_seed (same masks, same order)."""
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    r = assert_same_training(model, x, T=4)
    out_e, out_c = r["outs"][0]
    # the draws differ between steps (not one mask reused): a real check of per-step RNG order
    assert not torch.equal(out_e[0], out_e[1])


def test_dropout_order_edges_in_task_graph():
    m = DropAtEnd()
    _, hoisted, _, tags, groups = _pipeline(m, "static", 3)
    tg = passes.build_task_graph(hoisted, tags, groups)
    drops = [t for t in tg.tasks() if t.target == "drop"]
    assert len(drops) == 3 and all(not t.batched for t in drops)
    order = list(tg.edges("order"))
    assert len(order) >= 2


class DropBetween(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.sn1 = nn.Linear(6, 16), snncc.LIF()
        self.drop = nn.Dropout(0.5)
        self.fc2, self.sn2 = nn.Linear(16, 4), snncc.IF()

    def forward(self, x):
        return self.sn2(self.fc2(self.drop(self.sn1(self.fc1(x) * 4.0))) * 3.0)


def test_dropout_between_layers_keeps_eager_rng_draws():
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert_same_training(DropBetween, x, T=3)


class PoissonEncoded(nn.Module):
    """Rate (Poisson) encoding of a static input at every step: ``rand_like(x) < x``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.sn = nn.Linear(6, 8), snncc.LIF()

    def forward(self, x):
        spikes_in = (torch.rand_like(x) < x).to(x.dtype)
        return self.sn(self.fc(spikes_in) * 4.0)


def test_poisson_encoding_keeps_eager_rng_draws():
    x = torch.rand(3, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert_same_training(PoissonEncoded, x, T=4, input_grad=False)


# --------------------------------------------------------------------------- runtime: neuron scan
SPECS = {
    "if": lambda: snncc.IF(),
    "lif_soft": lambda: snncc.LIF(v_reset=None, decay_input=False),
    "lif_vr": lambda: snncc.LIF(v_reset=0.3, detach_reset=True),
    "plif": lambda: snncc.ParametricLIF(v_reset=None),
    "izhikevich": lambda: snncc.Izhikevich(),
    "alif": lambda: snncc.AdaptiveLIF(),
}


@pytest.mark.parametrize("broadcast", [False, True])
@pytest.mark.parametrize("name", sorted(SPECS))
def test_neuron_scan_equals_step_loop(name, broadcast):
    """runtime.reference.neuron_scan over K steps == K calls of the eager neuron (values and grads)."""
    from snncc.neurons import initial_state, step
    K = 4
    neuron = SPECS[name]().double()
    spec = neuron.spec
    scale, bias = (60.0, 40.0) if name == "izhikevich" else (1.5, 0.2)
    g = torch.Generator().manual_seed(3)
    shape = (3, 5) if broadcast else (K, 3, 5)
    x0 = torch.randn(*shape, generator=g, dtype=torch.float64) * scale + bias
    xs_e = x0.clone().requires_grad_(True)
    xs_c = x0.clone().requires_grad_(True)
    params_e = tuple(p.detach().clone().requires_grad_(True) for p in neuron.spec_params())
    params_c = tuple(p.detach().clone().requires_grad_(True) for p in neuron.spec_params())
    state = initial_state(spec, x0 if broadcast else x0[0])
    outs = []
    for t in range(K):
        s, state, _ = step(spec, xs_e if broadcast else xs_e[t], state, params_e)
        outs.append(s)
    sp_e, v_e = torch.stack(outs), state[0]
    sp_c, st_c = neuron_scan(spec, xs_c, K, broadcast, None, params_c)
    assert torch.equal(sp_c, sp_e)
    assert 0 < sp_e.mean() < 1
    torch.testing.assert_close(st_c[0], v_e, rtol=1e-12, atol=1e-12)
    w = torch.randn(sp_e.shape, generator=g, dtype=torch.float64)
    wv = torch.randn(v_e.shape, generator=g, dtype=torch.float64)
    ((sp_e * w).sum() + (v_e * wv).sum()).backward()
    ((sp_c * w).sum() + (st_c[0] * wv).sum()).backward()
    torch.testing.assert_close(xs_c.grad, xs_e.grad, rtol=1e-9, atol=1e-12)
    for pc, pe in zip(params_c, params_e):
        torch.testing.assert_close(pc.grad, pe.grad, rtol=1e-9, atol=1e-12)
