"""Checkpoints written atomically (temporary file, fsync, rename) and read with clear errors."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..errors import RCHError

__all__ = ["atomic_save", "load_checkpoint", "save_checkpoint"]

FORMAT = "rch-checkpoint-1"


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to ``path`` so that a crash leaves either the old or the new file
    (a temporary file beside it, flushed to disk, then renamed over it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write a training checkpoint atomically (see :func:`atomic_save`)."""
    return atomic_save({"format": FORMAT, **state}, path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Raises:
        FileNotFoundError: no such file.
        RCHError: the file is truncated, corrupt, or not an rch checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise RCHError(f"checkpoint {path} is corrupt or truncated: {exc}") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise RCHError(f"{path} is not an rch training checkpoint (format {FORMAT!r})")
    return state
