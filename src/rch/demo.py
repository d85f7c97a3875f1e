"""A short, real training run with and without RCH on generated images (``rch demo``).

The images are drawn on the fly from a seed: shapes of several classes on a background,
where classes come in pairs that share a colour and differ only in texture (solid vs
striped), plus illumination changes and noise, so that a small network confuses them.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .hooks import attach
from .stats import class_stats, confusion_matrix

__all__ = ["DemoResult", "TinySegNet", "make_toy_batch", "run_demo"]

PALETTE = torch.tensor([[0.8, 0.2, 0.2], [0.2, 0.6, 0.9], [0.9, 0.8, 0.2]])
"""Colours of the class pairs; class ``2 i + 1`` is solid, ``2 i + 2`` striped."""


def make_toy_batch(
    generator: torch.Generator, batch: int, size: int = 64, shapes: int = 4
) -> tuple[Tensor, Tensor]:
    """``(B, 3, S, S)`` images and ``(B, S, S)`` labels with 7 classes (0 = background).

    Example:
        >>> import torch
        >>> x, y = make_toy_batch(torch.Generator().manual_seed(0), 2, size=16)
        >>> x.shape, y.shape, int(y.max()) < 7
        (torch.Size([2, 3, 16, 16]), torch.Size([2, 16, 16]), True)
    """
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    images = 0.5 + 0.1 * torch.randn(batch, 3, size, size, generator=generator)
    labels = torch.zeros(batch, size, size, dtype=torch.int64)
    for b in range(batch):
        for _ in range(shapes):
            cls = int(torch.randint(1, 7, (1,), generator=generator))
            cy, cx = (torch.rand(2, generator=generator) * size).tolist()
            r = float(size * (0.08 + 0.12 * torch.rand(1, generator=generator)))
            if bool(torch.rand(1, generator=generator) < 0.5):
                mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
            else:
                mask = ((yy - cy).abs() < r) & ((xx - cx).abs() < r * 0.6)
            colour = PALETTE[(cls - 1) // 2].clone()
            if cls % 2 == 0:  # striped twin of the solid class before it
                stripes = ((xx + yy) // 2 % 2 == 0).float()
                shade = 0.55 + 0.45 * stripes
            else:
                shade = torch.ones(size, size)
            images[b, :, mask] = (colour[:, None] * shade[mask]).to(images.dtype)
            labels[b, mask] = cls
        light = 0.6 + 0.8 * float(torch.rand(1, generator=generator))
        ramp = 1.0 + 0.4 * (xx.float() / size - 0.5) * float(torch.randn(1, generator=generator))
        images[b] = images[b] * light * ramp
    images = images + 0.08 * torch.randn(images.shape, generator=generator)
    return images, labels


class TinySegNet(nn.Module):
    """A three-stage CNN encoder (stride 4) and a 1x1 classifier, upsampled to the input.

    RCH reads ``encoder`` (64 channels at 1/4 resolution), as the paper reads an encoder
    feature.
    """

    def __init__(self, num_classes: int = 7, width: int = 16) -> None:
        super().__init__()

        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
            )

        self.encoder = nn.Sequential(
            block(3, width, 1), block(width, 2 * width, 2), block(2 * width, 4 * width, 2)
        )
        self.classifier = nn.Conv2d(4 * width, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        logits: Tensor = self.classifier(self.encoder(x))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


@dataclass
class DemoResult:
    """Loss curve and validation scores of one demo run."""

    name: str
    losses: list[float]  # segmentation cross-entropy per step
    rch_losses: list[float]  # weighted RCH loss per step (empty for the baseline)
    miou: float
    iou: list[float]
    seconds: float


def _evaluate(model: nn.Module, images: Tensor, labels: Tensor, classes: int) -> list[float]:
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(x).argmax(1) for x in images.split(16)])
    tp, fn, fp = class_stats(confusion_matrix(labels, pred, classes, 255))
    return (tp / (tp + fn + fp).clamp_min(1)).tolist()


def _train(
    name: str, use_rch: bool, steps: int, seed: int, val: tuple[Tensor, Tensor]
) -> DemoResult:
    torch.manual_seed(seed)
    net = TinySegNet()
    model: nn.Module = (
        attach(net, "encoder", num_classes=7, in_channels=64, embed_dim=64) if use_rch else net
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=1e-4)
    data = torch.Generator().manual_seed(seed + 1)
    losses: list[float] = []
    rch_losses: list[float] = []
    start = time.perf_counter()
    for step in range(steps):
        model.train()
        for group in optimizer.param_groups:
            group["lr"] = 5e-3 * (1 - step / steps) ** 0.9
        x, y = make_toy_batch(data, 8)
        logits = model(x)
        seg_loss = F.cross_entropy(logits, y, ignore_index=255)
        loss = seg_loss
        if use_rch:
            extra = model.rch_loss(logits, y).loss  # type: ignore[operator]
            rch_losses.append(extra.item())
            loss = loss + extra
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(seg_loss.item())
    iou = _evaluate(net, *val, classes=7)
    seconds = time.perf_counter() - start
    return DemoResult(name, losses, rch_losses, sum(iou) / len(iou), iou, seconds)


def run_demo(steps: int = 150, seed: int = 0, report_every: int = 25) -> list[DemoResult]:
    """Train the baseline and the RCH model on the same data and seed; print both curves."""
    torch.set_num_threads(max(1, torch.get_num_threads()))
    val = make_toy_batch(torch.Generator().manual_seed(10_000 + seed), 64)
    results = []
    for name, use_rch in (("baseline", False), ("RCH", True)):
        print(f"training {name} for {steps} steps ...", flush=True)
        results.append(_train(name, use_rch, steps, seed, val))
    curves = [(r.name, r.losses) for r in results]
    curves += [(f"{r.name}:rch", r.rch_losses) for r in results if r.rch_losses]
    print("\nsteps     " + "  ".join(f"{n:>12}" for n, _ in curves) + "   (mean loss: seg CE, RCH)")
    for step in range(0, steps, report_every):
        window = slice(step, min(step + report_every, steps))
        means = [sum(c[window]) / len(c[window]) for _, c in curves]
        print(f"{step:4d}-{window.stop - 1:<4d}" + "  ".join(f"{m:12.4f}" for m in means))
    print("\nclass  " + "  ".join(f"{r.name:>10}" for r in results) + "   (val IoU, %)")
    for k in range(7):
        print(f"{k:5d}  " + "  ".join(f"{100 * r.iou[k]:10.2f}" for r in results))
    print("mIoU   " + "  ".join(f"{100 * r.miou:10.2f}" for r in results))
    print("time   " + "  ".join(f"{r.seconds:9.1f}s" for r in results))
    if not all(math.isfinite(v) for r in results for v in r.losses + r.rch_losses):
        raise RuntimeError("a loss became non-finite during the demo")
    return results
