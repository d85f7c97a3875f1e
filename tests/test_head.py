"""RCHHead: state in buffers, EMA only in training mode, warm-up, learned prototypes."""

from __future__ import annotations

import io

import pytest
import torch

from rch import RCHError, RCHHead
from rch.functional import rch_loss

from .conftest import DEVICE, make_case, use_gpu_path


def _inputs(seed=0, classes=4, channels=6):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(2, channels, 4, 4, generator=g)
    logits = torch.randn(2, classes, 4, 4, generator=g)
    labels = torch.randint(0, classes, (2, 8, 8), generator=g)
    return feats, logits, labels


def test_forward_equals_functional_times_lambda():
    torch.manual_seed(0)
    head = RCHHead(6, 4, embed_dim=5, loss_weight=0.3, tau=0.25)
    feats, logits, labels = _inputs()
    before = head.prototypes.clone()
    out = head(feats, logits, labels)
    emb = head.projection(feats)  # BN in train mode: same batch statistics
    ref = rch_loss(emb, logits, labels, before, tau=0.25)
    torch.testing.assert_close(out.loss, 0.3 * ref.loss)
    torch.testing.assert_close(head.prototypes, ref.prototypes.detach())
    assert not head.prototypes.requires_grad


def test_state_dict_round_trip_restores_everything():
    torch.manual_seed(0)
    head = RCHHead(6, 4, embed_dim=5, prototype_init="first")
    for seed in range(3):
        head(*_inputs(seed)).loss.backward()
    state = head.state_dict()
    assert {"prototypes", "step", "initialized"} <= set(state)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    fresh = RCHHead(6, 4, embed_dim=5, prototype_init="first")
    fresh.load_state_dict(torch.load(buffer))
    assert int(fresh.step) == 3
    assert torch.equal(fresh.initialized, head.initialized)
    torch.testing.assert_close(fresh.prototypes, head.prototypes, rtol=0, atol=0)
    a, b = head(*_inputs(9)), fresh(*_inputs(9))
    torch.testing.assert_close(a.loss, b.loss, rtol=0, atol=0)


def test_eval_mode_leaves_state_untouched():
    torch.manual_seed(0)
    head = RCHHead(6, 4, embed_dim=5)
    head(*_inputs(0))
    head.eval()
    protos, step = head.prototypes.clone(), int(head.step)
    out = head(*_inputs(1))
    assert torch.isfinite(out.loss)
    assert torch.equal(head.prototypes, protos) and int(head.step) == step
    assert not out.details.updated.any()


def test_warmup_gives_zero_loss_then_turns_on():
    torch.manual_seed(0)
    head = RCHHead(6, 4, embed_dim=5, warmup_iters=2)
    protos = head.prototypes.clone()
    for _ in range(2):
        out = head(*_inputs(0))
        assert not out.active and out.loss.item() == 0.0 and out.details is None
        out.loss.backward()  # still part of the graph: DDP sees every parameter used
        assert head.projection[0].weight.grad is not None
    assert torch.equal(head.prototypes, protos) and int(head.step) == 2
    out = head(*_inputs(0))
    assert out.active and out.loss.item() > 0 and not torch.equal(head.prototypes, protos)


def test_a_warm_up_reads_the_step_counter_once(monkeypatch):
    """A warm-up compares the step counter with ``warmup_iters`` at every step. The head
    reads the counter from the device once (on a GPU a synchronisation) and then counts on
    the host; a counter changed behind its back (a loaded checkpoint, an in-place write) is
    read again."""
    from .test_functional import _HostReads

    use_gpu_path(monkeypatch)
    torch.manual_seed(0)
    head = RCHHead(6, 4, embed_dim=5, warmup_iters=3, validate=False).to(DEVICE)
    inputs = [t.to(DEVICE) for t in _inputs(0)]
    with _HostReads() as spy:
        active = [head(*inputs).active for _ in range(5)]
    assert active == [False, False, False, True, True]
    assert spy.reads == ["__int__"]
    assert int(head.step) == 5
    state = head.state_dict()
    state["step"] = torch.tensor(1)
    head.load_state_dict(state)
    assert head.warming_up  # step 1 of 3, read from the loaded buffer
    head.step.fill_(3)
    assert not head.warming_up
    head.step = torch.tensor(0, device=DEVICE)  # another tensor altogether
    assert head.warming_up


def test_learned_prototypes_are_a_trained_parameter():
    torch.manual_seed(0)
    head = RCHHead(6, 4, embed_dim=5, prototypes="learned")
    assert isinstance(head.prototypes, torch.nn.Parameter)
    before = head.prototypes.detach().clone()
    out = head(*_inputs(0))
    out.loss.backward()
    assert head.prototypes.grad is not None and head.prototypes.grad.abs().sum() > 0
    assert torch.equal(head.prototypes.detach(), before)  # no EMA step
    assert "prototypes" in dict(head.named_parameters())


def test_learned_prototypes_report_the_optimizers_step_as_drift():
    """The loss never moves learned prototypes; the optimizer does, between forwards. Their
    drift is that change since the previous training step, not a constant zero."""
    torch.manual_seed(0)
    head = RCHHead(6, 4, embed_dim=5, prototypes="learned")
    head.record_stats = True
    opt = torch.optim.SGD([head.prototypes], lr=0.5)
    out = head(*_inputs(0))
    assert out.stats is not None and torch.equal(out.stats.drift, torch.zeros(4))  # first step
    before = head.prototypes.detach().clone()
    out.loss.backward()
    opt.step()
    moved = torch.linalg.vector_norm(head.prototypes.detach() - before, dim=1)
    assert moved.sum() > 0
    out = head(*_inputs(1))
    assert out.stats is not None
    torch.testing.assert_close(out.stats.drift, moved)
    assert "_previous_prototypes" not in head.state_dict()


def test_first_init_copies_first_mean_and_blocks_eval_before_training():
    torch.manual_seed(0)
    head = RCHHead(6, 4, embed_dim=5, prototype_init="first", momentum=0.9)
    head.eval()
    with pytest.raises(RCHError, match="no prototype yet"):
        head(*_inputs(0))
    head.train()
    feats, logits, labels = _inputs(0)
    out = head(feats, logits, labels)
    emb = head.projection(feats).detach()
    pred = logits.argmax(1)
    small = labels[:, ::2, ::2]
    for k in range(4):
        tp = (small == k) & (pred == k)
        if tp.any():
            mean = emb.permute(0, 2, 3, 1)[tp].mean(0)
            torch.testing.assert_close(head.prototypes[k], mean)
            assert head.initialized[k]
        else:
            assert not head.initialized[k] and head.prototypes[k].abs().sum() == 0
    assert out.details is not None


def test_official_formulation_in_head():
    torch.manual_seed(0)
    head = RCHHead(6, 4, embed_dim=5, formulation="official", alpha=1.0, tau=0.125)
    out = head(*_inputs(0))
    assert torch.isfinite(out.loss) and out.loss.item() > 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"formulation": "pape"}, "formulation must be one of"),
        ({"prototype_source": "fp"}, "prototype_source must be one of"),
        ({"prototypes": "fixed"}, "prototypes must be one of"),
        ({"tau": 0.0}, "tau must be"),
        ({"momentum": 1.0}, "momentum must lie in"),
        ({"loss_weight": -1.0}, "loss_weight"),
        ({"warmup_iters": -1}, "warmup_iters"),
        ({"embed_dim": 0}, "embed_dim"),
    ],
)
def test_bad_options_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RCHHead(6, 4, **kwargs)


def test_unknown_keyword_is_rejected():
    with pytest.raises(TypeError):
        RCHHead(6, 4, temperature=0.5)  # type: ignore[call-arg]


def test_wrong_feature_channels_named():
    head = RCHHead(6, 4, embed_dim=5)
    feats, logits, labels = _inputs(channels=7)
    with pytest.raises(ValueError, match=r"7 channels.*in_channels=6"):
        head(feats, logits, labels)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_nan_features_named(mode):
    """The features are not checked on their own (no host read); their NaN makes non-finite
    embeddings, and the failed check then names the features, chained to it."""
    head = RCHHead(6, 4, embed_dim=5)
    feats, logits, labels = _inputs()
    if mode == "eval":
        head(feats, logits, labels)  # one step first: an initialised head
        head.eval()
    feats[1, 2, 3, 0] = float("nan")
    with pytest.raises(ValueError, match=r"features contains 1 non-finite value\(s\) \(NaN\)") as e:
        head(feats, logits, labels)
    assert "embeddings contains" in str(e.value.__cause__)
    # embedded first, the loss later (as RCHAttachment does): named the same way
    embeddings = head.embed(feats)
    with pytest.raises(ValueError, match=r"features contains 1 non-finite"):
        head.forward_embedded(embeddings, logits, labels)


def test_non_finite_embeddings_from_finite_features_name_the_embeddings():
    """A diverged projection, not the features: the error says embeddings; and embeddings
    that did not come from the last embed() are not blamed on its features."""
    head = RCHHead(6, 4, embed_dim=5)
    feats, logits, labels = _inputs()
    with torch.no_grad():
        head.projection[0].weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="embeddings contains") as e:
        head(feats, logits, labels)
    assert e.value.__cause__ is None
    fresh = RCHHead(6, 4, embed_dim=5)
    bad = feats.clone()
    bad[0, 0, 0, 0] = float("nan")
    fresh.embed(bad)  # its features are bad, but these embeddings are other ones
    other = torch.randn(2, 5, *feats.shape[2:])
    other[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="embeddings contains 1 non-finite"):
        fresh.forward_embedded(other, logits, labels)


def test_head_pickles_between_embed_and_loss(tmp_path):
    """The weak references kept from embed() to the loss do not reach a saved module."""
    head = RCHHead(6, 4, embed_dim=5)
    feats, logits, labels = _inputs()
    head.embed(feats)
    assert head._embedded is not None
    torch.save(head, tmp_path / "head.pt")
    again = torch.load(tmp_path / "head.pt", weights_only=False)
    assert again._embedded is None and head._embedded is not None
    assert torch.isfinite(again(feats, logits, labels).loss)


def test_head_moves_with_to_and_keeps_dtype():
    head = RCHHead(6, 4, embed_dim=5).double().to(DEVICE)
    assert head.prototypes.dtype == torch.float64 and head.prototypes.device.type == DEVICE.type
    c = make_case(seed=0, dim=6, classes=4)
    out = head(c.embeddings.detach(), c.seg_logits, c.labels)
    assert out.loss.dtype == torch.float64 and out.loss.device.type == DEVICE.type


def test_head_accepts_a_bf16_feature_outside_autocast():
    head = RCHHead(4, 3, embed_dim=5)
    feature = torch.randn(2, 4, 6, 6).bfloat16()
    out = head(feature, torch.randn(2, 3, 6, 6), torch.randint(0, 3, (2, 6, 6)))
    assert torch.isfinite(out.loss) and out.loss.dtype == torch.float32


@pytest.mark.parametrize("init", ["randn", "first"])
@pytest.mark.parametrize("validate", [True, False, "deferred"])
def test_a_training_step_reads_back_at_most_once(monkeypatch, init, validate):
    """A training step's host reads (GPU synchronisations): with the value checks, one (the
    loss's checks together, the embeddings' included); without, or with the checks
    deferred, none. A prototype momentum tensor (``prototype_init="first"``) adds none."""
    from .test_functional import _HostReads

    use_gpu_path(monkeypatch)
    torch.manual_seed(0)
    head = RCHHead(6, 4, embed_dim=5, prototype_init=init, validate=validate).to(DEVICE)
    c = make_case(seed=35, batch=2, dim=6, classes=4, size=(5, 6), label_size=(10, 12))
    features = c.embeddings.detach().requires_grad_(True)
    with _HostReads() as spy:
        out = head(features, c.seg_logits, c.labels)
        out.loss.backward()
    assert spy.reads == (["__bool__"] if validate is True else [])
    assert features.grad is not None and torch.isfinite(out.loss)
    head.check()  # deferred: read here, and they pass


def _stepped(validate, features, c) -> RCHHead:
    torch.manual_seed(0)
    head = RCHHead(6, 4, embed_dim=5, prototype_init="first", validate=validate).to(DEVICE)
    head(features, c.seg_logits, c.labels)
    return head


def test_a_deferred_failure_keeps_the_prototypes_and_raises_from_check():
    """With ``validate="deferred"`` a step whose checks fail raises nothing at once, leaves
    the prototypes and their "initialised" flags as they were (selected on the device, no
    read), and :meth:`RCHHead.check` names what failed. A passing step updates the prototypes
    exactly as with the checks on."""
    shapes = {"batch": 2, "dim": 6, "classes": 4, "size": (5, 6), "label_size": (10, 12)}
    first = make_case(seed=40, absent=(3,), **shapes)  # class 3's prototype stays unset
    c = make_case(seed=40, **shapes)
    features = c.embeddings.detach()
    checked = _stepped(True, first.embeddings.detach(), first)
    deferred = _stepped("deferred", first.embeddings.detach(), first)
    deferred.check()
    assert torch.equal(deferred.prototypes, checked.prototypes)
    assert torch.equal(deferred.initialized, checked.initialized)
    assert bool(deferred.initialized.any()) and not bool(deferred.initialized.all())
    before = (deferred.prototypes.clone(), deferred.initialized.clone(), int(deferred.step))
    bad = features.clone()
    bad[0, :, 1, 1] = float("nan")
    out = deferred(bad, c.seg_logits, c.labels)
    assert not torch.isfinite(out.loss)  # computed, not yet checked
    assert torch.equal(deferred.prototypes, before[0])
    assert torch.equal(deferred.initialized, before[1])
    assert int(deferred.step) == before[2] + 1
    with pytest.raises(ValueError, match="failed: embeddings hold NaN or Inf"):
        deferred.check()
    deferred.check()  # read once: nothing is left to raise


def test_a_deferred_failure_not_checked_raises_from_the_next_forward():
    """A failure the caller never reads is not lost: the head's next forward raises it,
    before computing anything. A copy of the head starts with nothing pending."""
    import copy

    c = make_case(seed=41, batch=2, dim=6, classes=4, size=(5, 6), label_size=(10, 12))
    features = c.embeddings.detach()
    head = _stepped("deferred", features, c)
    bad_labels = c.labels.clone()
    bad_labels[1, 0, 0] = 9
    head(features, c.seg_logits, bad_labels)
    clone = copy.deepcopy(head)
    clone.check()
    step = int(head.step)
    with pytest.raises(ValueError, match=r"labels hold values outside \[0, 4\)"):
        head(features, c.seg_logits, c.labels)
    assert int(head.step) == step
    head(features, c.seg_logits, c.labels)  # raised once, then gone


def test_head_rejects_an_unknown_validate_mode():
    with pytest.raises(ValueError, match="validate must be one of True, False, 'deferred'"):
        RCHHead(6, 4, validate="sometimes")  # type: ignore[arg-type]


def test_the_heads_backward_runs_no_blas_on_the_gpu_path(monkeypatch):
    """The head's whole backward pass (loss, projection, BN) calls no BLAS on the GPU path:
    on a GPU it runs on autograd's own thread, where a first cuBLAS call would allocate a
    workspace that the process keeps (see ``_fused.BLAS_IN_BACKWARD_ON``)."""
    from .test_functional import BLAS_OPS, _AtenOps

    use_gpu_path(monkeypatch)
    torch.manual_seed(0)
    head = RCHHead(6, 4, embed_dim=5).to(DEVICE)
    c = make_case(seed=36, batch=2, dim=6, classes=4, size=(5, 6), label_size=(10, 12))
    features = c.embeddings.detach().requires_grad_(True)
    out = head(features, c.seg_logits, c.labels)
    with _AtenOps() as spy:
        out.loss.backward()
    assert "convolution_backward" in spy.ops  # the spy sees the projection's backward
    assert not BLAS_OPS & set(spy.ops)
    assert features.grad is not None and head.projection[0].weight.grad is not None
