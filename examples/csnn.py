"""The convolutional SNN of seed 001 (a CIFAR-10 surrogate-gradient study), written in step mode.

``BasicCSNN`` loops over time itself (reset, ``for t in range(T)``, stack, mean), with SpikingJelly LIF
neurons when SpikingJelly is installed; ``StepCSNN`` is the same network as a one-timestep module built
from snncc's own neurons, for ``snncc.compile(model, T=...)``.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

import snncc

__all__ = ["BasicCSNN", "StepCSNN"]


class BasicCSNN(nn.Module):
    """[conv -> LIF -> maxpool] x 2 -> flatten -> linear -> LIF -> linear; mean of T step outputs.

    Needs SpikingJelly (``pip install --no-deps spikingjelly``); its LIF is the seed's neuron.
    """

    def __init__(self, T: int = 8, surrogate_function: Optional[Callable] = None, in_channels: int = 3,
                 size: int = 32, classes: int = 10) -> None:
        super().__init__()
        from spikingjelly.activation_based import neuron, surrogate
        sg = surrogate.Sigmoid() if surrogate_function is None else surrogate_function
        self.T = T
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, 32, kernel_size=3, padding=1),
            neuron.LIFNode(surrogate_function=sg),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, kernel_size=3, padding=1),
            neuron.LIFNode(surrogate_function=sg),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * (size // 4) * (size // 4), 128),
            neuron.LIFNode(surrogate_function=sg),
            nn.Linear(128, classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from spikingjelly.activation_based import functional
        functional.reset_net(self)
        outputs = []
        for _ in range(self.T):
            outputs.append(self.net(x))
        return torch.stack(outputs).mean(dim=0)


class StepCSNN(nn.Module):
    """The same layers, one timestep per call, with snncc's LIF (no SpikingJelly needed)."""

    def __init__(self, surrogate_function: Optional[Callable] = None, in_channels: int = 3, size: int = 32,
                 classes: int = 10) -> None:
        super().__init__()
        sg = (lambda: snncc.surrogate.Sigmoid()) if surrogate_function is None else (lambda: surrogate_function)
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, 32, kernel_size=3, padding=1), snncc.LIF(surrogate_function=sg()),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, kernel_size=3, padding=1), snncc.LIF(surrogate_function=sg()),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * (size // 4) * (size // 4), 128), snncc.LIF(surrogate_function=sg()),
            nn.Linear(128, classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
