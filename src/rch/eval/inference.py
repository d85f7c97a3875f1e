"""Inference modes: whole image, sliding window, and multi-scale + flip (the paper's)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ..data.transforms import fit_size

__all__ = ["PAPER_SCALES", "InferenceConfig", "predict_probs", "slide_logits", "whole_logits"]

PAPER_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0)
Forward = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class InferenceConfig:
    """How to predict one image.

    Attributes:
        mode: ``"whole"`` (one pass) or ``"slide"`` (overlapping ``crop`` windows).
        crop: ``(H, W)`` of the sliding windows.
        stride: ``(H, W)`` step between windows.
        scales: image scales whose probabilities are averaged (``(1.0,)``: single scale).
        flip: also average the horizontally flipped image.
        base_size: ``(H, W)`` the image is first resized to fit inside (keeping its aspect),
            as in training with ``data.base_size``; predictions are scored at the label's
            full resolution.
    """

    mode: Literal["whole", "slide"] = "whole"
    crop: tuple[int, int] = (512, 512)
    stride: tuple[int, int] = (341, 341)
    scales: tuple[float, ...] = (1.0,)
    flip: bool = False
    base_size: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("whole", "slide"):
            raise ValueError(f"inference mode must be 'whole' or 'slide', got {self.mode!r}")
        if not self.scales or any(s <= 0 for s in self.scales):
            raise ValueError(f"inference scales must be positive, got {self.scales}")
        if min(self.crop) < 1 or min(self.stride) < 1:
            raise ValueError(f"crop and stride must be >= 1, got {self.crop}, {self.stride}")


def whole_logits(forward: Forward, image: Tensor) -> Tensor:
    """``(B, K, H, W)`` logits of one pass, resized to the input when the model's are not."""
    logits = forward(image)
    if logits.shape[-2:] != image.shape[-2:]:
        logits = F.interpolate(logits, size=image.shape[-2:], mode="bilinear", align_corners=False)
    return logits


def _starts(size: int, crop: int, stride: int) -> list[int]:
    if size <= crop:
        return [0]
    starts = list(range(0, size - crop, stride))
    return [*starts, size - crop]


def slide_logits(
    forward: Forward, image: Tensor, crop: Sequence[int], stride: Sequence[int]
) -> Tensor:
    """Average logits of overlapping ``crop`` windows (the last ones flush with the border);
    images smaller than the crop are padded and the padding is cut off again.

    Example:
        >>> import torch
        >>> ident = lambda x: x[:, :2]
        >>> x = torch.arange(2 * 5 * 7.).view(1, 2, 5, 7).repeat(1, 2, 1, 1)
        >>> torch.equal(slide_logits(ident, x, (3, 4), (2, 2)), x[:, :2])
        True
    """
    _, _, h, w = image.shape
    ch, cw = crop
    ph, pw = max(ch - h, 0), max(cw - w, 0)
    padded = F.pad(image, (0, pw, 0, ph)) if ph or pw else image
    hp, wp = padded.shape[-2:]
    total: Tensor | None = None
    count = torch.zeros(1, 1, hp, wp, device=image.device)
    for top in _starts(hp, ch, stride[0]):
        for left in _starts(wp, cw, stride[1]):
            window = padded[:, :, top : top + ch, left : left + cw]
            out = whole_logits(forward, window).float()
            if total is None:
                total = out.new_zeros(out.shape[0], out.shape[1], hp, wp)
            total[:, :, top : top + ch, left : left + cw] += out
            count[:, :, top : top + ch, left : left + cw] += 1
    assert total is not None  # at least one window always runs
    return (total / count)[:, :, :h, :w]


def predict_probs(forward: Forward, image: Tensor, cfg: InferenceConfig) -> Tensor:
    """Class probabilities ``(B, K, H, W)`` at the input size, averaged over the configured
    scales and flips."""
    h, w = image.shape[-2:]
    fh, fw = fit_size(h, w, cfg.base_size)
    total: Tensor | None = None
    n = 0
    for scale in cfg.scales:
        size = (max(1, round(fh * scale)), max(1, round(fw * scale)))
        x = (
            image
            if size == (h, w)
            else F.interpolate(image, size=size, mode="bilinear", align_corners=False)
        )
        for flip in (False, True) if cfg.flip else (False,):
            xi = x.flip(-1) if flip else x
            if cfg.mode == "slide":
                logits = slide_logits(forward, xi, cfg.crop, cfg.stride)
            else:
                logits = whole_logits(forward, xi).float()
            if flip:
                logits = logits.flip(-1)
            if logits.shape[-2:] != (h, w):
                logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
            probs = logits.softmax(dim=1)
            total = probs if total is None else total + probs
            n += 1
    assert total is not None
    return total / n
