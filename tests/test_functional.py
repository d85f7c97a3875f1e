"""rch.functional.rch_loss against the naive per-pixel reference, plus its edge cases."""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from rch import _fused
from rch.functional import rch_loss

from ._reference import naive_official, naive_paper
from .conftest import DEVICE, cuda_syncs_raise, make_case, use_gpu_path

TOL = {"rtol": 1e-9, "atol": 1e-10}

SHAPES = [
    {"batch": 1, "dim": 3, "classes": 2, "size": (3, 3)},
    {"batch": 2, "dim": 5, "classes": 4, "size": (4, 5)},
    {"batch": 3, "dim": 4, "classes": 5, "size": (3, 4), "label_size": (6, 8)},
    {"batch": 2, "dim": 6, "classes": 6, "size": (4, 4), "absent": (1, 4)},
    {"batch": 2, "dim": 4, "classes": 3, "size": (4, 4), "logit_size": (2, 2)},
    {"batch": 2, "dim": 4, "classes": 3, "size": (3, 5), "label_size": (7, 9)},
]


def _grads(loss, *tensors):
    return torch.autograd.grad(loss, tensors, retain_graph=True, allow_unused=True)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("terms", [(True, True), (True, False), (False, True), (False, False)])
def test_paper_matches_naive_loop(shape, terms):
    c = make_case(seed=len(str(shape)), **shape)
    fn_term, fp_term = terms
    out = rch_loss(
        c.embeddings, c.seg_logits, c.labels, c.prototypes, fn_term=fn_term, fp_term=fp_term
    )
    ref_fn, ref_fp, ref_mu = naive_paper(
        c.embeddings, c.seg_logits, c.labels, c.prototypes, fn_term=fn_term, fp_term=fp_term
    )
    torch.testing.assert_close(out.loss_fn, ref_fn, **TOL)
    torch.testing.assert_close(out.loss_fp, ref_fp, **TOL)
    torch.testing.assert_close(out.prototypes, ref_mu, **TOL)
    torch.testing.assert_close(
        _grads(out.loss, c.embeddings)[0], _grads(ref_fn + ref_fp, c.embeddings)[0], **TOL
    )
    # the gradient path through the updated prototypes is the reference's too
    probe = torch.randn_like(ref_mu)
    torch.testing.assert_close(
        _grads((out.prototypes * probe).sum(), c.embeddings)[0],
        _grads((ref_mu * probe).sum(), c.embeddings)[0],
        **TOL,
    )


@pytest.mark.parametrize("compact", [True, False])
def test_paper_in_many_row_blocks_matches_naive_loop(monkeypatch, compact):
    """The fused loss works through blocks of rows (cache-sized on a CPU, 8 MiB elsewhere).
    With blocks of 64 rows, 286 pixels make five, the last one ragged; both backward paths
    (the misclassified rows compacted, as on a CPU, or every row, as on a GPU) agree with
    the naive loop."""
    if compact:
        monkeypatch.setattr(_fused, "CHUNK_BYTES", 1)  # the minimum: 64 rows per block
        monkeypatch.setattr(_fused, "DEVICE_CHUNK_BYTES", 1)
    else:  # the whole GPU path: no compaction, no BLAS in the backward pass, one-row bags
        use_gpu_path(monkeypatch, tiny_blocks=True)
    c = make_case(seed=41, batch=2, dim=5, classes=4, size=(11, 13), label_size=(22, 26))
    out = rch_loss(c.embeddings, c.seg_logits, c.labels, c.prototypes)
    ref_fn, ref_fp, ref_mu = naive_paper(c.embeddings, c.seg_logits, c.labels, c.prototypes)
    torch.testing.assert_close(out.loss_fn, ref_fn, **TOL)
    torch.testing.assert_close(out.loss_fp, ref_fp, **TOL)
    torch.testing.assert_close(out.prototypes, ref_mu, **TOL)
    probe = torch.randn_like(ref_mu)
    got = _grads(out.loss + (out.prototypes * probe).sum(), c.embeddings)[0]
    want = _grads(ref_fn + ref_fp + (ref_mu * probe).sum(), c.embeddings)[0]
    torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("alpha", [None, 1.0])
def test_official_matches_naive_loop(shape, alpha):
    c = make_case(seed=7 + len(str(shape)), **shape)
    out = rch_loss(
        c.embeddings,
        c.seg_logits,
        c.labels,
        c.prototypes,
        formulation="official",
        tau=0.25,
        alpha=alpha,
    )
    ref_fn, ref_fp, ref_mu = naive_official(
        c.embeddings, c.seg_logits, c.labels, c.prototypes, tau=0.25, alpha=alpha
    )
    torch.testing.assert_close(out.loss_fn, ref_fn, **TOL)
    torch.testing.assert_close(out.loss_fp, ref_fp, **TOL)
    torch.testing.assert_close(out.prototypes, ref_mu, **TOL)
    torch.testing.assert_close(
        _grads(out.loss, c.embeddings)[0], _grads(ref_fn + ref_fp, c.embeddings)[0], **TOL
    )


@pytest.mark.parametrize("formulation", ["paper", "official"])
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[2], SHAPES[5]])
def test_loss_mask_averages_the_loss_over_its_pixels_only(formulation, shape):
    """OHEM's pixels (the mask) carry the loss; the statistics still see every pixel."""
    c = make_case(seed=21 + len(str(shape)), **shape)
    g = torch.Generator().manual_seed(1)
    mask = (torch.rand(c.labels.shape, generator=g) < 0.5).to(c.labels.device)
    naive = naive_paper if formulation == "paper" else naive_official
    out = rch_loss(
        c.embeddings, c.seg_logits, c.labels, c.prototypes, formulation=formulation,
        loss_mask=mask,
    )  # fmt: skip
    ref_fn, ref_fp, ref_mu = naive(
        c.embeddings, c.seg_logits, c.labels, c.prototypes, loss_mask=mask
    )
    torch.testing.assert_close(out.loss_fn, ref_fn, **TOL)
    torch.testing.assert_close(out.loss_fp, ref_fp, **TOL)
    torch.testing.assert_close(out.prototypes, ref_mu, **TOL)
    torch.testing.assert_close(
        _grads(out.loss, c.embeddings)[0], _grads(ref_fn + ref_fp, c.embeddings)[0], **TOL
    )
    # unlike ignoring the unmasked pixels, which changes the pixel sets and the prototypes
    hidden = rch_loss(
        c.embeddings, c.seg_logits, torch.where(mask, c.labels, 255), c.prototypes,
        formulation=formulation,
    )  # fmt: skip
    assert not torch.allclose(hidden.prototypes, out.prototypes)
    everything = rch_loss(
        c.embeddings, c.seg_logits, c.labels, c.prototypes, formulation=formulation,
        loss_mask=torch.ones_like(mask),
    )  # fmt: skip
    plain = rch_loss(c.embeddings, c.seg_logits, c.labels, c.prototypes, formulation=formulation)
    torch.testing.assert_close(everything.loss, plain.loss, rtol=0, atol=0)


def test_official_in_float32_within_1e5_of_float64_reference():
    c = make_case(seed=3, batch=2, dim=16, classes=5, size=(6, 6), label_size=(12, 12))
    out = rch_loss(
        c.embeddings.detach().float(),
        c.seg_logits.float(),
        c.labels,
        c.prototypes.float(),
        formulation="official",
    )
    ref_fn, ref_fp, _ = naive_official(c.embeddings, c.seg_logits, c.labels, c.prototypes)
    assert out.loss.dtype == torch.float32
    assert abs(out.loss.item() - (ref_fn + ref_fp).item()) < 1e-5


def test_gt_prototype_source_matches_naive_loop():
    c = make_case(seed=11)
    out = rch_loss(c.embeddings, c.seg_logits, c.labels, c.prototypes, prototype_source="gt")
    ref_fn, ref_fp, ref_mu = naive_paper(
        c.embeddings, c.seg_logits, c.labels, c.prototypes, source="gt"
    )
    torch.testing.assert_close(out.prototypes, ref_mu, **TOL)
    torch.testing.assert_close(out.loss, ref_fn + ref_fp, **TOL)


def test_no_update_uses_given_prototypes_and_trains_them():
    c = make_case(seed=12)
    learned = c.prototypes.clone().requires_grad_(True)
    out = rch_loss(c.embeddings, c.seg_logits, c.labels, learned, update_prototypes=False)
    ref_fn, ref_fp, _ = naive_paper(c.embeddings, c.seg_logits, c.labels, learned, update=False)
    torch.testing.assert_close(out.prototypes, learned, **TOL)
    assert not out.updated.any()
    torch.testing.assert_close(
        _grads(out.loss, learned)[0], _grads(ref_fn + ref_fp, learned)[0], **TOL
    )


def test_perfect_prediction_gives_plain_prototype_nll():
    c = make_case(seed=5)
    right = c.labels.clamp_max(3)  # ignored pixels may be predicted as anything
    c.seg_logits = 20.0 * torch.nn.functional.one_hot(right, 4).permute(0, 3, 1, 2).double()
    out = rch_loss(c.embeddings, c.seg_logits, c.labels, c.prototypes)
    assert int(out.fn_count.sum()) == 0 and int(out.fp_count.sum()) == 0
    plain = rch_loss(
        c.embeddings, c.seg_logits, c.labels, c.prototypes, fn_term=False, fp_term=False
    )
    torch.testing.assert_close(out.loss_fn, plain.loss_fn, **TOL)
    torch.testing.assert_close(out.loss_fp, plain.loss_fn, **TOL)
    # and that is the cross-entropy of cos / tau against the updated prototypes
    e = torch.nn.functional.normalize(c.embeddings.detach(), dim=1)
    mu = torch.nn.functional.normalize(out.prototypes.detach(), dim=1)
    logits = torch.einsum("bdhw,kd->bkhw", e, mu) / 0.5
    nll = torch.nn.functional.cross_entropy(logits, c.labels, ignore_index=255)
    torch.testing.assert_close(out.loss_fn.detach(), nll, rtol=1e-9, atol=1e-9)


def test_momentum_per_class_tensor():
    c = make_case(seed=13, accuracy=0.9, ignore_frac=0.0)
    rho = torch.tensor([0.0, 0.5, 0.9, 0.99], dtype=torch.float64)
    out = rch_loss(c.embeddings, c.seg_logits, c.labels, c.prototypes, momentum=rho)
    for k in range(4):
        ref = naive_paper(c.embeddings, c.seg_logits, c.labels, c.prototypes, rho=float(rho[k]))[2]
        torch.testing.assert_close(out.prototypes[k], ref[k], **TOL)


def test_counts_are_the_tp_fn_fp_split():
    c = make_case(seed=2, size=(5, 5))
    out = rch_loss(c.embeddings, c.seg_logits, c.labels, c.prototypes)
    pred, y = c.seg_logits.argmax(1), c.labels
    for k in range(4):
        valid = y != 255
        assert int(out.tp_count[k]) == int(((y == k) & (pred == k)).sum())
        assert int(out.fn_count[k]) == int(((y == k) & (pred != k)).sum())
        assert int(out.fp_count[k]) == int((valid & (y != k) & (pred == k)).sum())


@pytest.mark.parametrize("formulation", ["paper", "official"])
def test_all_ignored_gives_zero_loss_that_backpropagates(formulation):
    c = make_case(seed=1)
    labels = torch.full_like(c.labels, 255)
    out = rch_loss(c.embeddings, c.seg_logits, labels, c.prototypes, formulation=formulation)
    assert out.loss.item() == 0.0
    out.loss.backward()
    assert c.embeddings.grad is not None and torch.isfinite(c.embeddings.grad).all()
    torch.testing.assert_close(out.prototypes, c.prototypes)
    assert not out.updated.any()


@pytest.mark.parametrize("formulation", ["paper", "official"])
def test_zero_embeddings_are_finite(formulation):
    c = make_case(seed=4)
    emb = torch.zeros_like(c.embeddings).requires_grad_(True)
    out = rch_loss(
        emb, c.seg_logits, c.labels, torch.zeros_like(c.prototypes), formulation=formulation
    )
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(emb.grad).all()


@pytest.mark.parametrize("gpu_path", [False, True])
def test_zero_rows_get_the_reference_gradient(monkeypatch, gpu_path):
    """``u = x / (|x| + eps)`` at ``x = 0``: the gradient is ``du / eps`` (the norm's
    subgradient 0 there, as ``vector_norm``'s backward takes it; the reference's ``sqrt``
    would give NaN); the fused backward pass's per-row factors are ``1 / eps`` and 0 there,
    on either path."""
    from rch.loss import EPS

    from . import _reference

    monkeypatch.setattr(_reference, "_unit", lambda v: v / (torch.linalg.vector_norm(v) + EPS))
    c = make_case(seed=9, batch=2, dim=5, classes=4, size=(4, 5))
    emb = c.embeddings.detach().clone()
    emb[0, :, 1, 2] = 0.0
    emb[1, :, 0, :] = 0.0
    emb.requires_grad_(True)
    if gpu_path:
        use_gpu_path(monkeypatch, tiny_blocks=True)
    out = rch_loss(emb, c.seg_logits, c.labels, c.prototypes)
    ref_fn, ref_fp, _ = _reference.naive_paper(emb, c.seg_logits, c.labels, c.prototypes)
    torch.testing.assert_close(out.loss, ref_fn + ref_fp, **TOL)
    got, want = _grads(out.loss, emb)[0], _grads(ref_fn + ref_fp, emb)[0]
    assert want[1, :, 0, :].abs().max() > 1e6  # the zero rows' gradient is large, and shown
    torch.testing.assert_close(got, want, **TOL)


def test_no_true_positive_keeps_prototypes():
    c = make_case(seed=6, accuracy=0.0, classes=3)
    labels = c.labels.clone()
    pred = c.seg_logits.argmax(1)
    labels[(labels == pred)] = 255  # remove every TP
    out = rch_loss(c.embeddings, c.seg_logits, labels, c.prototypes)
    assert int(out.tp_count.sum()) == 0 and not out.updated.any()
    torch.testing.assert_close(out.prototypes, c.prototypes)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(c.embeddings.grad).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_are_computed_in_float32(dtype):
    c = make_case(seed=8, dtype=torch.float32)
    emb = c.embeddings.detach().to(dtype).requires_grad_(True)
    out = rch_loss(emb, c.seg_logits.to(dtype), c.labels, c.prototypes.to(dtype))
    ref = rch_loss(
        emb.detach().float(),
        c.seg_logits.to(dtype).float(),
        c.labels,
        c.prototypes.to(dtype).float(),
    )
    assert out.loss.dtype == torch.float32 and out.prototypes.dtype == torch.float32
    torch.testing.assert_close(out.loss, ref.loss)
    out.loss.backward()
    assert emb.grad.dtype == dtype and torch.isfinite(emb.grad.float()).all()


@pytest.mark.parametrize("formulation", ["paper", "official"])
def test_autocast_runs_in_float32(formulation):
    """bf16 autocast on the CPU; fp16 autocast, AMP's usual, when RCH_TEST_DEVICE=cuda."""
    half = torch.float16 if DEVICE.type == "cuda" else torch.bfloat16
    c = make_case(seed=9, dtype=torch.float32)
    conv = torch.nn.Conv2d(5, 5, 1).to(DEVICE)
    with torch.autocast(DEVICE.type, dtype=half):
        emb = conv(c.embeddings)
        assert emb.dtype == half
        out = rch_loss(emb, c.seg_logits, c.labels, c.prototypes, formulation=formulation)
    ref = rch_loss(
        emb.detach().float(), c.seg_logits, c.labels, c.prototypes, formulation=formulation
    )
    assert out.loss.dtype == torch.float32 and out.prototypes.dtype == torch.float32
    torch.testing.assert_close(out.loss, ref.loss)
    out.loss.backward()
    assert torch.isfinite(conv.weight.grad).all() and conv.weight.grad.abs().sum() > 0


def test_float64_stays_float64(case):
    out = rch_loss(case.embeddings, case.seg_logits, case.labels, case.prototypes)
    assert out.loss.dtype == torch.float64 and out.prototypes.dtype == torch.float64


def test_seg_logits_receive_no_gradient(case):
    logits = case.seg_logits.clone().requires_grad_(True)
    out = rch_loss(case.embeddings, logits, case.labels, case.prototypes)
    (grad,) = torch.autograd.grad(out.loss, logits, allow_unused=True)
    assert grad is None


def test_integer_labels_of_other_dtypes_accepted(case):
    a = rch_loss(case.embeddings, case.seg_logits, case.labels, case.prototypes)
    b = rch_loss(case.embeddings, case.seg_logits, case.labels.to(torch.uint8), case.prototypes)
    torch.testing.assert_close(a.loss, b.loss)


def test_gradcheck_float64():
    c = make_case(seed=10, batch=2, dim=3, classes=3, size=(3, 3), label_size=(6, 6))
    protos = c.prototypes.clone().requires_grad_(True)

    def paper(emb, mu):
        return rch_loss(emb, c.seg_logits, c.labels, mu, update_prototypes=False).loss

    def paper_ema(emb):
        out = rch_loss(emb, c.seg_logits, c.labels, c.prototypes)
        return out.loss, out.prototypes

    def official(emb):
        return rch_loss(emb, c.seg_logits, c.labels, c.prototypes, formulation="official").loss

    emb = c.embeddings.detach().clone().requires_grad_(True)
    # CUDA's index_add_ / scatter-add sum with atomics, in no fixed order: two backward
    # passes may differ in the last bits, which gradcheck's re-entrancy check notices
    nondet_tol = 1e-12 if DEVICE.type == "cuda" else 0.0
    assert torch.autograd.gradcheck(paper, (emb, protos), nondet_tol=nondet_tol)
    assert torch.autograd.gradcheck(paper_ema, (emb,), nondet_tol=nondet_tol)
    assert torch.autograd.gradcheck(official, (emb,), nondet_tol=nondet_tol)


def test_paper_keeps_one_pixel_by_width_tensor_for_backward():
    """The fused path saves the unit rows and nothing else of size (N, D) for backward.

    A second one (the raw rows, kept alive by a norm computed under autograd) once
    added a whole embedding copy to the peak memory; the benchmark caught it, this pins it.
    """
    c = make_case(seed=5, batch=2, dim=6, classes=4, size=(5, 7))
    n = 2 * 5 * 7
    saved: list[tuple[int, ...]] = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = rch_loss(c.embeddings, c.seg_logits, c.labels, c.prototypes)
    assert saved.count((n, 6)) == 1, saved
    out.loss.backward()
    assert torch.isfinite(c.embeddings.grad).all()


class _HostReads(TorchFunctionMode):
    """Records the calls that read a tensor's data back to the host (a GPU synchronisation)."""

    NAMES = frozenset(
        {"__bool__", "__int__", "__float__", "__index__", "item", "tolist", "nonzero",
         "argwhere", "bincount", "unique", "masked_select"}
    )  # fmt: skip

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        masks = [a for a in args[1:] if isinstance(a, torch.Tensor) and a.dtype == torch.bool]
        counted = (
            name == "repeat_interleave" and len(args) > 1 and isinstance(args[1], torch.Tensor)
        )
        if name in self.NAMES or counted or (name in ("__getitem__", "__setitem__") and masks):
            self.reads.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("formulation", ["paper", "official"])
def test_a_step_without_validation_reads_nothing_back(monkeypatch, masked, formulation):
    """On a GPU every read-back stalls the step until the GPU drains its queue. With
    ``validate=False`` the loss's forward and backward make none (the GPU path: no
    compaction of the misclassified pixels, no bincount, scattered instead of sorted
    sums), and give the CPU path's numbers."""
    c = make_case(seed=31, batch=2, dim=6, classes=4, size=(5, 6), label_size=(10, 12))
    mask = (torch.rand(c.labels.shape) < 0.7).to(c.labels.device) if masked else None
    want = rch_loss(
        c.embeddings, c.seg_logits, c.labels, c.prototypes, loss_mask=mask, formulation=formulation
    )
    want_grad = _grads(want.loss + want.prototypes.sum(), c.embeddings)[0]
    use_gpu_path(monkeypatch)
    with _HostReads() as spy:
        out = rch_loss(
            c.embeddings,
            c.seg_logits,
            c.labels,
            c.prototypes,
            loss_mask=mask,
            validate=False,
            formulation=formulation,
        )
        grad = _grads(out.loss + out.prototypes.sum(), c.embeddings)[0]
    assert spy.reads == []
    torch.testing.assert_close(out.loss, want.loss, **TOL)
    torch.testing.assert_close(out.prototypes, want.prototypes, **TOL)
    torch.testing.assert_close(grad, want_grad, **TOL)
    assert torch.equal(out.updated, want.updated)
    for name in ("tp_count", "fn_count", "fp_count"):
        assert torch.equal(getattr(out, name), getattr(want, name))
    if DEVICE.type == "cuda":  # the real thing: CUDA itself reports any synchronisation
        with cuda_syncs_raise():
            for update in (True, False):  # without the EMA step too (learned prototypes)
                out = rch_loss(
                    c.embeddings, c.seg_logits, c.labels, c.prototypes, loss_mask=mask,
                    validate=False, formulation=formulation, update_prototypes=update,
                )  # fmt: skip
                (out.loss + out.prototypes.sum()).backward()


class _AtenOps(TorchDispatchMode):
    """Records the name of every aten operator that runs (``computed``: those that are not
    views, each a kernel launch on a GPU but for allocations)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []
        self.computed = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        self.computed += not func.is_view
        return func(*args, **(kwargs or {}))


BLAS_OPS = frozenset({"mm", "addmm", "bmm", "baddbmm", "mv", "addmv", "dot", "vdot", "matmul"})


@pytest.mark.parametrize("conv", [False, True])
@pytest.mark.parametrize("update", [True, False])
@pytest.mark.parametrize("terms", [(True, True), (False, True), (False, False)])
def test_gpu_path_backward_runs_no_blas(monkeypatch, update, terms, conv):
    """On a GPU autograd runs the backward pass on a thread of its own, and a thread's first
    cuBLAS call allocates a workspace that the process keeps (32 MiB), which a network
    without matrix products (DeepLabV3) would hold for RCH alone. So there the loss's
    backward runs no BLAS: the prototypes' products come from the forward pass and the
    embeddings' is a bag of prototype rows. With the forward pass's products as 1x1
    convolutions (``conv``: ``CONV_PRODUCTS_ON``, an experiment for matmul-free networks)
    neither pass runs BLAS. The losses, the updated prototypes and the gradients are the BLAS
    path's, for any weights of the two terms, of the updated prototypes and of the
    prototypes given."""
    fn_term, fp_term = terms
    c = make_case(seed=42, batch=2, dim=5, classes=4, size=(11, 13), absent=(1,))
    probe = torch.randn(4, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def step() -> tuple[list[str], list[str], tuple[torch.Tensor, ...]]:
        emb = c.embeddings.detach().clone().requires_grad_(True)
        protos = c.prototypes.clone().requires_grad_(True)
        with _AtenOps() as forward:
            out = rch_loss(
                emb, c.seg_logits, c.labels, protos, fn_term=fn_term, fp_term=fp_term,
                update_prototypes=update,
            )  # fmt: skip
        total = 2.0 * out.loss_fn + 0.5 * out.loss_fp + (out.prototypes * probe.to(DEVICE)).sum()
        with _AtenOps() as backward:
            total.backward()
        got = (out.loss_fn, out.loss_fp, out.prototypes, emb.grad, protos.grad)
        return forward.ops, backward.ops, got

    monkeypatch.setattr(_fused, "BLAS_IN_BACKWARD_ON", (DEVICE.type,))
    _, blas_backward, want = step()
    assert BLAS_OPS & set(blas_backward)  # the spy sees the products where they are
    use_gpu_path(monkeypatch, tiny_blocks=True)  # five blocks of rows, one-row bags
    if conv:
        monkeypatch.setattr(_fused, "CONV_PRODUCTS_ON", (DEVICE.type,))
    forward, backward, got = step()
    assert not BLAS_OPS & set(backward), sorted(BLAS_OPS & set(backward))
    if conv:
        assert not BLAS_OPS & set(forward), sorted(BLAS_OPS & set(forward))
        assert "convolution" in forward
    else:
        assert "mm" in forward
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, **TOL)


OPS_PER_BLOCK = 24
"""Operators that one more block of rows adds to the GPU path's forward and backward pass:
3 in the forward pass (gather, product, sum), 12 in the backward's main pass (two bags, the
normalisation's backward, the centres' scatter) and 9 in its pass over the centres."""


def test_gpu_path_adds_few_operators_per_block_of_rows(monkeypatch):
    """On a GPU every operator is a kernel launch, and the loss works through blocks of rows;
    what does not depend on the block (the normalisation's factors, the bags' indices and
    weights) is made once per pass, so that each block adds only its own work."""
    use_gpu_path(monkeypatch)
    c = make_case(seed=44, batch=2, dim=8, classes=4, size=(16, 16))  # 512 rows

    def count(budget: int) -> tuple[int, torch.Tensor]:
        for name in ("CHUNK_BYTES", "DEVICE_CHUNK_BYTES"):  # whichever the device reads
            monkeypatch.setattr(_fused, name, budget)
        emb = c.embeddings.detach().clone().requires_grad_(True)
        with _AtenOps() as spy:
            out = rch_loss(emb, c.seg_logits, c.labels, c.prototypes)
            out.loss.backward()
        return spy.computed, out.loss

    one, loss_one = count(1 << 30)
    # blocks of 128 rows of 2 centres of width 8
    four, loss_four = count(128 * 2 * 8 * c.embeddings.element_size())
    torch.testing.assert_close(loss_four, loss_one, **TOL)
    assert (four - one) / 3 <= OPS_PER_BLOCK, (four - one) / 3


def test_gpu_path_makes_the_backward_products_only_when_a_backward_pass_can_follow(
    monkeypatch,
):
    """The prototypes' two products for the backward pass come from the forward pass on a
    GPU; under ``torch.no_grad()`` (or with no input needing a gradient) there is no
    backward pass, and the cosines are the only product."""
    use_gpu_path(monkeypatch)
    c = make_case(seed=43, batch=2, dim=5, classes=4, size=(5, 6))
    with _AtenOps() as spy:
        rch_loss(c.embeddings, c.seg_logits, c.labels, c.prototypes)
    assert spy.ops.count("mm") == 3
    with torch.no_grad(), _AtenOps() as spy:
        rch_loss(c.embeddings, c.seg_logits, c.labels, c.prototypes)
    assert spy.ops.count("mm") == 1
    assert not c.prototypes.requires_grad
    with _AtenOps() as spy:
        rch_loss(c.embeddings.detach(), c.seg_logits, c.labels, c.prototypes)
    assert spy.ops.count("mm") == 1


def test_validate_false_skips_only_the_value_checks():
    c = make_case(seed=32)
    logits = c.seg_logits.clone()
    logits[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="seg_logits contains 1 non-finite"):
        rch_loss(c.embeddings, logits, c.labels, c.prototypes)
    out = rch_loss(c.embeddings, logits, c.labels, c.prototypes, validate=False)
    assert out.loss.shape == ()  # computed, unchecked
    with pytest.raises(ValueError, match="seg_logits has 4 classes"):  # shapes: always
        rch_loss(c.embeddings, c.seg_logits, c.labels, c.prototypes[:3], validate=False)


@pytest.mark.parametrize("formulation", ["paper", "official"])
def test_the_value_checks_read_back_once(monkeypatch, formulation):
    """With ``validate=True`` (the default) the value checks of labels, logits, prototypes,
    a momentum tensor and embeddings are read back together: one host read per loss
    call, one synchronisation on a GPU, instead of one per check."""
    c = make_case(seed=33, batch=2, dim=6, classes=4, size=(5, 6), label_size=(10, 12))
    momentum = torch.full((4,), 0.9, dtype=torch.float64, device=c.prototypes.device)
    use_gpu_path(monkeypatch)
    args = (c.embeddings, c.seg_logits, c.labels, c.prototypes)
    with _HostReads() as spy:
        out = rch_loss(*args, momentum=momentum, formulation=formulation)
        _grads(out.loss + out.prototypes.sum(), c.embeddings)
    assert spy.reads == ["__bool__"]
    with _HostReads() as spy:  # a momentum tensor is checked with the values, not before
        rch_loss(*args, momentum=momentum, formulation=formulation, validate=False)
    assert spy.reads == []


class _Calls(TorchFunctionMode):
    """Records the name of every torch function called, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("formulation", ["paper", "official"])
def test_the_value_checks_are_read_back_after_the_loss_is_queued(formulation):
    """On a GPU the read-back waits for the device. Made last, it lets the host launch the
    loss's many small kernels while the GPU still runs the network's forward pass; made
    first, the GPU would idle while they are launched one by one."""
    c = make_case(seed=37, batch=2, dim=6, classes=4, size=(5, 6), label_size=(10, 12))
    with _Calls() as spy:
        rch_loss(c.embeddings, c.seg_logits, c.labels, c.prototypes, formulation=formulation)
    assert spy.calls.count("__bool__") == 1
    assert spy.calls[-1] == "__bool__", spy.calls[-5:]
    assert len(spy.calls) > 100  # the spy sees the loss's own operations


def test_a_failed_value_check_names_the_first_bad_input():
    """When the one read-back says something is wrong, the full checks run in order and the
    first bad input raises with its own message. Until then a label out of range counts as
    ignored, so nothing indexes out of bounds first (on the CPU an IndexError, on a GPU a
    device-side assert): the labels' message is the error."""
    c = make_case(seed=34)
    bad_labels, bad_emb = c.labels.clone(), c.embeddings.detach().clone()
    bad_labels[0, 0, 0] = 7
    bad_emb[1, 2, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="labels holds values outside \\[0, 4\\)"):
        rch_loss(bad_emb, c.seg_logits, bad_labels, c.prototypes)
    with pytest.raises(ValueError, match="embeddings contains 1 non-finite value\\(s\\) \\(Inf\\)"):
        rch_loss(bad_emb, c.seg_logits, c.labels, c.prototypes)
    with pytest.raises(ValueError, match="momentum must lie in \\[0, 1\\)"):
        momentum = torch.tensor([0.9, 1.0, 0.5, 0.2], device=c.prototypes.device)
        rch_loss(c.embeddings, c.seg_logits, c.labels, c.prototypes, momentum=momentum)
    # a float32 sum that overflows although every entry is finite: no error
    big = torch.full_like(c.seg_logits, 3e38)
    assert torch.isfinite(rch_loss(c.embeddings, big, c.labels, c.prototypes).loss)


@pytest.mark.parametrize("formulation", ["paper", "official"])
def test_deferred_checks_read_nothing_back_and_change_no_result(monkeypatch, formulation):
    """``validate="deferred"`` computes the same checks but leaves them unread: the loss's
    forward and backward read nothing back (no GPU synchronisation), and every result equals
    the checked call's."""
    c = make_case(seed=38, batch=2, dim=6, classes=4, size=(5, 6), label_size=(10, 12))
    momentum = torch.full((4,), 0.9, dtype=torch.float64, device=c.prototypes.device)
    args = (c.embeddings, c.seg_logits, c.labels, c.prototypes)
    use_gpu_path(monkeypatch)
    want = rch_loss(*args, momentum=momentum, formulation=formulation)
    want_grad = _grads(want.loss + want.prototypes.sum(), c.embeddings)[0]
    with _HostReads() as spy:
        out = rch_loss(*args, momentum=momentum, formulation=formulation, validate="deferred")
        grad = _grads(out.loss + out.prototypes.sum(), c.embeddings)[0]
    assert spy.reads == []
    assert want.checks is None and out.checks is not None
    assert out.checks.failures() == [] and bool(out.checks.ok)
    torch.testing.assert_close(out.loss, want.loss, rtol=0, atol=0)
    torch.testing.assert_close(out.prototypes, want.prototypes, rtol=0, atol=0)
    torch.testing.assert_close(grad, want_grad, rtol=0, atol=0)
    assert torch.equal(out.updated, want.updated) and torch.equal(out.tp_count, want.tp_count)
    if DEVICE.type == "cuda":  # CUDA itself reports any synchronisation, the flags' copy too
        with cuda_syncs_raise():
            out = rch_loss(*args, momentum=momentum, formulation=formulation, validate="deferred")
            (out.loss + out.prototypes.sum()).backward()
        out.checks.raise_if_failed()  # waits for the flags' copy only


def test_deferred_checks_name_each_bad_input_after_the_call():
    """A deferred check does not raise from the call; the output's checks name each input
    that failed. A label out of range counts as ignored meanwhile, as with the checks on."""
    c = make_case(seed=39)
    bad_labels, bad_emb = c.labels.clone(), c.embeddings.detach().clone()
    bad_labels[0, 0, 0] = 7
    bad_emb[1, 2, 0, 0] = float("nan")
    bad_logits, bad_protos = c.seg_logits.clone(), c.prototypes.clone()
    bad_logits[0, 1, 0, 0] = float("inf")
    bad_protos[2, 0] = float("nan")
    momentum = torch.tensor([0.9, 1.0, 0.5, 0.2], device=c.prototypes.device)
    cases = [
        ({"labels": bad_labels}, r"labels hold values outside \[0, 4\) that are not ignore_index"),
        ({"embeddings": bad_emb}, "embeddings hold NaN or Inf"),
        ({"seg_logits": bad_logits}, "seg_logits hold NaN or Inf"),
        ({"prototypes": bad_protos}, "prototypes hold NaN or Inf"),
        ({"momentum": momentum}, r"momentum does not lie in \[0, 1\)"),
    ]
    for change, match in cases:
        args = {"embeddings": c.embeddings, "seg_logits": c.seg_logits, "labels": c.labels}
        args |= {"prototypes": c.prototypes, "validate": "deferred"} | change
        out = rch_loss(**args)
        assert out.checks is not None and not bool(out.checks.ok), match
        with pytest.raises(ValueError, match=match):
            out.checks.raise_if_failed()
    args = {"embeddings": c.embeddings, "seg_logits": c.seg_logits, "prototypes": c.prototypes}
    labelled = rch_loss(**args, labels=bad_labels, validate="deferred")
    ignored = bad_labels.masked_fill(bad_labels == 7, 255)
    torch.testing.assert_close(labelled.loss, rch_loss(**args, labels=ignored).loss)


def _forward_peak_bytes(fn) -> int:
    """Peak of the tensor bytes held during ``fn()`` above those held before (CPU)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    held = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        held += event.nbytes()
        peak = max(peak, held)
    return peak


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_paper_forward_holds_one_row_sized_tensor(dtype):
    """The paper path's forward turns its own float32 rows (a cast under AMP, a reordering
    otherwise) into the unit rows in place: it never holds two (N, D) float32 tensors."""
    c = make_case(seed=3, batch=2, dim=128, classes=3, size=(16, 16), dtype=torch.float32)
    emb, protos = c.embeddings.detach().to(dtype), c.prototypes.float()
    logits = c.seg_logits.float()
    kw = {"fn_term": False, "fp_term": False, "validate": False}
    rch_loss(emb, logits, c.labels, protos, **kw)  # warm-up: lazily built state
    row_bytes = emb.shape[0] * emb.shape[2] * emb.shape[3] * emb.shape[1] * 4
    peak = _forward_peak_bytes(lambda: rch_loss(emb, logits, c.labels, protos, **kw))
    assert row_bytes <= peak < 1.5 * row_bytes


def test_paper_loss_leaves_channels_last_embeddings_as_they_were():
    """Channels-last float32 embeddings flatten to a view: the loss must not normalise them
    in place; it gives the same loss and gradient as contiguous ones."""
    c = make_case(seed=4, batch=2, dim=6, classes=3, size=(5, 6), dtype=torch.float32)
    dense = c.embeddings.detach().clone().requires_grad_(True)
    last = c.embeddings.detach().clone().to(memory_format=torch.channels_last)
    kept = last.clone()
    last.requires_grad_(True)
    a = rch_loss(dense, c.seg_logits.float(), c.labels, c.prototypes.float())
    b = rch_loss(last, c.seg_logits.float(), c.labels, c.prototypes.float())
    assert torch.equal(last.detach(), kept)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-6, atol=1e-6)
    (ga,) = torch.autograd.grad(a.loss, dense)
    (gb,) = torch.autograd.grad(b.loss, last)
    torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-7)


def test_the_gpu_path_switches_are_listed_once_and_completely():
    """``use_gpu_path`` and the benchmarks' ``gpu_path`` switch what ``CPU_ONLY_SWITCHES``
    lists: every ``*_ON`` device switch of the loss's modules that is on for the CPU only."""
    import importlib

    listed = set(_fused.CPU_ONLY_SWITCHES)
    found = {
        (module, name)
        for module in ("rch.stats", "rch._fused")
        for name, value in vars(importlib.import_module(module)).items()
        if name.endswith("_ON") and value == ("cpu",)
    }
    assert listed == found
    assert len(listed) == len(_fused.CPU_ONLY_SWITCHES)
