"""The numbers to read first after ``benchmarks/gpu_checks.sh``: one Markdown page from its JSON.

A lent GPU machine gives a session a few minutes; this page puts what the checks measured
against the issue's target (at most 3 % more time and memory in a training step) where the
run's printed output ends, so that it can be read at once. It reads, from the checks' output
folder, whatever of these exists (a step that failed or was skipped leaves its file out, and
the page says so):

- ``train_cost_*.json`` (``train_cost.py``): time and memory ratios, the quartiles of the
  paired per-repetition time ratios, host synchronisations per step, inference identical;
- ``gpu_memory*.json`` (``gpu_memory.py``): the peaks and where RCH's is;
- ``step_ops_cuda.json`` (``step_ops.py --device cuda``): launches, kernels and the GPU time
  RCH adds to a step.

It imports no torch (it runs in a second, after the checks). Run: ``python
benchmarks/gpu_summary.py OUT_DIR`` (``gpu_checks.sh`` runs it last and keeps the page,
``summary.md``, in its archive).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

TARGET = 1.03
"""The issue's bound on RCH's time and memory ratios."""

TRAIN_COST_RUNS = (
    ("train_cost_cuda_fp16_novalidate.json", "no value checks"),
    ("train_cost_cuda_fp16.json", "checks deferred (the trainer's default)"),
    ("train_cost_immediate.json", "checks read at once"),
    ("train_cost_conv.json", "no checks, products as convolutions"),
)
"""``train_cost.py`` outputs of ``gpu_checks.sh`` and what each run measured."""

MEMORY_RUNS = (
    ("gpu_memory.json", "default"),
    ("gpu_memory_small_workspace.json", "4 MiB cuBLAS workspaces"),
    ("gpu_memory_conv.json", "products as convolutions"),
)
"""``gpu_memory.py`` outputs of ``gpu_checks.sh`` and what each run measured."""


def mark(ratio: float) -> str:
    """``ratio`` to three places, starred when it is above :data:`TARGET`.

    >>> mark(1.0249), mark(1.0451)
    ('1.025', '1.045*')
    """
    return f"{ratio:.3f}" + ("*" if ratio > TARGET else "")


def _load(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def same_inference(inference: dict[str, Any]) -> bool:
    """Whether ``train_cost.py``'s inference check (its ``inference`` entry) found the exported
    RCH model equal to the baseline: parameters, FLOPs, outputs and state-dict keys."""
    return bool(
        inference.get("params_exported") == inference.get("params_baseline")
        and inference.get("flops_exported") == inference.get("flops_baseline")
        and inference.get("outputs_bitwise_equal_to_attached")
        and inference.get("state_dict_keys_equal")
    )


def _runs_table(
    out: Path,
    runs: tuple[tuple[str, str], ...],
    header: str,
    section: str,
    cells: Callable[[dict[str, Any]], str],
) -> list[str]:
    """A Markdown table with a row per run and network: ``run | network | cells(result)``
    for each network of ``data[section]`` in each of ``runs``' files found in ``out``, and
    a row saying which file is missing for the others."""
    columns = header.count("|") - 1
    lines = [header, "|" + "---|" * columns]
    for name, label in runs:
        data = _load(out / name)
        if data is None:
            lines.append(f"| {label} | (no `{name}`: see its log) |" + " |" * (columns - 2))
            continue
        for network, res in data[section].items():
            lines.append(f"| {label} | {network} | {cells(res)} |")
    return lines


def _cost_cells(res: dict[str, Any]) -> str:
    q1, _, q3 = res["paired_ratio_quartiles"]
    syncs = res.get("syncs_per_step", {})
    sync_text = f"{syncs['baseline']}/{syncs['rch']}" if syncs else "-"
    same = "identical" if same_inference(res.get("inference", {})) else "DIFFERENT"
    return (
        f"{mark(res['time_ratio'])} | {q1:.3f}-{q3:.3f} | {mark(res['memory_ratio'])} | "
        f"{sync_text} | {same}"
    )


def _memory_cells(res: dict[str, Any]) -> str:
    base = res["baseline"]["max_memory_allocated_mib"]
    rch = res["rch"]["max_memory_allocated_mib"]
    return f"{base:.0f} | {rch:.0f} | {mark(rch / base)} | {res['rch']['peak_label']}"


def train_cost_table(out: Path) -> list[str]:
    """One row per network of every ``train_cost.py`` run found in ``out``."""
    header = "| run | network | time | pairs IQR | memory | syncs (base/RCH) | inference |"
    return _runs_table(out, TRAIN_COST_RUNS, header, "results", _cost_cells)


def memory_table(out: Path) -> list[str]:
    """One row per network of every ``gpu_memory.py`` run found in ``out``."""
    header = "| run | network | baseline MiB | RCH MiB | ratio | RCH's peak at |"
    return _runs_table(out, MEMORY_RUNS, header, "networks", _memory_cells)


def step_ops_table(out: Path) -> list[str]:
    """Per network and variant of ``step_ops_cuda.json``: launches, kernels, GPU time."""
    data = _load(out / "step_ops_cuda.json")
    if data is None:
        return ["(no `step_ops_cuda.json`: see its log)"]
    lines = [
        "| network | variant | launches (added) | kernels | reads | GPU ms (added) |",
        "|---|---|---|---|---|---|",
    ]
    for network, rows in data["results"].items():
        for variant, row in rows.items():
            step = row["step"]
            gpu = f"{step['gpu_ms']:.2f} ({row.get('added_gpu_ms', 0.0):+.2f})"
            lines.append(
                f"| {network} | {variant} | {step['launches']} ({row['added_launches']:+d}) | "
                f"{step.get('kernels', '-')} | {step['reads']} | {gpu} |"
            )
    return lines


def steps_line(out: Path) -> str:
    r"""The checks' steps as ``gpu_checks.sh`` logged them in ``steps.tsv`` (name, exit
    status or ``skipped``, seconds), on one line: ``name ok 12 s``, ``name rc=1 3 s``.

    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> _ = (folder / "steps.tsv").write_text("a\t0\t12\nb\t124\t60\nc\tskipped\t0\n")
    >>> steps_line(folder)
    'Steps: a ok 12 s; b rc=124 60 s; c skipped.'
    """
    path = out / "steps.tsv"
    if not path.is_file():
        return "Steps: no `steps.tsv`."
    parts = []
    for line in path.read_text().splitlines():
        name, rc, seconds = line.split("\t")
        if rc == "skipped":
            parts.append(f"{name} skipped")
        else:
            parts.append(f"{name} {'ok' if rc == '0' else f'rc={rc}'} {seconds} s")
    return "Steps: " + "; ".join(parts) + "."


def summarize(out: Path) -> str:
    """The whole page for the checks' output folder ``out``."""
    parts = [
        f"# GPU checks: what to read first ({out})",
        "",
        steps_line(out),
        "",
        f"Ratios are RCH over baseline; `*` marks one above the target ({TARGET}).",
        "",
        "## Training step (`train_cost.py`, 512x1024, fp16 AMP, batch 2)",
        "",
        *train_cost_table(out),
        "",
        "## Memory at the step's peak (`gpu_memory.py`)",
        "",
        *memory_table(out),
        "",
        "## What a step launches and how long the GPU runs it (`step_ops.py`)",
        "",
        *step_ops_table(out),
    ]
    return "\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="gpu_checks.sh's output folder")
    args = parser.parse_args(argv)
    if not args.out.is_dir():
        parser.error(f"{args.out} is not a folder")
    sys.stdout.write(summarize(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
