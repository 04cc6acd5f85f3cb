"""Shared helpers for snncc's tests: eager references, the compiled-vs-eager training check, skip markers.

The contract under test (DESIGN.md, "The contract"): a compiled model gives the eager model's outputs,
parameter gradients and BatchNorm running statistics -- identical spikes in float64 -- and each compiled
call starts from the reset state.
"""
from __future__ import annotations

import atexit
import copy
import importlib
import importlib.util
import os
import shutil
import sys
import tempfile
import types
from typing import Any, Callable, Dict, List, Optional, Sequence


# --------------------------------------------------------------------------- no trace outside temporary dirs
def _test_caches() -> str:
    """Point every on-disk cache snncc and the tests write at one temporary directory, before snncc is imported.

    ``SNNCC_CACHE`` is snncc's cache root: runtime/cbuild.py reads it once, at import (the C kernels go to
    its ``kernels/``); runtime/calibrate.py reads it at each call (``calibration.json``); tests/cuda_emu reads ``SNNCC_EMU_CACHE``
    at import for the emulator's builds. The first process of a run (pytest, or pytest-xdist's controller)
    makes the directory and removes it at exit; ``SNNCC_TESTS_TMP`` hands it to everything started from it
    (xdist workers, the SpikingJelly 0.0.0.0.14 subprocess, the tools' and examples' subprocesses, DDP
    workers), so a kernel is compiled once per run and the user's ``~/.cache/snncc`` is never touched.
    ``SNNCC_TEST_CACHE=<dir>`` keeps the caches in ``<dir>`` instead, across runs (it is not removed).
    tests/test_no_trace.py checks that every process of the run sees them.
    """
    keep = os.environ.get("SNNCC_TEST_CACHE")
    root = keep or os.environ.get("SNNCC_TESTS_TMP")
    if not root:
        root = tempfile.mkdtemp(prefix="snncc-tests-")
        atexit.register(shutil.rmtree, root, True)
    os.environ["SNNCC_TESTS_TMP"] = root
    os.environ["SNNCC_CACHE"] = root
    os.environ["SNNCC_EMU_CACHE"] = os.path.join(root, "emu")
    os.environ.pop("SNNCC_CALIBRATION", None)      # a user's pinned calibration would change what tests see
    # the other tools' caches the tests would fill: hypothesis's .hypothesis/ (in the working directory),
    # matplotlib's font cache, torch.compile's (tools/bench_zoo.py compiles the eager model)
    os.environ["HYPOTHESIS_STORAGE_DIRECTORY"] = os.path.join(root, "hypothesis")
    os.environ.setdefault("MPLCONFIGDIR", os.path.join(root, "matplotlib"))
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(root, "torchinductor"))
    return root


#: whether this process was handed the run's directory (an xdist worker, a subprocess of the tests)
TEST_CACHE_INHERITED = bool(os.environ.get("SNNCC_TESTS_TMP"))
TEST_CACHE_DIR = _test_caches()

import pytest  # noqa: E402  (after the caches are set: nothing below may read them earlier)
import torch  # noqa: E402
from torch import nn  # noqa: E402

import snncc  # noqa: E402
from snncc.frontend import is_stateful  # noqa: E402

# The repository root, so that ``examples.csnn`` imports from the tests.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

HAS_SPIKINGJELLY = importlib.util.find_spec("spikingjelly") is not None
HAS_SNNTORCH = importlib.util.find_spec("snntorch") is not None

requires_spikingjelly = pytest.mark.skipif(not HAS_SPIKINGJELLY, reason="spikingjelly is not installed")
requires_snntorch = pytest.mark.skipif(not HAS_SNNTORCH, reason="snntorch is not installed")

#: nvcc's compile-check targets (Ampere and Hopper SASS). ``--threads 0`` compiles the two architectures in
#: parallel, one per core: the all-variants checks take half the wall time on the 2-core CI machine.
NVCC_ARCHS = ["--threads", "0", "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90"]


def pytest_configure(config) -> None:
    # SpikingJelly 0.0.0.0.14 decorates functions with torch.jit.script at import (deprecated in torch 2.13)
    config.addinivalue_line("filterwarnings", "ignore:`torch.jit.script` is deprecated:DeprecationWarning")


# --------------------------------------------------------------------------- optional ecosystems
def install_torchvision_stub() -> None:
    """Let SpikingJelly's model zoo import without torchvision.

    ``spikingjelly.activation_based.model.spiking_vgg`` and ``sew_resnet`` do, at import time::

        try: from torchvision.models.utils import load_state_dict_from_url
        except ImportError: from torchvision._internally_replaced_utils import load_state_dict_from_url

    only to download *pretrained* weights, which the tests never use. torchvision is deliberately not a
    test dependency (it pins torch), so when it is absent we register a tiny module under the second name
    whose ``load_state_dict_from_url`` raises. Only that submodule is registered, never a fake
    ``torchvision`` package, so code that checks for torchvision still finds it missing.
    """
    if importlib.util.find_spec("torchvision") is not None:
        return
    name = "torchvision._internally_replaced_utils"
    if name in sys.modules:
        return
    stub = types.ModuleType(name)

    def load_state_dict_from_url(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("torchvision is not installed: snncc's tests never load pretrained weights")

    stub.load_state_dict_from_url = load_state_dict_from_url
    sys.modules[name] = stub


#: Modules that SpikingJelly's model zoo imports at package import but tools/setup.sh installs only as optional
#: extras: SpikingJelly 2.x's ``spikingjelly.activation_based.model`` imports h5py (for its checkpoint tools).
SJ_ZOO_OPTIONAL_MODULES = ("h5py",)


def import_sj_zoo(*names: str) -> tuple:
    """SpikingJelly model-zoo submodules by name (e.g. ``"spiking_vgg"``), importable without torchvision.

    Skips the calling test when spikingjelly is absent, or when the zoo needs one of
    ``SJ_ZOO_OPTIONAL_MODULES`` and it is not installed; any other import error fails as usual.
    """
    pytest.importorskip("spikingjelly")
    install_torchvision_stub()
    try:
        return tuple(importlib.import_module(f"spikingjelly.activation_based.model.{n}") for n in names)
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] in SJ_ZOO_OPTIONAL_MODULES:
            pytest.skip(f"SpikingJelly's model zoo needs {e.name}, which is not installed (tools/setup.sh "
                        f"installs it)")
        raise


@pytest.fixture
def sj_model_zoo():
    """SpikingJelly's model zoo modules ``(spiking_vgg, sew_resnet)``, importable without torchvision."""
    return import_sj_zoo("spiking_vgg", "sew_resnet")


def reset_all(model: nn.Module) -> nn.Module:
    """Reset every stateful module as ``functional.reset_net`` does (SpikingJelly memory modules included);
    the same reset snncc-prof gives its eager variant."""
    from snncc.tools._loader import reset_model
    return reset_model(model)


# --------------------------------------------------------------------------- eager references
def eager_run(model: nn.Module, x: Any, T: Optional[int] = None, sequence: bool = False) -> Any:
    """What the compiled model must return, computed by the eager step loop from the reset state.

    * ``T``: ``torch.stack([model(x) for _ in range(T)])``
    * ``sequence``: ``torch.stack([model(x[t]) for t in range(x.shape[0])])``
    * neither: ``model(x)`` (a model that loops over time itself)
    """
    assert not (T is not None and sequence)
    reset_all(model)
    if T is not None:
        return torch.stack([model(x) for _ in range(T)])
    if sequence:
        return torch.stack([model(x[t]) for t in range(x.shape[0])])
    return model(x)


class SpikeRecorder:
    """Forward hooks on every stateful module of an eager model, recording the spikes they emit.

    Used to make sure a test is not vacuous: some spikes occur, and not every neuron fires every step.
    """

    def __init__(self, model: nn.Module) -> None:
        self.records: Dict[str, List[torch.Tensor]] = {}
        self.handles = []
        for name, m in model.named_modules():
            if m is model or not is_stateful(m):
                continue
            self.handles.append(m.register_forward_hook(self._hook(name)))

    def _hook(self, name: str) -> Callable:
        def hook(_m, _inp, out):
            s = out[0] if isinstance(out, (tuple, list)) else out
            if isinstance(s, torch.Tensor) and s.is_floating_point():
                self.records.setdefault(name, []).append((s.detach() != 0).to(torch.float64))
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def rates(self) -> Dict[str, float]:
        return {k: float(torch.cat([s.flatten() for s in v]).mean()) for k, v in self.records.items()}

    def total(self) -> float:
        flat = [s.flatten() for v in self.records.values() for s in v]
        return float(torch.cat(flat).mean()) if flat else float("nan")


def assert_nonvacuous(rec: SpikeRecorder, every_layer: bool = False) -> None:
    """Some spikes occur and not all: a comparison of spikes then means something."""
    rates = rec.rates()
    assert rates, "no neuron layer emitted spikes (nothing recorded)"
    total = rec.total()
    assert 0.0 < total < 1.0, f"spike rate {total} (per layer {rates}): test would be vacuous"
    if every_layer:
        assert all(r > 0.0 for r in rates.values()), f"a neuron layer never fired: {rates}"
        assert all(r < 1.0 for r in rates.values()), f"a neuron layer fired everywhere: {rates}"


def _is_spikes(t: torch.Tensor) -> bool:
    return t.is_floating_point() and bool(((t == 0) | (t == 1)).all())


def assert_close_tensors(a: torch.Tensor, b: torch.Tensor, what: str, rtol: float, atol: float) -> None:
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    assert a.dtype == b.dtype, f"{what}: dtype {a.dtype} != {b.dtype}"
    if a.dtype == torch.float64 and _is_spikes(b):
        assert torch.equal(a, b), f"{what}: spikes differ at {int((a != b).sum())} of {a.numel()} positions"
        return
    if not a.is_floating_point():
        assert torch.equal(a, b), f"{what}: values differ"
        return
    if not torch.allclose(a, b, rtol=rtol, atol=atol):
        err = (a - b).abs().max().item()
        raise AssertionError(f"{what}: max abs diff {err:.3e} (rtol={rtol}, atol={atol})")


def tolerances(dtype: torch.dtype) -> Dict[str, Dict[str, float]]:
    """(rtol, atol) for outputs and gradients."""
    if dtype == torch.float64:
        return {"out": dict(rtol=1e-9, atol=1e-12), "grad": dict(rtol=1e-7, atol=1e-10)}
    return {"out": dict(rtol=1e-4, atol=1e-5), "grad": dict(rtol=1e-3, atol=1e-5)}


def _flatten(out: Any) -> List[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flatten(o)]
    if isinstance(out, dict):
        return [t for k in sorted(out) for t in _flatten(out[k])]
    raise TypeError(type(out))


def assert_same_training(model_factory: Callable[[], nn.Module], x: Any, *, T: Optional[int] = None,
                         sequence: bool = False, train: bool = True, dtype: torch.dtype = torch.float64,
                         leaf_modules: Sequence[type] = (), seed: int = 0, backward: Optional[bool] = None,
                         every_layer: bool = True, check_spikes: bool = True, input_grad: bool = True,
                         calls: int = 1) -> Dict[str, Any]:
    """Compiled == eager for one model: outputs, parameter grads, input grad, BatchNorm buffers.

    ``model_factory()`` builds the model (seeded with ``seed``); it is cast to ``dtype``, put in train or
    eval mode and deep-copied: one copy runs eagerly, the other is compiled (``verify=True``). The loss is
    ``(out * w).sum()`` with fixed random ``w``. In float64 spike outputs must be identical. ``calls`` > 1
    repeats forward+backward, checking that each compiled call starts from the reset state (the grads then
    accumulate over calls, like eager's). Returns the outputs and the spike recorder for further checks.
    """
    torch.manual_seed(seed)
    model = model_factory().to(dtype)
    model.train(train)
    ref = copy.deepcopy(model)
    cm = snncc.compile(model, T=T, sequence=sequence, leaf_modules=list(leaf_modules), verify=True)
    assert cm.training == train
    tol = tolerances(dtype)
    if backward is None:
        backward = train
    x = x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x
    rec = SpikeRecorder(ref)
    outs = []
    for call in range(calls):
        x_e = x.detach().clone().requires_grad_(input_grad and backward) if isinstance(x, torch.Tensor) else x
        x_c = x.detach().clone().requires_grad_(input_grad and backward) if isinstance(x, torch.Tensor) else x
        torch.manual_seed(1000 + call)
        out_e = eager_run(ref, x_e, T=T, sequence=sequence)
        torch.manual_seed(1000 + call)
        out_c = cm(x_c)
        fe, fc = _flatten(out_e), _flatten(out_c)
        assert len(fe) == len(fc)
        for i, (a, b) in enumerate(zip(fe, fc)):
            assert_close_tensors(a, b, f"call {call} output[{i}]", **tol["out"])
        if backward:
            g = torch.Generator().manual_seed(7 + call)
            ws = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype) for o in fe]
            loss_e = sum((o * w).sum() for o, w in zip(fe, ws))
            loss_c = sum((o * w).sum() for o, w in zip(fc, ws))
            if loss_e.requires_grad:
                loss_e.backward()
                loss_c.backward()
            if isinstance(x_e, torch.Tensor) and x_e.requires_grad:
                ge, gc = x_e.grad, x_c.grad
                assert (ge is None) == (gc is None), f"input grad: eager {ge is not None}, compiled {gc is not None}"
                if ge is not None:
                    assert_close_tensors(ge, gc, f"call {call} input grad", **tol["grad"])
        outs.append((out_e, out_c))
    rec.remove()
    if backward:
        pe, pc = dict(ref.named_parameters()), dict(model.named_parameters())
        assert pe.keys() == pc.keys()
        for name in pe:
            ge, gc = pe[name].grad, pc[name].grad
            assert (ge is None) == (gc is None), \
                f"grad of {name}: eager {'has' if ge is not None else 'has no'} grad, compiled " \
                f"{'has' if gc is not None else 'has no'}"
            if ge is not None:
                assert_close_tensors(ge, gc, f"grad of {name}", **tol["grad"])
    be, bc = dict(ref.named_buffers()), dict(model.named_buffers())
    for name in be:
        if name not in bc or not isinstance(be[name], torch.Tensor):
            continue
        if "running_" in name or "num_batches_tracked" in name:
            assert_close_tensors(be[name], bc[name], f"buffer {name}", **tol["grad"])
    if check_spikes:
        assert_nonvacuous(rec, every_layer=every_layer)
    return {"eager": ref, "compiled": cm, "model": model, "outs": outs, "recorder": rec}


# --------------------------------------------------------------------------- seed 001's surrogates
def seed_surrogate_functions(heaviside: Callable[[torch.Tensor], torch.Tensor]) -> Dict[str, type]:
    """Seed 001's hand-written SuperSpike, Sigmoid' and Esser ``autograd.Function``s, as written there,
    with the given forward step (the seed's float32 one, or a dtype-preserving one for float64 tests)."""

    class SuperSpikeFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, alpha):
            if x.requires_grad:
                ctx.save_for_backward(x)
                ctx.alpha = alpha
            return heaviside(x)

        @staticmethod
        def backward(ctx, grad_output):
            (x,) = ctx.saved_tensors
            denom = ctx.alpha * x.abs() + 1.0
            return grad_output * (1.0 / (denom * denom)), None

    class SigmoidDerivativeFunction(SuperSpikeFunction):
        @staticmethod
        def backward(ctx, grad_output):
            (x,) = ctx.saved_tensors
            s = torch.sigmoid(ctx.alpha * x)
            return grad_output * s * (1.0 - s), None

    class EsserFunction(SuperSpikeFunction):
        @staticmethod
        def backward(ctx, grad_output):
            (x,) = ctx.saved_tensors
            return grad_output * torch.clamp(1.0 - ctx.alpha * x.abs(), min=0.0), None

    return {"superspike": SuperSpikeFunction, "sigmoid_derivative": SigmoidDerivativeFunction,
            "esser": EsserFunction}
