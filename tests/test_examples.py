"""The workloads in examples/ run, compiled, out of the box with built-in data (``--quick``).

Each example's ``main(argv)`` is called in-process (faster than a subprocess); one subprocess test runs a
script entry for real: ``torchrun --nproc_per_node=2 examples/ddp_train.py --quick``.
"""
from __future__ import annotations

import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import HAS_SPIKINGJELLY

from examples import dvs, surrogate_study, tet
from examples.common import is_png, load_cifar10

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def check_side(r: dict, epochs: int) -> None:
    """One contender's per-epoch results: accuracies in [0, 1], positive timings."""
    assert len(r["accuracy"]) == epochs and len(r["train_s"]) == epochs and len(r["eval_s"]) == epochs
    assert all(isinstance(a, float) and 0.0 <= a <= 1.0 for a in r["accuracy"])
    assert all(s > 0 for s in r["train_s"]) and all(s > 0 for s in r["eval_s"]) and r["warmup_s"] >= 0
    assert all(np.isfinite(r["loss"]))


def check_eager_and_compiled(results: dict, epochs: int) -> None:
    assert set(results) == {"eager", "compiled"}
    for side in results.values():
        check_side(side, epochs)
    # The two copies start from the same weights and see the same batches, so their first epoch's mean
    # losses are close. Not equal: in float32, rounding differences flip a spike at its threshold sooner or
    # later (in deep nets within a few steps) and the trainings part; exactness is tested in float64.
    a, b = results["eager"]["loss"][0], results["compiled"]["loss"][0]
    assert abs(a - b) <= 0.05 * max(a, b), (a, b)


def check_plot(path) -> None:
    assert path is not None and os.path.isfile(path) and is_png(path)


def test_surrogate_study_quick(tmp_path, capsys):
    res = surrogate_study.main(["--quick", "--out", str(tmp_path)])
    assert list(res["results"]) == ["SuperSpike", "Sigmoid", "Esser"]
    assert res["backend"] == ("spikingjelly" if HAS_SPIKINGJELLY else "snncc") and res["data"] == "digits"
    for sides in res["results"].values():
        check_eager_and_compiled(sides, epochs=3)
    assert res["plot"] == str(tmp_path / "surrogate_study.png")
    check_plot(res["plot"])
    out = capsys.readouterr().out
    assert "epoch 3/3" in out and "eager loss" in out and "compiled loss" in out and "summary" in out


def test_seed_surrogates_are_the_notebooks():
    x = torch.linspace(-2, 2, 41, dtype=torch.float64, requires_grad=True)
    expect = {
        "SuperSpike": lambda v: 1 / (10 * v.abs() + 1) ** 2,
        "Sigmoid": lambda v: torch.sigmoid(4 * v) * (1 - torch.sigmoid(4 * v)),
        "Esser": lambda v: torch.clamp(1 - v.abs(), min=0),
    }
    for name, make in surrogate_study.SURROGATES.items():
        sg = make()
        s = sg(x)
        assert torch.equal(s, (x >= 0).to(x.dtype))
        (g,) = torch.autograd.grad(s.sum(), x)
        torch.testing.assert_close(g, expect[name](x.detach()))
        sg.spiking = False
        assert not sg(x).requires_grad


def _fake_cifar(root, n_train: int = 24, n_test: int = 16) -> None:
    """CIFAR-10's python pickles, tiny: data_batch_1 and test_batch with bytes keys."""
    rng = np.random.default_rng(0)
    for name, n in (("data_batch_1", n_train), ("test_batch", n_test)):
        d = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": list(rng.integers(0, 10, n))}
        with open(os.path.join(root, name), "wb") as f:
            pickle.dump(d, f)


def test_cifar10_pickles_and_snncc_neuron_fallback(tmp_path, capsys):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    _fake_cifar(str(root))
    data = load_cifar10(str(tmp_path))                 # the parent directory works too
    assert data.x_train.shape == (24, 3, 32, 32) and data.x_test.shape == (16, 3, 32, 32)
    assert data.y_train.dtype == torch.int64 and data.flip
    with open(root / "data_batch_1", "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    pixel = raw[b"data"][0, 0] / 255.0                 # channel-major: R plane first
    torch.testing.assert_close(data.x_train[0, 0, 0, 0], torch.tensor((pixel - 0.4914) / 0.2023, dtype=torch.float32))
    res = surrogate_study.main(["--data", "cifar10", "--cifar-root", str(root), "--quick", "--epochs", "1",
                                "--surrogates", "Esser", "--batch", "8", "--neurons", "snncc",
                                "--plot", str(tmp_path / "p.png")])
    assert res["backend"] == "snncc" and res["data"] == "cifar10"
    check_eager_and_compiled(res["results"]["Esser"], epochs=1)
    check_plot(res["plot"])
    with pytest.raises(FileNotFoundError, match="data_batch_1"):
        load_cifar10(str(tmp_path / "nowhere"))
    with pytest.raises(SystemExit):
        surrogate_study.main(["--data", "cifar10"])    # needs --cifar-root
    assert "--cifar-root" in capsys.readouterr().err


def test_tet_vggsnn_quick(tmp_path):
    # NOTE: fewer recordings than --quick's own: the test checks eager == compiled, not accuracy (CI time)
    res = tet.main(["--quick", "--model", "vggsnn", "--out", str(tmp_path), "--train-size", "96", "--test-size", "48"])
    assert res["form"] == "T=2" and res["data"] == "digits"
    check_eager_and_compiled(res["results"], epochs=2)
    check_plot(res["plot"])


def test_tet_resnet19_on_event_frames_quick(tmp_path):
    res = tet.main(["--quick", "--model", "resnet19", "--data", "gestures", "--out", str(tmp_path),
                    "--train-size", "64", "--test-size", "32"])
    assert res["form"] == "sequence" and res["data"] == "synthetic gestures"
    check_eager_and_compiled(res["results"], epochs=2)
    check_plot(res["plot"])


@pytest.mark.parametrize("name", ["vggsnn", "resnet19"])
def test_tet_models_compile_exactly(name):
    """compiled == eager for the TET models in float64 (outputs, gradients, BatchNorm statistics)."""
    from conftest import assert_same_training

    if name == "vggsnn":
        assert_same_training(lambda: tet.VGGSNN(1, 10, 16, 1 / 16), torch.randn(4, 1, 16, 16) * 2, T=2,
                             every_layer=False)
    else:
        assert_same_training(lambda: tet.ResNet19(2, 4, 1 / 16), torch.rand(2, 4, 2, 8, 8) * 2, sequence=True,
                             every_layer=False)


def test_tet_models_full_width_shapes():
    for model, x in ((tet.VGGSNN(2, 10, 48), torch.rand(2, 2, 48, 48)), (tet.ResNet19(3, 10), torch.rand(2, 3, 32, 32))):
        with torch.no_grad():
            assert model(x).shape == (2, 10)
    assert sum(p.numel() for p in tet.ResNet19(3, 10).parameters()) > 12_000_000     # TET's ResNet19 size
    with pytest.raises(ValueError, match="multiple of 16"):
        tet.VGGSNN(2, 10, 40)


def test_dvs_quick(tmp_path, capsys):
    res = dvs.main(["--quick", "--out", str(tmp_path)])
    assert res["frames"] == 4 and res["data"] == "synthetic gestures"
    check_eager_and_compiled(res["results"], epochs=2)
    check_plot(res["plot"])
    assert "sequence=True" in capsys.readouterr().out


def test_dvs_from_npz_directory_by_duration(tmp_path):
    from snncc.data import save_npz_events, synthetic_gestures

    ev, y = synthetic_gestures(24, 2, (12, 12), events_per_sample=300, seed=4)
    save_npz_events(str(tmp_path / "rec"), ev, y, classes=["left", "right"], sensor_size=(12, 12))
    res = dvs.main(["--data-dir", str(tmp_path / "rec"), "--duration", "30000", "--epochs", "1", "--batch", "6",
                    "--width", "4", "--no-eager", "--loss", "tet", "--plot", str(tmp_path / "d.png")])
    assert set(res["results"]) == {"compiled"}
    check_side(res["results"]["compiled"], epochs=1)
    assert res["frames"] >= 4          # 100 ms recordings in 30 ms windows
    check_plot(res["plot"])


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_ddp_train_script_under_torchrun():
    """The script entry for real: torchrun with 2 CPU processes (gloo)."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "examples/ddp_train.py", "--quick"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "world size 2 (gloo, cpu)" in proc.stdout
    assert "epoch 2/2" in proc.stdout
    assert "parameters identical on all 2 processes: yes" in proc.stdout
