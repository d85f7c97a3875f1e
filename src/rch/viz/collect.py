"""Run a trained network over a few images of a split and keep what the figures need."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..data import build_dataset
from ..data.transforms import fit_size, normalize
from ..diagnostics import calibration_maps
from ..hooks import _FeatureHook
from ..models import split_outputs
from ..stats import resize_labels
from ..train.runs import load_network

__all__ = ["RunSample", "collect", "pixel_scores"]


@dataclass
class RunSample:
    """What one run's network does on the first images of a split.

    Attributes:
        name: label for the figures (the run directory's name).
        classes: class names; ``palette`` their ``(K, 3)`` uint8 colours.
        scores: pre-softmax scores of sampled ``"tp"``, ``"fn"`` and ``"fp"`` pixels (TP / FP:
            the logit of the predicted class; FN: the logit of the missed true class).
        similarity: ``(K, K)`` mean cosine similarity between the features ``F`` of two
            classes' pixels (NaN where a class is absent); the diagonal is intra-class.
        points: ``(M, C)`` class-balanced sample of unit features; ``point_labels`` ``(M,)``.
        views: per shown image ``(image (H, W, 3) uint8, prediction (H, W), label (H, W))``.
        maps: per shown image ``(phi, psi, misclassified)`` at the embedding resolution (RCH
            runs only).
    """

    name: str
    classes: list[str]
    palette: np.ndarray
    scores: dict[str, np.ndarray]
    similarity: np.ndarray
    points: np.ndarray
    point_labels: np.ndarray
    views: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)
    maps: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)


def pixel_scores(logits: Tensor, labels: Tensor, ignore_index: int) -> dict[str, Tensor]:
    """Pre-softmax scores of TP, FN and FP pixels of ``(B, K, H, W)`` logits.

    Example:
        >>> import torch
        >>> logits = torch.tensor([[[[2.0, 0.0]], [[1.0, 3.0]]]])  # (1, 2, 1, 2): pred [0, 1]
        >>> s = pixel_scores(logits, torch.tensor([[[0, 0]]]), 255)
        >>> s["tp"].tolist(), s["fn"].tolist(), s["fp"].tolist()
        ([2.0], [0.0], [3.0])
    """
    valid = labels != ignore_index
    safe = torch.where(valid, labels, 0)
    top, pred = logits.max(1)
    true_score = logits.gather(1, safe[:, None]).squeeze(1)
    right = valid & (pred == labels)
    wrong = valid & (pred != labels)
    return {"tp": top[right], "fn": true_score[wrong], "fp": top[wrong]}


def _prepare(image: Tensor, base_size: list[int] | None) -> Tensor:
    x = normalize(image)[None]
    if base_size:
        fh, fw = fit_size(x.shape[-2], x.shape[-1], base_size)
        size = (max(1, round(fh)), max(1, round(fw)))
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return x


@torch.no_grad()
def collect(
    run: str | Path,
    split: str | None = None,
    limit: int = 40,
    n_images: int = 4,
    per_class: int = 60,
    max_scores: int = 20_000,
    seed: int = 0,
) -> RunSample:
    """Evaluate a run's checkpoint on the first ``limit`` images of ``split`` (default: the
    config's val split) and gather the figures' data (on the CPU)."""
    cfg, net, classes = load_network(run)
    d = cfg.data
    dataset = build_dataset(d.name, d.root, split or d.val_split, d.ignore_index, **d.options)
    k, ignore = len(classes), d.ignore_index
    base = net.base.eval()
    layer = cfg.rch.layer or net.built.layer
    hook = _FeatureHook(layer, cfg.rch.select if cfg.rch.layer else net.built.select)
    handle = base.get_submodule(layer).register_forward_hook(hook)
    g = torch.Generator().manual_seed(seed)
    scores: dict[str, list[Tensor]] = {"tp": [], "fn": [], "fp": []}
    sums: Tensor | None = None
    counts = torch.zeros(k, dtype=torch.float64)
    picks: list[tuple[Tensor, Tensor]] = []
    sample = RunSample(
        Path(run).name,
        classes,
        dataset.info.palette,
        {},
        np.zeros((k, k)),
        np.zeros((0, 1)),
        np.zeros(0),
    )
    try:
        for index in range(min(limit, len(dataset))):
            image, label = dataset[index]
            logits, _ = split_outputs(base(_prepare(image, d.base_size)))
            feature = hook.feature
            assert feature is not None
            full = F.interpolate(
                logits.float(), size=label.shape, mode="bilinear", align_corners=False
            )
            for key, values in pixel_scores(full, label[None], ignore).items():
                scores[key].append(values)
            fh, fw = feature.shape[-2:]
            small = resize_labels(label[None], (fh, fw))[0].flatten()
            units = F.normalize(feature[0].flatten(1).T.double(), dim=1)  # (N, C)
            valid = small != ignore
            sums = units.new_zeros(k, units.shape[1]) if sums is None else sums
            sums.index_add_(0, small[valid], units[valid])
            counts += torch.bincount(small[valid], minlength=k).double()
            for c in small[valid].unique():
                idx = (small == c).nonzero().squeeze(1)
                idx = idx[torch.randperm(len(idx), generator=g)[:per_class]]
                picks.append((units[idx].float(), torch.full((len(idx),), int(c))))
            if index < n_images:
                pred = full.argmax(1)[0]
                sample.views.append((image.permute(1, 2, 0).numpy(), pred.numpy(), label.numpy()))
                att = net.attachment
                if att is not None:
                    emb = att.head.embed(feature.float())
                    small_logits = F.interpolate(
                        logits.float(), size=emb.shape[-2:], mode="bilinear", align_corners=False
                    )
                    phi, psi, wrong = calibration_maps(
                        emb,
                        small_logits,
                        label[None],
                        k,
                        formulation=att.head.formulation,
                        ignore_index=ignore,
                    )
                    sample.maps.append((phi[0].numpy(), psi[0].numpy(), wrong[0].numpy()))
    finally:
        handle.remove()
    for key, parts in scores.items():
        values = torch.cat(parts) if parts else torch.zeros(0)
        keep = torch.randperm(len(values), generator=g)[:max_scores]
        sample.scores[key] = values[keep].numpy()
    if sums is not None:
        means = sums / counts.clamp_min(1)[:, None]
        sim = (means @ means.T).numpy()
        absent = (counts == 0).numpy()
        sim[absent, :] = np.nan
        sim[:, absent] = np.nan
        sample.similarity = sim
    if picks:
        feats = torch.cat([p for p, _ in picks])
        labels = torch.cat([lab for _, lab in picks])
        chosen = []
        for c in labels.unique():
            members = (labels == c).nonzero().squeeze(1)
            chosen.append(members[torch.randperm(len(members), generator=g)[:per_class]])
        picked = torch.cat(chosen)
        sample.points, sample.point_labels = feats[picked].numpy(), labels[picked].numpy()
    return sample
