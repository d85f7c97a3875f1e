"""Figures and the HTML report (needs the ``viz`` extra: matplotlib, scikit-learn).

Importing :mod:`rch` does not import this package or matplotlib.
"""

from __future__ import annotations

from .collect import RunSample, collect, pixel_scores
from .report import load_scores, write_report

__all__ = ["RunSample", "collect", "load_scores", "pixel_scores", "write_report"]
