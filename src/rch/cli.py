"""Command line: ``rch train | eval | export | report | demo | ablate``.

Thin: each command parses into the arguments of the Python function that does the work
(:func:`rch.train.train`, :func:`rch.train.evaluate_checkpoint`, ...).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from .errors import RCHError

__all__ = ["main"]


def _pair(text: str) -> tuple[int, int]:
    parts = [int(v) for v in text.replace("x", ",").split(",")]
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"expected H,W (e.g. 512,1024), got {text!r}")
    return parts[0], parts[1]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rch", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a network (with or without RCH) from a YAML config")
    p.add_argument("config", help="YAML config file (configs/)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set rch.tau=0.25 (repeatable)",
    )
    p.add_argument("--resume", action="store_true", help="continue the run from its checkpoint")
    p.add_argument("--overwrite", action="store_true", help="delete an existing run directory")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("eval", help="evaluate a checkpoint: per-class table and JSON")
    p.add_argument("checkpoint", help="checkpoint file or run directory")
    p.add_argument("--split", default=None, help="split (default: the config's val split)")
    p.add_argument("--mode", choices=["whole", "slide"], default=None)
    p.add_argument("--crop", type=_pair, default=None, help="sliding window H,W")
    p.add_argument("--stride", type=_pair, default=None, help="sliding stride H,W")
    p.add_argument(
        "--scales",
        type=float,
        nargs="+",
        default=None,
        help="multi-scale inference, e.g. --scales 0.5 0.75 1 1.25 1.5 1.75",
    )
    p.add_argument("--flip", action="store_true", help="add horizontal flips")
    p.add_argument("--limit", type=int, default=None, help="only the first N images")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="JSON file (default: RUN/eval-SPLIT.json)")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("export", help="write the deployable network: RCH removed")
    p.add_argument("checkpoint", help="checkpoint file or run directory")
    p.add_argument("out", help="output file (.pt)")

    p = sub.add_parser("demo", help="baseline vs RCH on generated data (or --data NAME:ROOT)")
    p.add_argument("--data", default="synthetic", help="'synthetic' or NAME:ROOT, e.g. camvid:PATH")
    p.add_argument("--iters", type=int, default=600, help="training iterations per run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/demo", help="where the runs are written")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("report", help="an HTML page comparing two runs, with the figures")
    p.add_argument("run_a", help="reference run directory (e.g. the baseline)")
    p.add_argument("run_b", help="run to compare (e.g. RCH)")
    p.add_argument("--out", default=None, help="output directory (default: beside run_b)")
    p.add_argument("--split", default=None, help="split for the figures (default: val)")
    p.add_argument("--limit", type=int, default=40, help="images used for the figures")
    p.add_argument("--images", type=int, default=4, help="images shown per figure")

    p = sub.add_parser("ablate", help="Table 1 rows (and --grid) of a config, one summary table")
    p.add_argument("config")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--rows", nargs="+", default=None, help="subset of the Table 1 rows")
    p.add_argument("--grid", action="store_true", help="also the tau / rho / lambda grid")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument(
        "--mark",
        nargs="+",
        default=[],
        metavar="CLASS",
        help="classes to list first and star in the per-class tables (e.g. the rare ones)",
    )
    p.add_argument(
        "--jobs", type=int, default=1, help="runs trained at once, one process each (CPU)"
    )
    p.add_argument("--no-progress", action="store_true")
    return parser


def _train(args: argparse.Namespace) -> int:
    from .train import load_config, train

    cfg = load_config(args.config, args.overrides)
    result = train(cfg, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress)
    print(f"run directory: {result.run_dir}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from .eval import format_scores
    from .train import evaluate_checkpoint, load_checkpoint, resolve_checkpoint
    from .train.config import config_from_dict
    from .train.logger import json_safe
    from .train.trainer import inference_config

    path = resolve_checkpoint(args.checkpoint)
    infer = inference_config(config_from_dict(load_checkpoint(path)["config"]))
    changes = {
        k: v
        for k, v in {
            "mode": args.mode,
            "crop": args.crop,
            "stride": args.stride,
            "scales": tuple(args.scales) if args.scales else None,
        }.items()
        if v is not None
    }
    if args.flip:
        changes["flip"] = True
    infer = replace(infer, **changes)
    cfg, result = evaluate_checkpoint(
        path, args.split, infer, args.device, args.limit, not args.no_progress
    )
    print(format_scores(result.scores, result.classes))
    split = args.split or cfg.data.val_split
    out = Path(args.out) if args.out else path.parent.parent / f"eval-{split}.json"
    out.write_text(json.dumps(json_safe({"inference": vars(infer), **result.to_dict()}), indent=1))
    print(f"written: {out}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from .train import export_checkpoint

    model = export_checkpoint(args.checkpoint, args.out)
    n = sum(p.numel() for p in model.parameters())
    print(f"exported {type(model).__name__} ({n:,} parameters, no RCH) to {args.out}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from .viz import write_report

    index = write_report(args.run_a, args.run_b, args.out, args.split, args.limit, args.images)
    print(f"report: {index}")
    return 0


def _ablate(args: argparse.Namespace) -> int:
    from .eval.paired import paired_rows, pooled_dofs
    from .train import load_config
    from .train.ablate import TABLE1, ablate

    cfg = load_config(args.config, args.overrides)
    result = ablate(
        cfg,
        args.rows or tuple(TABLE1),
        args.grid,
        args.seeds,
        progress=not args.no_progress,
        jobs=args.jobs,
    )
    classes = {c for e in result.summary.values() for c in e.get("class_delta", {})}
    unknown = [c for c in args.mark if c not in classes]
    if unknown and classes:
        print(
            f"--mark: no class named {', '.join(unknown)} (classes: {', '.join(sorted(classes))})"
        )
    print(result.format(mark=args.mark))
    print(f"written: {result.path}")
    diffs, se = paired_rows(result.summary)
    if diffs:
        png = result.path.with_suffix(".png")
        try:
            from .viz import figures

            figures.plot_paired_differences(diffs, png, se=se, df=pooled_dofs(result.summary))
        except ImportError:
            print("figure skipped: it needs matplotlib (pip install 'rch[viz]')")
        else:
            print(f"figure: {png}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``rch`` command; errors are printed as one line, exit status 2."""
    args = _parser().parse_args(argv)
    if args.command == "demo":
        if args.iters < 1:
            raise SystemExit("rch demo: --iters must be >= 1")
        from .demo import run_demo

        run_demo(args.data, args.iters, args.seed, args.out, progress=not args.no_progress)
        return 0
    commands = {
        "train": _train,
        "eval": _eval,
        "export": _export,
        "report": _report,
        "ablate": _ablate,
    }
    try:
        return commands[args.command](args)
    except (KeyError, ValueError, TypeError, FileNotFoundError, RCHError) as exc:
        print(f"rch {args.command}: error: {exc}", file=sys.stderr)
        return 2
