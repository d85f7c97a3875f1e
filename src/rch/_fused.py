"""The paper formulation as one autograd Function with a hand-written backward pass.

Same mathematics as the composable path (:func:`rch.loss.calibration_terms`,
:func:`rch.prototypes.ema_update`, :func:`rch.loss.margin_logits` and cross-entropy); the
tests check it against that path, against a naive per-pixel loop and with gradcheck.

What it saves is memory traffic. On the CPU every fresh ``(N, D)`` tensor costs a
page-faulting allocation dearer than the arithmetic done on it, and autograd's generic
backward of the normalisation, the gathers and the products allocates about ten of them.
Here the per-pixel work runs over cache-sized blocks of rows with one reused scratch
buffer (a gathered block is consumed while it is still in cache), both cross-entropies
share one exponential of the logits, and the normalisation backward runs in place: the
step allocates no ``(N, D)`` tensor beyond the unit embeddings and their gradient.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable
from torch.nn.grad import conv2d_weight

from . import stats
from .distributed import world_size
from .loss import EPS
from .prototypes import ema_update
from .stats import PixelSets, flatten_pixels, segment_sum

__all__ = ["PaperPlan", "fused_paper_loss"]


@dataclass
class PaperPlan:
    """Everything about one step that carries no gradient."""

    sets: PixelSets
    anchors: Tensor  # (N,) bool pixels whose loss counts: labelled (and kept by a loss mask)
    weight: Tensor  # (N,) 1 - p_true, zero off the anchors
    target: Tensor  # (N,) true class, clamped into [0, K) for ignored pixels
    num_images: int
    tau: float
    momentum: float | Tensor
    members: Tensor | None  # (N,) bool pixels that feed the EMA; None: no update
    fn_term: bool
    fp_term: bool
    group: dist.ProcessGroup | None
    dtype: torch.dtype | None = None  # the loss's working dtype; None: the embeddings' own
    backward: bool = True  # a backward pass may follow (set by fused_paper_loss)


CHUNK_BYTES = 1 << 21
"""On a CPU, gathers run over blocks of rows whose scratch buffer fits in a core's cache."""

DEVICE_CHUNK_BYTES = 1 << 23
"""On other devices (a GPU: wide kernels, a caching allocator), blocks of 8 MiB of scratch:
few launches per pass, and the backward pass's per-pixel temporaries stay a few MiB. One
block for all pixels (``(N, 2, D)`` in float32, 32 MiB for DeepLabV3 at 512x1024, batch 2)
would add to the training step's peak, which under AMP is likely to come at the start of
the backward pass, where the RCH loss's backward runs (``benchmarks/loss_memory.py``
measures the loss's own peak on each path)."""


BLAS_IN_BACKWARD_ON: tuple[str, ...] = ("cpu",)
"""Device types where the backward pass runs the two matrix products of the cosines'
gradient (with the unit prototypes, and with the unit embeddings). Elsewhere (a GPU) the
backward pass runs no BLAS: autograd runs it on a thread of its own, and a thread's first
cuBLAS call allocates a workspace for that thread (32 MiB on an H200, torch 2.11), which the
process keeps. In a network whose backward pass has no matrix product (DeepLabV3: only
convolutions) RCH's products alone would bring it in. There the prototypes' product is made
in the forward pass, once per cross-entropy term (each term's gradient is linear in its
output's), and the embeddings' product as a weighted bag of the K prototype rows."""

CONV_PRODUCTS_ON: tuple[str, ...] = ()
"""Device types where the forward pass's matrix products (the cosines and, where the backward
pass runs no BLAS, the prototypes' products per term) run as 1x1 convolutions (cuDNN on a
GPU) instead of BLAS. None by default: an experiment for networks without matrix products
of their own (DeepLabV3), where RCH's products alone bring in the forward thread's cuBLAS
workspace (32 MiB on an H200, kept by the process), while a convolution's workspace is
taken from the caching allocator for the call only. Whether that pays on a GPU is for
``benchmarks/gpu_checks.sh`` to measure (``--conv-products``). On a GPU the convolutions
follow cuDNN's precision settings (TF32 allowed by default on Ampere and later, as for the
network's own convolutions); BLAS keeps float32 products."""

CPU_ONLY_SWITCHES: tuple[tuple[str, str], ...] = (
    ("rch.stats", "COMPACT_ON"),
    ("rch.stats", "BINCOUNT_ON"),
    ("rch.stats", "SORTED_SUMS_ON"),
    ("rch.stats", "BLOCKED_PREDICTION_ON"),
    ("rch._fused", "BLAS_IN_BACKWARD_ON"),
)
"""(module, name) of every device switch that is on for the CPU only: emptied, they make the
CPU run the code paths a GPU runs (the tests' ``use_gpu_path``, the benchmarks' ``gpu_path``;
a test checks that the list is complete)."""

BAG_INDEX_BYTES = 1 << 21
"""The bag of the K prototype rows per pixel reads an index of K entries per pixel: it runs
over sub-blocks whose index stays within this many bytes."""


def _term_grads(scale: Tensor, shifted: Tensor, total: Tensor) -> tuple[Tensor, Tensor]:
    """One cross-entropy term's gradient in its logits, ``softmax(z) - onehot``, scaled per
    pixel by ``scale``: ``(d_true, d_other)``, with ``d z_true = d_true`` and ``d z_j =
    E_j d_other`` off the true class (``E`` the shifted exponentials of the logits,
    ``shifted`` the true class's with its margin, ``total`` their sum)."""
    d_other = scale / total
    return shifted * d_other - scale, d_other


def _as_image(rows: Tensor, shape: torch.Size) -> Tensor:
    """``(N, C)`` pixel rows in the order of :func:`rch.stats.flatten_pixels` as a ``(B, C, h,
    w)`` channels-last view (``shape``: the embeddings' ``(B, D, h, w)``)."""
    b, _, h, w = shape
    return rows.view(b, h, w, rows.shape[1]).permute(0, 3, 1, 2)


def _cosine_products(units: Tensor, proto_units: Tensor, shape: torch.Size) -> Tensor:
    """``units @ proto_units.T``, ``(N, K)`` and fresh, as a 1x1 convolution on the devices of
    :data:`CONV_PRODUCTS_ON`."""
    if units.device.type not in CONV_PRODUCTS_ON:
        return units @ proto_units.T
    out = F.conv2d(_as_image(units, shape), proto_units[:, :, None, None])
    return out.permute(0, 2, 3, 1).reshape(units.shape[0], -1)


def _class_products(d_cos: Tensor, units: Tensor, shape: torch.Size, out: Tensor) -> None:
    """``out = d_cos.T @ units`` (``(K, D)``), as the weight gradient of a 1x1 convolution on
    the devices of :data:`CONV_PRODUCTS_ON`."""
    if units.device.type not in CONV_PRODUCTS_ON:
        torch.mm(d_cos.T, units, out=out)
        return
    size = (d_cos.shape[1], units.shape[1], 1, 1)
    grad = conv2d_weight(_as_image(units, shape), size, _as_image(d_cos, shape))
    out.copy_(grad.reshape(out.shape))


def _cosine_grad(
    exps: Tensor, target: Tensor, tau: float, d_true: Tensor, d_other: Tensor, out: Tensor
) -> Tensor:
    """``d cos`` of the terms' summed ``(d_true, d_other)`` (see :func:`_term_grads`),
    written into ``out`` (``(N, K)``)."""
    torch.mul(exps, (d_other / tau).unsqueeze(1), out=out)
    return out.scatter_(1, target, (d_true / tau).unsqueeze(1))


class _Blocks:
    """Row blocks of an ``(N, D)`` tensor and one cache-sized scratch buffer reused by all.

    A gather ``table[index]`` is written block by block into the buffer and consumed at
    once, so no ``(N, D)`` temporary is ever allocated and the gathered rows never leave
    the cache. The buffer holds ``count`` rows per pixel, for gathers from tables that
    stack ``count`` rows per bin; the block size keeps it within :data:`CHUNK_BYTES` on a
    CPU (a larger one is a fresh, page-faulting allocation on every call) and within
    :data:`DEVICE_CHUNK_BYTES` elsewhere.
    """

    def __init__(self, like: Tensor, count: int = 1) -> None:
        n, d = like.shape
        count = max(count, 1)
        budget = CHUNK_BYTES if like.device.type == "cpu" else DEVICE_CHUNK_BYTES
        rows = max(64, budget // max(1, count * d * like.element_size()))
        self.size = min(rows, max(n, 1))  # never more rows than there are
        self.slices = [slice(i, min(i + self.size, n)) for i in range(0, n, self.size)]
        self.buffer = like.new_empty(self.size, count, d)

    def rows(self, n: int) -> Tensor:
        """The buffer's first ``n * D`` entries as a contiguous ``(n, D)`` block."""
        d = self.buffer.shape[2]
        return self.buffer.view(-1)[: n * d].view(n, d)

    def gather(self, table: Tensor, index: Tensor, part: slice) -> Tensor:
        """Rows ``table[index[part]]``; ``table`` is ``(bins, D)`` or ``(bins, count * D)``."""
        n = part.stop - part.start
        out = (
            self.rows(n) if table.shape[1] == self.buffer.shape[2] else self.buffer[:n].view(n, -1)
        )
        return torch.index_select(table, 0, index[part], out=out)


def _dot_rows(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise dot product of two cache-sized ``(n, D)`` blocks."""
    out: Tensor = torch.linalg.vecdot(a, b)
    return out


def _unit_factors(norms: Tensor) -> tuple[Tensor, Tensor]:
    """Per row of ``u = x / s``, ``s = |x| + eps``: ``1 / s`` and ``1 / |x|`` (0 for a zero
    row), the factors of :func:`_unit_backward_`, made once for all rows."""
    tiny = torch.finfo(norms.dtype).tiny  # 1 / tiny is finite
    inv_norms = torch.where(norms > 0, norms.clamp_min(tiny).reciprocal(), 0.0)
    return (norms + EPS).reciprocal(), inv_norms


def _unit_backward_(
    grad: Tensor,
    units: Tensor,
    factors: tuple[Tensor, Tensor],
    dot_extra: Tensor | None = None,
) -> Tensor:
    """Gradient through ``u = x / (|x| + eps)``, computed in place in ``grad`` and returned.

    ``dx = du / s - u (u . du) / |x|`` with ``s = |x| + eps``; for a zero row (``u = 0``) it
    is ``du / s``. ``factors``: the rows' ``(1 / s, 1 / |x|)`` (:func:`_unit_factors`).
    ``dot_extra`` (per row) is added to ``u . du``: the map is linear in ``du``, so the part
    of ``du`` whose product with ``u`` is already known can be added after the call, as
    ``part / s``, with its product passed here.
    """
    inv_denom, inv_norms = factors
    dot = _dot_rows(units, grad)
    if dot_extra is not None:
        dot += dot_extra
    grad.mul_(inv_denom.unsqueeze(1))
    return grad.addcmul_(units, (dot * inv_norms).unsqueeze(1), value=-1.0)


def _bag(rows: Tensor, index: Tensor, weights: Tensor | None, offsets: Tensor) -> Tensor:
    """``out[i] = sum_j weights[i, j] rows[index[i, j]]`` for contiguous ``(n, w)`` ``index``
    and ``weights`` (``None``: all 1): one ``embedding_bag`` over their flat views.
    ``offsets`` (``0, w, 2w, ...``, at least ``n`` of them) is made once by the caller; the
    2-D form of ``embedding_bag`` makes it again at every call."""
    flat_weights = None if weights is None else weights.reshape(-1)
    bags = offsets[: index.shape[0]]
    return F.embedding_bag(
        index.reshape(-1), rows, bags, mode="sum", per_sample_weights=flat_weights
    )


def _offsets(rows: int, index: Tensor) -> Tensor:
    """The offsets of :func:`_bag` for up to ``rows`` bags of ``index``'s width, in its
    dtype (``embedding_bag`` takes int32 or int64 indices and offsets of the same dtype)."""
    width = index.shape[1]
    return torch.arange(0, rows * width, width, dtype=index.dtype, device=index.device)


class _PaperLoss(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: FunctionCtx, embeddings: Tensor, prototypes: Tensor, plan: PaperPlan
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        sets, k = plan.sets, prototypes.shape[0]
        # the flat rows are made here, not by the caller, so that nothing else holds them
        rows = flatten_pixels(embeddings, plan.dtype)
        norms = torch.linalg.vector_norm(rows, dim=1)
        present, counts = None, None
        members = None if plan.members is None else torch.where(plan.members, sets.label, k)
        if members is None:
            protos = prototypes.clone()  # an output of its own, not the input
        else:
            # the member rows' per-class sums; the spare bin k takes the non-members
            sums, int_counts = segment_sum(rows, members, k)
            counts = int_counts.to(rows.dtype)
            if world_size(plan.group) > 1:
                pooled = torch.cat([sums, counts.unsqueeze(1)], 1)
                dist.all_reduce(pooled, group=plan.group)
                sums, counts = pooled[:, :-1], pooled[:, -1].round()
            present = counts > 0
            protos = ema_update(prototypes, sums, counts, plan.momentum)
        denom = (norms + EPS).unsqueeze(1)
        # the raw rows are not needed past this point: when they are a copy made here (a cast
        # under AMP, or the reordering into rows), they become the unit rows in place, so the
        # forward pass never holds two (N, D) tensors
        own = rows.untyped_storage().data_ptr() != embeddings.untyped_storage().data_ptr()
        units = rows.div_(denom) if own else torch.div(rows, denom)
        del rows
        proto_norms = torch.linalg.vector_norm(protos, dim=1)
        proto_units = protos / (proto_norms + EPS).unsqueeze(1)
        cosines = _cosine_products(units, proto_units, embeddings.shape)

        bins = plan.num_images * k
        first_bin = sets.image * k  # each image's bin of class 0
        anchor = torch.where(sets.valid, first_bin + sets.label, bins)
        # each misclassified pixel is an FN of (image, label) and an FP of (image, prediction);
        # every other pixel is indexed to the spare bin, whose count is zeroed below
        errors = {
            name: torch.where(sets.wrong, first_bin + cls, bins)
            for name, on, cls in (("fn", plan.fn_term, sets.label), ("fp", plan.fp_term, sets.pred))
            if on
        }
        del first_bin
        # the misclassified rows, for the backward pass; on a GPU all rows (the others read the
        # spare bin): the compaction would read the count back to the host, a synchronisation
        wrong = sets.wrong.nonzero().squeeze(1) if units.device.type in stats.COMPACT_ON else None
        # the FN and FP centres side by side, (bins + 1, T, D): both are read at the anchor's
        # own bin, so one gather serves the two; the spare bin stays zero with size zero
        names = list(errors)
        sizes = units.new_zeros(bins + 1, len(names))
        table = units.new_zeros(bins + 1, len(names), units.shape[1]) if names else None
        if table is not None and units.device.type in stats.SORTED_SUMS_ON:
            for j, name in enumerate(names):
                centre_sums, centre_sizes = segment_sum(units, errors[name], bins)
                sizes[:bins, j] = centre_sizes
                table[:bins, j] = centre_sums
        elif table is not None:
            # scattered straight into the table, as segment_sum scatters on such a device, and
            # the spare bin cleared after: two operators a term, not seven
            ones = units.new_ones(units.shape[0])
            for j, name in enumerate(names):
                sizes[:, j].index_add_(0, errors[name], ones)
                table[:, j].index_add_(0, errors[name], units)
            sizes[bins] = 0
            table[bins] = 0
            del ones
        has = sizes[anchor] > 0  # (N, T)
        dots = units.new_empty(units.shape[0], len(names))
        if table is not None:
            table.div_(sizes.clamp_min(1).unsqueeze(2))
            flat_table = table.view(bins + 1, -1)
            blocks = _Blocks(units, len(names))  # scratch only where there is a gather
            for part in blocks.slices:
                n = part.stop - part.start
                # in place in the scratch block, then summed: no temporary of the products
                gathered = blocks.gather(flat_table, anchor, part).view(n, len(names), -1)
                torch.sum(gathered.mul_(units[part].unsqueeze(1)), 2, out=dots[part])
                del gathered
            del blocks  # its scratch block is not held through the rest of the pass
        margins: dict[str, Tensor | None] = {"fn": None, "fp": None}
        for j, name in enumerate(names):  # FN compensation 1 - dot, FP penalty 1 + dot
            shift = 1.0 - dots[:, j] if name == "fn" else 1.0 + dots[:, j]
            margins[name] = plan.weight * torch.where(has[:, j], shift, 0.0)

        # Both cross-entropies from one exponential: the margins only lower the true-class
        # logit (m >= 0), so with E = exp(cos / tau - max) and S_other the sum of E off the
        # true class, lse(z) = max + log(S_other + E_y exp(-m)).
        logits = cosines.div_(plan.tau)
        true_logit = logits.gather(1, plan.target[:, None]).squeeze(1)
        peak = logits.amax(1)
        exps = logits.sub_(peak[:, None]).exp_()
        exp_true = exps.gather(1, plan.target[:, None]).squeeze(1)
        exp_other = (exps.sum(1) - exp_true).clamp_min(0)
        valid = plan.anchors
        n_valid = valid.sum().clamp_min(1)  # a tensor: no host synchronisation
        lead = true_logit - peak
        losses, totals, shifts = [], [], []
        for name in ("fn", "fp"):
            margin = margins[name]
            shifted = exp_true if margin is None else exp_true * torch.exp(-margin)
            total = exp_other + shifted
            nll = torch.log(total) - lead
            if margin is not None:
                nll = nll + margin
            losses.append(torch.where(valid, nll, 0.0).sum() / n_valid)
            totals.append(total)
            shifts.append(shifted)
        del margins, lead, margin  # the backward pass reads the shifted exponentials instead
        # what the backward pass needs of each term: its shifted true-class exponential and
        # total, or (below, on a GPU) its logits' gradient per unit of its output's
        per_term = [(shifts[j], totals[j]) for j in range(2)]
        products = torch.empty(0)
        if units.device.type not in BLAS_IN_BACKWARD_ON and plan.backward:
            # the prototypes' product of each term, per unit of its output's gradient: here, on
            # the thread that runs the network, not on the autograd engine's
            scale = valid.to(units.dtype) / n_valid
            products = units.new_empty(2, k, units.shape[1])
            d_cos = torch.empty_like(exps)
            for j in range(2):
                per_term[j] = _term_grads(scale, shifts[j], totals[j])
                _cosine_grad(exps, plan.target[:, None], plan.tau, *per_term[j], out=d_cos)
                _class_products(d_cos, units, embeddings.shape, products[j])
            del d_cos
        ctx.plan = plan  # type: ignore[attr-defined]
        ctx.names = names  # type: ignore[attr-defined]
        ctx.table = table  # type: ignore[attr-defined]
        ctx.sizes = sizes  # type: ignore[attr-defined]
        ctx.errors = [errors[name] for name in names]  # type: ignore[attr-defined]
        ctx.has = has  # type: ignore[attr-defined]
        ctx.dots = dots  # type: ignore[attr-defined]
        ctx.all_rows = wrong is None  # type: ignore[attr-defined]
        ctx.members = members  # type: ignore[attr-defined]
        ctx.embedded = embeddings.shape  # type: ignore[attr-defined]
        ctx.save_for_backward(
            wrong if wrong is not None else torch.empty(0, dtype=torch.int64),
            units,
            norms,
            proto_units,
            proto_norms,
            anchor,
            exps,
            *per_term[0],
            *per_term[1],
            present if present is not None else torch.empty(0),
            counts if counts is not None else torch.empty(0),
            n_valid,
            products,
        )
        updated = present if present is not None else units.new_zeros(k, dtype=torch.bool)
        ctx.mark_non_differentiable(updated)
        return losses[0], losses[1], protos, updated

    @staticmethod
    @once_differentiable
    def backward(
        ctx: Any, g_fn: Tensor, g_fp: Tensor, g_protos: Tensor, _g_updated: Tensor | None
    ) -> tuple[Tensor | None, Tensor | None, None]:
        (
            wrong,
            units,
            norms,
            proto_units,
            proto_norms,
            anchor,
            exps,
            first_fn,
            second_fn,
            first_fp,
            second_fp,
            present,
            counts,
            n_valid,
            products,
        ) = ctx.saved_tensors
        plan: PaperPlan = ctx.plan
        bagged = products.numel() > 0  # no BLAS here: see BLAS_IN_BACKWARD_ON
        if bagged:  # each term's (d_true, d_other) per unit of its gradient, from the forward
            d_true = [g_fn * first_fn, g_fp * first_fp]
            d_other = g_fn * second_fn + g_fp * second_fp
        else:  # each term's (shifted, total)
            weight = plan.anchors.to(units.dtype) / n_valid
            terms = [
                _term_grads(weight * g, shifted, total)
                for g, shifted, total in ((g_fn, first_fn, second_fn), (g_fp, first_fp, second_fp))
            ]
            d_true = [term[0] for term in terms]
            d_other = terms[0][1] + terms[1][1]
        d_cos = _cosine_grad(
            exps,
            plan.target[:, None],
            plan.tau,
            d_true[0] + d_true[1],
            d_other,
            out=torch.empty_like(exps),
        )
        if bagged:
            d_proto_units = g_fn * products[0] + g_fp * products[1]
            d_units = torch.empty_like(units)  # the prototypes' bag, block by block below
        else:
            d_units = d_cos @ proto_units
            d_proto_units = d_cos.T @ units
        # the prototypes' gradient first: the pass below adds the gradient of the TP sums
        d_protos = _unit_backward_(d_proto_units, proto_units, _unit_factors(proto_norms))
        d_protos = d_protos + g_protos
        d_prototypes, padded, members = d_protos, None, ctx.members
        if members is not None:
            rho = plan.momentum
            if isinstance(rho, Tensor):
                rho = rho.to(units.dtype).unsqueeze(1)
            mask = present.unsqueeze(1)
            d_sums = torch.where(mask, d_protos * (1 - rho) / counts.clamp_min(1).unsqueeze(1), 0.0)
            if world_size(plan.group) > 1:
                dist.all_reduce(d_sums, group=plan.group)
            d_prototypes = torch.where(mask, 0.0, d_protos)  # old prototypes enter detached
            padded = torch.cat([d_sums, d_sums.new_zeros(1, d_sums.shape[1])])
        # one pass, block by block, in place in dU: the normalisation's backward, then one
        # weighted bag per pixel of the rows that join the gradient after it (the anchor's T
        # centres, weighted d dot / s; the TP-sum gradient of its class, weighted 1), and the
        # weighted sums of anchors that flow back into the pixels that formed each centre.
        # The centres go through the normalisation too; the map is linear, and their product
        # with the pixel's unit row is the forward pass's dot, so it enters as dot_extra.
        # Whatever is per row and not per block (the normalisation's factors, the bag's
        # indices and weights: (N, T + 1) each) is made once, not at every block: on a GPU
        # each operator is a kernel launch however few rows it has.
        names, table, sizes, has = ctx.names, ctx.table, ctx.sizes, ctx.has
        t = len(names)
        blocks = _Blocks(units, t)
        factors = _unit_factors(norms)
        # the bag's table: the T centres of bin b in rows b*T ... b*T+T-1, then the TP-sum
        # gradient of class c in row (bins + 1) * T + c
        sources: list[Tensor] = []
        indices: list[Tensor] = []
        weights: list[Tensor] = []
        d_dot, centre_dots, back = None, None, None
        if table is not None:
            # margin = w (1 + sign dot), z_true -= margin  =>  d dot = -w sign d z_true
            signed = {"fn": plan.weight * d_true[0], "fp": -plan.weight * d_true[1]}
            d_dot = torch.stack([signed[name] for name in names], 1).where(has, 0.0)
            centre_dots = (d_dot * ctx.dots).sum(1)
            back = units.new_zeros(table.shape[0], t * units.shape[1])
            sources.append(table.view(-1, units.shape[1]))
            column = torch.arange(t, dtype=torch.int32, device=anchor.device)
            indices.append(anchor.to(torch.int32).unsqueeze(1) * t + column)
            weights.append(d_dot * factors[0].unsqueeze(1))
        if padded is not None and members is not None:  # class rows of the TP-sum gradient
            offset = sources[0].shape[0] if sources else 0
            indices.append((members.to(torch.int32) + offset).unsqueeze(1))
            weights.append(units.new_ones(units.shape[0], 1))
            sources.append(padded)
        bag_rows = torch.cat(sources) if sources else None
        bag_index = torch.cat(indices, 1) if indices else None
        bag_weights = torch.cat(weights, 1) if weights else None
        del indices, weights
        offsets = None if bag_index is None else _offsets(blocks.size, bag_index)
        # the prototypes' bag index, K entries a row, and its offsets, made once for all blocks
        classes: tuple[Tensor, Tensor] | None = None
        if bagged:
            k = proto_units.shape[0]
            per_bag = min(max(1, BAG_INDEX_BYTES // (k * 8)), blocks.size)
            rows_of_classes = torch.arange(k, dtype=torch.int32, device=units.device)
            rows_of_classes = rows_of_classes.repeat(per_bag, 1)
            classes = (rows_of_classes, _offsets(per_bag, rows_of_classes))
        # each block's temporaries are freed within its statement, before the next is made
        for part in blocks.slices:
            n = part.stop - part.start
            if classes is not None:  # the embeddings' gradient through the cosines, as a bag
                _bag_prototypes(proto_units, d_cos[part], *classes, out=d_units[part])
            extra = None if centre_dots is None else centre_dots[part]
            rows_factors = (factors[0][part], factors[1][part])
            du = _unit_backward_(d_units[part], units[part], rows_factors, extra)
            if bag_rows is not None and bag_index is not None and offsets is not None:
                bag_part = None if bag_weights is None else bag_weights[part]
                du += _bag(bag_rows, bag_index[part], bag_part, offsets)
            if back is not None and d_dot is not None:
                spread = torch.mul(
                    units[part].unsqueeze(1), d_dot[part].unsqueeze(2), out=blocks.buffer[:n]
                )
                back.index_add_(0, anchor[part], spread.view(n, -1))
        del bag_rows, bag_index, bag_weights
        if back is not None and table is not None:
            back = back.view(table.shape[0], t, -1)
            back /= sizes.clamp_min(1).unsqueeze(2)  # the spare bin has size 0 and stays 0
            # the centres' own gradient, into the misclassified pixels that formed them, through
            # the unit normalisation of those pixels
            for part in blocks.slices if ctx.all_rows else ():  # every row, as in the forward
                # pass: the correctly classified ones read the spare bin, which stays zero; the
                # block is gathered into the scratch buffer (a bag, one operator fewer, would
                # be a fresh block on top of the backward pass's peak)
                block = blocks.gather(back[:, 0], ctx.errors[0], part)
                for j in range(1, t):
                    block += back[:, j].index_select(0, ctx.errors[j][part])
                rows_factors = (factors[0][part], factors[1][part])
                d_units[part].add_(_unit_backward_(block, units[part], rows_factors))
            for start in range(0, wrong.shape[0], blocks.size) if not ctx.all_rows else ():
                rows_at = wrong[start : start + blocks.size]
                n = rows_at.shape[0]
                block = blocks.gather(back[:, 0], ctx.errors[0][rows_at], slice(0, n))
                for j in range(1, t):
                    block += back[:, j].index_select(0, ctx.errors[j][rows_at])
                rows_factors = (factors[0][rows_at], factors[1][rows_at])
                _unit_backward_(block, units.index_select(0, rows_at), rows_factors)
                d_units.index_add_(0, rows_at, block)
        need_rows, need_protos = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        d_embeddings = None
        if need_rows:  # back to (B, D, h, w), as the backward of flatten_pixels gives it
            # in the loss's dtype: autograd casts it to the embeddings' own (under AMP)
            d_embeddings = _as_image(d_units, ctx.embedded)
        return d_embeddings, (d_prototypes if need_protos else None), None


def _bag_prototypes(
    proto_units: Tensor, d_cos: Tensor, classes: Tensor, offsets: Tensor, out: Tensor
) -> None:
    """``out = d_cos @ proto_units`` without BLAS: per row, the K prototype rows weighted by
    that row's ``d cos`` (an ``embedding_bag``), in sub-blocks of as many rows as ``classes``
    (``(rows, K)``, each row ``0 ... K-1``; see :data:`BAG_INDEX_BYTES`) has, each written
    into its rows of ``out``; ``offsets``: :func:`_offsets` for them."""
    n, rows = d_cos.shape[0], classes.shape[0]
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        out[start:stop] = _bag(proto_units, classes[: stop - start], d_cos[start:stop], offsets)


def fused_paper_loss(
    embeddings: Tensor, prototypes: Tensor, plan: PaperPlan
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(loss_fn, loss_fp, prototypes, updated)`` of the paper formulation.

    Args:
        embeddings: ``(B, D, h, w)`` raw embeddings; their ``N = B h w`` pixels, in the order
            of :func:`rch.stats.flatten_pixels`, are the plan's pixels.
        prototypes: ``(K, D)`` prototypes before the step.
        plan: the non-differentiable description of the step.
    """
    wanted = embeddings.requires_grad or prototypes.requires_grad
    plan = replace(plan, backward=torch.is_grad_enabled() and wanted)
    loss_fn, loss_fp, protos, updated = _PaperLoss.apply(embeddings, prototypes, plan)
    return loss_fn, loss_fp, protos, updated
