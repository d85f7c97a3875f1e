"""Does RCH help on real data? Paired-seed comparison on CamVid (train -> val), on a CPU.

The same network, recipe, iteration budget and seeds for every variant; seed ``s`` of each
variant starts from the same initial weights and sees the same batches, so the per-seed
difference to the baseline is a paired comparison. Reports mIoU mean and std per variant,
the paired differences with their standard error, and per-class IoU deltas (the rare
classes Pole, SignSymbol, Pedestrian and Bicyclist first).

Every run is resumable: rerunning the same command skips finished runs and resumes an
interrupted one from its last checkpoint; results are rewritten after every run, keyed by
variant and seed. ``--merge`` takes the runs of earlier results files of the same protocol
(another session, another machine) instead of training them again. ``camvid_report.py``
draws the tables of ``RESULTS.md`` from the results file.

Run: ``python benchmarks/camvid.py --root ../shared/data/camvid [--variants baseline paper
official] [--ablation [ROW ...]] [--grid [POINT ...]] [--why [NAME ...]] [--seeds 0 1 2]
[--iters 3000] [--jobs 2]
[--merge earlier.json ...] [--collect]``
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import run_meta
from rch.eval.paired import (
    additive_effects,
    format_additive_effects,
    format_f_test,
    format_paired_summary,
    format_pooled_effect,
    format_power_table,
    marked_first,
    paired_rows,
    pooled_dofs,
    pooled_effect,
    power_table,
    variant_f_test,
)
from rch.eval.paired import summarize_paired as summarize
from rch.train import config_from_dict
from rch.train.ablate import GRID, TABLE1, Variant, run_name, run_variants, variants
from rch.train.logger import json_safe

RARE = ("Pole", "SignSymbol", "Pedestrian", "Bicyclist")
ABLATION_ROWS = [r for r in TABLE1 if r not in ("baseline", "full")]  # the others: variants
TABLE1_ROWS = [*ABLATION_ROWS, "paper"]  # the paper's Table 1 here; full RCH is ``paper``
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
    return marked_first(classes, RARE)


def format_summary(summary: dict[str, Any]) -> str:
    """The printed table: variants, per-class IoU deltas and recall / precision deltas,
    with the rare classes first."""
    return format_paired_summary(summary, mark=RARE)


POOLED_ROW = "all RCH runs, by seed"


def draw_figures(
    summary: dict[str, Any],
    results: Path,
    pooled: dict[str, Any] | None = None,
    additive: dict[str, Any] | None = None,
) -> list[Path]:
    """Two PNGs beside the results file: the paired differences per variant (a dot per seed,
    the mean with its 95 % t interval on the pooled SE, the paper's +1 as a dashed line;
    with ``additive``, each variant's effect in the variant + seed fit with its interval, a
    hollow square below; with ``pooled``, a last row of its per-seed differences with their
    t interval over the seeds) and the per-class IoU deltas as a heat map. Nothing without
    a paired variant, or without matplotlib."""
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

        diffs, se = paired_rows(summary)
        dofs = pooled_dofs(summary)
        if pooled is not None and pooled["seed_diff"]:
            diffs[POOLED_ROW] = list(pooled["seed_diff"].values())
            se[POOLED_ROW] = pooled["seed_diff_se"]
            dofs[POOLED_ROW] = len(pooled["seed_diff"]) - 1
        figures.plot_paired_differences(
            diffs,
            diffs_png,
            se=se,
            df=dofs,
            reference=1.0,
            reference_label="the paper's gain (Cityscapes)",
            fitted=None
            if additive is None
            else {n: (e["effect"], *e["ci"]) for n, e in additive["effects"].items()},
        )
        figures.plot_class_deltas(
            {name: {c: d[c] for c in ordered} for name, d in deltas.items()}, classes_png, mark=RARE
        )
    except ImportError:
        print("figures skipped: they need matplotlib (pip install 'rch[viz]')")
        return []
    return [diffs_png, classes_png]


def f_tests(present: dict[str, dict[int, Any]]) -> dict[str, dict[str, Any]]:
    """Do the variants differ at all (:func:`rch.eval.paired.variant_f_test`): the Table 1
    rows among themselves, with the baseline and the reference formulation, and every
    variant with the baseline; where testable."""
    tests = {}
    table1 = [r for r in TABLE1_ROWS if present.get(r)]
    candidates = [
        ("Table 1 rows", table1),
        (
            "Table 1 rows, the baseline and the reference formulation",
            [n for n in ("baseline", "official") if present.get(n)] + table1,
        ),
        ("every variant and the baseline", list(present)),
    ]
    for i, (label, names) in enumerate(candidates):
        if any(set(names) == set(later) for _, later in candidates[i + 1 :]):
            continue  # the same variants as a later, wider test
        try:
            test = variant_f_test(present, names)
        except ValueError as err:  # some variant shares no seed with the rest
            print(f"no F test of the {label}: {err}", flush=True)
            continue
        if test is not None:
            tests[label] = test
    return tests


def analyse(present: Runs) -> dict[str, Any]:
    """What the results file holds beside its runs and meta: the paired summary, the pooled
    effect, the variant + seed fit, the F tests and the protocol's resolving power."""
    summary = summarize(present)
    try:  # the variant + seed fit needs every variant to share a seed with the rest
        additive = additive_effects(present)
    except ValueError as err:
        print(f"no additive fit: {err}", flush=True)
        additive = None
    return {
        "summary": summary,
        "pooled": pooled_effect(present),
        "additive": additive,
        "f_tests": f_tests(present),
        "power": power_table(summary, seeds=(3, 5, 10)),
    }


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
        for name, recorded in theirs.items():
            described.setdefault(name, recorded)
    meta = run_meta(
        argv,
        config=protocol,
        merged=[str(path) for path in args.merge],
        variants=described,
        grid={k: list(v) for k, v in GRID.items()} if args.grid is not None else None,
    )
    started = time.time()

    def write() -> dict[str, Any]:
        """Write the results file: the runs and their analysis."""
        meta["elapsed_s"] = round(time.time() - started)
        present = {k: dict(sorted(v.items())) for k, v in done.items() if v}
        data = {"meta": meta, **analyse(present)}
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
    if data["additive"] is not None:
        print(format_additive_effects(data["additive"]))
    for label, test in data["f_tests"].items():
        print(format_f_test(test, label))
    if data["power"] is not None:
        print(format_power_table(data["power"]))
    print(f"written: {args.results}")
    for png in draw_figures(data["summary"], args.results, data["pooled"], data["additive"]):
        print(f"written: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
