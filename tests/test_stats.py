"""Pixel bookkeeping: resizes, TP/FN/FP split, segment sums, confusion matrix."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rch.prototypes import ema_update
from rch.stats import (
    class_stats,
    confusion_matrix,
    pixel_sets,
    prediction_confidence,
    resize_labels,
    resize_logits,
    segment_sum,
)

from .conftest import DEVICE


def test_resize_labels_nearest_keeps_values():
    labels = torch.tensor([[[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 255]]])
    assert resize_labels(labels, (2, 2)).tolist() == [[[0, 2], [8, 10]]]
    assert resize_labels(labels, (4, 4)) is labels


@given(
    h_in=st.integers(1, 70),
    w_in=st.integers(1, 70),
    h_out=st.integers(1, 70),
    w_out=st.integers(1, 70),
    dtype=st.sampled_from([torch.int64, torch.uint8, torch.bool]),
)
@settings(max_examples=80, deadline=None)
def test_resize_labels_picks_interpolates_nearest_pixels(h_in, w_in, h_out, w_out, dtype):
    labels = torch.randint(0, 256, (2, h_in, w_in)).to(dtype)
    want = torch.nn.functional.interpolate(
        labels[:, None].to(torch.float64), size=(h_out, w_out), mode="nearest"
    )[:, 0].to(dtype)
    got = resize_labels(labels, (h_out, w_out))
    assert got.dtype == dtype and torch.equal(got, want)


@pytest.mark.parametrize(
    ("n_in", "n_out"),
    [(1024, 128), (512, 64), (1080, 135), (2048, 256), (720, 90), (1000, 129), (4001, 333)],
)
def test_resize_labels_picks_interpolates_pixels_at_dataset_sizes(n_in, n_out):
    # each source row and column holds its own index, so any other pick shows
    labels = torch.arange(n_in)[:, None] * 10_000 + torch.arange(n_in)[None, :]
    want = torch.nn.functional.interpolate(
        labels[None, None].to(torch.float64), size=(n_out, n_out), mode="nearest"
    )[0].to(torch.int64)
    assert torch.equal(resize_labels(labels[None], (n_out, n_out)), want)


@given(
    h_in=st.integers(1, 40),
    w_in=st.integers(1, 40),
    h_out=st.integers(1, 40),
    w_out=st.integers(1, 40),
    half=st.booleans(),
)
@settings(max_examples=60, deadline=None)
def test_resize_logits_equals_interpolate(h_in, w_in, h_out, w_out, half):
    """Down, up or mixed: F.interpolate's bilinear rule, also for half-precision logits
    resized straight into float32 (the loss's path)."""
    x = torch.randn(2, 3, h_in, w_in, dtype=torch.float64)
    dtype = torch.float64
    if half:
        x, dtype = x.half(), torch.float32
    want = torch.nn.functional.interpolate(
        x.to(dtype), size=(h_out, w_out), mode="bilinear", align_corners=False
    )
    got = resize_logits(x, (h_out, w_out), dtype)
    assert got.dtype == dtype and got.shape == want.shape
    torch.testing.assert_close(
        got, want, rtol=1e-5 if half else 1e-12, atol=1e-5 if half else 1e-12
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_resize_logits_never_copies_the_map_whole(dtype):
    """A downsampling allocates the gathered 2x2 taps of each output pixel at most: here
    (1, 4, 16, 16) float32 (4 KiB), against 64 KiB for a float32 copy of the input."""
    from torch.profiler import ProfilerActivity, profile

    x = torch.randn(1, 4, 64, 64).to(dtype)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = resize_logits(x, (8, 8), torch.float32)
    largest = max(e.cpu_memory_usage for e in prof.events())
    assert largest <= 4 * 16 * 16 * 4
    want = torch.nn.functional.interpolate(x.float(), size=(8, 8), mode="bilinear")
    torch.testing.assert_close(out, want)


def test_resize_logits_makes_its_taps_once_per_sizes():
    """The source lines and weights depend on the sizes only: a second resize between the
    same sizes runs only the gather, the cast and the blends (on a GPU, a dozen fewer
    kernel launches per axis). Taps first made under ``torch.inference_mode`` are ordinary
    tensors, so they can serve a training step afterwards."""
    from rch.stats import _bilinear_taps

    from .test_functional import _AtenOps

    _bilinear_taps.cache_clear()
    x = torch.randn(2, 3, 23, 41, device=DEVICE)
    with torch.inference_mode():
        first = resize_logits(x, (7, 9), torch.float32)
    with _AtenOps() as spy:
        again = resize_logits(x, (7, 9), torch.float32)
    assert torch.equal(first, again)
    assert "arange" not in spy.ops and len(spy.ops) <= 8, spy.ops
    assert _bilinear_taps.cache_info().hits == 2
    taps = [
        t
        for n_in, n_out in ((23, 7), (41, 9))
        for t in _bilinear_taps(n_in, n_out, x.device, torch.float32)
    ]
    assert not any(t.is_inference() for t in taps if t is not None)
    want = torch.nn.functional.interpolate(x, size=(7, 9), mode="bilinear")
    torch.testing.assert_close(again, want)


def test_pixel_sets_by_hand():
    y = torch.tensor([[[0, 1], [1, 255]]])
    p = torch.tensor([[[0, 0], [1, 1]]])
    s = pixel_sets(y, p, num_classes=2, ignore_index=255)
    assert s.label.tolist() == [0, 1, 1, 2]
    assert s.valid.tolist() == [True, True, True, False]
    assert s.correct.tolist() == [True, False, True, False]
    assert s.wrong.tolist() == [False, True, False, False]
    assert s.image.tolist() == [0, 0, 0, 0]


def test_confusion_and_class_stats_by_hand():
    y = torch.tensor([[0, 0, 1, 1, 2, 255]])
    p = torch.tensor([[0, 1, 1, 2, 2, 0]])
    cm = confusion_matrix(y, p, 3, 255)
    assert cm.tolist() == [[1, 1, 0], [0, 1, 1], [0, 0, 1]]
    tp, fn, fp = class_stats(cm)
    assert (tp.tolist(), fn.tolist(), fp.tolist()) == ([1, 1, 1], [1, 1, 0], [0, 1, 1])


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 40), d=st.integers(1, 4), s=st.integers(1, 6), seed=st.integers(0, 999))
def test_segment_sum_equals_loop(n, d, s, seed):
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(n, d, generator=g, dtype=torch.float64)
    index = torch.randint(0, s + 1, (n,), generator=g)
    sums, counts = segment_sum(values, index, s)
    for k in range(s):
        members = values[index == k]
        torch.testing.assert_close(sums[k], members.sum(0))
        assert int(counts[k]) == len(members)


@pytest.mark.parametrize("sorted_sums", [True, False])
def test_segment_sum_paths_agree_bitwise_with_gradient(monkeypatch, sorted_sums):
    """The sorted (``embedding_bag``) and the scattered (``index_add``) sums add each bin's
    rows in the same order on the CPU: equal bit for bit (on CUDA the scatter's atomics
    add in any order), and the gradient is a gather either way."""
    from rch import stats

    g = torch.Generator().manual_seed(3)
    values = torch.randn(500, 9, generator=g).to(DEVICE).requires_grad_(True)
    index = torch.randint(0, 8, (500,), generator=g).to(DEVICE)  # bin 7: dropped
    want = torch.zeros(8, 9, device=DEVICE).index_add(0, index, values.detach())[:7]
    monkeypatch.setattr(stats, "SORTED_SUMS_ON", (DEVICE.type,) if sorted_sums else ())
    sums, counts = segment_sum(values, index, 7)
    exact = {"rtol": 0.0, "atol": 0.0} if DEVICE.type == "cpu" else {}
    torch.testing.assert_close(sums.detach(), want, **exact)
    assert counts.tolist() == torch.bincount(index, minlength=8)[:7].tolist()
    weights = torch.randn(7, 9, generator=g).to(DEVICE)
    (sums * weights).sum().backward()
    padded = torch.cat([weights, weights.new_zeros(1, 9)])
    assert torch.equal(values.grad, padded[index])


def test_ema_update_by_hand():
    old = torch.tensor([[1.0, 1.0], [2.0, 2.0], [5.0, 5.0]])
    sums = torch.tensor([[4.0, 0.0], [0.0, 0.0], [3.0, 3.0]], requires_grad=True)
    counts = torch.tensor([2, 0, 1])
    new = ema_update(old, sums, counts, 0.75)
    assert new.tolist() == [[1.25, 0.75], [2.0, 2.0], [4.5, 4.5]]
    new.sum().backward()
    assert sums.grad.tolist() == [[0.125, 0.125], [0.0, 0.0], [0.25, 0.25]]


@settings(max_examples=40, deadline=None)
@given(
    b=st.integers(1, 3),
    k=st.integers(1, 40),
    h=st.integers(1, 9),
    w=st.integers(1, 9),
    levels=st.sampled_from([None, 2, 3]),
    seed=st.integers(0, 2**16),
    double=st.booleans(),
)
def test_prediction_confidence_equals_argmax_and_softmax(b, k, h, w, levels, seed, double):
    g = torch.Generator().manual_seed(seed)
    dtype = torch.float64 if double else torch.float32
    logits = torch.randn(b, k, h, w, generator=g, dtype=dtype)
    if levels is not None:  # few distinct values: many ties, where the first index must win
        logits = torch.randint(0, levels, (b, k, h, w), generator=g).to(dtype)
    target = torch.randint(0, k, (b, h, w), generator=g)
    pred, prob = prediction_confidence(logits, target)
    assert torch.equal(pred, logits.argmax(1))
    expected = logits.softmax(1).gather(1, target[:, None])[:, 0]
    assert prob.dtype == dtype
    torch.testing.assert_close(prob, expected, rtol=1e-6 if double else 1e-5, atol=0.0)


def test_prediction_confidence_blocks_cover_every_pixel(monkeypatch):
    """Blocks smaller than an image (and a ragged last block) give the same answer."""
    import rch.stats as stats

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 7, 5, 11, generator=g)
    target = torch.randint(0, 7, (2, 5, 11), generator=g)
    whole = prediction_confidence(logits, target)
    monkeypatch.setattr(stats, "PREDICTION_BLOCK", 7 * 4)  # 4 pixels per block, 55 = 13*4+3
    blocked = stats.prediction_confidence(logits, target)
    assert torch.equal(blocked[0], whole[0])
    torch.testing.assert_close(blocked[1], whole[1], rtol=1e-6, atol=0.0)
    assert torch.equal(whole[0], logits.argmax(1))
