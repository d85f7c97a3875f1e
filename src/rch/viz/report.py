"""``rch report RUN_A RUN_B``: one self-contained HTML page comparing two runs."""

from __future__ import annotations

import base64
import datetime
import html
import json
import math
from pathlib import Path
from typing import Any

import torch
import yaml

from ..diagnostics import STAT_NAMES
from ..errors import RCHError
from ..eval.metrics import Scores, scores_from_confusion
from ..train.config import flatten_dict
from ..train.logger import read_metrics
from . import figures
from .collect import RunSample, collect

__all__ = ["load_scores", "write_report"]

CSS = """
body { font-family: system-ui, sans-serif; margin: 24px auto; max-width: 1200px; color: #222; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 28px; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 13px; margin: 8px 0; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
td.up { color: #176d3a; } td.down { color: #b22; }
figure { margin: 12px 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 13px; color: #555; }
.note { font-size: 13px; color: #555; }
"""


def load_scores(run: Path) -> tuple[Scores, list[str]]:
    """The run's final scores (``eval.json``, else the newest ``eval-*.json``)."""
    candidates = [run / "eval.json", *sorted(run.glob("eval-*.json"))]
    for path in candidates:
        if path.is_file():
            data = json.loads(path.read_text())
            classes = list(data["IoU"])
            if "confusion" in data:
                return scores_from_confusion(torch.tensor(data["confusion"])), classes

            def num(v: Any) -> float:
                return math.nan if v is None else float(v)

            # no confusion matrix: scores as written; precision only where it was
            precision = data.get("Precision", {})
            scores = Scores(
                iou=[num(data["IoU"][c]) for c in classes],
                acc=[num(data["Acc"][c]) for c in classes],
                miou=num(data["mIoU"]),
                macc=num(data["mAcc"]),
                aacc=num(data["aAcc"]),
                precision=[num(precision.get(c)) for c in classes],
                mprecision=num(data.get("mPrecision")),
            )
            return scores, classes
    raise RCHError(f"run {run} has no evaluation (eval.json); finish it or run `rch eval {run}`")


def _json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _pct(v: float) -> str:
    return "n/a" if math.isnan(v) else f"{100 * v:.2f}"


def _delta_cell(d: float) -> str:
    if math.isnan(d):
        return "<td>n/a</td>"
    cls = "up" if d > 0 else "down" if d < 0 else ""
    return f'<td class="{cls}">{100 * d:+.2f}</td>'


def _table(header: list[str], rows: list[list[str]], raw: bool = False) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = []
    for row in rows:
        cells = "".join(
            c if raw and c.startswith("<td") else f"<td>{html.escape(c)}</td>" for c in row
        )
        body.append(f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _figure(path: Path, caption: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(caption)}">'
        f"<figcaption>{html.escape(caption)} ({path.name})</figcaption></figure>"
    )


def _curves(run: Path) -> dict[str, list[tuple[int, float]]]:
    records = read_metrics(run) if (run / "metrics.jsonl").is_file() else []
    out: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        if r["tag"] == "train":
            for key in ("seg", "rch"):
                if isinstance(r.get(key), (int, float)):
                    out.setdefault(f"train {key} loss", []).append((r["iter"], r[key]))
        elif r["tag"] == "val" and isinstance(r.get("mIoU"), (int, float)):
            out.setdefault("val mIoU", []).append((r["iter"], 100 * r["mIoU"]))
    for key, points in out.items():
        step = max(1, len(points) // 200)
        out[key] = points[::step]
    return out


def _stats_table(stats: dict[str, Any]) -> str:
    rows = []
    for k, name in enumerate(stats["classes"]):
        row = [name]
        for stat in STAT_NAMES:
            v = stats[stat][k]
            if v is None or v != v:
                row.append("n/a")
            else:
                row.append(f"{v:.0f}" if stat in ("tp", "fn", "fp") else f"{v:.3f}")
        rows.append(row)
    return _table(["class", *STAT_NAMES], rows)


def write_report(
    run_a: str | Path,
    run_b: str | Path,
    out_dir: str | Path | None = None,
    split: str | None = None,
    limit: int = 40,
    n_images: int = 4,
) -> Path:
    """Write ``index.html`` (figures embedded, and beside it as PNG) comparing two runs.

    Args:
        run_a: the reference run directory (usually the baseline).
        run_b: the run compared with it (usually RCH).
        out_dir: where to write; default ``<run_b's parent>/report-<a>-vs-<b>``.
        split: dataset split for the figures (default: the runs' val split).
        limit: images used for the figures' statistics.
        n_images: images shown in the prediction and calibration-map figures.

    Returns:
        The path of ``index.html``.
    """
    a, b = Path(run_a), Path(run_b)
    out = Path(out_dir) if out_dir else b.parent / f"report-{a.name}-vs-{b.name}"
    out.mkdir(parents=True, exist_ok=True)
    (sa, classes), (sb, _) = load_scores(a), load_scores(b)
    samples: list[RunSample] = [collect(r, split, limit, n_images) for r in (a, b)]
    names = (a.name, b.name)
    figs: list[tuple[Path, str]] = []

    def add(name: str, caption: str, draw: Any) -> None:
        path = out / name
        draw(path)
        figs.append((path, caption))

    add(
        "iou_delta.png",
        "Per-class IoU difference",
        lambda p: figures.plot_iou_delta(sa, sb, classes, p, names),
    )
    curves = {r.name: _curves(r) for r in (a, b)}
    add(
        "curves.png",
        "Training losses and validation mIoU",
        lambda p: figures.plot_training_curves(curves, p),
    )
    add(
        "scores.png",
        "Fig. 1: pre-softmax scores of TP, FN and FP pixels",
        lambda p: figures.plot_score_distributions(samples, p),
    )
    for s in samples:
        if s.maps:
            add(
                f"maps-{s.name}.png",
                f"Fig. 5: misclassified pixels, phi and psi maps ({s.name})",
                lambda p, s=s: figures.plot_calibration_maps(s, p),
            )
    add(
        "similarity.png",
        "Fig. 6: class-by-class mean cosine similarity of the features",
        lambda p: figures.plot_similarity(samples, p),
    )
    add(
        "tsne.png",
        "Fig. 6: t-SNE of a class-balanced sample of feature pixels",
        lambda p: figures.plot_tsne(samples, p),
    )
    add(
        "predictions.png",
        "Fig. 7: input, predictions, ground truth",
        lambda p: figures.plot_predictions(samples, p),
    )

    score_rows = [
        [
            m,
            _pct(getattr(sa, k)),
            _pct(getattr(sb, k)),
            _delta_cell(getattr(sb, k) - getattr(sa, k)),
        ]
        for m, k in (
            ("mIoU", "miou"),
            ("mAcc (recall)", "macc"),
            ("mPrecision", "mprecision"),
            ("aAcc", "aacc"),
        )
    ]
    class_rows = [
        [
            c,
            _pct(sa.iou[i]),
            _pct(sb.iou[i]),
            _delta_cell(sb.iou[i] - sa.iou[i]),
            _delta_cell(sb.acc[i] - sa.acc[i]),
            _delta_cell(sb.precision[i] - sa.precision[i]),
        ]
        for i, c in enumerate(classes)
    ]
    costs = [_json(r / "cost.json") or {} for r in (a, b)]

    def cost(i: int, key: str, scale: float, fmt: str) -> str:
        v = costs[i].get(key)
        return format(v * scale, fmt) if isinstance(v, (int, float)) else "n/a"

    cost_rows = [
        ["s/iter (median)", cost(0, "s_per_iter", 1, ".4f"), cost(1, "s_per_iter", 1, ".4f")],
        [
            "peak memory (MiB)*",
            cost(0, "peak_memory_mib", 1, ".0f"),
            cost(1, "peak_memory_mib", 1, ".0f"),
        ],
        ["iterations", cost(0, "iterations", 1, ".0f"), cost(1, "iterations", 1, ".0f")],
    ]
    configs = [
        flatten_dict(yaml.safe_load((r / "config.yaml").read_text()) or {})
        if (r / "config.yaml").is_file()
        else {}
        for r in (a, b)
    ]
    diff_rows = [
        [key, json.dumps(configs[0].get(key)), json.dumps(configs[1].get(key))]
        for key in sorted(set(configs[0]) | set(configs[1]))
        if configs[0].get(key) != configs[1].get(key) and key != "name"
    ]
    stats_html = ""
    for r in (a, b):
        stats = _json(r / "rch_stats.json")
        if stats:
            batches = stats.get("batches", "?")
            title = f"{html.escape(r.name)} (mean over {batches} logged batches)"
            stats_html += f"<h3>{title}</h3>" + _stats_table(stats)
    if not stats_html:
        stats_html = '<p class="note">Neither run trained with RCH.</p>'
    header = ["", *names, "delta"]
    diff_html = _table(["key", *names], diff_rows) if diff_rows else "<p>none</p>"
    body = f"""<h1>{html.escape(a.name)} vs {html.escape(b.name)}</h1>
<p class="note">{html.escape(str(a.resolve()))} and {html.escape(str(b.resolve()))};
written {datetime.datetime.now().strftime("%Y-%m-%d %H:%M")}. Scores are each run's final
evaluation; the figures use the first {limit} images of the split.</p>
<h2>Scores</h2>{_table(header, score_rows, raw=True)}
<h2>Per-class IoU (%)</h2>
<p class="note">Recall is 1 minus the false-negative rate, precision 1 minus the
false-positive share; their deltas show which kind of error a change traded.</p>
{_table(["class", *names, "delta", "recall delta", "precision delta"], class_rows, raw=True)}
<h2>Training cost</h2>{_table(["", *names], cost_rows)}
<p class="note">* CUDA: peak memory allocated by tensors. CPU: the process's peak resident set
while the run trained; a run trained after another in the same process (as in rch demo) also
counts what the first one left allocated.</p>
<h2>Configuration differences</h2>{diff_html}
<h2>Calibration statistics</h2>{stats_html}
<h2>Figures</h2>{"".join(_figure(p, c) for p, c in figs)}"""
    page = (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>rch report: {html.escape(a.name)} vs {html.escape(b.name)}</title>"
        f"<style>{CSS}</style></head><body>{body}</body></html>"
    )
    index = out / "index.html"
    index.write_text(page)
    return index
