"""Does RCH help on real data? Paired-seed comparison on CamVid (train -> val), on a CPU.

The same network, recipe, iteration budget and seeds for every variant; seed ``s`` of each
variant starts from the same initial weights and sees the same batches, so the per-seed
difference to the baseline is a paired comparison. Reports mIoU mean and std per variant,
the paired differences with their standard error, and per-class IoU deltas (the rare
classes Pole, SignSymbol, Pedestrian and Bicyclist first).

Every run is resumable: rerunning the same command skips finished runs and resumes an
interrupted one from its last checkpoint; results are rewritten after every run.

Run: ``python benchmarks/camvid.py --root ../shared/data/camvid [--variants baseline paper
official] [--ablation] [--grid] [--seeds 0 1 2] [--iters 3000] [--jobs 2]``
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import run_meta
from rch.train import config_from_dict
from rch.train.ablate import GRID, TABLE1, Variant, run_variants, variants
from rch.train.logger import json_safe

RARE = ("Pole", "SignSymbol", "Pedestrian", "Bicyclist")
BASE_VARIANTS = {
    "baseline": ("rch.enabled=false",),
    "paper": ("rch.formulation=paper",),
    "official": ("rch.formulation=official",),
}


def base_config(args: argparse.Namespace) -> Any:
    model: dict[str, Any] = {"name": args.model, "options": {}}
    if args.model == "tiny":
        model["options"] = {"width": args.width}
    return config_from_dict(
        {
            "name": "camvid",
            "model": model,
            "data": {
                "name": "camvid",
                "root": str(args.root),
                "base_size": args.base_size,
                "crop_size": args.crop,
                "workers": args.workers,
            },
            "rch": {"embed_dim": args.embed_dim, "loss_weight": args.loss_weight},
            "loss": {"ohem": True, "ohem_min_kept": 50_000, "aux_weight": 0.4},
            "optim": {"name": "adamw", "lr": args.lr, "weight_decay": 1e-4, "warmup_iters": 20},
            "train": {
                "iters": args.iters,
                "batch_size": args.batch,
                "log_every": 20,
                "ckpt_every": 100,
                "out_dir": str(args.out),
                "threads": args.threads,
            },
            "eval": {"mode": "whole", "scales": [1.0]},
        }
    )


def summarize(results: dict[str, list[dict[str, Any]]], seeds: list[int]) -> dict[str, Any]:
    """mIoU statistics and paired differences to the baseline over the seeds done by all."""
    base = results.get("baseline", [])
    out: dict[str, Any] = {}
    for name, runs in results.items():
        n = min(len(runs), len(base)) if name != "baseline" else len(runs)
        mious = [100 * r["mIoU"] for r in runs]
        entry: dict[str, Any] = {
            "seeds": seeds[: len(runs)],
            "mIoU": mious,
            "mean": statistics.fmean(mious) if mious else math.nan,
            "std": statistics.stdev(mious) if len(mious) > 1 else math.nan,
        }
        if name != "baseline" and n:
            diffs = [100 * (runs[i]["mIoU"] - base[i]["mIoU"]) for i in range(n)]
            entry["paired_diff"] = diffs
            entry["diff_mean"] = statistics.fmean(diffs)
            entry["diff_se"] = statistics.stdev(diffs) / math.sqrt(n) if n > 1 else math.nan
            classes = list(runs[0]["IoU"])
            entry["class_delta"] = {
                c: statistics.fmean(
                    100 * ((runs[i]["IoU"][c] or 0.0) - (base[i]["IoU"][c] or 0.0))
                    for i in range(n)
                )
                for c in classes
            }
        out[name] = entry
    return out


def format_summary(summary: dict[str, Any]) -> str:
    lines = [
        f"{'variant':<14} {'runs':>4} {'mIoU':>7} {'std':>6} {'paired diff':>12} {'SE':>6}"
        "  per-seed diffs"
    ]
    for name, e in summary.items():
        diff = e.get("diff_mean", math.nan)
        se = e.get("diff_se", math.nan)
        per = " ".join(f"{d:+.2f}" for d in e.get("paired_diff", []))
        if name == "baseline":
            lines.append(f"{name:<14} {len(e['mIoU']):>4} {e['mean']:7.2f} {e['std']:6.2f}")
            continue
        lines.append(
            f"{name:<14} {len(e['mIoU']):>4} {e['mean']:7.2f} {e['std']:6.2f} {diff:+12.2f}"
            f" {se:6.2f}  {per}"
        )
    deltas = {n: e["class_delta"] for n, e in summary.items() if "class_delta" in e}
    if deltas:
        classes = list(next(iter(deltas.values())))
        ordered = [c for c in RARE if c in classes] + [c for c in classes if c not in RARE]
        lines.append("")
        lines.append(f"{'class (IoU delta)':<18}" + "".join(f" {n[:10]:>10}" for n in deltas))
        for c in ordered:
            mark = " *" if c in RARE else ""
            lines.append(f"{c + mark:<18}" + "".join(f" {d[c]:+10.2f}" for d in deltas.values()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, default=Path("../shared/data/camvid"))
    p.add_argument(
        "--variants", nargs="+", default=list(BASE_VARIANTS), choices=list(BASE_VARIANTS)
    )
    p.add_argument("--ablation", action="store_true", help="also the Table 1 rows")
    p.add_argument("--grid", action="store_true", help="also the tau / rho / lambda grid")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--iters", type=int, default=3000)
    p.add_argument("--model", default="tiny")
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--embed-dim", type=int, default=64)
    p.add_argument("--loss-weight", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--base-size", type=int, nargs=2, default=[180, 240])
    p.add_argument("--crop", type=int, nargs=2, default=[160, 224])
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="per run; 0: cores / jobs")
    p.add_argument("--jobs", type=int, default=2, help="runs trained at once (processes)")
    p.add_argument("--out", type=Path, default=Path("runs/bench-camvid-3k"))
    p.add_argument("--results", type=Path, default=Path("benchmarks/results/camvid.json"))
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    cfg = base_config(args)
    runs = [Variant(n, BASE_VARIANTS[n]) for n in args.variants]
    if args.ablation or args.grid:
        extra = variants(
            [r for r in TABLE1 if r not in ("baseline", "full")] if args.ablation else [],
            grid=args.grid,
        )
        runs += [v for v in extra if v.name not in {r.name for r in runs}]
    meta = run_meta(
        argv,
        config={k: v for k, v in vars(args).items() if k not in ("out", "results", "root")},
        variants={v.name: list(v.overrides) for v in runs},
        grid={k: list(v) for k, v in GRID.items()} if args.grid else None,
    )
    done: dict[str, list[dict[str, Any]]] = {v.name: [] for v in runs}
    started = time.time()

    def save(name: str, seed: int, scores: dict[str, Any]) -> None:
        done[name].append(scores)
        summary = summarize({k: v for k, v in done.items() if v}, args.seeds)
        meta["elapsed_s"] = round(time.time() - started)
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(
            json.dumps(json_safe({"meta": meta, "summary": summary, "runs": done}), indent=1)
        )
        print(f"[{name} seed {seed}] mIoU {100 * scores['mIoU']:.2f}", flush=True)

    results = run_variants(
        cfg, runs, args.seeds, progress=not args.no_progress, on_done=save, jobs=args.jobs
    )
    print(format_summary(summarize(results, args.seeds)))
    print(f"written: {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
