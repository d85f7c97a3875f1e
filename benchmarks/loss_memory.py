"""What one forward+backward of the RCH loss allocates, on the CPU's path and on a GPU's.

The loss takes a different path on a GPU than on a CPU: no host synchronisation (every row
in the FN/FP passes instead of the compacted misclassified ones, scattered instead of
sorted per-class sums, no ``bincount``), no BLAS in the backward pass
(:data:`rch._fused.BLAS_IN_BACKWARD_ON`) and larger row blocks (:data:`rch._fused
.DEVICE_CHUNK_BYTES`). The bytes each path allocates do not depend on the device, so this
script measures both on the CPU: the peak of the bytes held by tensors during one step,
above what was held before it, from the profiler's allocation events. It is the quantity
``torch.cuda.max_memory_allocated`` reports on a GPU, less the inputs. The forward pass's
own peak is reported too: inside a network, the activations that the backward pass frees
are all still held during the loss's forward, so that is where a training step peaks.

Default shapes: DeepLabV3 at the paper's crop, batch 2 per GPU, under AMP (a float16
``(2, 256, 64, 128)`` embedding, float16 ``(2, 19, 512, 1024)`` logits, ``(2, 512, 1024)``
labels). Rows: the CPU path; the GPU path with its blocks; the GPU path with all pixels in
one block (``--device-chunk-bytes`` sets any other size). Prints a table and writes JSON.

Run: ``python benchmarks/loss_memory.py [--quick] [--out benchmarks/results/loss_memory.json]``
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import gpu_path, run_meta, write_results
from rch import _fused
from rch.functional import rch_loss
from rch.loss import Formulation

ONE_BLOCK = 1 << 62
"""A block budget larger than any batch: all pixels in one block."""


def make_inputs(args: argparse.Namespace) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    (h, w), (lh, lw), dtype = args.maps, args.labels, getattr(torch, args.dtype)
    emb = torch.randn(args.batch, args.dim, h, w, generator=g).to(dtype).requires_grad_()
    logits = torch.randn(args.batch, args.classes, lh, lw, generator=g).to(dtype)
    # blocky labels, like real scenes, so that the TP / FN / FP sets are realistic
    cells = torch.randint(0, args.classes, (args.batch, lh // 32 + 1, lw // 32 + 1), generator=g)
    labels = cells.repeat_interleave(32, 1).repeat_interleave(32, 2)[:, :lh, :lw].contiguous()
    protos = torch.randn(args.classes, args.dim, generator=g)
    return emb, logits, labels, protos


BACKWARD = "rch-loss-backward"
"""The profiler's label of the backward pass: the forward's peak is the peak before it."""


def step_peak(
    inputs: tuple[torch.Tensor, ...], formulation: Formulation
) -> tuple[float, float, float]:
    """(peak, forward's peak, held after) MiB of tensor bytes above the start of one
    forward+backward; the forward's peak is the one before the backward pass starts."""
    emb, logits, labels, protos = inputs

    def step() -> None:
        out = rch_loss(emb, logits, labels, protos, formulation=formulation, validate=False)
        with record_function(BACKWARD):
            out.loss.backward()
        emb.grad = None

    step()  # warm-up: lazily built state is not counted
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = list(prof.profiler.kineto_results.events())
    backward_at = min(e.start_ns() for e in events if e.name() == BACKWARD)
    memory = sorted((e for e in events if e.name() == "[memory]"), key=lambda e: e.start_ns())
    held = peak = forward_peak = 0
    for event in memory:
        held += event.nbytes()
        peak = max(peak, held)
        if event.start_ns() < backward_at:
            forward_peak = max(forward_peak, held)
    return peak / 2**20, forward_peak / 2**20, held / 2**20


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--classes", type=int, default=19)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--maps", type=int, nargs=2, default=[64, 128], help="embedding h w")
    p.add_argument("--labels", type=int, nargs=2, default=[512, 1024], help="label/logit H W")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--formulations", nargs="+", default=["paper"], choices=["paper", "official"])
    p.add_argument(
        "--device-chunk-bytes",
        type=int,
        nargs="+",
        default=[_fused.DEVICE_CHUNK_BYTES, ONE_BLOCK],
        help="block budgets of the GPU path to measure",
    )
    p.add_argument("--quick", action="store_true", help="small shapes (a smoke run)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/loss_memory.json"))
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.classes, args.dim, args.maps, args.labels = 2, 5, 16, [8, 16], [32, 64]
        args.device_chunk_bytes = [1, ONE_BLOCK]
    torch.set_num_threads(1)
    inputs = make_inputs(args)
    embedding_mib = inputs[0].numel() * 4 / 2**20
    paths: list[tuple[str, int | None]] = [("cpu", None)]  # (name, GPU path's block budget)
    for budget in args.device_chunk_bytes:
        size = f"{budget / 2**20:g} MiB" if budget >= 2**20 else f"{budget} B"
        paths.append(("gpu, one block" if budget >= ONE_BLOCK else f"gpu, {size} blocks", budget))
    print(f"embedding {tuple(inputs[0].shape)} in float32: {embedding_mib:.1f} MiB")
    print(
        f"{'formulation':<12} {'path':<22} {'peak MiB':>9} {'x embedding':>12} {'forward MiB':>12}"
    )
    rows = []
    formulations: list[Formulation] = args.formulations  # argparse's choices
    for formulation in formulations:
        for name, budget in paths:
            with contextlib.nullcontext() if budget is None else gpu_path(budget):
                peak, forward, held = step_peak(inputs, formulation)
            rows.append({"formulation": formulation, "path": name, "peak_mib": peak})
            rows[-1].update(forward_peak_mib=forward, held_after_mib=held)
            print(
                f"{formulation:<12} {name:<22} {peak:9.1f} {peak / embedding_mib:12.2f}"
                f" {forward:12.1f}"
            )
    meta = run_meta(
        argv,
        batch=args.batch,
        classes=args.classes,
        dim=args.dim,
        maps=args.maps,
        labels=args.labels,
        dtype=args.dtype,
        embedding_float32_mib=embedding_mib,
    )
    write_results(args.out, {"meta": meta, "rows": rows})
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
