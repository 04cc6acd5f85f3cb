"""Benchmark: a zoo of step-mode SNNs, eager loop vs ``snncc.compile(model, T=T)``, on this machine.

Models (all single-step mode, static input fed at each of T steps):

* ``sj_vgg``      SpikingJelly 2.x spiking VGG-BN: the zoo's ``SpikingVGG.make_layers`` (conv-BN-LIFNode, maxpool)
                  with a small cfg and a linear head (the zoo's own 4096-wide classifier does not fit a 2-core
                  CPU); a hand-written equivalent when the zoo does not import.
* ``sj_sew``      SpikingJelly SEW-ResNet: a stem and three of the zoo's ``sew_resnet.BasicBlock`` (cnf="ADD").
* ``snn_leaky``   snnTorch conv net (tutorial 6 layout) with ``snn.Leaky(beta=0.9, init_hidden=True)``, Linear out.
* ``snn_synaptic`` the same with ``snn.Synaptic(alpha=0.8, beta=0.9, init_hidden=True)``.
* ``sj_mlp_zoo``  an MLP of SpikingJelly's CUBALIFNode, EIFNode, QIFNode and IzhikevichNode.
* ``custom``      a user-written neuron (state ``self.v``, learnable per-channel sigmoid decay, its own
                  ``autograd.Function`` surrogate) in a small conv net.
* ``spikformer``  a spiking self-attention block on tokens [N, L, D]: q/k/v = Linear + BatchNorm1d + LIFNode,
                  spike matmuls scaled by Spikformer's 0.125, LIF, projection, residual, classifier head.
                  The attention LIF is calibrated through its threshold (the same firing as scaling its
                  input, ``v_reset = 0``), so the scale stays the model's own.

For each model: the neuron layers are calibrated to fire about 10% on the benchmark batch (their feeding
Conv/Linear/BatchNorm scaled, see ``tools/_rates.py``) and the rates are printed beside the times. On one
batch, before any training, the compiled outputs (train and eval) and parameter gradients are compared with
eager's (float32 tolerances; when they differ, again in float64, which tells float32 spike flips from a
real mismatch), and the neuron layers snncc compiled are counted against those it ran opaque (from
``snncc.explain`` when it exists, else the task graph). Then eager, snncc (and with ``--torch-compile``
``torch.compile`` of the eager loop) are timed interleaved, a training phase (forward, cross-entropy on the
mean over time, backward, Adam) then an inference phase (eval, no_grad), each ``--repeat`` rounds of
``--reps`` calls per variant; medians are reported with their ratio, and apart from them the first call
after a train/eval switch. A model or variant that fails is reported, never fatal.

    python tools/bench_zoo.py --markdown --json zoo.json
    python tools/bench_zoo.py --models sj_vgg,custom --repeat 7
    python tools/bench_zoo.py --quick          # smoke test: tiny sizes, one repeat, < 60 s
"""
from __future__ import annotations

import argparse
import copy
import datetime
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
import traceback
import types
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

if __package__ in (None, ""):      # run as a script: python tools/bench_zoo.py
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from tools import _rates  # noqa: E402
else:
    from . import _rates

import snncc  # noqa: E402

__all__ = ["ZooModel", "BUILDERS", "build", "bench_model", "run", "main", "RECORD_FIELDS"]

#: every record (one per model) has these keys, failed or not
RECORD_FIELDS = ("model", "description", "batch", "T", "input_shape", "neurons", "n_neurons", "n_compiled",
                 "n_opaque", "opaque", "kernels", "opaque_reasons", "coverage_source", "rates", "rates_eval",
                 "rates_end", "gains", "feeders",
                 "times_ms", "speedup", "switch_ms", "equal", "compile_s", "warnings", "errors")

#: float32 tolerances of the project's golden tests (tests/conftest.py ``tolerances``)
TOL = {"out": dict(rtol=1e-4, atol=1e-5), "grad": dict(rtol=1e-3, atol=1e-5)}


# =========================================================================== resets
def reset_sj(model: nn.Module) -> None:
    from spikingjelly.activation_based import functional
    functional.reset_net(model)


def reset_snntorch(model: nn.Module) -> None:
    """What ``snntorch.utils.reset`` does to each neuron (``mem = zeros_like(mem)``, detached), done per instance.

    NOTE: ``snntorch.utils.reset(net)`` only looks at ``net`` for which neuron classes it has, then resets the
    class registry ``Leaky.instances`` -- every ``init_hidden`` instance made in the process, but not a
    ``copy.deepcopy`` of one (a copy is never registered). On the benchmark's deep copies it left the state of
    the previous call in place (found by the compiled == eager check, eval after a train step). The
    neurons' own ``reset_mem()`` resets exactly the model's neurons.
    """
    import snntorch
    for m in model.modules():
        if isinstance(m, snntorch.SpikingNeuron) and callable(getattr(m, "reset_mem", None)):
            m.reset_mem()


def reset_generic(model: nn.Module) -> None:
    for m in model.modules():
        if m is not model and _rates.is_neuron(m):
            m.reset()


# =========================================================================== the zoo
@dataclass
class ZooModel:
    """A step-mode model, the input it runs on and how its eager loop resets it."""

    name: str
    description: str
    model: nn.Module
    input_shape: Tuple[int, ...]
    reset: Callable[[nn.Module], None]
    num_classes: int = 10
    #: qualname -> gain, for neuron layers whose input no weight module scales (attention); given a model copy
    gains: Callable[[nn.Module], Dict[str, _rates.Gain]] = field(default=lambda m: {})


def _install_torchvision_stub() -> None:
    """SpikingJelly's zoo imports ``load_state_dict_from_url`` from torchvision (only for pretrained weights);
    without torchvision, register just that submodule with a function that raises (as tests/conftest.py)."""
    if importlib.util.find_spec("torchvision") is not None:
        return
    name = "torchvision._internally_replaced_utils"
    if name not in sys.modules:
        stub = types.ModuleType(name)

        def load_state_dict_from_url(*a: Any, **k: Any) -> Any:
            raise RuntimeError("torchvision is not installed: bench_zoo never loads pretrained weights")
        stub.load_state_dict_from_url = load_state_dict_from_url
        sys.modules[name] = stub


def _sj_lif_kw() -> Dict[str, Any]:
    from spikingjelly.activation_based import surrogate
    return dict(tau=2.0, surrogate_function=surrogate.ATan(), detach_reset=True)


def build_sj_vgg(quick: bool = False) -> ZooModel:
    from spikingjelly.activation_based import layer, neuron
    cfg: List[Any] = [8, "M", 16, "M"] if quick else [16, "M", 32, "M", 64, "M"]
    size = 16 if quick else 32
    try:
        _install_torchvision_stub()
        from spikingjelly.activation_based.model.spiking_vgg import SpikingVGG
        features = SpikingVGG.make_layers(cfg=cfg, batch_norm=True, neuron=neuron.LIFNode, **_sj_lif_kw())
        how = "SJ zoo SpikingVGG.make_layers"
    except Exception:   # noqa: BLE001 -- the zoo did not import: the same layers by hand
        layers: List[nn.Module] = []
        c_in = 3
        for v in cfg:
            if v == "M":
                layers.append(layer.MaxPool2d(2, 2))
            else:
                layers += [layer.Conv2d(c_in, v, 3, padding=1), layer.BatchNorm2d(v), neuron.LIFNode(**_sj_lif_kw())]
                c_in = v
        features = nn.Sequential(*layers)
        how = "hand-written SpikingVGG-BN"
    c_last = [v for v in cfg if v != "M"][-1]
    pools = cfg.count("M")
    model = nn.Sequential(features, layer.Flatten(), layer.Linear(c_last * (size >> pools) ** 2, 10))
    return ZooModel("sj_vgg", f"{how} cfg={cfg}, LIFNode(ATan, detach_reset), {size}x{size}", model,
                    (3, size, size), reset_sj)


def build_sj_sew(quick: bool = False) -> ZooModel:
    from spikingjelly.activation_based import layer, neuron
    _install_torchvision_stub()
    from spikingjelly.activation_based.model import sew_resnet
    c1, c2 = (8, 16) if quick else (16, 32)
    size = 16 if quick else 32
    kw = _sj_lif_kw()
    blk = dict(cnf="ADD", spiking_neuron=neuron.LIFNode, **kw)
    model = nn.Sequential(      # a stride-2 stem (as ResNets have): the blocks run at size/2 and size/4
        layer.Conv2d(3, c1, 3, stride=2, padding=1, bias=False), layer.BatchNorm2d(c1), neuron.LIFNode(**kw),
        sew_resnet.BasicBlock(c1, c1, **blk),
        sew_resnet.BasicBlock(c1, c2, stride=2, downsample=nn.Sequential(sew_resnet.conv1x1(c1, c2, 2),
                                                                          layer.BatchNorm2d(c2)), **blk),
        sew_resnet.BasicBlock(c2, c2, **blk),
        layer.AdaptiveAvgPool2d((1, 1)), layer.Flatten(), layer.Linear(c2, 10))
    return ZooModel("sj_sew", f"SEW-ResNet stride-2 stem + 3 SJ zoo BasicBlocks (ADD), {c1}/{c2} ch, {size}x{size}",
                    model, (3, size, size), reset_sj)


class SnnTorchNet(nn.Module):
    """snnTorch tutorial 6's conv net in step mode (``init_hidden=True``), a Linear readout."""

    def __init__(self, neuron: Callable[[], nn.Module], c1: int, c2: int, size: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, c1, 5)
        self.pool1 = nn.MaxPool2d(2)
        self.lif1 = neuron()
        self.conv2 = nn.Conv2d(c1, c2, 5)
        self.pool2 = nn.MaxPool2d(2)
        self.lif2 = neuron()
        s = ((size - 4) // 2 - 4) // 2
        self.fc = nn.Linear(c2 * s * s, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.lif1(self.pool1(self.conv1(x)))
        x = self.lif2(self.pool2(self.conv2(x)))
        return self.fc(x.flatten(1))


def build_snn_leaky(quick: bool = False) -> ZooModel:
    import snntorch as snn
    c1, c2, size = (4, 8, 20) if quick else (16, 64, 28)
    model = SnnTorchNet(lambda: snn.Leaky(beta=0.9, init_hidden=True), c1, c2, size)
    return ZooModel("snn_leaky", f"snnTorch conv net, Leaky(beta=0.9, init_hidden), {c1}/{c2} ch, {size}x{size}",
                    model, (1, size, size), reset_snntorch)


def build_snn_synaptic(quick: bool = False) -> ZooModel:
    import snntorch as snn
    c1, c2, size = (4, 8, 20) if quick else (16, 64, 28)
    model = SnnTorchNet(lambda: snn.Synaptic(alpha=0.8, beta=0.9, init_hidden=True), c1, c2, size)
    return ZooModel("snn_synaptic", f"snnTorch conv net, Synaptic(alpha=0.8, beta=0.9, init_hidden), {c1}/{c2} ch, "
                    f"{size}x{size}", model, (1, size, size), reset_snntorch)


def build_sj_mlp_zoo(quick: bool = False) -> ZooModel:
    from spikingjelly.activation_based import layer, neuron
    h, size = (64, 14) if quick else (1024, 28)
    model = nn.Sequential(
        layer.Flatten(),
        layer.Linear(size * size, h), neuron.CUBALIFNode(),
        layer.Linear(h, h), neuron.EIFNode(),
        layer.Linear(h, h), neuron.QIFNode(),
        layer.Linear(h, h), neuron.IzhikevichNode(),
        layer.Linear(h, 10))
    return ZooModel("sj_mlp_zoo", f"MLP {size * size}-{h}x4-10: CUBALIF, EIF, QIF, Izhikevich (SJ defaults)", model,
                    (1, size, size), reset_sj)


class FastSigmoidSpike(torch.autograd.Function):
    """Heaviside forward, fast-sigmoid surrogate backward (SuperSpike, slope 10)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return (x >= 0).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return g / (1 + 10 * x.abs()) ** 2


class LearnableDecayNeuron(nn.Module):
    """A user-written LIF: ``v = sigmoid(w) * v + x``, spike at ``v >= 1``, hard reset; per-channel ``w``."""

    def __init__(self, channels: int, v_threshold: float = 1.0) -> None:
        super().__init__()
        self.decay = nn.Parameter(torch.full((channels, 1, 1), 1.0))    # sigmoid(1) ~ 0.73
        self.v_threshold = v_threshold
        self.v: Optional[torch.Tensor] = None

    def reset(self) -> None:
        self.v = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.v is None:
            self.v = torch.zeros_like(x)
        self.v = torch.sigmoid(self.decay) * self.v + x
        s = FastSigmoidSpike.apply(self.v - self.v_threshold)
        self.v = self.v * (1.0 - s)
        return s


class CustomNeuronNet(nn.Module):
    def __init__(self, c1: int, c2: int, size: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, c1, 3, padding=1)
        self.sn1 = LearnableDecayNeuron(c1)
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.sn2 = LearnableDecayNeuron(c2)
        self.pool2 = nn.MaxPool2d(2)
        self.fc = nn.Linear(c2 * (size // 4) ** 2, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.sn1(self.conv1(x)))
        x = self.pool2(self.sn2(self.conv2(x)))
        return self.fc(x.flatten(1))


def build_custom(quick: bool = False) -> ZooModel:
    c1, c2, size = (4, 8, 16) if quick else (16, 32, 32)
    return ZooModel("custom", f"user neuron (self.v, sigmoid decay [C,1,1], own autograd surrogate) conv net, "
                    f"{c1}/{c2} ch, {size}x{size}", CustomNeuronNet(c1, c2, size), (3, size, size), reset_generic)


class SpikingSelfAttention(nn.Module):
    """Spikformer-style SSA on tokens [N, L, D]: q, k, v = LIF(BN(Linear(x))); attn = q k^T * scale; LIF(attn v);
    projection; residual."""

    def __init__(self, dim: int, heads: int) -> None:
        from spikingjelly.activation_based import neuron
        super().__init__()
        self.heads = heads
        self.scale = 0.125
        kw = _sj_lif_kw()
        for n in "qkv":
            setattr(self, f"{n}_linear", nn.Linear(dim, dim))
            setattr(self, f"{n}_bn", nn.BatchNorm1d(dim))
            setattr(self, f"{n}_lif", neuron.LIFNode(**kw))
        self.attn_lif = neuron.LIFNode(**kw)
        self.proj = nn.Linear(dim, dim)

    def _branch(self, n: str, x: torch.Tensor) -> torch.Tensor:
        N, L, D = x.shape
        y = getattr(self, f"{n}_linear")(x)
        y = getattr(self, f"{n}_bn")(y.transpose(1, 2)).transpose(1, 2)
        y = getattr(self, f"{n}_lif")(y)
        return y.reshape(N, L, self.heads, D // self.heads).transpose(1, 2)      # [N, H, L, d]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, L, D = x.shape
        q, k, v = self._branch("q", x), self._branch("k", x), self._branch("v", x)
        attn = (q @ k.transpose(-2, -1)) * self.scale                             # spikes @ spikes
        y = self.attn_lif(attn @ v)                                               # [N, H, L, d]
        y = y.transpose(1, 2).reshape(N, L, D)
        return x + self.proj(y)


class TinySpikformer(nn.Module):
    """Patch embedding (conv, BN, LIF) -> tokens -> one SSA block -> mean over tokens -> classifier."""

    def __init__(self, dim: int, heads: int, patch: int) -> None:
        from spikingjelly.activation_based import neuron
        super().__init__()
        self.embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.embed_bn = nn.BatchNorm2d(dim)
        self.embed_lif = neuron.LIFNode(**_sj_lif_kw())
        self.block = SpikingSelfAttention(dim, heads)
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed_lif(self.embed_bn(self.embed(x)))               # [N, D, h, w]
        x = x.flatten(2).transpose(1, 2)                               # [N, L, D]
        x = self.block(x)
        return self.head(x.mean(1))


def build_spikformer(quick: bool = False) -> ZooModel:
    dim, heads, size, patch = (16, 2, 16, 4) if quick else (32, 2, 32, 4)
    model = TinySpikformer(dim, heads, patch)
    L = (size // patch) ** 2
    return ZooModel("spikformer", f"SSA block, D={dim}, {heads} heads, L={L} tokens ({size}x{size}, patch {patch})",
                    model, (3, size, size), reset_sj,
                    gains=lambda m: {"block.attn_lif": _rates.AttrGain("block.attn_lif", m.block.attn_lif,
                                                                       "v_threshold", inverse=True)})


BUILDERS: Dict[str, Callable[[bool], ZooModel]] = {
    "sj_vgg": build_sj_vgg, "sj_sew": build_sj_sew, "snn_leaky": build_snn_leaky,
    "snn_synaptic": build_snn_synaptic, "sj_mlp_zoo": build_sj_mlp_zoo, "custom": build_custom,
    "spikformer": build_spikformer,
}


def build(name: str, quick: bool = False) -> ZooModel:
    if name not in BUILDERS:
        raise KeyError(f"unknown model {name!r}; have {', '.join(BUILDERS)}")
    return BUILDERS[name](quick)


# =========================================================================== running
class EagerLoop(nn.Module):
    """The eager Python loop over time that snncc replaces: reset, then T calls on the static input."""

    def __init__(self, net: nn.Module, T: int, reset: Callable[[nn.Module], None]) -> None:
        super().__init__()
        self.net, self.T = net, T
        self._reset = reset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._reset(self.net)
        return torch.stack([self.net(x) for _ in range(self.T)])


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(model(x).mean(0), y)
    loss.backward()
    opt.step()


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def _err(e: BaseException) -> str:
    msg = f"{type(e).__name__}: {e}".strip().replace("\n", " ")
    return msg if len(msg) <= 300 else msg[:297] + "..."


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).abs().max()) if a.numel() else 0.0


def _copy(zm: ZooModel, net: nn.Module) -> nn.Module:
    zm.reset(net)
    return copy.deepcopy(net)


# --------------------------------------------------------------------------- coverage
@dataclass
class Coverage:
    """Which neuron layers snncc compiled (and with which kernel) and which it ran opaque (and why)."""

    compiled: List[str]
    opaque: List[str]
    source: str                                        # "snncc.explain" | "task graph" | "warnings"
    kernels: Dict[str, str] = field(default_factory=dict)   # compiled qualname -> "builtin:lif" / "lifted"
    reasons: Dict[str, str] = field(default_factory=dict)   # opaque qualname -> why
    explain_text: Optional[str] = None


def _from_explanation(rep: Any, neurons: Sequence[str]) -> Optional[Coverage]:
    """Read ``snncc.explain``'s ``Explanation``: ``layers`` rows with ``qualname``/``kind`` ("neuron",
    "opaque")/``kernel``, and ``opaque`` {qualname: reason}. None if it does not look like that."""
    layers = getattr(rep, "layers", None)
    if not isinstance(layers, (list, tuple)) or not all(hasattr(r, "qualname") and hasattr(r, "kind")
                                                         for r in layers):
        return None
    kind = {r.qualname: r.kind for r in layers}
    reasons = dict(getattr(rep, "opaque", None) or {})
    return Coverage(compiled=[n for n in neurons if kind.get(n) == "neuron"],
                    opaque=[n for n in neurons if kind.get(n) == "opaque" or n in reasons],
                    source="snncc.explain",
                    kernels={r.qualname: str(r.kernel) for r in layers if r.kind == "neuron" and r.qualname in neurons},
                    reasons={n: str(reasons.get(n, "")) for n in neurons if n in reasons}, explain_text=str(rep))


def _from_task_graph(cmodel: snncc.CompiledModule, x: torch.Tensor, neurons: Sequence[str]) -> Coverage:
    """From the schedule snncc runs: a neuron layer is a ``neuron`` scan task or an ``opaque`` step task."""
    c = cmodel.specialize(x)
    kinds: Dict[str, set] = {}
    for t in c.task_graph.tasks():
        if t.kind in ("neuron", "opaque"):
            kinds.setdefault(str(t.target), set()).add(t.kind)
    bindings = getattr(c.traced, "bindings", {}) or {}
    comp = [n for n in neurons if kinds.get(n) == {"neuron"}]
    missing = [n for n in neurons if n not in kinds]
    return Coverage(compiled=comp, opaque=[n for n in neurons if "opaque" in kinds.get(n, set())],
                    source="task graph" + (f" (in neither kind: {missing})" if missing else ""),
                    kernels={n: str(getattr(bindings.get(n), "how", "?")) for n in comp})


def neuron_coverage(cmodel: snncc.CompiledModule, x: torch.Tensor, T: int, neurons: Sequence[str],
                    caught: Sequence[str] = ()) -> Coverage:
    """From ``snncc.explain`` when it exists (on the compiled module itself: no second compilation); else
    from the task graph; when neither can be read, from the warnings compile + first call raised."""
    note = None
    explain = getattr(snncc, "explain", None)
    if callable(explain):
        try:
            try:
                rep = explain(cmodel, x)
            except (TypeError, snncc.InputError):
                rep = explain(cmodel.model, x, T=T)
            cov = _from_explanation(rep, neurons)
            if cov is not None:
                return cov
            note = str(rep)
        except Exception as e:   # noqa: BLE001 -- explain is new: fall back to the task graph
            note = f"snncc.explain failed: {_err(e)}"
    try:
        cov = _from_task_graph(cmodel, x, neurons)
    except Exception as e:   # noqa: BLE001
        hits = [m for m in caught if "opaque" in m.lower() or "not compiled" in m.lower()]
        cov = Coverage(compiled=[], opaque=[f"warning: {m}" for m in hits],
                       source=f"warnings (task graph unreadable: {_err(e)})")
    cov.explain_text = note
    return cov


def _compare(zm: ZooModel, base: nn.Module, x: torch.Tensor, y: torch.Tensor, T: int,
             dtype: torch.dtype) -> Dict[str, Any]:
    """Compiled vs eager on fresh copies of ``base`` in ``dtype``: train outputs, gradients, eval outputs."""
    em = EagerLoop(_copy(zm, base).to(dtype), T, zm.reset).train()
    cm = snncc.compile(_copy(zm, base).to(dtype), T=T).train()
    xx = x.to(dtype)
    oe, oc = em(xx), cm(xx)
    for o in (oe, oc):
        nn.functional.cross_entropy(o.mean(0), y).backward()
    ge = dict(em.net.named_parameters())
    gd = max((_max_diff(p.grad, ge[n].grad) for n, p in cm.model.named_parameters()
              if p.grad is not None and ge[n].grad is not None), default=0.0)
    em.eval(), cm.eval()
    with torch.no_grad():
        de = _max_diff(em(xx), cm(xx))
    return {"out_diff_train": _max_diff(oc, oe), "grad_diff": gd, "out_diff_eval": de}


def _check_float64(zm: ZooModel, base: nn.Module, x: torch.Tensor, y: torch.Tensor, T: int) -> Dict[str, Any]:
    """The float64 comparison, run when float32's failed: identical there means float32 rounding flipped a
    spike at its threshold (the contract promises identical spikes in float64, tolerances in float32)."""
    try:
        r = _compare(zm, base, x, y, T, torch.float64)
        r["identical"] = r["out_diff_train"] == 0.0 and r["out_diff_eval"] == 0.0 and r["grad_diff"] < 1e-9
        return r
    except Exception as e:   # noqa: BLE001
        return {"error": _err(e)}


# --------------------------------------------------------------------------- one model
def _empty_record(name: str, args: argparse.Namespace) -> Dict[str, Any]:
    rec: Dict[str, Any] = {k: None for k in RECORD_FIELDS}
    rec.update(model=name, T=args.T, batch=args.batch, neurons=[], opaque=[], kernels={}, opaque_reasons={},
               rates={}, rates_eval={}, rates_end={}, gains={}, feeders={}, times_ms={}, speedup={}, switch_ms={},
               equal={}, warnings=[], errors={})
    return rec


def _calibrate(zm: ZooModel, x: torch.Tensor, T: int, args: argparse.Namespace, rec: Dict[str, Any]) -> None:
    """Scale the feeders of ``zm.model`` to ~``args.rate`` firing (train mode), let the BatchNorm running
    statistics settle on the calibrated net, record the rates in train and eval mode."""
    base = zm.model.train()
    loop = EagerLoop(base, T, zm.reset)

    def step() -> Any:
        zm.reset(base)
        return base(x)
    try:
        cal = _rates.calibrate(base, lambda: loop(x), step, target=args.rate, iters=6 if args.quick else 12,
                               overrides=zm.gains(base))
        with torch.no_grad():
            for _ in range(3):
                loop(x)
        rec["rates"], rec["gains"], rec["feeders"] = cal.rates, cal.gains, cal.feeders
        base.eval()
        rec["rates_eval"] = _rates.record_rates(base, lambda: loop(x))
    except Exception as e:   # noqa: BLE001
        rec["errors"]["calibrate"] = _err(e)
    finally:
        base.train()


def _check_equal(zm: ZooModel, cm: snncc.CompiledModule, em: EagerLoop, out_c: torch.Tensor, x: torch.Tensor,
                 y: torch.Tensor, T: int) -> Dict[str, Any]:
    """Compiled == eager on one batch, same weights, before any training: train outputs (``out_c`` is the
    compiled model's first call), parameter gradients, eval outputs; float64 when float32 failed."""
    eq: Dict[str, Any] = {}
    try:
        out_e = em(x)
        eq["out_diff_train"] = _max_diff(out_c, out_e)
        eq["out_ok_train"] = bool(torch.allclose(out_c, out_e, **TOL["out"]))
        for m, o in ((em, out_e), (cm, out_c)):
            m.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(o.mean(0), y).backward()
        ge = dict(em.net.named_parameters())
        gd, gok = 0.0, True
        for pn, pc in cm.model.named_parameters():
            a, b = pc.grad, ge[pn].grad
            if a is None or b is None:
                gok = gok and a is None and b is None
                continue
            gd = max(gd, _max_diff(a, b))
            gok = gok and bool(torch.allclose(a, b, **TOL["grad"]))
        eq["grad_diff"], eq["grad_ok"] = gd, gok
        cm.eval(), em.eval()
        with torch.no_grad():
            oc, oe = cm(x), em(x)
        eq["out_diff_eval"] = _max_diff(oc, oe)
        eq["out_ok_eval"] = bool(torch.allclose(oc, oe, **TOL["out"]))
        eq["held"] = eq["out_ok_train"] and eq["grad_ok"] and eq["out_ok_eval"]
        if not eq["held"]:     # rounding (a float32 spike flipped at its threshold) or a real mismatch?
            eq["float64"] = _check_float64(zm, zm.model, x, y, T)
    except Exception as e:   # noqa: BLE001
        eq["error"] = _err(e)
        eq["held"] = False
    finally:
        for m in (cm, em):
            m.train()
            m.zero_grad(set_to_none=True)
    return eq


def _time_variants(variants: Dict[str, nn.Module], x: torch.Tensor, y: torch.Tensor, args: argparse.Namespace,
                   rec: Dict[str, Any], log: Callable[[str], None]) -> Dict[str, Dict[str, Optional[float]]]:
    """Medians of a training phase then an inference phase: in each, a warm-up and then ``args.repeat``
    interleaved rounds of ``args.reps`` calls per variant. Afterwards, the cost of the first call after a
    mode switch (train -> eval -> train, every specialization already built) goes in ``rec['switch_ms']``.
    A variant that raises is dropped (its error recorded) and the others go on.

    NOTE: the modes are timed in phases, as a training loop runs (an epoch of steps, then an evaluation),
    not alternated every few calls: snncc's first call after ``train()``/``eval()`` can cost far more than the
    next ones (measured apart, as ``switch_ms``), and alternating would mix that into every median.
    """
    # NOTE: a small learning rate keeps the calibrated firing rates through the timed steps (at 1e-3 the MLP's
    # first layer went from 10% to 36% in a dozen steps); the cost of a step does not depend on it.
    opts = {k: torch.optim.Adam(m.parameters(), lr=args.lr) for k, m in variants.items()}
    times: Dict[str, Dict[str, List[float]]] = {k: {"train": [], "infer": []} for k in variants}
    alive = dict(variants)

    def call(k: str, mode: str) -> Optional[float]:
        m = alive.get(k)
        if m is None:
            return None
        try:
            if mode == "train":
                m.train()
                return _timed(lambda: _train_step(m, opts[k], x, y))
            m.eval()
            with torch.no_grad():
                return _timed(lambda: m(x))
        except Exception as e:   # noqa: BLE001
            rec["errors"][f"{k} {mode}"] = _err(e)
            alive.pop(k, None)
            log(f"[{rec['model']}] {k} {mode} failed: {rec['errors'][f'{k} {mode}']}")
            return None

    for mode in ("train", "infer"):
        for k in list(alive):                   # warm-up: compilation, specialization, allocator
            # NOTE: torch.compile recompiles a few times before its guards settle (the neurons' state
            # tensors change requires_grad between the first calls): more warm-up, or it compiles while timed
            for _ in range((1 if args.quick else 2) + (2 if k == "torch.compile" else 0)):
                call(k, mode)
        for _ in range(args.repeat):
            for k in list(alive):
                for _ in range(args.reps):
                    t = call(k, mode)
                    if t is not None:
                        times[k][mode].append(t)
    switch: Dict[str, Dict[str, Optional[float]]] = {}
    for k in list(alive):
        to_train = call(k, "train")
        call(k, "train")
        switch[k] = {"to_train": to_train, "to_eval": call(k, "infer")}
        if k in alive:
            alive[k].train()
    rec["switch_ms"] = switch
    return {k: {mode: (statistics.median(v) if v else None) for mode, v in d.items()} for k, d in times.items()}


def bench_model(name: str, args: argparse.Namespace, log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Calibrate, check and time one zoo model; every failure lands in ``record['errors']``."""
    rec = _empty_record(name, args)
    T, B = args.T, args.batch
    try:
        torch.manual_seed(args.seed)
        zm = build(name, args.quick)
    except Exception as e:   # noqa: BLE001
        rec["errors"]["build"] = _err(e)
        log(f"[{name}] build failed: {rec['errors']['build']}")
        return rec
    rec.update(description=zm.description, input_shape=list(zm.input_shape))
    g = torch.Generator().manual_seed(args.seed)
    x = torch.rand(B, *zm.input_shape, generator=g)
    y = torch.randint(0, zm.num_classes, (B,), generator=g)
    neurons = [n for n, _ in _rates.neuron_layers(zm.model)]
    rec.update(neurons=neurons, n_neurons=len(neurons))
    _calibrate(zm, x, T, args, rec)
    log(f"[{name}] {zm.description}")
    log(f"[{name}] rates train: {_fmt_rates(rec['rates'])} | eval: {_fmt_rates(rec['rates_eval'])}")

    # ---- variants, all from the same calibrated weights
    variants: Dict[str, nn.Module] = {}
    try:
        variants["eager"] = EagerLoop(_copy(zm, zm.model), T, zm.reset)
    except Exception as e:   # noqa: BLE001
        rec["errors"]["eager"] = _err(e)
        return rec
    caught: List[str] = []
    cm: Optional[snncc.CompiledModule] = None
    try:
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            try:
                cm = snncc.compile(_copy(zm, zm.model), T=T).train()
                out_c = cm(x)
            finally:
                caught = sorted({f"{wi.category.__name__}: {wi.message}" for wi in w})
        rec["compile_s"] = time.perf_counter() - t0
    except Exception as e:   # noqa: BLE001
        cm = None
        rec["errors"]["snncc"] = _err(e)
        log(f"[{name}] snncc failed: {rec['errors']['snncc']}")
        if args.verbose:
            traceback.print_exc()
    rec["warnings"] = caught
    if cm is not None:
        rec["equal"] = _check_equal(zm, cm, variants["eager"], out_c, x, y, T)
        try:
            cov = neuron_coverage(cm, x, T, neurons, caught)
            rec.update(n_compiled=len(cov.compiled), n_opaque=len(cov.opaque), opaque=cov.opaque,
                       coverage_source=cov.source, kernels=cov.kernels, opaque_reasons=cov.reasons)
            if cov.explain_text:
                rec["explain"] = cov.explain_text
        except Exception as e:   # noqa: BLE001
            rec["errors"]["coverage"] = _err(e)
        variants["snncc"] = cm
    if args.torch_compile:
        try:
            # NOTE: compile in this process: inductor's worker processes would otherwise run beside the
            # other variants' timed calls whenever torch.compile recompiles (seen: eager 40x slower)
            import torch._inductor.config as inductor_config
            inductor_config.compile_threads = 1
            variants["torch.compile"] = torch.compile(EagerLoop(_copy(zm, zm.model), T, zm.reset))
        except Exception as e:   # noqa: BLE001
            rec["errors"]["torch.compile"] = _err(e)

    # ---- timing
    med = _time_variants(variants, x, y, args, rec, log)
    rec["times_ms"] = med
    for k in med:
        if k != "eager":
            rec["speedup"][k] = {mode: (med["eager"][mode] / med[k][mode]
                                        if med["eager"].get(mode) and med[k].get(mode) else None)
                                 for mode in ("train", "infer")}
    try:
        em = variants["eager"]
        rec["rates_end"] = _rates.record_rates(em.net, lambda: em(x))
    except Exception as e:   # noqa: BLE001
        rec["errors"]["rates_end"] = _err(e)
    log(_fmt_record(rec))
    return rec


# =========================================================================== output
def _fmt_rates(rates: Dict[str, float]) -> str:
    return " ".join(f"{n}={100 * r:.0f}%" for n, r in rates.items()) if rates else "-"


def _ms(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.1f}"


def _x(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _eq_str(eq: Dict[str, Any]) -> str:
    if not eq:
        return "-"
    if "out_diff_train" not in eq:
        return f"error: {eq.get('error', '?')}"
    held = "yes" if eq.get("held") else "NO"
    s = (f"{held} (out {eq['out_diff_train']:.1e}/{eq.get('out_diff_eval', float('nan')):.1e}, "
         f"grad {eq.get('grad_diff', float('nan')):.1e})")
    f64 = eq.get("float64")
    if f64:
        s += (f"; float64: error {f64['error']}" if "error" in f64 else
              "; float64 identical (float32 spike flips)" if f64["identical"] else
              f"; float64 NO (out {f64['out_diff_train']:.1e}/{f64['out_diff_eval']:.1e}, grad {f64['grad_diff']:.1e})")
    return s


def _kernels_str(rec: Dict[str, Any]) -> str:
    """``builtin:lif x3, lifted x2``: how the compiled neuron layers run."""
    counts: Dict[str, int] = {}
    for k in (rec.get("kernels") or {}).values():
        counts[k] = counts.get(k, 0) + 1
    return ", ".join(f"{k} x{n}" for k, n in counts.items())


def _cov_str(rec: Dict[str, Any]) -> str:
    if rec["n_compiled"] is None and rec["n_opaque"] is None:
        return f"?/{rec['n_neurons'] or 0}"
    kern = _kernels_str(rec)
    return (f"{rec['n_compiled'] or 0} compiled{f' ({kern})' if kern else ''}, {rec['n_opaque'] or 0} opaque"
            f" / {rec['n_neurons']}")


def _fmt_record(rec: Dict[str, Any]) -> str:
    t, s = rec["times_ms"], rec["speedup"]
    lines = [f"[{rec['model']}] neurons: {_cov_str(rec)} (from {rec['coverage_source']})"]
    for q in rec["opaque"]:
        lines.append(f"[{rec['model']}]   opaque {q}: {(rec.get('opaque_reasons') or {}).get(q, '')}")
    for k, d in t.items():
        sp = s.get(k, {})
        sw = (rec.get("switch_ms") or {}).get(k) or {}
        lines.append(f"[{rec['model']}]   {k:<14} train {_ms(d['train']):>8} ms {_x(sp.get('train')):>7} | "
                     f"infer {_ms(d['infer']):>8} ms {_x(sp.get('infer')):>7} | first call after eval->train "
                     f"{_ms(sw.get('to_train'))} ms, train->eval {_ms(sw.get('to_eval'))} ms")
    lines.append(f"[{rec['model']}] compiled == eager: {_eq_str(rec['equal'])}; rates after timing: "
                 f"{_fmt_rates(rec['rates_end'])}")
    for k, v in rec["errors"].items():
        lines.append(f"[{rec['model']}] ERROR {k}: {v}")
    return "\n".join(lines)


def table(records: List[Dict[str, Any]], markdown: bool, torch_compile: bool) -> str:
    cols = ["model", "neurons (compiled/opaque/all)", "eager train ms", "snncc train ms", "train x",
            "eager infer ms", "snncc infer ms", "infer x", "snncc 1st call after switch ms (->train/->eval)"]
    if torch_compile:
        cols += ["torch.compile train ms (x)", "torch.compile infer ms (x)"]
    cols += ["compiled == eager", "firing rates (train)", "errors"]
    rows = []
    for r in records:
        t, s = r["times_ms"], r["speedup"]
        e, c = t.get("eager", {}), t.get("snncc", {})
        cov = ("?" if r["n_compiled"] is None else str(r["n_compiled"])) + "/" + \
              ("?" if r["n_opaque"] is None else str(r["n_opaque"])) + f"/{r['n_neurons'] or 0}"
        if _kernels_str(r):
            cov += f" ({_kernels_str(r)})"
        row = [r["model"], cov, _ms(e.get("train")), _ms(c.get("train")), _x(s.get("snncc", {}).get("train")),
               _ms(e.get("infer")), _ms(c.get("infer")), _x(s.get("snncc", {}).get("infer"))]
        sw = (r.get("switch_ms") or {}).get("snncc") or {}
        row.append(f"{_ms(sw.get('to_train'))}/{_ms(sw.get('to_eval'))}" if sw else "-")
        if torch_compile:
            tc = t.get("torch.compile", {})
            tsp = s.get("torch.compile", {})
            row += [f"{_ms(tc.get(m))} ({_x(tsp.get(m))})" for m in ("train", "infer")]
        errs = "; ".join(f"{k}: {v}" for k, v in r["errors"].items())
        row += [_eq_str(r["equal"]), _fmt_rates(r["rates"]), (errs[:160] + "...") if len(errs) > 160 else errs or "-"]
        rows.append(row)
    if markdown:
        out = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
        out += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in rows]
        return "\n".join(out)
    widths = [max(len(c), *(len(row[i]) for row in rows)) if rows else len(c) for i, c in enumerate(cols)]
    fmt = lambda row: "  ".join(v.ljust(w) for v, w in zip(row, widths))   # noqa: E731
    return "\n".join([fmt(cols)] + [fmt(row) for row in rows])


def _git() -> str:
    """The checkout's commit, ``+dirty`` with uncommitted changes (what 'today's snncc' was)."""
    import subprocess
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (head or "no git") + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "no git"


def _load() -> str:
    try:
        return " ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return "?"


def run(argv: Optional[List[str]] = None) -> List[Dict[str, Any]]:
    """Parse ``argv``, benchmark the models, print (and write) the results; returns the records."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(BUILDERS), help=f"comma list of: {', '.join(BUILDERS)}")
    ap.add_argument("--batch", type=int, default=None, help="batch size (default 32; 4 with --quick)")
    ap.add_argument("--T", type=int, default=None, help="timesteps (default 8; 4 with --quick)")
    ap.add_argument("--repeat", type=int, default=None,
                    help="interleaved timing rounds per mode (default 5; 1 with --quick)")
    ap.add_argument("--reps", type=int, default=None, help="calls per variant per round (default 2; 1 with --quick)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rate", type=float, default=0.10, help="target firing rate of every neuron layer")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=1e-4, help="Adam's learning rate in the timed training steps")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, one repeat: a smoke test")
    ap.add_argument("--torch-compile", action="store_true", help="also time torch.compile of the eager loop")
    ap.add_argument("--markdown", action="store_true", help="print the summary as a Markdown table")
    ap.add_argument("--json", help="write the records here")
    ap.add_argument("--verbose", action="store_true", help="print tracebacks of failures")
    args = ap.parse_args(argv)
    args.batch = args.batch or (4 if args.quick else 32)
    args.T = args.T or (4 if args.quick else 8)
    args.repeat = args.repeat or (1 if args.quick else 5)
    args.reps = args.reps or (1 if args.quick else 2)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in BUILDERS]
    if unknown:
        ap.error(f"unknown model(s) {unknown}; have {', '.join(BUILDERS)}")
    torch.set_num_threads(args.threads)
    header = (f"bench_zoo | snncc {snncc.__version__} ({_git()}) | torch {torch.__version__} | "
              f"{torch.get_num_threads()} threads | {platform.processor() or platform.machine()} | "
              f"{datetime.date.today()} | T={args.T} batch={args.batch} repeat={args.repeat}x{args.reps}"
              f"{' quick' if args.quick else ''} | "
              f"load avg {_load()} (other processes make every time grow, eager's most)")
    print(header, flush=True)
    records = []
    for n in names:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.jit.script.*")
            records.append(bench_model(n, args, log=lambda s: print(s, flush=True)))
    print()
    print(table(records, args.markdown, args.torch_compile))
    print(f"load avg at the end: {_load()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "args": vars(args), "load_end": _load(), "torch": torch.__version__,
                       "date": str(datetime.date.today()), "records": records}, f, indent=1, default=str)
    return records


def main(argv: Optional[List[str]] = None) -> int:
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
