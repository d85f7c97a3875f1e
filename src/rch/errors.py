"""The library's own exception type."""

from __future__ import annotations

__all__ = ["RCHError"]


class RCHError(RuntimeError):
    """Raised when the RCH API is used in a way it does not support.

    Bad *values* (shapes, dtypes, ranges, option strings) raise :class:`ValueError` or
    :class:`TypeError`; :class:`RCHError` covers misuse of the API itself, such as asking an
    attachment for its loss before the hooked layer has produced a feature.
    """
