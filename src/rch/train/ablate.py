"""The paper's Table 1 rows and Figure 4 grid as a batch of runs with one summary table."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import RCHError
from .config import Config, apply_overrides
from .trainer import train

__all__ = [
    "GRID",
    "TABLE1",
    "Variant",
    "ablate",
    "format_ablation",
    "run_variants",
    "variants",
]

TABLE1: dict[str, list[str]] = {
    "baseline": ["rch.enabled=false"],
    "learned": ["rch.prototypes=learned", "rch.fn_term=false", "rch.fp_term=false"],
    "gt": ["rch.prototype_source=gt", "rch.fn_term=false", "rch.fp_term=false"],
    "tp": ["rch.fn_term=false", "rch.fp_term=false"],
    "tp+fn": ["rch.fp_term=false"],
    "tp+fp": ["rch.fn_term=false"],
    "full": [],
}
"""Table 1 of the paper: each row's overrides of an RCH config. ``learned``, ``gt`` and ``tp``
compare where the prototypes come from (parameters trained by the loss, EMA of all labelled
pixels, EMA of true positives) without margins; the last three add the FN / FP terms."""

GRID: dict[str, tuple[float, ...]] = {
    "rch.tau": (0.125, 0.25, 0.5, 1.0),
    "rch.momentum": (0.5, 0.7, 0.9, 0.99),
    "rch.loss_weight": (0.1, 0.2, 0.3, 0.4),
}
"""Figure 4: one hyper-parameter varied at a time around the defaults."""


@dataclass(frozen=True)
class Variant:
    name: str
    overrides: tuple[str, ...]


def variants(rows: Sequence[str] = tuple(TABLE1), grid: bool = False) -> list[Variant]:
    """The runs of an ablation: Table 1 rows, then (optionally) the grid points that differ
    from the defaults.

    Example:
        >>> [v.name for v in variants(["baseline", "full"], grid=True)][:4]
        ['baseline', 'full', 'tau=0.125', 'tau=0.25']
    """
    unknown = [r for r in rows if r not in TABLE1]
    if unknown:
        raise KeyError(f"unknown ablation rows {unknown}; choose from {list(TABLE1)}")
    out = [Variant(r, tuple(TABLE1[r])) for r in rows]
    if grid:
        defaults = {"rch.tau": 0.5, "rch.momentum": 0.9, "rch.loss_weight": 0.1}
        for key, values in GRID.items():
            for value in values:
                if value != defaults[key]:
                    out.append(Variant(f"{key.split('.')[1]}={value}", (f"{key}={value}",)))
    return out


def run_variants(
    cfg: Config,
    runs: Sequence[Variant],
    seeds: Sequence[int] = (0,),
    progress: bool = True,
    on_done: Callable[[str, int, dict[str, Any]], None] | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Train and evaluate every variant for every seed (seed-major: all variants of a seed
    before the next seed, so paired comparisons complete early). Finished runs
    (``eval.json`` present) are reused and interrupted ones resumed, so the whole batch can
    be restarted at any time.

    Returns:
        variant name -> the ``eval.json`` contents per seed, in ``seeds`` order.
    """
    results: dict[str, list[dict[str, Any]]] = {v.name: [] for v in runs}
    base_dir = Path(cfg.train.out_dir)
    for seed in seeds:
        for variant in runs:
            name = f"{cfg.name}-{variant.name}-s{seed}"
            run = apply_overrides(cfg, [*variant.overrides, f"name={name}", f"seed={seed}"])
            run_dir = base_dir / name
            done = run_dir / "eval.json"
            if not done.is_file():
                resume = (run_dir / "checkpoints" / "last.pt").is_file()
                train(run, resume=resume, overwrite=not resume, progress=progress)
            if not done.is_file():
                raise RCHError(f"run {name} finished without an evaluation ({done})")
            scores = json.loads(done.read_text())
            results[variant.name].append(scores)
            if on_done is not None:
                on_done(variant.name, seed, scores)
    return results


def ablate(
    cfg: Config,
    rows: Sequence[str] = tuple(TABLE1),
    grid: bool = False,
    seeds: Sequence[int] = (0,),
    progress: bool = True,
) -> dict[str, list[float]]:
    """Train and evaluate every Table 1 row (and grid point) for every seed, resumably (see
    :func:`run_variants`).

    Returns:
        variant name -> mIoU (fraction) per seed. Also written to ``OUT/NAME-ablation.json``.
    """
    runs = run_variants(cfg, variants(rows, grid), seeds, progress)
    results = {name: [float(r["mIoU"]) for r in rs] for name, rs in runs.items()}
    base_dir = Path(cfg.train.out_dir)
    summary = base_dir / f"{cfg.name}-ablation.json"
    summary.parent.mkdir(parents=True, exist_ok=True)
    summary.write_text(json.dumps({"seeds": list(seeds), "mIoU": results}, indent=1))
    return results


def format_ablation(results: dict[str, list[float]], baseline: str = "baseline") -> str:
    """One row per variant: mean and std of mIoU (%) over seeds and the mean paired delta."""
    ref = results.get(baseline)
    lines = [f"{'variant':<16} {'mIoU':>7} {'std':>6} {'delta':>7}  runs"]
    for name, values in results.items():
        mean = 100 * statistics.fmean(values)
        std = 100 * statistics.stdev(values) if len(values) > 1 else math.nan
        delta = (
            100 * statistics.fmean(v - r for v, r in zip(values, ref, strict=False))
            if ref is not None
            else math.nan
        )
        lines.append(f"{name:<16} {mean:7.2f} {std:6.2f} {delta:+7.2f}  {len(values)}")
    return "\n".join(lines)
