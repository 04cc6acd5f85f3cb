"""Losses for training SNNs on their per-timestep outputs.

:func:`tet_loss` is TET's loss (Deng et al., "Temporal Efficient Training of Spiking Neural Network via
Gradient Re-weighting", ICLR 2022), written for snncc's time-first outputs ``[T, N, C]`` (what
``snncc.compile(model, T=...)`` and ``compile(model, sequence=True)`` return).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

__all__ = ["tet_loss"]


def tet_loss(outputs: torch.Tensor, target: torch.Tensor, means: float = 1.0, lamb: float = 1e-3,
             criterion: Optional[nn.Module] = None) -> torch.Tensor:
    """TET loss: ``(1 - lamb) * L_TET + lamb * L_MSE``.

    * ``L_TET = (1 / T) * sum_t CE(outputs[t], target)``: every timestep's output must classify the
      sample, not only their mean (the gradient re-weighting of TET).
    * ``L_MSE = MSE(outputs, full_like(outputs, means))``: the mean squared difference of *all* outputs
      (every step, sample and class) to the constant ``means``, a regularizer that keeps the per-step
      logits from drifting into outliers.

    This is the formula of TET's reference code (``functions.TET_loss(outputs, labels, criterion, means,
    lamb)``): the cross-entropy term is weighted by ``1 - lamb``, not 1. With the recommended small
    ``lamb`` (1e-3 for CIFAR, 1e-4 for DVS data; ``1e-3`` is the reference code's default, ``means=1.0``)
    the difference is negligible, and ``lamb=0`` gives exactly the mean over time of the per-step
    cross-entropy.

    Args:
        outputs: ``[T, N, C]`` logits per timestep, time first (snncc's layout). TET's own models return
            ``[N, T, C]``: pass ``outputs.transpose(0, 1)``.
        target: ``[N]`` class indices (int64), or whatever ``criterion`` accepts for ``outputs[t]``.
        means: the value the MSE term pulls every output towards.
        lamb: weight of the MSE term, in ``[0, 1]``.
        criterion: the per-step classification loss, ``nn.CrossEntropyLoss()`` (mean over the batch) by
            default. It must reduce to a scalar.

    Returns:
        A scalar tensor. With the default criterion it is a mean over the batch, so averaging it over
        data-parallel replicas of equal batch size gives the full-batch loss (what DDP's averaged
        gradients assume).
    """
    if not isinstance(outputs, torch.Tensor):
        raise TypeError(f"tet_loss: outputs must be a tensor [T, N, C], got {type(outputs).__name__}")
    if outputs.dim() < 3:
        raise ValueError(f"tet_loss: outputs must have shape [T, N, C] (time first), got shape "
                         f"{tuple(outputs.shape)}; for a single timestep use outputs.unsqueeze(0)")
    if not outputs.is_floating_point():
        raise TypeError(f"tet_loss: outputs must be floating point logits, got dtype {outputs.dtype}")
    if outputs.shape[0] < 1:
        raise ValueError("tet_loss: outputs has T = 0 timesteps")
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"tet_loss: target must be a tensor [N], got {type(target).__name__}")
    if target.dim() >= 1 and target.shape[0] != outputs.shape[1]:
        raise ValueError(f"tet_loss: target has {target.shape[0]} samples but outputs [T, N, C] has "
                         f"N = {outputs.shape[1]} (shape {tuple(outputs.shape)}); is outputs [N, T, C]? "
                         "then pass outputs.transpose(0, 1)")
    if isinstance(lamb, bool) or not isinstance(lamb, (int, float)) or not 0.0 <= float(lamb) <= 1.0:
        raise ValueError(f"tet_loss: lamb must be a number in [0, 1], got {lamb!r}")
    if isinstance(means, bool) or not isinstance(means, (int, float)):
        raise TypeError(f"tet_loss: means must be a number, got {means!r}")
    ce = nn.CrossEntropyLoss() if criterion is None else criterion
    T = outputs.shape[0]
    l_tet = sum(ce(outputs[t], target) for t in range(T)) / T
    if lamb == 0:
        return l_tet
    l_mse = nn.functional.mse_loss(outputs, torch.full_like(outputs, float(means)))
    return (1.0 - lamb) * l_tet + lamb * l_mse
