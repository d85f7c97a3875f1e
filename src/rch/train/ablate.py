"""The paper's Table 1 rows and Figure 4 grid as a batch of runs with one summary table."""

from __future__ import annotations

import json
import multiprocessing
import os
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import RCHError
from ..eval.paired import (
    additive_effects,
    format_additive_effects,
    format_f_test,
    format_paired_summary,
    format_pooled_effect,
    format_power_table,
    pooled_effect,
    power_table,
    summarize_paired,
    variant_f_test,
)
from .config import Config, apply_overrides, config_differences, load_config
from .logger import json_safe
from .trainer import train

__all__ = [
    "GRID",
    "GRID_DEFAULTS",
    "TABLE1",
    "Ablation",
    "Variant",
    "ablate",
    "format_ablation",
    "run_name",
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

GRID_DEFAULTS: dict[str, float] = {"rch.tau": 0.5, "rch.momentum": 0.9, "rch.loss_weight": 0.1}
"""The defaults the grid varies around (the paper's: tau 0.5, rho 0.9, lambda 0.1)."""


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
        for key, values in GRID.items():
            for value in values:
                if value != GRID_DEFAULTS[key]:
                    out.append(Variant(f"{key.split('.')[1]}={value}", (f"{key}={value}",)))
    return out


IGNORED_KEYS = frozenset(
    {
        "train.out_dir",
        "data.root",
        "data.workers",
        "data.cache",
        "train.log_every",
        "train.ckpt_every",
        "train.retain_memory",
        "rch.validate",
    }
)
"""Settings that may differ between a run directory and a request to reuse it: where things
are, how often to log, and where buffers come from; none changes what the run computes."""


def run_name(cfg: Config, variant: Variant, seed: int) -> str:
    """The name (and run directory under ``train.out_dir``) of one variant's run for a seed."""
    return f"{cfg.name}-{variant.name}-s{seed}"


def _train_run(run: Config, progress: bool) -> dict[str, Any]:
    """Train one run unless it is finished (resuming an interrupted one); its ``eval.json``.

    Raises:
        RCHError: the run directory holds a run with other settings (a finished run of
            another budget would otherwise be reused silently).
    """
    run_dir = Path(run.train.out_dir) / run.name
    done = run_dir / "eval.json"
    saved_path = run_dir / "config.yaml"
    if saved_path.is_file():
        changed = [
            k for k in config_differences(load_config(saved_path), run) if k not in IGNORED_KEYS
        ]
        if changed:
            raise RCHError(
                f"{run_dir} holds a run of {run.name} with other settings ({', '.join(changed)}); "
                "choose another train.out_dir (--out) or delete that run"
            )
    if not done.is_file():
        resume = (run_dir / "checkpoints" / "last.pt").is_file()
        train(run, resume=resume, overwrite=not resume, progress=progress)
    if not done.is_file():
        raise RCHError(f"run {run.name} finished without an evaluation ({done})")
    scores: dict[str, Any] = json.loads(done.read_text())
    return scores


def run_variants(
    cfg: Config,
    runs: Sequence[Variant],
    seeds: Sequence[int] = (0,),
    progress: bool = True,
    on_done: Callable[[str, int, dict[str, Any]], None] | None = None,
    jobs: int = 1,
    skip: Collection[tuple[str, int]] = (),
) -> dict[str, list[dict[str, Any]]]:
    """Train and evaluate every variant for every seed (seed-major: all variants of a seed
    before the next seed, so paired comparisons complete early). Finished runs
    (``eval.json`` present) are reused and interrupted ones resumed, so the whole batch can
    be restarted at any time.

    Args:
        cfg: the base configuration; each run is ``cfg`` with the variant's overrides, the
            seed, and the name ``NAME-VARIANT-sSEED``.
        runs: the variants.
        seeds: the seeds, each run by every variant.
        progress: a progress bar (per run with ``jobs=1``; over the runs otherwise).
        on_done: called with ``(variant, seed, scores)`` for every run, in seed-major order
            (with ``jobs > 1`` a run that finishes early is reported once those before it are).
        jobs: runs trained at once, each in its own process. On a CPU, two one-thread
            processes train about 1.3x faster than one two-thread process. With
            ``train.threads = 0`` each process gets ``cpu_count // jobs`` threads. Runs of
            one seed should share a thread count: it changes the rounding, so the paired
            runs would no longer start from the same arithmetic.
        skip: ``(variant name, seed)`` pairs not to run (results the caller already holds).

    Returns:
        variant name -> the ``eval.json`` contents per seed that was run, in ``seeds`` order.
    """
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1; got {jobs}.")
    skipped = set(skip)
    order = [
        (seed, variant) for seed in seeds for variant in runs if (variant.name, seed) not in skipped
    ]
    configs = []
    for seed, variant in order:
        extra = [f"name={run_name(cfg, variant, seed)}", f"seed={seed}"]
        if jobs > 1 and cfg.train.threads == 0:
            extra.append(f"train.threads={max(1, (os.cpu_count() or 1) // jobs)}")
        configs.append(apply_overrides(cfg, [*variant.overrides, *extra]))
    results: dict[str, list[dict[str, Any]]] = {v.name: [] for v in runs}
    scores: dict[int, dict[str, Any]] = {}
    reported = 0

    def report() -> None:  # hand on finished runs in seed-major order
        nonlocal reported
        while reported in scores:
            seed, variant = order[reported]
            results[variant.name].append(scores[reported])
            if on_done is not None:
                on_done(variant.name, seed, scores[reported])
            reported += 1

    if jobs == 1:
        for i, run in enumerate(configs):
            scores[i] = _train_run(run, progress)
            report()
        return results
    from tqdm.auto import tqdm

    context = multiprocessing.get_context("spawn")  # no forked torch thread pools
    bar = tqdm(total=len(configs), desc="runs", unit="run", disable=not progress)
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        pending = {pool.submit(_train_run, run, False): i for i, run in enumerate(configs)}
        try:
            for future in as_completed(pending):
                i = pending[future]
                scores[i] = future.result()
                bar.update(1)
                bar.set_postfix_str(f"{configs[i].name} mIoU {100 * scores[i]['mIoU']:.2f}")
                report()
        except BaseException:  # a failed run (or ^C): start no further run
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        finally:
            bar.close()
    return results


@dataclass(frozen=True)
class Ablation:
    """What :func:`ablate` ran and found; also written to ``path`` as JSON."""

    seeds: list[int]
    runs: dict[str, dict[int, dict[str, Any]]]
    """variant name -> seed -> the run's ``eval.json`` contents."""
    summary: dict[str, dict[str, Any]]
    """:func:`rch.eval.paired.summarize_paired` of ``runs``."""
    pooled: dict[str, Any] | None
    """:func:`rch.eval.paired.pooled_effect` of ``runs`` (``None`` without a baseline)."""
    path: Path
    additive: dict[str, Any] | None = None
    """:func:`rch.eval.paired.additive_effects` of ``runs`` (``None`` without a baseline or
    without a residual degree of freedom, as with one seed)."""
    power: dict[str, Any] | None = None
    """:func:`rch.eval.paired.power_table` of ``summary`` at 3, 5 and ``len(seeds)`` seeds:
    how likely the paired test tells a 1- or 0.5-point effect from 0 (``None`` without a
    pooled SD, as with one seed)."""
    f_tests: dict[str, dict[str, Any]] = field(default_factory=dict)
    """:func:`rch.eval.paired.variant_f_test` by what it compares: ``"RCH rows"`` (the
    variants but the baseline, among themselves) and ``"every variant"`` (the baseline
    too); each where it has two variants and a residual degree of freedom."""

    @property
    def miou(self) -> dict[str, list[float]]:
        """variant name -> mIoU (fraction) per seed, in ``seeds`` order."""
        return {
            name: [float(r["mIoU"]) for r in by_seed.values()]
            for name, by_seed in self.runs.items()
        }

    def format(self, mark: Collection[str] = ()) -> str:
        """The paired table (:func:`rch.eval.paired.format_paired_summary`; classes in
        ``mark`` first) and, with a baseline, the pooled effect of all variants and the
        variant + seed fit and the F tests where they have a residual, and the resolving
        power where there is a pooled SD."""
        text = format_paired_summary(self.summary, mark=mark)
        if self.pooled is not None:
            text += "\n" + format_pooled_effect(self.pooled)
        if self.additive is not None:
            text += "\n" + format_additive_effects(self.additive)
        for label, test in self.f_tests.items():
            text += "\n" + format_f_test(test, label)
        if self.power is not None:
            text += "\n" + format_power_table(self.power)
        return text


def ablate(
    cfg: Config,
    rows: Sequence[str] = tuple(TABLE1),
    grid: bool = False,
    seeds: Sequence[int] = (0,),
    progress: bool = True,
    jobs: int = 1,
) -> Ablation:
    """Train and evaluate every Table 1 row (and grid point) for every seed, resumably (see
    :func:`run_variants`), and compare each variant with the baseline seed by seed.

    Returns:
        The runs, their paired summary and pooled effect; also written to
        ``OUT/NAME-ablation.json`` (with ``mIoU``: variant -> mIoU per seed).
    """
    found = run_variants(cfg, variants(rows, grid), seeds, progress, jobs=jobs)
    runs = {name: dict(zip(seeds, rs, strict=True)) for name, rs in found.items()}
    summary, pooled = summarize_paired(runs), pooled_effect(runs)
    additive = additive_effects(runs)  # every variant ran every seed: connected
    path = Path(cfg.train.out_dir) / f"{cfg.name}-ablation.json"
    power = power_table(summary, seeds=sorted({3, 5, len(seeds)}))
    compared = {
        "RCH rows": [n for n in runs if n != "baseline"],
        "every variant": list(runs),
    }
    tests = {label: variant_f_test(runs, names) for label, names in compared.items()}
    f_tests = {label: t for label, t in tests.items() if t is not None}
    result = Ablation(list(seeds), runs, summary, pooled, path, additive, power, f_tests)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "seeds": list(seeds),
        "mIoU": result.miou,
        "summary": summary,
        "pooled": pooled,
        "additive": additive,
        "power": power,
        "f_tests": f_tests,
    }
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(json_safe(data), indent=1))
    tmp.replace(path)
    return result


def format_ablation(results: dict[str, list[float]], baseline: str = "baseline") -> str:
    """One row per variant: mean and std of mIoU (%) over seeds, and the mean paired
    difference to ``baseline`` with its standard error (points; NaN with one seed, blank
    without a baseline). Every list holds the same seeds in the same order.

    Example:
        >>> print(format_ablation({"baseline": [0.5, 0.625], "tp": [0.5, 0.75]}))
        variant             mIoU    std    delta     SE  seeds
        baseline           56.25   8.84                      2
        tp                 62.50  17.68    +6.25   6.25      2

    Raises:
        ValueError: lists of different lengths next to a baseline (they cannot be paired).
    """
    if baseline in results:
        uneven = [n for n, v in results.items() if len(v) != len(results[baseline])]
        if uneven:
            raise ValueError(
                f"{', '.join(map(repr, uneven))}: not as many seeds as {baseline!r}; "
                "paired differences need the same seeds"
            )
    summary = summarize_paired(
        {
            n: {i: {"mIoU": v, "IoU": {}} for i, v in enumerate(values)}
            for n, values in results.items()
        },
        baseline,
    )
    lines = [f"{'variant':<16} {'mIoU':>7} {'std':>6} {'delta':>8} {'SE':>6}  seeds"]
    for name, e in summary.items():
        paired = (
            f"{e['diff_mean']:+8.2f} {e['diff_se']:6.2f}"
            if "diff_mean" in e
            else f"{'':>8} {'':>6}"
        )
        lines.append(f"{name:<16} {e['mean']:7.2f} {e['std']:6.2f} {paired}  {len(e['mIoU']):>5}")
    return "\n".join(lines)
