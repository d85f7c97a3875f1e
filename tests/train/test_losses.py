"""OHEM and the poly schedule against plain loops."""

from __future__ import annotations

import pytest
import torch

from rch.train import ohem_keep, poly_lr, seg_cross_entropy


def naive_ohem(logits, labels, thresh, min_kept, ignore):
    probs = logits.softmax(1)
    vals = []
    for b in range(labels.shape[0]):
        for i in range(labels.shape[1]):
            for j in range(labels.shape[2]):
                if labels[b, i, j] != ignore:
                    vals.append(float(probs[b, labels[b, i, j], i, j]))
    vals.sort()
    threshold = thresh
    if min_kept > 0 and vals:
        threshold = max(thresh, vals[min(min_kept, len(vals) - 1)])
    keep = torch.zeros_like(labels, dtype=torch.bool)
    for b in range(labels.shape[0]):
        for i in range(labels.shape[1]):
            for j in range(labels.shape[2]):
                y = int(labels[b, i, j])
                keep[b, i, j] = y != ignore and float(probs[b, y, i, j]) < threshold
    return keep


@pytest.mark.parametrize("min_kept", [0, 3, 10, 1000])
def test_ohem_matches_naive(min_kept):
    torch.manual_seed(min_kept)
    logits = torch.randn(2, 3, 4, 5) * 3
    labels = torch.randint(0, 3, (2, 4, 5))
    labels[0, 0] = 255
    keep = ohem_keep(logits, labels, 0.7, min_kept, 255)
    assert torch.equal(keep, naive_ohem(logits, labels, 0.7, min_kept, 255))
    assert not keep[0, 0].any()


def test_ohem_cross_entropy_averages_over_kept_pixels():
    logits = torch.randn(1, 3, 2, 2)
    labels = torch.tensor([[[0, 1], [2, 255]]])
    keep = torch.tensor([[[True, False], [True, False]]])
    per_pixel = torch.nn.functional.cross_entropy(
        logits, labels, ignore_index=255, reduction="none"
    )
    expected = (per_pixel[0, 0, 0] + per_pixel[0, 1, 0]) / 2
    assert torch.allclose(seg_cross_entropy(logits, labels, 255, keep), expected)


def test_poly_lr_with_warmup():
    assert poly_lr(0.01, 0, 10, warmup=5) == pytest.approx(0.002)
    assert poly_lr(0.01, 5, 10, power=1.0) == pytest.approx(0.005)
    assert poly_lr(0.01, 10, 10, min_lr=1e-4) == pytest.approx(1e-4)
