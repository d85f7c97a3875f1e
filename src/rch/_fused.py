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

BAG_INDEX_BYTES = 1 << 21
"""The bag of the K prototype rows per pixel reads an index of K entries per pixel: it runs
over sub-blocks whose index stays within this many bytes."""


def _term_grads(
    scale: Tensor, exp_true: Tensor, total: Tensor, margin: Tensor | None
) -> tuple[Tensor, Tensor]:
    """One cross-entropy term's gradient in its logits, ``softmax(z) - onehot``, scaled per
    pixel by ``scale``: ``(d_true, d_other)``, with ``d z_true = d_true`` and ``d z_j =
    E_j d_other`` off the true class (``E`` the shifted exponentials of the logits)."""
    shifted = exp_true if margin is None else exp_true * torch.exp(-margin)
    return scale * (shifted / total - 1), scale / total


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


def _unit_backward_(
    grad: Tensor, units: Tensor, norms: Tensor, dot_extra: Tensor | None = None
) -> Tensor:
    """Gradient through ``u = x / (|x| + eps)``, computed in place in ``grad`` and returned.

    ``dx = (du - u (u . du) s / |x|) / s`` with ``s = |x| + eps``; for a zero row
    (``u = 0``) it is ``du / s``. ``dot_extra`` (per row) is added to ``u . du``: the map is
    linear in ``du``, so the part of ``du`` whose product with ``u`` is already known can be
    added after the call, as ``part / s``, with its product passed here.
    """
    denom = norms + EPS
    ratio = torch.where(norms > 0, denom / norms.clamp_min(torch.finfo(norms.dtype).tiny), 0.0)
    dot = _dot_rows(units, grad)
    if dot_extra is not None:
        dot += dot_extra
    grad.addcmul_(units, (dot * ratio).unsqueeze(1), value=-1.0)
    return grad.div_(denom.unsqueeze(1))


class _PaperLoss(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: FunctionCtx, embeddings: Tensor, prototypes: Tensor, plan: PaperPlan
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        sets, k = plan.sets, prototypes.shape[0]
        # the flat rows are made here, not by the caller, so that nothing else holds them
        rows = flatten_pixels(embeddings, plan.dtype)
        norms = torch.linalg.vector_norm(rows, dim=1)
        protos, present, counts = prototypes.clone(), None, None
        members = None if plan.members is None else torch.where(plan.members, sets.label, k)
        if members is not None:
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
        cosines = units @ proto_units.T

        bins = plan.num_images * k
        anchor = torch.where(sets.valid, sets.image * k + sets.label, bins)
        # each misclassified pixel is an FN of (image, label) and an FP of (image, prediction);
        # every other pixel is indexed to the spare bin, whose count is zeroed below
        errors = {
            name: torch.where(sets.wrong, sets.image * k + cls, bins)
            for name, on, cls in (("fn", plan.fn_term, sets.label), ("fp", plan.fp_term, sets.pred))
            if on
        }
        # the misclassified rows, for the backward pass; on a GPU all rows (the others read the
        # spare bin): the compaction would read the count back to the host, a synchronisation
        wrong = sets.wrong.nonzero().squeeze(1) if units.device.type in stats.COMPACT_ON else None
        # the FN and FP centres side by side, (bins + 1, T, D): both are read at the anchor's
        # own bin, so one gather serves the two; the spare bin stays zero with size zero
        names = list(errors)
        sizes = units.new_zeros(bins + 1, len(names))
        table = units.new_zeros(bins + 1, len(names), units.shape[1]) if names else None
        for j, name in enumerate(names):
            centre_sums, centre_sizes = segment_sum(units, errors[name], bins)
            sizes[:bins, j] = centre_sizes
            if table is not None:
                table[:bins, j] = centre_sums
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
        for j, name in enumerate(names):
            sign = -1.0 if name == "fn" else 1.0
            margins[name] = plan.weight * torch.where(has[:, j], 1.0 + sign * dots[:, j], 0.0)

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
        losses, totals = [], []
        for name in ("fn", "fp"):
            margin = margins[name]
            shifted = exp_true if margin is None else exp_true * torch.exp(-margin)
            total = exp_other + shifted
            nll = torch.log(total) - (true_logit - peak)
            if margin is not None:
                nll = nll + margin
            losses.append(torch.where(valid, nll, 0.0).sum() / n_valid)
            totals.append(total)
        products = torch.empty(0)
        if units.device.type not in BLAS_IN_BACKWARD_ON and plan.backward:
            # the prototypes' product of each term, per unit of its output's gradient: here, on
            # the thread that runs the network, not on the autograd engine's
            scale = valid.to(units.dtype) / n_valid
            products = units.new_empty(2, k, units.shape[1])
            d_cos = torch.empty_like(exps)
            for j, name in enumerate(("fn", "fp")):
                terms = _term_grads(scale, exp_true, totals[j], margins[name])
                _cosine_grad(exps, plan.target[:, None], plan.tau, *terms, out=d_cos)
                torch.mm(d_cos.T, units, out=products[j])
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
            exp_true,
            totals[0],
            totals[1],
            margins["fn"] if margins["fn"] is not None else torch.empty(0),
            margins["fp"] if margins["fp"] is not None else torch.empty(0),
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
            exp_true,
            total_fn,
            total_fp,
            margin_fn,
            margin_fp,
            present,
            counts,
            n_valid,
            products,
        ) = ctx.saved_tensors
        plan: PaperPlan = ctx.plan
        weight = plan.anchors.to(units.dtype) / n_valid
        terms = [
            _term_grads(weight * g, exp_true, total, margin if margin.numel() else None)
            for g, total, margin in ((g_fn, total_fn, margin_fn), (g_fp, total_fp, margin_fp))
        ]
        d_true = [term[0] for term in terms]
        d_cos = _cosine_grad(
            exps,
            plan.target[:, None],
            plan.tau,
            d_true[0] + d_true[1],
            terms[0][1] + terms[1][1],
            out=torch.empty_like(exps),
        )
        bagged = products.numel() > 0  # no BLAS here: see BLAS_IN_BACKWARD_ON
        if bagged:
            d_proto_units = g_fn * products[0] + g_fp * products[1]
            d_units = torch.empty_like(units)  # the prototypes' bag, block by block below
        else:
            d_units = d_cos @ proto_units
            d_proto_units = d_cos.T @ units
        # the prototypes' gradient first: the pass below adds the gradient of the TP sums
        d_protos = _unit_backward_(d_proto_units, proto_units, proto_norms)
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
        names, table, sizes, has = ctx.names, ctx.table, ctx.sizes, ctx.has
        t = len(names)
        blocks = _Blocks(units, t)
        # the bag's table: the T centres of bin b in rows b*T ... b*T+T-1, then the TP-sum
        # gradient of class c in row (bins + 1) * T + c; its indices and weights are built
        # block by block (a whole (N, T + 1) index would weigh on the peak at small D)
        sources: list[Tensor] = []
        # with the FN/FP terms: d dot per anchor, 1 / s per row, d dot . dot per row
        centres: tuple[Tensor, Tensor, Tensor] | None = None
        back = None
        if table is not None:
            # margin = w (1 + sign dot), z_true -= margin  =>  d dot = -w sign d z_true
            signed = {"fn": plan.weight * d_true[0], "fp": -plan.weight * d_true[1]}
            d_dot = torch.stack([signed[name] for name in names], 1).where(has, 0.0)
            inv_denom = (norms + EPS).reciprocal_().unsqueeze(1)
            centres = d_dot, inv_denom, (d_dot * ctx.dots).sum(1)
            back = units.new_zeros(table.shape[0], t * units.shape[1])
            sources.append(table.view(-1, units.shape[1]))
        tp_index = members if padded is not None else None  # class rows of the TP-sum gradient
        if padded is not None:
            sources.append(padded)
        offset = sources[0].shape[0] if table is not None else 0
        bag_rows = torch.cat(sources) if sources else None
        column = torch.arange(t, device=anchor.device)
        ones = units.new_ones(blocks.size, 1)
        classes = None  # the prototypes' bag index, K entries a row, built once for all blocks
        if bagged:
            k = proto_units.shape[0]
            per_bag = min(max(1, BAG_INDEX_BYTES // (k * 8)), blocks.size)
            classes = torch.arange(k, device=units.device).repeat(per_bag, 1)
        for part in blocks.slices:
            n = part.stop - part.start
            if classes is not None:
                _bag_prototypes(d_units[part], proto_units, d_cos[part], classes)
            extra = None if centres is None else centres[2][part]
            du = _unit_backward_(d_units[part], units[part], norms[part], extra)
            if bag_rows is not None:
                index, weight = [], []
                if centres is not None:
                    index.append((anchor[part] * t).unsqueeze(1) + column)
                    weight.append(centres[0][part] * centres[1][part])
                if tp_index is not None:
                    index.append((tp_index[part] + offset).unsqueeze(1))
                    weight.append(ones[:n])
                du += F.embedding_bag(
                    torch.cat(index, 1),
                    bag_rows,
                    mode="sum",
                    per_sample_weights=torch.cat(weight, 1),
                )
            if back is not None and centres is not None:
                dd = centres[0][part]
                spread = torch.mul(units[part].unsqueeze(1), dd.unsqueeze(2), out=blocks.buffer[:n])
                back.index_add_(0, anchor[part], spread.view(n, -1))
        if back is not None and table is not None:
            back = back.view(table.shape[0], t, -1)
            back /= sizes.clamp_min(1).unsqueeze(2)  # the spare bin has size 0 and stays 0
            # the centres' own gradient, into the misclassified pixels that formed them, through
            # the unit normalisation of those pixels
            for part in blocks.slices if ctx.all_rows else ():  # every row, as in the forward
                # pass: the correctly classified ones read the spare bin, which stays zero
                block = blocks.gather(back[:, 0], ctx.errors[0], part)
                for j in range(1, t):
                    block += back[:, j].index_select(0, ctx.errors[j][part])
                d_units[part] += _unit_backward_(block, units[part], norms[part])
            for start in range(0, wrong.shape[0], blocks.size) if not ctx.all_rows else ():
                rows_at = wrong[start : start + blocks.size]
                n = rows_at.shape[0]
                block = blocks.gather(back[:, 0], ctx.errors[0][rows_at], slice(0, n))
                for j in range(1, t):
                    block += back[:, j].index_select(0, ctx.errors[j][rows_at])
                _unit_backward_(block, units.index_select(0, rows_at), norms[rows_at])
                d_units.index_add_(0, rows_at, block)
        need_rows, need_protos = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        d_embeddings = None
        if need_rows:  # back to (B, D, h, w), as the backward of flatten_pixels gives it
            b, d, h, w = ctx.embedded
            # in the loss's dtype: autograd casts it to the embeddings' own (under AMP)
            d_embeddings = d_units.view(b, h, w, d).permute(0, 3, 1, 2)
        return d_embeddings, (d_prototypes if need_protos else None), None


def _bag_prototypes(out: Tensor, proto_units: Tensor, d_cos: Tensor, classes: Tensor) -> None:
    """``out = d_cos @ proto_units`` without BLAS: per row, the K prototype rows weighted by
    that row's ``d cos`` (an ``embedding_bag``), in sub-blocks of as many rows as
    ``classes`` (``(rows, K)``, each row ``0 ... K-1``; see :data:`BAG_INDEX_BYTES`) has."""
    n, rows = d_cos.shape[0], classes.shape[0]
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        bag = F.embedding_bag(
            classes[: stop - start],
            proto_units,
            mode="sum",
            per_sample_weights=d_cos[start:stop],
        )
        out[start:stop] = bag


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
