"""Checks shared by the public entry points; each raises a message that names the argument."""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

__all__ = [
    "DeferredChecks",
    "PendingCheck",
    "check_finite",
    "check_labels",
    "check_option",
    "check_positive",
    "check_probability",
    "check_tensor",
    "finite_flag",
    "label_outliers",
    "run_checks",
]


class PendingCheck(NamedTuple):
    """A value check not yet read back (see :func:`run_checks` and :class:`DeferredChecks`)."""

    flag: Tensor
    """0-dim bool tensor: true when the values pass."""
    full: Callable[[], None]
    """The full check: raises with a message that names what is wrong and where."""
    summary: str
    """What a failed flag says without looking closer, e.g. ``"seg_logits hold NaN or Inf"``."""


def _stacked_flags(checks: Sequence[PendingCheck]) -> Tensor:
    """The checks' flags as one ``(n,)`` bool tensor on the first flag's device: one read
    (or one copy) for all of them."""
    device = checks[0].flag.device
    return torch.stack([check.flag.to(device) for check in checks])


class DeferredChecks:
    """Value checks whose flags are left on their way to the host, read later without a wait.

    On a GPU reading a flag back at once is a synchronisation: the host waits until the GPU
    has run everything queued before it, and the GPU then idles while the host launches the
    next kernels. Here the flags are copied to the host without blocking (a pinned buffer, an
    event recorded after the copy), so a later :meth:`raise_if_failed` waits at most for the
    copy, not for the work queued since. ``ok`` stays on the device, for state that must not
    change when a check fails (``torch.where(ok, new, old)``: no read). A failure names the
    input from its flag only; the inputs themselves are not kept (they may be large and
    would be held through the backward pass), so it cannot say which values.

    Example:
        >>> import torch
        >>> x = torch.tensor([1.0, float("nan")])
        >>> checks = DeferredChecks([PendingCheck(finite_flag(x), lambda: None, "x holds NaN")])
        >>> bool(checks.ok)
        False
        >>> checks.raise_if_failed()
        Traceback (most recent call last):
        ...
        ValueError: value checks (validate='deferred') failed: x holds NaN. Rerun ...
    """

    def __init__(self, checks: Sequence[PendingCheck]) -> None:
        if not checks:
            raise ValueError("DeferredChecks needs at least one check.")
        with torch.no_grad():
            flags = _stacked_flags(checks)
            device = flags.device
            self.ok: Tensor = flags.all()
            """0-dim bool tensor on the checks' device: true when every check passes."""
        self._summaries = [check.summary for check in checks]
        self._event: Any = None
        if device.type == "cuda":  # pinned: a copy into pageable memory would block
            self._flags = torch.empty(flags.shape, dtype=flags.dtype, pin_memory=True)
            self._flags.copy_(flags, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record(torch.cuda.current_stream(device))  # the copy's stream
        else:  # the CPU computes in order; another device is read when asked (one wait)
            self._flags = flags

    def failures(self) -> list[str]:
        """The summaries of the checks that failed (empty: all passed); on a GPU waits only
        for the flags' own copy."""
        if self._event is not None:
            self._event.synchronize()
        passed = self._flags.cpu().tolist()
        return [summary for summary, ok in zip(self._summaries, passed, strict=True) if not ok]

    def raise_if_failed(self) -> None:
        """Raise ``ValueError`` naming every failed check; return if all passed."""
        failed = self.failures()
        if failed:
            raise ValueError(
                f"value checks (validate='deferred') failed: {'; '.join(failed)}. Rerun with "
                "validate=True (config rch.validate=true) for an error that shows the values."
            )


def check_option(name: str, value: Any, allowed: Collection[Any]) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        choices = ", ".join(repr(a) for a in allowed)
        raise ValueError(f"{name} must be one of {choices}; got {value!r}.")


def check_positive(name: str, value: float) -> None:
    """Raise unless ``value`` is a finite number greater than zero."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number; got {type(value).__name__}.")
    if not value > 0 or value == float("inf"):
        raise ValueError(f"{name} must be a finite number > 0; got {value!r}.")


def check_probability(name: str, value: float | Tensor, *, closed_right: bool = False) -> None:
    """Raise unless every entry of ``value`` lies in ``[0, 1)`` (``[0, 1]`` if closed_right)."""
    if isinstance(value, Tensor):
        if value.is_floating_point() is False:
            raise TypeError(f"{name} must be a float or a floating tensor; got {value.dtype}.")
        lo, hi = float(value.min()), float(value.max())
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number; got {type(value).__name__}.")
    else:
        lo = hi = float(value)
    upper_ok = hi <= 1.0 if closed_right else hi < 1.0
    if not (lo >= 0.0 and upper_ok):
        bound = "[0, 1]" if closed_right else "[0, 1)"
        raise ValueError(f"{name} must lie in {bound}; got values in [{lo}, {hi}].")


def check_tensor(
    name: str,
    value: Any,
    *,
    ndim: int,
    layout: str,
    floating: bool | None = None,
) -> Tensor:
    """Check that ``value`` is a tensor with ``ndim`` dims (and float/int dtype if asked)."""
    if not isinstance(value, Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor of shape {layout}; got {type(value).__name__}."
        )
    if value.ndim != ndim:
        raise ValueError(
            f"{name} must have shape {layout} ({ndim} dims); got shape {tuple(value.shape)}."
        )
    if floating is True and not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor; got dtype {value.dtype}.")
    if floating is False and (
        value.is_floating_point() or value.is_complex() or value.dtype == torch.bool
    ):
        raise TypeError(f"{name} must be an integer tensor (int64); got dtype {value.dtype}.")
    return value


def check_finite(name: str, value: Tensor) -> None:
    """Raise ``ValueError`` if ``value`` holds NaN or Inf, saying how many and where the first is.

    The fast path is one reduction (no copy; half precision accumulates in float32, where it
    cannot overflow); the element-wise scan runs only when that sum is not finite (a NaN/Inf,
    or an overflow of the sum).
    """
    with torch.no_grad():
        if bool(finite_flag(value)):
            return
        bad = ~torch.isfinite(value)
        count = int(bad.sum())
        if count == 0:  # the sum overflowed although every entry is finite
            return
        first = tuple(int(i) for i in bad.nonzero()[0])
        kinds = []
        if bool(torch.isnan(value).any()):
            kinds.append("NaN")
        if bool(torch.isinf(value).any()):
            kinds.append("Inf")
    raise ValueError(
        f"{name} contains {count} non-finite value(s) ({'/'.join(kinds)}), the first at index "
        f"{first}; check the network for divergence (learning rate, AMP overflow)."
    )


def finite_flag(value: Tensor) -> Tensor:
    """0-dim bool tensor, true when the sum of ``value`` is finite (then so is every entry);
    nothing is read back to the host. Half precision sums in float32, where it cannot
    overflow; a float32 sum can, and then the flag is false although every entry is finite
    (:func:`check_finite` looks closer). The sum is finite when ``sum - sum == 0`` (Inf and
    NaN give NaN): two small kernels on a GPU, where ``isfinite`` runs four and ``all`` one.

    Example:
        >>> import torch
        >>> [bool(finite_flag(torch.tensor(v))) for v in ([1.0, 2.0], [1.0, float("inf")])]
        [True, False]
    """
    with torch.no_grad():
        if value.dtype in (torch.float16, torch.bfloat16):
            summary = value.sum(dtype=torch.float32)
        elif value.is_floating_point():
            summary = value.sum()
        else:
            return torch.ones((), dtype=torch.bool, device=value.device)
        return (summary - summary) == 0


def label_outliers(labels: Tensor, num_classes: int, ignore_index: int) -> Tensor:
    """Bool mask of the labels that are neither in ``[0, num_classes)`` nor ``ignore_index``."""
    with torch.no_grad():
        return ((labels < 0) | (labels >= num_classes)) & (labels != ignore_index)


def run_checks(checks: Sequence[PendingCheck]) -> None:
    """Read every pending check's flag back in one host read (on a GPU, one synchronisation
    instead of one per check); if one is false, run the full checks in order, so that the
    first failing one raises with its own message.

    Example:
        >>> import torch
        >>> x = torch.tensor([1.0, float("nan")])
        >>> run_checks([PendingCheck(finite_flag(x[:1]), lambda: check_finite("a", x[:1]), "")])
        >>> run_checks([PendingCheck(finite_flag(x), lambda: check_finite("b", x), "")])
        Traceback (most recent call last):
        ...
        ValueError: b contains 1 non-finite value(s) (NaN), the first at index (1,); ...
    """
    if not checks:
        return
    if bool(_stacked_flags(checks).all()):
        return
    for check in checks:
        check.full()


def check_labels(name: str, labels: Tensor, num_classes: int, ignore_index: int) -> None:
    """Raise ``ValueError`` if a label is neither in ``[0, num_classes)`` nor ``ignore_index``."""
    with torch.no_grad():
        bad = label_outliers(labels, num_classes, ignore_index)
        if not bool(bad.any()):
            return
        values = torch.unique(labels[bad])
    shown = ", ".join(str(int(v)) for v in values[:10])
    more = "" if values.numel() <= 10 else f" (and {values.numel() - 10} more)"
    raise ValueError(
        f"{name} holds values outside [0, {num_classes}) that are not ignore_index={ignore_index}: "
        f"{shown}{more}. Map unlabelled pixels to ignore_index or fix num_classes."
    )
