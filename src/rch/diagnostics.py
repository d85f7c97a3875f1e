"""What RCH sees, per class and per pixel: pure, gradient-free functions for logging and
figures.

:func:`calibration_stats` summarises one batch per class: TP / FN / FP pixel counts, the mean
FN-compensation ``phi`` and FP-penalty ``psi`` over each class's anchors, the mean cosine of a
class's pixels to their own prototype and to the nearest other prototype, and how far each
prototype moved. :func:`calibration_maps` gives ``phi``, ``psi`` and the error mask per pixel
(the paper's Fig. 5). Both reuse the loss's own pieces (:mod:`rch.stats`, :mod:`rch.loss`),
so the numbers are those the loss used. :func:`prototype_forces` splits the gradient that the
prototype cross-entropy sends to each prototype into the pull of the class's own pixels and
the push of every other pixel.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ._validation import check_labels, check_positive, check_tensor
from .loss import Formulation, calibration_terms, unit
from .stats import (
    PixelSets,
    count_bins,
    flatten_pixels,
    pixel_sets,
    prediction_confidence,
    resize_labels,
    resize_logits,
    set_counts,
    work_dtype,
)

__all__ = [
    "STAT_NAMES",
    "CalibrationStats",
    "PrototypeForces",
    "calibration_maps",
    "calibration_stats",
    "format_stats",
    "prototype_forces",
    "summarize",
]

STAT_NAMES = ("tp", "fn", "fp", "phi", "psi", "cos_own", "cos_other", "drift")


@dataclass(frozen=True)
class CalibrationStats:
    """Per-class statistics of one batch; each field is ``(K,)``.

    Means over an empty set (a class with no pixel in the batch) are NaN.

    Attributes:
        tp, fn, fp: pixel counts at the embedding resolution (int64).
        phi: mean FN-compensation term over the class's anchors (0 where the image has no FN
            pixel of the class, as in the loss).
        psi: mean FP-penalty term over the class's anchors.
        cos_own: mean cosine of the class's pixels to their own prototype.
        cos_other: mean, over the class's pixels, of the highest cosine to another prototype.
        drift: L2 norm of this step's change of the class's prototype (for learned
            prototypes, which the optimizer moves, :class:`~rch.RCHHead` reports the change
            since its previous training step).
    """

    tp: Tensor
    fn: Tensor
    fp: Tensor
    phi: Tensor
    psi: Tensor
    cos_own: Tensor
    cos_other: Tensor
    drift: Tensor

    def as_lists(self) -> dict[str, list[float]]:
        """Every field as a list (counts as ints, NaN kept), for JSON records."""
        out: dict[str, list[Any]] = {}
        for name in STAT_NAMES:
            value: Tensor = getattr(self, name)
            out[name] = value.tolist()
        return out


def _work(x: Tensor) -> Tensor:
    """Detached, in float64 when given float64, else float32 (as the loss computes)."""
    return x.detach().to(work_dtype(x))


def _prepare(
    embeddings: Tensor, seg_logits: Tensor, labels: Tensor, num_classes: int, ignore_index: int
) -> tuple[PixelSets, Tensor, Tensor]:
    _, _, h, w = embeddings.shape
    small = resize_labels(labels, (h, w))
    # cast after the resize
    logits = resize_logits(seg_logits.detach(), (h, w), work_dtype(embeddings))
    pred, _ = prediction_confidence(logits, torch.zeros_like(small))
    sets = pixel_sets(small, pred, num_classes, ignore_index)
    rows = flatten_pixels(_work(embeddings))
    return sets, rows, unit(rows)


def _terms(
    rows: Tensor, units: Tensor, sets: PixelSets, b: int, k: int, formulation: Formulation
) -> tuple[Tensor, Tensor]:
    phi, psi = calibration_terms(
        rows,
        units,
        sets,
        num_images=b,
        num_classes=k,
        formulation=formulation,
        fn_term=True,
        fp_term=True,
    )
    assert phi is not None and psi is not None  # both terms were asked for
    return phi, psi


def _class_mean(values: Tensor, sets: PixelSets, k: int) -> Tensor:
    index = sets.label  # ignored pixels sit in the spare bin k
    sums = values.new_zeros(k + 1).index_add(0, index, values)
    counts = count_bins(index, k + 1).to(values.dtype)
    means = sums / counts.clamp_min(1)
    return torch.where(counts > 0, means, torch.full_like(means, float("nan")))[:k]


@torch.no_grad()
def calibration_stats(
    embeddings: Tensor,
    seg_logits: Tensor,
    labels: Tensor,
    prototypes: Tensor,
    new_prototypes: Tensor | None = None,
    *,
    formulation: Formulation = "paper",
    ignore_index: int = 255,
) -> CalibrationStats:
    """Per-class statistics of one batch, as the loss sees it.

    Args:
        embeddings: ``(B, D, h, w)``.
        seg_logits: ``(B, K, h', w')``; resized to ``(h, w)`` as in the loss.
        labels: ``(B, H, W)``.
        prototypes: ``(K, D)`` prototypes the batch was scored against.
        new_prototypes: ``(K, D)`` after this step's update (for ``drift``; zeros if omitted).
        formulation: which ``phi`` / ``psi`` definition (``"paper"`` or ``"official"``).
        ignore_index: label of ignored pixels.

    Example:
        >>> import torch
        >>> emb = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).T.reshape(1, 2, 1, 2)
        >>> logits = torch.tensor([[5.0, 0.0], [5.0, 0.0]]).T.reshape(1, 2, 1, 2)
        >>> s = calibration_stats(emb, logits, torch.tensor([[[0, 1]]]), torch.eye(2))
        >>> s.tp.tolist(), s.fn.tolist(), s.fp.tolist(), s.cos_own.tolist()
        ([1, 0], [0, 1], [1, 0], [1.0, 1.0])
    """
    k = prototypes.shape[0]
    sets, rows, units = _prepare(embeddings, seg_logits, labels, k, ignore_index)
    phi, psi = _terms(rows, units, sets, embeddings.shape[0], k, formulation)
    cos = units @ unit(_work(prototypes).to(units.dtype)).T  # (N, K)
    target = sets.label.clamp_max(k - 1)
    own = cos.gather(1, target[:, None]).squeeze(1)
    others = cos.scatter(1, target[:, None], float("-inf")).amax(1) if k > 1 else own * 0
    tp, fn, fp = set_counts(sets, k)
    if new_prototypes is None:
        drift = torch.zeros(k, device=prototypes.device)
    else:
        drift = torch.linalg.vector_norm(_work(new_prototypes - prototypes), dim=1)
    return CalibrationStats(
        tp,
        fn,
        fp,
        _class_mean(phi, sets, k),
        _class_mean(psi, sets, k),
        _class_mean(own, sets, k),
        _class_mean(others, sets, k),
        drift,
    )


@torch.no_grad()
def calibration_maps(
    embeddings: Tensor,
    seg_logits: Tensor,
    labels: Tensor,
    num_classes: int,
    *,
    formulation: Formulation = "paper",
    ignore_index: int = 255,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pixel ``phi``, ``psi`` and misclassified mask, each ``(B, h, w)`` at the embedding
    resolution (``phi`` / ``psi`` are 0 at ignored pixels; the mask is bool)."""
    b, _, h, w = embeddings.shape
    sets, rows, units = _prepare(embeddings, seg_logits, labels, num_classes, ignore_index)
    phi, psi = _terms(rows, units, sets, b, num_classes, formulation)
    return phi.view(b, h, w), psi.view(b, h, w), sets.wrong.view(b, h, w)


@dataclass(frozen=True)
class PrototypeForces:
    """How the plain prototype cross-entropy (cosine logits over ``tau``, no margins) pulls
    and pushes each prototype, summed over pixels; fields are ``(K,)`` or ``(K, D)``.

    The gradient of the summed cross-entropy with respect to prototype ``k`` is
    ``pull_grad[k] + push_grad[k]``: its own pixels pull it with weight ``1 - s_k`` each
    (``s`` the softmax over the cosine logits), every other labelled pixel pushes it with
    weight ``s_k``. Add two with ``+`` to sum over batches.

    Attributes:
        pull: ``sum over the class's pixels of (1 - s_k)``.
        push: ``sum over the other labelled pixels of s_k``.
        pull_grad, push_grad: the two parts of the gradient (a descent step moves the
            prototype along ``-(pull_grad + push_grad)``).
        own_sum: sum of the unit embeddings of the class's pixels.
        count: the class's pixels at the embedding resolution (int64).
    """

    pull: Tensor
    push: Tensor
    pull_grad: Tensor
    push_grad: Tensor
    own_sum: Tensor
    count: Tensor

    def __add__(self, other: PrototypeForces) -> PrototypeForces:
        return PrototypeForces(
            *(getattr(self, f) + getattr(other, f) for f in self.__dataclass_fields__)
        )

    def alignment(self, prototypes: Tensor) -> tuple[Tensor, Tensor]:
        """Cosine of each prototype to the mean direction of its class's pixels, and to the
        mean direction of all labelled pixels: ``((K,), (K,))``; NaN for a class with no
        pixel."""
        p = unit(_work(prototypes).to(self.own_sum.dtype))
        own = (p * unit(self.own_sum)).sum(1)
        own = torch.where(self.count > 0, own, float("nan"))
        return own, p @ unit(self.own_sum.sum(0))


@torch.no_grad()
def prototype_forces(
    embeddings: Tensor,
    labels: Tensor,
    prototypes: Tensor,
    *,
    tau: float = 0.5,
    ignore_index: int = 255,
) -> PrototypeForces:
    """Split the prototype cross-entropy's gradient on each prototype into pull and push.

    Args:
        embeddings: ``(B, D, h, w)``.
        labels: ``(B, H, W)``; resized to ``(h, w)`` by nearest neighbour, as in the loss.
        prototypes: ``(K, D)``.
        tau: the loss's temperature.
        ignore_index: label of ignored pixels.

    Example:
        >>> import torch
        >>> emb = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).T.reshape(1, 2, 1, 2)
        >>> f = prototype_forces(emb, torch.tensor([[[0, 1]]]), torch.eye(2), tau=1.0)
        >>> [round(v, 4) for v in f.pull.tolist()], [round(v, 4) for v in f.push.tolist()]
        ([0.2689, 0.2689], [0.2689, 0.2689])
    """
    check_tensor("embeddings", embeddings, ndim=4, layout="(B, D, h, w)", floating=True)
    check_tensor("labels", labels, ndim=3, layout="(B, H, W)", floating=False)
    check_tensor("prototypes", prototypes, ndim=2, layout="(K, D)", floating=True)
    if prototypes.shape[1] != embeddings.shape[1] or labels.shape[0] != embeddings.shape[0]:
        raise ValueError(
            f"embeddings {tuple(embeddings.shape)}, labels {tuple(labels.shape)} and prototypes "
            f"{tuple(prototypes.shape)} must share B (embeddings, labels) and D (embeddings, "
            "prototypes)."
        )
    check_positive("tau", tau)
    k = prototypes.shape[0]
    check_labels("labels", labels, k, ignore_index)
    _, _, h, w = embeddings.shape
    small = resize_labels(labels, (h, w)).reshape(-1)
    units = unit(flatten_pixels(_work(embeddings)))
    keep = small != ignore_index
    units, small = units[keep], small[keep]
    p = _work(prototypes).to(units.dtype)
    norm = torch.linalg.vector_norm(p, dim=1, keepdim=True)
    p_unit = unit(p)
    cos = units @ p_unit.T  # (N, K)
    s = (cos / tau).softmax(1)
    own = torch.nn.functional.one_hot(small, k).to(units.dtype)
    pull_w = (1 - s) * own  # d(CE)/d(logit) is s_k - 1 on the own class: minus this
    push_w = s * (1 - own)  # and s_k on the others

    def grad(weights: Tensor) -> Tensor:  # sum_i w_ik d cos(e_i, p_k) / d p_k, over tau
        out: Tensor = (weights.T @ units - (weights * cos).sum(0)[:, None] * p_unit) / (tau * norm)
        return out

    return PrototypeForces(
        pull_w.sum(0),
        push_w.sum(0),
        -grad(pull_w),
        grad(push_w),
        own.T @ units,
        own.sum(0).to(torch.int64),
    )


def format_stats(summary: dict[str, Any]) -> str:
    """A per-class table of a run's mean calibration statistics (``rch_stats.json``)."""
    classes = summary["classes"]
    width = max(12, *(len(c) for c in classes))
    head = f"{'class':<{width}}" + "".join(f" {n:>9}" for n in STAT_NAMES)
    lines = [head]
    for k, name in enumerate(classes):
        cells = []
        for stat in STAT_NAMES:
            v = summary[stat][k]
            if v is None or v != v:
                cells.append(f" {'n/a':>9}")
            elif stat in ("tp", "fn", "fp"):
                cells.append(f" {v:9.0f}")
            else:
                cells.append(f" {v:9.3f}")
        lines.append(f"{name:<{width}}" + "".join(cells))
    return "\n".join(lines)


def summarize(records: Sequence[dict[str, list[float]]]) -> dict[str, list[float]]:
    """Per-class mean of each statistic over several batches (NaN entries skipped; counts
    are averaged per logged batch).

    Example:
        >>> summarize([{"phi": [0.5, float("nan")]}, {"phi": [1.0, 0.2]}])["phi"]
        [0.75, 0.2]
    """
    out: dict[str, list[float]] = {}
    if not records:
        return out
    for name in records[0]:
        rows = [[float("nan") if v is None else v for v in r[name]] for r in records]
        table = torch.tensor(rows, dtype=torch.float64)
        kept = ~table.isnan()
        sums = torch.where(kept, table, 0.0).sum(0)
        counts = kept.sum(0)
        means = torch.where(counts > 0, sums / counts.clamp_min(1), float("nan"))
        out[name] = [round(v, 6) if v == v else v for v in means.tolist()]
    return out
