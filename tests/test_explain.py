"""snncc.explain: every layer's fate (built-in kernel, generated from its step code, fused, batched, opaque and
why), measured spike rates and saved bytes, and a model left exactly as it was.

Small models (tests/fixtures/explain_models.py), a few timesteps: the whole file runs in seconds.
"""
from __future__ import annotations

import copy
import json
import os
import sys
import warnings

import pytest
import torch
from torch import nn

import snncc
from snncc.frontend import OpaqueModuleWarning

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures"))
import explain_models as em  # noqa: E402

T = 4


def _x(n: int = 3, features: int = 8, scale: float = 3.0, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    return (torch.rand(n, features, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)


def _quiet_explain(*args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OpaqueModuleWarning)
        return snncc.explain(*args, **kw)


# --------------------------------------------------------------------------- (a) built-in
def test_builtin_lif_is_compiled_with_its_kernel():
    torch.manual_seed(0)
    e = snncc.explain(em.builtin_mlp(), _x(), T=T)
    assert [r.qualname for r in e.layers][:4] == ["0", "1", "2", "3"]
    for q in ("1", "3"):
        row = e.layer(q)
        assert row.cls == "LIF" and row.kind == "neuron" and row.kernel == "builtin:lif"
        assert row.fate == "compiled (built-in LIF kernel)"
    assert e.layer("0").cls == "Linear"
    assert e.layer("0").fate == "hoisted: runs once (its input is the same at every step)"
    assert "batched over time" in e.layer("2").fate and "bit-packed input" in e.layer("2").fate
    assert e.opaque == {}
    assert e.counts["compiled_neurons"] == 2 and e.counts["builtin"] == 2 and e.counts["lifted"] == 0
    assert e.counts["opaque_modules"] == 0
    text = str(e)
    assert "compiled (built-in LIF kernel)" in text and "2 neuron(s) compiled (2 built-in)" in text
    json.dumps(e.to_dict())


# --------------------------------------------------------------------------- (b) lifted
def test_user_neuron_is_generated_from_its_step_code():
    torch.manual_seed(0)
    e = snncc.explain(em.user_mlp(), _x(), T=T)
    row = e.layer("1")
    assert row.cls == "UserLIF" and row.kernel == "lifted"
    assert row.fate == "compiled (generated from its step code)"
    assert e.layer("3").fate == "compiled (built-in LIF kernel)"
    assert e.counts["lifted"] == 1 and e.counts["builtin"] == 1 and e.opaque == {}
    assert "UserLIF" in str(e) and "generated from its step code" in str(e)


def test_fusions_and_measured_saved_bytes():
    torch.manual_seed(0)
    e = snncc.explain(em.conv_net(), torch.rand(2, 2, 8, 8) * 3, T=T)
    assert e.layer("2").fate == "compiled (generated from its step code)"
    assert e.layer("3").kind == "fused" and e.layer("3").fate == "fused into 2 (max-pool epilogue)"
    assert e.counts["fused"] >= 1
    assert e.layer("2").rate_note and "*" in str(e)          # its rate is of the pooled output, said so
    assert e.training and e.saved_bytes is not None and e.saved_bytes > 0
    per_layer = sum(r.saved_bytes or 0 for r in e.layers)
    assert 0 < per_layer <= e.saved_bytes and e.saved_unattributed == e.saved_bytes - per_layer
    assert e.layer("2").saved_bytes > 0 and e.layer("3").saved_bytes is None
    assert "saved for backward" in str(e)
    ev = snncc.explain(em.conv_net().eval(), torch.rand(2, 2, 8, 8), T=T)
    assert not ev.training and ev.saved_bytes is None and all(r.saved_bytes is None for r in ev.layers)
    assert ev.layer("1").fate == "fused into 0 (BatchNorm folded into the convolution)"


# --------------------------------------------------------------------------- (c) opaque
@pytest.mark.parametrize("factory, cls, words", [
    (em.moody_mlp, em.MoodyNeuron, ("control flow", "`max`")),     # either names what cannot be lifted
    (em.noisy_mlp, em.NoisyNeuron, ("random",)),
])
def test_unliftable_neuron_is_opaque_with_its_reason(factory, cls, words):
    torch.manual_seed(0)
    e = _quiet_explain(factory(), _x(), T=T)
    row = e.layer("1")
    assert row.kind == "opaque" and row.cls == cls.__name__
    assert row.fate == f"opaque: {row.reason}"
    assert any(w in row.reason for w in words), row.reason
    assert e.opaque == {"1": row.reason}
    assert e.counts["opaque_modules"] == 1 and e.counts["compiled_neurons"] == 1
    text = str(e)
    assert row.reason in text and "opaque modules" in text
    assert json.loads(json.dumps(e.to_dict()))["opaque"] == {"1": row.reason}


@pytest.mark.parametrize("factory, cls", [(em.moody_mlp, em.MoodyNeuron), (em.noisy_mlp, em.NoisyNeuron)])
def test_compiling_an_unliftable_neuron_warns_once(factory, cls):
    model = factory()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cm = snncc.compile(model, T=T)
        cm(_x())
        cm(_x(seed=1))
        cm(_x(n=5))                  # a new specialization: traced again, no second warning
        cm.eval()
        with torch.no_grad():
            cm(_x())
    ours = [w for w in caught if issubclass(w.category, OpaqueModuleWarning)]
    assert len(ours) == 1, [str(w.message) for w in ours]
    msg = str(ours[0].message)
    assert "'1'" in msg and f"{cls.__module__}.{cls.__qualname__}" in msg
    assert "snncc.explain" in msg


def test_explain_reissues_the_warning_and_lists_it():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        e = snncc.explain(em.moody_mlp(), _x(), T=T)
    assert sum(issubclass(w.category, OpaqueModuleWarning) for w in caught) == 1
    assert len(e.warnings) == 1 and "MoodyNeuron" in e.warnings[0]


def test_declared_leaves_and_compiled_modules():
    torch.manual_seed(0)
    model = em.builtin_mlp()
    e = snncc.explain(model, _x(), T=T, leaf_modules=[nn.Linear])
    assert e.layer("0").fate == "opaque: declared a leaf (leaf_modules=)"
    assert e.opaque == {"0": "declared a leaf (leaf_modules=)", "2": "declared a leaf (leaf_modules=)"}
    cm = snncc.compile(model, sequence=True)
    xs = torch.rand(T, 3, 8) * 3
    e2 = snncc.explain(cm, xs)
    assert e2.form == "sequence" and e2.T == T and e2.layer("1").fate == "compiled (built-in LIF kernel)"
    with pytest.raises(snncc.InputError, match="already compiled"):
        snncc.explain(cm, xs, T=T)


# --------------------------------------------------------------------------- (d) spike rates
def _eager_rates(model: nn.Module, x: torch.Tensor, names) -> dict:
    """Mean of each named module's output over T steps of the eager loop."""
    outs = {n: [] for n in names}
    hooks = [model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: outs[n].append(o.detach()))
             for n in names]
    try:
        snncc.reset(model)
        with torch.no_grad():
            for _ in range(T):
                model(x)
    finally:
        for h in hooks:
            h.remove()
        snncc.reset(model)
    return {n: float(torch.stack(v).double().mean()) for n, v in outs.items()}


@pytest.mark.parametrize("factory", [em.builtin_mlp, em.user_mlp, em.moody_mlp])
def test_spike_rates_match_the_eager_run(factory):
    torch.manual_seed(0)
    model = factory().double()
    x = _x(n=6, scale=2.0, dtype=torch.float64)
    e = _quiet_explain(model, x, T=T)
    want = _eager_rates(model, x, ["1", "3"])
    for q in ("1", "3"):
        rate = e.layer(q).spike_rate
        assert rate is not None and 0.0 <= rate <= 1.0
        assert rate == pytest.approx(want[q], abs=1e-12)
    assert 0.0 < e.layer("1").spike_rate < 1.0, "the test input should make the first layer fire sometimes"
    for r in e.layers:
        assert r.spike_rate is None or 0.0 <= r.spike_rate <= 1.0


def test_fused_pool_rate_is_the_pooled_output():
    torch.manual_seed(0)
    model = em.conv_net().double().eval()
    x = torch.rand(2, 2, 8, 8, dtype=torch.float64) * 3
    e = snncc.explain(model, x, T=T)
    want = _eager_rates(model, x, ["3"])["3"]             # the max pool's output: what the fused task returns
    assert e.layer("2").spike_rate == pytest.approx(want, abs=1e-12)


# --------------------------------------------------------------------------- (e) nothing changed
def _state(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}


@pytest.mark.parametrize("factory", [em.conv_net, em.moody_mlp])
def test_model_is_left_as_it_was(factory):
    torch.manual_seed(0)
    model = factory().train()
    x = torch.rand(2, 2, 8, 8) * 3 if factory is em.conv_net else _x()
    reference = copy.deepcopy(model)
    before = _state(model)
    buffers = {k: b for k, b in model.named_buffers()}
    attrs = {name: dict(vars(m)) for name, m in model.named_modules()}
    rng = torch.get_rng_state()
    e = _quiet_explain(model, x, T=T)
    assert e.layers
    after = _state(model)
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    for k, b in model.named_buffers():
        assert b is buffers[k], f"buffer {k} replaced"
    for name, m in model.named_modules():
        now = {k: v for k, v in vars(m).items() if not k.startswith("_")}
        was = {k: v for k, v in attrs[name].items() if not k.startswith("_")}
        assert now.keys() == was.keys(), name
        for k in was:
            assert now[k] is was[k], f"{name}.{k} changed"
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.training
    snncc.reset(model)
    snncc.reset(reference)
    torch.manual_seed(1)
    a = [model(x) for _ in range(T)]
    torch.manual_seed(1)
    b = [reference(x) for _ in range(T)]
    for p, q in zip(a, b):
        assert torch.equal(p, q)


def test_chunks_and_the_models_own_loop():
    """A layer split into chunks is one row (rates over all its chunks); a model that loops itself works."""
    torch.manual_seed(0)
    model = em.user_mlp().double()
    x = _x(n=6, scale=2.0, dtype=torch.float64)
    whole = snncc.explain(model, x, T=T)
    chunked = snncc.explain(model, x, T=T, chunk=2)
    assert chunked.layer("1").tasks == 2 and whole.layer("1").tasks == 1
    assert chunked.counts["compiled_neurons"] == 2 and chunked.counts["tasks"] > whole.counts["tasks"]
    for q in ("1", "3"):
        assert chunked.layer(q).spike_rate == pytest.approx(whole.layer(q).spike_rate, abs=1e-12)

    class Looping(nn.Module):
        def __init__(self, net: nn.Module) -> None:
            super().__init__()
            self.net = net

        def forward(self, x):
            snncc.reset(self.net)
            return torch.stack([self.net(x) for _ in range(T)]).mean(0)

    e = snncc.explain(Looping(model), x)
    assert e.form == "loop" and e.T == T
    assert e.layer("net.1").fate == "compiled (generated from its step code)"
    assert e.layer("net.1").spike_rate == pytest.approx(whole.layer("1").spike_rate, abs=1e-12)
