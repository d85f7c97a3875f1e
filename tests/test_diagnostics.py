"""Calibration statistics against per-pixel loops, and their logging during training."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from rch.diagnostics import calibration_maps, calibration_stats, summarize
from rch.train import train
from rch.train.logger import read_metrics

from .conftest import make_case
from .train.helpers import tiny_config


def naive_stats(emb, logits, labels, protos, new_protos, ignore=255):
    b, _, h, w = emb.shape
    k = protos.shape[0]
    pred = logits.argmax(1)
    pix = [(bi, i, j) for bi in range(b) for i in range(h) for j in range(w)]
    e = {p: emb[p[0], :, p[1], p[2]].detach() for p in pix}
    y = {p: int(labels[p]) for p in pix}
    yhat = {p: int(pred[p]) for p in pix}
    cos = lambda u, v: float(F.cosine_similarity(u, v, dim=0, eps=1e-12))  # noqa: E731
    out = {n: [] for n in ("tp", "fn", "fp", "phi", "psi", "cos_own", "cos_other", "drift")}
    for c in range(k):
        anchors = [p for p in pix if y[p] == c]
        out["tp"].append(sum(yhat[p] == c for p in anchors))
        out["fn"].append(sum(yhat[p] != c for p in anchors))
        out["fp"].append(sum(y[p] != c and y[p] != ignore and yhat[p] == c for p in pix))
        phis, psis, own, other = [], [], [], []
        for a in anchors:
            fns = [p for p in pix if p[0] == a[0] and y[p] == c and yhat[p] != c]
            fps = [p for p in pix if p[0] == a[0] and y[p] not in (c, ignore) and yhat[p] == c]
            phis.append(1 - sum(cos(e[a], e[p]) for p in fns) / len(fns) if fns else 0.0)
            psis.append(1 + sum(cos(e[a], e[p]) for p in fps) / len(fps) if fps else 0.0)
            own.append(cos(e[a], protos[c]))
            other.append(max(cos(e[a], protos[d]) for d in range(k) if d != c))
        for name, values in (("phi", phis), ("psi", psis), ("cos_own", own), ("cos_other", other)):
            out[name].append(sum(values) / len(values) if values else math.nan)
        out["drift"].append(float((new_protos[c] - protos[c]).norm()))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_stats_equal_per_pixel_loops(seed):
    c = make_case(seed, batch=2, dim=4, classes=3, size=(3, 4), accuracy=0.5)
    labels = c.labels.clone()
    labels[0, 0, :2] = 255
    new = c.prototypes + 0.1 * torch.randn_like(c.prototypes)
    got = calibration_stats(
        c.embeddings.double(), c.seg_logits, labels, c.prototypes.double(), new.double()
    ).as_lists()
    want = naive_stats(c.embeddings.double(), c.seg_logits, labels, c.prototypes.double(), new)
    for name, values in want.items():
        for g, w in zip(got[name], values, strict=True):
            if isinstance(w, float) and math.isnan(w):
                assert math.isnan(g), name
            else:
                assert g == pytest.approx(w, abs=1e-6), (name, got[name], values)


def test_maps_match_stats_and_mark_errors():
    c = make_case(3, batch=2, dim=4, classes=3, size=(3, 4), accuracy=0.5)
    phi, psi, wrong = calibration_maps(c.embeddings, c.seg_logits, c.labels, 3)
    assert phi.shape == psi.shape == wrong.shape == (2, 3, 4)
    assert torch.equal(wrong, (c.seg_logits.argmax(1) != c.labels) & (c.labels != 255))
    stats = calibration_stats(c.embeddings, c.seg_logits, c.labels, c.prototypes)
    for k in range(3):
        mask = c.labels == k
        if mask.any():
            assert float(phi[mask].mean()) == pytest.approx(float(stats.phi[k]), abs=1e-6)
    assert ((phi >= 0) & (phi <= 2)).all() and ((psi >= 0) & (psi <= 2)).all()


def test_summarize_skips_missing_values():
    out = summarize([{"tp": [1, None]}, {"tp": [3, 4]}])
    assert out["tp"] == [2.0, 4.0]


def test_training_logs_per_class_stats_and_a_summary(tmp_path):
    result = train(tiny_config(tmp_path, train={"iters": 4, "log_every": 2}), progress=False)
    records = read_metrics(result.run_dir, "rch")
    assert [r["iter"] for r in records] == [2, 4]
    assert all(len(r["phi"]) == 10 and len(r["drift"]) == 10 for r in records)
    pixels = sum(records[0]["tp"]) + sum(records[0]["fn"])
    assert 0 < pixels <= 2 * 4 * 6  # batch 2 at the embedding resolution (stride 8 of 32x48)
    summary = json.loads((result.run_dir / "rch_stats.json").read_text())
    assert summary["batches"] == 2 and summary["classes"][0] == "sky"
    assert summary["tp"] == pytest.approx(
        [(a + b) / 2 for a, b in zip(records[0]["tp"], records[1]["tp"], strict=True)]
    )
    tb = list((result.run_dir / "tensorboard").glob("events.*"))
    assert tb and tb[0].stat().st_size > 0
