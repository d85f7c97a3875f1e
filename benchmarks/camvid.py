"""Does RCH help on real data? Paired-seed comparison on CamVid (train -> val), on a CPU.

The same network, recipe, iteration budget and seeds for every variant; seed ``s`` of each
variant starts from the same initial weights and sees the same batches, so the per-seed
difference to the baseline is a paired comparison. Reports mIoU mean and std per variant,
the paired differences with their standard error, and per-class IoU deltas (the rare
classes Pole, SignSymbol, Pedestrian and Bicyclist first).

Every run is resumable: rerunning the same command skips finished runs and resumes an
interrupted one from its last checkpoint; results are rewritten after every run, keyed by
variant and seed. ``--merge`` takes the runs of earlier results files of the same protocol
(another session, another machine) instead of training them again.

Run: ``python benchmarks/camvid.py --root ../shared/data/camvid [--variants baseline paper
official] [--ablation [ROW ...]] [--grid [POINT ...]] [--why [NAME ...]] [--seeds 0 1 2]
[--iters 3000] [--jobs 2]
[--merge earlier.json ...] [--collect]``
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

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import run_meta
from rch.eval.metrics import Scores, scores_from_confusion
from rch.train import config_from_dict
from rch.train.ablate import GRID, TABLE1, Variant, run_name, run_variants, variants
from rch.train.logger import json_safe

RARE = ("Pole", "SignSymbol", "Pedestrian", "Bicyclist")
ABLATION_ROWS = [r for r in TABLE1 if r not in ("baseline", "full")]  # the others: variants
GRID_POINTS = [v.name for v in variants([], grid=True)]  # "tau=0.25", ...: one value changed
BASE_VARIANTS = {
    "baseline": ("rch.enabled=false",),
    "paper": ("rch.formulation=paper",),
    "official": ("rch.formulation=official",),
}
WHY_VARIANTS = {  # paper formulation, one setting changed: why does it (not) help?
    # the classifier's own input at stride 2, not the stride-8 encoder output
    "paper-fuse": ("rch.layer=fuse",),
    "paper-stage2": ("rch.layer=stage2",),  # a stride-4 encoder feature
    "paper-gtproto": ("rch.prototype_source=gt",),  # prototypes from all labelled pixels
    "paper-first": ("rch.prototype_init=first",),  # prototypes start at the first class mean
    "paper-warmup": ("rch.warmup_iters=500",),  # RCH off for the first 500 iterations
    "paper-wide": ("rch.embed_dim=256",),  # the paper's embedding width, not 64
    "paper-light": ("rch.loss_weight=0.05",),  # half the default lambda
    "paper-ohemoff": ("rch.ohem=off",),  # the RCH loss ignores OHEM: every labelled pixel
    # the pixels OHEM drops hidden from RCH, statistics too (the default before 2026-11-26)
    "paper-ohemhide": ("rch.ohem=hide",),
}
EARLIER_VARIANTS = {  # measured while rch.ohem=hide was the default (before 2026-11-26)
    "official-ohemhide": ("rch.formulation=official", "rch.ohem=hide"),
    "paper-fuse-ohemhide": ("rch.formulation=paper", "rch.layer=fuse", "rch.ohem=hide"),
}
PROTOCOL_KEYS = (
    "iters", "model", "width", "embed_dim", "loss_weight", "lr", "batch", "base_size", "crop",
)  # fmt: skip
"""The settings two results files must share for their runs to be merged."""
Runs = dict[str, dict[int, dict[str, Any]]]
"""variant -> seed -> the run's ``eval.json``."""


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
                "cache": True,  # decode each file once: a tenth of a step at this size
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


def summarize(results: Runs) -> dict[str, Any]:
    """mIoU statistics per variant, and paired differences to the baseline over the seeds
    that both ran."""
    base = results.get("baseline", {})
    out: dict[str, Any] = {}
    for name, runs in results.items():
        seeds = sorted(runs)
        mious = [100 * runs[s]["mIoU"] for s in seeds]
        entry: dict[str, Any] = {
            "seeds": seeds,
            "mIoU": mious,
            "mean": statistics.fmean(mious) if mious else math.nan,
            "std": statistics.stdev(mious) if len(mious) > 1 else math.nan,
        }
        paired = [s for s in seeds if s in base]
        if name != "baseline" and paired:
            n = len(paired)
            diffs = [100 * (runs[s]["mIoU"] - base[s]["mIoU"]) for s in paired]
            entry["paired_seeds"] = paired
            entry["paired_diff"] = diffs
            entry["diff_mean"] = statistics.fmean(diffs)
            entry["diff_se"] = statistics.stdev(diffs) / math.sqrt(n) if n > 1 else math.nan
            classes = list(runs[paired[0]]["IoU"])
            entry["class_delta"] = {
                c: statistics.fmean(
                    100 * ((runs[s]["IoU"][c] or 0.0) - (base[s]["IoU"][c] or 0.0)) for s in paired
                )
                for c in classes
            }
            if all("confusion" in runs[s] and "confusion" in base[s] for s in paired):
                rates = [
                    (_scores(runs[s]["confusion"]), _scores(base[s]["confusion"])) for s in paired
                ]
                for key, attr in (("recall", "acc"), ("precision", "precision")):
                    per_seed = [
                        [
                            100 * (a - b)
                            for a, b in zip(getattr(mine, attr), getattr(theirs, attr), strict=True)
                        ]
                        for mine, theirs in rates
                    ]
                    delta = [statistics.fmean(d) for d in zip(*per_seed, strict=True)]
                    entry[f"{key}_delta"] = dict(zip(classes, delta, strict=True))
                    kept = [d for d in delta if not math.isnan(d)]
                    entry[f"mean_{key}_delta"] = statistics.fmean(kept) if kept else math.nan
        out[name] = entry
    sd, df = pooled_diff_sd([e["paired_diff"] for e in out.values() if "paired_diff" in e])
    for entry in out.values():
        if "paired_diff" in entry:
            entry["diff_se_pooled"] = sd / math.sqrt(len(entry["paired_diff"]))
            entry["pooled_sd"], entry["pooled_df"] = sd, df
    return out


def _scores(confusion: list[list[int]]) -> Scores:
    """A run's scores from its confusion matrix: recall is ``acc`` (1 - the FN rate),
    precision 1 - the FP share."""
    return scores_from_confusion(torch.tensor(confusion))


def pooled_diff_sd(diffs: list[list[float]]) -> tuple[float, int]:
    """The per-seed standard deviation of a paired difference, pooled over variants, and its
    degrees of freedom: sqrt(sum_i (n_i - 1) s_i^2 / sum_i (n_i - 1)) over the variants with
    at least two seeds; nan and 0 when none has.

    One variant's own SD rests on a handful of seeds (2 degrees of freedom for 3), so its
    SE can be small by luck; the pooled SD uses every variant's spread. The variants share
    the baseline runs, so their spreads are not independent: read the pooled SE as the
    typical noise of a paired difference on this protocol, not as an exact test.
    """
    ss = sum(statistics.variance(d) * (len(d) - 1) for d in diffs if len(d) > 1)
    df = sum(len(d) - 1 for d in diffs if len(d) > 1)
    return (math.sqrt(ss / df) if df else math.nan), df


def load_runs(
    path: Path, protocol: dict[str, Any], variants: dict[str, list[str]]
) -> tuple[Runs, dict[str, list[str]]]:
    """The runs of an earlier results file, after checking that it used the same protocol,
    and the overrides of its variants (name -> overrides).

    Files written before runs were keyed by seed hold a list per variant, in the order of
    ``meta.config.seeds``.

    Raises:
        ValueError: the file's protocol or a shared variant's overrides differ.
    """
    data = json.loads(path.read_text())
    meta = data["meta"]
    theirs = {k: meta["config"].get(k) for k in PROTOCOL_KEYS}
    changed = [k for k in PROTOCOL_KEYS if json_safe(theirs[k]) != json_safe(protocol[k])]
    changed += [
        f"variant {name}"
        for name, overrides in meta.get("variants", {}).items()
        if name in variants and list(overrides) != list(variants[name])
    ]
    if changed:
        raise ValueError(f"--merge {path}: another protocol ({', '.join(changed)} differ)")
    runs: Runs = {}
    for name, entries in data["runs"].items():
        if isinstance(entries, list):
            seeds = meta["config"]["seeds"]
            runs[name] = {int(seeds[i]): r for i, r in enumerate(entries)}
        else:
            runs[name] = {int(seed): r for seed, r in entries.items()}
    return runs, {name: list(o) for name, o in meta.get("variants", {}).items()}


def rare_first(classes: list[str]) -> list[str]:
    """The rare classes (in ``RARE``'s order) first, then the others in their own order."""
    return [c for c in RARE if c in classes] + [c for c in classes if c not in RARE]


def pooled_effect(results: Runs) -> dict[str, Any] | None:
    """Every RCH run of every variant against every baseline run: does RCH, in any of the
    forms tried, move mIoU on this protocol? ``None`` without both.

    Two estimates, in mIoU points. ``diff``: the mean of all RCH runs minus the baseline's
    mean, with Welch's SE and degrees of freedom (the RCH runs' spread includes the
    differences between variants, so it is the conservative one). ``seed_diff``: per
    seed, the mean of that seed's RCH runs minus that seed's baseline; their mean and the
    SE of their spread over seeds, which keeps the shared baseline run of a seed in one
    term (the honest one when seeds are few, and the one that needs RCH runs on the seed).
    """
    base = [100 * r["mIoU"] for r in results.get("baseline", {}).values()]
    rch = {n: runs for n, runs in results.items() if n != "baseline" and runs}
    values = [100 * r["mIoU"] for runs in rch.values() for r in runs.values()]
    if not base or not values:
        return None
    out: dict[str, Any] = {
        "variants": len(rch),
        "runs": len(values),
        "baseline_runs": len(base),
        "mean": statistics.fmean(values),
        "baseline_mean": statistics.fmean(base),
        "diff": statistics.fmean(values) - statistics.fmean(base),
        "se": math.nan,
        "df": math.nan,
    }
    if len(base) > 1 and len(values) > 1:
        vb, vr = statistics.variance(base) / len(base), statistics.variance(values) / len(values)
        out["se"] = math.sqrt(vb + vr)
        if vb + vr > 0:
            out["df"] = (vb + vr) ** 2 / (vb**2 / (len(base) - 1) + vr**2 / (len(values) - 1))
    per_seed = {}
    for seed, ref in sorted(results.get("baseline", {}).items()):
        mine = [100 * runs[seed]["mIoU"] for runs in rch.values() if seed in runs]
        if mine:
            per_seed[seed] = statistics.fmean(mine) - 100 * ref["mIoU"]
    out["seed_diff"] = per_seed
    d = list(per_seed.values())
    out["seed_diff_mean"] = statistics.fmean(d) if d else math.nan
    out["seed_diff_se"] = statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else math.nan
    return out


def format_pooled_effect(e: dict[str, Any]) -> str:
    per = ", ".join(f"seed {s} {d:+.2f}" for s, d in e["seed_diff"].items())
    return (
        f"all RCH runs pooled: {e['runs']} runs of {e['variants']} variant(s), mean"
        f" {e['mean']:.2f}, against {e['baseline_runs']} baseline runs, mean"
        f" {e['baseline_mean']:.2f}: {e['diff']:+.2f} (Welch SE {e['se']:.2f},"
        f" {e['df']:.1f} df)\n"
        f"  by seed (RCH runs' mean minus that seed's baseline): {per}; mean"
        f" {e['seed_diff_mean']:+.2f}, SE over seeds {e['seed_diff_se']:.2f}"
    )


def format_summary(summary: dict[str, Any]) -> str:
    w = max([14, *map(len, summary)])
    lines = [
        f"{'variant':<{w}} {'runs':>4} {'mIoU':>7} {'std':>6} {'paired diff':>12} {'SE':>6}"
        f" {'pooled SE':>9}  per-seed diffs"
    ]
    for name, e in summary.items():
        diff = e.get("diff_mean", math.nan)
        se = e.get("diff_se", math.nan)
        pooled = e.get("diff_se_pooled", math.nan)
        per = " ".join(f"{d:+.2f}" for d in e.get("paired_diff", []))
        if name == "baseline":
            lines.append(f"{name:<{w}} {len(e['mIoU']):>4} {e['mean']:7.2f} {e['std']:6.2f}")
            continue
        lines.append(
            f"{name:<{w}} {len(e['mIoU']):>4} {e['mean']:7.2f} {e['std']:6.2f} {diff:+12.2f}"
            f" {se:6.2f} {pooled:9.2f}  {per}"
        )
    pooled_of = [e for e in summary.values() if "pooled_sd" in e]
    if pooled_of:
        lines.append(
            f"pooled SE: the per-seed SD of a paired difference pooled over the variants,"
            f" {pooled_of[0]['pooled_sd']:.2f} ({pooled_of[0]['pooled_df']} degrees of freedom),"
            " over sqrt(runs)"
        )
    deltas = {n: e["class_delta"] for n, e in summary.items() if "class_delta" in e}
    if deltas:
        ordered = rare_first(list(next(iter(deltas.values()))))
        cw = max([9, *map(len, deltas)])
        lines.append("")
        lines.append(f"{'class (IoU delta)':<18}" + "".join(f" {n:>{cw}}" for n in deltas))
        for c in ordered:
            mark = " *" if c in RARE else ""
            lines.append(f"{c + mark:<18}" + "".join(f" {d[c]:+{cw}.2f}" for d in deltas.values()))
    rates = {n: e for n, e in summary.items() if "recall_delta" in e}
    if rates:
        rare = [c for c in RARE if c in next(iter(rates.values()))["recall_delta"]]
        lines.append("")
        lines.append(
            "recall / precision delta (points, paired): recall = 1 - FN rate, precision ="
            " 1 - FP share; mean over classes, then the rare ones"
        )
        header = "".join(f" {c:>13}" for c in rare)
        lines.append(f"{'variant':<{w}} {'recall':>7} {'precision':>9}{header}")
        for name, e in rates.items():
            cells = "".join(
                f" {e['recall_delta'][c]:+6.1f}/{e['precision_delta'][c]:+6.1f}" for c in rare
            )
            lines.append(
                f"{name:<{w}} {e['mean_recall_delta']:+7.2f} {e['mean_precision_delta']:+9.2f}"
                + cells
            )
    return "\n".join(lines)


POOLED_ROW = "all RCH runs, by seed"


def draw_figures(
    summary: dict[str, Any], results: Path, pooled: dict[str, Any] | None = None
) -> list[Path]:
    """Two PNGs beside the results file: the paired differences per variant (a dot per seed,
    the mean with +- 1.96 pooled SE, the paper's +1 as a dashed line; with ``pooled``, a
    last row of its per-seed differences with their SE over seeds) and the per-class IoU
    deltas as a heat map. Nothing without a paired variant, or without matplotlib."""
    paired = {name: e for name, e in summary.items() if e.get("paired_diff")}
    if not paired:
        return []
    stem = results.with_suffix("")
    diffs_png = stem.with_name(stem.name + "_paired.png")
    classes_png = stem.with_name(stem.name + "_classes.png")
    deltas = {name: e["class_delta"] for name, e in paired.items()}
    ordered = rare_first(list(next(iter(deltas.values()))))
    try:  # matplotlib is imported by the first plot, not by ``rch.viz``
        from rch.viz import figures

        diffs = {name: e["paired_diff"] for name, e in paired.items()}
        se = {name: e["diff_se_pooled"] for name, e in paired.items()}
        if pooled is not None and pooled["seed_diff"]:
            diffs[POOLED_ROW] = list(pooled["seed_diff"].values())
            se[POOLED_ROW] = pooled["seed_diff_se"]
        figures.plot_paired_differences(
            diffs,
            diffs_png,
            se=se,
            reference=1.0,
            reference_label="the paper's gain (Cityscapes)",
        )
        figures.plot_class_deltas(
            {name: {c: d[c] for c in ordered} for name, d in deltas.items()}, classes_png, mark=RARE
        )
    except ImportError:
        print("figures skipped: they need matplotlib (pip install 'rch[viz]')")
        return []
    return [diffs_png, classes_png]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, default=Path("../shared/data/camvid"))
    p.add_argument(
        "--variants", nargs="*", default=list(BASE_VARIANTS), choices=list(BASE_VARIANTS)
    )
    p.add_argument(
        "--ablation",
        nargs="*",
        choices=ABLATION_ROWS,
        help="also these Table 1 rows (all of them when none is named)",
    )
    p.add_argument(
        "--grid",
        nargs="*",
        choices=GRID_POINTS,
        help="also these points of the tau / rho / lambda grid (all of them when none is named)",
    )
    p.add_argument(
        "--why",
        nargs="*",
        choices=[*WHY_VARIANTS, *EARLIER_VARIANTS],
        help="also these diagnostic variants (all paper-* ones when none is named)",
    )
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
    p.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        default=[],
        help="earlier results files of the same protocol: their runs (every variant and seed)"
        " are carried into --results and not trained again",
    )
    p.add_argument(
        "--collect",
        action="store_true",
        help="train nothing: report the merged runs and the finished ones under --out",
    )
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    cfg = base_config(args)
    runs = [Variant(n, BASE_VARIANTS[n]) for n in args.variants]
    if args.ablation is not None or args.grid is not None:
        rows = list(ABLATION_ROWS) if args.ablation == [] else args.ablation or []
        points = list(GRID_POINTS) if args.grid == [] else args.grid or []
        extra = [v for v in variants(rows, grid=bool(points)) if v.name in [*rows, *points]]
        runs += [v for v in extra if v.name not in {r.name for r in runs}]
    why = list(WHY_VARIANTS) if args.why == [] else args.why or []  # bare --why: all
    for name in why:
        changed = WHY_VARIANTS.get(name)
        full = (*BASE_VARIANTS["paper"], *changed) if changed else EARLIER_VARIANTS[name]
        runs.append(Variant(name, full))
    overrides = {v.name: list(v.overrides) for v in runs}
    protocol = {
        k: v
        for k, v in vars(args).items()
        if k not in ("out", "results", "root", "merge", "collect")
    }
    done: Runs = {v.name: {} for v in runs}
    described = dict(overrides)  # every variant in the results file, merged ones too
    for path in args.merge:
        try:  # checked against the variants requested and those of the files before it
            merged, theirs = load_runs(path, protocol, described)
        except (OSError, ValueError, KeyError) as e:
            p.error(f"{e}" if isinstance(e, ValueError) else f"--merge {path}: unreadable ({e!r})")
        for name, seeds in merged.items():  # all of them: nothing already measured is lost
            done.setdefault(name, {}).update(seeds)
        for name, changed in theirs.items():
            described.setdefault(name, changed)
    meta = run_meta(
        argv,
        config=protocol,
        merged=[str(path) for path in args.merge],
        variants=described,
        grid={k: list(v) for k, v in GRID.items()} if args.grid is not None else None,
    )
    started = time.time()

    def write() -> dict[str, Any]:
        """Write the results file; its summary and pooled effect."""
        meta["elapsed_s"] = round(time.time() - started)
        present = {k: dict(sorted(v.items())) for k, v in done.items() if v}
        summary = summarize(present)
        data = {"meta": meta, "summary": summary, "pooled": pooled_effect(present)}
        args.results.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.results.with_name(args.results.name + ".tmp")
        tmp.write_text(json.dumps(json_safe({**data, "runs": present}), indent=1))
        tmp.replace(args.results)  # a reader never sees half a file
        return data

    def save(name: str, seed: int, scores: dict[str, Any]) -> None:
        done[name][seed] = scores
        write()
        print(f"[{name} seed {seed}] mIoU {100 * scores['mIoU']:.2f}", flush=True)

    held = [(name, seed) for name, seeds in done.items() for seed in seeds]
    if args.collect:  # only the runs whose evaluation is on disk
        out = Path(cfg.train.out_dir)
        held += [
            (v.name, seed)
            for v in runs
            for seed in args.seeds
            if not (out / run_name(cfg, v, seed) / "eval.json").is_file()
        ]
    run_variants(
        cfg,
        runs,
        args.seeds,
        progress=not args.no_progress,
        on_done=save,
        jobs=args.jobs,
        skip=held,
    )
    data = write()
    print(format_summary(data["summary"]))
    if data["pooled"] is not None:
        print(format_pooled_effect(data["pooled"]))
    print(f"written: {args.results}")
    for png in draw_figures(data["summary"], args.results, data["pooled"]):
        print(f"written: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
