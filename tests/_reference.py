"""Naive per-pixel implementations of RCH_SPEC sections 3 and 4, for reference tests only.

Written as literally as possible: explicit Python loops over pixels and classes, the
FN/FP terms as means of pairwise cosines (O(N^2)), no shared code with ``rch``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

EPS = 1e-12


def _unit(v: Tensor) -> Tensor:
    return v / (torch.sqrt((v * v).sum()) + EPS)


def nearest_resize(labels: Tensor, h: int, w: int) -> Tensor:
    """torch's 'nearest': source index floor(dst * in / out)."""
    b, big_h, big_w = labels.shape
    out = torch.empty(b, h, w, dtype=labels.dtype)
    for i in range(h):
        for j in range(w):
            out[:, i, j] = labels[
                :,
                min(math.floor(i * big_h / h), big_h - 1),
                min(math.floor(j * big_w / w), big_w - 1),
            ]
    return out


def _prepare(emb: Tensor, logits: Tensor, labels: Tensor, ignore: int):
    b, _, h, w = emb.shape
    y = nearest_resize(labels, h, w)
    s = logits.detach()
    if s.shape[-2:] != (h, w):
        s = F.interpolate(s, size=(h, w), mode="bilinear", align_corners=False)
    prob = torch.softmax(s, dim=1)
    pred = s.argmax(1)
    pixels = [(bi, i, j) for bi in range(b) for i in range(h) for j in range(w)]
    return y, prob, pred, pixels


def naive_prototypes(emb, logits, labels, protos, rho, ignore, source="tp"):
    y, _, pred, pixels = _prepare(emb, logits, labels, ignore)
    new = []
    for k in range(protos.shape[0]):
        members = [
            emb[bi, :, i, j]
            for bi, i, j in pixels
            if int(y[bi, i, j]) == k and (source == "gt" or int(pred[bi, i, j]) == k)
        ]
        if members:
            mean = torch.stack(members).sum(0) / len(members)
            new.append(rho * protos[k].detach() + (1 - rho) * mean)
        else:
            new.append(protos[k])
    return torch.stack(new)


def naive_paper(
    emb,
    logits,
    labels,
    protos,
    *,
    tau=0.5,
    rho=0.9,
    ignore=255,
    fn_term=True,
    fp_term=True,
    source="tp",
    update=True,
    loss_mask=None,
):
    """Returns (loss_fn, loss_fp, prototypes) by spec section 3; ``loss_mask`` (label
    resolution) picks the anchors whose loss is averaged, nothing else."""
    y, prob, pred, pixels = _prepare(emb, logits, labels, ignore)
    h, w = emb.shape[-2:]
    anchor = None if loss_mask is None else nearest_resize(loss_mask.long(), h, w)
    k_all = protos.shape[0]
    mu = naive_prototypes(emb, logits, labels, protos, rho, ignore, source) if update else protos
    mu_unit = [_unit(mu[k]) for k in range(k_all)]
    unit = {px: _unit(emb[px[0], :, px[1], px[2]]) for px in pixels}
    total_fn, total_fp, count = emb.sum() * 0, emb.sum() * 0, 0
    for px in pixels:
        bi, i, j = px
        k = int(y[bi, i, j])
        if k == ignore or (anchor is not None and not int(anchor[bi, i, j])):
            continue
        e = unit[px]
        fn_set = [q for q in pixels if q[0] == bi and int(y[q]) == k and int(pred[q]) != k]
        fp_set = [
            q
            for q in pixels
            if q[0] == bi and int(y[q]) != ignore and int(y[q]) != k and int(pred[q]) == k
        ]
        phi = 1 - sum((e * unit[q]).sum() for q in fn_set) / len(fn_set) if fn_set else 0.0
        psi = 1 + sum((e * unit[q]).sum() for q in fp_set) / len(fp_set) if fp_set else 0.0
        weight = 1 - prob[bi, k, i, j]
        cos = torch.stack([(e * mu_unit[c]).sum() for c in range(k_all)])
        for name, term, on in (("fn", phi, fn_term), ("fp", psi, fp_term)):
            z = cos / tau
            if on:
                z = torch.cat([z[:k], (z[k] - weight * term).reshape(1), z[k + 1 :]])
            ce = torch.logsumexp(z, 0) - z[k]
            if name == "fn":
                total_fn = total_fn + ce
            else:
                total_fp = total_fp + ce
        count += 1
    if count == 0:
        return total_fn, total_fp, mu
    return total_fn / count, total_fp / count, mu


def naive_official(
    emb,
    logits,
    labels,
    protos,
    *,
    tau=0.5,
    alpha=None,
    rho=0.9,
    ignore=255,
    fn_term=True,
    fp_term=True,
    loss_mask=None,
):
    """Returns (loss_fn, loss_fp, prototypes) by spec section 4; ``loss_mask`` picks the
    label-resolution pixels whose cross-entropy is averaged, nothing else."""
    alpha = tau if alpha is None else alpha
    b, d, h, w = emb.shape
    y, prob, pred, pixels = _prepare(emb, logits, labels, ignore)
    k_all = protos.shape[0]
    mu = naive_prototypes(emb, logits, labels, protos, rho, ignore)
    centres = {}
    has = {}
    for name in ("fn", "fp"):
        for k in range(k_all):

            def member(q, k=k, name=name):
                yq, pq = int(y[q]), int(pred[q])
                if yq == ignore:
                    return False
                return (yq == k and pq != k) if name == "fn" else (yq != k and pq == k)

            rows = [emb[q[0], :, q[1], q[2]] for q in pixels if member(q)]
            v = torch.stack(rows).sum(0) / len(rows) if rows else emb.new_zeros(d)
            centres[name, k] = v / (torch.sqrt((v * v).sum()) + EPS)
            for bi in range(b):
                has[name, bi, k] = any(member(q) for q in pixels if q[0] == bi)
    out = {"fn": [], "fp": []}
    for px in pixels:
        bi, i, j = px
        e = _unit(emb[bi, :, i, j])
        cos = torch.stack([(e * _unit(mu[c])).sum() for c in range(k_all)])
        k = int(y[px])
        for name, on in (("fn", fn_term), ("fp", fp_term)):
            z = cos.clone()
            if k != ignore and on and has[name, bi, k]:
                dot = (e * centres[name, k]).sum()
                extra = dot - 1 if name == "fn" else -dot - 1
                z = torch.cat(
                    [z[:k], (z[k] + alpha * (1 - prob[bi, k, i, j]) * extra).reshape(1), z[k + 1 :]]
                )
            out[name].append((px, z / tau))
    losses = []
    for name in ("fn", "fp"):
        m = torch.stack([z for _, z in out[name]]).reshape(b, h, w, k_all).permute(0, 3, 1, 2)
        if m.shape[-2:] != labels.shape[-2:]:
            m = F.interpolate(m, size=labels.shape[-2:], mode="bilinear", align_corners=False)
        total, count = emb.sum() * 0, 0
        for bi in range(b):
            for i in range(labels.shape[1]):
                for j in range(labels.shape[2]):
                    k = int(labels[bi, i, j])
                    if k == ignore or (loss_mask is not None and not bool(loss_mask[bi, i, j])):
                        continue
                    total = total + torch.logsumexp(m[bi, :, i, j], 0) - m[bi, k, i, j]
                    count += 1
        losses.append(total / max(count, 1))
    return losses[0], losses[1], mu
