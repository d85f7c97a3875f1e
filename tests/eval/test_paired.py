"""rch.eval.paired: paired differences, pooled SD and SE, pooled effect and their tables,
against hand computations."""

from __future__ import annotations

import math
import statistics
from typing import Any

import pytest

from rch.eval.paired import (
    format_paired_summary,
    format_pooled_effect,
    marked_first,
    pooled_diff_sd,
    pooled_effect,
    summarize_paired,
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
    text = format_pooled_effect(e)
    assert "5 runs of 2 variant(s)" in text and "-1.00 (Welch SE" in text and "seed 1 -1.00" in text
    assert pooled_effect({"baseline": results["baseline"]}) is None
    assert pooled_effect({"a": results["a"]}) is None


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
