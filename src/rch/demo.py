"""``rch demo``: train a small network with and without RCH on the same seed and budget,
evaluate both and print a side-by-side table.

By default the data is the generated street-scene set (:mod:`rch.data.synthetic`), built on
first use into the cache; ``data="camvid:PATH"`` (or any ``name:root``) uses a real dataset.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .data import parse_data_spec
from .eval import Scores, format_comparison
from .train.config import Config, apply_overrides, config_from_dict
from .train.logger import json_safe
from .train.trainer import TrainResult, train

__all__ = ["DemoResult", "demo_config", "run_demo"]

_REAL_DATA = {
    # CPU-sized recipe for real photographs: fit inside 180x240, crops of 160x224.
    "data.base_size": "[180, 240]",
    "data.crop_size": "[160, 224]",
}


@dataclass
class DemoResult:
    """The two runs of a demo and where they are."""

    out_dir: Path
    baseline: TrainResult
    rch: TrainResult
    classes: tuple[str, ...]
    report: Path


def demo_config(
    data: str = "synthetic", iters: int = 600, seed: int = 0, out_dir: str = "runs/demo"
) -> Config:
    """The demo's RCH configuration (the baseline is the same with ``rch.enabled=false``)."""
    name, root = parse_data_spec(data)
    cfg = config_from_dict(
        {
            "name": "rch",
            "seed": seed,
            "model": {"name": "tiny", "options": {"width": 32}},
            "data": {"name": name, "root": root, "crop_size": [96, 128], "workers": 0},
            "rch": {"enabled": True, "embed_dim": 64, "loss_weight": 0.1},
            "loss": {"ohem": True, "ohem_min_kept": 20_000, "aux_weight": 0.4},
            "optim": {"name": "adamw", "lr": 3e-3, "weight_decay": 1e-4, "warmup_iters": 20},
            "train": {
                "iters": iters,
                "batch_size": 8,
                "log_every": 10,
                "ckpt_every": 100,
                "out_dir": out_dir,
            },
            "eval": {"mode": "whole", "scales": [1.0]},
        }
    )
    if name != "synthetic":
        cfg = apply_overrides(cfg, [f"{k}={v}" for k, v in _REAL_DATA.items()])
    return cfg


def run_demo(
    data: str = "synthetic",
    iters: int = 600,
    seed: int = 0,
    out_dir: str = "runs/demo",
    progress: bool = True,
) -> DemoResult:
    """Train baseline and RCH, evaluate both, print the comparison and the run directory."""
    cfg = demo_config(data, iters, seed, out_dir)
    base_cfg = apply_overrides(cfg, ["name=baseline", "rch.enabled=false"])
    print(f"rch demo: {iters} iterations each, data {data!r}, seed {seed}", flush=True)
    baseline = train(base_cfg, overwrite=True, progress=progress)
    rch = train(cfg, overwrite=True, progress=progress)
    assert baseline.eval is not None and rch.eval is not None
    classes = baseline.eval.classes
    named: list[tuple[str, Scores]] = [("baseline", baseline.eval.scores), ("RCH", rch.eval.scores)]
    print("\nvalidation IoU (%), same seed, data and budget:")
    print(format_comparison(named, classes))
    print(
        f"\ntraining cost: baseline {1000 * baseline.seconds_per_iter:.0f} ms/iter, "
        f"RCH {1000 * rch.seconds_per_iter:.0f} ms/iter "
        f"({rch.seconds_per_iter / baseline.seconds_per_iter:.2f}x, median over iterations)"
    )
    out = Path(out_dir)
    summary = {
        "data": data,
        "iters": iters,
        "seed": seed,
        "baseline": baseline.eval.scores.to_dict(classes),
        "rch": rch.eval.scores.to_dict(classes),
    }
    (out / "summary.json").write_text(json.dumps(json_safe(summary), indent=1))
    print(f"runs, checkpoints and metrics.jsonl: {baseline.run_dir} and {rch.run_dir}")
    print(f"summary: {out / 'summary.json'}")
    from .viz import write_report

    report = write_report(baseline.run_dir, rch.run_dir, out / "report")
    print(f"report (figures, per-class tables, calibration statistics): {report}")
    return DemoResult(out, baseline, rch, classes, report)
