"""Segmentation losses of the recipe: OHEM cross-entropy (pure functions)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ohem_keep", "seg_cross_entropy"]


def ohem_keep(
    logits: Tensor, labels: Tensor, thresh: float, min_kept: int, ignore_index: int
) -> Tensor:
    """Online hard example mining (mmsegmentation's ``OHEMPixelSampler``): keep the valid
    pixels whose probability of the true class is below ``max(thresh, q)``, where ``q`` is the
    ``min_kept``-th (0-based) smallest such probability, so at least ``min_kept`` pixels are kept
    when that many are valid.

    Args:
        logits: ``(B, K, H, W)`` at the label resolution.
        labels: ``(B, H, W)``.

    Returns:
        ``(B, H, W)`` bool mask of kept pixels (never includes ignored ones).

    Example:
        >>> import torch
        >>> logits = torch.tensor([[[[4.0, 0.0, -4.0]], [[0.0, 0.0, 0.0]]]])  # (1, 2, 1, 3)
        >>> ohem_keep(logits, torch.zeros(1, 1, 3, dtype=torch.long), 0.7, 1, 255).tolist()
        [[[False, True, True]]]
    """
    with torch.no_grad():
        valid = labels != ignore_index
        safe = torch.where(valid, labels, 0)
        prob = logits.float().softmax(1).gather(1, safe[:, None]).squeeze(1)
        prob = torch.where(valid, prob, torch.ones_like(prob) * 2)  # ignored never kept
        threshold = torch.tensor(thresh, device=prob.device)
        n_valid = int(valid.sum())
        if min_kept > 0 and n_valid > 0:
            kth = torch.kthvalue(prob.flatten(), min(min_kept, n_valid - 1) + 1).values
            threshold = torch.maximum(threshold, kth)
        return valid & (prob < threshold)


def seg_cross_entropy(
    logits: Tensor, labels: Tensor, ignore_index: int, keep: Tensor | None = None
) -> Tensor:
    """Pixel-mean cross-entropy over valid pixels, or over the ``keep`` mask (OHEM)."""
    if logits.shape[-2:] != labels.shape[-2:]:
        logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    if keep is None:
        return F.cross_entropy(logits.float(), labels, ignore_index=ignore_index)
    target = torch.where(keep, labels, torch.full_like(labels, ignore_index))
    losses = F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="sum")
    return losses / keep.sum().clamp_min(1)
