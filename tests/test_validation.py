"""Bad input to rch_loss raises an error that names the argument and what was received."""

from __future__ import annotations

import pytest
import torch

from rch._validation import DeferredChecks, PendingCheck, finite_flag
from rch.functional import rch_loss

from .conftest import DEVICE, make_case


def _call(**changes):
    c = make_case(seed=0)
    args = {
        "embeddings": c.embeddings,
        "seg_logits": c.seg_logits,
        "labels": c.labels,
        "prototypes": c.prototypes,
    }
    options = {k: v for k, v in changes.items() if k not in args}
    args.update({k: v for k, v in changes.items() if k in args})
    return rch_loss(
        args["embeddings"], args["seg_logits"], args["labels"], args["prototypes"], **options
    )


def test_shapes():
    c = make_case(seed=0)
    with pytest.raises(
        ValueError, match=r"embeddings must have shape \(B, D, h, w\).*got shape \(2, 5, 4\)"
    ):
        _call(embeddings=c.embeddings[..., 0])
    with pytest.raises(ValueError, match=r"seg_logits has 3 classes .* but prototypes has 4"):
        _call(seg_logits=c.seg_logits[:, :3])
    with pytest.raises(ValueError, match=r"prototypes have width 4 but embeddings have D=5"):
        _call(prototypes=c.prototypes[:, :4])
    with pytest.raises(
        ValueError, match=r"batch sizes differ: embeddings 2, seg_logits 2, labels 1"
    ):
        _call(labels=c.labels[:1])
    with pytest.raises(ValueError, match=r"labels must have shape \(B, H, W\)"):
        _call(labels=c.labels[:, None])


def test_dtypes():
    c = make_case(seed=0)
    with pytest.raises(TypeError, match=r"labels must be an integer tensor.*float"):
        _call(labels=c.labels.double())
    with pytest.raises(TypeError, match="embeddings must be a floating-point tensor"):
        _call(embeddings=c.embeddings.detach().long())
    with pytest.raises(TypeError, match=r"seg_logits must be a torch\.Tensor"):
        _call(seg_logits=c.seg_logits.cpu().numpy())


def test_label_range_names_the_values():
    c = make_case(seed=0)
    labels = c.labels.clone()
    labels[0, 0, 0], labels[0, 0, 1] = 4, -1
    with pytest.raises(ValueError, match=r"outside \[0, 4\) that are not ignore_index=255: -1, 4"):
        _call(labels=labels)
    # with another ignore value 255 is out of range
    with pytest.raises(ValueError, match="255"):
        _call(ignore_index=-1)


@pytest.mark.parametrize("name", ["embeddings", "seg_logits", "prototypes"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_inputs(name, bad):
    c = make_case(seed=0)
    value = {
        "embeddings": c.embeddings.detach(),
        "seg_logits": c.seg_logits,
        "prototypes": c.prototypes,
    }[name].clone()
    value.view(-1)[3] = bad
    kind = "NaN" if bad != bad else "Inf"
    with pytest.raises(ValueError, match=rf"{name} contains 1 non-finite value\(s\) \({kind}\)"):
        _call(**{name: value})


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        (
            {"formulation": "offical"},
            ValueError,
            "formulation must be one of 'paper', 'official'; got 'offical'",
        ),
        ({"prototype_source": "fn"}, ValueError, "prototype_source must be one of"),
        ({"tau": 0}, ValueError, "tau must be a finite number > 0"),
        ({"tau": "0.5"}, TypeError, "tau must be a number"),
        ({"momentum": 1.5}, ValueError, r"momentum must lie in \[0, 1\)"),
        ({"momentum": torch.zeros(3)}, ValueError, r"momentum tensor must have shape \(4,\)"),
        ({"alpha": -1.0, "formulation": "official"}, ValueError, "alpha must be"),
        ({"alpha": 1.0}, ValueError, "alpha=1.0 only applies to formulation='official'"),
        ({"ignore_index": 255.0}, TypeError, "ignore_index must be an int"),
        ({"temperature": 0.5}, TypeError, "temperature"),
        (
            {"validate": "later"},
            ValueError,
            "validate must be one of True, False, 'deferred'; got 'later'",
        ),
        ({"validate": 1}, TypeError, "validate must be True, False or 'deferred'; got 1"),
    ],
)
def test_options(options, error, match):
    with pytest.raises(error, match=match):
        _call(**options)


def test_validation_survives_python_optimize_flag():
    """Checks are real raises, not asserts: they must not vanish under ``python -O``."""
    import subprocess
    import sys

    code = (
        "import torch, rch\n"
        "try:\n"
        "    rch.rch_loss(torch.randn(1,2,2,2), torch.randn(1,3,2,2), torch.full((1,2,2), 7),"
        " torch.randn(3,2))\n"
        "except ValueError as e:\n"
        "    print('raised', e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-O", "-c", code], capture_output=True, text=True, check=True
    )
    assert out.stdout.startswith("raised labels holds values outside [0, 3)")


@pytest.mark.parametrize("formulation", ["paper", "official"])
@pytest.mark.parametrize("bad", [float("-inf"), float("nan")])
def test_non_finite_embeddings_found_through_row_norms(formulation, bad):
    """The embedding check reads the row norms; every non-finite kind in any row is found."""
    c = make_case(seed=1)
    emb = c.embeddings.detach().clone()
    emb[1, 2, 0, 1] = bad
    kind = "NaN" if bad != bad else "Inf"
    with pytest.raises(
        ValueError, match=rf"embeddings contains 1 non-finite .*\({kind}\).*\(1, 2, 0, 1\)"
    ):
        _call(embeddings=emb, formulation=formulation)


def test_huge_finite_embeddings_are_not_rejected():
    """A row whose norm overflows float32 holds only finite values: no error."""
    c = make_case(seed=1)
    emb = c.embeddings.detach().clone()
    emb[0, :, 0, 0] = 3e38
    out = _call(embeddings=emb)
    assert torch.isfinite(out.loss)


def test_loss_mask_must_be_bool_of_the_labels_shape():
    c = make_case(seed=0)
    with pytest.raises(ValueError, match=r"loss_mask must be a bool tensor of the labels' shape"):
        _call(loss_mask=torch.ones_like(c.labels))
    with pytest.raises(ValueError, match=r"got torch.bool of shape \(2, 4, 4\)"):
        _call(loss_mask=torch.ones(2, 4, 5, dtype=torch.bool, device=c.labels.device)[:, :4, :4])
    with pytest.raises(ValueError, match=r"loss_mask must have shape \(B, H, W\)"):
        _call(loss_mask=torch.ones(4, 5, dtype=torch.bool))


def _never() -> None:
    raise AssertionError("a deferred check never runs the full check")


def test_deferred_checks_name_every_failure_and_keep_ok_on_the_device():
    from .test_functional import _HostReads

    good = torch.ones(3, device=DEVICE)  # on CUDA: the pinned copy and its event
    bad = torch.tensor([1.0, float("inf")], device=DEVICE)
    with _HostReads() as spy:  # made without a host read
        checks = DeferredChecks(
            [
                PendingCheck(finite_flag(good), _never, "a holds NaN or Inf"),
                PendingCheck(finite_flag(bad), _never, "b holds NaN or Inf"),
                PendingCheck(torch.tensor(False, device=DEVICE), _never, "c is out of range"),
            ]
        )
    assert spy.reads == []
    assert checks.ok.dtype == torch.bool and checks.ok.shape == () and not bool(checks.ok)
    assert checks.failures() == ["b holds NaN or Inf", "c is out of range"]
    with pytest.raises(ValueError, match=r"failed: b holds NaN or Inf; c is out of range\. Rerun"):
        checks.raise_if_failed()
    passing = DeferredChecks([PendingCheck(finite_flag(good), _never, "a holds NaN or Inf")])
    assert bool(passing.ok) and passing.failures() == []
    passing.raise_if_failed()
    with pytest.raises(ValueError, match="at least one check"):
        DeferredChecks([])
