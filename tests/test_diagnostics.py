"""Calibration statistics against per-pixel loops, and their logging during training."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from rch.diagnostics import calibration_maps, calibration_stats, prototype_forces, summarize
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


def naive_forces(emb, labels, protos, tau, ignore=255):
    """Per-pixel loops: the pull and push weights and the autograd gradient of each pixel's
    cross-entropy split by whether the pixel belongs to the prototype's class (on the CPU)."""
    emb, labels, protos = emb.cpu(), labels.cpu(), protos.cpu()
    b, d, h, w = emb.shape
    k = protos.shape[0]
    pull, push = [0.0] * k, [0.0] * k
    pull_grad, push_grad = torch.zeros(k, d, dtype=emb.dtype), torch.zeros(k, d, dtype=emb.dtype)
    own_sum = torch.zeros(k, d, dtype=emb.dtype)
    for bi in range(b):
        for i in range(h):
            for j in range(w):
                y = int(labels[bi, i, j])
                if y == ignore:
                    continue
                e = emb[bi, :, i, j].detach()
                p = protos.detach().clone().requires_grad_(True)
                z = torch.stack([F.cosine_similarity(e, p[c], dim=0, eps=1e-12) for c in range(k)])
                s = (z / tau).softmax(0).detach()
                (g,) = torch.autograd.grad(F.cross_entropy((z / tau)[None], torch.tensor([y])), p)
                own_sum[y] += e / e.norm()
                for c in range(k):
                    if c == y:
                        pull[c] += 1 - float(s[c])
                        pull_grad[c] += g[c]
                    else:
                        push[c] += float(s[c])
                        push_grad[c] += g[c]
    return pull, push, pull_grad, push_grad, own_sum


@pytest.mark.parametrize("tau", [0.5, 0.1])
def test_prototype_forces_match_per_pixel_loops_and_autograd(tau):
    c = make_case(3, batch=2, dim=4, classes=3, size=(3, 4))
    f = prototype_forces(c.embeddings, c.labels, c.prototypes, tau=tau)
    pull, push, pull_grad, push_grad, own_sum = naive_forces(
        c.embeddings, c.labels, c.prototypes, tau
    )
    torch.testing.assert_close(f.pull.cpu(), torch.tensor(pull, dtype=torch.float64))
    torch.testing.assert_close(f.push.cpu(), torch.tensor(push, dtype=torch.float64))
    torch.testing.assert_close(f.pull_grad.cpu(), pull_grad)
    torch.testing.assert_close(f.push_grad.cpu(), push_grad)
    torch.testing.assert_close(f.own_sum.cpu(), own_sum)
    assert f.count.tolist() == [int((c.labels == k).sum()) for k in range(3)]
    # each pixel's softmax sums to one: what its own prototype lacks, the others hold
    torch.testing.assert_close(f.pull.sum(), f.push.sum())
    # the two parts add up to the gradient of the summed cross-entropy
    p = c.prototypes.clone().requires_grad_(True)
    units = F.normalize(c.embeddings.detach().permute(0, 2, 3, 1).reshape(-1, 4), dim=1)
    y = c.labels.reshape(-1)
    logits = units[y != 255] @ F.normalize(p, dim=1).T / tau
    F.cross_entropy(logits, y[y != 255], reduction="sum").backward()
    torch.testing.assert_close(f.pull_grad + f.push_grad, p.grad)


def test_prototype_forces_add_over_batches_and_align():
    c = make_case(5, batch=2, dim=3, classes=3, size=(4, 4))
    whole = prototype_forces(c.embeddings, c.labels, c.prototypes)
    parts = prototype_forces(c.embeddings[:1], c.labels[:1], c.prototypes) + prototype_forces(
        c.embeddings[1:], c.labels[1:], c.prototypes
    )
    for name in ("pull", "push", "pull_grad", "push_grad", "own_sum"):
        torch.testing.assert_close(getattr(parts, name), getattr(whole, name))
    assert torch.equal(parts.count, whole.count)
    # a prototype that is its class's mean direction has cosine 1 to it, and the
    # all-pixel direction is the sum of every class's unit embeddings
    means = F.normalize(whole.own_sum, dim=1)
    own, everything = whole.alignment(means * 3.0)
    torch.testing.assert_close(own, torch.ones(3, dtype=torch.float64, device=own.device))
    torch.testing.assert_close(everything, means @ F.normalize(whole.own_sum.sum(0), dim=0))
    # a class with no pixel has no own direction
    absent = make_case(5, batch=1, dim=3, classes=3, size=(3, 3), absent=(1,))
    own, _ = prototype_forces(absent.embeddings, absent.labels, absent.prototypes).alignment(
        absent.prototypes
    )
    assert math.isnan(own[1]) and not math.isnan(own[0])


def test_prototype_forces_reject_bad_input():
    c = make_case(0, batch=1, dim=3, classes=3, size=(2, 2))
    with pytest.raises(ValueError, match=r"outside \[0, 3\).*: 7"):
        prototype_forces(c.embeddings, torch.full_like(c.labels, 7), c.prototypes)
    with pytest.raises(ValueError, match="share B"):
        prototype_forces(c.embeddings, c.labels, c.prototypes[:, :2])
    with pytest.raises(ValueError, match="tau must be"):
        prototype_forces(c.embeddings, c.labels, c.prototypes, tau=0.0)
    with pytest.raises(TypeError, match="labels must be an integer"):
        prototype_forces(c.embeddings, c.labels.double(), c.prototypes)
