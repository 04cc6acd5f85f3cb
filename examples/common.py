"""What the examples share: built-in and local data sets, the eager-vs-compiled training loop, the plot.

Every example trains an eager copy and a ``snncc.compile``d copy of the same initial model on the same
batches in the same order (interleaved batch by batch, so that both see the same machine load), and
reports per-epoch test accuracy and wall-clock time for both. Nothing here is needed to *use* snncc: a
compiled model trains with any ordinary loop.
"""
from __future__ import annotations

import copy
import os
import pickle
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

__all__ = [
    "Data", "load_digits_images", "load_cifar10", "load_gestures", "load_event_dir", "CIFAR10_MEAN", "CIFAR10_STD", "seed_everything",
    "Contender", "make_contenders", "eager_loop", "batches", "warm_up", "train_epoch", "evaluate", "run_training",
    "plot_curves", "is_png",
]

Tensor = torch.Tensor
LossFn = Callable[[Tensor, Tensor], Tensor]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)      # seed 001's normalization
CIFAR10_STD = (0.2023, 0.1994, 0.2010)


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (the examples' ``--seed``)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class Data:
    """Train and test tensors (inputs float32, labels int64) and the number of classes.

    ``flip``: training inputs are images that may be flipped left-right as augmentation (seed 001's
    ``RandomHorizontalFlip`` for CIFAR-10). ``sequence``: inputs are frame sequences stored ``[N, T, ...]``
    (batched by sample; a model takes them time first, ``[T, N, ...]``).
    """

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    classes: int
    name: str
    flip: bool = False
    sequence: bool = False

    def describe(self) -> str:
        return (f"{self.name}: {len(self.y_train)} train / {len(self.y_test)} test, input "
                f"{list(self.x_train.shape[1:])}, {self.classes} classes")


def load_digits_images(seed: int, subset: Optional[int] = None, size: int = 8, channels: int = 1) -> Data:
    """scikit-learn's bundled handwritten digits (1797 8x8 images, no download), split 75/25 stratified,
    standardized per pixel with the training set's statistics.

    ``size``: upsample (nearest) to ``size x size``, a multiple of 8; ``channels``: repeat the grey channel
    (e.g. 3 to feed a model built for RGB input). ``subset``: keep this many samples in all (quick runs).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    if size % 8:
        raise ValueError(f"digits: size must be a multiple of 8 (the images are 8x8), got {size}")
    digits = load_digits()
    x, y = digits.data, digits.target
    if subset is not None and subset < len(y):
        x, _, y, _ = train_test_split(x, y, train_size=subset, random_state=seed, stratify=y)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)
    scaler = StandardScaler().fit(x_tr)

    def images(a: np.ndarray) -> Tensor:
        img = torch.tensor(scaler.transform(a), dtype=torch.float32).view(-1, 1, 8, 8)
        k = size // 8
        img = img.repeat_interleave(k, dim=2).repeat_interleave(k, dim=3)
        return img.repeat(1, channels, 1, 1).contiguous()

    return Data(images(x_tr), torch.tensor(y_tr), images(x_te), torch.tensor(y_te), 10, "digits")


def _cifar_dir(root: str) -> str:
    for d in (root, os.path.join(root, "cifar-10-batches-py")):
        if os.path.isfile(os.path.join(d, "test_batch")):
            return d
    raise FileNotFoundError(
        f"CIFAR-10 not found under {root!r}: expected the python version's pickles data_batch_1 ... "
        f"data_batch_5 and test_batch in {root!r} or in {os.path.join(root, 'cifar-10-batches-py')!r} "
        "(the extracted cifar-10-python.tar.gz)")


def _read_cifar_batch(path: str) -> Tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as f:
        d = pickle.load(f, encoding="bytes")
    data, labels = d[b"data"], d[b"labels"]
    return np.asarray(data, dtype=np.uint8).reshape(-1, 3, 32, 32), np.asarray(labels, dtype=np.int64)


def load_cifar10(root: str, train_size: Optional[int] = None, test_size: Optional[int] = None) -> Data:
    """CIFAR-10 from its standard python pickles (no torchvision): ``data_batch_1..5`` and ``test_batch``,
    each a dict with ``b'data'`` (uint8 ``[n, 3072]``, channel-major RGB 32x32) and ``b'labels'``.

    Scaled to [0, 1] and normalized with seed 001's mean/std. ``train_size`` / ``test_size``: keep the
    first samples only. Training images get seed 001's random horizontal flip (``Data.flip``).
    """
    d = _cifar_dir(root)
    parts = [_read_cifar_batch(os.path.join(d, f"data_batch_{i}")) for i in range(1, 6)
             if os.path.isfile(os.path.join(d, f"data_batch_{i}"))]
    if not parts:
        raise FileNotFoundError(f"CIFAR-10: no data_batch_1 ... data_batch_5 in {d!r}")
    x_tr = np.concatenate([p[0] for p in parts])[:train_size]
    y_tr = np.concatenate([p[1] for p in parts])[:train_size]
    x_te, y_te = _read_cifar_batch(os.path.join(d, "test_batch"))
    x_te, y_te = x_te[:test_size], y_te[:test_size]
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)

    def norm(a: np.ndarray) -> Tensor:
        return ((torch.from_numpy(a).float() / 255.0 - mean) / std).contiguous()

    return Data(norm(x_tr), torch.from_numpy(y_tr), norm(x_te), torch.from_numpy(y_te), 10, "cifar10", flip=True)


def load_gestures(n_train: int, n_test: int, classes: int = 4, size: int = 32, frames: int = 8,
                  seed: int = 0, events_per_sample: int = 2000) -> Data:
    """Synthetic DVS gestures (:func:`snncc.data.synthetic_gestures`: a blob moving in a class-dependent
    direction) as event-count frames ``[N, T, 2, size, size]`` (``n_frames=frames``, split by event
    count). Train and test recordings come from different seeds."""
    from snncc.data import events_to_frames, synthetic_gestures

    def make(n: int, s: int) -> Tuple[Tensor, Tensor]:
        events, labels = synthetic_gestures(n, classes, (size, size), events_per_sample=events_per_sample, seed=s)
        x = np.stack([events_to_frames(e, (size, size), n_frames=frames) for e in events])
        return torch.from_numpy(x), torch.from_numpy(labels)

    x_tr, y_tr = make(n_train, 2 * seed)
    x_te, y_te = make(n_test, 2 * seed + 1)
    return Data(x_tr, y_tr, x_te, y_te, classes, "synthetic gestures", sequence=True)


def load_event_dir(root: str, frames: Optional[int], duration: Optional[float], split_by: str, seed: int,
                   test_fraction: float = 0.25, sensor_size: Optional[Sequence[int]] = None) -> Data:
    """Recordings in :class:`snncc.data.NpzEventDataset`'s layout (``<root>/<class>/*.npz``), as frames,
    split at random (by ``seed``) into train and test. With ``duration`` slicing the recordings may have
    different frame counts: they are zero-padded at the end to the longest."""
    from snncc.data import NpzEventDataset

    ds = NpzEventDataset(root, n_frames=frames, duration=duration, split_by=split_by, sensor_size=sensor_size)
    items = [ds[i] for i in range(len(ds))]
    T = max(f.shape[0] for f, _ in items)
    x = torch.zeros((len(items), T) + tuple(items[0][0].shape[1:]))
    for i, (f, _) in enumerate(items):
        x[i, :f.shape[0]] = f
    y = torch.tensor([label for _, label in items])
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = max(1, int(round(test_fraction * len(y))))
    te, tr = order[:n_test], order[n_test:]
    return Data(x[tr], y[tr], x[te], y[te], len(ds.classes), f"npz events ({root})", sequence=True)


# --------------------------------------------------------------------------- eager vs compiled
@dataclass
class Contender:
    """One side of a comparison: a module, how to call it, its optimizer, its clocks and its history.

    ``run(x)`` returns the model's output for a batch; ``loss_fn(out, y)`` the training loss;
    ``logits_fn(out)`` the class scores ``[N, C]`` (e.g. the mean over time of ``[T, N, C]``).
    """

    name: str
    module: nn.Module
    run: Callable[[Tensor], Tensor]
    optimizer: torch.optim.Optimizer
    loss_fn: LossFn
    logits_fn: Callable[[Tensor], Tensor]
    train_s: List[float] = field(default_factory=list)
    eval_s: List[float] = field(default_factory=list)
    losses: List[float] = field(default_factory=list)
    accuracy: List[float] = field(default_factory=list)

    def train_step(self, x: Tensor, y: Tensor) -> float:
        t0 = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.run(x), y)
        loss.backward()
        self.optimizer.step()
        self.train_s[-1] += time.perf_counter() - t0
        return float(loss.detach())

    @torch.no_grad()
    def predict(self, x: Tensor, batch: int) -> Tensor:
        self.module.eval()
        out = []
        t0 = time.perf_counter()
        for i in range(0, len(x), batch):
            out.append(self.logits_fn(self.run(x[i:i + batch])).argmax(1))
        self.eval_s[-1] += time.perf_counter() - t0
        self.module.train()
        return torch.cat(out)


def make_contenders(model: nn.Module, compile_fn: Callable[[nn.Module], nn.Module],
                    eager_run: Callable[[nn.Module], Callable[[Tensor], Tensor]], lr: float, loss_fn: LossFn,
                    logits_fn: Callable[[Tensor], Tensor], eager: bool = True,
                    prepare: Optional[Callable[[Tensor], Tensor]] = None) -> List[Contender]:
    """Copies of one initial model: ``[eager, compiled]`` (or ``[compiled]`` when ``eager`` is False),
    each with its own Adam. ``eager_run(module)`` is the eager call (e.g. the loop over time);
    ``prepare(x)`` is applied to each batch before either call (e.g. ``[N, T, ...]`` -> ``[T, N, ...]``)."""
    def wrap(run: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
        return run if prepare is None else (lambda x: run(prepare(x)))

    out = []
    if eager:
        m = copy.deepcopy(model)
        out.append(Contender("eager", m, wrap(eager_run(m)), torch.optim.Adam(m.parameters(), lr=lr), loss_fn,
                             logits_fn))
    cm = compile_fn(copy.deepcopy(model))
    out.append(Contender("compiled", cm, wrap(cm), torch.optim.Adam(cm.parameters(), lr=lr), loss_fn, logits_fn))
    return out


def eager_loop(model: nn.Module, T: Optional[int] = None) -> Callable[[Tensor], Tensor]:
    """The eager baseline of a step-mode model, from the reset state: ``T`` given: the same input
    ``[N, ...]`` at each of T steps; otherwise an input sequence ``[T, N, ...]``. Returns ``[T, N, ...]``."""
    import snncc

    def run(x: Tensor) -> Tensor:
        snncc.reset(model)
        if T is None:
            return torch.stack([model(x[t]) for t in range(x.shape[0])])
        return torch.stack([model(x) for _ in range(T)])
    return run


def batches(x: Tensor, y: Tensor, size: int, order: Optional[Tensor] = None,
            drop_last: bool = False) -> Iterator[Tuple[Tensor, Tensor]]:
    """Mini-batches of ``size`` in ``order``; ``drop_last`` skips a final smaller batch (training does, so
    that a compiled model sees one input shape)."""
    idx = torch.arange(len(y)) if order is None else order
    stop = len(y) - len(y) % size if drop_last and len(y) >= size else len(y)
    for i in range(0, stop, size):
        j = idx[i:i + size]
        yield x[j], y[j]


def warm_up(contenders: Sequence[Contender], samples: Sequence[Tuple[bool, Tensor, Tensor]]) -> Dict[str, float]:
    """Call each contender once per input shape, outside the epoch clocks; returns seconds per contender.

    A compiled module specializes (traces, runs its passes, builds C kernels, cached on disk) on the first
    call with a new shape; eager torch sets up its kernels. Parameters, buffers (BatchNorm statistics) and
    optimizer state are restored afterwards: the warm-up changes nothing.
    """
    out = {}
    for c in contenders:
        saved = copy.deepcopy(c.module.state_dict())
        t0 = time.perf_counter()
        for training, x, y in samples:
            c.module.train(training)
            with torch.set_grad_enabled(training):
                o = c.run(x)
                if training:
                    c.loss_fn(o, y).backward()
        out[c.name] = time.perf_counter() - t0
        c.module.zero_grad(set_to_none=True)
        c.module.load_state_dict(saved)
        c.module.train()
    return out


def train_epoch(contenders: Sequence[Contender], data: Data, batch: int, generator: torch.Generator,
                desc: str, max_batches: Optional[int] = None) -> None:
    """One epoch for every contender on the same shuffled (and, for CIFAR, flipped) batches, alternating
    per batch; appends each contender's mean loss and training time."""
    order = torch.randperm(len(data.y_train), generator=generator)
    n = len(data.y_train) // batch if len(data.y_train) >= batch else 1
    if max_batches is not None:
        n = min(n, max_batches)
    totals = [0.0] * len(contenders)
    for c in contenders:
        c.train_s.append(0.0)
    with tqdm(total=n, desc=desc, unit="batch", leave=False, file=sys.stderr, dynamic_ncols=True) as bar:
        for k, (xb, yb) in enumerate(batches(data.x_train, data.y_train, batch, order, drop_last=True)):
            if k >= n:
                break
            if data.flip:
                flip = torch.rand(len(yb), generator=generator) < 0.5
                xb = torch.where(flip.view(-1, *([1] * (xb.dim() - 1))), xb.flip(-1), xb)
            for i, c in enumerate(contenders):
                totals[i] += c.train_step(xb, yb)
            bar.set_postfix({c.name: f"{c.train_s[-1]:.1f}s" for c in contenders})
            bar.update()
    for c, tot in zip(contenders, totals):
        c.losses.append(tot / max(n, 1))


def evaluate(contenders: Sequence[Contender], data: Data, batch: int) -> None:
    """Test accuracy (a fraction in [0, 1]) and evaluation time of each contender, appended."""
    for c in contenders:
        c.eval_s.append(0.0)
        pred = c.predict(data.x_test, batch)
        c.accuracy.append(float((pred == data.y_test).float().mean()))


def run_training(contenders: Sequence[Contender], data: Data, epochs: int, batch: int, seed: int,
                 label: str = "", max_batches: Optional[int] = None) -> Dict[str, Dict[str, List[float]]]:
    """Warm up, then train and evaluate every contender for ``epochs``, printing one line per epoch.

    Returns ``{contender name: {"accuracy", "loss", "train_s", "eval_s", "warmup_s"}}`` (lists per epoch).
    """
    shapes = []
    n_train = min(batch, len(data.y_train))
    shapes.append((True, data.x_train[:n_train], data.y_train[:n_train]))
    for n in sorted({min(batch, len(data.y_test)), len(data.y_test) % batch} - {0}):
        shapes.append((False, data.x_test[:n], data.y_test[:n]))
    warm = warm_up(contenders, shapes)
    prefix = f"[{label}] " if label else ""
    print(prefix + "warm-up, one-off (compiled: trace, passes, kernels): "
          + ", ".join(f"{name} {s:.2f} s" for name, s in warm.items()), flush=True)
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(1, epochs + 1):
        train_epoch(contenders, data, batch, generator, f"{prefix}epoch {epoch}/{epochs}", max_batches)
        evaluate(contenders, data, batch)
        cells = [f"{c.name} loss {c.losses[-1]:.4f} test acc {c.accuracy[-1]:6.2%} "
                 f"(train {c.train_s[-1]:.2f}s, eval {c.eval_s[-1]:.2f}s)" for c in contenders]
        line = f"{prefix}epoch {epoch}/{epochs} | " + " | ".join(cells)
        if len(contenders) == 2:
            e, k = contenders
            line += f" | speedup train {e.train_s[-1] / max(k.train_s[-1], 1e-9):.2f}x"
        print(line, flush=True)
    return {c.name: {"accuracy": list(c.accuracy), "loss": list(c.losses), "train_s": list(c.train_s),
                     "eval_s": list(c.eval_s), "warmup_s": warm[c.name]} for c in contenders}


# --------------------------------------------------------------------------- plot
def plot_curves(curves: Dict[str, Dict[str, List[float]]], path: str, title: str) -> Optional[str]:
    """Test accuracy per epoch: one colour per run (e.g. surrogate), eager dashed, compiled solid.

    ``curves``: ``{run name: {"eager": [acc per epoch], "compiled": [...]}}``. Returns the PNG's path, or
    None (with a printed note) when matplotlib is not installed.
    """
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed (pip install matplotlib); skipping the plot")
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, sides) in enumerate(curves.items()):
        for side, style, marker, fill in (("eager", "--", "o", "none"), ("compiled", "-", ".", None)):
            acc = sides.get(side)
            if acc:
                ax.plot(range(1, len(acc) + 1), [100 * a for a in acc], style, marker=marker, markerfacecolor=fill,
                        color=colors[i % len(colors)], label=f"{name} ({side})")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def is_png(path: str) -> bool:
    """True when ``path`` starts with the PNG signature."""
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"
