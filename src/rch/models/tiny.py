"""A small encoder-decoder CNN that trains on a CPU in minutes (demo, tests, CPU configs)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .heads import FCNHead, conv_bn_relu

__all__ = ["TinySegNet"]


class TinySegNet(nn.Module):
    """Encoder to stride 8 (``encoder``: ``4 * width`` channels), a skip from stride 2, an FCN
    classifier, and an auxiliary FCN on stride 4; outputs at the input resolution.

    Example:
        >>> import torch
        >>> out = TinySegNet(5)(torch.zeros(2, 3, 32, 32))
        >>> tuple(out["out"].shape), tuple(out["aux"].shape)
        ((2, 5, 32, 32), (2, 5, 32, 32))
    """

    def __init__(self, num_classes: int, width: int = 32) -> None:
        super().__init__()
        w = width

        def down(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, 2, 1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(True),
                conv_bn_relu(cout, cout, 3),
            )

        self.stem = down(3, w // 2)  # stride 2
        self.stage2 = down(w // 2, w)  # stride 4
        self.encoder = nn.Sequential(
            down(w, 4 * w), conv_bn_relu(4 * w, 4 * w, 3)
        )  # stride 8: the encoder output RCH reads
        self.skip = conv_bn_relu(w // 2, w // 2, 1)
        self.fuse = conv_bn_relu(4 * w + w // 2, 2 * w, 3)
        self.classifier = nn.Conv2d(2 * w, num_classes, 1)
        self.aux = FCNHead(w, num_classes, channels=w)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        s2 = self.stem(x)
        s4 = self.stage2(s2)
        s8 = self.encoder(s4)
        up = F.interpolate(s8, size=s2.shape[-2:], mode="bilinear", align_corners=False)
        out = self.classifier(self.fuse(torch.cat([up, self.skip(s2)], dim=1)))
        size = x.shape[-2:]
        return {
            "out": F.interpolate(out, size=size, mode="bilinear", align_corners=False),
            "aux": F.interpolate(self.aux(s4), size=size, mode="bilinear", align_corners=False),
        }
