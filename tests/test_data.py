"""snncc.data: events -> frames (SpikingJelly's conventions), event datasets, synthetic gestures."""
from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch

from snncc.data import (EVENT_DTYPE, EventFrames, NpzEventDataset, events_to_frames, frame_slices,
                        save_npz_events, synthetic_gestures, time_first_collate, tonic_dataset)


# --------------------------------------------------------------------------- a naive reference
def naive_frames(events, W, H, n_frames=None, duration=None, split_by="number"):
    """SpikingJelly's slicing written as plain per-event Python loops (its documented formulas)."""
    ev = sorted(zip(events["t"].tolist(), range(len(events["t"]))))      # stable sort by t
    order = [i for _, i in ev]
    x = [int(events["x"][i]) for i in order]
    y = [int(events["y"][i]) for i in order]
    t = [events["t"][i] for i in order]
    p = [events["p"][i] for i in order]
    N = len(t)
    if duration is not None:
        bounds, left = [], 0
        while left < N:
            right = left
            while right < N and not t[right] - t[left] > duration:
                right += 1
            bounds.append((left, right))
            left = right
    elif split_by == "number":
        di = N // n_frames
        bounds = [(j * di, (j + 1) * di if j < n_frames - 1 else N) for j in range(n_frames)]
    else:
        dt = (t[-1] - t[0]) // n_frames
        bounds = []
        for j in range(n_frames):
            lo = t[0] + dt * j
            hi = lo + dt
            idx = [k for k in range(N) if lo <= t[k] and (t[k] < hi or j == n_frames - 1)]
            bounds.append((idx[0], idx[-1] + 1) if idx else (0, 0))
    frames = np.zeros((len(bounds), 2, H, W), dtype=np.float32)
    for f, (lo, hi) in enumerate(bounds):
        for k in range(lo, hi):
            frames[f, 1 if p[k] > 0 else 0, y[k], x[k]] += 1
    return frames


def _random_events(n, W, H, seed, t_max=1000, unsorted=False, signed=False):
    rng = np.random.default_rng(seed)
    t = np.sort(rng.integers(0, t_max, n))
    if unsorted:
        t = rng.permutation(t)
    p = rng.integers(0, 2, n)
    if signed:
        p = 2 * p - 1
    return {"x": rng.integers(0, W, n), "y": rng.integers(0, H, n), "t": t, "p": p}


# --------------------------------------------------------------------------- hand-computed examples
# Sensor W=3, H=2. Six events (x, y, t, p):
EV = {"x": np.array([0, 2, 2, 1, 0, 2]), "y": np.array([0, 1, 1, 0, 1, 0]),
      "t": np.array([0, 1, 2, 5, 9, 10]), "p": np.array([1, 0, 0, 1, 1, 0])}


def test_hand_example_by_number():
    # N=6, M=4: N // M = 1 event per frame, the last frame takes the remaining three.
    f = events_to_frames(EV, (3, 2), n_frames=4, split_by="number")
    expect = np.zeros((4, 2, 2, 3), np.float32)
    expect[0, 1, 0, 0] = 1          # event 0: x=0 y=0 ON
    expect[1, 0, 1, 2] = 1          # event 1: x=2 y=1 OFF
    expect[2, 0, 1, 2] = 1          # event 2: x=2 y=1 OFF
    expect[3, 1, 0, 1] = 1          # events 3..5
    expect[3, 1, 1, 0] = 1
    expect[3, 0, 0, 2] = 1
    assert f.dtype == np.float32 and f.shape == (4, 2, 2, 3)
    np.testing.assert_array_equal(f, expect)


def test_hand_example_by_time():
    # span 10, M=2: dt = 5; frame 0 = t in [0, 5) = events 0,1,2; frame 1 = t >= 5 = events 3,4,5.
    f = events_to_frames(EV, (3, 2), n_frames=2, split_by="time")
    expect = np.zeros((2, 2, 2, 3), np.float32)
    expect[0, 1, 0, 0] = 1
    expect[0, 0, 1, 2] = 2          # two events at the same pixel are counted
    expect[1, 1, 0, 1] = 1
    expect[1, 1, 1, 0] = 1
    expect[1, 0, 0, 2] = 1
    np.testing.assert_array_equal(f, expect)
    # span 10, M=3: dt = 3; windows [0,3) [3,6) [6,...]: events {0,1,2}, {3}, {4,5}
    s, e = frame_slices(EV["t"], n_frames=3, split_by="time")
    assert s.tolist() == [0, 3, 4] and e.tolist() == [3, 4, 6]


def test_hand_example_by_duration():
    # D=2, anchored at events: [t=0, 2] -> events 0,1,2; next starts at t=5: [5, 7] -> event 3;
    # next at t=9: [9, 11] -> events 4,5. No empty frame for the gap 2..5.
    s, e = frame_slices(EV["t"], duration=2)
    assert s.tolist() == [0, 3, 4] and e.tolist() == [3, 4, 6]
    f = events_to_frames(EV, (3, 2), duration=2)
    assert f.shape == (3, 2, 2, 3)
    assert f.sum(axis=(1, 2, 3)).tolist() == [3, 1, 2]
    # duration is inclusive: D=1 puts t=9 and t=10 in one frame
    assert frame_slices(EV["t"], duration=1)[0].tolist() == [0, 2, 3, 4]


def test_fewer_events_than_frames_by_number():
    # SpikingJelly's rule: N // M = 0, so every frame is empty but the last, which takes all events.
    f = events_to_frames({k: v[:3] for k, v in EV.items()}, (3, 2), n_frames=5)
    assert f.shape == (5, 2, 2, 3)
    assert f.sum(axis=(1, 2, 3)).tolist() == [0, 0, 0, 0, 3]


# --------------------------------------------------------------------------- against the naive loop
@pytest.mark.parametrize("kwargs", [dict(n_frames=1), dict(n_frames=4), dict(n_frames=7),
                                    dict(n_frames=3, split_by="time"), dict(n_frames=8, split_by="time"),
                                    dict(duration=37), dict(duration=150), dict(duration=5000)])
@pytest.mark.parametrize("variant", ["sorted", "unsorted", "signed"])
def test_matches_naive_loop(kwargs, variant):
    W, H = 7, 5
    ev = _random_events(300, W, H, seed=len(str(kwargs)) + len(variant), unsorted=variant == "unsorted",
                        signed=variant == "signed")
    got = events_to_frames(ev, (W, H), **kwargs)
    ref = naive_frames(ev, W, H, **kwargs)
    assert got.shape == ref.shape
    np.testing.assert_array_equal(got, ref)
    assert got.sum() == 300       # every event is counted exactly once


def test_structured_array_and_npz_inputs(tmp_path):
    ev, _ = synthetic_gestures(2, 2, (12, 10), events_per_sample=400, seed=3)
    as_dict = {k: ev[0][k] for k in "xytp"}
    a = events_to_frames(ev[0], (12, 10), n_frames=5)
    np.testing.assert_array_equal(a, events_to_frames(as_dict, (12, 10, 2), n_frames=5))
    np.savez(tmp_path / "e.npz", **as_dict)
    with np.load(tmp_path / "e.npz") as z:
        np.testing.assert_array_equal(a, events_to_frames(z, (12, 10), n_frames=5))
    assert events_to_frames(ev[0], (12, 10), n_frames=5, dtype=np.int32).dtype == np.int32


@pytest.mark.parametrize("call, match", [
    (lambda: events_to_frames(EV, (3, 2)), "exactly one of n_frames"),
    (lambda: events_to_frames(EV, (3, 2), n_frames=2, duration=3), "exactly one of n_frames"),
    (lambda: events_to_frames(EV, (3, 2), n_frames=0), "n_frames must be"),
    (lambda: events_to_frames(EV, (3, 2), duration=0), "duration must be"),
    (lambda: events_to_frames(EV, (3, 2), n_frames=2, split_by="count"), "split_by must be"),
    (lambda: events_to_frames(EV, (2, 3), n_frames=2), "outside the sensor"),
    (lambda: events_to_frames(EV, (3,), n_frames=2), "sensor_size"),
    (lambda: events_to_frames(EV, (3, 2), n_frames=11, split_by="time"), "less than one unit per frame"),
    (lambda: events_to_frames({"x": EV["x"], "y": EV["y"], "t": EV["t"]}, (3, 2), n_frames=2), "missing key"),
    (lambda: events_to_frames([1, 2], (3, 2), n_frames=2), "events must be"),
])
def test_errors(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


# --------------------------------------------------------------------------- synthetic gestures
def test_synthetic_gestures_deterministic_and_valid():
    ev1, y1 = synthetic_gestures(12, 4, (20, 16), events_per_sample=300, seed=5)
    ev2, y2 = synthetic_gestures(12, 4, (20, 16), events_per_sample=300, seed=5)
    ev3, _ = synthetic_gestures(12, 4, (20, 16), events_per_sample=300, seed=6)
    assert len(ev1) == 12 and y1.dtype == np.int64
    assert np.bincount(y1, minlength=4).tolist() == [3, 3, 3, 3]
    assert np.array_equal(y1, y2) and all(np.array_equal(a, b) for a, b in zip(ev1, ev2))
    assert not all(np.array_equal(a, b) for a, b in zip(ev1, ev3))
    for e in ev1:
        assert e.dtype == EVENT_DTYPE and e.shape == (300,)
        assert e["x"].min() >= 0 and e["x"].max() < 20 and e["y"].min() >= 0 and e["y"].max() < 16
        assert np.all(np.diff(e["t"]) >= 0) and set(np.unique(e["p"])) <= {0, 1}


def test_synthetic_gestures_move_in_the_class_direction():
    classes = 6
    ev, y = synthetic_gestures(60, classes, (32, 32), events_per_sample=1000, noise=0.0, seed=0)
    cos = []
    for e, label in zip(ev, y):
        f = events_to_frames(e, (32, 32), n_frames=4).sum(axis=1)       # [T, H, W]
        yy, xx = np.mgrid[0:32, 0:32]
        c = [np.array([(xx * fr).sum(), (yy * fr).sum()]) / fr.sum() for fr in (f[0], f[-1])]
        d = c[1] - c[0]
        a = 2 * np.pi * label / classes
        cos.append(d @ np.array([np.cos(a), np.sin(a)]) / np.linalg.norm(d))
    assert np.mean(cos) > 0.9 and np.min(cos) > 0.5


def test_synthetic_gestures_errors():
    with pytest.raises(ValueError, match="n must be"):
        synthetic_gestures(0)
    with pytest.raises(ValueError, match="noise"):
        synthetic_gestures(2, noise=1.5)


# --------------------------------------------------------------------------- datasets
def test_npz_dataset_roundtrip_and_collate(tmp_path):
    ev, y = synthetic_gestures(9, 3, (12, 10), events_per_sample=200, seed=1)
    paths = save_npz_events(str(tmp_path), ev, y, sensor_size=(12, 10))
    assert len(paths) == 9 and all(p.endswith(".npz") for p in paths)
    ds = NpzEventDataset(str(tmp_path), n_frames=4)           # sensor_size read from the files
    assert ds.classes == ["class_00", "class_01", "class_02"] and len(ds) == 9
    by_path = dict(zip(paths, range(9)))
    for i, (path, label) in enumerate(ds.samples):
        frames, lab = ds[i]
        k = by_path[path]
        assert lab == y[k] and frames.dtype == torch.float32 and frames.shape == (4, 2, 10, 12)
        np.testing.assert_array_equal(frames.numpy(), events_to_frames(ev[k], (12, 10), n_frames=4))
    # duration slicing gives recordings of different lengths: the collate pads them
    dsd = NpzEventDataset(str(tmp_path), duration=15_000, sensor_size=(12, 10))
    lengths = [dsd[i][0].shape[0] for i in range(len(dsd))]
    loader = torch.utils.data.DataLoader(dsd, batch_size=9, collate_fn=time_first_collate)
    x, labels = next(iter(loader))
    assert x.shape == (max(lengths), 9, 2, 10, 12) and labels.dtype == torch.int64
    for i, n in enumerate(lengths):
        assert torch.equal(x[:n, i], dsd[i][0]) and not x[n:, i].any()


def test_npz_dataset_frames_files_and_errors(tmp_path):
    (tmp_path / "a").mkdir()
    np.savez(tmp_path / "a" / "0.npz", frames=np.ones((3, 2, 4, 5)))
    ds = NpzEventDataset(str(tmp_path), n_frames=3)
    x, label = ds[0]
    assert x.shape == (3, 2, 4, 5) and label == 0 and ds.sensor_size == (5, 4)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        NpzEventDataset(str(tmp_path / "missing"), n_frames=2)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no <class>"):
        NpzEventDataset(str(tmp_path / "empty"), n_frames=2)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "c").mkdir()
    np.savez(tmp_path / "b" / "c" / "0.npz", x=np.zeros(3), y=np.zeros(3), t=np.arange(3), p=np.zeros(3))
    with pytest.raises(ValueError, match="sensor_size"):
        NpzEventDataset(str(tmp_path / "b"), n_frames=2)


def test_tonic_dataset_needs_tonic(monkeypatch):
    monkeypatch.setitem(sys.modules, "tonic", None)         # makes `import tonic` raise ImportError
    with pytest.raises(ImportError, match="pip install tonic"):
        tonic_dataset("DVSGesture", n_frames=8, save_to="/nonexistent")


def test_tonic_dataset_adapter_with_a_stand_in(monkeypatch):
    ev, y = synthetic_gestures(4, 2, (12, 10), events_per_sample=100, seed=2)

    class FakeGesture:          # what a Tonic dataset looks like: sensor_size (W, H, P), (events, target)
        sensor_size = (12, 10, 2)

        def __init__(self, save_to: str, train: bool = True) -> None:
            self.save_to, self.train = save_to, train

        def __len__(self) -> int:
            return len(ev)

        def __getitem__(self, i):
            return ev[i], int(y[i])

    fake = types.ModuleType("tonic")
    fake.datasets = types.SimpleNamespace(FakeGesture=FakeGesture)
    monkeypatch.setitem(sys.modules, "tonic", fake)
    ds = tonic_dataset("FakeGesture", n_frames=3, save_to="/data", train=False)
    assert isinstance(ds, EventFrames) and len(ds) == 4 and ds.source.train is False
    x, label = ds[1]
    assert label == y[1] and x.shape == (3, 2, 10, 12)
    np.testing.assert_array_equal(x.numpy(), events_to_frames(ev[1], (12, 10), n_frames=3))
    ds2 = tonic_dataset(FakeGesture("/data"), duration=20_000)          # an instance works too
    assert ds2[0][0].shape[1:] == (2, 10, 12)
    with pytest.raises(ValueError, match="no dataset"):
        tonic_dataset("Nope", n_frames=3)
    with pytest.raises(TypeError, match="only used with a dataset name"):
        tonic_dataset(FakeGesture("/data"), n_frames=3, train=True)
