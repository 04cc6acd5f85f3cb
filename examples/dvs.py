"""Event-camera (DVS) classification: event streams -> frames -> a conv SNN, ``compile(..., sequence=True)``.

Recordings are event streams ``(x, y, t, p)``, turned into frames ``[T, 2, H, W]`` by
:func:`snncc.data.events_to_frames` (SpikingJelly's conventions: ``--frames T`` frames split by event
count or by time, or ``--duration D`` per frame), batched time first to ``[T, N, 2, H, W]`` and fed to a
step-mode SNN compiled with ``snncc.compile(model, sequence=True)``: step t of the model gets frame t.

Data: by default synthetic gestures (:func:`snncc.data.synthetic_gestures`: a blob moving across the
sensor, one direction per class; generated in memory, no download); or a directory of npz recordings
(``--data-dir``, :class:`snncc.data.NpzEventDataset`'s layout ``<root>/<class>/*.npz`` with arrays
``x, y, t, p``), split 75/25 at random.

    python examples/dvs.py --quick
    python examples/dvs.py --data-dir ~/data/my_dvs --sensor-size 128 128 --frames 16 --epochs 20
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
from typing import Any, Dict, List, Optional

import torch
from torch import nn

if __package__ in (None, ""):   # run as a script: make ``examples`` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import snncc
from snncc.losses import tet_loss
from examples.common import (Data, eager_loop, load_event_dir, load_gestures, make_contenders, plot_curves,
                             run_training, seed_everything)

__all__ = ["DVSNet", "main"]


class DVSNet(nn.Module):
    """One timestep of a small conv SNN for 2-channel event frames ``[N, 2, H, W]``:
    [conv3x3 -> BatchNorm -> LIF -> maxpool2] x 2 (``width``, ``2 * width`` channels) -> global 4x4
    average pool -> linear -> LIF -> linear."""

    def __init__(self, classes: int, width: int = 16, in_channels: int = 2) -> None:
        super().__init__()
        sg = snncc.surrogate.ATan
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
            snncc.LIF(surrogate_function=sg()), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width),
            snncc.LIF(surrogate_function=sg()), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(),
        )
        self.classifier = nn.Sequential(
            nn.Linear(2 * width * 16, 4 * width), snncc.LIF(surrogate_function=sg()),
            nn.Linear(4 * width, classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="Train a conv SNN on event-camera frames with "
                                             "snncc.compile(model, sequence=True).")
    ap.add_argument("--data-dir", default=None,
                    help="npz recordings <dir>/<class>/*.npz (arrays x, y, t, p); default: synthetic gestures")
    ap.add_argument("--sensor-size", type=int, nargs=2, metavar=("W", "H"), default=None,
                    help="sensor width and height (synthetic default 32 32, 16 16 with --quick; for "
                         "--data-dir: read from the files' sensor_size array when omitted)")
    ap.add_argument("--frames", type=int, default=None, help="frames per recording, T (default 8; 4 with --quick)")
    ap.add_argument("--duration", type=float, default=None,
                    help="instead of --frames: time per frame in t's unit (T then varies; padded)")
    ap.add_argument("--split-by", choices=("number", "time"), default="number",
                    help="with --frames: equal event counts (number, default) or equal time windows (time)")
    ap.add_argument("--classes", type=int, default=4, help="synthetic gesture classes (default 4)")
    ap.add_argument("--train-size", type=int, default=None, help="synthetic training recordings (default 600)")
    ap.add_argument("--test-size", type=int, default=None, help="synthetic test recordings (default 200)")
    ap.add_argument("--width", type=int, default=None, help="channels of the first conv (default 16; 8 with --quick)")
    ap.add_argument("--loss", choices=("ce", "tet"), default="ce",
                    help="ce: cross-entropy of the mean over time (default); tet: snncc.losses.tet_loss")
    ap.add_argument("--epochs", type=int, default=None, help="epochs (default 5; 2 with --quick)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--no-eager", action="store_true", help="train the compiled model only")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=".", help="directory for the plot (default: current directory)")
    ap.add_argument("--plot", default=None, help="plot file (default: <out>/dvs.png)")
    ap.add_argument("--quick", action="store_true",
                    help="a smoke test: 16x16 sensor, 4 frames, width 8, 2 epochs, 256 / 96 recordings")
    args = ap.parse_args(argv)
    if args.quick:
        args.sensor_size = args.sensor_size or ([16, 16] if args.data_dir is None else None)
        args.frames = args.frames or (4 if args.duration is None else None)
        args.width = args.width or 8
        args.epochs = args.epochs or 2
        args.train_size = args.train_size or 256
        args.test_size = args.test_size or 96
    if args.duration is None:
        args.frames = args.frames or 8
    elif args.frames is not None:
        ap.error("give --frames or --duration, not both")
    args.width = args.width or 16
    args.epochs = args.epochs or 5
    for name in ("epochs", "batch", "width", "classes"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be >= 1")
    if args.data_dir is None and args.duration is not None:
        ap.error("--duration needs --data-dir (the synthetic gestures use --frames)")
    return args


def load_data(args: argparse.Namespace) -> Data:
    if args.data_dir is not None:
        return load_event_dir(args.data_dir, args.frames, args.duration, args.split_by, args.seed,
                              sensor_size=args.sensor_size)
    w, h = args.sensor_size or (32, 32)
    if w != h:
        raise SystemExit("--sensor-size: the synthetic gestures use a square sensor")
    return load_gestures(args.train_size or 600, args.test_size or 200, classes=args.classes, size=w,
                         frames=args.frames, seed=args.seed, events_per_sample=1000 if args.quick else 2000)


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """Train; returns ``{"results": {"eager"|"compiled": {"accuracy", "loss", "train_s", "eval_s",
    "warmup_s"}}, "plot": path or None, "frames": T}``."""
    args = parse_args(argv)
    data = load_data(args)
    seed_everything(args.seed)
    model = DVSNet(data.classes, args.width, in_channels=data.x_train.shape[2])
    print(f"snncc {snncc.__version__} | torch {torch.__version__} | {torch.get_num_threads()} threads | "
          f"{platform.machine()} | {datetime.date.today()}")
    print(f"{data.describe()} (T, 2, H, W) | DVSNet width {args.width}, snncc.compile(model, sequence=True) | "
          f"loss {args.loss} | batch={args.batch}, epochs={args.epochs}, lr={args.lr}, seed={args.seed}")

    def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if args.loss == "tet":
            return tet_loss(out, y)
        return nn.functional.cross_entropy(out.mean(0), y)

    contenders = make_contenders(model, lambda m: snncc.compile(m, sequence=True), lambda m: eager_loop(m),
                                 args.lr, loss_fn, lambda out: out.mean(0), eager=not args.no_eager,
                                 prepare=lambda x: x.transpose(0, 1))
    results = run_training(contenders, data, args.epochs, args.batch, args.seed, label="dvs")
    plot = args.plot or os.path.join(args.out, "dvs.png")
    written = plot_curves({"DVSNet": {k: r["accuracy"] for k, r in results.items()}}, plot,
                          f"DVSNet on {data.name}")
    if written:
        print(f"plot: {written}")
    return {"results": results, "plot": written, "frames": int(data.x_train.shape[1]), "data": data.name}


if __name__ == "__main__":
    main()
    sys.exit(0)
