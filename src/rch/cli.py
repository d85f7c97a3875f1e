"""Command line: ``rch demo``. Thin: it parses into the arguments the Python API takes."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rch", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo", help="train a small network with and without RCH on generated data"
    )
    demo.add_argument("--steps", type=int, default=150, help="training steps per run")
    demo.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``rch`` command."""
    args = _parser().parse_args(argv)
    if args.command == "demo":
        if args.steps < 1:
            raise SystemExit("rch demo: --steps must be >= 1")
        from .demo import run_demo

        run_demo(steps=args.steps, seed=args.seed)
    return 0
