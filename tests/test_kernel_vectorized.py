"""The generated CPU neuron kernels' per-element loops vectorize (regression).

A store whose target depended on a runtime flag inside the generated backward loop (``GX[toff]`` or
``gxb[i]``, chosen by ``xts``) kept gcc from vectorizing the whole backward step of every lifted neuron:
``ir_bwd`` ran 7x ``ir_fwd`` (snnTorch ``Leaky``, 74k neurons x 8 steps: 3.1 ms vs 0.44 ms; 0.6 ms once
vectorized). This checks what gcc itself reports (``-fopt-info-vec``) for every per-element loop of the
generated forward and backward, with the flags snncc compiles with; no timing.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest
import torch

from snncc.runtime import cbuild

CC = os.environ.get("CC", "gcc")
pytestmark = pytest.mark.skipif(shutil.which(CC) is None or "gcc" not in os.path.basename(CC),
                                reason="needs gcc (its -fopt-info-vec report)")

#: the first line of every per-element loop the generator emits inside a time step
_ELEMENT_LOOP = "      for (int64_t i = 0; i < n; ++i) {"


def _vectorized_lines(src: str, tmp_path) -> set:
    c = tmp_path / "k.c"
    c.write_text(src)
    flags = [f for f in cbuild._FLAGS if f != "-shared"]
    r = subprocess.run([CC, *flags, "-c", str(c), "-o", str(tmp_path / "k.o"), "-fopt-info-vec-optimized"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    return {int(m.group(1)) for m in re.finditer(r"k\.c:(\d+):\d+: optimized: loop vectorized", r.stderr)}


def _element_loops(src: str) -> list:
    return [i + 1 for i, line in enumerate(src.splitlines()) if line == _ELEMENT_LOOP]


def _neurons():
    import snncc
    yield "LIF", snncc.LIF(tau=2.0)
    yield "AdaptiveLIF", snncc.neurons.AdaptiveLIF()
    snn = pytest.importorskip("snntorch")
    yield "snnTorch Leaky", snn.Leaky(beta=0.9, init_hidden=True)
    yield "snnTorch Synaptic", snn.Synaptic(alpha=0.8, beta=0.9, init_hidden=True)


@pytest.mark.parametrize("which", ["LIF", "AdaptiveLIF", "snnTorch Leaky", "snnTorch Synaptic"])
def test_generated_ir_loops_vectorize(which, tmp_path):
    from snncc.lift import lift_neuron
    from snncc.neuron_ir import hoist_static
    from snncc.runtime.cpu_ir import ir_source
    m = dict(_neurons())[which]
    L = lift_neuron(m, torch.float32)
    first, steady, _ = hoist_static(L.first, L.steady)      # what the kernel backends compile (dispatch.py)
    src = ir_source(first, steady, tuple(False for _ in steady.params))
    loops = _element_loops(src)
    lines = src.splitlines()
    starts = {name: lines.index(next(l for l in lines if l.startswith(f"void {name}(")))
              for name in ("ir_bwd", "ir_fwd_pool", "ir_bwd_pool")}
    bwd, fwd_pool, bwd_pool = starts["ir_bwd"], starts["ir_fwd_pool"], starts["ir_bwd_pool"]
    # the recompute and backward loops, first and steady; the pooled scans' forward, recompute and backward
    assert len([n for n in loops if bwd < n < fwd_pool]) == 4
    assert len([n for n in loops if fwd_pool < n < bwd_pool]) == 2
    assert len([n for n in loops if n > bwd_pool]) == 4
    vectorized = _vectorized_lines(src, tmp_path)          # one compile (it ran once per loop: 10x the time)
    missed = [n for n in loops if n not in vectorized]
    assert not missed, f"{which}: per-element loops at lines {missed} of the generated source do not vectorize"
