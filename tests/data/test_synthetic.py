"""The generated default dataset: deterministic, cached, and hard in the intended ways."""

from __future__ import annotations

import numpy as np

from rch.data import build_dataset
from rch.data.synthetic import SYNTHETIC_CLASSES, ensure_synthetic, render_scene


def test_scenes_are_deterministic_and_use_every_class():
    a, la = render_scene(3)
    b, lb = render_scene(3)
    assert np.array_equal(a, b) and np.array_equal(la, lb)
    seen = set()
    for seed in range(20):
        seen |= set(np.unique(render_scene(seed)[1]).tolist())
    assert seen == set(range(len(SYNTHETIC_CLASSES)))


def test_colour_twins_share_colour_and_differ_in_texture():
    # road and sidewalk: the same asphalt colour; the sidewalk's tile joints raise its variance
    image, label = render_scene(1, 96, 128)
    road, walk = image[label == 3].astype(float), image[label == 4].astype(float)
    assert abs(np.median(road) - np.median(walk)) < 25
    assert walk.std() > road.std()


def test_cache_is_built_once(tmp_path):
    root = ensure_synthetic(tmp_path, train=4, val=2, height=24, width=32, progress=False)
    stamp = (root / "images" / "train" / "00000.png").stat().st_mtime_ns
    again = ensure_synthetic(tmp_path, train=4, val=2, height=24, width=32, progress=False)
    assert again == root and (root / "images" / "train" / "00000.png").stat().st_mtime_ns == stamp
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]
    ds = build_dataset("synthetic", tmp_path, "val", train=4, val=2, height=24, width=32)
    assert len(ds) == 2 and ds.info.classes == SYNTHETIC_CLASSES
    image, mask = ds[1]
    assert image.shape == (3, 24, 32) and int(mask.max()) < 10


def test_empty_root_means_the_default_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RCH_CACHE", str(tmp_path / "default"))
    monkeypatch.chdir(tmp_path)
    ds = build_dataset("synthetic", "", "val", train=2, val=1, height=16, width=16)
    assert ds.pairs[0][0].is_relative_to(tmp_path / "default")
    assert [p.name for p in tmp_path.iterdir()] == ["default"]
