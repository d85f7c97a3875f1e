"""How the RCH loss's cost grows with the number of pixels N (it must be linear).

At fixed B, K and D, times one forward + backward of ``rch_loss`` (paper formulation) and of
its lower bound (the bare prototype cross-entropy through the same kernels, see
``loss_cost.py``) for feature maps from 32x64 to 256x512, and fits the slope of log(time)
and log(peak memory) against log(N): 1.0 is linear. The script re-runs itself with
``MALLOC_MMAP_THRESHOLD_=65536`` so that the resident-set peak tracks live tensors.

Run: ``python benchmarks/loss_scaling.py [--reps 5] [--dims 64 256]``
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import run_meta, write_results
from loss_cost import make_inputs, run_once

MAPS = ((32, 64), (64, 128), (128, 256), (256, 512))


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log(y) on log(x)."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = statistics.fmean(lx), statistics.fmean(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True)) / sum(
        (a - mx) ** 2 for a in lx
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--classes", type=int, default=19)
    p.add_argument("--dims", type=int, nargs="+", default=[64, 256])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="two small maps, one repetition")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/loss_scaling.json"))
    args = p.parse_args(argv)
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != "65536":
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
        return subprocess.run(
            [sys.executable, __file__, *(argv or sys.argv[1:])], env=env
        ).returncode
    maps = MAPS[:2] if args.quick else MAPS
    reps = 1 if args.quick else args.reps
    rows = []
    print(f"{'D':>4} {'map':>8} {'N':>8} {'paper ms':>9} {'bound ms':>9} {'paper MiB':>10}")
    for d in args.dims:
        for h, w in maps:
            inputs = make_inputs(args.batch, args.classes, d, h, w, 0.8, "cpu")
            res: dict[str, dict[str, float]] = {}
            for name in ("bound", "paper"):
                run_once(name, inputs, "cpu")  # warm-up
                runs = [run_once(name, inputs, "cpu") for _ in range(reps)]
                res[name] = {
                    "time_s": statistics.median(t for t, _ in runs),
                    "peak_mib": statistics.median(m for _, m in runs),
                }
            n = args.batch * h * w
            rows.append({"D": d, "h": h, "w": w, "N": n, **res})
            print(
                f"{d:>4} {h:>3}x{w:<4} {n:>8} {1000 * res['paper']['time_s']:9.1f} "
                f"{1000 * res['bound']['time_s']:9.1f} {res['paper']['peak_mib']:10.1f}",
                flush=True,
            )
    fits = {}
    for d in args.dims:
        sel = [r for r in rows if r["D"] == d]
        ns = [r["N"] for r in sel]
        fits[str(d)] = {
            "time_slope_paper": slope(ns, [r["paper"]["time_s"] for r in sel]),
            "time_slope_bound": slope(ns, [r["bound"]["time_s"] for r in sel]),
            "memory_slope_paper": slope(ns, [max(r["paper"]["peak_mib"], 1e-3) for r in sel]),
        }
        f = fits[str(d)]
        print(
            f"D={d}: log-log slope vs N: time {f['time_slope_paper']:.2f} (bound "
            f"{f['time_slope_bound']:.2f}), memory {f['memory_slope_paper']:.2f}"
        )
    meta = run_meta(
        argv,
        B=args.batch,
        K=args.classes,
    )
    write_results(args.out, {"meta": meta, "rows": rows, "fits": fits})
    return 0


if __name__ == "__main__":
    sys.exit(main())
