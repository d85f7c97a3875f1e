"""A user's own model, imported by path in the tests."""

from __future__ import annotations

from torch import nn


def make(num_classes: int, width: int = 8) -> nn.Module:
    net = nn.Sequential()
    net.add_module("body", nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU()))
    net.add_module("cls", nn.Conv2d(width, num_classes, 1))
    return net
