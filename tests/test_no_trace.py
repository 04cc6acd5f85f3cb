"""Tests leave no trace outside temporary directories (issue 13).

tests/conftest.py points snncc's on-disk caches (C kernels: ``SNNCC_CACHE``, read by runtime/cbuild.py at
import; calibration: runtime/calibrate.py, under the same variable at each call; the CUDA emulator's builds:
``SNNCC_EMU_CACHE``) at one temporary directory per run, before snncc is imported, and hands it to every
process the run starts. These tests check that this process and a subprocess started as the tools' and the
SpikingJelly 0.0.0.0.14 tests start theirs (inheriting the environment) see it, and that compiling and
running a model in a process whose HOME is empty writes nothing under HOME.
"""
from __future__ import annotations

import os
import subprocess
import sys

import torch
from torch import nn

import snncc
from conftest import TEST_CACHE_DIR, TEST_CACHE_INHERITED
from snncc.runtime import calibrate, cbuild

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _inside(path: str) -> bool:
    return os.path.abspath(path).startswith(os.path.abspath(TEST_CACHE_DIR) + os.sep)


def test_caches_are_temporary_in_this_process():
    from cuda_emu import CACHE_DIR as EMU_CACHE
    home = os.path.join(os.path.expanduser("~"), ".cache", "snncc")
    for what, path in (("kernels", cbuild.CACHE_DIR), ("calibration", calibrate.cache_path()),
                       ("emulator", str(EMU_CACHE))):
        assert _inside(path), f"{what} cache at {path}, not under the run's {TEST_CACHE_DIR}"
        assert not os.path.abspath(path).startswith(home), f"{what} cache in the user's {home}"


def test_xdist_workers_share_the_run_s_cache():
    """Under pytest-xdist the controller makes the directory and every worker uses it (a kernel is
    compiled once per run, not once per worker)."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    assert TEST_CACHE_INHERITED, "this xdist worker made a cache directory of its own"


def test_compiled_kernels_land_in_the_temporary_cache():
    model = nn.Sequential(nn.Linear(4, 4), snncc.LIF(tau=3.0, v_threshold=0.7))
    snncc.compile(model, T=3)(torch.randn(2, 4))
    if cbuild.compiler_available():
        assert any(f.startswith("scan_") for f in os.listdir(cbuild.CACHE_DIR)), cbuild.CACHE_DIR


def test_subprocesses_inherit_the_caches_and_write_nothing_under_home(tmp_path):
    """A subprocess (as test_sj_versions.py's and the tools' tests start them) compiles and trains a model
    with HOME pointing at an empty directory: the caches are the run's, and HOME stays empty."""
    home = tmp_path / "home"
    home.mkdir()
    code = ("import os, torch, snncc\n"
            "from snncc.runtime import cbuild, calibrate\n"
            "m = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), snncc.LIF(), torch.nn.Flatten(),"
            " torch.nn.Linear(2 * 6 * 6, 3), snncc.LIF())\n"
            "snncc.compile(m, T=2)(torch.rand(2, 1, 8, 8)).sum().backward()\n"
            "print(cbuild.CACHE_DIR); print(calibrate.cache_path())\n")
    env = dict(os.environ, HOME=str(home))
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    kernels, cal = r.stdout.split()[-2:]
    assert _inside(kernels) and _inside(cal), r.stdout
    left = [os.path.relpath(os.path.join(d, f), home) for d, _, fs in os.walk(home) for f in fs]
    assert not left, f"the subprocess wrote under HOME: {left}"
