"""Exponential-moving-average prototype step (paper eq. 4-5), as a pure function."""

from __future__ import annotations

from torch import Tensor

__all__ = ["ema_update"]


def ema_update(
    prototypes: Tensor, sums: Tensor, counts: Tensor, momentum: float | Tensor
) -> Tensor:
    """One EMA step of the class prototypes from this batch's per-class sums.

    ``mu_k <- rho * mu_k + (1 - rho) * sums_k / counts_k`` for every class with
    ``counts_k > 0``; other classes keep their prototype. The old prototypes are detached;
    the batch mean keeps its gradient, as in the paper's reference code.

    Args:
        prototypes: ``(K, D)`` current prototypes.
        sums: ``(K, D)`` per-class sums of embeddings (may carry gradient).
        counts: ``(K,)`` per-class pixel counts.
        momentum: ``rho``, a float or a ``(K,)`` tensor of per-class values in ``[0, 1)``.

    Returns:
        ``(K, D)`` updated prototypes.

    Example:
        >>> import torch
        >>> old = torch.zeros(2, 1)
        >>> ema_update(old, torch.tensor([[4.0], [0.0]]), torch.tensor([2, 0]), 0.5).tolist()
        [[1.0], [0.0]]
    """
    present = (counts > 0).unsqueeze(1)
    mean = sums / counts.clamp_min(1).unsqueeze(1).to(sums.dtype)
    if isinstance(momentum, Tensor):
        momentum = momentum.to(sums.dtype).unsqueeze(1)
    moved = momentum * prototypes.detach() + (1 - momentum) * mean
    return moved.where(present, prototypes)
