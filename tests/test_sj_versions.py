"""Both SpikingJelly lines: 2.x in the environment, 0.0.0.0.14 in build/sj014.

tools/setup.sh installs the current SpikingJelly (2.x) into the environment, where every other interop test
uses it, and SpikingJelly 0.0.0.0.14 (the release much published SNN code was written against; its nodes
are different classes in different modules) into the repo-local, git-ignored folder ``build/sj014``. One
interpreter can import only one of them, so ``test_sj014_csnn_compiled_matches_eager`` runs this file again
in a subprocess with ``build/sj014`` first on ``PYTHONPATH`` and ``SNNCC_SJ014_INNER=1``: only then are the
``test_inner_*`` tests below defined, and they compile a CSNN built from 0.0.0.0.14's IF/LIF/ParametricLIF
nodes (single-step mode) with ``snncc.compile(model, T=4)`` and check it against eager in float64.
"""
from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys

import pytest
import torch
from torch import nn

from conftest import HAS_SPIKINGJELLY, assert_same_training

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SJ014_DIR = os.path.join(ROOT, "build", "sj014")
SJ014_VERSION = "0.0.0.0.14"
INNER = os.environ.get("SNNCC_SJ014_INNER") == "1"


def _sj014_installed() -> bool:
    """build/sj014 holds spikingjelly 0.0.0.0.14 (what tools/setup.sh puts there)."""
    if not os.path.isdir(os.path.join(SJ014_DIR, "spikingjelly")):
        return False
    dists = importlib.metadata.distributions(name="spikingjelly", path=[SJ014_DIR])
    return any(d.version == SJ014_VERSION for d in dists)


def _imported_from_sj014() -> bool:
    import spikingjelly
    return os.path.abspath(spikingjelly.__file__).startswith(SJ014_DIR + os.sep)


if not INNER:
    # ----------------------------------------------------------------------- the main environment
    @pytest.mark.skipif(not HAS_SPIKINGJELLY, reason="spikingjelly is not installed")
    def test_main_env_spikingjelly_is_2x():
        """tools/setup.sh gives the environment SpikingJelly 2.x (the interop tests run against it)."""
        if _imported_from_sj014():
            pytest.skip(f"spikingjelly is imported from {SJ014_DIR} (PYTHONPATH), not from the environment")
        version = importlib.metadata.version("spikingjelly")
        assert version.split(".")[0] == "2", f"spikingjelly {version} in the environment, expected 2.x"

    N_INNER = 4     # the test_inner_* tests below

    def test_sj014_csnn_compiled_matches_eager():
        """A SpikingJelly 0.0.0.0.14 CSNN, compiled == eager, in a subprocess that imports 0.0.0.0.14."""
        if not _sj014_installed():
            pytest.skip(f"spikingjelly {SJ014_VERSION} is not installed in {SJ014_DIR} (bash tools/setup.sh "
                        f"puts it there)")
        env = dict(os.environ, SNNCC_SJ014_INNER="1")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (SJ014_DIR, env.get("PYTHONPATH")) if p)
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs", os.path.abspath(__file__)],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
        out = proc.stdout
        assert proc.returncode == 0, f"the 0.0.0.0.14 run failed (exit {proc.returncode}):\n{out[-6000:]}"
        summary = out.strip().splitlines()[-1]
        assert re.search(rf"\b{N_INNER} passed\b", summary) and not re.search(r"skipped|failed|error", summary), \
            f"expected {N_INNER} passed, nothing skipped:\n{out[-6000:]}"

else:
    # ----------------------------------------------------------------------- inside the subprocess
    def test_inner_imports_spikingjelly_0_0_0_0_14():
        import spikingjelly
        assert _imported_from_sj014(), f"spikingjelly imported from {spikingjelly.__file__}, not {SJ014_DIR}"
        assert importlib.metadata.version("spikingjelly") == SJ014_VERSION

    class CSNN014(nn.Module):
        """[conv -> BN -> IFNode -> pool] -> [conv -> BN -> LIFNode -> pool] -> linear -> ParametricLIFNode,
        with SpikingJelly 0.0.0.0.14's layer wrappers and nodes, all in single-step mode ('s')."""

        def __init__(self) -> None:
            super().__init__()
            from spikingjelly.activation_based import layer, neuron, surrogate
            self.conv1 = layer.Conv2d(2, 6, 3, padding=1, bias=False, step_mode="s")
            self.bn1 = layer.BatchNorm2d(6, step_mode="s")
            self.sn1 = neuron.IFNode(surrogate_function=surrogate.ATan(), step_mode="s")
            self.pool1 = layer.MaxPool2d(2, step_mode="s")
            self.conv2 = layer.Conv2d(6, 8, 3, padding=1, bias=False, step_mode="s")
            self.bn2 = layer.BatchNorm2d(8, step_mode="s")
            self.sn2 = neuron.LIFNode(tau=2.0, surrogate_function=surrogate.Sigmoid(), step_mode="s")
            self.pool2 = layer.MaxPool2d(2, step_mode="s")
            self.flat = layer.Flatten(step_mode="s")
            self.fc = layer.Linear(8 * 2 * 2, 5, step_mode="s")
            self.sn3 = neuron.ParametricLIFNode(init_tau=2.0, surrogate_function=surrogate.ATan(),
                                                detach_reset=True, step_mode="s")

        def forward(self, x):
            x = self.pool1(self.sn1(self.bn1(self.conv1(x)) * 1.5))
            x = self.pool2(self.sn2(self.bn2(self.conv2(x)) * 2.0))
            return self.sn3(self.fc(self.flat(x)) * 3.0)

    def _x(n: int = 4) -> torch.Tensor:
        return torch.randn(n, 2, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def test_inner_csnn_train_compiled_matches_eager():
        """Train mode, float64: identical spikes, parameter/input grads and BN running stats close, two calls
        (each from the reset state)."""
        assert_same_training(CSNN014, _x(), T=4, calls=2)

    def test_inner_neurons_bind_to_builtin_kernels():
        """0.0.0.0.14's nodes run TorchScript snncc cannot record; they are still compiled, because they behave
        exactly like the built-in IF / LIF / ParametricLIF specs (probe comparison)."""
        from snncc.recognize import bind
        m = CSNN014()
        for mode in ("train", "eval"):
            getattr(m, mode)()
            hows = [bind(getattr(m, n)).binding.how for n in ("sn1", "sn2", "sn3")]
            assert hows == ["builtin:if", "builtin:lif", "builtin:plif"], (mode, hows)

    def test_inner_csnn_eval_compiled_matches_eager():
        def factory():
            m = CSNN014()
            with torch.no_grad():
                m.bn1.running_var.fill_(0.2)
                m.bn2.running_var.fill_(0.2)
            return m
        assert_same_training(factory, _x(), T=4, train=False)
