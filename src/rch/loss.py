"""FN-compensation / FP-penalty terms and the margin logits (paper eq. 6-8), pure functions.

All functions work on flattened pixels: ``rows`` are raw embeddings ``(N, D)`` and ``units``
the same rows scaled to unit length. Per-class and per-image statistics are scatters and
gathers indexed by label and prediction, so time and memory are ``O(N * D)``; no
``N x N`` matrix and no ``(B, K, H, W)`` one-hot tensor is formed.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from . import stats
from .stats import PixelSets, count_bins, segment_sum

__all__ = ["EPS", "Formulation", "calibration_terms", "margin_logits", "unit"]

Formulation = Literal["paper", "official"]

EPS = 1e-12
"""Added to vector norms before dividing, as in the reference code: ``v / (||v|| + EPS)``."""


def unit(x: Tensor) -> Tensor:
    """Scale each row of ``x`` (last dim) to unit length: ``x / (||x|| + 1e-12)``.

    Example:
        >>> import torch
        >>> unit(torch.tensor([[3.0, 4.0], [0.0, 0.0]]))
        tensor([[0.6000, 0.8000],
                [0.0000, 0.0000]])
    """
    norm: Tensor = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return x / (norm + EPS)


def _gather_dot(units: Tensor, table: Tensor, index: Tensor) -> Tensor:
    """``out[i] = units[i] . table[index[i]]`` for ``(N, D)`` units and an ``(S, D)`` table."""
    dots: Tensor = torch.linalg.vecdot(units, table.index_select(0, index))
    return dots


def _mean_rows(values: Tensor, index: Tensor, num_segments: int) -> tuple[Tensor, Tensor]:
    """Per-bin mean rows ``(S + 1, D)`` (last row and empty bins zero) and counts ``(S + 1,)``."""
    sums, counts = segment_sum(values, index, num_segments)
    means = sums / counts.clamp_min(1).unsqueeze(1).to(sums.dtype)
    pad = means.new_zeros(1, means.shape[1])
    return torch.cat([means, pad]), torch.cat([counts, counts.new_zeros(1)])


def _paper_term(
    units: Tensor, error_units: Tensor, sets: PixelSets, bin_index: Tensor, bins: int, k: int
) -> tuple[Tensor, Tensor]:
    """``e~_i . m`` with ``m`` the mean unit FN/FP embedding of (image, class) ``(b_i, y_i)``.

    Returns the dot products and whether that FN/FP set is non-empty, per pixel.
    """
    means, counts = _mean_rows(error_units, bin_index, bins)
    anchor = torch.where(sets.valid, sets.image * k + sets.label, bins)
    return _gather_dot(units, means, anchor), counts[anchor] > 0


def _official_term(
    error_rows: Tensor,
    units: Tensor,
    sets: PixelSets,
    class_index: Tensor,
    bin_index: Tensor,
    bins: int,
    k: int,
) -> tuple[Tensor, Tensor]:
    """``e~_i . f`` with ``f`` the unit batch-pooled mean raw FN/FP embedding of class ``y_i``.

    Returns the dot products and whether image ``b_i`` has an FN/FP pixel of ``y_i``.
    """
    sums, counts = segment_sum(error_rows, class_index, k)
    centres = unit(sums / counts.clamp_min(1).unsqueeze(1).to(sums.dtype))
    centres = torch.cat([centres, centres.new_zeros(1, centres.shape[1])])
    per_image = count_bins(bin_index, bins + 1)
    # the spare bin: ignored anchors, and the pixels that are no error (a slice, not
    # `[bins] = 0`: that copies a host scalar to the device, a synchronisation)
    per_image[bins:].zero_()
    anchor = torch.where(sets.valid, sets.image * k + sets.label, bins)
    return _gather_dot(units, centres, sets.label), per_image[anchor] > 0


def calibration_terms(
    rows: Tensor,
    units: Tensor,
    sets: PixelSets,
    *,
    num_images: int,
    num_classes: int,
    formulation: Formulation,
    fn_term: bool = True,
    fp_term: bool = True,
) -> tuple[Tensor | None, Tensor | None]:
    """Per-anchor FN-compensation ``phi`` and FP-penalty ``psi`` (paper eq. 6-7).

    ``phi_i = 1 - e~_i . m_fn`` and ``psi_i = 1 + e~_i . m_fp`` for an anchor ``i`` of class
    ``k`` in image ``b``, where ``m_fn`` / ``m_fp`` is

    * ``"paper"``: the mean unit embedding of the FN / FP pixels of class ``k`` in image
      ``b``; the term is 0 when that set is empty;
    * ``"official"``: the unit-normalised mean *raw* embedding of the FN / FP pixels of
      class ``k`` over the whole batch; the term is 0 unless image ``b`` has such pixels.

    Ignored pixels get 0. A disabled term is returned as ``None``.

    Args:
        rows: ``(N, D)`` raw embeddings.
        units: ``(N, D)`` unit-length embeddings (``unit(rows)``).
        sets: pixel sets of the same ``N`` pixels.
        num_images: ``B``.
        num_classes: ``K``.
        formulation: ``"paper"`` or ``"official"``.
        fn_term: compute ``phi``.
        fp_term: compute ``psi``.

    Returns:
        ``(phi, psi)``, each ``(N,)`` with values in ``[0, 2]``, or ``None`` when disabled.
    """
    k = num_classes
    bins = num_images * k
    # the misclassified rows; on a GPU all rows, the others indexed to spare bins (the
    # compaction would read the count back to the host, a synchronisation)
    compact = units.device.type in stats.COMPACT_ON
    wrong_idx = sets.wrong.nonzero().squeeze(1) if compact else None

    def pick(x: Tensor) -> Tensor:
        return x if wrong_idx is None else x.index_select(0, wrong_idx)

    image = pick(sets.image)
    sign = {"fn": -1.0, "fp": 1.0}
    terms: dict[str, Tensor | None] = {"fn": None, "fp": None}
    for name, wanted in (("fn", fn_term), ("fp", fp_term)):
        if not wanted:
            continue
        cls = pick(sets.label if name == "fn" else sets.pred)
        class_index, bin_index = cls, image * k + cls
        if wrong_idx is None:
            class_index = torch.where(sets.wrong, class_index, k)
            bin_index = torch.where(sets.wrong, bin_index, bins)
        if formulation == "paper":
            dots, present = _paper_term(units, pick(units), sets, bin_index, bins, k)
        else:
            dots, present = _official_term(pick(rows), units, sets, class_index, bin_index, bins, k)
        terms[name] = (1.0 + sign[name] * dots).where(present, dots.new_zeros(()))
    return terms["fn"], terms["fp"]


def margin_logits(cosines: Tensor, target: Tensor, margin: Tensor | None, tau: float) -> Tensor:
    """Prototype logits ``cos / tau`` with ``margin`` subtracted from the true-class logit.

    Args:
        cosines: ``(N, K)`` cosine of each pixel to each prototype.
        target: ``(N,)`` true class in ``[0, K)`` (any class for pixels whose margin is 0).
        margin: ``(N,)`` amount taken off the true-class logit, or ``None`` for none.
        tau: temperature.

    Returns:
        ``(N, K)`` logits.

    Example:
        >>> import torch
        >>> margin_logits(torch.tensor([[0.5, 0.25]]), torch.tensor([0]), torch.tensor([1.0]), 0.5)
        tensor([[0.0000, 0.5000]])
    """
    logits = cosines / tau
    if margin is None:
        return logits
    return logits.scatter_add(1, target.unsqueeze(1), -margin.unsqueeze(1))
