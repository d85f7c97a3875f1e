"""Decoder heads of the paper's networks: FCN, OCR (object-contextual representations), and
the HRNet resize-concat that RCH reads."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ChannelSlice", "FCNHead", "OCRHead", "ResizeConcat"]


def conv_bn_relu(cin: int, cout: int, kernel: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class ResizeConcat(nn.Module):
    """Upsample every HRNet branch to the first one's resolution and concatenate them.

    Example:
        >>> import torch
        >>> feats = [torch.zeros(1, 2, 8, 8), torch.zeros(1, 3, 4, 4)]
        >>> tuple(ResizeConcat()(feats).shape)
        (1, 5, 8, 8)
    """

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        size = features[0].shape[-2:]
        ups = [features[0]] + [
            F.interpolate(f, size=size, mode="bilinear", align_corners=False) for f in features[1:]
        ]
        return torch.cat(ups, dim=1)


class ChannelSlice:
    """Feature selector that keeps channels ``start:stop`` of a tensor (picklable).

    The reference code feeds RCH HRNet's second-resolution branch after resize-concat,
    i.e. a channel slice of the concatenated feature.
    """

    def __init__(self, start: int, stop: int) -> None:
        self.start, self.stop = start, stop

    def __call__(self, output: Tensor) -> Tensor:
        return output[:, self.start : self.stop]

    def __repr__(self) -> str:
        return f"ChannelSlice({self.start}, {self.stop})"


class FCNHead(nn.Sequential):
    """``conv-BN-ReLU`` (3x3) then a 1x1 classifier, with dropout between (as mmseg's FCN)."""

    def __init__(
        self, in_channels: int, num_classes: int, channels: int = 512, dropout: float = 0.1
    ):
        super().__init__(
            conv_bn_relu(in_channels, channels, 3),
            nn.Dropout2d(dropout),
            nn.Conv2d(channels, num_classes, 1),
        )


class OCRHead(nn.Module):
    """Object-contextual representations (Yuan et al., ECCV 2020).

    Soft object regions come from an auxiliary FCN on the same feature; each class's region
    representation is the region-weighted mean of the pixel features; each pixel attends over
    the class representations; the context is fused with the pixel feature and classified.

    Returns ``(logits, soft_regions)``; the soft regions are the auxiliary output.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        channels: int = 512,
        key_channels: int = 256,
        dropout: float = 0.05,
    ) -> None:
        super().__init__()
        self.aux = nn.Sequential(
            conv_bn_relu(in_channels, in_channels, 1), nn.Conv2d(in_channels, num_classes, 1)
        )
        self.bottleneck = conv_bn_relu(in_channels, channels, 3)
        self.query = nn.Sequential(
            conv_bn_relu(channels, key_channels), conv_bn_relu(key_channels, key_channels)
        )
        self.key = nn.Sequential(
            conv_bn_relu(channels, key_channels), conv_bn_relu(key_channels, key_channels)
        )
        self.value = conv_bn_relu(channels, key_channels)
        self.up = conv_bn_relu(key_channels, channels)
        self.fuse = nn.Sequential(conv_bn_relu(2 * channels, channels), nn.Dropout2d(dropout))
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        self.key_channels = key_channels

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        regions = self.aux(features)  # (B, K, h, w)
        feats = self.bottleneck(features)  # (B, C, h, w)
        b, _, h, w = feats.shape
        weights = regions.flatten(2).softmax(dim=2)  # over pixels, per class
        objects = torch.einsum("bkn,bcn->bck", weights, feats.flatten(2))[..., None]  # (B,C,K,1)
        query = self.query(feats).flatten(2).transpose(1, 2)  # (B, N, kc)
        key = self.key(objects).flatten(2)  # (B, kc, K)
        value = self.value(objects).flatten(2).transpose(1, 2)  # (B, K, kc)
        sim = (query @ key * self.key_channels**-0.5).softmax(dim=-1)  # (B, N, K)
        context = (sim @ value).transpose(1, 2).reshape(b, self.key_channels, h, w)
        fused = self.fuse(torch.cat([self.up(context), feats], dim=1))
        return self.classifier(fused), regions
