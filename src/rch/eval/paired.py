"""Paired-seed comparison of training variants against a baseline.

A variant and the baseline trained with the same seed share their initial weights and
their batches, so their difference in mIoU on that seed is the variant's effect plus
noise; its mean over seeds, with a standard error, is what a table of variants reports.
Everything here is in percentage points and works on the ``eval.json`` contents of
finished runs (``mIoU``, ``IoU`` per class and, where written, ``confusion``).

Example:
    >>> def run(miou):
    ...     return {"mIoU": miou, "IoU": {"a": miou}}
    >>> runs = {"baseline": {0: run(0.500), 1: run(0.520)}, "rch": {0: run(0.510), 1: run(0.525)}}
    >>> s = summarize_paired(runs)
    >>> [round(d, 2) for d in s["rch"]["paired_diff"]], round(s["rch"]["diff_mean"], 2)
    ([1.0, 0.5], 0.75)
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Collection, Mapping, Sequence
from typing import Any, Literal

import torch

from .metrics import scores_from_confusion

__all__ = [
    "Runs",
    "additive_effects",
    "format_additive_effects",
    "format_f_test",
    "format_paired_summary",
    "format_pooled_effect",
    "format_power_table",
    "marked_first",
    "paired_power",
    "paired_rows",
    "pooled_diff_sd",
    "pooled_dofs",
    "pooled_effect",
    "power_table",
    "prespecified_test",
    "seeds_for_power",
    "student_t_cdf",
    "student_t_critical",
    "summarize_paired",
    "variant_f_test",
]

Runs = Mapping[str, Mapping[int, Mapping[str, Any]]]
"""variant name -> seed -> that run's ``eval.json`` contents."""


def pooled_diff_sd(diffs: Collection[Collection[float]]) -> tuple[float, int]:
    """The per-seed standard deviation of a paired difference, pooled over variants, and its
    degrees of freedom: sqrt(sum_i (n_i - 1) s_i^2 / sum_i (n_i - 1)) over the variants with
    at least two seeds; NaN and 0 when none has.

    One variant's own SD rests on a handful of seeds (2 degrees of freedom for 3), so its
    SE can be small by luck; the pooled SD uses every variant's spread. The variants share
    the baseline runs, so their spreads are not independent: read the pooled SE as the
    typical noise of a paired difference on the protocol, not as an exact test.

    Example:
        >>> sd, df = pooled_diff_sd([[0.0, 2.0], [1.0, 3.0], [5.0]])  # one seed: no spread
        >>> round(sd, 4), df
        (1.4142, 2)
    """
    kept = [list(d) for d in diffs if len(d) > 1]
    ss = sum(statistics.variance(d) * (len(d) - 1) for d in kept)
    df = sum(len(d) - 1 for d in kept)
    return (math.sqrt(ss / df) if df else math.nan), df


def _check_df(df: int) -> None:
    if isinstance(df, bool) or not isinstance(df, int) or df < 1:
        raise ValueError(f"df must be a positive integer, got {df!r}")


def student_t_critical(df: int, level: float = 0.95) -> float:
    """The two-sided critical value of Student's t with ``df`` (a positive integer)
    degrees of freedom: ``P(|T| <= t) = level``. The half-width of a ``level`` interval of
    a mean is this times its SE.

    The CDF is the regularized incomplete beta function that :func:`variant_f_test` uses
    too (a t statistic squared is F with one numerator degree of freedom), solved for
    ``level`` by bisection, so it needs no statistics package.

    Example:
        >>> round(student_t_critical(1), 3), round(student_t_critical(4), 3)
        (12.706, 2.776)
    """
    _check_df(df)
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level!r}")

    def central(t: float) -> float:  # P(|T| <= t) = 1 - I_{df / (df + t^2)}(df / 2, 1 / 2)
        return 1.0 - _regularized_beta(df / 2, 0.5, df / (df + t * t))

    lo, hi = 0.0, 1.0
    while central(hi) < level:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if central(mid) < level:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * hi:
            break
    return (lo + hi) / 2


def student_t_cdf(t: float, df: int) -> float:
    """``P(T <= t)`` for Student's t with ``df`` (a positive integer) degrees of freedom,
    from the regularized incomplete beta function (no statistics package needed).

    Example:
        >>> round(student_t_cdf(2.776, 4), 4), round(student_t_cdf(-1.0, 1), 4)
        (0.975, 0.25)
    """
    _check_df(df)
    if math.isnan(t):
        raise ValueError("t is NaN")
    if not math.isfinite(t):
        return 1.0 if t > 0 else 0.0
    # P(|T| > |t|) = I_x(df / 2, 1 / 2) with x = df / (df + t^2) = 1 - I_y(1 / 2, df / 2) with
    # y = t^2 / (df + t^2): near t = 0, x rounds to 1, so take the side whose argument is small
    x, y = df / (df + t * t), t * t / (df + t * t)
    both = _regularized_beta(df / 2, 0.5, x) if x < y else 1.0 - _regularized_beta(0.5, df / 2, y)
    tail = 0.5 * both
    return 1.0 - tail if t > 0 else tail


def prespecified_test(
    diffs: Sequence[float],
    sd: float,
    df: int,
    planned: int,
    alternative: Literal["greater", "less"],
    level: float = 0.95,
) -> dict[str, Any]:
    """A one-sided t test of a mean paired difference, with its SD, degrees of freedom and
    number of pairs fixed before the runs (a test written down first, so that the runs that
    raised a claim do not also confirm it).

    The statistic is ``mean / (sd / sqrt(n))`` on ``df`` degrees of freedom (``sd`` is an
    earlier pooled estimate, not the pairs' own spread); the claim is confirmed when the
    mean lies beyond ``bound`` = the one-sided ``level`` critical value times that SE, on
    the side ``alternative`` names. The decision is made on the ``planned`` pairs and no
    fewer: with fewer, ``decided`` is False, ``confirmed`` None, and ``t`` and ``p`` are
    left out (NaN); the mean so far is description.

    Returns: ``n``, ``planned``, ``mean``, ``se``, ``t``, ``p`` (one-sided), ``bound``,
    ``decided``, ``confirmed``.

    Raises:
        ValueError: ``sd`` not positive and finite, ``level`` outside (0.5, 1), ``planned``
            below 1 or below the number of pairs given, an unknown ``alternative``, a NaN
            difference, ``df`` not a positive integer.

    Example:
        >>> r = prespecified_test([1.40, -1.96, -0.46, 0.01, 0.83], 0.83, 53, 5, "less")
        >>> round(r["mean"], 3), round(r["bound"], 3), round(r["p"], 2), r["confirmed"]
        (-0.036, -0.621, 0.46, False)
    """
    if alternative not in ("greater", "less"):
        raise ValueError(f"alternative must be 'greater' or 'less', got {alternative!r}")
    if not (math.isfinite(sd) and sd > 0):
        raise ValueError(f"sd must be positive and finite, got {sd!r}")
    if not 0.5 < level < 1.0:
        raise ValueError(f"level must lie in (0.5, 1) for a one-sided test, got {level!r}")
    if isinstance(planned, bool) or not isinstance(planned, int) or planned < max(1, len(diffs)):
        raise ValueError(
            f"planned must be an integer >= the {len(diffs)} pairs given, got {planned!r}"
        )
    if any(math.isnan(d) for d in diffs):
        raise ValueError("a paired difference is NaN")
    n = len(diffs)
    sign = 1.0 if alternative == "greater" else -1.0
    bound = sign * student_t_critical(df, 1.0 - 2.0 * (1.0 - level)) * sd / math.sqrt(planned)
    mean = statistics.fmean(diffs) if diffs else math.nan
    decided = n == planned
    t = p = math.nan
    if decided:
        t = mean / (sd / math.sqrt(n))
        p = 1.0 - student_t_cdf(t, df) if alternative == "greater" else student_t_cdf(t, df)
    return {
        "n": n,
        "planned": planned,
        "mean": mean,
        "se": sd / math.sqrt(planned),
        "t": t,
        "p": p,
        "bound": bound,
        "decided": decided,
        "confirmed": (sign * mean > sign * bound) if decided else None,
    }


def paired_power(
    effect: float, sd: float, seeds: int, df: int | None = None, level: float = 0.95
) -> float:
    """The probability that the two-sided ``level`` t test of a paired mean over ``seeds``
    seeds tells a true mean difference of ``effect`` from zero, when a paired difference
    varies from seed to seed with SD ``sd`` (same units as ``effect``).

    ``df`` is the degrees of freedom of the SD the test uses: ``seeds - 1`` (the default)
    for a variant's own SD; a pooled SD's, as :func:`pooled_diff_sd` gives it, for the
    protocol's pooled SE. The test statistic then follows a noncentral t distribution with
    noncentrality ``effect * sqrt(seeds) / sd``; the power is its mass beyond the critical
    values, integrated over the distribution of the estimated SD (Simpson's rule, accurate
    to about 1e-8), so no statistics package is needed. An ``effect`` of 0 gives
    ``1 - level``.

    Example:
        >>> round(paired_power(0.0, 1.0, 5), 6)
        0.05
        >>> round(paired_power(1.0, 0.81, 5, df=41), 2)  # a 1-point effect, 5 seeds
        0.77
    """
    if not math.isfinite(effect):
        raise ValueError(f"effect must be finite, got {effect!r}")
    if not (math.isfinite(sd) and sd > 0):
        raise ValueError(f"sd must be positive and finite, got {sd!r}")
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds must be a positive integer, got {seeds!r}")
    nu = seeds - 1 if df is None else df
    if isinstance(nu, bool) or not isinstance(nu, int) or nu < 1:
        raise ValueError(
            f"the SD needs at least one degree of freedom, got df={nu!r}"
            + (" (seeds - 1: give df for a pooled SD)" if df is None else "")
        )
    crit = student_t_critical(nu, level)
    shift = abs(effect) * math.sqrt(seeds) / sd  # the noncentrality

    def phi(x: float) -> float:  # the standard normal CDF
        return 0.5 * math.erfc(-x / math.sqrt(2.0))

    # s = the estimated SD over the true one, sqrt(chi2(nu) / nu); given s, the statistic
    # (Z + shift) / s lies beyond +-crit with probability phi(shift - crit s) + phi(-shift - crit s)
    log_norm = math.log(2.0) + nu / 2 * math.log(nu / 2) - math.lgamma(nu / 2)
    lo, hi = max(0.0, 1.0 - 10 / math.sqrt(nu)), 1.0 + 10 / math.sqrt(nu)
    steps = 2048  # even, for Simpson's rule
    h = (hi - lo) / steps
    total = 0.0
    for i in range(steps + 1):
        s = lo + i * h
        if s <= 0.0:  # the density is 0 there for nu > 1 and finite for nu = 1
            density = math.exp(log_norm) if nu == 1 else 0.0
        else:
            density = math.exp(log_norm + (nu - 1) * math.log(s) - nu * s * s / 2)
        weight = 1 if i in (0, steps) else (4 if i % 2 else 2)
        total += weight * density * (phi(shift - crit * s) + phi(-shift - crit * s))
    return min(1.0, max(0.0, total * h / 3))


def seeds_for_power(
    effect: float, sd: float, power: float = 0.8, df: int | None = None, level: float = 0.95
) -> int:
    """The fewest seeds with which :func:`paired_power` reaches ``power``: how many paired
    seeds a protocol with per-seed SD ``sd`` needs to tell ``effect`` from zero. ``df`` as
    there: ``None`` for the variant's own SD (``seeds - 1``, so at least 2 seeds), or a
    pooled SD's fixed degrees of freedom. Raises ``ValueError`` beyond a million seeds.

    Example:
        >>> seeds_for_power(1.0, 1.0)  # a one-sample t test, effect size 1: 10 seeds
        10
    """
    n = _fewest_seeds(effect, sd, power, df, level)
    if n is None:
        raise ValueError(f"more than a million seeds: effect {effect!r} is too small for sd {sd!r}")
    return n


def _fewest_seeds(
    effect: float, sd: float, power: float, df: int | None, level: float
) -> int | None:
    """:func:`seeds_for_power`, ``None`` beyond a million seeds."""
    if not 1.0 - level < power < 1.0:
        raise ValueError(f"power must lie in ({1.0 - level:g}, 1), got {power!r}")
    if effect == 0.0:
        raise ValueError("an effect of 0 is detected with probability 1 - level at any seeds")

    def enough(n: int) -> bool:
        return paired_power(effect, sd, n, df, level) >= power

    lo = 1 if df is not None else 2  # the answer is above lo - 1 ...
    hi = lo
    while not enough(hi):  # ... and at most hi
        lo, hi = hi + 1, hi * 2
        if hi > 1_000_000:
            return None
    while lo < hi:
        mid = (lo + hi) // 2
        if enough(mid):
            hi = mid
        else:
            lo = mid + 1
    return hi


def power_table(
    summary: Mapping[str, Mapping[str, Any]],
    effects: Sequence[float] = (1.0, 0.5),
    seeds: Sequence[int] = (3, 5),
    power: float = 0.8,
    level: float = 0.95,
) -> dict[str, Any] | None:
    """What the protocol of a :func:`summarize_paired` summary can resolve: for each effect
    (points), the power of the paired test on the pooled SD (``pooled_sd`` on ``pooled_df``
    degrees of freedom) at each number of seeds, and the seeds it needs for ``power``.

    Returns ``sd``, ``df``, ``level``, ``target`` (= ``power``) and ``rows``, one per effect:
    ``effect``, ``seeds``, ``power`` (a list in ``seeds`` order) and ``seeds_needed``
    (``None`` beyond a million).
    ``None`` where the summary has no pooled SD (no variant with two paired seeds) or it is 0.

    Example:
        >>> run = lambda m: {"mIoU": m, "IoU": {}}
        >>> runs = {"baseline": {0: run(0.5), 1: run(0.5)}, "x": {0: run(0.51), 1: run(0.52)}}
        >>> t = power_table(summarize_paired(runs), effects=[1.0], seeds=[2])
        >>> round(t["sd"], 3), t["df"], t["rows"][0]["seeds_needed"]  # 1 df: t = 12.7
        (0.707, 1, 134)
    """
    pooled = next((e for e in summary.values() if "pooled_sd" in e), None)
    if pooled is None or not pooled["pooled_df"] or not pooled["pooled_sd"] > 0:
        return None
    sd, df = float(pooled["pooled_sd"]), int(pooled["pooled_df"])
    rows = [
        {
            "effect": float(e),
            "seeds": list(seeds),
            "power": [paired_power(e, sd, n, df, level) for n in seeds],
            "seeds_needed": _fewest_seeds(e, sd, power, df, level),
        }
        for e in effects
    ]
    return {"sd": sd, "df": df, "level": level, "target": power, "rows": rows}


def format_power_table(table: Mapping[str, Any]) -> str:
    """Lines for :func:`power_table`: per effect, the power at each number of seeds and the
    seeds needed for the target power."""
    rows = table["rows"]
    counts = rows[0]["seeds"] if rows else []
    lines = [
        f"resolving power: how likely the paired t test ({100 * table['level']:g} %, two-sided)"
        f" on the pooled SD {table['sd']:.2f} ({table['df']} df) tells a true effect from 0"
    ]
    head = "".join(f" {f'{n} seeds':>9}" for n in counts)
    lines.append(f"  {'effect':>7}{head}  seeds for {100 * table['target']:g} %")
    for r in rows:
        cells = "".join(f" {p:9.2f}" for p in r["power"])
        needed = "> 1e6" if r["seeds_needed"] is None else r["seeds_needed"]
        lines.append(f"  {r['effect']:+7.2f}{cells}  {needed:>5}")
    return "\n".join(lines)


def _t_interval(mean: float, se: float, df: int) -> tuple[float, float]:
    """The 95 % Student t interval ``mean +- t(df) se``; NaNs without degrees of freedom."""
    half = se * student_t_critical(df) if df > 0 else math.nan
    return mean - half, mean + half


def _nanmean(values: list[float]) -> float:
    """The mean of the values that are not NaN; NaN when none is."""
    kept = [v for v in values if not math.isnan(v)]
    return statistics.fmean(kept) if kept else math.nan


Rates = tuple[list[float], list[float]]
"""Per-class recall and precision (fractions; NaN where a class has none)."""


def _rates(confusion: list[list[int]]) -> Rates:
    scores = scores_from_confusion(torch.tensor(confusion))
    return scores.acc, scores.precision  # recall = 1 - FN rate, precision = 1 - FP share


def _class_means(rates: Rates, leave_out: int | None = None) -> tuple[float, float]:
    """Mean recall and mean precision (of :func:`_rates`) over the classes that have them, in
    points; without class ``leave_out`` where one is given."""
    recall, precision = rates
    if leave_out is not None:
        recall, precision = (
            [v for c, v in enumerate(r) if c != leave_out] for r in (recall, precision)
        )
    return 100 * _nanmean(recall), 100 * _nanmean(precision)


def summarize_paired(results: Runs, baseline: str = "baseline") -> dict[str, dict[str, Any]]:
    """mIoU statistics per variant, and its paired differences to ``baseline`` over the
    seeds that both ran.

    Each entry holds ``seeds``, ``mIoU`` (per seed), ``mean`` and ``std``. A variant paired
    with the baseline on at least one seed also holds ``paired_seeds``, ``paired_diff``,
    ``diff_mean``, ``diff_se`` (its own SE; NaN for one seed), ``diff_se_pooled`` (the
    pooled SD of :func:`pooled_diff_sd` over sqrt(seeds)) with ``pooled_sd`` and
    ``pooled_df``, ``diff_ci_pooled`` (the 95 % Student t interval of the mean on the
    pooled SE and its degrees of freedom; NaNs without any), ``class_delta`` (mean
    per-class IoU difference; a class missing from a run's IoU counts as 0), and, where
    every paired run kept its confusion matrix, ``recall_delta`` / ``precision_delta`` per
    class with their class means ``mean_recall_delta`` / ``mean_precision_delta``.
    """
    base = results.get(baseline, {})
    base_rates = {  # each baseline run's rates, once
        seed: _rates(ref["confusion"]) for seed, ref in base.items() if "confusion" in ref
    }
    out: dict[str, dict[str, Any]] = {}
    for name, runs in results.items():
        seeds = sorted(runs)
        mious = [100 * runs[s]["mIoU"] for s in seeds]
        entry: dict[str, Any] = {
            "seeds": seeds,
            "mIoU": mious,
            "mean": statistics.fmean(mious) if mious else math.nan,
            "std": statistics.stdev(mious) if len(mious) > 1 else math.nan,
        }
        paired = [s for s in seeds if s in base]
        if name != baseline and paired:
            n = len(paired)
            diffs = [100 * (runs[s]["mIoU"] - base[s]["mIoU"]) for s in paired]
            entry["paired_seeds"] = paired
            entry["paired_diff"] = diffs
            entry["diff_mean"] = statistics.fmean(diffs)
            entry["diff_se"] = statistics.stdev(diffs) / math.sqrt(n) if n > 1 else math.nan
            classes = list(runs[paired[0]]["IoU"])
            entry["class_delta"] = {
                c: statistics.fmean(
                    100 * ((runs[s]["IoU"][c] or 0.0) - (base[s]["IoU"][c] or 0.0)) for s in paired
                )
                for c in classes
            }
            if all("confusion" in runs[s] and s in base_rates for s in paired):
                rates = [(_rates(runs[s]["confusion"]), base_rates[s]) for s in paired]
                for i, key in enumerate(("recall", "precision")):
                    per_seed = [
                        [100 * (a - b) for a, b in zip(mine[i], theirs[i], strict=True)]
                        for mine, theirs in rates
                    ]
                    delta = [statistics.fmean(d) for d in zip(*per_seed, strict=True)]
                    entry[f"{key}_delta"] = dict(zip(classes, delta, strict=True))
                    entry[f"mean_{key}_delta"] = _nanmean(delta)
        out[name] = entry
    sd, df = pooled_diff_sd([e["paired_diff"] for e in out.values() if "paired_diff" in e])
    for entry in out.values():
        if "paired_diff" in entry:
            entry["diff_se_pooled"] = sd / math.sqrt(len(entry["paired_diff"]))
            entry["pooled_sd"], entry["pooled_df"] = sd, df
            entry["diff_ci_pooled"] = _t_interval(entry["diff_mean"], entry["diff_se_pooled"], df)
    return out


def paired_rows(
    summary: Mapping[str, Mapping[str, Any]],
) -> tuple[dict[str, list[float]], dict[str, float]]:
    """The paired differences per seed and the pooled SE of every variant of
    :func:`summarize_paired` that has them, as ``rch.viz.figures.plot_paired_differences``
    takes them; both empty without a paired variant.

    Example:
        >>> run = lambda m: {"mIoU": m, "IoU": {}}
        >>> paired_rows(summarize_paired({"baseline": {0: run(0.5)}, "x": {0: run(0.625)}}))
        ({'x': [12.5]}, {'x': nan})
    """
    paired = {name: e for name, e in summary.items() if e.get("paired_diff")}
    return (
        {name: list(e["paired_diff"]) for name, e in paired.items()},
        {name: e["diff_se_pooled"] for name, e in paired.items()},
    )


def pooled_dofs(summary: Mapping[str, Mapping[str, Any]]) -> dict[str, int]:
    """The degrees of freedom of each pooled SE of :func:`paired_rows`, as
    ``rch.viz.figures.plot_paired_differences`` takes them (``df``) to draw t intervals;
    empty where no variant has two seeds.

    Example:
        >>> run = lambda m: {"mIoU": m, "IoU": {}}
        >>> runs = {"baseline": {0: run(0.5), 1: run(0.5)}, "x": {0: run(0.6), 1: run(0.5)}}
        >>> pooled_dofs(summarize_paired(runs))
        {'x': 1}
    """
    return {
        name: e["pooled_df"]
        for name, e in summary.items()
        if e.get("paired_diff") and e.get("pooled_df")
    }


def pooled_effect(results: Runs, baseline: str = "baseline") -> dict[str, Any] | None:
    """Every run of every variant against every ``baseline`` run: do the variants, taken
    together, move mIoU? ``None`` without both.

    Two estimates. ``diff``: the mean of all variant runs minus the baseline's mean, with
    Welch's SE (``se``) and degrees of freedom (``df``); the variant runs' spread includes
    the differences between variants, and the SE leans on the baseline's own spread. And
    ``seed_diff``: per seed, the mean of that seed's variant runs minus that seed's
    baseline run, with their mean (``seed_diff_mean``) and the SE of their spread over the
    seeds (``seed_diff_se``), which keeps each seed's shared baseline run in one term, and
    its 95 % Student t interval over the seeds (``seed_diff_ci``, with ``len(seeds) - 1``
    degrees of freedom; NaNs for fewer than two seeds).

    And, where runs kept their confusion matrices, which way each variant run moved the
    class-mean recall and precision against its seed's baseline run: ``rate_runs`` such
    runs, ``recall_falls`` of them with a lower recall and ``precision_rises`` with a
    higher precision; and the same two counts with each class left out of the class means in
    turn (``rates_without``: class name to ``(recall_falls, precision_rises)``), which shows
    whether one class carries the trend.
    """
    values = [
        100 * r["mIoU"] for n, runs in results.items() if n != baseline for r in runs.values()
    ]
    base_runs = results.get(baseline, {})
    base = [100 * r["mIoU"] for r in base_runs.values()]
    if not base or not values:
        return None
    others = [runs for n, runs in results.items() if n != baseline and runs]
    out: dict[str, Any] = {
        "variants": len(others),
        "runs": len(values),
        "baseline_runs": len(base),
        "mean": statistics.fmean(values),
        "baseline_mean": statistics.fmean(base),
        "diff": statistics.fmean(values) - statistics.fmean(base),
        "se": math.nan,
        "df": math.nan,
    }
    if len(base) > 1 and len(values) > 1:
        vb, vr = statistics.variance(base) / len(base), statistics.variance(values) / len(values)
        out["se"] = math.sqrt(vb + vr)
        if vb + vr > 0:
            out["df"] = (vb + vr) ** 2 / (vb**2 / (len(base) - 1) + vr**2 / (len(values) - 1))
    per_seed = {}
    for seed, ref in sorted(base_runs.items()):
        mine = [100 * runs[seed]["mIoU"] for runs in others if seed in runs]
        if mine:
            per_seed[seed] = statistics.fmean(mine) - 100 * ref["mIoU"]
    out["seed_diff"] = per_seed
    d = list(per_seed.values())
    out["seed_diff_mean"] = statistics.fmean(d) if d else math.nan
    out["seed_diff_se"] = statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else math.nan
    out["seed_diff_ci"] = _t_interval(out["seed_diff_mean"], out["seed_diff_se"], len(d) - 1)
    base_rates = {  # each baseline run's rates, once
        seed: _rates(ref["confusion"]) for seed, ref in base_runs.items() if "confusion" in ref
    }
    pairs = [
        (_rates(runs[seed]["confusion"]), theirs)
        for seed, theirs in base_rates.items()
        for runs in others
        if seed in runs and "confusion" in runs[seed]
    ]
    out["rate_runs"] = len(pairs)
    out["recall_falls"], out["precision_rises"] = _moved(pairs)
    out["rates_without"] = {}
    if pairs:
        names = next(iter(base_runs.values())).get("IoU", {})
        k = len(pairs[0][1][0])
        labels = list(names) if len(names) == k else [f"class {c}" for c in range(k)]
        out["rates_without"] = {labels[c]: _moved(pairs, c) for c in range(k)}
    return out


def additive_effects(results: Runs, baseline: str = "baseline") -> dict[str, Any] | None:
    """Every run at once, as a variant effect plus a seed effect plus noise: a two-way
    additive model ``100 mIoU[v, s] = mu + a[v] + b[s] + e``, fit by least squares over all
    runs, with ``a[baseline] = 0``. ``None`` without a baseline run and another variant's,
    or when the runs leave no residual degree of freedom.

    Pairing by seed compares a variant's seed-s run with the one baseline run of seed s, so
    a low or high draw of that baseline run moves every variant that has seed s, and only
    those. Here the seed effects ``b`` are estimated from every variant's runs on that seed,
    and the baseline's level from all of its runs: with every variant on every seed the
    effects equal the paired mean differences, and where seeds are missing the variants are
    compared on one footing. The residual SD (``residual_sd``, ``df`` = runs - variants -
    seeds + 1 degrees of freedom) is the noise of one run, with the variant-by-seed
    interaction in it.

    Returns ``effects`` (variant -> ``effect``, ``se``, ``ci``: a 95 % Student t interval
    on ``df``, ``seeds``: its number of runs), ``seed_effects`` (seed -> ``b[s] - b[first
    seed]``), ``residuals`` (variant -> seed -> that run's score minus its fitted value:
    which runs are high or low draws), ``residual_sd``, ``df`` and ``runs``.

    Raises:
        ValueError: when the variants and seeds do not connect (some variant shares no seed
            with the rest), so that the effects are not determined.

    Example:
        >>> def run(miou):
        ...     return {"mIoU": miou}
        >>> runs = {"baseline": {0: run(0.50), 1: run(0.52), 2: run(0.48)},
        ...         "rch": {0: run(0.51), 1: run(0.53)}}
        >>> fit = additive_effects(runs)
        >>> round(fit["effects"]["rch"]["effect"], 2), fit["df"]
        (1.0, 1)
    """
    names = [baseline, *(n for n, runs in results.items() if n != baseline and runs)]
    if not results.get(baseline) or len(names) < 2:
        return None
    seeds = sorted({s for n in names for s in results[n]})
    cells = [(n, s, 100 * float(results[n][s]["mIoU"])) for n in names for s in results[n]]
    p = len(names) + len(seeds) - 1  # mu, a[v] for v != baseline, b[s] for s != first
    df = len(cells) - p
    if df < 1:
        return None
    # design matrix columns: 0 the level, then one per variant but the baseline, then one
    # per seed but the first (the baseline and the first seed are the zero points)
    variant_col = {n: v for v, n in enumerate(names) if v}
    seed_col = {s: len(names) - 1 + k for k, s in enumerate(seeds) if k}
    x = torch.zeros(len(cells), p, dtype=torch.float64)
    x[:, 0] = 1.0
    for i, (n, s, _) in enumerate(cells):
        if n in variant_col:
            x[i, variant_col[n]] = 1.0
        if s in seed_col:
            x[i, seed_col[s]] = 1.0
    y = torch.tensor([c[2] for c in cells], dtype=torch.float64)
    gram = x.T @ x
    if int(torch.linalg.matrix_rank(gram)) < p:
        raise ValueError(
            "the variants and seeds do not connect: some variant shares no seed with the"
            " others, so its effect is not determined"
        )
    cov_unit = torch.linalg.inv(gram)
    coef = cov_unit @ (x.T @ y)
    resid = y - x @ coef
    sd = math.sqrt(float(resid @ resid) / df)
    effects = {}
    for n, v in variant_col.items():
        se = sd * math.sqrt(float(cov_unit[v, v]))
        effect = float(coef[v])
        effects[n] = {
            "effect": effect,
            "se": se,
            "ci": _t_interval(effect, se, df),
            "seeds": len(results[n]),
        }
    seed_effects = {s: float(coef[seed_col[s]]) if s in seed_col else 0.0 for s in seeds}
    residuals: dict[str, dict[Any, float]] = {n: {} for n in names}
    for (n, s, _), r in zip(cells, resid.tolist(), strict=True):
        residuals[n][s] = r
    return {
        "effects": effects,
        "seed_effects": seed_effects,
        "residuals": residuals,
        "residual_sd": sd,
        "df": df,
        "runs": len(cells),
    }


def variant_f_test(results: Runs, variants: Collection[str] | None = None) -> dict[str, Any] | None:
    """Do the variants differ at all? The F test of the variant effects in the two-way
    variant + seed model of :func:`additive_effects`, against the model of seed effects
    alone, over the runs of ``variants`` (every variant with runs when ``None``; name the
    baseline to include it). Unbalanced designs are fine: the F test compares the two
    models' residual sums of squares.

    Returns ``variants``, ``runs``, ``f``, ``df1`` (variants - 1), ``df2`` (the full
    model's residual degrees of freedom) and ``p`` (the F distribution's upper tail, from
    the regularized incomplete beta function). ``None`` with fewer than two variants or no
    residual degree of freedom.

    Raises:
        ValueError: when the variants and seeds do not connect, or a named variant has no
            runs.

    Example:
        >>> run = lambda m: {"mIoU": m}
        >>> runs = {"a": {0: run(0.50), 1: run(0.52), 2: run(0.51)},
        ...         "b": {0: run(0.53), 1: run(0.54), 2: run(0.55)}}
        >>> t = variant_f_test(runs)
        >>> round(t["f"], 2), t["df1"], t["df2"], round(t["p"], 3)
        (27.0, 1, 2, 0.035)
    """
    names = [n for n, runs in results.items() if runs] if variants is None else list(variants)
    names = list(dict.fromkeys(names))  # a variant named twice counts once
    missing = [n for n in names if not results.get(n)]
    if missing:
        raise ValueError(f"no runs of variant(s) {', '.join(map(repr, missing))}")
    if len(names) < 2:
        return None
    chosen = {n: results[n] for n in names}
    fit = additive_effects(chosen, baseline=names[0])  # raises when not connected
    if fit is None:
        return None
    rss_full = fit["residual_sd"] ** 2 * fit["df"]
    by_seed: dict[Any, list[float]] = {}
    for runs in chosen.values():
        for s, r in runs.items():
            by_seed.setdefault(s, []).append(100 * float(r["mIoU"]))
    rss_seeds = sum((x - statistics.fmean(xs)) ** 2 for xs in by_seed.values() for x in xs)
    df1, df2 = len(names) - 1, fit["df"]
    between = max(rss_seeds - rss_full, 0.0) / df1
    scale = sum(x * x for xs in by_seed.values() for x in xs)
    if rss_full > 1e-20 * scale:  # below that, rounding: the fit is exact
        f = between / (rss_full / df2)
        p = _regularized_beta(df2 / 2, df1 / 2, df2 / (df2 + df1 * f))
    else:  # an exact fit: any variant effect is certain, none is undefined
        f, p = (math.inf, 0.0) if between > 1e-20 * scale else (math.nan, math.nan)
    return {"variants": names, "runs": fit["runs"], "f": f, "df1": df1, "df2": df2, "p": p}


def _regularized_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b), the regularized incomplete beta function, by its continued fraction
    (modified Lentz), on the side where that converges fast."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    if x < (a + 1) / (a + b + 2):
        return front * _beta_fraction(a, b, x) / a
    return 1.0 - front * _beta_fraction(b, a, 1.0 - x) / b


def _beta_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (Lentz's method)."""
    tiny = 1e-300

    def guard(v: float) -> float:
        return v if abs(v) > tiny else tiny

    c, d = 1.0, 1.0 / guard(1.0 - (a + b) * x / (a + 1))
    h = d
    for m in range(1, 10_000):
        even = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        d = 1.0 / guard(1.0 + even * d)
        c = guard(1.0 + even / c)
        h *= d * c
        odd = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        d = 1.0 / guard(1.0 + odd * d)
        c = guard(1.0 + odd / c)
        step = d * c
        h *= step
        if abs(step - 1.0) < 1e-15:
            break
    return h


def format_f_test(test: Mapping[str, Any], label: str = "") -> str:
    """One line for :func:`variant_f_test`."""
    what = f" ({label})" if label else ""
    return (
        f"variant effects{what}, F test of variant + seed against seed alone over"
        f" {len(test['variants'])} variants ({test['runs']} runs): F = {test['f']:.2f} on"
        f" ({test['df1']}, {test['df2']}) df, p = {test['p']:.3f}"
    )


def _moved(pairs: list[tuple[Rates, Rates]], leave_out: int | None = None) -> tuple[int, int]:
    """How many (variant, baseline) pairs of :func:`_rates` lower the class-mean recall, and
    how many raise the class-mean precision (without class ``leave_out`` where one is given)."""
    means = [(_class_means(a, leave_out), _class_means(b, leave_out)) for a, b in pairs]
    return (
        sum(mine[0] < theirs[0] for mine, theirs in means),
        sum(mine[1] > theirs[1] for mine, theirs in means),
    )


def marked_first(classes: Collection[str], mark: Collection[str]) -> list[str]:
    """The classes in ``mark`` (in its order) first, then the others in their own order.

    Example:
        >>> marked_first(["Sky", "Bicyclist", "Pole"], ("Pole", "Bicyclist"))
        ['Pole', 'Bicyclist', 'Sky']
    """
    return [c for c in mark if c in classes] + [c for c in classes if c not in mark]


def format_paired_summary(
    summary: Mapping[str, Mapping[str, Any]], mark: Collection[str] = (), baseline: str = "baseline"
) -> str:
    """The text table of :func:`summarize_paired`: one row per variant (mIoU, paired
    difference, own and pooled SE, per-seed differences; a line naming the variants with
    runs on seeds the baseline lacks), then the per-class IoU deltas
    (classes in ``mark``, the rare ones, first and starred), then the recall / precision
    deltas (class means, then the marked classes)."""
    w = max([14, *map(len, summary)])
    lines = [
        f"{'variant':<{w}} {'runs':>4} {'mIoU':>7} {'std':>6} {'paired diff':>12} {'SE':>6}"
        f" {'pooled SE':>9} {'95 % interval':>15}  per-seed diffs"
    ]
    for name, e in summary.items():
        diff = e.get("diff_mean", math.nan)
        se = e.get("diff_se", math.nan)
        pooled = e.get("diff_se_pooled", math.nan)
        per = " ".join(f"{d:+.2f}" for d in e.get("paired_diff", []))
        lo, hi = e.get("diff_ci_pooled", (math.nan, math.nan))
        interval = f"{lo:+.2f} to {hi:+.2f}" if math.isfinite(lo) else "nan"
        if name == baseline:
            lines.append(f"{name:<{w}} {len(e['mIoU']):>4} {e['mean']:7.2f} {e['std']:6.2f}")
            continue
        lines.append(
            f"{name:<{w}} {len(e['mIoU']):>4} {e['mean']:7.2f} {e['std']:6.2f} {diff:+12.2f}"
            f" {se:6.2f} {pooled:9.2f} {interval:>15}  {per}"
        )
    pooled_of = [e for e in summary.values() if "pooled_sd" in e]
    if pooled_of:
        lines.append(
            f"pooled SE: the per-seed SD of a paired difference pooled over the variants,"
            f" {pooled_of[0]['pooled_sd']:.2f} ({pooled_of[0]['pooled_df']} degrees of freedom),"
            " over sqrt(runs); 95 % interval: the mean +- t on those degrees of freedom times"
            " the pooled SE"
        )
    unpaired = [
        f"{name} ({len(e['mIoU'])} runs, {len(e.get('paired_seeds', []))} paired)"
        for name, e in summary.items()
        if name != baseline and len(e.get("paired_seeds", [])) < len(e["mIoU"])
    ]
    if unpaired:  # a row's mIoU and std then cover more seeds than its paired difference
        lines.append(
            "runs on seeds the baseline lacks count in mIoU and std, not in the paired"
            " difference: " + ", ".join(unpaired)
        )
    deltas = {n: e["class_delta"] for n, e in summary.items() if "class_delta" in e}
    if deltas:
        ordered = marked_first(list(next(iter(deltas.values()))), mark)
        cw = max([9, *map(len, deltas)])
        lw = max([18, *(len(c) + 3 for c in ordered)])
        lines.append("")
        lines.append(f"{'class (IoU delta)':<{lw}}" + "".join(f" {n:>{cw}}" for n in deltas))
        for c in ordered:
            star = " *" if c in mark else ""
            lines.append(
                f"{c + star:<{lw}}" + "".join(f" {d[c]:+{cw}.2f}" for d in deltas.values())
            )
    rates = {n: e for n, e in summary.items() if "recall_delta" in e}
    if rates:
        marked = [c for c in mark if c in next(iter(rates.values()))["recall_delta"]]
        lines.append("")
        lines.append(
            "recall / precision delta (points, paired): recall = 1 - FN rate, precision ="
            " 1 - FP share; mean over classes" + (", then the starred ones" if marked else "")
        )
        header = "".join(f" {c:>13}" for c in marked)
        lines.append(f"{'variant':<{w}} {'recall':>7} {'precision':>9}{header}")
        for name, e in rates.items():
            cells = "".join(
                f" {e['recall_delta'][c]:+6.1f}/{e['precision_delta'][c]:+6.1f}" for c in marked
            )
            lines.append(
                f"{name:<{w}} {e['mean_recall_delta']:+7.2f} {e['mean_precision_delta']:+9.2f}"
                + cells
            )
    return "\n".join(lines)


def format_pooled_effect(effect: Mapping[str, Any]) -> str:
    """Lines for :func:`pooled_effect`: the pooled difference with its Welch SE; the
    per-seed differences with their SE and 95 % t interval over the seeds; and, where the
    runs kept confusion matrices, how many moved recall down and precision up."""
    e = effect
    per = ", ".join(f"seed {s} {d:+.2f}" for s, d in e["seed_diff"].items())
    lo, hi = e.get("seed_diff_ci", (math.nan, math.nan))
    rates = (
        f"\n  paired runs with confusion matrices: {e['rate_runs']}; class-mean recall falls in"
        f" {e['recall_falls']}, precision rises in {e['precision_rises']}"
        if e.get("rate_runs")
        else ""
    )
    without = e.get("rates_without") or {}
    if without:  # the class whose omission moves the two counts most
        both = (e["recall_falls"], e["precision_rises"])
        name, counts = max(
            without.items(), key=lambda item: abs(item[1][0] - both[0]) + abs(item[1][1] - both[1])
        )
        rates += (
            f"\n  leaving one class out of the means at a time, the counts move most without"
            f" {name}: recall falls in {counts[0]}, precision rises in {counts[1]}"
        )
    return (
        f"all RCH runs pooled: {e['runs']} runs of {e['variants']} variant(s), mean"
        f" {e['mean']:.2f}, against {e['baseline_runs']} baseline runs, mean"
        f" {e['baseline_mean']:.2f}: {e['diff']:+.2f} (Welch SE {e['se']:.2f},"
        f" {e['df']:.1f} df)\n"
        f"  by seed (RCH runs' mean minus that seed's baseline): {per}; mean"
        f" {e['seed_diff_mean']:+.2f}, SE over seeds {e['seed_diff_se']:.2f}, 95 % t interval"
        f" {lo:+.2f} to {hi:+.2f}" + rates
    )


def format_additive_effects(fit: Mapping[str, Any]) -> str:
    """Lines for :func:`additive_effects`: the residual SD and its degrees of freedom, the
    seed effects, then each variant's effect against the baseline with its SE and 95 %
    t interval."""
    seeds = ", ".join(f"seed {s} {b:+.2f}" for s, b in fit["seed_effects"].items())
    lines = [
        f"two-way additive fit (variant + seed, least squares over all {fit['runs']} runs):"
        f" residual SD {fit['residual_sd']:.2f} ({fit['df']} df); seed effects {seeds}",
        f"  {'variant':<22}{'runs':>5}{'effect':>9}{'SE':>7}  95 % interval",
    ]
    for name, e in fit["effects"].items():
        lo, hi = e["ci"]
        row = f"  {name:<22}{e['seeds']:>5}{e['effect']:>+9.2f}{e['se']:>7.2f}"
        lines.append(f"{row}  {lo:+.2f} to {hi:+.2f}")
    return "\n".join(lines)
