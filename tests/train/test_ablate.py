"""rch.train.ablate: runs of variants x seeds, in one process or several."""

from __future__ import annotations

import json
import math
import statistics
from typing import Any

import pytest

from rch.errors import RCHError
from rch.eval.paired import paired_power, pooled_diff_sd
from rch.train import ablate as ablate_module
from rch.train.ablate import Variant, ablate, format_ablation, run_variants, variants

from .helpers import tiny_config

RUNS = [Variant("baseline", ("rch.enabled=false",)), Variant("full", ())]


def test_parallel_runs_equal_sequential_ones_and_report_in_seed_major_order(tmp_path):
    seen: dict[str, list[tuple[str, int]]] = {"one": [], "two": []}
    results = {}
    for key, jobs in (("one", 1), ("two", 2)):
        cfg = tiny_config(tmp_path / key, train={"threads": 1, "iters": 3})
        results[key] = run_variants(
            cfg,
            RUNS,
            seeds=(0, 1),
            progress=False,
            on_done=lambda name, seed, _, key=key: seen[key].append((name, seed)),
            jobs=jobs,
        )
    order = [("baseline", 0), ("full", 0), ("baseline", 1), ("full", 1)]
    assert seen["one"] == order and seen["two"] == order
    for name in ("baseline", "full"):
        one = [r["confusion"] for r in results["one"][name]]
        two = [r["confusion"] for r in results["two"][name]]
        assert one == two  # same seeds, same arithmetic: the same evaluation, bitwise
    assert (tmp_path / "two" / "runs" / "t-full-s1" / "eval.json").is_file()


def test_run_variants_rejects_zero_jobs(tmp_path):
    with pytest.raises(ValueError, match="jobs must be >= 1; got 0"):
        run_variants(tiny_config(tmp_path), RUNS, jobs=0)


def test_grid_variants_name_the_changed_value():
    names = [v.name for v in variants(["baseline"], grid=True)]
    assert names[0] == "baseline" and "tau=0.25" in names and "momentum=0.99" in names
    assert "tau=0.5" not in names  # the default is the full row, not a grid point


def test_train_threads_apply_to_the_run_only(tmp_path):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(3)  # differs from the run's 1 on any machine
    try:
        cfg = tiny_config(tmp_path, train={"threads": 1, "iters": 1})
        run_variants(cfg, RUNS[:1], progress=False)
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_a_finished_run_with_other_settings_is_not_reused(tmp_path):
    cfg = tiny_config(tmp_path, train={"iters": 1})
    first = run_variants(cfg, RUNS[:1], progress=False)
    again = run_variants(  # where the data and runs live may change
        tiny_config(tmp_path, train={"iters": 1, "log_every": 5}), RUNS[:1], progress=False
    )
    assert again == first
    longer = tiny_config(tmp_path, train={"iters": 2})
    with pytest.raises(RCHError, match=r"t-baseline-s0 with other settings \(train.iters\)"):
        run_variants(longer, RUNS[:1], progress=False)


def test_skipped_runs_are_neither_trained_nor_reported(tmp_path):
    cfg = tiny_config(tmp_path, train={"threads": 1, "iters": 1})
    seen: list[tuple[str, int]] = []
    results = run_variants(
        cfg,
        RUNS,
        seeds=(0, 1),
        progress=False,
        on_done=lambda name, seed, _: seen.append((name, seed)),
        skip=[("full", 0), ("baseline", 1)],
    )
    assert seen == [("baseline", 0), ("full", 1)]
    assert [len(results[n]) for n in ("baseline", "full")] == [1, 1]
    runs = tmp_path / "runs"
    assert not (runs / "t-full-s0").exists() and not (runs / "t-baseline-s1").exists()


def test_format_ablation_matches_a_hand_computation():
    results = {"baseline": [0.40, 0.42, 0.44], "a": [0.41, 0.42, 0.47], "b": [0.40, 0.40, 0.40]}
    rows = {line.split()[0]: line.split()[1:] for line in format_ablation(results).splitlines()}
    se = statistics.stdev([1, 0, 3]) / math.sqrt(3)  # paired differences 1, 0, 3
    assert rows["a"] == ["43.33", "3.21", "+1.33", f"{se:.2f}", "3"]
    assert rows["b"][2] == "-2.00"
    assert rows["baseline"] == ["42.00", "2.00", "3"]  # no delta against itself
    assert format_ablation({"a": [0.5]}).splitlines()[1].split() == ["a", "50.00", "nan", "1"]
    with pytest.raises(ValueError, match="'a': not as many seeds as 'baseline'"):
        format_ablation({"baseline": [0.4, 0.5], "a": [0.4]})


def test_ablate_reports_the_resolving_power_of_its_paired_test(tmp_path, monkeypatch):
    """The runs are stubbed: ``ablate`` compares them, fits them, and says how well its
    pooled SD resolves a 1- and a 0.5-point effect at 3, 5 and its own number of seeds."""
    diffs = {"tp": [0.5, 1.5, -0.2, 1.0], "full": [0.0, -1.0, 0.8, 0.4]}

    def fake_runs(cfg: Any, rows: Any, seeds: Any, *args: Any, **kwargs: Any) -> dict:
        def run(miou: float) -> dict[str, Any]:
            return {"mIoU": miou, "IoU": {"a": miou}}

        found = {"baseline": [run(0.5) for _ in seeds]}
        found |= {n: [run(0.5 + d / 100) for d in diffs[n]] for n in ("tp", "full")}
        return found

    monkeypatch.setattr(ablate_module, "run_variants", fake_runs)
    cfg = tiny_config(tmp_path)
    result = ablate(cfg, rows=["baseline", "tp", "full"], seeds=[0, 1, 2, 3], progress=False)
    sd, df = pooled_diff_sd(diffs.values())
    assert result.power is not None and result.power["df"] == df == 6
    assert result.power["sd"] == pytest.approx(sd)
    one = result.power["rows"][0]
    assert one["effect"] == 1.0 and one["seeds"] == [3, 4, 5]
    assert one["power"][1] == pytest.approx(paired_power(1.0, sd, 4, df=6))
    assert "resolving power" in result.format()
    written = json.loads(result.path.read_text())
    assert written["power"]["rows"][1]["seeds_needed"] == result.power["rows"][1]["seeds_needed"]
    # and whether the rows differ at all: the RCH rows alone, and with the baseline
    rows = result.f_tests["RCH rows"]
    assert rows["variants"] == ["tp", "full"] and (rows["df1"], rows["df2"]) == (1, 3)
    paired = [a - b for a, b in zip(diffs["tp"], diffs["full"], strict=True)]  # F = t^2
    t = statistics.fmean(paired) / (statistics.stdev(paired) / math.sqrt(4))
    assert rows["f"] == pytest.approx(t**2, rel=1e-9)
    assert result.f_tests["every variant"]["df1"] == 2
    assert set(written["f_tests"]) == {"RCH rows", "every variant"}
    assert "F test of variant + seed against seed alone over 2 variants" in result.format()
