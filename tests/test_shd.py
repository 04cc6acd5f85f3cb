"""snncc.data.shd (SHD's file layout, generated spike audio, binning) and examples/shd.py (a recurrent SNN).

The HDF5 files are written here in the published layout (``spikes/times`` and ``spikes/units`` as
variable-length arrays, ``labels``), tiny, in ``tmp_path``; the real SHD is never needed.
"""
from __future__ import annotations

import copy
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import snncc
from snncc.data import (SHD_CHANNELS, SHD_URL, SpikeAudio, SpikeRecordings, bin_batch, bin_events,
                        generated_shd, load_shd, time_first_collate)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

h5py = pytest.importorskip("h5py")


# --------------------------------------------------------------------------- helpers
def write_shd(path, times, units, labels, keys=None) -> None:
    """An SHD-layout file: vlen float16 times (seconds), vlen uint16 units, uint8 labels, extra/keys."""
    with h5py.File(path, "w") as f:
        t = f.create_dataset("spikes/times", (len(times),), dtype=h5py.vlen_dtype(np.float16))
        u = f.create_dataset("spikes/units", (len(units),), dtype=h5py.vlen_dtype(np.uint16))
        for i, (ti, ui) in enumerate(zip(times, units)):
            t[i] = np.asarray(ti, dtype=np.float16)
            u[i] = np.asarray(ui, dtype=np.uint16)
        f["labels"] = np.asarray(labels, dtype=np.uint8)
        if keys is not None:
            f["extra/keys"] = np.array([k.encode() for k in keys])


def loop_bins(times, units, T, dt, channels=SHD_CHANNELS, count=False) -> torch.Tensor:
    """The binning rule as a plain per-spike loop: bin floor(t / dt), dropped at or past T."""
    out = torch.zeros(T, channels, dtype=torch.float64)
    for t, u in zip(np.asarray(times, dtype=np.float64).tolist(), np.asarray(units).tolist()):
        k = int(np.floor(t / dt))
        if k < T:
            out[k, int(u)] = out[k, int(u)] + 1 if count else 1.0
    return out


# --------------------------------------------------------------------------- loader
def test_load_shd_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    times, units = [], []
    for n in (5, 0, 17, 1):                               # an empty recording too
        times.append(np.sort(rng.uniform(0, 1.3, n)).astype(np.float16))
        units.append(rng.integers(0, 700, n).astype(np.uint16))
    labels = [3, 19, 0, 7]
    keys = [f"digit-{k}" for k in range(20)]
    for split in ("train", "test"):
        write_shd(tmp_path / f"shd_{split}.h5", times, units, labels, keys)
    r = load_shd(tmp_path, "test")
    assert isinstance(r, SpikeRecordings) and len(r) == 4 and r.channels == 700 and r.classes == 20
    assert r.labels.dtype == np.int64 and r.labels.tolist() == labels and r.keys == keys
    for i in range(4):
        t, u, label = r[i]
        assert t.dtype == np.float16 and np.array_equal(t, times[i])
        assert np.array_equal(u, units[i]) and label == labels[i]
    assert r.spike_counts.tolist() == [5, 0, 17, 1]
    # the file itself, a limit, and a subset
    r2 = load_shd(str(tmp_path / "shd_train.h5"), limit=2)
    assert len(r2) == 2 and np.array_equal(r2.times[0], times[0]) and r2.labels.tolist() == [3, 19]
    sub = r.subset([2, 0])
    assert sub.labels.tolist() == [0, 3] and np.array_equal(sub.units[0], units[2])
    # binned like the published files are read: float16 seconds
    x, y = SpikeAudio(r, T=13, duration=1.3).batch([0, 1, 2])
    assert x.shape == (13, 3, 700) and y.tolist() == [3, 19, 0]
    assert torch.equal(x[:, 0].double(), loop_bins(times[0], units[0], 13, 1.3 / 13))
    assert x[:, 1].sum() == 0


def test_load_shd_missing_file_says_where_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        load_shd(tmp_path, "train")
    msg = str(e.value)
    assert "shd_train.h5" in msg and SHD_URL in msg and "does not download" in msg
    (tmp_path / "shd_test.h5.zip").write_bytes(b"PK")
    with pytest.raises(FileNotFoundError, match="still compressed"):
        load_shd(tmp_path, "test")
    with pytest.raises(ValueError, match="split"):
        load_shd(tmp_path, "valid")


def test_load_shd_without_h5py(tmp_path, monkeypatch):
    write_shd(tmp_path / "shd_train.h5", [[0.1]], [[3]], [1])
    monkeypatch.setitem(sys.modules, "h5py", None)           # import h5py raises ImportError
    with pytest.raises(ImportError, match="pip install h5py"):
        load_shd(tmp_path)
    assert len(generated_shd(2, seed=0, spikes_per_sample=10)) == 2   # the generated data needs no h5py


def test_load_shd_wrong_layout(tmp_path):
    with h5py.File(tmp_path / "shd_train.h5", "w") as f:
        f["labels"] = np.zeros(2, dtype=np.uint8)
    with pytest.raises(ValueError, match="spikes/times"):
        load_shd(tmp_path)


# --------------------------------------------------------------------------- binning
@pytest.mark.parametrize("count", [False, True])
def test_bin_events_matches_a_loop(count):
    rng = np.random.default_rng(1)
    T, dt = 25, 0.04
    t = np.concatenate([rng.uniform(0, 1.2, 3000), np.arange(30) * dt, [T * dt, 0.0]])   # edges, late spikes
    u = np.concatenate([rng.integers(0, 700, 3000), rng.integers(0, 700, 30), [5, 699]])
    order = rng.permutation(len(t))                         # unsorted input is fine
    t, u = t[order], u[order]
    want = loop_bins(t, u, T, dt, count=count)
    got = bin_events(t, u, T, dt=dt, count=count, dtype=torch.float64)
    assert got.shape == (T, 700) and torch.equal(got, want)
    assert (got.max() > 1) == count
    # duration= is dt * T
    assert torch.equal(bin_events(t, u, T, duration=T * dt, count=count, dtype=torch.float64),
                       loop_bins(t, u, T, (T * dt) / T, count=count))


def test_bin_batch_is_stacked_bin_events():
    r = generated_shd(5, seed=3, spikes_per_sample=300)
    x = bin_batch(r.times, r.units, 40, duration=1.0)
    assert x.shape == (40, 5, 700) and x.dtype == torch.float32
    for i in range(5):
        assert torch.equal(x[:, i], bin_events(r.times[i], r.units[i], 40, duration=1.0))
    assert torch.equal(bin_batch([np.zeros(0)], [np.zeros(0, dtype=np.int64)], 3, dt=0.1), torch.zeros(3, 1, 700))
    assert bin_events([0.05], [2], 4, dt=0.1, channels=3).tolist() == [[0, 0, 1], [0, 0, 0], [0, 0, 0], [0, 0, 0]]


def test_bin_events_errors():
    with pytest.raises(ValueError, match="exactly one of dt"):
        bin_events([0.1], [1], 10)
    with pytest.raises(ValueError, match="exactly one of dt"):
        bin_events([0.1], [1], 10, dt=0.1, duration=1.0)
    with pytest.raises(ValueError, match=">= 0"):
        bin_events([-0.1], [1], 10, dt=0.1)
    with pytest.raises(ValueError, match="outside 0..699"):
        bin_events([0.1], [700], 10, dt=0.1)
    with pytest.raises(ValueError, match="spike times but"):
        bin_events([0.1, 0.2], [1], 10, dt=0.1)
    with pytest.raises(ValueError, match="T must be"):
        bin_events([0.1], [1], 0, dt=0.1)


# --------------------------------------------------------------------------- generated data
def test_generated_shd_layout_and_determinism():
    a = generated_shd(40, seed=0, spikes_per_sample=500)
    assert len(a) == 40 and a.channels == 700 and a.classes == 20
    assert sorted(np.bincount(a.labels).tolist()) == [2] * 20                  # balanced
    for t, u in zip(a.times, a.units):
        assert t.dtype == np.float32 and u.dtype == np.uint16 and t.shape == u.shape
        assert 0 < len(t) <= 500 and (t >= 0).all() and (t < 1.0).all() and (u < 700).all()
        assert (np.diff(t) >= 0).all()
    b = generated_shd(40, seed=0, spikes_per_sample=500)
    assert np.array_equal(a.labels, b.labels)
    assert all(np.array_equal(x, y) for x, y in zip(a.times, b.times))
    assert all(np.array_equal(x, y) for x, y in zip(a.units, b.units))
    c = generated_shd(40, seed=1, spikes_per_sample=500)
    assert not all(len(x) == len(y) and np.array_equal(x, y) for x, y in zip(a.times, c.times))


def test_generated_shd_classes_are_shared_across_seeds_and_need_time():
    """Train and test seeds share the class patterns; an odd class is its even partner swept the other
    way, so the pair has the same channel histogram and differs only in time."""
    def profile(r, T):
        x, _ = SpikeAudio(r, T=T, duration=1.0, count=True).batch(range(len(r)))
        x = x.permute(1, 0, 2).reshape(len(r), -1)
        return torch.stack([x[torch.from_numpy(r.labels == k)].mean(0) for k in range(r.classes)])

    a, b = profile(generated_shd(200, seed=0), 4), profile(generated_shd(200, seed=1), 4)
    corr = torch.corrcoef(torch.cat([a, b]))[:20, 20:]
    assert (corr.argmax(1) == torch.arange(20)).all()                          # same class, other seed
    h = profile(generated_shd(200, seed=0), 1)                                 # channel histogram only
    h = h / h.norm(dim=1, keepdim=True)
    sim = h @ h.T - 2 * torch.eye(20)                                           # cosine, self excluded
    assert (sim.argmax(1) == torch.arange(20) ^ 1).all()                        # the partner is the nearest


def test_spike_audio_batches():
    r = generated_shd(10, seed=0, spikes_per_sample=200)
    ds = SpikeAudio(r, T=8, duration=1.0)
    x, y = ds[3]
    assert x.shape == (8, 700) and y == int(r.labels[3]) and set(x.unique().tolist()) <= {0.0, 1.0}
    shapes = [tuple(xb.shape) for xb, _ in ds.batches(4)]
    assert shapes == [(8, 4, 700), (8, 4, 700), (8, 2, 700)]
    assert [len(yb) for _, yb in ds.batches(4, drop_last=True)] == [4, 4]
    g = torch.Generator().manual_seed(0)
    seen = torch.cat([yb for _, yb in ds.batches(3, shuffle=True, generator=g)])
    assert sorted(seen.tolist()) == sorted(r.labels.tolist())
    xb, yb = time_first_collate([ds[i] for i in range(4)])                      # a DataLoader's collate
    assert torch.equal(xb, ds.batch(range(4))[0]) and torch.equal(yb, ds.labels[:4])


# --------------------------------------------------------------------------- the example
def test_recurrent_model_compiles_exactly():
    """The example's model, self.s and all, in float64: two batch sizes and train/eval (three
    specializations), outputs and gradients equal to the eager loop's; the eager model runs on after."""
    from examples import shd as example

    torch.manual_seed(0)
    model = example.RecurrentSNN(hidden=16).double()
    eager = copy.deepcopy(model)
    run = example.eager_runner(eager)
    compiled = snncc.compile(copy.deepcopy(model), sequence=True)
    r = generated_shd(6, seed=0, spikes_per_sample=800)
    x = bin_batch(r.times, r.units, 12, duration=1.0, dtype=torch.float64)
    for training, xb in ((True, x), (True, x[:, :4]), (False, x[:, :4])):
        eager.train(training)
        compiled.train(training)
        a, b = run(xb), compiled(xb)
        assert torch.equal(a, b)
        if training:
            a.mean(0).sum().backward()
            b.mean(0).sum().backward()
            for p, q in zip(eager.parameters(), compiled.parameters()):
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12)
            eager.zero_grad()
            compiled.zero_grad()
    assert float(eager.s.detach().mean()) > 0                                        # the hidden layer fired
    assert compiled.model.s is None or isinstance(compiled.model.s, torch.Tensor)   # no fx Proxy left
    assert example.eager_runner(compiled.model)(x).shape == (12, 6, 20)


def test_shd_example_quick_subprocess():
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "shd.py"), "--quick"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "epoch 1/1 | eager loss" in out and "compiled loss" in out
    assert "wall-clock speedup (eager time / compiled time): training" in out
    assert "max |eager - compiled|" in out and "eager == compiled: yes" in out
    print(f"examples/shd.py --quick: {seconds:.1f} s")


def test_shd_example_on_shd_files_float64(tmp_path, capsys):
    """``--data DIR`` reads the SHD files; in float64 the two trainings stay identical (exit 0 needs that);
    ``--chunk`` and ``--memory`` reach snncc.compile."""
    from examples import shd as example

    for split, seed, n in (("train", 0, 32), ("test", 1, 12)):
        r = generated_shd(n, seed=seed, spikes_per_sample=600)
        write_shd(tmp_path / f"shd_{split}.h5", r.times, r.units, r.labels)
    rc = example.main(["--quick", "--data", str(tmp_path), "--batch", "16", "--T", "10", "--hidden", "16",
                       "--float64", "--chunk", "4", "--memory", "min"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert f"SHD ({tmp_path}): 32 train / 12 test recordings" in out and "chunk=4, memory=min, float64" in out
    assert "eager == compiled: yes" in out
