"""rch.loss: the composable terms reproduce the fused paper loss and the naive loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rch.functional import rch_loss
from rch.loss import calibration_terms, margin_logits, unit
from rch.prototypes import ema_update
from rch.stats import flatten_pixels, pixel_sets, resize_labels, segment_sum

from .conftest import make_case


def _composed_paper(c, tau=0.5, rho=0.9):
    b, _, h, w = c.embeddings.shape
    k = c.prototypes.shape[0]
    sets = pixel_sets(resize_labels(c.labels, (h, w)), c.seg_logits.argmax(1), k, 255)
    rows = flatten_pixels(c.embeddings)
    units = unit(rows)
    sums, counts = segment_sum(rows, torch.where(sets.correct, sets.label, k), k)
    protos = ema_update(c.prototypes, sums, counts, rho)
    phi, psi = calibration_terms(
        rows, units, sets, num_images=b, num_classes=k, formulation="paper"
    )
    target = sets.label.clamp_max(k - 1)
    p_true = flatten_pixels(c.seg_logits.softmax(1)).gather(1, target[:, None])[:, 0]
    cos = units @ unit(protos).T
    ce_target = torch.where(sets.valid, sets.label, -100)
    losses = [
        F.cross_entropy(margin_logits(cos, target, (1 - p_true) * t, tau), ce_target)
        for t in (phi, psi)
    ]
    return losses, protos, phi, psi, sets


@pytest.mark.parametrize("seed", range(4))
def test_composed_paper_path_equals_fused(seed):
    c = make_case(seed=seed, batch=3, dim=6, classes=5, size=(5, 4))
    (l_fn, l_fp), protos, _, _, _ = _composed_paper(c)
    out = rch_loss(c.embeddings, c.seg_logits, c.labels, c.prototypes)
    torch.testing.assert_close(out.loss_fn, l_fn)
    torch.testing.assert_close(out.loss_fp, l_fp)
    torch.testing.assert_close(out.prototypes, protos)
    g_fused = torch.autograd.grad(out.loss + out.prototypes.sum(), c.embeddings)[0]
    g_comp = torch.autograd.grad(l_fn + l_fp + protos.sum(), c.embeddings)[0]
    torch.testing.assert_close(g_fused, g_comp)


def test_phi_psi_equal_means_of_pairwise_cosines():
    c = make_case(seed=5, batch=2, dim=4, classes=3, size=(4, 4))
    _, _, phi, psi, sets = _composed_paper(c)
    units = unit(flatten_pixels(c.embeddings.detach()))
    for i in range(units.shape[0]):
        if not sets.valid[i]:
            assert phi[i] == 0 and psi[i] == 0
            continue
        same_image = sets.image == sets.image[i]
        k = sets.label[i]
        fn = same_image & sets.wrong & (sets.label == k)
        fp = same_image & sets.wrong & (sets.pred == k)
        want_phi = 1 - (units[fn] @ units[i]).mean() if fn.any() else phi.new_zeros(())
        want_psi = 1 + (units[fp] @ units[i]).mean() if fp.any() else psi.new_zeros(())
        torch.testing.assert_close(phi[i].detach(), want_phi.to(phi))
        torch.testing.assert_close(psi[i].detach(), want_psi.to(psi))
