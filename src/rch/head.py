"""RCHHead: the training-only module that owns the projection and the prototype state."""

from __future__ import annotations

import weakref
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ._validation import (
    DeferredChecks,
    check_finite,
    check_option,
    check_positive,
    check_probability,
    check_tensor,
)
from .diagnostics import CalibrationStats, calibration_stats
from .errors import RCHError
from .functional import (
    FORMULATIONS,
    PROTOTYPE_SOURCES,
    PrototypeSource,
    RCHLossOutput,
    Validate,
    check_validate,
    rch_loss,
)
from .loss import Formulation

__all__ = ["PrototypeInit", "PrototypeMode", "RCHHead", "RCHHeadOutput"]

PrototypeMode = Literal["ema", "learned"]
PrototypeInit = Literal["randn", "first"]


@dataclass(frozen=True)
class RCHHeadOutput:
    """What :class:`RCHHead` returns.

    Attributes:
        loss: scalar to add to the segmentation loss: ``loss_weight * (loss_fn + loss_fp)``;
            an exact zero (still attached to the graph) while warming up.
        loss_fn: unweighted FN-compensation cross-entropy (0 while warming up).
        loss_fp: unweighted FP-penalty cross-entropy (0 while warming up).
        active: ``False`` during the warm-up steps.
        details: the full :class:`~rch.functional.RCHLossOutput`, ``None`` while warming up.
        stats: per-class :class:`~rch.diagnostics.CalibrationStats` of this batch when the
            head's ``record_stats`` is set (``None`` otherwise and while warming up).
    """

    loss: Tensor
    loss_fn: Tensor
    loss_fp: Tensor
    active: bool
    details: RCHLossOutput | None
    stats: CalibrationStats | None = None


class RCHHead(nn.Module):
    """Representation Calibration Head (training only).

    Projects features ``F`` with a 1x1 convolution and BatchNorm (no activation) to
    embeddings, keeps one prototype per class and returns the weighted RCH loss. All state
    (prototypes, step counter, per-class "initialised" flags) is in the ``state_dict``.

    Args:
        in_channels: channels of the feature ``F``.
        num_classes: ``K``.
        embed_dim: embedding width ``D``.
        formulation: ``"paper"`` or ``"official"`` (see :func:`rch.functional.rch_loss`).
        tau: temperature.
        momentum: EMA momentum ``rho``.
        alpha: margin scale of the official formulation (``None``: ``alpha = tau``).
        loss_weight: ``lambda``, the weight of the RCH loss.
        ignore_index: label value of unlabelled pixels.
        fn_term: use the FN-compensation margin.
        fp_term: use the FP-penalty margin.
        prototype_source: ``"tp"`` or ``"gt"`` pixels feed the EMA.
        prototypes: ``"ema"`` (paper) or ``"learned"`` (an ``nn.Parameter`` trained by the
            loss; paper Table 1, row "learned").
        prototype_init: ``"randn"`` (standard normal, as the reference code) or ``"first"``
            (a class's first batch mean replaces its prototype outright).
        warmup_iters: training steps with RCH off at the start (the loss is 0).
        process_group: group over which prototype statistics are summed.
        validate: check values each step (labels in range, no NaN/Inf in features, logits,
            prototypes); see :func:`rch.functional.rch_loss`. On a GPU they cost one host
            synchronisation a step (the loss's checks, read back together). A non-finite
            feature makes non-finite embeddings; when that check fails, the features are
            checked too, so that the error names them. ``"deferred"``: the checks are
            computed but read only by :meth:`check` (no synchronisation: call it where the
            training loop reads its losses anyway, before the optimiser step), or at the
            latest by the next forward call; a step whose checks fail leaves the prototypes
            as they were. ``False``: no checks, for speed once a training setup is trusted.

    Shape:
        - features: ``(B, C_in, h, w)``; seg_logits: ``(B, K, h', w')``; labels: ``(B, H, W)``.

    Example:
        >>> import torch
        >>> _ = torch.manual_seed(0)
        >>> head = RCHHead(in_channels=16, num_classes=3, embed_dim=8)
        >>> feats, logits = torch.randn(2, 16, 4, 4), torch.randn(2, 3, 4, 4)
        >>> out = head(feats, logits, torch.randint(0, 3, (2, 8, 8)))
        >>> out.loss.shape, int(head.step), out.active
        (torch.Size([]), 1, True)
    """

    prototypes: Tensor
    step: Tensor
    initialized: Tensor
    _previous_prototypes: Tensor | None

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        embed_dim: int = 256,
        *,
        formulation: Formulation = "paper",
        tau: float = 0.5,
        momentum: float = 0.9,
        alpha: float | None = None,
        loss_weight: float = 0.1,
        ignore_index: int = 255,
        fn_term: bool = True,
        fp_term: bool = True,
        prototype_source: PrototypeSource = "tp",
        prototypes: PrototypeMode = "ema",
        prototype_init: PrototypeInit = "randn",
        warmup_iters: int = 0,
        process_group: dist.ProcessGroup | None = None,
        validate: Validate = True,
    ) -> None:
        super().__init__()
        for name, value in (
            ("in_channels", in_channels),
            ("num_classes", num_classes),
            ("embed_dim", embed_dim),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int; got {value!r}.")
        check_option("formulation", formulation, FORMULATIONS)
        check_option("prototype_source", prototype_source, PROTOTYPE_SOURCES)
        check_option("prototypes", prototypes, ("ema", "learned"))
        check_option("prototype_init", prototype_init, ("randn", "first"))
        check_validate("validate", validate)
        check_positive("tau", tau)
        check_probability("momentum", momentum)
        if alpha is not None:
            check_positive("alpha", alpha)
        if (
            isinstance(loss_weight, bool)
            or not isinstance(loss_weight, (int, float))
            or loss_weight < 0
        ):
            raise ValueError(f"loss_weight must be a number >= 0; got {loss_weight!r}.")
        if isinstance(warmup_iters, bool) or not isinstance(warmup_iters, int) or warmup_iters < 0:
            raise ValueError(f"warmup_iters must be an int >= 0; got {warmup_iters!r}.")
        if prototypes == "learned" and prototype_init == "first":
            raise ValueError("prototype_init='first' needs prototypes='ema'.")
        self.in_channels, self.num_classes, self.embed_dim = in_channels, num_classes, embed_dim
        self.formulation, self.tau, self.momentum, self.alpha = formulation, tau, momentum, alpha
        self.loss_weight, self.ignore_index = float(loss_weight), ignore_index
        self.fn_term, self.fp_term = fn_term, fp_term
        self.prototype_source, self.prototype_mode = prototype_source, prototypes
        self.prototype_init, self.warmup_iters = prototype_init, warmup_iters
        self.process_group, self.validate = process_group, validate
        # (features, embeddings) of the last embed(), weakly held: a failed value check of
        # those embeddings then looks at the features, to name a non-finite one
        self._embedded: tuple[weakref.ref[Tensor], weakref.ref[Tensor]] | None = None
        # validate="deferred": the value checks of the steps since the last check()
        self._pending: list[DeferredChecks] = []
        self.record_stats = False
        """Set to ``True`` to get per-class statistics with the next forward's output
        (costs about one more pass over the embeddings; a trainer sets it on logging steps)."""
        self.projection = nn.Sequential(
            nn.Conv2d(in_channels, embed_dim, kernel_size=1, bias=False),
            nn.BatchNorm2d(embed_dim),
        )
        init = torch.randn(num_classes, embed_dim)
        if prototype_init == "first":
            init.zero_()
        if prototypes == "learned":
            self.prototypes = nn.Parameter(init)
        else:
            self.register_buffer("prototypes", init)
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))
        # the step counter as this head last read or advanced it: (id, version, value) of the
        # buffer, so that a warm-up need not read the device every step (see _step_count)
        self._step_seen: tuple[int, int, int] | None = None
        # learned prototypes at the previous training step: the optimizer moves them between
        # forwards, so that is what their ``stats.drift`` measures (not saved in checkpoints)
        self.register_buffer("_previous_prototypes", None, persistent=False)
        self.register_buffer(
            "initialized", torch.full((num_classes,), prototype_init == "randn", dtype=torch.bool)
        )

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, embed_dim={self.embed_dim}, "
            f"formulation={self.formulation!r}, tau={self.tau}, momentum={self.momentum}, "
            f"loss_weight={self.loss_weight}, prototypes={self.prototype_mode!r}, "
            f"warmup_iters={self.warmup_iters}"
        )

    @property
    def warming_up(self) -> bool:
        """True while the step counter is below ``warmup_iters``."""
        # without a warm-up, no read of the (device) step counter: no host synchronisation
        return self.warmup_iters > 0 and self._step_count() < self.warmup_iters

    def _known_step(self) -> int | None:
        """The step counter's value if this head knows it without reading the buffer: the
        buffer is the one it last read or advanced, unchanged since (its version counter
        moves with every in-place change, ``load_state_dict`` included)."""
        seen, step = self._step_seen, self.step
        if seen is not None and seen[0] == id(step) and seen[1] == step._version:
            return seen[2]
        return None

    def _step_count(self) -> int:
        """The step counter; read from the device (on a GPU, a synchronisation) only when
        this head does not know it, e.g. after loading a checkpoint, not at every step."""
        known = self._known_step()
        if known is None:
            known = int(self.step)
            self._step_seen = (id(self.step), self.step._version, known)
        return known

    def _advance(self) -> None:
        known = self._known_step()
        self.step += 1
        if known is not None:
            self._step_seen = (id(self.step), self.step._version, known + 1)

    def embed(self, features: Tensor) -> Tensor:
        """Project ``(B, C_in, h, w)`` features to ``(B, D, h, w)`` embeddings."""
        check_tensor("features", features, ndim=4, layout="(B, C_in, h, w)", floating=True)
        if features.shape[1] != self.in_channels:
            raise ValueError(
                f"features have {features.shape[1]} channels (shape {tuple(features.shape)}) "
                f"but this RCHHead was built with in_channels={self.in_channels}."
            )
        given = features
        weight: Tensor = self.projection[0].weight  # type: ignore[assignment]
        if features.dtype != weight.dtype and not torch.is_autocast_enabled(features.device.type):
            # e.g. a bf16 feature from an autocast forward, with the loss asked for outside it
            features = features.to(weight.dtype)
        out: Tensor = self.projection(features)
        if self.validate is True:  # no check (no host read) here: the loss checks them
            self._embedded = (weakref.ref(given), weakref.ref(out))
        return out

    def _check_embedded_features(self, embeddings: Tensor) -> None:
        """After a failed value check: if ``embeddings`` came from the last :meth:`embed`
        and its features are still alive, raise if they are not finite (else return)."""
        refs, self._embedded = self._embedded, None
        if refs is None or refs[1]() is not embeddings:
            return
        features = refs[0]()
        if features is not None:
            check_finite("features", features)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_embedded"] = None  # weak references do not pickle; they matter for one step
        state["_pending"] = []  # nor do CUDA events; a copy starts with nothing to check
        return state

    def check(self) -> None:
        """Read the value checks that ``validate="deferred"`` left pending (without waiting
        for the GPU's later work) and raise ``ValueError`` naming what failed; nothing to do
        in the other modes. A training loop calls it once a step, after the backward pass
        is launched and before the optimiser step; the next forward call does it otherwise.
        """
        pending, self._pending = self._pending, []
        for checks in pending:
            checks.raise_if_failed()

    def _momentum(self) -> float | Tensor:
        if self.prototype_init == "first":
            return torch.where(self.initialized, self.momentum, 0.0).to(self.prototypes.dtype)
        return self.momentum

    def forward(
        self,
        features: Tensor,
        seg_logits: Tensor,
        labels: Tensor,
        loss_mask: Tensor | None = None,
    ) -> RCHHeadOutput:
        """Embed ``features`` and return the weighted RCH loss; in training mode also update
        the prototypes and advance the step counter. ``loss_mask``: see
        :func:`rch.functional.rch_loss` (the pixels whose loss counts, e.g. OHEM's)."""
        return self.forward_embedded(self.embed(features), seg_logits, labels, loss_mask)

    def forward_embedded(
        self,
        embeddings: Tensor,
        seg_logits: Tensor,
        labels: Tensor,
        loss_mask: Tensor | None = None,
    ) -> RCHHeadOutput:
        """:meth:`forward` from embeddings already made by :meth:`embed` (``(B, D, h, w)``)."""
        self.check()  # a failure that the caller has not read yet is not passed over
        if self.training and self.warming_up:
            self._advance()
            zero = embeddings.sum() * 0.0
            return RCHHeadOutput(zero, zero.detach(), zero.detach(), False, None)
        if not self.training and not bool(self.initialized.any()):
            raise RCHError(
                "RCHHead has no prototype yet (prototype_init='first' and no training step "
                "has seen a true-positive pixel); train it before evaluating its loss."
            )
        update = self.training and self.prototype_mode == "ema"
        before = self.prototypes.detach().clone() if self.record_stats else None
        try:
            out = rch_loss(
                embeddings,
                seg_logits,
                labels,
                self.prototypes,
                formulation=self.formulation,
                tau=self.tau,
                momentum=self._momentum(),
                alpha=self.alpha,
                ignore_index=self.ignore_index,
                fn_term=self.fn_term,
                fp_term=self.fp_term,
                prototype_source=self.prototype_source,
                update_prototypes=update,
                process_group=self.process_group,
                loss_mask=loss_mask,
                validate=self.validate,
            )
        except ValueError as err:
            try:  # a non-finite feature is named as such, not as the embeddings it made
                self._check_embedded_features(embeddings)
            except ValueError as features_err:
                raise features_err from err
            raise
        self._embedded = None
        if out.checks is not None:
            self._pending.append(out.checks)
        if self.training:
            if update:
                with torch.no_grad():
                    moved, updated = out.prototypes.detach(), out.updated
                    if out.checks is not None:  # kept only if the checks pass: no host read
                        moved = torch.where(out.checks.ok, moved, self.prototypes)
                        updated = updated & out.checks.ok
                    self.prototypes.copy_(moved)
                    self.initialized |= updated
            self._advance()
        stats = None
        if before is not None:
            stats = calibration_stats(
                embeddings, seg_logits, labels, before, out.prototypes,
                formulation=self.formulation, ignore_index=self.ignore_index,
            )  # fmt: skip
        if self.prototype_mode == "learned":
            current = self.prototypes.detach()
            if stats is not None:
                previous = self._previous_prototypes
                drift = (
                    torch.linalg.vector_norm(current - previous, dim=1).to(stats.drift.dtype)
                    if previous is not None
                    else torch.zeros_like(stats.drift)
                )
                stats = replace(stats, drift=drift)
            if self.training:
                self._previous_prototypes = current.clone()
        return RCHHeadOutput(
            self.loss_weight * out.loss, out.loss_fn, out.loss_fp, True, out, stats
        )
