"""Paired image/mask augmentation (pure functions of a seeded generator) and normalisation.

The recipe of the paper: random scale, crop/pad to a fixed size, random horizontal flip,
optional photometric jitter. Every random choice is drawn from an explicit
``torch.Generator`` seeded per sample, so a run is reproducible (and resumable) whatever the
number of data-loader workers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Augment",
    "augment",
    "crop_or_pad",
    "fit_size",
    "jitter",
    "normalize",
    "resize_pair",
    "sample_seed",
]

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class Augment:
    """Training augmentation settings.

    Attributes:
        crop_size: ``(H, W)`` of the training crops.
        scales: scale factors to pick from (the paper's set); empty -> uniform in
            ``scale_range``.
        scale_range: ``(low, high)`` for uniform scales.
        base_size: ``(H, W)`` the image is first resized to (keeping aspect, fitting inside),
            as mmsegmentation's ``img_scale``; ``None`` scales the original size.
        flip: random horizontal flip with probability 0.5.
        jitter: strength of brightness/contrast/saturation jitter (0 = off).
        ignore_index: label of padded pixels.
    """

    crop_size: tuple[int, int]
    scales: tuple[float, ...] = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0)
    scale_range: tuple[float, float] = (0.5, 2.0)
    base_size: tuple[int, int] | None = None
    flip: bool = True
    jitter: float = 0.0
    ignore_index: int = 255


def fit_size(h: float, w: float, box: tuple[int, int] | list[int] | None) -> tuple[float, float]:
    """``(h, w)`` scaled, aspect kept, to fit inside ``box`` (``None``: unchanged).

    Example:
        >>> fit_size(360, 480, (180, 320))
        (180.0, 240.0)
    """
    if not box:
        return float(h), float(w)
    fit = min(box[0] / h, box[1] / w)
    return h * fit, w * fit


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one sample of one epoch (a fixed integer hash, not Python's)."""
    x = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) & (
        2**64 - 1
    )
    x ^= x >> 31
    x = (x * 0xD6E8FEB86659FD93) & (2**64 - 1)
    return (x ^ (x >> 32)) & (2**63 - 1)


def _uniform(g: torch.Generator, low: float = 0.0, high: float = 1.0) -> float:
    return low + (high - low) * float(torch.rand((), generator=g))


def resize_pair(image: Tensor, mask: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Resize a float ``(3, H, W)`` image bilinearly and an ``(H, W)`` mask by nearest
    neighbour, both pixel-centre aligned (``nearest-exact``: plain ``nearest`` shifts the mask
    by up to half a pixel against the bilinear image)."""
    if tuple(image.shape[-2:]) == size:
        return image, mask
    image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
    mask = F.interpolate(mask[None, None].float(), size=size, mode="nearest-exact")[0, 0].long()
    return image, mask


def crop_or_pad(
    image: Tensor, mask: Tensor, size: tuple[int, int], g: torch.Generator, ignore_index: int
) -> tuple[Tensor, Tensor]:
    """Random crop to ``size``; sides that are smaller are padded (image 0, mask ignore)."""
    h, w = image.shape[-2:]
    ph, pw = max(size[0] - h, 0), max(size[1] - w, 0)
    if ph or pw:
        image = F.pad(image, (0, pw, 0, ph), value=0.0)
        mask = F.pad(mask, (0, pw, 0, ph), value=ignore_index)
        h, w = image.shape[-2:]
    top = int(torch.randint(0, h - size[0] + 1, (), generator=g))
    left = int(torch.randint(0, w - size[1] + 1, (), generator=g))
    return (
        image[:, top : top + size[0], left : left + size[1]],
        mask[top : top + size[0], left : left + size[1]],
    )


def jitter(image: Tensor, strength: float, g: torch.Generator) -> Tensor:
    """Brightness, contrast and saturation jitter of a ``(3, H, W)`` image in ``[0, 255]``."""
    if _uniform(g) < 0.5:
        image = image + 255.0 * strength * _uniform(g, -1.0, 1.0) * 0.25
    if _uniform(g) < 0.5:
        mean = image.mean()
        image = (image - mean) * _uniform(g, 1 - strength, 1 + strength) + mean
    if _uniform(g) < 0.5:
        gray = image.mean(0, keepdim=True)
        image = (image - gray) * _uniform(g, 1 - strength, 1 + strength) + gray
    return image.clamp(0.0, 255.0)


def normalize(
    image: Tensor,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Tensor:
    """``(image - mean) / std`` per channel; accepts uint8 or float ``(3, H, W)``."""
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (image.float() - m) / s


def augment(image: Tensor, mask: Tensor, cfg: Augment, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """Apply the training recipe to one uint8 image and its mask; returns a float image in
    ``[0, 255]`` (not yet normalised) and the mask, both of ``cfg.crop_size``.

    Example:
        >>> import torch
        >>> img = torch.zeros(3, 20, 30, dtype=torch.uint8)
        >>> mask = torch.zeros(20, 30, dtype=torch.int64)
        >>> x, y = augment(img, mask, Augment((16, 16)), torch.Generator().manual_seed(0))
        >>> tuple(x.shape), tuple(y.shape)
        ((3, 16, 16), (16, 16))
    """
    x = image.float()
    h, w = fit_size(x.shape[-2], x.shape[-1], cfg.base_size)
    if cfg.scales:
        scale = cfg.scales[int(torch.randint(0, len(cfg.scales), (), generator=g))]
    else:
        scale = _uniform(g, *cfg.scale_range)
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    x, y = resize_pair(x, mask, size)
    x, y = crop_or_pad(x, y, cfg.crop_size, g, cfg.ignore_index)
    if cfg.flip and _uniform(g) < 0.5:
        x, y = x.flip(-1), y.flip(-1)
    if cfg.jitter > 0:
        x = jitter(x, cfg.jitter, g)
    return x.contiguous(), y.contiguous()
