"""Segmentation scores from one dataset-wide confusion matrix (rows = ground truth)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Scores", "format_comparison", "format_scores", "scores_from_confusion"]


@dataclass(frozen=True)
class Scores:
    """IoU, accuracy and precision of one evaluation.

    ``acc`` is mmsegmentation's per-class accuracy, TP over the class's labelled pixels:
    its recall, 1 minus its false-negative rate. ``precision`` is TP over the pixels
    predicted as the class, 1 minus its false-positive share. Per-class values are NaN
    for a class that appears neither in the ground truth nor in the predictions (IoU), not
    in the ground truth (accuracy) or never predicted (precision); the means skip NaN
    entries, as mmsegmentation does.

    All values are fractions in ``[0, 1]``.
    """

    iou: list[float]
    acc: list[float]
    miou: float
    macc: float
    aacc: float
    precision: list[float]
    mprecision: float

    def to_dict(self, classes: Sequence[str] | None = None) -> dict[str, object]:
        names = list(classes) if classes is not None else [str(k) for k in range(len(self.iou))]
        return {
            "mIoU": self.miou,
            "mAcc": self.macc,
            "aAcc": self.aacc,
            "IoU": dict(zip(names, self.iou, strict=True)),
            "Acc": dict(zip(names, self.acc, strict=True)),
            "mPrecision": self.mprecision,
            "Precision": dict(zip(names, self.precision, strict=True)),
        }


def _nanmean(values: Tensor) -> float:
    kept = values[~values.isnan()]
    return float(kept.mean()) if kept.numel() else math.nan


def scores_from_confusion(confusion: Tensor) -> Scores:
    """mIoU, per-class IoU, mAcc, aAcc and per-class precision from a ``(K, K)`` confusion
    matrix (rows = ground truth, columns = prediction).

    Example:
        >>> import torch
        >>> conf = torch.tensor([[3, 1], [0, 4]])
        >>> s = scores_from_confusion(conf)
        >>> [round(v, 3) for v in s.iou], round(s.miou, 3), round(s.aacc, 3)
        ([0.75, 0.8], 0.775, 0.875)
        >>> s.acc, s.precision
        ([0.75, 1.0], [1.0, 0.8])
    """
    if confusion.ndim != 2 or confusion.shape[0] != confusion.shape[1]:
        raise ValueError(f"confusion must be (K, K), got {tuple(confusion.shape)}")
    conf = confusion.double()
    tp = conf.diagonal()
    gt, predicted = conf.sum(1), conf.sum(0)
    union = gt + predicted - tp
    nan = torch.full_like(tp, math.nan)
    iou = torch.where(union > 0, tp / union.clamp_min(1), nan)
    acc = torch.where(gt > 0, tp / gt.clamp_min(1), nan)
    precision = torch.where(predicted > 0, tp / predicted.clamp_min(1), nan)
    total = float(conf.sum())
    aacc = float(tp.sum()) / total if total > 0 else math.nan
    return Scores(
        iou=iou.tolist(),
        acc=acc.tolist(),
        miou=_nanmean(iou),
        macc=_nanmean(acc),
        aacc=aacc,
        precision=precision.tolist(),
        mprecision=_nanmean(precision),
    )


def _pct(v: float) -> str:
    return "   n/a" if math.isnan(v) else f"{100 * v:6.2f}"


def format_scores(scores: Scores, classes: Sequence[str]) -> str:
    """A per-class table (IoU, accuracy and precision, %) with the means at the bottom."""
    width = max(12, *(len(c) for c in classes))
    lines = [f"{'class':<{width}}   IoU    Acc   Prec"]
    for name, iou, acc, prec in zip(classes, scores.iou, scores.acc, scores.precision, strict=True):
        lines.append(f"{name:<{width}} {_pct(iou)} {_pct(acc)} {_pct(prec)}")
    lines.append(
        f"{'mean':<{width}} {_pct(scores.miou)} {_pct(scores.macc)} {_pct(scores.mprecision)}"
    )
    lines.append(f"{'aAcc':<{width}} {_pct(scores.aacc)}")
    return "\n".join(lines)


def format_comparison(
    named: Sequence[tuple[str, Scores]], classes: Sequence[str], baseline: int = 0
) -> str:
    """Side-by-side per-class IoU (%) of several runs, with each run's delta to ``baseline``."""
    width = max(12, *(len(c) for c in classes))
    head = f"{'class':<{width}}" + "".join(f" {n[:10]:>10}" for n, _ in named)
    head += "".join(f" {'d ' + n[:8]:>10}" for i, (n, _) in enumerate(named) if i != baseline)
    base = named[baseline][1]

    def row(label: str, values: list[float], ref: float) -> str:
        cells = "".join(f" {_pct(v):>10}" for v in values)
        deltas = "".join(
            f" {'n/a' if math.isnan(v - ref) else f'{100 * (v - ref):+.2f}':>10}"
            for i, v in enumerate(values)
            if i != baseline
        )
        return f"{label:<{width}}{cells}{deltas}"

    lines = [head]
    for k, name in enumerate(classes):
        lines.append(row(name, [s.iou[k] for _, s in named], base.iou[k]))
    lines.append(row("mIoU", [s.miou for _, s in named], base.miou))
    lines.append(row("mAcc", [s.macc for _, s in named], base.macc))
    lines.append(row("mPrec", [s.mprecision for _, s in named], base.mprecision))
    lines.append(row("aAcc", [s.aacc for _, s in named], base.aacc))
    return "\n".join(lines)
