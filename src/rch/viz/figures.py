"""The paper's diagnostic figures (matplotlib, headless). Each function writes one PNG and
returns the figure, so tests can count its panels."""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..eval.metrics import Scores
from ..eval.paired import student_t_critical
from .collect import RunSample

__all__ = [
    "colorize",
    "plot_calibration_maps",
    "plot_class_deltas",
    "plot_iou_delta",
    "plot_paired_differences",
    "plot_predictions",
    "plot_score_distributions",
    "plot_similarity",
    "plot_training_curves",
    "plot_tsne",
]


def _plt() -> Any:
    try:
        import matplotlib
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError("figures need matplotlib: pip install 'rch[viz]'") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | Path) -> Any:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return fig


def colorize(label: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """``(H, W)`` class map -> ``(H, W, 3)`` uint8 colours; ignored pixels are black.

    Example:
        >>> import numpy as np
        >>> palette = np.array([[10, 20, 30], [1, 2, 3]], np.uint8)
        >>> colorize(np.array([[0, 1, 255]]), palette).tolist()
        [[[10, 20, 30], [1, 2, 3], [0, 0, 0]]]
    """
    out = np.zeros((*label.shape, 3), np.uint8)
    known = label < len(palette)
    out[known] = palette[label[known]]
    return out


def plot_score_distributions(samples: Sequence[RunSample], path: str | Path) -> Any:
    """Paper Fig. 1: pre-softmax scores of TP, FN and FP pixels, every run on the same axes."""
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    titles = {
        "tp": "true positives (predicted class)",
        "fn": "false negatives (true class)",
        "fp": "false positives (predicted class)",
    }
    for ax, key in zip(axes, ("tp", "fn", "fp"), strict=True):
        values = [s.scores[key] for s in samples if len(s.scores[key])]
        if values:
            lo = min(float(v.min()) for v in values)
            hi = max(float(v.max()) for v in values)
            bins = np.linspace(lo, hi if hi > lo else lo + 1, 60)
            for s in samples:
                v = s.scores[key]
                if len(v):
                    ax.hist(
                        v,
                        bins=bins,
                        alpha=0.5,
                        density=True,
                        label=f"{s.name} (median {np.median(v):.2f})",
                    )
            ax.legend(fontsize=7)
        ax.set_title(titles[key], fontsize=9)
        ax.set_xlabel("pre-softmax score")
    axes[0].set_ylabel("density")
    return _save(fig, path)


def plot_calibration_maps(sample: RunSample, path: str | Path) -> Any:
    """Paper Fig. 5: per image, the input, the misclassified pixels, and the ``phi`` (FN
    compensation) and ``psi`` (FP penalty) maps of an RCH run."""
    plt = _plt()
    rows = max(1, len(sample.maps))
    fig, axes = plt.subplots(rows, 4, figsize=(12, 2.6 * rows), squeeze=False)
    for r, (view, maps) in enumerate(zip(sample.views, sample.maps, strict=False)):
        phi, psi, wrong = maps
        panels = [
            (view[0], "input", None, 1),
            (wrong, "misclassified", "gray", 1),
            (phi, "phi (FN compensation)", "magma", 2),
            (psi, "psi (FP penalty)", "magma", 2),
        ]
        for ax, (data, title, cmap, top) in zip(axes[r], panels, strict=True):
            kwargs = {} if cmap is None else {"cmap": cmap, "vmin": 0, "vmax": top}
            im = ax.imshow(data, interpolation="nearest", **kwargs)
            ax.set_title(title, fontsize=9)
            ax.axis("off")
            if cmap == "magma":
                fig.colorbar(im, ax=ax, fraction=0.046)
    return _save(fig, path)


def plot_similarity(samples: Sequence[RunSample], path: str | Path) -> Any:
    """Paper Fig. 6 (left): class-by-class mean cosine similarity of the features ``F``,
    one matrix per run; the title gives mean intra- (diagonal) and inter-class values."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(samples), figsize=(5.6 * len(samples), 5), squeeze=False)
    for ax, s in zip(axes[0], samples, strict=True):
        sim = s.similarity
        im = ax.imshow(sim, vmin=-1, vmax=1, cmap="coolwarm")
        diag = np.nanmean(np.diag(sim)) if np.isfinite(np.diag(sim)).any() else math.nan
        off = sim[~np.eye(len(sim), dtype=bool)]
        inter = np.nanmean(off) if np.isfinite(off).any() else math.nan
        ax.set_title(f"{s.name}: intra {diag:.3f}, inter {inter:.3f}", fontsize=9)
        ticks = range(len(s.classes))
        ax.set_xticks(ticks, s.classes, rotation=90, fontsize=7)
        ax.set_yticks(ticks, s.classes, fontsize=7)
        fig.colorbar(im, ax=ax, fraction=0.046)
    return _save(fig, path)


def plot_tsne(samples: Sequence[RunSample], path: str | Path, seed: int = 0) -> Any:
    """Paper Fig. 6 (right): t-SNE of a class-balanced sample of feature pixels per run."""
    from sklearn.manifold import TSNE

    plt = _plt()
    fig, axes = plt.subplots(1, len(samples), figsize=(5.6 * len(samples), 5), squeeze=False)
    for ax, s in zip(axes[0], samples, strict=True):
        n = len(s.points)
        if n >= 5:
            perplexity = float(min(30, max(2, (n - 1) // 3)))
            xy = TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(
                s.points.astype(np.float64)
            )
            for c in np.unique(s.point_labels):
                m = s.point_labels == c
                ax.scatter(xy[m, 0], xy[m, 1], s=6, color=s.palette[c] / 255.0, label=s.classes[c])
            ax.legend(fontsize=6, markerscale=2, ncol=2)
        ax.set_title(f"{s.name}: t-SNE of {n} feature pixels", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    return _save(fig, path)


def plot_predictions(samples: Sequence[RunSample], path: str | Path) -> Any:
    """Paper Fig. 7: input, each run's prediction, ground truth, in the dataset's palette."""
    plt = _plt()
    rows = max(1, len(samples[0].views))
    cols = len(samples) + 2
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.5 * rows), squeeze=False)
    palette = samples[0].palette
    for r in range(len(samples[0].views)):
        image, _, label = samples[0].views[r]
        panels = [(image, "input")]
        panels += [(colorize(s.views[r][1], palette), s.name) for s in samples]
        panels.append((colorize(label, palette), "ground truth"))
        for ax, (data, title) in zip(axes[r], panels, strict=True):
            ax.imshow(data, interpolation="nearest")
            ax.set_title(title, fontsize=9)
            ax.axis("off")
    return _save(fig, path)


def plot_training_curves(
    curves: dict[str, dict[str, list[tuple[int, float]]]], path: str | Path
) -> Any:
    """Losses and validation mIoU over iterations: ``curves[run][metric] = [(iter, value)]``."""
    plt = _plt()
    metrics = sorted({m for c in curves.values() for m in c})
    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.2), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        for run, c in curves.items():
            if c.get(metric):
                xs, ys = zip(*c[metric], strict=True)
                ax.plot(xs, ys, marker="o" if len(xs) < 5 else None, label=run)
        ax.set_title(metric, fontsize=9)
        ax.set_xlabel("iteration")
        ax.legend(fontsize=7)
    return _save(fig, path)


def plot_iou_delta(
    base: Scores,
    other: Scores,
    classes: Sequence[str],
    path: str | Path,
    names: tuple[str, str] = ("baseline", "RCH"),
) -> Any:
    """Per-class IoU difference (points) of ``other`` minus ``base``."""
    plt = _plt()
    delta = [100 * (o - b) for o, b in zip(other.iou, base.iou, strict=True)]
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(classes)), 3.4))
    colors = ["#2a7" if d >= 0 else "#c44" for d in delta]
    ax.bar(range(len(classes)), [0 if math.isnan(d) else d for d in delta], color=colors)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(classes)), classes, rotation=90, fontsize=7)
    ax.set_ylabel("IoU points")
    ax.set_title(f"{names[1]} - {names[0]}: mIoU {100 * (other.miou - base.miou):+.2f}", fontsize=9)
    return _save(fig, path)


def plot_paired_differences(
    diffs: Mapping[str, Sequence[float]],
    path: str | Path,
    *,
    se: Mapping[str, float] | None = None,
    df: Mapping[str, int] | None = None,
    reference: float | None = None,
    reference_label: str = "",
    unit: str = "mIoU points",
    fitted: Mapping[str, tuple[float, float, float]] | None = None,
) -> Any:
    """Paired differences to a baseline, one row per variant: a dot per seed, the mean as a
    diamond and, where ``se`` gives the variant's standard error, a bar of its 95 %
    interval. Where ``df`` gives the degrees of freedom of that SE, the bar is a Student t
    interval (:func:`rch.eval.paired.student_t_critical`); otherwise +- 1.96 SE, a normal
    interval, which is too narrow for an SE that rests on a handful of seeds. A dashed line
    marks ``reference`` (for example the effect a paper claims). ``fitted`` adds, a little
    below a variant's diamond, a hollow square at another estimate of its effect with that
    estimate's interval, ``(effect, low, high)`` (for example the variant + seed fit of
    :func:`rch.eval.paired.additive_effects`).

    Raises:
        ValueError: no variant, or a variant without a difference.
    """
    if not diffs:
        raise ValueError("plot_paired_differences needs at least one variant.")
    empty = [name for name, d in diffs.items() if not d]
    if empty:
        raise ValueError(f"plot_paired_differences: no difference for {', '.join(empty)}.")
    plt = _plt()
    names = list(diffs)
    fig, ax = plt.subplots(figsize=(6.4, 0.9 + 0.38 * len(names)))
    for row, name in enumerate(names):
        y = len(names) - 1 - row
        values = [float(d) for d in diffs[name]]
        jitter = np.linspace(-0.12, 0.12, len(values)) if len(values) > 1 else np.zeros(1)
        ax.scatter(values, y + jitter, s=14, color="#999", zorder=2)
        mean = float(np.mean(values))
        err = 0.0
        if se is not None and name in se and math.isfinite(se[name]):
            dof = (df or {}).get(name, 0)
            err = (student_t_critical(dof) if dof > 0 else 1.96) * se[name]
        color = "#2a7" if mean >= 0 else "#c44"
        ax.errorbar(mean, y, xerr=err or None, fmt="D", color=color, markersize=6, capsize=3)
        if fitted is not None and name in fitted:
            effect, low, high = (float(v) for v in fitted[name])
            ax.errorbar(
                effect,
                y - 0.28,
                xerr=[[effect - low], [high - effect]],
                fmt="s",
                mfc="none",
                color="#555",
                markersize=5,
                capsize=2,
                linewidth=0.8,
            )
    ax.axvline(0, color="black", linewidth=0.8)
    if reference is not None:
        ax.axvline(reference, color="#36c", linestyle="--", linewidth=1, label=reference_label)
        if reference_label:
            ax.legend(fontsize=7, loc="upper left")
    bars = "95 % intervals (t)" if df and se and set(se) <= set(df) else "95 % intervals"
    what = "dots: seeds; diamonds: means" + (f"; bars: {bars}" if se is not None else "")
    if fitted:
        what += "; squares: variant + seed fit"
    ax.set_title(what, fontsize=8)
    ax.set_yticks(range(len(names)), names[::-1], fontsize=8)
    ax.set_ylim(-0.6, len(names) - 0.4)
    ax.set_xlabel(f"difference to the baseline ({unit})")
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def plot_class_deltas(
    deltas: Mapping[str, Mapping[str, float]],
    path: str | Path,
    *,
    mark: Collection[str] = (),
    unit: str = "IoU points",
) -> Any:
    """Per-class differences to a baseline as a heat map: one row per variant, one column
    per class (in the first variant's order), the value written in each cell, red below
    zero and green above, on a scale symmetric about zero. Classes in ``mark`` get a ``*``.

    Raises:
        ValueError: no variant, or variants that do not name the same classes.
    """
    if not deltas:
        raise ValueError("plot_class_deltas needs at least one variant.")
    classes = list(next(iter(deltas.values())))
    odd = [name for name, d in deltas.items() if set(d) != set(classes)]
    if odd:
        raise ValueError(f"plot_class_deltas: {', '.join(odd)} name other classes.")
    plt = _plt()
    grid = np.array([[float(d[c]) for c in classes] for d in deltas.values()])
    finite = np.abs(grid[np.isfinite(grid)])
    bound = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    fig, ax = plt.subplots(figsize=(1.2 + 0.62 * len(classes), 0.9 + 0.36 * len(deltas)))
    image = ax.imshow(grid, cmap="RdYlGn", vmin=-bound, vmax=bound, aspect="auto")
    for (i, j), v in np.ndenumerate(grid):
        ax.text(j, i, "" if math.isnan(v) else f"{v:+.1f}", ha="center", va="center", fontsize=6)
    labels = [f"{c} *" if c in mark else c for c in classes]
    ax.set_xticks(range(len(classes)), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(len(deltas)), list(deltas), fontsize=7)
    fig.colorbar(image, ax=ax, label=unit, fraction=0.04)
    return _save(fig, path)
