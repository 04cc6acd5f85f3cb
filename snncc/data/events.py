"""Event-camera data: event streams ``(x, y, t, p)`` to frames, datasets, and synthetic gestures.

An event camera (DVS) emits one event per brightness change: pixel column ``x``, row ``y``, timestamp
``t`` (integer, usually microseconds) and polarity ``p`` (ON = brighter, OFF = darker). SNNs usually
consume them as a short sequence of frames: :func:`events_to_frames` counts the events of each time slice
per pixel and polarity, giving ``[T, 2, H, W]`` for ``snncc.compile(model, sequence=True)`` (after
batching to ``[T, N, 2, H, W]``, see :func:`time_first_collate`).

Conventions (SpikingJelly's, ``spikingjelly.datasets.integrate_events_by_fixed_frames_number`` and
``integrate_events_by_fixed_duration``; the frames are identical to SpikingJelly's for ``p`` in {0, 1}):

* Events are taken in time order (sorted stably by ``t`` first if they are not).
* ``n_frames=M, split_by="number"``: split by event *index* into M slices of ``N // M`` events each, the
  last slice also taking the remainder (``N`` events in all): slice ``j`` is ``[j * (N // M), (j + 1) *
  (N // M))``, the last ``[(M - 1) * (N // M), N)``. Equal event counts, unequal durations.
* ``n_frames=M, split_by="time"``: split by time into M windows of ``dt = (t_last - t_first) // M`` (floor
  division, in ``t``'s unit): window ``j`` is ``t_first + [j * dt, (j + 1) * dt)``; the last window also
  takes every later event (up to ``t_last`` included). Needs ``dt > 0``. A window without events is an
  all-zero frame (where SpikingJelly raises an IndexError).
* ``duration=D``: windows of length ``D`` anchored at events, as SpikingJelly does: a frame starts at the
  first event not yet used, at time ``t_l``, and takes every event with ``t <= t_l + D`` (inclusive); the
  next frame starts at the next event. The number of frames depends on the recording, and silent gaps
  longer than ``D`` produce no empty frames. (Tonic's ``ToFrame(time_window=D)`` instead uses a regular
  grid ``[t_first + k D, t_first + (k + 1) D)``; the two agree when no window is empty and event times fall
  on the grid.)
* Two polarity channels: channel 1 counts ``p > 0`` (ON), channel 0 the others (``p == 0`` or ``-1``,
  OFF). For ``p`` in {0, 1} or bool this is SpikingJelly's and Tonic's layout; for ``p`` in {-1, +1}
  SpikingJelly would put both polarities in channel 1, snncc puts -1 in channel 0.
* ``sensor_size`` is Tonic's ``(W, H)`` or ``(W, H, 2)`` (width first, like ``x``); frames are
  ``[T, 2, H, W]`` indexed ``[t, p, y, x]``, counts as float32.

Events are given as a dict-like with arrays ``x, y, t, p`` (SpikingJelly's ``events_np`` npz files, an
``np.load`` result) or a numpy structured array with those fields (Tonic's format).

Everything is vectorized with numpy (``searchsorted``, ``bincount``); there is no per-event Python loop.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = [
    "EVENT_DTYPE", "events_to_frames", "frame_slices", "EventFrames", "NpzEventDataset", "save_npz_events",
    "tonic_dataset", "synthetic_gestures", "time_first_collate",
]

#: The structured dtype :func:`synthetic_gestures` returns (Tonic-like field names).
EVENT_DTYPE = np.dtype([("x", np.int16), ("y", np.int16), ("t", np.int64), ("p", np.int8)])

Events = Union[Mapping[str, np.ndarray], np.ndarray]


def _fields(events: Events) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(x, y, t, p)`` as 1-D arrays from a dict-like or a structured array."""
    if isinstance(events, np.ndarray) and events.dtype.names is not None:
        names = events.dtype.names
        missing = [k for k in "xytp" if k not in names]
        if missing:
            raise ValueError(f"events: the structured array lacks field(s) {missing}; it has {names}")
        arrays = [events[k] for k in "xytp"]
    elif hasattr(events, "__getitem__") and hasattr(events, "keys"):
        keys = list(events.keys())
        missing = [k for k in "xytp" if k not in keys]
        if missing:
            raise ValueError(f"events: missing key(s) {missing}; expected arrays 'x', 'y', 't', 'p', got {keys}")
        arrays = [np.asarray(events[k]) for k in "xytp"]
    else:
        raise TypeError("events must be a dict (or npz file) with arrays 'x', 'y', 't', 'p', or a numpy "
                        f"structured array with those fields; got {type(events).__name__}")
    arrays = [np.ravel(a) for a in arrays]
    n = arrays[2].size
    for k, a in zip("xytp", arrays):
        if a.size != n:
            raise ValueError(f"events: '{k}' has {a.size} entries but 't' has {n}")
    return arrays[0], arrays[1], arrays[2], arrays[3]


def _sensor_hw(sensor_size: Sequence[int]) -> Tuple[int, int]:
    """``(H, W)`` from Tonic's ``(W, H)`` or ``(W, H, P)``."""
    try:
        size = tuple(int(s) for s in sensor_size)
    except TypeError:
        raise TypeError(f"sensor_size must be (W, H) or (W, H, 2), got {sensor_size!r}") from None
    if len(size) not in (2, 3) or size[0] < 1 or size[1] < 1:
        raise ValueError(f"sensor_size must be (W, H) or (W, H, 2) with positive sizes, got {sensor_size!r}")
    if len(size) == 3 and size[2] not in (1, 2):
        raise ValueError(f"sensor_size: polarity count must be 1 or 2 (frames always have 2 channels), "
                         f"got {size[2]}")
    return size[1], size[0]


def _check_slicing(n_frames: Any, duration: Any, split_by: str) -> None:
    """Raise a ValueError naming the argument when the slicing arguments are not usable."""
    if (n_frames is None) == (duration is None):
        raise ValueError("give exactly one of n_frames= (a fixed number of frames) or duration= (a fixed "
                         f"time per frame); got n_frames={n_frames!r}, duration={duration!r}")
    if duration is not None:
        if isinstance(duration, bool) or not isinstance(duration, (int, float, np.number)) or not duration > 0:
            raise ValueError(f"duration must be a positive number (in the unit of t), got {duration!r}")
        return
    if isinstance(n_frames, bool) or not isinstance(n_frames, (int, np.integer)) or n_frames < 1:
        raise ValueError(f"n_frames must be a positive int, got {n_frames!r}")
    if split_by not in ("number", "time"):
        raise ValueError(f"split_by must be 'number' or 'time', got {split_by!r}")


def frame_slices(t: np.ndarray, n_frames: Optional[int] = None, duration: Optional[float] = None,
                 split_by: str = "number") -> Tuple[np.ndarray, np.ndarray]:
    """Index ranges ``[starts[j], ends[j])`` of each frame's events, for time-sorted ``t``.

    The slicing rules are the module docstring's (SpikingJelly's). The ranges are contiguous and cover
    every event: ``starts[0] == 0``, ``ends[j] == starts[j + 1]``, ``ends[-1] == len(t)``.
    """
    t = np.asarray(t)
    n = t.size
    _check_slicing(n_frames, duration, split_by)
    if duration is not None:
        starts: List[int] = []
        left = 0
        while left < n:     # one iteration per frame, not per event
            starts.append(left)
            left = int(np.searchsorted(t, t[left] + duration, side="right"))
        s = np.asarray(starts, dtype=np.int64)
        return s, np.append(s[1:], n).astype(np.int64)
    m = int(n_frames)
    if split_by == "number":
        di = n // m
        s = np.arange(m, dtype=np.int64) * di
    else:   # "time"
        if n == 0:
            raise ValueError("split_by='time' needs at least one event (the windows start at the first one)")
        dt = (t[-1] - t[0]) // m
        if not dt > 0:
            raise ValueError(f"split_by='time': the events span {t[-1] - t[0]} time units, less than one unit "
                             f"per frame for n_frames={m} (dt = span // n_frames = {dt}); use fewer frames or "
                             "split_by='number'")
        s = np.searchsorted(t, t[0] + dt * np.arange(m), side="left").astype(np.int64)
    return s, np.append(s[1:], n).astype(np.int64)


def events_to_frames(events: Events, sensor_size: Sequence[int], n_frames: Optional[int] = None,
                     duration: Optional[float] = None, split_by: str = "number",
                     dtype: Any = np.float32) -> np.ndarray:
    """Count events per frame, polarity and pixel: ``[T, 2, H, W]`` (see the module docstring).

    Args:
        events: dict-like with arrays ``x, y, t, p`` or a structured array with those fields.
        sensor_size: ``(W, H)`` or ``(W, H, 2)`` (Tonic's order); ``x < W``, ``y < H``.
        n_frames: a fixed number of frames T, split by event count (``split_by="number"``) or by time
            (``split_by="time"``).
        duration: instead of ``n_frames``, a fixed time per frame (in ``t``'s unit); T then depends on the
            recording.
        dtype: the frames' numpy dtype (counts; float32 by default).
    """
    H, W = _sensor_hw(sensor_size)
    x, y, t, p = _fields(events)
    if t.size and np.any(t[1:] < t[:-1]):
        order = np.argsort(t, kind="stable")
        x, y, t, p = x[order], y[order], t[order], p[order]
    starts, ends = frame_slices(t, n_frames=n_frames, duration=duration, split_by=split_by)
    n_out = len(starts)
    if t.size:
        xi, yi = x.astype(np.int64), y.astype(np.int64)
        bad = (xi < 0) | (xi >= W) | (yi < 0) | (yi >= H)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(f"events: {int(bad.sum())} event(s) outside the sensor (W, H) = ({W}, {H}), e.g. "
                             f"x={int(xi[i])}, y={int(yi[i])}; check sensor_size (Tonic's order: width first)")
    else:
        xi = yi = np.zeros(0, dtype=np.int64)
    frame = np.repeat(np.arange(n_out, dtype=np.int64), ends - starts)   # frame of each event, in order
    channel = (p > 0).astype(np.int64)
    flat = ((frame * 2 + channel) * H + yi) * W + xi
    counts = np.bincount(flat, minlength=n_out * 2 * H * W)
    return counts.reshape(n_out, 2, H, W).astype(dtype, copy=False)


# --------------------------------------------------------------------------- datasets
class EventFrames(Dataset):
    """A dataset of ``(frames [T, 2, H, W] float32 tensor, label int)`` from any source of
    ``(events, label)`` pairs, converted with :func:`events_to_frames` on access.

    ``source``: anything indexable with ``len`` yielding ``(events, label)`` (a list, a Tonic dataset).
    A source item that already is an array ``[T, 2, H, W]`` of frames is passed through unchanged.
    """

    def __init__(self, source: Sequence[Tuple[Any, Any]], sensor_size: Sequence[int],
                 n_frames: Optional[int] = None, duration: Optional[float] = None, split_by: str = "number",
                 transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> None:
        _sensor_hw(sensor_size)
        _check_slicing(n_frames, duration, split_by)
        self.source, self.sensor_size = source, tuple(sensor_size)
        self.n_frames, self.duration, self.split_by, self.transform = n_frames, duration, split_by, transform

    def __len__(self) -> int:
        return len(self.source)

    def frames(self, events: Any) -> np.ndarray:
        if isinstance(events, np.ndarray) and events.dtype.names is None:
            return events.astype(np.float32, copy=False)
        return events_to_frames(events, self.sensor_size, self.n_frames, self.duration, self.split_by)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        events, label = self.source[index]
        x = torch.from_numpy(np.ascontiguousarray(self.frames(events)))
        if self.transform is not None:
            x = self.transform(x)
        return x, int(label)


class _NpzFiles(Sequence):
    """``(events or frames, label)`` read lazily from ``(path, label)`` pairs."""

    def __init__(self, samples: List[Tuple[str, int]]) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Tuple[Any, int]:
        path, label = self.samples[index]
        with np.load(path) as z:
            if "frames" in z.files:
                return z["frames"], label
            try:
                return {k: z[k] for k in "xytp"}, label
            except KeyError:
                raise ValueError(f"{path}: expected arrays 'x', 'y', 't', 'p' (events) or 'frames', found "
                                 f"{z.files}") from None


class NpzEventDataset(EventFrames):
    """Event recordings stored as npz files, one directory per class::

        <root>/<class name>/<any name>.npz      arrays x, y, t, p (1-D, same length)

    SpikingJelly's ``events_np`` layout (``np.savez(path, t=..., x=..., y=..., p=...)``, one folder per
    class). Class names are sorted; a class's label is its index in that order (``self.classes``). A file
    holding ``frames`` (``[T, 2, H, W]``, SpikingJelly's ``frames_number_*`` output) is used as is.

    ``sensor_size`` (W, H) may be omitted when the files carry a ``sensor_size`` array (as
    :func:`save_npz_events` writes). Items are ``(frames [T, 2, H, W] float32, label)``.
    """

    def __init__(self, root: str, n_frames: Optional[int] = None, duration: Optional[float] = None,
                 split_by: str = "number", sensor_size: Optional[Sequence[int]] = None,
                 transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> None:
        if not os.path.isdir(root):
            raise FileNotFoundError(f"NpzEventDataset: {root!r} is not a directory (expected "
                                    "<root>/<class>/*.npz)")
        self.root = root
        self.classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        samples = [(os.path.join(root, c, f), i) for i, c in enumerate(self.classes)
                   for f in sorted(os.listdir(os.path.join(root, c))) if f.endswith(".npz")]
        if not samples:
            raise FileNotFoundError(f"NpzEventDataset: no <class>/*.npz files under {root!r}")
        if sensor_size is None:
            with np.load(samples[0][0]) as z:
                if "sensor_size" in z.files:
                    sensor_size = tuple(int(v) for v in z["sensor_size"])
                elif "frames" in z.files:
                    sensor_size = (z["frames"].shape[-1], z["frames"].shape[-2])
                else:
                    raise ValueError(f"NpzEventDataset: pass sensor_size=(W, H); {samples[0][0]} has no "
                                     "'sensor_size' array to read it from")
        self.samples = samples
        super().__init__(_NpzFiles(samples), sensor_size, n_frames, duration, split_by, transform)


def save_npz_events(root: str, events: Sequence[Events], labels: Sequence[int],
                    classes: Optional[Sequence[str]] = None, sensor_size: Optional[Sequence[int]] = None) -> List[str]:
    """Write recordings in :class:`NpzEventDataset`'s layout; returns the paths written.

    Sample ``i`` goes to ``<root>/<classes[labels[i]]>/<i:06d>.npz`` with arrays ``x, y, t, p`` (and
    ``sensor_size`` when given). ``classes`` defaults to ``class_00, class_01, ...`` (sorting keeps the
    label order).
    """
    if len(events) != len(labels):
        raise ValueError(f"save_npz_events: {len(events)} recordings but {len(labels)} labels")
    n_classes = int(max(labels)) + 1 if len(labels) else 0
    names = [f"class_{k:02d}" for k in range(n_classes)] if classes is None else list(classes)
    if sorted(names) != names:
        raise ValueError("save_npz_events: class names must be in sorted order, so that NpzEventDataset "
                         f"gives back the same labels; got {names}")
    paths = []
    for i, (ev, label) in enumerate(zip(events, labels)):
        folder = os.path.join(root, names[int(label)])
        os.makedirs(folder, exist_ok=True)
        x, y, t, p = _fields(ev)
        extra = {} if sensor_size is None else {"sensor_size": np.asarray(sensor_size, dtype=np.int64)}
        path = os.path.join(folder, f"{i:06d}.npz")
        np.savez(path, x=x, y=y, t=t, p=p, **extra)
        paths.append(path)
    return paths


def tonic_dataset(dataset: Any, n_frames: Optional[int] = None, duration: Optional[float] = None,
                  split_by: str = "number", transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                  **dataset_kwargs: Any) -> EventFrames:
    """A Tonic dataset as frames ``[T, 2, H, W]`` with snncc's (SpikingJelly's) slicing conventions.

    ``dataset``: a Tonic dataset instance, or the name of a class in ``tonic.datasets`` (e.g.
    ``"DVSGesture"``, ``"NMNIST"``) constructed with ``dataset_kwargs`` (e.g. ``save_to="./data",
    train=True``; Tonic may download the data then). Its events are converted by :func:`events_to_frames`
    with the dataset's ``sensor_size``; Tonic's own transforms are not needed.
    """
    if isinstance(dataset, str):
        try:
            import tonic
        except ImportError as e:
            raise ImportError(f"snncc.data.tonic_dataset({dataset!r}) needs Tonic, which is not installed: "
                              "pip install tonic (or store the recordings as npz files and use "
                              "snncc.data.NpzEventDataset)") from e
        cls = getattr(tonic.datasets, dataset, None)
        if cls is None:
            raise ValueError(f"tonic.datasets has no dataset {dataset!r}")
        dataset = cls(**dataset_kwargs)
    elif dataset_kwargs:
        raise TypeError(f"tonic_dataset: dataset keyword arguments {sorted(dataset_kwargs)} are only used "
                        "with a dataset name")
    sensor_size = getattr(dataset, "sensor_size", None)
    if sensor_size is None:
        raise ValueError(f"tonic_dataset: {type(dataset).__name__} has no sensor_size attribute")
    return EventFrames(dataset, sensor_size, n_frames, duration, split_by, transform)


# --------------------------------------------------------------------------- synthetic data
def synthetic_gestures(n: int, classes: int = 4, sensor_size: Sequence[int] = (32, 32),
                       events_per_sample: int = 2000, duration: int = 100_000, noise: float = 0.05,
                       seed: int = 0) -> Tuple[List[np.ndarray], np.ndarray]:
    """DVS-like recordings of a blob moving across the sensor, one motion direction per class.

    Class ``k`` moves at angle ``2 pi k / classes`` (plus a small per-sample jitter) across about half
    the sensor, starting near the centre (randomly offset). Each event lies at a Gaussian offset from the
    blob's centre at its time; its polarity is ON (1) on the leading half of the blob (offset along the
    motion > 0), OFF (0) on the trailing half, like a bright object moving over a dark background. A
    fraction ``noise`` of events are uniform background noise. Timestamps are integers in
    ``[0, duration)`` (microseconds), sorted.

    Deterministic by ``seed``. Classes are balanced (``labels = arange(n) % classes``, shuffled). Returns
    ``(events, labels)``: a list of ``n`` structured arrays of :data:`EVENT_DTYPE` and int64 labels ``[n]``.
    """
    for name, v in (("n", n), ("classes", classes), ("events_per_sample", events_per_sample),
                    ("duration", duration)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"synthetic_gestures: {name} must be a positive int, got {v!r}")
    if not 0.0 <= noise <= 1.0:
        raise ValueError(f"synthetic_gestures: noise must be in [0, 1], got {noise!r}")
    H, W = _sensor_hw(sensor_size)
    rng = np.random.default_rng(seed)
    e = int(events_per_sample)
    labels = rng.permutation(np.arange(n) % classes).astype(np.int64)
    angle = 2 * np.pi * labels / classes + rng.normal(0.0, 0.15, n)
    direction = np.stack([np.cos(angle), np.sin(angle)], axis=1)                    # [n, 2] (x, y)
    size = min(W, H)
    centre = np.array([W / 2, H / 2]) + rng.uniform(-0.1, 0.1, (n, 2)) * size       # [n, 2]
    travel, sigma = 0.5 * size, max(size / 10, 0.75)
    t = np.sort(rng.integers(0, duration, (n, e)), axis=1)                          # [n, e]
    frac = t / duration - 0.5
    offset = rng.normal(0.0, sigma, (n, e, 2))
    pos = centre[:, None, :] + frac[..., None] * travel * direction[:, None, :] + offset
    p = (np.einsum("nek,nk->ne", offset, direction) > 0).astype(np.int8)
    is_noise = rng.random((n, e)) < noise
    pos = np.where(is_noise[..., None], rng.uniform(0, 1, (n, e, 2)) * [W, H], pos)
    p = np.where(is_noise, rng.integers(0, 2, (n, e)), p).astype(np.int8)
    x = np.clip(np.floor(pos[..., 0]), 0, W - 1).astype(np.int16)
    y = np.clip(np.floor(pos[..., 1]), 0, H - 1).astype(np.int16)
    out = np.empty((n, e), dtype=EVENT_DTYPE)
    out["x"], out["y"], out["t"], out["p"] = x, y, t, p
    return list(out), labels


def time_first_collate(batch: Iterable[Tuple[torch.Tensor, int]]) -> Tuple[torch.Tensor, torch.Tensor]:
    """DataLoader ``collate_fn``: ``[(frames [T_i, ...], label)]`` -> ``(x [T, N, ...], labels [N])``.

    Time first, as ``snncc.compile(model, sequence=True)`` expects. Recordings with fewer frames than the
    longest (``duration=`` slicing) are zero-padded at the end.
    """
    items = list(batch)
    if not items:
        raise ValueError("time_first_collate: empty batch")
    frames = [f for f, _ in items]
    T = max(f.shape[0] for f in frames)
    x = frames[0].new_zeros((T, len(frames)) + tuple(frames[0].shape[1:]))
    for i, f in enumerate(frames):
        if f.shape[1:] != frames[0].shape[1:]:
            raise ValueError(f"time_first_collate: frame shapes differ: {tuple(f.shape[1:])} vs "
                             f"{tuple(frames[0].shape[1:])}")
        x[: f.shape[0], i] = f
    return x, torch.tensor([int(l) for l in (lab for _, lab in items)], dtype=torch.int64)
