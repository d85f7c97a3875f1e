"""OHEM and the poly schedule against plain loops."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rch.train import ohem_keep, poly_lr, seg_cross_entropy

from ..conftest import DEVICE, cuda_syncs_raise


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


@pytest.mark.parametrize("min_kept", [1, 5])
def test_ohem_with_no_valid_pixel_keeps_none(min_kept):
    labels = torch.full((1, 2, 3), 255)
    keep = ohem_keep(torch.randn(1, 3, 2, 3), labels, 0.7, min_kept, 255)
    assert keep.shape == labels.shape and not keep.any()


def test_ohem_with_ties_at_the_threshold_matches_naive():
    """Equal probabilities around the min_kept-th one: the same pixels as the naive sort."""
    logits = torch.zeros(2, 3, 4, 4)
    logits[:, 0, :2] = 1.0
    labels = torch.zeros(2, 4, 4, dtype=torch.long)
    labels[1, 3, 3] = 255
    for min_kept in (0, 4, 7, 20, 40):
        keep = ohem_keep(logits, labels, 0.2, min_kept, 255)
        assert torch.equal(keep, naive_ohem(logits, labels, 0.2, min_kept, 255)), min_kept


def test_ohem_reads_nothing_back():
    """On a GPU a read-back waits for the queue to drain and then leaves the GPU idle while
    the rest of the step is launched; OHEM needs none (the count of valid pixels stays on the
    device)."""
    from ..test_functional import _HostReads

    logits, labels = torch.randn(2, 3, 8, 8), torch.randint(0, 3, (2, 8, 8))
    labels[0, :2] = 255
    with _HostReads() as spy:
        keep = ohem_keep(logits, labels, 0.7, 20, 255)
    assert spy.reads == []
    assert torch.equal(keep, naive_ohem(logits, labels, 0.7, 20, 255))
    if DEVICE.type == "cuda":  # the real thing: CUDA itself reports any synchronisation
        with cuda_syncs_raise():
            keep = ohem_keep(logits.to(DEVICE), labels.to(DEVICE), 0.7, 20, 255)
        assert torch.equal(keep.cpu(), naive_ohem(logits, labels, 0.7, 20, 255))


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    shape=st.tuples(st.integers(1, 2), st.integers(1, 5), st.integers(1, 5)),
    classes=st.integers(2, 4),
    ignore_frac=st.sampled_from([0.0, 0.3, 1.0]),
    min_kept=st.integers(0, 60),
    thresh=st.floats(0.0, 1.0, width=32),  # the same threshold in float32 as in Python
    coarse=st.booleans(),
)
def test_ohem_matches_naive_on_random_cases(
    seed, shape, classes, ignore_frac, min_kept, thresh, coarse
):
    """Any shape, any share of ignored pixels (all of them too), ``min_kept`` below, at and
    above the number of valid pixels, and (``coarse``) logits on a grid, so that many
    probabilities tie."""
    g = torch.Generator().manual_seed(seed)
    b, h, w = shape
    logits = torch.randn(b, classes, h, w, generator=g) * 3
    if coarse:
        logits = logits.round()
    labels = torch.randint(0, classes, (b, h, w), generator=g)
    labels[torch.rand(b, h, w, generator=g) < ignore_frac] = 255
    keep = ohem_keep(logits, labels, thresh, min_kept, 255)
    assert torch.equal(keep, naive_ohem(logits, labels, thresh, min_kept, 255))


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
