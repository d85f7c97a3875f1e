"""The HTML report renders in headless Chromium without console errors, with its figures and
tables visible in a screenshot."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

from rch.cli import main
from rch.eval.metrics import scores_from_confusion
from rch.train.logger import json_safe
from rch.viz.report import load_scores


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("CI"):
        pytest.fail("Chromium is missing: `make test` installs Debian's chromium package")
    pytest.skip("Chromium is not installed here (apt-get install chromium)")


def _headless(*args: str) -> subprocess.CompletedProcess[str]:
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        "--enable-logging=stderr",
        "--v=0",
    ]
    return subprocess.run([_chromium(), *flags, *args], capture_output=True, text=True, timeout=120)


def test_report_renders_with_figures_and_tables(runs, tmp_path, capsys):
    out = tmp_path / "report"
    assert (
        main(
            [
                "report",
                str(runs[0]),
                str(runs[1]),
                "--out",
                str(out),
                "--limit",
                "3",
                "--images",
                "2",
            ]
        )
        == 0
    )
    assert f"report: {out / 'index.html'}" in capsys.readouterr().out
    page = (out / "index.html").read_text()
    assert page.count("data:image/png;base64,") == 7
    for title in (
        "Scores",
        "Per-class IoU",
        "Training cost",
        "Configuration differences",
        "Calibration statistics",
        "Figures",
    ):
        assert f"<h2>{title}" in page, title
    assert "rch.enabled" in page and "cos_other" in page
    assert "<th>precision delta</th>" in page and "<td>mPrecision</td>" in page
    url = (out / "index.html").as_uri()
    dom = _headless("--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert len(re.findall(r"<img ", dom.stdout)) == 7 and dom.stdout.count("<table>") >= 5
    console = [line for line in dom.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert not console, console
    shot = tmp_path / "shot.png"
    done = _headless("--window-size=1200,9000", f"--screenshot={shot}", url)
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    # the tables draw grey grid lines near the top; the figures put colour further down
    top, rest = pixels[:1500], pixels[1500:]
    grid = (np.abs(top - 204).sum(-1) < 12).sum()
    coloured = (np.ptp(rest, axis=-1) > 60).sum()
    assert grid > 2000, grid
    assert coloured > 20000, coloured


def test_load_scores_recomputes_from_the_confusion_and_reads_older_files(tmp_path):
    """eval.json's confusion gives every score (precision too); a file without one is read
    as written, with precision NaN where it was not written."""
    conf = [[5, 1, 0], [2, 2, 0], [0, 0, 0]]
    expected = scores_from_confusion(torch.tensor(conf))
    written = json_safe(expected.to_dict(["a", "b", "c"]))  # NaN -> null, as runs write it
    new = tmp_path / "new"
    new.mkdir()
    (new / "eval.json").write_text(json.dumps({**written, "confusion": conf}))
    scores, classes = load_scores(new)
    assert classes == ["a", "b", "c"] and repr(scores) == repr(expected)  # repr: NaN == NaN
    old = tmp_path / "old"
    old.mkdir()
    legacy = {k: v for k, v in written.items() if k not in ("Precision", "mPrecision")}
    (old / "eval-val.json").write_text(json.dumps(legacy))
    scores, _ = load_scores(old)
    assert scores.miou == expected.miou and scores.iou[:2] == expected.iou[:2]
    assert math.isnan(scores.iou[2]) and math.isnan(scores.mprecision)
    assert all(math.isnan(p) for p in scores.precision)
