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


def test_import_rch_viz_is_optional_for_rch():
    code = "import sys, rch, rch.train; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
