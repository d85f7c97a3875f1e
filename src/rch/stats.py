"""Pixel bookkeeping shared by the loss and by evaluation (pure functions, no state).

The loss splits labelled pixels into true positives, false negatives and false positives
against the segmentation head's prediction; evaluation accumulates the same split in a
confusion matrix. Both use the helpers here, so the two can never disagree.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "PixelSets",
    "class_stats",
    "confusion_matrix",
    "count_bins",
    "flatten_pixels",
    "pixel_sets",
    "prediction_confidence",
    "resize_labels",
    "resize_logits",
    "segment_sum",
    "set_counts",
    "work_dtype",
]


class PixelSets(NamedTuple):
    """Per-pixel set membership of a flattened batch of ``N = B * h * w`` pixels.

    ``label`` holds the class of each valid pixel and ``num_classes`` (a spare bin) for
    ignored ones, so it can index per-class tables with one extra row that is dropped.
    """

    label: Tensor  # (N,) int64 in [0, K]; K marks an ignored pixel
    pred: Tensor  # (N,) int64 in [0, K)
    image: Tensor  # (N,) int64 in [0, B)
    valid: Tensor  # (N,) bool: label is not the ignore value
    correct: Tensor  # (N,) bool: valid and pred == label (true positive of its class)
    wrong: Tensor  # (N,) bool: valid and pred != label (FN of label, FP of pred)


def work_dtype(x: Tensor) -> torch.dtype:
    """The dtype the loss computes in for ``x``: float64 when ``x`` is float64, else float32
    (half and bfloat16 inputs are computed in float32)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def resize_labels(labels: Tensor, size: tuple[int, int]) -> Tensor:
    """Nearest-neighbour resize of a ``(B, H, W)`` label map (any dtype) to ``size`` (no-op
    if equal), picking the pixels ``F.interpolate(mode="nearest")`` picks.

    A downsampling by a whole factor on both axes (a network's stride: 512 -> 64) is a
    strided slice, which picks exactly those pixels, with no floating-point copy of the
    map. Other sizes go through ``F.interpolate`` itself on a float64 copy: its picks where
    ``i * H / h`` is a whole number depend on its float rounding, which differs between its
    kernel paths.
    """
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels
    (h_in, w_in), (h, w) = labels.shape[-2:], size
    if h_in % h == 0 and w_in % w == 0:
        return labels[..., :: h_in // h, :: w_in // w].contiguous()
    resized = F.interpolate(labels[:, None].to(torch.float64), size=size, mode="nearest")
    return resized[:, 0].to(labels.dtype)


def resize_logits(
    logits: Tensor, size: tuple[int, int], dtype: torch.dtype | None = None
) -> Tensor:
    """Bilinear resize (``align_corners=False``) of ``(B, K, h, w)`` logits (no-op if equal),
    computed and returned in ``dtype`` (default: the logits' own).

    A downsampling reads only the two source rows and columns around each output pixel, in
    one gather and before the cast: a ``(B, K, H, W)`` map at the label resolution is never
    copied whole, to float32 or otherwise (on a GPU with AMP that copy was a large part of
    RCH's peak memory; ``F.interpolate`` copies its input on the CPU, and two gathers one
    axis at a time held half of it). The result equals ``F.interpolate`` in ``dtype`` up to
    rounding.
    """
    dtype = dtype or logits.dtype
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits.to(dtype)
    if size[0] > logits.shape[-2] or size[1] > logits.shape[-1]:
        return F.interpolate(logits.to(dtype), size=size, mode="bilinear", align_corners=False)
    (rows, row_frac), (cols, col_frac) = (
        _bilinear_taps(logits.shape[dim], n_out, logits.device, dtype)
        for dim, n_out in ((2, size[0]), (3, size[1]))
    )
    # both axes' source lines in one gather, in the logits' own dtype; then the cast
    out = logits[:, :, rows[:, None], cols].to(dtype)
    for dim, weight in ((2, row_frac), (3, col_frac)):
        if weight is not None:
            first, second = out.split(weight.shape[0], dim)
            shape = [1, 1, 1, 1]
            shape[dim] = weight.shape[0]
            out = torch.lerp(first, second, weight.view(shape))
    return out


@functools.lru_cache(maxsize=64)
def _bilinear_taps(
    n_in: int, n_out: int, device: torch.device, dtype: torch.dtype
) -> tuple[Tensor, Tensor | None]:
    """``align_corners=False`` bilinear sampling along one axis, from ``n_in`` to ``n_out <=
    n_in`` lines (PyTorch's rule: ``src = (i + 0.5) * n_in / n_out - 0.5``, clamped at 0):
    the source lines, the ``n_out`` lower ones then the ``n_out`` upper ones, and the upper
    one's weight; equal sizes: the lines themselves and no weight.

    They depend on the sizes only, so they are made once per sizes, device and dtype, not
    at every step: on a GPU that saves a dozen kernel launches per axis. Callers must not
    change them in place. (Made outside inference mode, so that a first call under
    ``torch.inference_mode`` does not leave inference tensors for training steps.)
    """
    with torch.inference_mode(False):
        if n_in == n_out:
            return torch.arange(n_out, device=device), None
        src = (torch.arange(n_out, device=device, dtype=dtype) + 0.5) * (n_in / n_out) - 0.5
        src = src.clamp_min(0)
        lo = src.long().clamp_max(n_in - 1)
        hi = (lo + 1).clamp_max(n_in - 1)
        return torch.cat([lo, hi]), src - lo.to(dtype)


def flatten_pixels(x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """``(B, C, h, w)`` -> ``(B * h * w, C)``, pixels in row-major order per image, in
    ``dtype`` (default: ``x``'s own); a cast and the reordering are one copy."""
    if dtype is not None and dtype != x.dtype:  # cast into channels-last: then a view
        x = x.to(dtype, memory_format=torch.channels_last)
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


PREDICTION_BLOCK = 1 << 19
"""Logit elements per block in :func:`prediction_confidence` (2 MiB of float32)."""

BLOCKED_PREDICTION_ON: tuple[str, ...] = ("cpu",)
"""Device types where :func:`prediction_confidence` works through blocks of one image's
pixels; elsewhere (a GPU: fast native reductions, a caching allocator) it calls ``argmax``
and ``softmax``."""


def prediction_confidence(logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Argmax class and softmax probability of ``target``, per pixel, from ``(B, K, h, w)`` logits.

    Equal to ``logits.argmax(1)`` (first index on ties) and
    ``logits.softmax(1).gather(1, target[:, None])[:, 0]``, but computed over blocks of one
    image's pixels in two reused buffers. On the CPU the two stock calls reduce across the
    strided class axis in slow kernels and allocate a full ``(B, K, h, w)`` result each,
    which costs more than the prototype cross-entropy itself at K = 150 (see
    ``benchmarks/RESULTS.md``).

    Args:
        logits: ``(B, K, h, w)`` floating logits.
        target: ``(B, h, w)`` int64 classes in ``[0, K)``.

    Returns:
        ``(pred, prob)``: ``(B, h, w)`` int64 and ``(B, h, w)`` in the dtype of ``logits``.

    Example:
        >>> import torch
        >>> z = torch.tensor([[[[0.0]], [[2.0]], [[2.0]]]])  # (1, 3, 1, 1); a tie
        >>> pred, prob = prediction_confidence(z, torch.tensor([[[0]]]))
        >>> pred.tolist(), round(prob.item(), 4)
        ([[[1]]], 0.0634)
    """
    b, k, h, w = logits.shape
    n = h * w
    if logits.device.type not in BLOCKED_PREDICTION_ON:  # fast native reductions
        pred = logits.argmax(1)
        prob = logits.softmax(1).gather(1, target[:, None])[:, 0]
        return pred, prob
    flat = logits.reshape(b, k, n)
    goal = target.reshape(b, 1, n)
    step = max(1, min(n, PREDICTION_BLOCK // max(k, 1)))
    pred = torch.empty(b, n, dtype=torch.int64)
    prob = logits.new_empty(b, n)
    exps = logits.new_empty(k * step)
    # the first arg-max is the largest of (K - index) over the classes that reach the maximum
    rank_dtype = torch.int16 if k < 2**15 else torch.int32
    rank = torch.arange(k, 0, -1, dtype=rank_dtype).unsqueeze(1)
    ranks = torch.empty(k * step, dtype=rank_dtype)
    for i in range(b):
        for start in range(0, n, step):
            part = slice(start, min(start + step, n))
            z = flat[i, :, part]
            width = z.shape[1]
            e, r = exps[: k * width].view(k, width), ranks[: k * width].view(k, width)
            peak = z.amax(0)
            torch.sub(z, peak, out=e).exp_()
            torch.div(e.gather(0, goal[i, :, part]).squeeze(0), e.sum(0), out=prob[i, part])
            torch.eq(z, peak, out=r)
            torch.sub(k, r.mul_(rank).amax(0), out=pred[i, part])
    # a NaN logit matches no maximum; keep the index a class all the same
    return pred.clamp_max_(k - 1).view(b, h, w), prob.view(b, h, w)


def pixel_sets(labels: Tensor, pred: Tensor, num_classes: int, ignore_index: int) -> PixelSets:
    """Split pixels into valid / TP / misclassified sets.

    Args:
        labels: ``(B, h, w)`` integer labels at the resolution of ``pred``.
        pred: ``(B, h, w)`` predicted classes.
        num_classes: ``K``; used as the spare bin for ignored pixels.
        ignore_index: label value that marks unlabelled pixels.

    Returns:
        A :class:`PixelSets` over the flattened ``N = B * h * w`` pixels.
    """
    batch = labels.shape[0]
    flat_labels = labels.reshape(-1)
    flat_pred = pred.reshape(-1)
    valid = flat_labels != ignore_index
    label = torch.where(valid, flat_labels, num_classes)
    hits = flat_pred == label
    image = torch.arange(batch, device=labels.device).repeat_interleave(labels[0].numel())
    return PixelSets(label, flat_pred, image, valid, valid & hits, valid & ~hits)


def segment_sum(values: Tensor, index: Tensor, num_segments: int) -> tuple[Tensor, Tensor]:
    """Sum rows of ``values`` into ``num_segments`` bins; ``index == num_segments`` drops a row.

    Differentiable in ``values`` (the backward pass is a gather). Costs one pass over
    ``values``: no one-hot matrix is formed. On the CPU the rows are summed bin by bin in
    index order (a stable sort of the indices, then ``F.embedding_bag``), which reads each
    row once and runs vectorised, about twice as fast as the element-wise scatter of
    ``index_add``; the sums are the same, row for row in the same order.

    Args:
        values: ``(N, D)`` rows.
        index: ``(N,)`` int64 bin of each row, in ``[0, num_segments]``.
        num_segments: number of real bins ``S``.

    Returns:
        ``(sums, counts)`` of shapes ``(S, D)`` and ``(S,)`` (counts are int64).

    Example:
        >>> import torch
        >>> sums, counts = segment_sum(torch.eye(3), torch.tensor([1, 1, 2]), 2)
        >>> sums.tolist(), counts.tolist()
        ([[0.0, 0.0, 0.0], [1.0, 1.0, 0.0]], [0, 2])
    """
    counts = count_bins(index, num_segments + 1)[:num_segments]
    if values.device.type not in SORTED_SUMS_ON:
        sums = values.new_zeros(num_segments + 1, values.shape[1]).index_add(0, index, values)
        return sums[:num_segments], counts
    kept = int(counts.sum())  # the rows of real bins come first in index order
    order = torch.argsort(index, stable=True)[:kept]
    starts = counts.cumsum(0) - counts
    return F.embedding_bag(order, values, starts, mode="sum"), counts


SORTED_SUMS_ON: tuple[str, ...] = ("cpu",)
"""Device types where :func:`segment_sum` sorts the rows by bin (``embedding_bag``); elsewhere
it scatters them (``index_add``), which needs no host synchronisation."""


COMPACT_ON: tuple[str, ...] = ("cpu",)
"""Device types where a pass over the misclassified pixels first gathers their indices
(``nonzero``, a host synchronisation on a GPU); elsewhere it runs over all pixels and
indexes the others to a spare bin."""

BINCOUNT_ON: tuple[str, ...] = ("cpu",)
"""Device types where :func:`count_bins` calls ``torch.bincount``."""


def count_bins(index: Tensor, size: int) -> Tensor:
    """``torch.bincount(index, minlength=size)`` for int64 indices known to lie in
    ``[0, size)``: ``(size,)`` int64 counts.

    On a GPU this is a scatter-add: ``bincount`` reads the indices' minimum and maximum back
    to the host, a synchronisation that stalls the step while the GPU drains its queue.

    Example:
        >>> import torch
        >>> count_bins(torch.tensor([0, 2, 2]), 4).tolist()
        [1, 0, 2, 0]
    """
    if index.device.type in BINCOUNT_ON:
        return torch.bincount(index, minlength=size)
    ones = torch.ones_like(index, dtype=torch.int64)
    return torch.zeros(size, dtype=torch.int64, device=index.device).index_add_(0, index, ones)


def confusion_matrix(labels: Tensor, pred: Tensor, num_classes: int, ignore_index: int) -> Tensor:
    """``(K, K)`` int64 confusion matrix, rows = ground truth, columns = prediction.

    Pixels whose label equals ``ignore_index`` are not counted.

    Example:
        >>> import torch
        >>> y = torch.tensor([[0, 1, 1, 255]])
        >>> p = torch.tensor([[0, 1, 0, 1]])
        >>> confusion_matrix(y, p, 2, 255).tolist()
        [[1, 0], [1, 1]]
    """
    valid = labels != ignore_index
    k = num_classes
    codes = torch.where(valid, labels.to(torch.int64) * k + pred.to(torch.int64), k * k)
    return count_bins(codes.reshape(-1), k * k + 1)[: k * k].reshape(k, k)


def class_stats(confusion: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-class ``(tp, fn, fp)`` counts from a confusion matrix (rows = ground truth).

    Example:
        >>> import torch
        >>> tp, fn, fp = class_stats(torch.tensor([[1, 0], [1, 1]]))
        >>> tp.tolist(), fn.tolist(), fp.tolist()
        ([1, 1], [0, 1], [1, 0])
    """
    tp = confusion.diagonal()
    return tp, confusion.sum(1) - tp, confusion.sum(0) - tp


def set_counts(sets: PixelSets, num_classes: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-class ``(tp, fn, fp)`` pixel counts of :class:`PixelSets` (ignored pixels skipped).

    Example:
        >>> import torch
        >>> s = pixel_sets(torch.tensor([[0, 1, 255]]), torch.tensor([[0, 0, 1]]), 2, 255)
        >>> [t.tolist() for t in set_counts(s, 2)]
        [[1, 0], [0, 1], [1, 0]]
    """
    k = num_classes
    codes = torch.where(sets.valid, sets.label * k + sets.pred, k * k)
    confusion = count_bins(codes, k * k + 1)[: k * k].reshape(k, k)
    return class_stats(confusion)
