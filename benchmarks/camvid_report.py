"""Markdown tables of the CamVid benchmark, drawn from its results file.

The tables in ``RESULTS.md`` (and anywhere else) that quote ``camvid.json`` sit between
markers, and this script rewrites what lies between them, so they cannot drift from the
runs::

    <!-- camvid-report:table1 -->
    (generated; edits here are overwritten)
    <!-- /camvid-report -->

Blocks:

- ``table1``: the paper's Table 1 rows against the baseline, paired by seed;
- ``grid``: the tau / rho / lambda points, the defaults first;
- ``variants``: every variant, its settings, runs, mIoU, paired differences and the
  variant + seed fit;
- ``classes [VARIANT ...]``: per-class IoU deltas to the baseline, the rare classes first
  (``paper``, ``official`` and the Table 1 rows when none is named);
- ``ftests``, ``pooled``, ``power``: do the variants differ at all, every RCH run together,
  and how small an effect the protocol resolves;
- ``pairs A B [SEEDS]``: two variants seed by seed, ``A`` minus ``B`` (SEEDS such as
  ``5-9`` or ``0,2``; every seed both ran when omitted);
- ``test A B SEEDS sd=S df=N alternative=greater|less [level=0.95]``: a test fixed before
  its runs, on the mean of ``A`` minus ``B`` over SEEDS
  (:func:`rch.eval.paired.prespecified_test`), with its outcome once every seed has both.

A marker may be indented (inside a list item): the block takes its indentation.

Run: ``python benchmarks/camvid_report.py [--results benchmarks/results/camvid.json]
[--update benchmarks/RESULTS.md ...] [--check]``. Without ``--update`` it prints every
block; with ``--check`` it writes nothing and exits 1 if a block is out of date.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from rch.eval.paired import marked_first, prespecified_test
from rch.train.ablate import GRID, GRID_DEFAULTS, TABLE1

sys.path.insert(0, str(Path(__file__).resolve().parent))
from camvid import ABLATION_ROWS, RARE, TABLE1_ROWS

BASE_SETTINGS = ("rch.formulation=paper",)
"""Settings every RCH variant has unless it names another (the paper formulation)."""
GRID_LABELS = {"rch.tau": "tau", "rch.momentum": "rho", "rch.loss_weight": "lambda"}
SIDES: dict[str | None, Literal["greater", "less"]] = {"greater": "greater", "less": "less"}
"""A test's ``alternative=`` as written, and as :func:`prespecified_test` takes it."""
MISSING = "·"
"""A seed the variant did not run."""
START = re.compile(r"^(?P<indent>[ \t]*)<!-- camvid-report:(?P<spec>[^>]*?) -->[ \t]*$")
END = re.compile(r"^[ \t]*<!-- /camvid-report -->[ \t]*$")


class ReportError(ValueError):
    """A marker that cannot be rendered: unknown block, bad arguments, unclosed marker."""


def signed(x: float | None) -> str:
    """``+0.42``; empty for a missing or NaN value; a value that rounds to zero is +0.00.

    >>> signed(0.424), signed(-1e-12), signed(None)
    ('+0.42', '+0.00', '')
    """
    if x is None or math.isnan(x):
        return ""
    return f"{round(x, 2) + 0.0:+.2f}"  # + 0.0 turns -0.0 into 0.0


def plain(x: float | None) -> str:
    """``0.42``; empty for a missing or NaN value."""
    return "" if x is None or math.isnan(x) else f"{x:.2f}"


def interval(ci: Sequence[float] | None) -> str:
    """``-0.63 to +0.89``; empty without an interval."""
    if ci is None or any(math.isnan(c) for c in ci):
        return ""
    return f"{ci[0]:+.2f} to {ci[1]:+.2f}"


def seed_span(seeds: Sequence[int]) -> str:
    """Seeds as written in the tables: ``0-4`` for a run of consecutive seeds, else a list.

    >>> seed_span([0, 1, 2, 3, 4]), seed_span([0, 1]), seed_span([0, 2, 3]), seed_span([7])
    ('0-4', '0, 1', '0, 2, 3', '7')
    """
    s = sorted(seeds)
    if len(s) > 2 and s == list(range(s[0], s[-1] + 1)):
        return f"{s[0]}-{s[-1]}"
    return ", ".join(map(str, s))


def parse_seeds(text: str) -> list[int]:
    """``5-9`` or ``0,2,3`` as a list of seeds.

    >>> parse_seeds("5-9"), parse_seeds("0,2")
    ([5, 6, 7, 8, 9], [0, 2])
    """
    try:
        if "-" in text:
            lo, hi = (int(t) for t in text.split("-"))
            seeds = list(range(lo, hi + 1))
        else:
            seeds = [int(t) for t in text.split(",")]
    except ValueError:
        seeds = []
    if not seeds or len(set(seeds)) != len(seeds):
        raise ReportError(f"seeds {text!r}: write them as 5-9 or 0,2,3")
    return seeds


def settings(data: dict[str, Any], name: str) -> list[str]:
    """A variant's overrides as the results file records them, less the shared defaults."""
    return [o for o in data["meta"]["variants"].get(name, []) if o not in BASE_SETTINGS]


def _baseline_seeds(data: dict[str, Any]) -> list[int]:
    return [int(s) for s in data["summary"]["baseline"]["seeds"]]


def _paired_by_seed(data: dict[str, Any], name: str) -> dict[int, float]:
    entry = data["summary"][name]
    seeds = entry.get("paired_seeds", [])
    return dict(zip((int(s) for s in seeds), entry.get("paired_diff", []), strict=True))


def _per_seed_cells(data: dict[str, Any], name: str) -> list[str]:
    """The paired difference on each of the baseline's seeds, ``·`` where not run."""
    diffs = _paired_by_seed(data, name)
    return [signed(diffs[s]) if s in diffs else MISSING for s in _baseline_seeds(data)]


def _mean_cell(entry: dict[str, Any]) -> str:
    n = len(entry["paired_diff"])
    mean = signed(entry["diff_mean"])
    return f"**{mean}** ({n} seeds)" if n >= 3 else f"{mean} ({n} seed{'s' * (n > 1)})"


def _fit_cell(data: dict[str, Any], name: str) -> str:
    effects = (data.get("additive") or {}).get("effects", {})
    if name not in effects:
        return ""
    return f"{signed(effects[name]['effect'])} ({interval(effects[name]['ci'])})"


def _paired_cells(data: dict[str, Any], name: str) -> list[str]:
    """A paired row's last cells: the difference on each baseline seed, their mean, the
    95 % interval on the pooled SE and the variant + seed fit."""
    entry = data["summary"][name]
    return [
        *_per_seed_cells(data, name),
        _mean_cell(entry),
        interval(entry["diff_ci_pooled"]),
        _fit_cell(data, name),
    ]


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return [_row(header), "|" + "---|" * len(header), *(_row(r) for r in rows)]


def _seed_header(data: dict[str, Any]) -> list[str]:
    return [f"seed {s}" for s in _baseline_seeds(data)]


def table1_traits(overrides: Sequence[str]) -> tuple[str, str, str]:
    """Where a Table 1 row's prototypes come from and whether it has each margin."""
    if "rch.prototypes=learned" in overrides:
        source = "learned parameter"
    elif "rch.prototype_source=gt" in overrides:
        source = "EMA of all labelled pixels"
    else:
        source = "EMA of TP pixels"
    fn = "" if "rch.fn_term=false" in overrides else "yes"
    fp = "" if "rch.fp_term=false" in overrides else "yes"
    return source, fn, fp


def table1(data: dict[str, Any], args: Sequence[str] = ()) -> list[str]:
    """The paper's Table 1 rows against the baseline, one column per baseline seed; full RCH
    is the ``paper`` variant."""
    _no_args("table1", args)
    rows = []
    for row in TABLE1_ROWS:
        entry = data["summary"].get(row)
        if entry is None or "paired_diff" not in entry:
            continue
        label = "full (`paper`)" if row == "paper" else f"`{row}`"
        traits = table1_traits(TABLE1["full" if row == "paper" else row])
        rows.append([label, *traits, *_paired_cells(data, row)])
    header = ["row", "prototypes", "FN margin", "FP margin", *_seed_header(data)]
    return _table([*header, "mean", "95 % interval", "variant + seed fit"], rows)


def grid_point(overrides: Sequence[str]) -> tuple[str, str] | None:
    """The grid key and value (as written) a variant sets, if it sets exactly one grid key
    and nothing else (the paper formulation aside).

    >>> grid_point(["rch.formulation=paper", "rch.loss_weight=0.05"])
    ('rch.loss_weight', '0.05')
    >>> grid_point(["rch.tau=0.25", "rch.ohem=hide"]), grid_point(["rch.ohem=hide"])
    (None, None)
    """
    rest = [o for o in overrides if o not in BASE_SETTINGS]
    if len(rest) != 1 or "=" not in rest[0]:
        return None
    key, value = rest[0].split("=", 1)
    if key not in GRID:
        return None
    try:
        float(value)
    except ValueError:
        return None
    return key, value


def grid(data: dict[str, Any], args: Sequence[str] = ()) -> list[str]:
    """The tau / rho / lambda points with runs, one value changed from the defaults (the
    ``paper`` variant, first), by axis and value; every variant that changes one grid key
    only counts (``paper-light`` is lambda 0.05)."""
    _no_args("grid", args)
    points: dict[tuple[str, str], str] = {}
    for name in data["summary"]:
        point = grid_point(data["meta"]["variants"].get(name, []))
        if point is not None and "paired_diff" in data["summary"][name]:
            points.setdefault(point, name)
    defaults = ", ".join(f"{GRID_LABELS[k]} {v:g}" for k, v in GRID_DEFAULTS.items())
    order = sorted(points, key=lambda kv: (list(GRID).index(kv[0]), float(kv[1])))
    rows = []
    for label, name in [(f"**{defaults} (defaults)**", "paper")] + [
        (f"{GRID_LABELS[k]} {v}", points[k, v]) for k, v in order
    ]:
        entry = data["summary"].get(name)
        if entry is None or "paired_diff" not in entry:
            continue
        rows.append([label, f"`{name}`", *_paired_cells(data, name)])
    header = ["point", "variant", *_seed_header(data), "mean", "95 % interval"]
    return _table([*header, "variant + seed fit"], rows)


def variants(data: dict[str, Any], args: Sequence[str] = ()) -> list[str]:
    """Every variant in the results file: its settings, its runs' seeds, their mIoU, its
    mean and std, the paired difference on each baseline seed, their mean, own SE, pooled SE,
    the 95 % t interval on the pooled SE and the variant + seed fit's effect."""
    _no_args("variants", args)
    rows = []
    for name, entry in data["summary"].items():
        changed = ", ".join(f"`{o}`" for o in settings(data, name)) or "(defaults)"
        runs = f"{len(entry['seeds'])} ({seed_span(entry['seeds'])})"
        own = [", ".join(map(plain, entry["mIoU"])), plain(entry["mean"]), plain(entry["std"])]
        if "paired_diff" not in entry:
            rows.append([f"`{name}`", changed, runs, *own, "", "", "", "", "", ""])
            continue
        rows.append(
            [
                f"`{name}`",
                changed,
                runs,
                *own,
                ", ".join(_per_seed_cells(data, name)),
                _mean_cell(entry),
                plain(entry["diff_se"]),
                plain(entry["diff_se_pooled"]),
                interval(entry["diff_ci_pooled"]),
                _fit_cell(data, name),
            ]
        )
    seeds = seed_span(_baseline_seeds(data))
    header = ["variant", "settings", "runs (seeds)", "mIoU per seed", "mean", "std"]
    header += [f"paired diff, seeds {seeds}", "mean diff", "SE", "pooled SE", "95 % interval"]
    return _table([*header, "variant + seed fit"], rows)


def classes(data: dict[str, Any], args: Sequence[str] = ()) -> list[str]:
    """Per-class IoU deltas to the baseline (each variant's ``class_delta``: the mean over
    its paired seeds), a row per class with the rare classes first (starred) and the
    baseline's own mean IoU beside them; ``paper``, ``official`` and the Table 1 rows that
    have runs when ``args`` names no variant."""
    summary = data["summary"]
    default = ["paper", "official", *ABLATION_ROWS]
    names = list(args) or [n for n in default if "class_delta" in summary.get(n, {})]
    for name in names:
        if "class_delta" not in summary.get(name, {}):
            raise ReportError(f"classes: variant {name!r} has no paired runs")
    base = data["runs"]["baseline"]
    order = marked_first(list(summary[names[0]]["class_delta"]), RARE)
    rows = []
    for c in order:
        own = statistics.fmean(100 * (run["IoU"][c] or 0.0) for run in base.values())
        cells = [signed(summary[n]["class_delta"][c]) for n in names]
        rows.append([f"{c} *" if c in RARE else c, plain(own), *cells])
    mious = [f"**{signed(summary[n]['diff_mean'])}**" for n in names]
    rows.append(["mIoU", plain(summary["baseline"]["mean"]), *mious])
    header = [
        "class (* rare)",
        f"baseline IoU ({len(base)} runs)",
        *(f"`{n}` ({len(summary[n]['paired_diff'])} seeds)" for n in names),
    ]
    return _table(header, rows)


def ftests(data: dict[str, Any], args: Sequence[str] = ()) -> list[str]:
    """Do the variants differ at all (:func:`rch.eval.paired.variant_f_test`, as
    ``camvid.py`` computes it): each test's variants, runs, F and p."""
    _no_args("ftests", args)
    rows = []
    for label, t in (data.get("f_tests") or {}).items():
        names = t["variants"]
        shown = ", ".join(f"`{n}`" for n in names) if len(names) <= 8 else f"all {len(names)}"
        rows.append(
            [
                label,
                shown,
                str(t["runs"]),
                f"{t['f']:.2f} on ({t['df1']}, {t['df2']})",
                f"{t['p']:.3f}",
            ]
        )
    return _table(["test", "variants", "runs", "F (df)", "p"], rows)


def pooled(data: dict[str, Any], args: Sequence[str] = ()) -> list[str]:
    """Every RCH run together (:func:`rch.eval.paired.pooled_effect`): per seed, the RCH
    runs' mean minus that seed's baseline run, their mean with its SE and 95 % t interval
    over the seeds; then the unpaired Welch comparison of all runs."""
    _no_args("pooled", args)
    e = data.get("pooled")
    if not e:
        raise ReportError("pooled: the results file has no pooled effect")
    seeds = list(e["seed_diff"])
    runs = {s: sum(1 for v, r in data["runs"].items() if v != "baseline" and s in r) for s in seeds}
    header = ["", *(f"seed {s} ({runs[s]} runs)" for s in seeds), "mean", "SE", "95 % interval"]
    by_seed = [
        "all RCH runs on the baseline's seeds, minus the baseline, by seed",
        *(signed(e["seed_diff"][s]) for s in seeds),
        f"**{signed(e['seed_diff_mean'])}**",
        plain(e["seed_diff_se"]),
        interval(e["seed_diff_ci"]),
    ]
    welch = [
        f"all {e['runs']} RCH runs ({e['variants']} variants) against the {e['baseline_runs']}"
        f" baseline runs, unpaired: {plain(e['mean'])} against {plain(e['baseline_mean'])}",
        *([""] * len(seeds)),
        signed(e["diff"]),
        f"{plain(e['se'])} (Welch, {e['df']:.1f} df)",
        "",
    ]
    return _table(header, [by_seed, welch])


def power(data: dict[str, Any], args: Sequence[str] = ()) -> list[str]:
    """How likely the paired test tells a true effect from zero
    (:func:`rch.eval.paired.power_table`), on the pooled SD, by number of seeds."""
    _no_args("power", args)
    t = data.get("power")
    if not t or not t["rows"]:
        raise ReportError("power: the results file has no power table")
    counts = t["rows"][0]["seeds"]
    target = f"seeds for {100 * t['target']:g} %"
    rows = [
        [
            signed(r["effect"]),
            *(f"{p:.2f}" for p in r["power"]),
            "> 1e6" if r["seeds_needed"] is None else str(r["seeds_needed"]),
        ]
        for r in t["rows"]
    ]
    return _table(["true effect", *(f"{n} seeds" for n in counts), target], rows)


def _two_variants(
    data: dict[str, Any], block: str, a: str, b: str, seeds: Sequence[int] | None
) -> tuple[list[int], list[tuple[int, float | None, float | None]]]:
    """The seeds (``seeds``, or every seed both ran) and each one's mIoU of ``a`` and ``b``
    in points, None where that variant did not run it.

    Raises:
        ReportError: ``a`` or ``b`` has no runs, named with ``block``.
    """
    for name in (a, b):
        if name not in data["runs"]:
            raise ReportError(f"{block}: no runs of variant {name!r} in the results file")
    ra, rb = data["runs"][a], data["runs"][b]
    chosen = list(seeds) if seeds is not None else sorted(int(s) for s in ra if s in rb)

    def miou(runs: dict[str, Any], seed: int) -> float | None:
        return 100 * runs[str(seed)]["mIoU"] if str(seed) in runs else None

    return chosen, [(s, miou(ra, s), miou(rb, s)) for s in chosen]


def pairs(data: dict[str, Any], args: Sequence[str] = ()) -> list[str]:
    """Two variants seed by seed: each one's mIoU and ``A`` minus ``B``, then their means
    (over the listed seeds, or every seed both ran)."""
    if len(args) not in (2, 3):
        raise ReportError(f"pairs takes two variants and optional seeds, not {list(args)}")
    a, b = args[0], args[1]
    _, runs = _two_variants(data, "pairs", a, b, parse_seeds(args[2]) if len(args) == 3 else None)
    rows: list[list[str]] = []
    both_ran: list[tuple[float, float]] = []  # (A, B) on each listed seed both ran
    for s, ma, mb in runs:
        d = None
        if ma is not None and mb is not None:
            both_ran.append((ma, mb))
            d = ma - mb
        rows.append([str(s), plain(ma) or MISSING, plain(mb) or MISSING, signed(d) or MISSING])
    if both_ran:
        n = len(both_ran)
        ma, mb = (statistics.fmean(x) for x in zip(*both_ran, strict=True))
        rows.append(
            [f"mean ({n} pair{'s' * (n > 1)})", plain(ma), plain(mb), f"**{signed(ma - mb)}**"]
        )
    return _table(["seed", f"`{a}`", f"`{b}`", f"`{a}` minus `{b}`"], rows)


def test(data: dict[str, Any], args: Sequence[str] = ()) -> list[str]:
    """A test fixed before its runs (:func:`rch.eval.paired.prespecified_test`): the mean
    of ``A`` minus ``B`` over the planned seeds that both have run, on the fixed SD, and
    the outcome once all of them have."""
    keys = ("sd", "df", "alternative", "level")  # variant names may hold "=": tau=0.25
    options = dict(a.split("=", 1) for a in args if a.split("=", 1)[0] in keys)
    positional = [a for a in args if a.split("=", 1)[0] not in keys]
    alternative = options.get("alternative")
    if len(positional) != 3 or {"sd", "df"} - set(options) or alternative not in SIDES:
        raise ReportError(
            f"test takes A B SEEDS sd=S df=N alternative=greater|less [level=L], not {list(args)}"
        )
    a, b, seed_text = positional
    seeds, runs = _two_variants(data, "test", a, b, parse_seeds(seed_text))
    diffs = [ma - mb for _, ma, mb in runs if ma is not None and mb is not None]
    try:
        sd, df, level = float(options["sd"]), int(options["df"]), float(options.get("level", 0.95))
        r = prespecified_test(diffs, sd, df, len(seeds), SIDES[alternative], level)
    except ValueError as err:
        raise ReportError(f"test: {err}") from None
    side = "above" if alternative == "greater" else "below"
    if r["decided"]:
        outcome = "**confirmed**" if r["confirmed"] else "**not confirmed**"
        cells = [signed(r["mean"]), signed(r["t"]), f"{r['p']:.3f}"]
    else:
        outcome = (
            f"waiting for {r['planned'] - r['n']} more pair{'s' * (r['planned'] - r['n'] > 1)}"
        )
        cells = [f"{signed(r['mean'])} (so far)" if r["n"] else "", "", ""]
    header = [
        "pairs",
        f"mean `{a}` minus `{b}`",
        f"t (SE {r['se']:.2f}: SD {sd:g} fixed, {df} df)",
        "one-sided p",
        "confirmed if the mean is",
        "outcome",
    ]
    row = [f"{r['n']} of {r['planned']} (seeds {seed_span(seeds)})", cells[0], cells[1], cells[2]]
    return _table(header, [[*row, f"{side} {signed(r['bound'])}", outcome]])


def _no_args(block: str, args: Sequence[str]) -> None:
    if args:
        raise ReportError(f"{block} takes no arguments, not {list(args)}")


BLOCKS: dict[str, Callable[[dict[str, Any], Sequence[str]], list[str]]] = {
    "table1": table1,
    "grid": grid,
    "variants": variants,
    "classes": classes,
    "ftests": ftests,
    "pooled": pooled,
    "power": power,
    "pairs": pairs,
    "test": test,
}


def render(data: dict[str, Any], spec: str) -> list[str]:
    """The lines of one block, ``spec`` as in its marker (``pairs tp+fn tp+fp 5-9``)."""
    kind, *args = spec.split() or [""]
    if kind not in BLOCKS:
        raise ReportError(f"unknown block {kind!r}; choose from {sorted(BLOCKS)}")
    try:
        return BLOCKS[kind](data, args)
    except KeyError as err:  # a results file of another kind, or without a baseline
        raise ReportError(f"{spec}: the results file has no {err}") from None


def update(text: str, data: dict[str, Any], where: str = "text") -> tuple[str, list[str]]:
    """``text`` with every marked block rewritten from ``data``, and the specs of the blocks
    that changed. Text outside the markers is kept byte for byte.

    Raises:
        ReportError: a start marker without its end (or an end without a start), an
            unknown block, bad block arguments; named with ``where`` and the line.
    """
    lines = text.split("\n")
    out: list[str] = []
    changed: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        start = START.match(line)
        if END.match(line):
            raise ReportError(f"{where}:{i + 1}: an end marker without its start")
        out.append(line)
        i += 1
        if start is None:
            continue
        spec, indent = start["spec"].strip(), start["indent"]
        j = i
        while j < len(lines) and not END.match(lines[j]):
            if START.match(lines[j]):
                break
            j += 1
        if j == len(lines) or not END.match(lines[j]):
            raise ReportError(f"{where}:{i}: block {spec!r} has no end marker")
        try:
            body = render(data, spec)
        except ReportError as err:
            raise ReportError(f"{where}:{i}: {err}") from None
        new = ["", *(indent + b for b in body), ""]
        if lines[i:j] != new:
            changed.append(spec)
        out.extend([*new, lines[j]])
        i = j + 1
    return "\n".join(out), changed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", type=Path, default=Path("benchmarks/results/camvid.json"))
    p.add_argument("--update", type=Path, nargs="+", default=[], help="files to rewrite")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 if one is stale")
    args = p.parse_args(argv)
    try:
        data = json.loads(args.results.read_text())
    except (OSError, ValueError) as e:
        p.error(f"--results {args.results}: unreadable ({e})")
    if not args.update:
        for spec in ("table1", "grid", "variants"):
            block = [f"<!-- camvid-report:{spec} -->", "", *render(data, spec), ""]
            print(*block, "<!-- /camvid-report -->", "", sep="\n")
        return 0
    stale = 0
    for path in args.update:
        try:
            text, changed = update(path.read_text(), data, str(path))
        except OSError as e:
            p.error(f"--update {path}: unreadable ({e})")
        except ReportError as e:
            p.error(str(e))
        if not changed:
            print(f"{path}: up to date")
        elif args.check:
            stale += len(changed)
            print(f"{path}: out of date: {', '.join(changed)}")
        else:
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(text)
            tmp.replace(path)  # a reader never sees half a file
            print(f"{path}: rewrote {', '.join(changed)}")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
