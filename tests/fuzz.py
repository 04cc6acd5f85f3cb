"""The fuzzer's grammar and its driver: random step-mode models and random call sequences, compiled == eager.

Used by tests/test_fuzz.py (hypothesis over these strategies) and tests/test_fuzz_regressions.py (the cases
it found, written out). Everything here is plain data until built, so a failing case prints as a few
readable tuples that can be pasted into a regression test.

Models (:func:`models`): a program over a static input (an image ``[N, C, H, W]`` or features ``[N, F]``)
of conv / BatchNorm / max and average pools / flatten / linear / dropout / residual adds / channel concat,
each neuron one of snncc's (IF, LIF, ParametricLIF, Izhikevich, AdaptiveLIF, every surrogate), SpikingJelly
2.x's ``activation_based.neuron`` nodes and snnTorch's ``Leaky`` when they are installed; before each
neuron a gain that puts its input in the firing range.

Call sequences (:func:`calls`), all on one compiled model beside an eager twin (a deep copy, its own
optimizer): forward steps (train with backward and an optimizer step, or eval; the batch size changes,
and in ``sequence=True`` form T too), train/eval switches, the ``state_dict`` saved mid-training and
loaded into a fresh eager model that becomes the twin, the twin's (perturbed) ``state_dict`` loaded back
into the compiled model, ``.to(torch.float64)``. After each step: outputs, input and parameter gradients,
BatchNorm statistics, parameters and optimizer state against the twin's. float64 must agree to rounding
(identical spikes); a float32 difference counts only if the same step, started from the same weights,
differs in float64 too (float32 rounding can flip a spike at its threshold; then the twin is re-synced).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

import snncc
from snncc import surrogate as sg
from snncc.config import MEMORY_MODES

from conftest import HAS_SNNTORCH, HAS_SPIKINGJELLY, SpikeRecorder, assert_close_tensors, eager_run, tolerances

try:
    from hypothesis import strategies as st
except ImportError:                                  # the test modules skip without hypothesis
    st = None

# ----------------------------------------------------------------------------------------------- neurons
SNNCC_SURROGATES = ("Sigmoid", "ATan", "SuperSpike", "PiecewiseLinear", "Triangle", "Rectangular", "Erf")
SJ_SURROGATES = ("Sigmoid", "ATan", "PiecewiseQuadratic", "SoftSign", "Erf", "SuperSpike")
SNNTORCH_SURROGATES = ("fast_sigmoid", "atan", "sigmoid", "triangular")
SJ_NODES = ("IFNode", "LIFNode", "ParametricLIFNode", "QIFNode", "EIFNode", "KLIFNode", "IzhikevichNode")


def make_neuron(spec: Tuple[Any, ...]) -> nn.Module:
    """A fresh neuron module from its spec ``(library, class name, kwargs as sorted pairs, surrogate)``."""
    lib, name, kw, sur = spec
    kw = dict(kw)
    if lib == "snncc":
        return getattr(snncc, name)(surrogate_function=getattr(sg, sur[0])(alpha=sur[1]), **kw)
    if lib == "sj":
        from spikingjelly.activation_based import neuron, surrogate
        return getattr(neuron, name)(surrogate_function=getattr(surrogate, sur[0])(), **kw)
    if lib == "snntorch":
        import snntorch
        from snntorch import surrogate
        return getattr(snntorch, name)(init_hidden=True, spike_grad=getattr(surrogate, sur[0])(), **kw)
    raise ValueError(lib)


# ----------------------------------------------------------------------------------------------- models
class FuzzNet(nn.Module):
    """Runs a program over its ``layers``: ``("mod", i)`` calls ``layers[i]``; ``("scale", g)`` multiplies;
    ``("res", prog)`` adds ``prog(x)`` to x; ``("cat", a, b)`` concatenates ``a(x)`` and ``b(x)`` on dim 1.
    The program is static Python data: torch.fx unrolls it."""

    def __init__(self, layers: Sequence[nn.Module], program: Tuple[Any, ...]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.program = program

    def _run(self, program: Tuple[Any, ...], x: torch.Tensor) -> torch.Tensor:
        for op in program:
            if op[0] == "mod":
                x = self.layers[op[1]](x).type_as(x) if len(op) > 2 else self.layers[op[1]](x)
            elif op[0] == "scale":
                x = x * op[1]
            elif op[0] == "res":
                x = x + self._run(op[1], x)
            elif op[0] == "cat":
                x = torch.cat([self._run(op[1], x), self._run(op[2], x)], 1)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(self.program, x)


@dataclass(frozen=True)
class ModelSpec:
    """A model as data: the input (``("image", C, H)`` or ``("vector", F)``) and a program of layer specs."""

    inp: Tuple[Any, ...]
    program: Tuple[Any, ...]

    def build(self, seed: int = 0) -> FuzzNet:
        """The model, its weights drawn from ``seed``."""
        torch.manual_seed(seed)
        layers: List[nn.Module] = []
        return FuzzNet(layers, _build(self.program, layers))

    def input(self, n: int, dtype: torch.dtype, seed: int, T: Optional[int] = None) -> torch.Tensor:
        shape = (n, self.inp[1], self.inp[2], self.inp[2]) if self.inp[0] == "image" else (n, self.inp[1])
        if T is not None:
            shape = (T,) + shape
        g = torch.Generator().manual_seed(seed)
        return (torch.rand(shape, generator=g, dtype=torch.float64) * 1.5 - 0.25).to(dtype)


def _build(program: Tuple[Any, ...], layers: List[nn.Module]) -> Tuple[Any, ...]:
    out: List[Any] = []
    for op in program:
        kind = op[0]
        if kind == "scale":
            out.append(op)
        elif kind == "res":
            out.append(("res", _build(op[1], layers)))
        elif kind == "cat":
            out.append(("cat", _build(op[1], layers), _build(op[2], layers)))
        else:
            layers.append(_layer(op))
            # NOTE: snnTorch's spikes are float32 whatever the model's dtype ((x > 0).float()): cast back, as a
            # float64 model using snnTorch must (tests/test_fuzz_regressions.py, the dtype of its spikes)
            cast = op[0] == "neuron" and op[1][0] == "snntorch"
            out.append(("mod", len(layers) - 1, "type_as") if cast else ("mod", len(layers) - 1))
    return tuple(out)


def _layer(op: Tuple[Any, ...]) -> nn.Module:
    kind = op[0]
    if kind == "conv":
        _, cin, cout, k, stride = op
        return nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2)
    if kind == "linear":
        return nn.Linear(op[1], op[2])
    if kind == "bn2d":
        return nn.BatchNorm2d(op[1])
    if kind == "bn1d":
        return nn.BatchNorm1d(op[1])
    if kind == "maxpool":
        return nn.MaxPool2d(op[1])
    if kind == "avgpool":
        return nn.AvgPool2d(op[1])
    if kind == "flatten":
        return nn.Flatten()
    if kind == "dropout":
        return nn.Dropout(op[1])
    if kind == "neuron":
        return make_neuron(op[1])
    raise ValueError(kind)


if st is not None:
    def _alpha(draw) -> Optional[float]:
        return draw(st.sampled_from([None, 2.0, 4.0]))

    @st.composite
    def neuron_specs(draw) -> Tuple[Tuple[Any, ...], float]:
        """(neuron spec, the gain that puts a unit input in its firing range)."""
        libs = ["snncc"] + (["sj"] if HAS_SPIKINGJELLY else []) + (["snntorch"] if HAS_SNNTORCH else [])
        lib = draw(st.sampled_from(libs))
        if lib == "snncc":
            name = draw(st.sampled_from(["LIF", "IF", "ParametricLIF", "Izhikevich", "AdaptiveLIF"]))
            sur = (draw(st.sampled_from(SNNCC_SURROGATES)), _alpha(draw))
            detach = draw(st.booleans())
            if name == "Izhikevich":
                return ("snncc", name, (("detach_reset", detach),), sur), 80.0
            kw = {"detach_reset": detach, "v_reset": draw(st.sampled_from([0.0, None, -0.2])),
                  "v_threshold": draw(st.sampled_from([1.0, 0.6]))}
            gain = 1.5
            if name in ("LIF", "ParametricLIF", "AdaptiveLIF"):
                tau = draw(st.sampled_from([2.0, 3.0]))
                kw["tau" if name != "ParametricLIF" else "init_tau"] = tau
                kw["decay_input"] = draw(st.booleans())
                gain = tau if kw["decay_input"] else 1.5
            return ("snncc", name, tuple(sorted(kw.items())), sur), gain
        if lib == "sj":
            name = draw(st.sampled_from(SJ_NODES))
            sur = (draw(st.sampled_from(SJ_SURROGATES)), None)
            kw: Dict[str, Any] = {"detach_reset": draw(st.booleans())}
            gain = 1.5
            if name in ("IFNode", "LIFNode", "ParametricLIFNode", "KLIFNode"):
                kw["v_reset"] = draw(st.sampled_from([0.0, None]))
            if name in ("LIFNode", "ParametricLIFNode", "KLIFNode"):
                kw["decay_input"] = draw(st.booleans())
                gain = 2.5 if kw["decay_input"] else 1.5
            if name in ("QIFNode", "EIFNode", "IzhikevichNode"):
                gain = 2.5
            return ("sj", name, tuple(sorted(kw.items())), sur), gain
        beta = draw(st.sampled_from([0.5, 0.9]))
        kw = {"beta": beta, "reset_mechanism": draw(st.sampled_from(["subtract", "zero"])),
              "learn_beta": draw(st.booleans())}
        sur = (draw(st.sampled_from(SNNTORCH_SURROGATES)), None)
        return ("snntorch", "Leaky", tuple(sorted(kw.items())), sur), 1.5

    @st.composite
    def _neuron_ops(draw) -> Tuple[Any, ...]:
        spec, gain = draw(neuron_specs())
        return (("scale", gain), ("neuron", spec))

    @st.composite
    def models(draw, max_layers: int = 5) -> ModelSpec:
        """A random step-mode model (see the module docstring)."""
        image = draw(st.booleans())
        if image:
            c, h = draw(st.integers(1, 3)), draw(st.sampled_from([4, 6, 8]))
            inp: Tuple[Any, ...] = ("image", c, h)
        else:
            f = draw(st.integers(2, 8))
            inp = ("vector", f)
        program: List[Any] = []
        shape: Tuple[int, ...] = (c, h) if image else (f,)
        for _ in range(draw(st.integers(1, max_layers))):
            if len(shape) == 2:
                c, h = shape
                choice = draw(st.sampled_from(["conv", "conv", "bn", "pool", "res", "cat", "dropout", "flatten"]))
                if choice == "conv":
                    cout, k = draw(st.integers(1, 4)), draw(st.sampled_from([1, 3]))
                    stride = draw(st.sampled_from([1, 1, 2])) if h >= 4 else 1
                    program.append(("conv", c, cout, k, stride))
                    shape = (cout, (h + 2 * (k // 2) - k) // stride + 1)
                    if draw(st.booleans()):
                        program.append(("bn2d", cout))
                    program.extend(draw(_neuron_ops()))
                elif choice == "bn":
                    program.append(("bn2d", c))
                elif choice == "pool" and h >= 2 and h % 2 == 0:
                    program.append((draw(st.sampled_from(["maxpool", "avgpool"])), 2))
                    shape = (c, h // 2)
                elif choice == "res":
                    inner = [("conv", c, c, 3, 1)] + ([("bn2d", c)] if draw(st.booleans()) else [])
                    program.append(("res", tuple(inner) + draw(_neuron_ops())))
                elif choice == "cat":
                    a, b = draw(st.integers(1, 3)), draw(st.integers(1, 3))
                    program.append(("cat", (("conv", c, a, 3, 1),) + draw(_neuron_ops()),
                                    (("conv", c, b, 1, 1),) + draw(_neuron_ops())))
                    shape = (a + b, h)
                elif choice == "dropout":
                    program.append(("dropout", draw(st.sampled_from([0.2, 0.5]))))
                elif choice == "flatten":
                    program.append(("flatten",))
                    shape = (c * h * h,)
            else:
                (f,) = shape
                choice = draw(st.sampled_from(["linear", "linear", "bn", "res", "cat", "dropout"]))
                if choice == "linear":
                    fout = draw(st.integers(2, 8))
                    program.append(("linear", f, fout))
                    if draw(st.booleans()):
                        program.append(("bn1d", fout))
                    program.extend(draw(_neuron_ops()))
                    shape = (fout,)
                elif choice == "bn":
                    program.append(("bn1d", f))
                elif choice == "res":
                    program.append(("res", (("linear", f, f),) + draw(_neuron_ops())))
                elif choice == "cat":
                    a, b = draw(st.integers(1, 4)), draw(st.integers(1, 4))
                    program.append(("cat", (("linear", f, a),) + draw(_neuron_ops()),
                                    (("linear", f, b),) + draw(_neuron_ops())))
                    shape = (a + b,)
                elif choice == "dropout":
                    program.append(("dropout", draw(st.sampled_from([0.2, 0.5]))))
        if not any(_has_neuron(op) for op in program):
            if len(shape) == 2:
                program.append(("conv", shape[0], 2, 3, 1))
                shape = (2, shape[1])
            else:
                program.append(("linear", shape[0], 3))
                shape = (3,)
            program.extend(draw(_neuron_ops()))
        if draw(st.booleans()):                                # a readout
            if len(shape) == 2:
                program.append(("flatten",))
                shape = (shape[0] * shape[1] * shape[1],)
            program.append(("linear", shape[0], 3))
        return ModelSpec(inp, tuple(program))

    @st.composite
    def calls(draw, max_calls: int = 6) -> Tuple[Tuple[Any, ...], ...]:
        """A random call sequence: ``("fwd", N, T)``, ``("train",)``, ``("eval",)``, ``("sd_out",)``,
        ``("sd_in",)``, ``("to64",)``. T is used by the ``sequence=True`` form only."""
        ops: List[Tuple[Any, ...]] = []
        # NOTE: N >= 2: training BatchNorm needs more than one value per channel (eager raises otherwise)
        n = draw(st.integers(2, 3))
        for _ in range(draw(st.integers(2, max_calls))):
            kind = draw(st.sampled_from(["fwd", "fwd", "fwd", "mode", "sd_out", "sd_in", "to64"]))
            if kind == "fwd":
                if draw(st.integers(0, 3)) == 0:
                    n = draw(st.integers(2, 4))
                ops.append(("fwd", n, draw(st.integers(1, 3))))
            elif kind == "mode":
                ops.append((draw(st.sampled_from(["train", "eval"])),))
            else:
                ops.append((kind,))
        ops.append(("fwd", n, 2))
        return tuple(ops)

    @st.composite
    def setups(draw) -> Dict[str, Any]:
        """How the model is compiled and trained: form, T, options, optimizer, starting dtype."""
        form = draw(st.sampled_from(["static", "sequence"]))
        return {"form": form, "T": draw(st.integers(1, 4)) if form == "static" else None,
                "chunk": draw(st.sampled_from([None, None, 1, 2])),
                "memory": draw(st.sampled_from([m for m in MEMORY_MODES if m != "half"])),   # half: inexact
                "fuse": draw(st.booleans()), "bitpack": draw(st.booleans()),
                "optimizer": draw(st.sampled_from(["sgd", "adam"])),
                "dtype": draw(st.sampled_from(["float64", "float64", "float32"])),
                "seed": draw(st.integers(0, 2 ** 16))}


def _libraries(program: Tuple[Any, ...]) -> set:
    """The neuron libraries a program uses."""
    out = set()
    for op in program:
        if op[0] == "neuron":
            out.add(op[1][0])
        elif op[0] in ("res", "cat"):
            for part in op[1:]:
                out |= _libraries(part)
    return out


def _has_neuron(op: Tuple[Any, ...]) -> bool:
    if op[0] == "neuron":
        return True
    if op[0] in ("res", "cat"):
        return any(_has_neuron(o) for part in op[1:] for o in part)
    return False


# ----------------------------------------------------------------------------------------------- the driver
def _optimizer(kind: str, params: Any) -> torch.optim.Optimizer:
    if kind == "adam":
        # NOTE: eps 1e-3, not 1e-8: a gradient that is zero but for rounding (a conv bias before a BatchNorm)
        # would otherwise be normalized to a full step of random sign, on each side its own
        return torch.optim.Adam(params, lr=0.01, eps=1e-3)
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)


class Mismatch(AssertionError):
    """Compiled and eager disagree at a step of a call sequence."""


class _BothRaised(Exception):
    """Eager and compiled both raised at a step (the grammar made an invalid case), or eager's values are
    no longer finite (training diverged: where NaNs spread is not part of the contract): the sequence ends."""


@dataclass
class _Side:
    model: nn.Module          # the eager twin, or the compiled module
    opt: torch.optim.Optimizer


def _close(a: torch.Tensor, b: torch.Tensor, what: str, rtol: float, atol: float) -> None:
    """Gradients, parameters, statistics, optimizer state: to tolerance (conftest's spike rule, exact
    equality for 0/1-valued tensors, is for outputs: a gradient that happens to be 0 is not a spike)."""
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    assert a.dtype == b.dtype, f"{what}: dtype {a.dtype} != {b.dtype}"
    if not a.is_floating_point():
        assert torch.equal(a, b), f"{what}: values differ"
    elif not torch.allclose(a, b, rtol=rtol, atol=atol, equal_nan=True):
        raise AssertionError(f"{what}: max abs diff {(a - b).abs().max().item():.3e} (rtol={rtol}, atol={atol}; "
                             f"NaN: eager {int(a.isnan().sum())}, compiled {int(b.isnan().sum())})")


def _compare_state(c: _Side, e: _Side, what: str, tol: Dict[str, float], grads: bool) -> None:
    pc, pe = dict(c.model.named_parameters()), dict(e.model.named_parameters())
    assert pc.keys() == pe.keys(), f"{what}: parameter names differ"
    # NOTE: a gradient that is zero but for cancellation (a conv or linear bias before a BatchNorm) is
    # noise at the scale of the model's largest gradients: that scale, not its own, sets its tolerance
    scale = max((float(p.grad.abs().max()) for p in pe.values() if p.grad is not None and p.grad.numel()),
                default=0.0)
    grad_tol = dict(tol, atol=max(tol["atol"], tol["rtol"] * 1e-2 * scale))
    for name in pc:
        _close(pe[name].detach(), pc[name].detach(), f"{what}: parameter {name}", **tol)
        if grads:
            ge, gc = pe[name].grad, pc[name].grad
            if (ge is None) != (gc is None):
                raise Mismatch(f"{what}: grad of {name}: eager {ge is not None}, compiled {gc is not None}")
            if ge is not None:
                _close(ge, gc, f"{what}: grad of {name}", **grad_tol)
    bc, be = dict(c.model.named_buffers()), dict(e.model.named_buffers())
    for name in be:
        if "running_" in name or "num_batches_tracked" in name:
            _close(be[name], bc[name], f"{what}: buffer {name}", **tol)
    sc, se = c.opt.state_dict()["state"], e.opt.state_dict()["state"]
    assert sc.keys() == se.keys(), f"{what}: optimizer state keys {sorted(sc)} != {sorted(se)}"
    for i in sc:
        for k, v in se[i].items():
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                _close(v, sc[i][k], f"{what}: optimizer state {k} of parameter {i}", **grad_tol)


def run_case(spec: ModelSpec, setup: Dict[str, Any], ops: Sequence[Tuple[Any, ...]],
             log: Callable[[str], None] = lambda s: None) -> Dict[str, Any]:
    """Run the call sequence ``ops`` on one compiled model and on its eager twin; raise on a difference.

    Returns counters: steps and outputs compared, float32 steps re-checked in float64, the eager twin's
    spike rate at each step (``rates``: the fraction of neuron outputs that are spikes)."""
    dtype = torch.float64 if setup["dtype"] == "float64" else torch.float32
    model = spec.build(setup["seed"]).to(dtype)
    twin = copy.deepcopy(model)
    kw = dict(T=setup["T"]) if setup["form"] == "static" else dict(sequence=True)
    cm = snncc.compile(model, verify=True, chunk=setup["chunk"], memory=setup["memory"], fuse=setup["fuse"],
                       bitpack=setup["bitpack"], **kw)
    c = _Side(cm, _optimizer(setup["optimizer"], cm.parameters()))
    e = _Side(twin, _optimizer(setup["optimizer"], twin.parameters()))
    stats = {"steps": 0, "rechecked": 0, "outputs": 0}
    for i, op in enumerate(ops):
        log(f"op {i}: {op}")
        kind = op[0]
        if kind in ("train", "eval"):
            cm.train(kind == "train")
            twin.train(kind == "train")
        elif kind == "to64":
            if dtype == torch.float64:
                continue
            dtype = torch.float64
            for side in (c, e):
                side.model.to(dtype)
                old = side.opt
                side.opt = _optimizer(setup["optimizer"], side.model.parameters())
                side.opt.load_state_dict(old.state_dict())       # casts the state to the parameters' dtype
            # float32 steps agreed to float32 tolerance: from here on float64's, so start from equal weights
            e.model.load_state_dict(copy.deepcopy(cm.state_dict()))
            e.opt.load_state_dict(copy.deepcopy(c.opt.state_dict()))
        elif kind == "sd_out":
            # the compiled model's state_dict, saved mid-training, into a fresh eager model: the new twin
            fresh = spec.build(setup["seed"] + 1).to(dtype)
            fresh.load_state_dict(copy.deepcopy(cm.state_dict()))
            fresh.train(cm.training)
            opt = _optimizer(setup["optimizer"], fresh.parameters())
            opt.load_state_dict(copy.deepcopy(c.opt.state_dict()))
            e = _Side(fresh, opt)
            twin = fresh
        elif kind == "sd_in":
            # and back: the twin's weights, perturbed, loaded into the compiled model (and the twin)
            g = torch.Generator().manual_seed(setup["seed"] + i)
            sd = {k: (v + 0.05 * torch.randn(v.shape, generator=g, dtype=torch.float64).to(v.dtype))
                  if v.is_floating_point() and "running_var" not in k else v.clone()
                  for k, v in twin.state_dict().items()}
            twin.load_state_dict(sd)
            cm.load_state_dict(sd)
        elif kind == "fwd":
            _, n, T = op
            x = spec.input(n, dtype, setup["seed"] * 31 + i, T=None if setup["form"] == "static" else T)
            before = (copy.deepcopy(cm.state_dict()), cm.training)
            try:
                _step(cm, twin, c, e, x, setup, i, stats)
            except _BothRaised as exc:
                log(f"both raised at step {i}: {exc}")
                stats["both_raised"] = str(exc)
                return stats
            except AssertionError as exc:
                if dtype != torch.float32:
                    raise Mismatch(f"step {i} {op}: {exc}") from exc
                # float32: a real difference only if float64 from the same weights differs too
                _recheck64(spec, setup, before, x, i, op, exc)
                stats["rechecked"] += 1
                e.model.load_state_dict(copy.deepcopy(cm.state_dict()))
                e.opt.load_state_dict(copy.deepcopy(c.opt.state_dict()))
    return stats


def _step(cm: nn.Module, twin: nn.Module, c: _Side, e: _Side, x: torch.Tensor, setup: Dict[str, Any], i: int,
          stats: Dict[str, Any]) -> None:
    """One forward (and, in training, backward and optimizer step) on both sides, compared."""
    tol = tolerances(x.dtype)
    train = cm.training
    assert twin.training == train
    T = setup["T"]
    seq = setup["form"] == "sequence"
    xc = x.detach().clone().requires_grad_(train)
    xe = x.detach().clone().requires_grad_(train)
    c.opt.zero_grad(set_to_none=True)
    e.opt.zero_grad(set_to_none=True)
    torch.manual_seed(1000 + i)
    rec = SpikeRecorder(twin)
    try:
        out_e = eager_run(twin, xe, T=T if not seq else None, sequence=seq)
    except Exception as exc_e:
        rec.remove()
        torch.manual_seed(1000 + i)
        try:
            cm(xc)
        except Exception:
            raise _BothRaised(repr(exc_e)) from None
        raise Mismatch(f"step {i}: eager raised {exc_e!r}, the compiled model did not")
    rec.remove()
    if rec.records:
        stats.setdefault("rates", []).append(round(rec.total(), 3))
    torch.manual_seed(1000 + i)
    out_c = cm(xc)
    if not torch.isfinite(out_e).all():
        raise _BothRaised(f"step {i}: eager's output is not finite")
    assert_close_tensors(out_e.detach(), out_c.detach(), f"step {i}: output", **tol["out"])
    stats["outputs"] += 1
    if train:
        g = torch.Generator().manual_seed(7 + i)
        w = torch.randn(out_e.shape, generator=g, dtype=torch.float64).to(out_e.dtype)
        (out_e * w).sum().backward()
        (out_c * w).sum().backward()
        if not all(torch.isfinite(p.grad).all() for p in twin.parameters() if p.grad is not None):
            raise _BothRaised(f"step {i}: eager's gradients are not finite")
        if xe.grad is not None or xc.grad is not None:
            assert xe.grad is not None and xc.grad is not None, "input grad: one side has none"
            _close(xe.grad, xc.grad, f"step {i}: input grad", **tol["grad"])
        _compare_state(c, e, f"step {i} (after backward)", tol["grad"], grads=True)
        e.opt.step()
        c.opt.step()
    _compare_state(c, e, f"step {i} (after the step)", tol["grad"], grads=False)
    stats["steps"] += 1


def _recheck64(spec: ModelSpec, setup: Dict[str, Any], before: Tuple[Dict[str, torch.Tensor], bool],
               x: torch.Tensor, i: int, op: Tuple[Any, ...], exc32: BaseException) -> None:
    """The float32 step that differed, again in float64 from the compiled side's weights on both sides."""
    sd, training = before
    m = spec.build(setup["seed"]).double()
    m.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in sd.items()})
    m.train(training)
    twin = copy.deepcopy(m)
    kw = dict(T=setup["T"]) if setup["form"] == "static" else dict(sequence=True)
    cm = snncc.compile(m, verify=True, chunk=setup["chunk"], memory=setup["memory"], fuse=setup["fuse"],
                       bitpack=setup["bitpack"], **kw)
    c = _Side(cm, torch.optim.SGD(cm.parameters(), lr=0.0))
    e = _Side(twin, torch.optim.SGD(twin.parameters(), lr=0.0))
    try:
        _step(cm, twin, c, e, x.double(), setup, i, {"steps": 0, "outputs": 0})
    except AssertionError as exc:
        raise Mismatch(f"step {i} {op}: differs in float32 ({exc32}) and in float64 from the same weights: "
                       f"{exc}") from exc


def describe(spec: ModelSpec, setup: Dict[str, Any], ops: Sequence[Tuple[Any, ...]]) -> str:
    """The case as Python a regression test can paste."""
    return f"spec = {spec!r}\nsetup = {setup!r}\nops = {tuple(ops)!r}"


def budget_from_env(value: Optional[str]) -> Tuple[Optional[float], Optional[int]]:
    """``SNNCC_FUZZ_BUDGET``: seconds (``90``, ``90s``, ``30m``, ``2h``) or examples (``500x``)."""
    if not value:
        return None, None
    v = value.strip().lower()
    if v.endswith("x"):
        return None, int(v[:-1])
    scale = {"s": 1, "m": 60, "h": 3600}.get(v[-1], None)
    seconds = float(v[:-1]) * scale if scale else float(v)
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"SNNCC_FUZZ_BUDGET={value!r}: give seconds (90, 30m, 2h) or examples (500x)")
    return seconds, None
