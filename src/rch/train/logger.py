"""Metrics to a JSONL file (one object per line) and to TensorBoard when it is installed."""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["MetricsLogger", "json_safe", "read_metrics"]


def json_safe(value: Any) -> Any:
    """NaN / infinity -> ``None`` (standard JSON, readable by browsers), recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


class MetricsLogger:
    """Appends ``{"iter": i, "tag": ..., **values}`` lines; on resume, lines after the resumed
    iteration are dropped so the file matches an uninterrupted run."""

    def __init__(self, run_dir: Path, resume_iter: int | None = None, tensorboard: bool = True):
        self.path = run_dir / "metrics.jsonl"
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume_iter is not None and self.path.exists():
            kept = [
                line
                for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("iter", 0) <= resume_iter
            ]
            self.path.write_text("".join(f"{line}\n" for line in kept))
        elif self.path.exists():
            self.path.unlink()
        self._file = self.path.open("a")
        self._tb: Any = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                warnings.warn(
                    "tensorboard is not installed; metrics go to metrics.jsonl only "
                    "(pip install tensorboard)",
                    stacklevel=2,
                )

    def log(self, iteration: int, tag: str, values: dict[str, Any]) -> None:
        record = {"iter": iteration, "tag": tag, **values}
        self._file.write(json.dumps(json_safe(record)) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(f"{tag}/{key}", value, iteration)

    def log_classes(
        self, iteration: int, tag: str, values: dict[str, list[float]], classes: Sequence[str]
    ) -> None:
        """One JSONL record with per-class lists; TensorBoard gets ``tag/stat/class`` scalars
        and ``tag/stat/mean`` (over classes with a value)."""
        record = {"iter": iteration, "tag": tag, **values}
        self._file.write(json.dumps(json_safe(record)) + "\n")
        self._file.flush()
        if self._tb is None:
            return
        for stat, per_class in values.items():
            finite = [v for v in per_class if v is not None and math.isfinite(v)]
            for name, value in zip(classes, per_class, strict=True):
                if value is not None and math.isfinite(value):
                    self._tb.add_scalar(f"{tag}/{stat}/{name}", value, iteration)
            if finite:
                self._tb.add_scalar(f"{tag}/{stat}/mean", sum(finite) / len(finite), iteration)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(run_dir: str | Path, tag: str | None = None) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl`` (optionally only one tag)."""
    path = Path(run_dir) / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if tag is None or r.get("tag") == tag]
