"""The cost benchmark runs end to end on its smallest setting and writes its JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_loss_cost_quick_writes_json(tmp_path: Path):
    out = tmp_path / "cost.json"
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "loss_cost.py"),
            "--quick",
            "--reps",
            "1",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    assert "paper/bound" in run.stdout
    data = json.loads(out.read_text())
    row = data["rows"][0]
    assert set(row["results"]) == {"ce", "bound", "autograd", "paper", "official", "pairwise"}
    assert all(r["time_s"] > 0 and r["peak_mib"] >= 0 for r in row["results"].values())
    assert data["meta"]["command"].startswith("python")
