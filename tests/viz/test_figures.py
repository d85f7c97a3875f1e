"""Each figure is drawn from a tiny run, without error, with the expected panels."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from rch.viz import collect, figures, load_scores, pixel_scores


@pytest.fixture(scope="module")
def samples(runs):
    return [collect(r, limit=3, n_images=2, per_class=20) for r in runs]


def test_collect_gathers_what_the_figures_need(samples):
    base, rch = samples
    assert base.name == "baseline" and rch.name == "rch"
    assert len(base.views) == 2 and base.views[0][0].shape == (32, 48, 3)
    assert not base.maps and len(rch.maps) == 2  # phi/psi maps need the RCH head
    phi, psi, wrong = rch.maps[0]
    assert phi.shape == psi.shape == wrong.shape == (4, 6)
    total = sum(len(v) for v in base.scores.values()) - len(base.scores["fp"])
    assert total > 0 and len(base.scores["fn"]) == len(base.scores["fp"])
    sim = base.similarity
    present = ~np.isnan(np.diag(sim))
    assert present.any() and np.allclose(sim, sim.T, equal_nan=True)
    assert np.all(np.diag(sim)[present] <= 1 + 1e-6)
    counts = np.bincount(base.point_labels)
    assert counts.max() <= 20 and len(base.points) == len(base.point_labels)


def test_pixel_scores_split_by_outcome():
    import torch

    logits = torch.tensor([[[[3.0, 0.0, 1.0]], [[0.0, 2.0, 5.0]]]])  # pred 0, 1, 1
    s = pixel_scores(logits, torch.tensor([[[0, 0, 255]]]), 255)
    assert s["tp"].tolist() == [3.0] and s["fn"].tolist() == [0.0] and s["fp"].tolist() == [2.0]


def test_every_figure_has_its_panels(samples, runs, tmp_path):
    rch = samples[1]
    cases = {
        "scores": (figures.plot_score_distributions(samples, tmp_path / "s.png"), 3),
        "maps": (figures.plot_calibration_maps(rch, tmp_path / "m.png"), 2 * 4 + 2 * 2),
        "similarity": (figures.plot_similarity(samples, tmp_path / "c.png"), 2 + 2),
        "tsne": (figures.plot_tsne(samples, tmp_path / "t.png"), 2),
        "predictions": (figures.plot_predictions(samples, tmp_path / "p.png"), 2 * 4),
    }
    (sa, classes), (sb, _) = load_scores(runs[0]), load_scores(runs[1])
    cases["delta"] = (figures.plot_iou_delta(sa, sb, classes, tmp_path / "d.png"), 1)
    curves = {"a": {"loss": [(1, 2.0), (2, 1.0)]}, "b": {"loss": [(1, 2.5)], "mIoU": [(2, 3.0)]}}
    cases["curves"] = (figures.plot_training_curves(curves, tmp_path / "l.png"), 2)
    for name, (fig, panels) in cases.items():
        assert len(fig.axes) == panels, name  # colour bars count as axes
    for png in tmp_path.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 2000


def test_paired_differences_plot_the_means_with_their_intervals(tmp_path):
    diffs = {"a": [1.0, -0.5, 0.2], "b": [-1.5]}
    fig = figures.plot_paired_differences(
        diffs, tmp_path / "p.png", se={"a": 0.4, "b": 0.8}, reference=1.0, reference_label="x"
    )
    (ax,) = fig.axes
    bars = {round(float(c.lines[0].get_ydata()[0])): c for c in ax.containers}
    assert set(bars) == {0, 1}  # "a" on top (y = 1), "b" below
    assert bars[1].lines[0].get_xdata()[0] == pytest.approx(np.mean(diffs["a"]))
    low, high = bars[0].lines[2][0].get_segments()[0][:, 0]  # the interval of "b"
    assert (low, high) == pytest.approx((-1.5 - 1.96 * 0.8, -1.5 + 1.96 * 0.8))
    from matplotlib.collections import PathCollection  # the scatter's dots

    dots = np.concatenate(
        [c.get_offsets()[:, 0] for c in ax.collections if isinstance(c, PathCollection)]
    )
    assert sorted(dots) == sorted([*diffs["a"], *diffs["b"]])
    with pytest.raises(ValueError, match="no difference for b"):
        figures.plot_paired_differences({"a": [1.0], "b": []}, tmp_path / "q.png")


def test_paired_differences_draw_t_intervals_where_degrees_of_freedom_are_given(tmp_path):
    """An SE from a handful of seeds gets Student's t, not 1.96: with 2 degrees of freedom
    the bar is 4.303 SE each side; a variant missing from ``df`` keeps the normal bar."""
    fig = figures.plot_paired_differences(
        {"a": [1.0, -0.5, 0.2], "b": [-1.5]},
        tmp_path / "p.png",
        se={"a": 0.4, "b": 0.8},
        df={"a": 2},
    )
    (ax,) = fig.axes
    bars = {round(float(c.lines[0].get_ydata()[0])): c for c in ax.containers}
    mean = np.mean([1.0, -0.5, 0.2])
    low, high = bars[1].lines[2][0].get_segments()[0][:, 0]
    assert (low, high) == pytest.approx((mean - 4.3027 * 0.4, mean + 4.3027 * 0.4), abs=1e-3)
    low, high = bars[0].lines[2][0].get_segments()[0][:, 0]
    assert (low, high) == pytest.approx((-1.5 - 1.96 * 0.8, -1.5 + 1.96 * 0.8))
    assert ax.get_title().endswith("bars: 95 % intervals")  # not all of them t intervals
    fig = figures.plot_paired_differences(
        {"a": [1.0, 0.0]}, tmp_path / "q.png", se={"a": 0.5}, df={"a": 1}
    )
    assert fig.axes[0].get_title().endswith("bars: 95 % intervals (t)")


def test_paired_differences_add_a_fitted_estimate_below_the_mean(tmp_path):
    """``fitted`` draws another estimate of a variant's effect as a hollow square just below
    its diamond, with that estimate's own (asymmetric-capable) interval."""
    fig = figures.plot_paired_differences(
        {"a": [1.0, -0.5, 0.2], "b": [-1.5]},
        tmp_path / "p.png",
        se={"a": 0.4, "b": 0.8},
        fitted={"b": (-0.9, -2.0, 0.4)},
    )
    (ax,) = fig.axes
    squares = [c for c in ax.containers if c.lines[0].get_marker() == "s"]
    assert len(squares) == 1  # only "b" has a fitted estimate
    (square,) = squares
    assert square.lines[0].get_xdata()[0] == pytest.approx(-0.9)
    assert square.lines[0].get_ydata()[0] == pytest.approx(0 - 0.28)  # "b" is the bottom row
    low, high = square.lines[2][0].get_segments()[0][:, 0]
    assert (low, high) == pytest.approx((-2.0, 0.4))
    assert ax.get_title().endswith("squares: variant + seed fit")


def test_class_deltas_heat_map_is_symmetric_about_zero(tmp_path):
    deltas = {"a": {"Pole": 2.0, "Sky": -0.5}, "b": {"Pole": -3.0, "Sky": float("nan")}}
    fig = figures.plot_class_deltas(deltas, tmp_path / "c.png", mark=["Pole"])
    ax = fig.axes[0]
    (image,) = ax.images
    assert image.get_clim() == (-3.0, 3.0)
    np.testing.assert_array_equal(image.get_array(), [[2.0, -0.5], [-3.0, np.nan]])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["Pole *", "Sky"]
    assert "+2.0" in [t.get_text() for t in ax.texts]
    with pytest.raises(ValueError, match="b name other classes"):
        figures.plot_class_deltas({"a": {"Pole": 1.0}, "b": {"Sky": 1.0}}, tmp_path / "d.png")


def test_import_rch_viz_is_optional_for_rch():
    code = "import sys, rch, rch.train; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
