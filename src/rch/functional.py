"""The RCH loss as one stateless function: check inputs -> pixel sets -> EMA step -> margin loss.

See ``RCH_SPEC.md`` sections 3 (``formulation="paper"``) and 4 (``formulation="official"``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from ._fused import PaperPlan, fused_paper_loss
from ._validation import (
    DeferredChecks,
    PendingCheck,
    check_finite,
    check_labels,
    check_option,
    check_positive,
    check_probability,
    check_tensor,
    finite_flag,
    label_outliers,
    run_checks,
)
from .distributed import all_reduce_sum
from .loss import Formulation, calibration_terms, margin_logits, unit
from .prototypes import ema_update
from .stats import (
    PixelSets,
    flatten_pixels,
    pixel_sets,
    prediction_confidence,
    resize_labels,
    resize_logits,
    segment_sum,
    set_counts,
    work_dtype,
)

__all__ = ["DeferredChecks", "PrototypeSource", "RCHLossOutput", "Validate", "rch_loss"]

PrototypeSource = Literal["tp", "gt"]
Validate = bool | Literal["deferred"]
"""``validate`` of :func:`rch_loss`: check values now (``True``), not at all (``False``),
or compute the checks and leave them for the caller to read later (``"deferred"``)."""
VALIDATE_MODES: tuple[Validate, ...] = (True, False, "deferred")


def check_validate(name: str, value: object) -> None:
    """Raise unless ``value`` is one of :data:`VALIDATE_MODES` (``1`` is not ``True`` here)."""
    if not isinstance(value, (bool, str)):
        raise TypeError(f"{name} must be True, False or 'deferred'; got {value!r}.")
    check_option(name, value, VALIDATE_MODES)


FORMULATIONS: tuple[Formulation, ...] = ("paper", "official")
PROTOTYPE_SOURCES: tuple[PrototypeSource, ...] = ("tp", "gt")


@dataclass(frozen=True)
class RCHLossOutput:
    """What :func:`rch_loss` returns.

    Attributes:
        loss: scalar, ``loss_fn + loss_fp`` (not yet weighted by lambda).
        loss_fn: scalar cross-entropy of the logits with the FN-compensation margin.
        loss_fp: scalar cross-entropy of the logits with the FP-penalty margin.
        prototypes: ``(K, D)`` prototypes after this step's EMA update; the rows of updated
            classes carry the gradient of the current batch's mean embedding.
        updated: ``(K,)`` bool, classes whose prototype moved this step.
        tp_count: ``(K,)`` int64 true-positive pixels of this process's batch, counted at the
            embedding resolution; ``fn_count`` and ``fp_count`` likewise.
        checks: with ``validate="deferred"``, the value checks, not yet read: keep state
            from this output only where ``checks.ok`` (on the device), and call
            ``checks.raise_if_failed()`` before using its results (e.g. before the optimiser
            step). ``None`` otherwise.
    """

    loss: Tensor
    loss_fn: Tensor
    loss_fp: Tensor
    prototypes: Tensor
    updated: Tensor
    tp_count: Tensor
    fn_count: Tensor
    fp_count: Tensor
    checks: DeferredChecks | None = None


@dataclass(frozen=True)
class _Step:
    """The options of one call, checked and resolved (``scale`` is ``alpha / tau``)."""

    formulation: Formulation
    tau: float
    momentum: float | Tensor
    scale: float
    ignore_index: int
    fn_term: bool
    fp_term: bool
    source: PrototypeSource
    update: bool
    group: dist.ProcessGroup | None


def _validate(
    embeddings: Tensor,
    seg_logits: Tensor,
    labels: Tensor,
    prototypes: Tensor,
    formulation: str,
    tau: float,
    momentum: float | Tensor,
    alpha: float | None,
    ignore_index: int,
    prototype_source: str,
    loss_mask: Tensor | None,
    validate: bool,
) -> tuple[list[PendingCheck], Tensor | None]:
    """Check types, shapes and options now; return the value checks (when ``validate``),
    to be read back together with the loss's own (see :func:`run_checks`), and the mask of
    labels out of range (when ``validate``; the loss treats them as ignored until then)."""
    check_option("formulation", formulation, FORMULATIONS)
    check_option("prototype_source", prototype_source, PROTOTYPE_SOURCES)
    check_positive("tau", tau)
    if alpha is not None:
        check_positive("alpha", alpha)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int; got {type(ignore_index).__name__}.")
    check_tensor("embeddings", embeddings, ndim=4, layout="(B, D, h, w)", floating=True)
    check_tensor("seg_logits", seg_logits, ndim=4, layout="(B, K, h', w')", floating=True)
    check_tensor("labels", labels, ndim=3, layout="(B, H, W)", floating=False)
    check_tensor("prototypes", prototypes, ndim=2, layout="(K, D)", floating=True)
    b, d = embeddings.shape[:2]
    k = prototypes.shape[0]
    if seg_logits.shape[0] != b or labels.shape[0] != b:
        raise ValueError(
            f"batch sizes differ: embeddings {b}, seg_logits {seg_logits.shape[0]}, "
            f"labels {labels.shape[0]}."
        )
    if seg_logits.shape[1] != k:
        raise ValueError(
            f"seg_logits has {seg_logits.shape[1]} classes (shape {tuple(seg_logits.shape)}) "
            f"but prototypes has {k} (shape {tuple(prototypes.shape)}); they must match."
        )
    if prototypes.shape[1] != d:
        raise ValueError(
            f"prototypes have width {prototypes.shape[1]} but embeddings have D={d} channels "
            f"(shape {tuple(embeddings.shape)})."
        )
    if isinstance(momentum, Tensor) and momentum.shape != (k,):
        raise ValueError(f"momentum tensor must have shape ({k},); got {tuple(momentum.shape)}.")
    checks: list[PendingCheck] = []
    if not isinstance(momentum, Tensor):
        check_probability("momentum", momentum)
    elif not momentum.is_floating_point():
        raise TypeError(f"momentum must be a float or a floating tensor; got {momentum.dtype}.")
    elif validate:  # a tensor's values: read back with the other value checks
        flag = ((momentum >= 0) & (momentum < 1)).all()
        full = partial(check_probability, "momentum", momentum)
        checks.append(PendingCheck(flag, full, "momentum does not lie in [0, 1)"))
    if loss_mask is not None:
        check_tensor("loss_mask", loss_mask, ndim=3, layout="(B, H, W)", floating=None)
        if loss_mask.dtype != torch.bool or loss_mask.shape != labels.shape:
            raise ValueError(
                f"loss_mask must be a bool tensor of the labels' shape {tuple(labels.shape)}; "
                f"got {loss_mask.dtype} of shape {tuple(loss_mask.shape)}."
            )
    if not validate:
        return checks, None
    outliers = label_outliers(labels, k, ignore_index)
    # embeddings: checked in _rch_loss, from the row norms that the loss computes anyway
    outside = f"labels hold values outside [0, {k}) that are not ignore_index={ignore_index}"
    checks += [
        PendingCheck(
            ~outliers.any(), lambda: check_labels("labels", labels, k, ignore_index), outside
        ),
        PendingCheck(
            finite_flag(seg_logits),
            lambda: check_finite("seg_logits", seg_logits),
            "seg_logits hold NaN or Inf",
        ),
        PendingCheck(
            finite_flag(prototypes),
            lambda: check_finite("prototypes", prototypes),
            "prototypes hold NaN or Inf",
        ),
    ]
    return checks, outliers


def _mean_ce_at_labels(
    logits: Tensor, shape: tuple[int, int, int], labels: Tensor, ignore: int
) -> Tensor:
    """Reference-code loss: resize the logit map to the label resolution, then pixel-mean CE."""
    b, h, w = shape
    maps = logits.reshape(b, h, w, -1).permute(0, 3, 1, 2)
    maps = resize_logits(maps, (labels.shape[1], labels.shape[2]))
    # the pixel mean as sum / count: 0 (not NaN) when every pixel is ignored, no host sync
    count = (labels != ignore).sum().clamp_min(1)
    return F.cross_entropy(maps, labels, ignore_index=ignore, reduction="sum") / count


def _update_prototypes(
    rows: Tensor,
    sets: PixelSets,
    prototypes: Tensor,
    members: Tensor,
    momentum: float | Tensor,
    group: dist.ProcessGroup | None,
) -> tuple[Tensor, Tensor]:
    """Per-class sums over the member pixels, summed over processes, then one EMA."""
    k, d = prototypes.shape
    index = torch.where(members, sets.label, k)
    sums, counts = segment_sum(rows, index, k)
    pooled = all_reduce_sum(torch.cat([sums, counts.unsqueeze(1).to(sums.dtype)], 1), group)
    counts = pooled[:, d].detach().round().to(torch.int64)
    return ema_update(prototypes, pooled[:, :d], counts, momentum), counts > 0


def rch_loss(
    embeddings: Tensor,
    seg_logits: Tensor,
    labels: Tensor,
    prototypes: Tensor,
    *,
    formulation: Formulation = "paper",
    tau: float = 0.5,
    momentum: float | Tensor = 0.9,
    alpha: float | None = None,
    ignore_index: int = 255,
    fn_term: bool = True,
    fp_term: bool = True,
    prototype_source: PrototypeSource = "tp",
    update_prototypes: bool = True,
    process_group: dist.ProcessGroup | None = None,
    loss_mask: Tensor | None = None,
    validate: Validate = True,
) -> RCHLossOutput:
    """Representation-calibration loss of one training step (paper eq. 3-8).

    Labels are resized to the embedding resolution by nearest neighbour and the (detached)
    segmentation logits bilinearly; pixels are split into TP / FN / FP per class; the
    prototypes take one EMA step from this batch's TP embeddings (summed over all processes
    when torch.distributed is initialised); the loss is the sum of two prototype
    cross-entropies whose true-class logit is lowered by ``(1 - p) * phi`` (FN compensation)
    and ``(1 - p) * psi`` (FP penalty).

    Args:
        embeddings: ``(B, D, h, w)`` RCH embeddings (the projected features).
        seg_logits: ``(B, K, h', w')`` segmentation logits; used detached, only for the
            prediction and the true-class probability ``p``.
        labels: ``(B, H, W)`` integer labels; ``ignore_index`` marks unlabelled pixels.
        prototypes: ``(K, D)`` class prototypes before this step.
        formulation: ``"paper"`` (spec section 3: per-image FN/FP means of unit embeddings,
            loss at the embedding resolution) or ``"official"`` (section 4: the authors'
            code: batch-pooled raw FN/FP centres gated per image, margin scaled by
            ``alpha / tau``, loss at the label resolution).
        tau: temperature of the prototype softmax.
        momentum: EMA momentum ``rho``; a float or a ``(K,)`` tensor of per-class values.
        alpha: margin scale of the official formulation (config key ``alp``); ``None``
            means ``alpha = tau``. Must be ``None`` or equal to ``tau`` for ``"paper"``.
        ignore_index: label value of unlabelled pixels.
        fn_term: add the FN-compensation margin (paper Table 1).
        fp_term: add the FP-penalty margin (paper Table 1).
        prototype_source: ``"tp"`` (paper) or ``"gt"`` (all labelled pixels, Table 1).
        update_prototypes: take the EMA step; ``False`` uses ``prototypes`` as given (eval
            mode, or learned prototypes that the loss trains).
        process_group: group for the prototype all-reduce; ``None`` is the default group.
        loss_mask: ``(B, H, W)`` bool at the label resolution: the pixels whose metric loss
            counts, e.g. the pixels the main loss's OHEM keeps (the reference code's recipe,
            spec section 4). The pixel sets, the prototypes and the FN/FP statistics still
            use every labelled pixel. ``None``: the loss counts every labelled pixel.
        validate: check the values too (labels in range, no NaN/Inf in the inputs, a
            momentum tensor in ``[0, 1)``). The checks are read back from the device together,
            once per call, after the loss's work has been queued; on a GPU that
            synchronisation stalls the step, so a tuned training loop may turn them off (like
            torchmetrics' ``validate_args``). ``"deferred"``: the checks are computed but
            not read; the output's ``checks`` reads them later without stalling the GPU
            (:class:`DeferredChecks`; a failure then names the input, not the
            values). Shapes, dtypes and options are always checked.

    Returns:
        An :class:`RCHLossOutput`.

    Raises:
        TypeError: an argument has the wrong type or dtype.
        ValueError: shapes disagree, a label is out of range, an input holds NaN/Inf (with
            ``validate=True``), or an option is unknown.

    Shape:
        - embeddings: ``(B, D, h, w)``; seg_logits: ``(B, K, h', w')``; labels:
          ``(B, H, W)``; prototypes: ``(K, D)``.
        - Output: scalar losses; prototypes ``(K, D)``; counts ``(K,)``.

    Example:
        >>> import torch
        >>> from rch.functional import rch_loss
        >>> g = torch.Generator().manual_seed(0)
        >>> emb = torch.randn(2, 8, 4, 4, generator=g, requires_grad=True)
        >>> logits = torch.randn(2, 3, 4, 4, generator=g)
        >>> labels = torch.randint(0, 3, (2, 8, 8), generator=g)
        >>> out = rch_loss(emb, logits, labels, torch.randn(3, 8, generator=g))
        >>> out.loss.backward()
        >>> round(out.loss.item(), 4), out.prototypes.shape, bool(emb.grad.abs().sum() > 0)
        (3.53, torch.Size([3, 8]), True)
    """
    check_validate("validate", validate)
    checks, outliers = _validate(
        embeddings,
        seg_logits,
        labels,
        prototypes,
        formulation,
        tau,
        momentum,
        alpha,
        ignore_index,
        prototype_source,
        loss_mask,
        validate is not False,
    )
    if formulation == "paper" and alpha is not None and alpha != tau:
        raise ValueError(
            f"alpha={alpha} only applies to formulation='official'; the paper's margin scale "
            f"is fixed (alpha = tau = {tau}). Leave alpha=None."
        )
    dtype = work_dtype(embeddings)
    labels = labels.to(torch.int64)
    if outliers is not None:  # ignored until the checks are read back: see _rch_loss
        labels = labels.masked_fill(outliers, ignore_index)
    with torch.autocast(device_type=embeddings.device.type, enabled=False):
        step = _Step(
            formulation=formulation,
            tau=tau,
            momentum=momentum.to(embeddings.device) if isinstance(momentum, Tensor) else momentum,
            scale=1.0 if alpha is None else alpha / tau,
            ignore_index=ignore_index,
            fn_term=fn_term,
            fp_term=fp_term,
            source=prototype_source,
            update=update_prototypes,
            group=process_group,
        )
        return _rch_loss(
            embeddings,  # cast by the flattening copy: see flatten_pixels
            seg_logits.detach(),  # cast after the resize: see resize_logits
            labels,
            prototypes.to(dtype),
            step,
            loss_mask,
            checks if validate is not False else None,
            dtype,
            defer=validate == "deferred",
        )


def _rch_loss(
    embeddings: Tensor,
    seg_logits: Tensor,
    labels: Tensor,
    prototypes: Tensor,
    step: _Step,
    loss_mask: Tensor | None,
    checks: list[PendingCheck] | None,
    dtype: torch.dtype,
    defer: bool = False,
) -> RCHLossOutput:
    """The loss; ``checks``: the value checks of :func:`_validate` (``None``: no value
    checks), read back in one go with the embeddings' once the loss's work is queued, or,
    with ``defer``, returned unread as the output's ``checks``.

    On a GPU that read waits for the device to catch up. Made first, it would leave the GPU
    idle while the host launches the loss's many small kernels one by one; made last, they
    are launched while the GPU still runs the network's forward pass. Until then, labels out
    of range count as ignored (:func:`rch_loss` has set them to ``ignore_index``), so that
    nothing indexes out of bounds (on a GPU, a device-side assert that ends the process); NaN
    and Inf merely propagate. A failed check raises from this call as before, and nothing it
    computed is returned.
    """
    b, _, h, w = embeddings.shape
    k = prototypes.shape[0]
    if checks is not None:
        full = partial(check_finite, "embeddings", embeddings)
        summary = "embeddings hold NaN or Inf"
        checks = [*checks, PendingCheck(finite_flag(embeddings), full, summary)]
    small_labels = resize_labels(labels, (h, w))
    logits = resize_logits(seg_logits, (h, w), dtype)
    # any class stands in for an ignored pixel's target: its margin and loss are zero
    target = torch.where(small_labels == step.ignore_index, 0, small_labels)
    pred, p_true = prediction_confidence(logits, target)
    sets = pixel_sets(small_labels, pred, k, step.ignore_index)
    target, p_true = target.reshape(-1), p_true.reshape(-1)
    # the pixels whose embeddings feed the EMA: TP (paper) or all labelled ("gt"); none in eval
    members = None if not step.update else sets.correct if step.source == "tp" else sets.valid
    if step.formulation == "paper":
        anchors = sets.valid
        if loss_mask is not None:
            anchors = anchors & resize_labels(loss_mask, (h, w)).reshape(-1)
        plan = PaperPlan(
            sets=sets,
            anchors=anchors,
            weight=(1.0 - p_true) * anchors,
            target=target,
            num_images=b,
            tau=step.tau,
            momentum=step.momentum,
            fn_term=step.fn_term,
            fp_term=step.fp_term,
            group=step.group,
            members=members,
            dtype=dtype,
        )
        loss_fn, loss_fp, prototypes, updated = fused_paper_loss(embeddings, prototypes, plan)
    else:
        if loss_mask is not None:  # the cross-entropy's pixels; the statistics keep them all
            labels = torch.where(loss_mask, labels, step.ignore_index)
        loss_fn, loss_fp, prototypes, updated = _official_loss(
            flatten_pixels(embeddings, dtype),
            sets,
            labels,
            prototypes,
            p_true,
            target,
            members,
            (b, h, w),
            step,
        )
    tp, fn, fp = set_counts(sets, k)
    loss = loss_fn + loss_fp
    deferred = None
    if checks is not None and defer:
        deferred = DeferredChecks(checks)
    elif checks is not None:
        run_checks(checks)
    return RCHLossOutput(loss, loss_fn, loss_fp, prototypes, updated, tp, fn, fp, deferred)


def _official_loss(
    rows: Tensor,
    sets: PixelSets,
    labels: Tensor,
    prototypes: Tensor,
    p_true: Tensor,
    target: Tensor,
    members: Tensor | None,
    shape: tuple[int, int, int],
    step: _Step,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Spec section 4, composed from the pure functions and differentiated by autograd."""
    k = prototypes.shape[0]
    units = unit(rows)
    if members is not None:
        prototypes, updated = _update_prototypes(
            rows, sets, prototypes, members, step.momentum, step.group
        )
    else:
        updated = torch.zeros(k, dtype=torch.bool, device=prototypes.device)
    phi, psi = calibration_terms(
        rows,
        units,
        sets,
        num_images=shape[0],
        num_classes=k,
        formulation="official",
        fn_term=step.fn_term,
        fp_term=step.fp_term,
    )
    cosines = units @ unit(prototypes).T
    weight = (1.0 - p_true) * step.scale
    losses: list[Tensor] = []
    for term in (phi, psi):
        if term is None and losses and not step.fn_term:  # both terms off: the same logits
            losses.append(losses[0])
            continue
        z = margin_logits(cosines, target, None if term is None else weight * term, step.tau)
        losses.append(_mean_ce_at_labels(z, shape, labels, step.ignore_index))
    return losses[0], losses[1], prototypes, updated
