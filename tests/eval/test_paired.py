"""rch.eval.paired: paired differences, pooled SD and SE, pooled effect and their tables,
against hand computations."""

from __future__ import annotations

import math
import re
import statistics
from typing import Any

import pytest
import torch
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from rch.eval.paired import (
    _regularized_beta,
    additive_effects,
    format_additive_effects,
    format_f_test,
    format_paired_summary,
    format_pooled_effect,
    format_power_table,
    marked_first,
    paired_power,
    pooled_diff_sd,
    pooled_dofs,
    pooled_effect,
    power_table,
    prespecified_test,
    seeds_for_power,
    student_t_cdf,
    student_t_critical,
    summarize_paired,
    variant_f_test,
)


def test_paired_differences_pair_by_seed_not_by_position():
    base = {3: {"mIoU": 0.3, "IoU": {"a": 0.3}}, 5: {"mIoU": 0.5, "IoU": {"a": 0.5}}}
    summary = summarize_paired({"baseline": base, "x": {5: {"mIoU": 0.6, "IoU": {"a": 0.7}}}})
    x = summary["x"]
    assert x["paired_seeds"] == [5] and x["paired_diff"] == pytest.approx([10.0])
    assert x["class_delta"] == pytest.approx({"a": 20.0}) and math.isnan(x["diff_se"])
    assert summary["baseline"]["mean"] == pytest.approx(40.0)
    assert summary["baseline"]["std"] == pytest.approx(100 * statistics.stdev([0.3, 0.5]))
    # a variant named otherwise is the reference when asked
    other = summarize_paired({"ref": base, "x": {3: {"mIoU": 0.4, "IoU": {}}}}, baseline="ref")
    assert other["x"]["paired_diff"] == pytest.approx([10.0]) and "paired_diff" not in other["ref"]


def test_summary_names_the_runs_left_out_of_the_paired_difference():
    """A variant run on a seed the baseline lacks counts in its mean, not in its paired
    difference; the table says so, and names only such variants."""
    base = {0: {"mIoU": 0.50, "IoU": {}}, 1: {"mIoU": 0.52, "IoU": {}}}
    both = {0: {"mIoU": 0.51, "IoU": {}}, 1: {"mIoU": 0.53, "IoU": {}}}
    extra = {**both, 7: {"mIoU": 0.60, "IoU": {}}}
    summary = summarize_paired({"baseline": base, "x": extra, "y": both})
    assert summary["x"]["paired_seeds"] == [0, 1]
    assert summary["x"]["diff_mean"] == pytest.approx(1.0)
    assert summary["x"]["mean"] == pytest.approx(100 * statistics.fmean([0.51, 0.53, 0.60]))
    text = format_paired_summary(summary)
    assert "x (3 runs, 2 paired)" in text and "y (" not in text
    assert "seeds the baseline lacks" not in format_paired_summary(
        summarize_paired({"baseline": base, "y": both})
    )


def test_pools_the_spread_of_paired_differences_over_variants():
    """A variant's own SE rests on 2 degrees of freedom; the pooled SD weighs each variant's
    variance by its degrees of freedom, and gives a single-seed variant an SE too."""
    sd, df = pooled_diff_sd([[1.0, 3.0], [0.0, 0.0, 3.0], [5.0]])
    assert df == 3 and sd == pytest.approx(math.sqrt((2.0 * 1 + 3.0 * 2) / 3))
    nan_sd, zero = pooled_diff_sd([[5.0]])
    assert zero == 0 and math.isnan(nan_sd)
    base = {s: {"mIoU": 0.5, "IoU": {}} for s in (0, 1, 2)}
    runs = {
        "baseline": base,
        "a": {0: {"mIoU": 0.51, "IoU": {}}, 1: {"mIoU": 0.53, "IoU": {}}},
        "b": {
            0: {"mIoU": 0.50, "IoU": {}},
            1: {"mIoU": 0.50, "IoU": {}},
            2: {"mIoU": 0.53, "IoU": {}},
        },
        "c": {2: {"mIoU": 0.55, "IoU": {}}},
    }
    summary = summarize_paired(runs)
    assert "diff_se_pooled" not in summary["baseline"]
    assert summary["c"]["diff_se_pooled"] == pytest.approx(sd)  # one seed: the pooled SD
    assert summary["b"]["diff_se_pooled"] == pytest.approx(sd / math.sqrt(3))
    t3 = 3.1824  # Student's t, 3 degrees of freedom, 95 %: the pooled SD's
    lo, hi = summary["b"]["diff_ci_pooled"]
    half = t3 * sd / math.sqrt(3)
    assert (lo, hi) == pytest.approx((1.0 - half, 1.0 + half), abs=1e-3)
    assert pooled_dofs(summary) == {"a": 3, "b": 3, "c": 3}
    assert "+1.00" in format_paired_summary(summary) and "95 % interval" in (
        format_paired_summary(summary)
    )
    alone = summarize_paired({"baseline": base, "c": runs["c"]})  # no spread to pool
    assert all(math.isnan(v) for v in alone["c"]["diff_ci_pooled"])
    assert pooled_dofs(alone) == {}
    assert "pooled SE" in format_paired_summary(summary)


def test_pooled_effect_pools_every_rch_run_and_pairs_by_seed():
    """All RCH runs against all baseline runs (Welch), and per seed against that seed's
    baseline; nothing without both."""

    def run(miou: float) -> dict[str, Any]:
        return {"mIoU": miou / 100, "IoU": {}}

    results = {
        "baseline": {0: run(50), 1: run(52), 2: run(51)},
        "a": {0: run(49), 1: run(52)},
        "b": {0: run(51), 1: run(50), 3: run(48)},  # seed 3 has no baseline: pooled only
    }
    e = pooled_effect(results)
    rch, base = [49, 52, 51, 50, 48], [50, 52, 51]
    assert (e["runs"], e["variants"], e["baseline_runs"]) == (5, 2, 3)
    assert e["diff"] == pytest.approx(50 - 51)
    vr, vb = statistics.variance(rch) / 5, statistics.variance(base) / 3
    assert e["se"] == pytest.approx(math.sqrt(vr + vb))
    assert e["df"] == pytest.approx((vr + vb) ** 2 / (vr**2 / 4 + vb**2 / 2))
    assert e["seed_diff"] == pytest.approx({0: 0.0, 1: -1.0})  # seed 2: no RCH run
    assert e["seed_diff_mean"] == pytest.approx(-0.5)
    assert e["seed_diff_se"] == pytest.approx(statistics.stdev([0, -1]) / math.sqrt(2))
    half = 12.7062 * statistics.stdev([0, -1]) / math.sqrt(2)  # t(1) for two seeds
    assert e["seed_diff_ci"] == pytest.approx((-0.5 - half, -0.5 + half), abs=1e-3)
    assert e["rate_runs"] == 0  # no confusion matrices: nothing counted, nothing printed
    text = format_pooled_effect(e)
    assert "5 runs of 2 variant(s)" in text and "-1.00 (Welch SE" in text and "seed 1 -1.00" in text
    assert "95 % t interval" in text and "confusion" not in text
    assert pooled_effect({"baseline": results["baseline"]}) is None
    assert pooled_effect({"a": results["a"]}) is None
    one_seed = pooled_effect({"baseline": results["baseline"], "a": {0: run(49)}})
    assert all(math.isnan(v) for v in one_seed["seed_diff_ci"])


@pytest.mark.parametrize(
    ("df", "level", "table"),  # printed tables of Student's t, to their three decimals
    [(1, 0.95, 12.706), (2, 0.95, 4.303), (3, 0.95, 3.182), (4, 0.95, 2.776), (5, 0.95, 2.571),
     (10, 0.95, 2.228), (22, 0.95, 2.074), (30, 0.95, 2.042), (4, 0.99, 4.604), (9, 0.90, 1.833),
     (1, 0.5, 1.000), (2, 0.5, 0.816)],
)  # fmt: skip
def test_student_t_critical_matches_the_printed_table(df: int, level: float, table: float):
    assert student_t_critical(df, level) == pytest.approx(table, abs=6e-4)


def test_student_t_critical_tends_to_the_normal_and_refuses_bad_arguments():
    assert student_t_critical(10_000) == pytest.approx(1.95996, abs=1e-3)
    assert student_t_critical(3) > student_t_critical(4) > student_t_critical(5)
    for df in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="df must be a positive integer"):
            student_t_critical(df)  # type: ignore[arg-type]
    for level in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="level must lie in"):
            student_t_critical(4, level)


def _t_cdf_by_simpson(t: float, df: int, steps: int = 20_000) -> float:
    """P(T <= t) as 1/2 plus the integral of Student's density from 0 to t (Simpson)."""
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    density = lambda x: c * (1 + x * x / df) ** (-(df + 1) / 2)  # noqa: E731
    h = t / steps
    inner = sum((4 if i % 2 else 2) * density(i * h) for i in range(1, steps))
    return 0.5 + h / 3 * (density(0.0) + inner + density(t))


@settings(max_examples=40, deadline=None)
@given(t=st.floats(-8.0, 8.0), df=st.integers(1, 120))
@example(t=4.679539761001316e-09, df=1)  # 1 - t^2 / (1 + t^2) rounds to 1: the other side
def test_student_t_cdf_equals_the_integrated_density(t: float, df: int):
    assert student_t_cdf(t, df) == pytest.approx(_t_cdf_by_simpson(t, df), abs=1e-9)
    assert student_t_cdf(-t, df) == pytest.approx(1.0 - student_t_cdf(t, df), abs=1e-12)


@settings(max_examples=40, deadline=None)
@given(df=st.integers(1, 200), level=st.floats(0.05, 0.999))
def test_student_t_cdf_inverts_the_critical_value(df: int, level: float):
    assert student_t_cdf(student_t_critical(df, level), df) == pytest.approx((1 + level) / 2)


def test_student_t_cdf_limits_and_bad_arguments():
    assert student_t_cdf(math.inf, 3) == 1.0 and student_t_cdf(-math.inf, 3) == 0.0
    assert student_t_cdf(0.0, 5) == 0.5
    with pytest.raises(ValueError, match="df must be a positive integer"):
        student_t_cdf(1.0, 0)
    with pytest.raises(ValueError, match="t is NaN"):
        student_t_cdf(math.nan, 3)


def test_prespecified_test_reproduces_the_two_camvid_tests_on_record():
    """The numbers RESULTS.md wrote by hand for the lambda 0.3 and FN-margin tests."""
    lam = prespecified_test([0.82, -0.04], sd=0.82, df=49, planned=2, alternative="less")
    assert round(lam["bound"], 2) == -0.97 and round(lam["t"], 2) == 0.67
    assert round(lam["p"], 2) == 0.75 and lam["confirmed"] is False and lam["decided"]
    fn = prespecified_test([1.40, -1.96, -0.46, 0.01, 0.83], 0.83, 53, 5, "less")
    assert round(fn["bound"], 2) == -0.62 and round(fn["t"], 2) == -0.10
    assert round(fn["se"], 2) == 0.37 and fn["confirmed"] is False
    gain = prespecified_test([1.0] * 5, sd=0.85, df=56, planned=5, alternative="greater")
    assert round(gain["bound"], 2) == 0.64 and gain["confirmed"] is True  # as fixed in RESULTS
    assert gain["p"] == pytest.approx(1.0 - student_t_cdf(1.0 / (0.85 / math.sqrt(5)), 56))


def test_prespecified_test_waits_for_its_planned_pairs():
    part = prespecified_test([2.0, 3.0], sd=1.0, df=10, planned=5, alternative="greater")
    assert (part["n"], part["decided"], part["confirmed"]) == (2, False, None)
    assert part["mean"] == 2.5 and math.isnan(part["t"]) and math.isnan(part["p"])
    assert part["bound"] == pytest.approx(student_t_critical(10, 0.90) / math.sqrt(5))
    none = prespecified_test([], sd=1.0, df=10, planned=5, alternative="less")
    assert none["n"] == 0 and math.isnan(none["mean"]) and none["bound"] < 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"alternative": "two-sided"}, "alternative must be"),
        ({"sd": 0.0}, "sd must be positive"),
        ({"sd": math.nan}, "sd must be positive"),
        ({"planned": 1}, "planned must be an integer >= the 2 pairs"),
        ({"diffs": [1.0, math.nan]}, "a paired difference is NaN"),
        ({"level": 0.4}, "level must lie in (0.5, 1)"),
        ({"df": 0}, "df must be a positive integer"),
    ],
)
def test_prespecified_test_refuses_bad_arguments(kwargs: dict[str, Any], message: str):
    args: dict[str, Any] = {
        "diffs": [1.0, 2.0], "sd": 1.0, "df": 10, "planned": 3, "alternative": "greater"
    }  # fmt: skip
    with pytest.raises(ValueError, match=re.escape(message)):
        prespecified_test(**{**args, **kwargs})


def _normal_cdf(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def test_paired_power_is_the_level_at_no_effect_and_matches_the_printed_value():
    for df in (1, 2, 3, 4, 10, 41, 500):
        assert paired_power(0.0, 1.0, 5, df=df) == pytest.approx(0.05, abs=1e-7)
    assert paired_power(0.0, 2.0, 4, level=0.9) == pytest.approx(0.1, abs=1e-7)
    # R's power.t.test(n = 10, delta = 1, sd = 1, type = "one.sample"): 0.8030962
    assert paired_power(1.0, 1.0, 10) == pytest.approx(0.8030962, abs=2e-6)
    # a known SD (df -> infinity): the normal test's closed form
    z, shift = 1.959963984540054, 0.7 * math.sqrt(6) / 0.9
    normal = _normal_cdf(shift - z) + _normal_cdf(-shift - z)
    assert paired_power(0.7, 0.9, 6, df=10**4) == pytest.approx(normal, abs=2e-4)  # off by 7e-5


@pytest.mark.parametrize(
    ("effect", "sd", "seeds", "df"), [(1.0, 0.81, 5, 41), (0.5, 1.0, 4, None), (-2.0, 1.5, 3, 2)]
)
def test_paired_power_matches_a_simulated_t_test(
    effect: float, sd: float, seeds: int, df: int | None
) -> None:
    """Draw the paired mean and an independent SD estimate on ``df`` degrees of freedom, run
    the t test, count the rejections."""
    nu = seeds - 1 if df is None else df
    g = torch.Generator().manual_seed(0)
    draws = 200_000
    mean = effect + sd / math.sqrt(seeds) * torch.randn(draws, generator=g, dtype=torch.float64)
    chi2 = torch.randn(draws, nu, generator=g, dtype=torch.float64).square().sum(1)
    se = sd * (chi2 / nu).sqrt() / math.sqrt(seeds)
    rejected = (mean.abs() / se > student_t_critical(nu)).double().mean().item()
    assert paired_power(effect, sd, seeds, df=df) == pytest.approx(rejected, abs=5e-3)


@settings(max_examples=40, deadline=None)
@given(
    effect=st.floats(0.05, 3.0),
    sd=st.floats(0.2, 2.0),
    seeds=st.integers(2, 12),
    df=st.one_of(st.none(), st.integers(1, 60)),
)
def test_paired_power_grows_with_the_effect_and_the_seeds_and_ignores_its_sign(
    effect: float, sd: float, seeds: int, df: int | None
) -> None:
    p = paired_power(effect, sd, seeds, df=df)
    assert 0.05 - 1e-7 <= p <= 1.0
    assert paired_power(-effect, sd, seeds, df=df) == p
    assert paired_power(1.2 * effect, sd, seeds, df=df) >= p - 1e-9
    assert paired_power(effect, 1.2 * sd, seeds, df=df) <= p + 1e-9
    more = paired_power(effect, sd, seeds + 1, df=None if df is None else df)
    assert more >= p - 1e-9


def test_seeds_for_power_is_the_fewest_seeds_that_reach_the_target():
    assert seeds_for_power(1.0, 1.0) == 10  # 0.803 at 10 seeds, as printed above
    assert paired_power(1.0, 1.0, 9) < 0.8
    for effect, sd, df in [(1.0, 0.81, 41), (0.5, 0.81, 41), (0.3, 1.0, None), (2.0, 0.5, 3)]:
        n = seeds_for_power(effect, sd, df=df)
        assert paired_power(effect, sd, n, df=df) >= 0.8
        if n > (2 if df is None else 1):
            assert paired_power(effect, sd, n - 1, df=df) < 0.8
    assert seeds_for_power(1.0, 0.81, power=0.9, df=41) > seeds_for_power(1.0, 0.81, df=41)


def test_power_refuses_bad_arguments():
    with pytest.raises(ValueError, match="sd must be positive"):
        paired_power(1.0, 0.0, 5)
    with pytest.raises(ValueError, match="effect must be finite"):
        paired_power(math.nan, 1.0, 5)
    with pytest.raises(ValueError, match="seeds must be a positive integer"):
        paired_power(1.0, 1.0, 0)
    with pytest.raises(ValueError, match=r"df=0 \(seeds - 1: give df for a pooled SD\)"):
        paired_power(1.0, 1.0, 1)
    with pytest.raises(ValueError, match="power must lie in"):
        seeds_for_power(1.0, 1.0, power=0.01)
    with pytest.raises(ValueError, match="an effect of 0"):
        seeds_for_power(0.0, 1.0)
    with pytest.raises(ValueError, match="more than a million seeds"):
        seeds_for_power(1e-5, 1.0, df=10)


def test_power_table_reads_the_pooled_sd_of_a_summary_and_prints_every_cell():
    def run(miou: float) -> dict[str, Any]:
        return {"mIoU": miou, "IoU": {}}

    runs = {
        "baseline": {s: run(0.5) for s in range(4)},
        "x": {s: run(0.5 + d / 100) for s, d in enumerate([0.5, 1.5, -0.2, 1.0])},
        "y": {s: run(0.5 + d / 100) for s, d in enumerate([0.0, -1.0, 0.8])},
    }
    summary = summarize_paired(runs)
    table = power_table(summary, effects=[1.0, 0.5], seeds=[3, 5])
    assert table is not None
    sd, df = pooled_diff_sd([[0.5, 1.5, -0.2, 1.0], [0.0, -1.0, 0.8]])
    assert table["sd"] == pytest.approx(sd) and table["df"] == df == 5
    first = table["rows"][0]
    assert first["seeds"] == [3, 5]
    assert first["power"] == [pytest.approx(paired_power(1.0, sd, n, df=5)) for n in (3, 5)]
    assert first["seeds_needed"] == seeds_for_power(1.0, sd, df=5)
    text = format_power_table(table)
    assert f"pooled SD {sd:.2f} (5 df)" in text
    assert "3 seeds" in text and "5 seeds" in text and "seeds for 80 %" in text
    for row in table["rows"]:
        line = next(x for x in text.splitlines() if x.strip().startswith(f"{row['effect']:+.2f}"))
        assert [float(v) for v in line.split()[1:3]] == [round(p, 2) for p in row["power"]]
        assert int(line.split()[-1]) == row["seeds_needed"]
    # an SD far above the effect on 1 df: beyond a million seeds
    wide = {"baseline": {0: run(0.5), 1: run(0.5)}, "x": {0: run(0.0), 1: run(1.0)}}
    far = power_table(summarize_paired(wide), effects=[0.5], seeds=[3])
    assert far is not None and far["rows"][0]["seeds_needed"] is None
    assert format_power_table(far).splitlines()[-1].endswith("> 1e6")
    with pytest.raises(ValueError, match="power must lie in"):  # not a silent None
        power_table(summary, power=1.5)
    # no pooled SD: one seed each, or every difference the same
    assert power_table(summarize_paired({"baseline": {0: run(0.5)}, "x": {0: run(0.6)}})) is None
    same = {"baseline": {0: run(0.5), 1: run(0.6)}, "x": {0: run(0.51), 1: run(0.61)}}
    assert power_table(summarize_paired(same)) is None


def test_pooled_effect_counts_which_way_recall_and_precision_moved():
    """Each variant run against its own seed's baseline run, on the class means of recall
    (rows) and precision (columns) of its confusion matrix."""
    base = {"mIoU": 0.5, "IoU": {}, "confusion": [[3, 1], [1, 3]]}  # recall 75, precision 75
    sharper = {"mIoU": 0.5, "IoU": {}, "confusion": [[2, 2], [0, 4]]}  # recall 75, prec 83.3
    looser = {"mIoU": 0.5, "IoU": {}, "confusion": [[2, 2], [2, 2]]}  # recall 50, prec 50
    blind = {"mIoU": 0.5, "IoU": {}, "confusion": [[0, 4], [0, 4]]}  # recall 50, prec b only
    e = pooled_effect(
        {
            "baseline": {0: base, 1: base},
            "a": {0: sharper, 1: looser},
            "b": {0: blind, 2: looser},  # seed 2 has no baseline run: not counted
            "c": {1: {"mIoU": 0.5, "IoU": {}}},  # no confusion matrix: not counted
        }
    )
    # blind: class a is never predicted, so its precision is undefined and the mean is b's 50
    assert (e["rate_runs"], e["recall_falls"], e["precision_rises"]) == (3, 2, 1)
    assert "confusion matrices: 3; class-mean recall falls in 2, precision rises in 1" in (
        format_pooled_effect(e)
    )
    # each class left out in turn. Without class 0 the recalls are b's: 1, 0.5, 1 against 0.75,
    # and the precisions 0.67, 0.5, 0.5. Without class 1 the recalls are a's: 0.5, 0.5, 0, and
    # the precisions 1, 0.5 and none (blind predicts only class 1)
    assert e["rates_without"] == {"class 0": (1, 0), "class 1": (3, 1)}
    assert "counts move most without class 0: recall falls in 1, precision rises in 0" in (
        format_pooled_effect(e)
    )
    named = {**base, "IoU": {"road": 0.6, "sign": 0.4}}  # names from the baseline's IoU keys
    e = pooled_effect({"baseline": {0: named}, "a": {0: sharper}})
    assert e["rates_without"] == {"road": (0, 0), "sign": (1, 1)}


def test_recall_and_precision_deltas_are_paired_by_seed():
    """Recall is TP over a class's labelled pixels (rows), precision TP over its predicted
    pixels (columns); a class never predicted has no precision, and the class mean skips it."""
    base = {"mIoU": 0.5, "IoU": {"a": 0.5, "b": 0.5}, "confusion": [[3, 1], [1, 3]]}
    better = {"mIoU": 0.6, "IoU": {"a": 0.6, "b": 0.6}, "confusion": [[4, 0], [1, 3]]}
    summary = summarize_paired({"baseline": {0: base, 1: base}, "x": {0: better, 1: base}})
    x = summary["x"]
    # seed 0: recall a 75 -> 100, precision a 75 -> 80, precision b 75 -> 100; seed 1: no change
    assert x["recall_delta"] == pytest.approx({"a": 12.5, "b": 0.0})
    assert x["precision_delta"] == pytest.approx({"a": 2.5, "b": 12.5})
    assert x["mean_recall_delta"] == pytest.approx(6.25)
    assert x["mean_precision_delta"] == pytest.approx(7.5)
    assert "recall / precision delta" in format_paired_summary(summary)
    # results written before confusions were kept: no recall / precision, no error
    old = {k: v for k, v in base.items() if k != "confusion"}
    assert "recall_delta" not in summarize_paired({"baseline": {0: old}, "x": {0: better}})["x"]


def test_the_table_puts_marked_classes_first_and_fits_long_names():
    base = {0: {"mIoU": 0.5, "IoU": {"Sky": 0.9, "a-very-long-class-name": 0.1, "Pole": 0.1}}}
    other = {0: {"mIoU": 0.6, "IoU": {"Sky": 0.9, "a-very-long-class-name": 0.3, "Pole": 0.2}}}
    text = format_paired_summary(summarize_paired({"baseline": base, "rch": other}), mark=["Pole"])
    rows = text.splitlines()
    first = rows.index(next(r for r in rows if r.startswith("class (IoU delta)")))
    assert rows[first + 1].split() == ["Pole", "*", "+10.00"]
    assert rows[first + 3].split() == ["a-very-long-class-name", "+20.00"]
    assert rows[1].split() == ["baseline", "1", "50.00", "nan"]
    assert marked_first(["Sky", "Pole"], ["Bicyclist", "Pole"]) == ["Pole", "Sky"]


def _runs(table: dict[str, dict[int, float]]) -> dict[str, dict[int, dict[str, Any]]]:
    return {
        n: {s: {"mIoU": v / 100, "IoU": {}} for s, v in seeds.items()} for n, seeds in table.items()
    }


def test_additive_fit_of_a_complete_design_is_the_paired_analysis():
    """Every variant on every seed: the effects are the paired mean differences, the
    residual is the two-way interaction (y - row mean - column mean + grand mean) on
    (variants - 1)(seeds - 1) degrees of freedom, and a contrast with the baseline has
    SE residual_sd * sqrt(2 / seeds)."""
    table = {
        "baseline": {0: 57.6, 1: 57.1, 2: 57.3, 3: 55.1},
        "a": {0: 57.2, 1: 56.0, 2: 57.9, 3: 55.9},
        "b": {0: 56.9, 1: 57.4, 2: 57.7, 3: 56.4},
    }
    fit = additive_effects(_runs(table))
    assert fit is not None and fit["df"] == 2 * 3 and fit["runs"] == 12
    seeds = range(4)
    grand = statistics.fmean(v for row in table.values() for v in row.values())
    col = {s: statistics.fmean(row[s] for row in table.values()) for s in seeds}
    ss = 0.0
    for name, row in table.items():
        row_mean = statistics.fmean(row.values())
        inter = {s: row[s] - row_mean - col[s] + grand for s in seeds}
        assert fit["residuals"][name] == pytest.approx(inter, abs=1e-9)
        ss += sum(v**2 for v in inter.values())
    sd = math.sqrt(ss / 6)
    assert fit["residual_sd"] == pytest.approx(sd, rel=1e-9)
    t = student_t_critical(6)
    for name in ("a", "b"):
        e = fit["effects"][name]
        paired = statistics.fmean(table[name][s] - table["baseline"][s] for s in seeds)
        assert e["effect"] == pytest.approx(paired, abs=1e-9)
        assert e["se"] == pytest.approx(sd * math.sqrt(2 / 4), rel=1e-9)
        assert e["ci"] == pytest.approx((paired - t * e["se"], paired + t * e["se"]), abs=1e-9)
        assert e["seeds"] == 4
    # seed effects relative to the first seed: column mean differences
    assert fit["seed_effects"] == pytest.approx({s: col[s] - col[0] for s in seeds}, abs=1e-9)


def test_additive_fit_does_not_let_one_baseline_draw_lift_only_the_variants_on_its_seed():
    """The baseline's seed-3 run is low by 2 points; the other variants say seed 3 costs 1.
    Paired, only the variant that has seed 3 gains from that draw (+0.25 against 0); the
    additive fit spreads the draw over the baseline's level, so the variant without seed 3
    gains from it too and the gap between the two narrows."""
    table = {
        "baseline": {0: 50.0, 1: 50.0, 2: 50.0, 3: 48.0},
        "with3": {0: 50.0, 1: 50.0, 2: 50.0, 3: 49.0},
        "without3": {0: 50.0, 1: 50.0, 2: 50.0},
        "other": {0: 51.0, 1: 51.0, 2: 51.0, 3: 50.0},
    }
    runs = _runs(table)
    paired = summarize_paired(runs)
    assert paired["with3"]["diff_mean"] == pytest.approx(0.25)
    assert paired["without3"]["diff_mean"] == pytest.approx(0.0, abs=1e-9)
    fit = additive_effects(runs)
    assert fit is not None
    e = fit["effects"]
    assert e["without3"]["effect"] > 0.1  # the baseline's low draw lowers its level
    assert 0 < e["with3"]["effect"] - e["without3"]["effect"] < 0.25 / 2
    assert fit["seed_effects"][3] == pytest.approx(-4 / 3)  # (-2 - 1 - 1) / 3 runs
    assert e["without3"]["seeds"] == 3 and e["without3"]["se"] > e["with3"]["se"]


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.floats(-3, 3), min_size=3, max_size=3),
    st.lists(st.floats(-3, 3), min_size=4, max_size=4),
    st.lists(st.booleans(), min_size=12, max_size=12),
)
def test_additive_fit_recovers_exact_additive_scores_whatever_runs_are_missing(
    effects: list[float], seed_effects: list[float], keep: list[bool]
):
    """Noise-free additive scores: the fit returns the true effects (against the baseline)
    and seed effects (against the first seed) from any set of runs that leaves the design
    connected (here: the baseline on every seed, every other variant on at least one)."""
    names = ["baseline", "x", "y", "z"]
    a = [0.0, *effects]
    table: dict[str, dict[int, float]] = {}
    for v, name in enumerate(names):
        seeds = {s for s in range(4) if v == 0 or keep[(v - 1) * 4 + s]} | {v % 4}
        if name == "x":
            seeds |= {0, 1}  # at least 8 runs for the 7 parameters
        table[name] = {s: 55.0 + a[v] + seed_effects[s] for s in sorted(seeds)}
    fit = additive_effects(_runs(table))
    assert fit is not None and fit["df"] >= 1
    for v, name in enumerate(names[1:], start=1):
        assert fit["effects"][name]["effect"] == pytest.approx(a[v], abs=1e-7)
    for s in range(4):
        assert fit["seed_effects"][s] == pytest.approx(seed_effects[s] - seed_effects[0], abs=1e-7)
    assert fit["residual_sd"] == pytest.approx(0.0, abs=1e-6)


def test_additive_fit_refuses_a_variant_that_shares_no_seed_and_needs_a_residual():
    base = {0: 50.0, 1: 51.0, 2: 49.0}
    alone = _runs({"baseline": base, "a": {0: 50.5, 1: 51.5, 2: 49.0}, "x": {3: 52.0}})
    with pytest.raises(ValueError, match="do not connect"):
        additive_effects(alone)
    assert additive_effects(_runs({"baseline": {0: 50.0}, "a": {0: 51.0}})) is None  # 0 df
    assert additive_effects(_runs({"a": {0: 51.0, 1: 52.0}})) is None  # no baseline
    assert additive_effects(_runs({"baseline": base})) is None  # nothing to compare


def test_format_additive_effects_lists_every_variant_with_its_interval():
    fit = additive_effects(
        _runs({"baseline": {0: 50.0, 1: 51.0, 2: 49.0}, "rch": {0: 51.0, 1: 51.5, 2: 50.5}})
    )
    assert fit is not None
    text = format_additive_effects(fit)
    e = fit["effects"]["rch"]
    assert f"over all {fit['runs']} runs" in text
    assert f"{e['effect']:+.2f}" in text and f"{e['ci'][0]:+.2f} to {e['ci'][1]:+.2f}" in text
    assert f"residual SD {fit['residual_sd']:.2f} ({fit['df']} df)" in text
    assert "seed 2 " in text


def test_f_test_p_values_match_the_t_table_and_closed_forms():
    for d2 in (1, 3, 7, 20, 45):  # F(1, d2) is t(d2) squared: the 95 % t value's p is 0.05
        f = student_t_critical(d2) ** 2
        assert _regularized_beta(d2 / 2, 0.5, d2 / (d2 + f)) == pytest.approx(0.05, abs=1e-12)
    for d2, f in ((4, 0.3), (9, 2.5), (30, 6.0)):  # F(2, d2): p = (1 + 2F / d2)^(-d2 / 2)
        p = _regularized_beta(d2 / 2, 1.0, d2 / (d2 + 2 * f))
        assert p == pytest.approx((1 + 2 * f / d2) ** (-d2 / 2), rel=1e-12)
    assert _regularized_beta(2.0, 3.0, 0.0) == 0.0 and _regularized_beta(2.0, 3.0, 1.0) == 1.0


def test_f_test_p_value_matches_a_simulated_f_distribution():
    g = torch.Generator().manual_seed(0)
    draws, d1, d2, f = 400_000, 5, 20, 3.6
    num = torch.randn(draws, d1, generator=g, dtype=torch.float64).square().sum(1) / d1
    den = torch.randn(draws, d2, generator=g, dtype=torch.float64).square().sum(1) / d2
    simulated = (num / den >= f).double().mean().item()
    assert _regularized_beta(d2 / 2, d1 / 2, d2 / (d2 + d1 * f)) == pytest.approx(
        simulated, abs=2e-3
    )


def test_variant_f_test_of_a_complete_design_is_the_two_way_anova():
    table = {
        "baseline": {0: 57.6, 1: 57.1, 2: 57.3, 3: 55.1},
        "a": {0: 57.2, 1: 56.0, 2: 57.9, 3: 55.9},
        "b": {0: 56.9, 1: 57.4, 2: 57.7, 3: 56.4},
    }
    test = variant_f_test(_runs(table))
    assert test is not None and test["variants"] == ["baseline", "a", "b"]
    twice = variant_f_test(_runs(table), ["a", "baseline", "a", "b"])
    assert twice is not None and twice["f"] == pytest.approx(test["f"]) and twice["df1"] == 2
    grand = statistics.fmean(v for row in table.values() for v in row.values())
    col = {s: statistics.fmean(row[s] for row in table.values()) for s in range(4)}
    ss_rows = 4 * sum((statistics.fmean(r.values()) - grand) ** 2 for r in table.values())
    ss_res = sum(
        (r[s] - statistics.fmean(r.values()) - col[s] + grand) ** 2
        for r in table.values()
        for s in range(4)
    )
    assert (test["df1"], test["df2"], test["runs"]) == (2, 6, 12)
    assert test["f"] == pytest.approx((ss_rows / 2) / (ss_res / 6), rel=1e-9)
    assert 0.0 < test["p"] < 1.0
    text = format_f_test(test, "Table 1")
    assert "(Table 1)" in text and "3 variants (12 runs)" in text and "(2, 6) df" in text
    assert f"F = {test['f']:.2f}" in text and f"p = {test['p']:.3f}" in text


@settings(max_examples=25, deadline=None)
@given(
    scores=st.lists(st.floats(50.0, 60.0), min_size=12, max_size=12),
    drop=st.sets(st.sampled_from([1, 2, 3, 5, 6, 7, 9, 10, 11]), max_size=3),
)
@example(  # seed 1 loses all three of its runs
    scores=[50.0, 51.3, 52.0, 57.1, 53.2, 59.0, 55.5, 51.1, 58.3, 50.4, 54.4, 56.6], drop={1, 5, 9}
)
def test_variant_f_test_equals_a_comparison_of_two_least_squares_fits(
    scores: list[float], drop: set[int]
) -> None:
    """Three variants on four seeds, up to three runs missing (never a seed-0 run, so the
    design stays connected; a seed may lose all its runs): F is the drop in the residual
    sum of squares from seeds alone to variant + seed, per variant degree of freedom, over
    the full fit's residual mean square, with both fits done by torch's least squares."""
    cells = [(v, s) for v in range(3) for s in range(4)]  # index 4 v + s: seed 0 at 0, 4, 8
    kept = [(c, y) for i, (c, y) in enumerate(zip(cells, scores, strict=True)) if i not in drop]
    table: dict[str, dict[int, float]] = {}
    for (v, s), y in kept:
        table.setdefault(f"v{v}", {})[s] = y
    test = variant_f_test(_runs(table))
    assert test is not None
    y = torch.tensor([t for _, t in kept], dtype=torch.float64)
    seed_x = torch.nn.functional.one_hot(torch.tensor([s for (_, s), _ in kept]), 4).double()
    var_x = torch.nn.functional.one_hot(torch.tensor([v for (v, _), _ in kept]), 3).double()

    def rss(x: torch.Tensor) -> float:
        coef = torch.linalg.lstsq(x, y[:, None], driver="gelsd").solution
        return float(((y[:, None] - x @ coef) ** 2).sum())

    full, seeds_only = rss(torch.cat([seed_x, var_x[:, 1:]], 1)), rss(seed_x)
    assume(full > 1e-6)  # scores that fit the additive model exactly are the refusals' case
    seeds = len({s for (_, s), _ in kept})  # 3 when all three of a seed's runs are dropped
    assert test["df1"] == 2 and test["df2"] == len(kept) - seeds - 2
    assert test["runs"] == len(kept)
    expected = ((seeds_only - full) / 2) / (full / test["df2"])
    assert test["f"] == pytest.approx(expected, rel=1e-6)


def test_variant_f_test_refuses_or_declines_what_it_cannot_test():
    table = {"a": {0: 50.0, 1: 51.0}, "b": {0: 52.0, 1: 53.5}}
    with pytest.raises(ValueError, match="no runs of variant"):
        variant_f_test(_runs(table), ["a", "nope"])
    assert variant_f_test(_runs(table), ["a"]) is None  # one variant: nothing to compare
    assert variant_f_test(_runs({"a": {0: 50.0}, "b": {0: 51.0}})) is None  # no residual df
    with pytest.raises(ValueError, match="do not connect"):
        variant_f_test(
            _runs({"a": {0: 50.0, 1: 51.0, 2: 49.0}, "b": {0: 52.0, 1: 53.5, 2: 50.0},
                   "c": {3: 52.0, 4: 53.0}})
        )  # fmt: skip
    exact = variant_f_test(_runs({"a": {0: 50.0, 1: 51.0}, "b": {0: 52.0, 1: 53.0}}))
    assert exact is not None and exact["f"] == math.inf and exact["p"] == 0.0
