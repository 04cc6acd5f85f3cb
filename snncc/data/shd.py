"""Spike audio: the Spiking Heidelberg Digits (SHD) layout, a generated stand-in, and binning to time steps.

SHD (Cramer, Stradmann, Schemmel and Zenke, 2020) is spoken digits, "zero" to "nine" in English and
German (20 classes), passed through a model of the inner ear: each recording is a list of spike events
on 700 input channels (one per place along the cochlea, low to high frequency), about a second long.
It is the usual benchmark for *recurrent* SNNs: the class is in how the active channels move over time.

The published files (``shd_train.h5`` and ``shd_test.h5``, about 8k and 2k recordings) are HDF5 with
one entry per recording::

    spikes/times    variable-length float arrays, spike times in seconds
    spikes/units    variable-length int arrays, the channel of each spike, 0..699
    labels          int [n], the class, 0..19
    extra/keys      (optional) the class names; extra/speaker, extra/meta_info are not read here

(Tonic's ``tonic.datasets.SHD`` reads the same groups and turns the times into microseconds; snncc
keeps seconds.) Get them from https://zenkelab.org/datasets/ (``shd_train.h5.zip``, ``shd_test.h5.zip``;
unzip) or let Tonic download them; :func:`load_shd` never downloads anything.

A network consumes them as dense time steps: :func:`bin_events` counts each channel's spikes per bin of
``dt`` seconds, giving ``[T, 700]``; :class:`SpikeAudio` batches them time first, ``[T, N, 700]``, which is
what ``snncc.compile(model, sequence=True)`` and an eager loop ``model(x[t])`` take.

:func:`generated_shd` makes recordings of the same layout offline (formant-like spike sweeps per class,
with speaker and timing jitter and background noise) for demos and tests: it shows the pipeline, it is
not a benchmark.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["SHD_CHANNELS", "SHD_CLASSES", "SHD_URL", "SpikeRecordings", "load_shd", "generated_shd",
           "bin_events", "bin_batch", "SpikeAudio"]

#: Input channels of SHD (and of its sibling SSC): the cochlea model's 700 fibres.
SHD_CHANNELS = 700
#: SHD's classes: the digits 0-9 in English (labels 0-9) and German (10-19).
SHD_CLASSES = 20
#: Where the published files are (``shd_train.h5.zip`` and ``shd_test.h5.zip``).
SHD_URL = "https://zenkelab.org/datasets/"

_SPLITS = ("train", "test")


@dataclass
class SpikeRecordings:
    """Spike-event recordings in SHD's layout, as read from a file or generated.

    ``times[i]`` (float seconds) and ``units[i]`` (channel indices) are the i-th recording's events, in
    the file's dtypes (a 1-D array each, equal length, possibly empty); ``labels`` int64 ``[n]``.
    ``classes`` is the number of classes and ``channels`` the number of input channels; ``keys`` the
    class names when the file has them.
    """

    times: List[np.ndarray]
    units: List[np.ndarray]
    labels: np.ndarray
    channels: int = SHD_CHANNELS
    classes: int = SHD_CLASSES
    name: str = "shd"
    keys: Optional[List[str]] = None

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        if not len(self.times) == len(self.units) == len(self.labels):
            raise ValueError(f"SpikeRecordings: {len(self.times)} times, {len(self.units)} units and "
                             f"{len(self.labels)} labels; they must be one per recording")
        for i, (t, u) in enumerate(zip(self.times, self.units)):
            if np.size(t) != np.size(u):
                raise ValueError(f"SpikeRecordings: recording {i} has {np.size(t)} spike times but "
                                 f"{np.size(u)} units")

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> Tuple[np.ndarray, np.ndarray, int]:
        """``(times, units, label)`` of recording ``i``."""
        return self.times[i], self.units[i], int(self.labels[i])

    def subset(self, index: Sequence[int]) -> "SpikeRecordings":
        """The recordings at ``index`` (e.g. the first 500 for a quick run), same metadata."""
        idx = [int(i) for i in index]
        return SpikeRecordings([self.times[i] for i in idx], [self.units[i] for i in idx], self.labels[idx],
                               self.channels, self.classes, self.name, self.keys)

    @property
    def spike_counts(self) -> np.ndarray:
        """Spikes per recording, int64 ``[n]``."""
        return np.array([np.size(t) for t in self.times], dtype=np.int64)


# --------------------------------------------------------------------------- the real files
def _shd_file(path: str, split: str) -> str:
    """The ``.h5`` file to read: ``path`` itself, or ``<path>/shd_<split>.h5``; a FileNotFoundError that
    says what is expected and where to get it otherwise."""
    if split not in _SPLITS:
        raise ValueError(f"load_shd: split must be one of {_SPLITS}, got {split!r}")
    path = os.path.expanduser(os.fspath(path))
    name = f"shd_{split}.h5"
    candidate = path if os.path.isfile(path) else os.path.join(path, name)
    if os.path.isfile(candidate):
        return candidate
    packed = [p for p in (candidate + ".zip", candidate + ".gz") if os.path.isfile(p)]
    hint = (f"{packed[0]!r} is there but still compressed: unzip / gunzip it in place" if packed else
            f"download {name}.zip from {SHD_URL} and unzip it there (or let Tonic fetch it: "
            "tonic.datasets.SHD(save_to=DIR)); snncc does not download data")
    raise FileNotFoundError(f"load_shd: no SHD file {candidate!r} (expected {path!r} to be a directory holding "
                            f"shd_train.h5 and shd_test.h5, or the .h5 file itself); {hint}")


def _import_h5py():
    try:
        import h5py
    except ImportError as e:
        raise ImportError("snncc.data.load_shd reads SHD's HDF5 files with h5py, which is not installed: "
                          "pip install h5py (generated_shd needs nothing)") from e
    return h5py


def load_shd(path: str, split: str = "train", limit: Optional[int] = None) -> SpikeRecordings:
    """Read a local copy of SHD's ``shd_<split>.h5`` (see the module docstring for the layout).

    ``path``: a directory holding ``shd_train.h5`` / ``shd_test.h5``, or one ``.h5`` file. ``limit``: read
    only the first recordings (quick runs). The whole split is read into memory (a few hundred MB for
    the training set at most; times and units keep the file's dtypes). Needs h5py, imported here only:
    a missing h5py or file raises an ImportError / FileNotFoundError saying what to do. Never downloads.
    """
    file = _shd_file(path, split)
    h5py = _import_h5py()
    with h5py.File(file, "r") as f:
        missing = [k for k in ("spikes/times", "spikes/units", "labels") if k not in f]
        if missing:
            raise ValueError(f"load_shd: {file!r} lacks {missing}; an SHD file has groups spikes/times, "
                             "spikes/units (one variable-length array per recording) and a dataset labels")
        n = len(f["labels"]) if limit is None else min(int(limit), len(f["labels"]))
        times = [np.asarray(t) for t in f["spikes/times"][:n]]
        units = [np.asarray(u) for u in f["spikes/units"][:n]]
        labels = np.asarray(f["labels"][:n], dtype=np.int64)
        keys = None
        if "extra/keys" in f:
            keys = [k.decode() if isinstance(k, bytes) else str(k) for k in f["extra/keys"][()]]
    classes = max(SHD_CLASSES, int(labels.max()) + 1 if labels.size else 0)
    return SpikeRecordings(times, units, labels, SHD_CHANNELS, classes, f"shd {split}", keys)


# --------------------------------------------------------------------------- generated stand-in
def generated_shd(n: int, seed: int = 0, classes: int = SHD_CLASSES, channels: int = SHD_CHANNELS,
                  duration: float = 1.0, spikes_per_sample: int = 4000, formants: int = 3,
                  noise: float = 0.1, pattern_seed: int = 1234) -> SpikeRecordings:
    """Synthetic recordings in SHD's layout: ``n`` recordings of about ``duration`` seconds on ``channels``.

    Why like this: SHD's class lives in where spikes sit on the channel axis *and* how that moves over
    time (a spoken digit's formants sweep across the cochlea's frequency channels), so a stand-in needs
    both for a recurrent network to have something to learn. Each class gets ``formants`` tracks, drawn
    once from ``pattern_seed`` (so train and test sets made with different ``seed`` share the classes):
    a track is active for part of the recording and moves linearly from one channel to another. Each odd
    class is the class before it swept the other way (same channels, same times, opposite direction):
    the time-averaged input cannot tell such a pair apart, only the order of the spikes can. A
    recording of the class is its tracks with a per-recording speaker shift of the channels (about 3%
    of them), a speaking rate (0.85-1.15x) and an onset delay (up to 10% of ``duration``), spikes spread
    about each track by a few channels, and a fraction ``noise`` of spikes uniform over channels and time.
    Spikes that fall outside ``[0, duration)`` or off the channel range are dropped, so recordings differ
    in length, as SHD's do.

    Deterministic by ``(seed, pattern_seed)``. Classes are balanced (``arange(n) % classes``, shuffled).
    Times are float32 seconds, sorted; units uint16 (or int64 past 65535 channels); vectorized numpy.
    """
    for name, v in (("n", n), ("classes", classes), ("channels", channels),
                    ("spikes_per_sample", spikes_per_sample), ("formants", formants)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"generated_shd: {name} must be a positive int, got {v!r}")
    if not duration > 0:
        raise ValueError(f"generated_shd: duration must be > 0 seconds, got {duration!r}")
    if not 0.0 <= noise <= 1.0:
        raise ValueError(f"generated_shd: noise must be in [0, 1], got {noise!r}")
    C, F, e = int(channels), int(formants), int(spikes_per_sample)
    # class templates: track f of class k runs from channel c0 to c1 during [on, off) (fractions of duration)
    prng = np.random.default_rng(pattern_seed)
    c0 = prng.uniform(0.05, 0.95, (classes, F)) * C
    c1 = np.clip(c0 + prng.uniform(-0.35, 0.35, (classes, F)) * C, 0.02 * C, 0.98 * C)
    on = prng.uniform(0.0, 0.45, (classes, F))
    off = np.minimum(on + prng.uniform(0.25, 0.5, (classes, F)), 0.9)
    pair = np.arange(1, classes, 2)                 # odd classes: the previous class swept the other way
    c0[pair], c1[pair] = c1[pair - 1], c0[pair - 1]
    on[pair], off[pair] = on[pair - 1], off[pair - 1]
    # recordings
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % classes).astype(np.int64)
    shift = rng.normal(0.0, 0.03 * C, n)                                 # speaker: channels shifted
    rate = rng.uniform(0.85, 1.15, n)                                    # speaking rate: time stretched
    delay = rng.uniform(0.0, 0.1, n)                                     # onset
    track = rng.integers(0, F, (n, e))                                   # which formant each spike belongs to
    phase = rng.random((n, e))                                           # position along the track, 0..1
    k = labels[:, None]
    a, b = on[k, track], off[k, track]                                   # [n, e]
    t = (delay[:, None] + (a + phase * (b - a)) * rate[:, None]) * duration
    t = t + rng.normal(0.0, 0.004 * duration, (n, e))                    # spike timing jitter
    ch = c0[k, track] + phase * (c1[k, track] - c0[k, track]) + shift[:, None]
    ch = ch + rng.normal(0.0, 0.006 * C + 1.0, (n, e))                   # spread about the track
    is_noise = rng.random((n, e)) < noise
    t = np.where(is_noise, rng.uniform(0.0, duration, (n, e)), t)
    ch = np.where(is_noise, rng.uniform(0.0, C, (n, e)), ch)
    ch = np.floor(ch)
    keep = (t >= 0) & (t < duration) & (ch >= 0) & (ch < C)
    udtype = np.uint16 if C <= np.iinfo(np.uint16).max + 1 else np.int64
    times, units = [], []
    for i in range(n):       # one iteration per recording (the drop makes lengths differ), not per spike
        ti, ui = t[i][keep[i]], ch[i][keep[i]]
        order = np.argsort(ti, kind="stable")
        times.append(ti[order].astype(np.float32))
        units.append(ui[order].astype(udtype))
    return SpikeRecordings(times, units, labels, C, int(classes), "generated shd")


# --------------------------------------------------------------------------- binning
def _resolve_dt(T: int, dt: Optional[float], duration: Optional[float]) -> float:
    if isinstance(T, bool) or not isinstance(T, (int, np.integer)) or T < 1:
        raise ValueError(f"bin_events: T must be a positive int, got {T!r}")
    if (dt is None) == (duration is None):
        raise ValueError("bin_events: give exactly one of dt= (seconds per bin) or duration= (seconds "
                         f"covered by the T bins, dt = duration / T); got dt={dt!r}, duration={duration!r}")
    dt = float(dt) if dt is not None else float(duration) / int(T)
    if not dt > 0:
        raise ValueError(f"bin_events: the bin width must be > 0 seconds, got {dt!r}")
    return dt


def bin_batch(times: Sequence[np.ndarray], units: Sequence[np.ndarray], T: int, dt: Optional[float] = None,
              duration: Optional[float] = None, channels: int = SHD_CHANNELS, count: bool = False,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Several recordings binned at once, time first: ``[T, N, channels]`` (see :func:`bin_events`).

    One ``np.bincount`` over every spike of the batch: binning happens per batch while training, so it
    must cost little next to the network.
    """
    dt = _resolve_dt(T, dt, duration)
    if len(times) != len(units):
        raise ValueError(f"bin_batch: {len(times)} time arrays but {len(units)} unit arrays")
    N, C = len(times), int(channels)
    lengths = np.array([np.size(t) for t in times], dtype=np.int64)
    for i, u in enumerate(units):
        if np.size(u) != lengths[i]:
            raise ValueError(f"bin_events: recording {i} has {lengths[i]} spike times but {np.size(u)} units")
    if lengths.sum() == 0:
        return torch.zeros((int(T), N, C), dtype=dtype)
    t = np.concatenate([np.ravel(x) for x in times]).astype(np.float64)
    u = np.concatenate([np.ravel(x) for x in units]).astype(np.int64)
    sample = np.repeat(np.arange(N, dtype=np.int64), lengths)
    if np.isnan(t).any() or (t < 0).any():
        raise ValueError("bin_events: spike times must be >= 0 seconds (and not NaN)")
    bad = (u < 0) | (u >= C)
    if bad.any():
        raise ValueError(f"bin_events: {int(bad.sum())} spike(s) on channels outside 0..{C - 1}, e.g. "
                         f"{int(u[np.flatnonzero(bad)[0]])}; pass channels= the input width")
    k = np.floor(t / dt)           # NOTE: bin k is [k dt, (k + 1) dt), computed in float64
    inside = k < T                 # spikes at or past T * dt are dropped (the recording is cut at T bins)
    flat = (k[inside].astype(np.int64) * N + sample[inside]) * C + u[inside]
    counts = np.bincount(flat, minlength=int(T) * N * C).reshape(int(T), N, C)
    if not count:
        counts = np.minimum(counts, 1)
    return torch.from_numpy(counts).to(dtype)


def bin_events(times: np.ndarray, units: np.ndarray, T: int, dt: Optional[float] = None,
               duration: Optional[float] = None, channels: int = SHD_CHANNELS, count: bool = False,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One recording's spike events as ``T`` dense time steps, ``[T, channels]``.

    Bin ``k`` holds the spikes with ``k * dt <= t < (k + 1) * dt`` (``k = floor(t / dt)`` in float64); give
    ``dt`` (seconds per bin) or ``duration`` (the seconds the T bins cover, ``dt = duration / T``). Spikes
    at ``t >= T * dt`` are dropped, so choose ``duration`` to cover the recordings (SHD's last about 1
    to 1.4 s; 1 s cuts a few tails, as many SHD papers do). ``count=False`` (the default) gives 1.0 where a
    channel spiked at least once in the bin and 0.0 elsewhere: the spike trains an SNN's first layer
    expects, independent of the bin width; ``count=True`` gives the spike counts. Vectorized
    (``np.bincount``); times must be >= 0 and units in ``0..channels-1`` (a ValueError otherwise).
    """
    return bin_batch([times], [units], T, dt, duration, channels, count, dtype)[:, 0]


# --------------------------------------------------------------------------- dataset
class SpikeAudio(Dataset):
    """Recordings as dense time steps: items ``(x [T, channels], label)``; :meth:`batches` gives
    ``(x [T, N, channels], labels [N])``, time first, for ``snncc.compile(model, sequence=True)``.

    Binning (:func:`bin_events`, ``T`` bins over ``duration`` seconds) is done on access, per item or
    per batch, rather than once for the whole set: SHD's training set at T = 100 would be over half a
    billion values dense. For a ``DataLoader`` over items, ``snncc.data.time_first_collate`` stacks them time first.
    """

    def __init__(self, recordings: SpikeRecordings, T: int = 100, duration: float = 1.0, count: bool = False,
                 dtype: torch.dtype = torch.float32) -> None:
        _resolve_dt(T, None, duration)
        self.recordings, self.T, self.duration, self.count, self.dtype = recordings, int(T), float(duration), \
            bool(count), dtype
        self.labels = torch.from_numpy(recordings.labels)

    def __len__(self) -> int:
        return len(self.recordings)

    @property
    def channels(self) -> int:
        return self.recordings.channels

    @property
    def classes(self) -> int:
        return self.recordings.classes

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, int]:
        t, u, label = self.recordings[i]
        return bin_events(t, u, self.T, duration=self.duration, channels=self.channels, count=self.count,
                          dtype=self.dtype), label

    def batch(self, index: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor]:
        """The recordings at ``index`` binned together: ``(x [T, N, channels], labels [N])``."""
        idx = [int(i) for i in index]
        r = self.recordings
        x = bin_batch([r.times[i] for i in idx], [r.units[i] for i in idx], self.T, duration=self.duration,
                      channels=self.channels, count=self.count, dtype=self.dtype)
        return x, self.labels[idx]

    def batches(self, size: int, shuffle: bool = False, generator: Optional[torch.Generator] = None,
                drop_last: bool = False) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """Mini-batches ``(x [T, N, channels], labels [N])`` of ``size`` recordings, in order or shuffled
        with ``generator``; ``drop_last`` skips a final smaller batch (so a compiled model sees one shape)."""
        if size < 1:
            raise ValueError(f"SpikeAudio.batches: size must be >= 1, got {size}")
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        stop = n - n % size if drop_last and n >= size else n
        for i in range(0, stop, size):
            yield self.batch(order[i:i + size].tolist())
