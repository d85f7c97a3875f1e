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
        count = min(min_kept + 1, prob.numel())
        if min_kept <= 0 or count == 0:
            return valid & (prob < thresh)
        # The min(min_kept, n_valid - 1)-th smallest valid probability (0-based), found without
        # reading n_valid back to the host (on a GPU a synchronisation, which would leave the
        # GPU idle while the rest of the step is launched). With ignored pixels set to 2, above
        # any probability, the min_kept-th smallest value is that one when it is valid; when
        # it is not, fewer than min_kept + 1 pixels are valid and it is the largest valid one.
        flat = torch.where(valid, prob, 2.0).flatten()
        kth = torch.kthvalue(flat, count).values
        largest = torch.where(flat < 2, flat, -1.0).amax()  # -1: no valid pixel at all
        kth = torch.where(kth < 2, kth, largest)
        return valid & (prob < kth.clamp_min(thresh))


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
