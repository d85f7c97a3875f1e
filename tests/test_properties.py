"""Hypothesis property tests for the invariants of RCH_SPEC sections 3 and 4."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rch import _fused
from rch.functional import rch_loss
from rch.loss import calibration_terms, margin_logits, unit
from rch.stats import flatten_pixels, pixel_sets

from .conftest import make_case, use_gpu_path

cases = st.fixed_dictionaries(
    {
        "seed": st.integers(0, 10_000),
        "batch": st.integers(1, 3),
        "dim": st.integers(1, 6),
        "classes": st.integers(2, 6),
        "size": st.tuples(st.integers(1, 5), st.integers(1, 5)),
        "accuracy": st.floats(0.0, 1.0),
        "ignore_frac": st.floats(0.0, 0.5),
    }
)
SETTINGS = settings(max_examples=40, deadline=None)


@SETTINGS
@given(spec=cases, formulation=st.sampled_from(["paper", "official"]))
def test_phi_and_psi_lie_in_0_2(spec, formulation):
    c = make_case(**spec)
    b = c.embeddings.shape[0]
    sets = pixel_sets(c.labels, c.seg_logits.argmax(1), spec["classes"], 255)
    rows = flatten_pixels(c.embeddings.detach())
    phi, psi = calibration_terms(
        rows, unit(rows), sets, num_images=b, num_classes=spec["classes"], formulation=formulation
    )
    for term in (phi, psi):
        assert term is not None
        assert term.min() >= -1e-12 and term.max() <= 2 + 1e-12
        assert torch.all(term[~sets.valid] == 0)


@SETTINGS
@given(spec=cases, formulation=st.sampled_from(["paper", "official"]))
def test_margins_vanish_where_p_is_one(spec, formulation):
    c = make_case(**spec)
    k = spec["classes"]
    pred = c.seg_logits.argmax(1)
    # the segmentation head is certain (p = 1 exactly) of its prediction, right or wrong
    certain = (1e4 * torch.nn.functional.one_hot(pred, k).permute(0, 3, 1, 2)).double()
    b = c.labels.shape[0]
    sets = pixel_sets(c.labels, pred, k, 255)
    rows = flatten_pixels(c.embeddings.detach())
    phi, psi = calibration_terms(
        rows, unit(rows), sets, num_images=b, num_classes=k, formulation=formulation
    )
    target = sets.label.clamp_max(k - 1)
    p_true = flatten_pixels(certain.softmax(1)).gather(1, target[:, None])[:, 0]
    cos = unit(rows) @ unit(c.prototypes).T
    plain = margin_logits(cos, target, None, 0.5)
    for term in (phi, psi):
        z = margin_logits(cos, target, (1 - p_true) * term, 0.5)
        sure = p_true == 1
        assert torch.equal(z[sure], plain[sure])
        # where p = 0 the full margin applies
        moved = (~sure) & (term > 0)
        torch.testing.assert_close(
            plain[moved].gather(1, target[moved, None])[:, 0]
            - z[moved].gather(1, target[moved, None])[:, 0],
            term[moved],
        )


@SETTINGS
@given(spec=cases, scale=st.floats(1e-3, 1e3), formulation=st.sampled_from(["paper", "official"]))
def test_loss_is_invariant_to_scaling_embeddings(spec, scale, formulation):
    c = make_case(**spec)

    # keep the norms of embeddings *and* prototypes >= 0.5, so the 1e-12 added to every norm
    # stays negligible at every scale (a prototype of norm 0.02 scaled by 1e-3 moved the loss
    # by 1.7e-6 relative: that is the epsilon, not a broken invariance)
    def away_from_zero(x: torch.Tensor) -> torch.Tensor:
        return x + 0.5 * torch.where(x >= 0, 1.0, -1.0)

    emb = away_from_zero(c.embeddings.detach())
    protos = away_from_zero(c.prototypes)
    a = rch_loss(emb, c.seg_logits, c.labels, protos, formulation=formulation)
    b = rch_loss(emb * scale, c.seg_logits, c.labels, protos * scale, formulation=formulation)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(a.prototypes * scale, b.prototypes, rtol=1e-9, atol=1e-9)
    # without an EMA step the prototypes' own scale is irrelevant too
    c1 = rch_loss(emb, c.seg_logits, c.labels, protos, update_prototypes=False)
    c2 = rch_loss(emb * scale, c.seg_logits, c.labels, protos * 7.0, update_prototypes=False)
    torch.testing.assert_close(c1.loss, c2.loss, rtol=1e-6, atol=1e-9)


@SETTINGS
@given(spec=cases)
def test_loss_is_finite_with_finite_gradients(spec):
    c = make_case(**spec)
    out = rch_loss(c.embeddings, c.seg_logits, c.labels, c.prototypes)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(c.embeddings.grad).all()
    counts = out.tp_count + out.fn_count
    assert (
        int(counts.sum()) == int((c.labels != 255).sum())
        or c.labels.shape[-2:] != (c.embeddings.shape[-2:])
    )


@SETTINGS
@given(
    spec=cases,
    terms=st.tuples(st.booleans(), st.booleans()),
    update=st.booleans(),
    weights=st.tuples(st.floats(-2.0, 2.0), st.floats(-2.0, 2.0)),
    label_scale=st.sampled_from([1, 2]),
    masked=st.booleans(),
    tiny=st.booleans(),
    conv=st.booleans(),
)
def test_gpu_path_gives_the_cpu_paths_loss_and_gradients(
    spec, terms, update, weights, label_scale, masked, tiny, conv
):
    """The GPU path differs from the CPU's in how it computes, not in what: no compaction,
    no ``bincount``, scattered sums, and no BLAS in the backward pass (the prototypes'
    products made in the forward pass per term, the embeddings' as bags), in blocks of its
    own size or (``tiny``) of 64 rows with one-row bags, and (``conv``) with the forward
    pass's products as 1x1 convolutions (``rch._fused.CONV_PRODUCTS_ON``)."""
    h, w = spec["size"]
    c = make_case(**spec, label_size=(h * label_scale, w * label_scale))
    g = torch.Generator().manual_seed(1)
    probe = torch.randn(c.prototypes.shape, generator=g)
    mask = (torch.rand(c.labels.shape, generator=g) < 0.6).to(c.labels.device) if masked else None

    def run() -> list[torch.Tensor]:
        emb = c.embeddings.detach().clone().requires_grad_(True)
        protos = c.prototypes.clone().requires_grad_(True)
        out = rch_loss(
            emb, c.seg_logits, c.labels, protos, fn_term=terms[0], fp_term=terms[1],
            update_prototypes=update, loss_mask=mask,
        )  # fmt: skip
        total = weights[0] * out.loss_fn + weights[1] * out.loss_fp
        (total + (out.prototypes * probe.to(protos)).sum()).backward()
        assert emb.grad is not None and protos.grad is not None
        return [out.loss_fn, out.loss_fp, out.prototypes, emb.grad, protos.grad]

    want = run()
    with pytest.MonkeyPatch.context() as patch:
        use_gpu_path(patch, tiny_blocks=tiny)
        if conv:
            patch.setattr(_fused, "CONV_PRODUCTS_ON", (c.embeddings.device.type,))
        got = run()
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


CORRUPTIONS = ("labels", "seg_logits", "prototypes", "embeddings")
"""The inputs a value check looks at, in the order the immediate checks run them."""


@SETTINGS
@given(
    spec=cases,
    bad=st.sets(st.sampled_from(CORRUPTIONS)),
    value=st.sampled_from([float("nan"), float("inf"), -float("inf")]),
    formulation=st.sampled_from(["paper", "official"]),
)
def test_deferred_checks_find_what_the_immediate_checks_find(spec, bad, value, formulation):
    """Whatever inputs are corrupted, the deferred checks fail exactly when the immediate
    ones raise, they name every corrupted input, and the first they name is the one the
    immediate checks raise for; a passing step gives the immediate step's loss."""
    c = make_case(**spec)
    args = {
        "embeddings": c.embeddings.detach().clone(),
        "seg_logits": c.seg_logits.clone(),
        "labels": c.labels.clone(),
        "prototypes": c.prototypes.clone(),
    }
    for name in bad:
        if name == "labels":
            args[name].view(-1)[-1] = spec["classes"] + 3  # neither a class nor ignored
        else:
            args[name].view(-1)[0] = value
    deferred = rch_loss(**args, formulation=formulation, validate="deferred")
    assert deferred.checks is not None
    named = [failure.split(" ")[0] for failure in deferred.checks.failures()]
    assert set(named) == bad
    if not bad:
        want = rch_loss(**args, formulation=formulation)
        torch.testing.assert_close(deferred.loss, want.loss, rtol=0, atol=0)
        return
    with pytest.raises(ValueError) as immediate:
        rch_loss(**args, formulation=formulation)
    assert str(immediate.value).startswith(named[0])
