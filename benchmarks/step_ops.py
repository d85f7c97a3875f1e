"""How many operators RCH adds to a training step, as a GPU runs it.

On a GPU every operator that computes something is a kernel launch: host time to launch it,
and a few microseconds of GPU time however small its tensors are. RCH works on small
tensors (a few thousand to a few tens of thousands of pixels), so what it adds to a step is
largely set by how many operators it runs. This script counts them without a GPU: one
training step of each variant (the parts of ``train_cost.train_step``: forward pass and
losses, backward pass, optimiser step) runs on the CPU with the loss's device switches set
as on a GPU (``_common.gpu_path``: the same code paths and row blocks), under a dispatch
mode that records every ATen operator.

Counted per phase: ``ops``, every operator that is not a view; ``launches``, those that
start a kernel on a GPU (not the allocations ``empty*`` nor ``scalar_tensor``, a CPU
scalar); ``reads``, the values read back to the host (``_local_scalar_dense``: ``.item()``,
``bool(t)``, ``int(t)``; on a GPU each one waits for the queue to drain). The variants: the
baseline, RCH with the value checks read at once (``rch.validate=true``), without them
(``false``) and with them deferred (``deferred``, the trainer's default: read between the
backward pass and the optimiser step, as the trainer does, where the GPU has passed them
already). Each variant's second step is counted (the first fills the
caches). Default: the paper's crop, 512x1024, batch 2, under bfloat16 autocast (a GPU runs
float16: the same casts). Prints a table and writes JSON with every operator's count.

With ``--device cuda`` (and ``--amp fp16``) the steps run on the GPU itself, and the
profiler also counts the CUDA kernels (and memory copies and sets) each phase ran
(``kernels``): how far the operator count stands for what a GPU does. It also measures how
long the GPU ran them (``gpu_ms``, the union of their spans): what RCH adds to that
(``added_gpu_ms``) is the GPU time of its kernels, the least it can add to a step. (The
counting slows the host, so the step's own time means nothing here; the kernels' times
do not change.) Against ``train_cost.py``'s difference in step time it tells GPU work from
idle waiting.

Run: ``python benchmarks/step_ops.py [--quick] [--networks ...] [--device cuda --amp fp16]
[--out ...]``
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch.profiler import DeviceType, ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import gpu_path, run_meta, write_results
from train_cost import NETWORKS, amp_dtype, batch, build, train_step

NO_KERNEL = frozenset(
    {"empty", "empty_like", "new_empty", "empty_strided", "new_empty_strided", "scalar_tensor"}
)
"""Operators that allocate or wrap a host scalar: no kernel launch on a GPU."""

READS = frozenset({"_local_scalar_dense"})
"""Operators that read a value back to the host."""

VARIANTS: dict[str, tuple[bool, bool | str]] = {
    "baseline": (False, True),
    "rch": (True, True),
    "rch, no checks": (True, False),
    "rch, deferred checks": (True, "deferred"),
}
"""Variant: (RCH attached, ``rch.validate``)."""


class OpCounter(TorchDispatchMode):
    """Counts the ATen operators that run under it, views excepted, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if not func.is_view:
            self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def summary(ops: Counter[str]) -> dict[str, int]:
    """``ops``, ``launches`` and ``reads`` of one phase's counts."""
    total = sum(ops.values())
    idle = sum(n for name, n in ops.items() if name in NO_KERNEL)
    return {
        "ops": total,
        "launches": total - idle,
        "reads": sum(n for name, n in ops.items() if name in READS),
    }


PHASES = ("forward", "backward", "optimizer")


def busy_us(spans: Iterable[tuple[float, float]]) -> float:
    """How long at least one of the ``(start, end)`` spans runs: the length of their union.

    >>> busy_us([(0, 2), (1, 3), (5, 6)])
    4.0
    >>> busy_us([])
    0.0
    """
    total, reach = 0.0, float("-inf")
    for start, end in sorted(spans):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def gpu_activity(events: Iterable[Any]) -> tuple[int, float]:
    """The CUDA activities (kernels, memory copies and sets) among a profile's events: how
    many, and how many milliseconds the GPU was running at least one of them."""
    spans = [
        (e.time_range.start, e.time_range.end) for e in events if e.device_type == DeviceType.CUDA
    ]
    return len(spans), busy_us(spans) / 1000


@contextlib.contextmanager
def cuda_kernels(device: str, counts: dict[str, tuple[int, float]], phase: str) -> Iterator[None]:
    """On CUDA, record into ``counts[phase]`` the GPU activities that run inside the block
    (``gpu_activity``), the queue drained at its end; elsewhere nothing."""
    if device != "cuda":
        yield
        return
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        yield
        torch.cuda.synchronize()
    counts[phase] = gpu_activity(prof.events())


def count_step(
    name: str, rch: bool, validate: bool | str, args: argparse.Namespace
) -> dict[str, Any]:
    """Per phase, the operators (and on CUDA the kernels) of one training step (the second)
    of one variant."""
    cfg, net, opt = build(name, rch, args.crop, args.amp, args.device, validate)
    for group in opt.param_groups:  # as on a GPU, where it is the default: one op per update
        group["foreach"] = True
    x, y = batch(args, args.device)
    amp = amp_dtype(args.amp)
    phases: dict[str, Counter[str]] = {}
    kernels: dict[str, tuple[int, float]] = {}
    for step in range(2):
        counters = {phase: OpCounter() for phase in PHASES}

        @contextlib.contextmanager
        def counted(phase: str, counters: dict[str, OpCounter] = counters) -> Iterator[None]:
            with cuda_kernels(args.device, kernels, phase), counters[phase]:
                yield

        train_step(cfg, net, opt, x, y, amp, counted)
        if step == 1:
            phases = {phase: counter.ops for phase, counter in counters.items()}
    total: Counter[str] = sum(phases.values(), Counter())
    row: dict[str, Any] = {phase: summary(ops) for phase, ops in phases.items()}
    row["step"] = summary(total)
    for phase, (n, busy) in kernels.items():
        row[phase]["kernels"], row[phase]["gpu_ms"] = n, busy
    if kernels:
        row["step"]["kernels"] = sum(n for n, _ in kernels.values())
        row["step"]["gpu_ms"] = sum(busy for _, busy in kernels.values())
    row["by_operator"] = {phase: dict(ops.most_common()) for phase, ops in phases.items()}
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--networks", nargs="+", default=list(NETWORKS))
    parser.add_argument("--crop", type=int, nargs=2, default=[512, 1024])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--amp", default="bf16", choices=["none", "bf16", "fp16"])
    parser.add_argument(
        "--device", default="cpu", choices=["cpu", "cuda"], help="cpu: the GPU's code path"
    )
    parser.add_argument("--quick", action="store_true", help="a 64x64 crop (a smoke run)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/step_ops.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.crop = [64, 64]
    print(
        f"{'network':<20} {'variant':<20} {'forward':>8} {'backward':>9} {'optimizer':>10} "
        f"{'launches':>9} {'added':>6} {'reads':>6}"
        + (f" {'kernels':>8} {'GPU ms':>7} {'added':>6}" if args.device == "cuda" else "")
    )
    results: dict[str, dict[str, Any]] = {}
    with gpu_path() if args.device == "cpu" else contextlib.nullcontext():
        for name in args.networks:
            results[name] = rows = {}
            for variant, (rch, validate) in VARIANTS.items():
                rows[variant] = row = count_step(name, rch, validate, args)
                base = rows["baseline"]["step"]["launches"]
                row["added_launches"] = row["step"]["launches"] - base
                gpu = "gpu_ms" in row["step"]
                if gpu:
                    row["added_gpu_ms"] = row["step"]["gpu_ms"] - rows["baseline"]["step"]["gpu_ms"]
                print(
                    f"{name:<20} {variant:<20} "
                    + " ".join(
                        f"{row[phase]['launches']:{width}d}"
                        for phase, width in (("forward", 8), ("backward", 9), ("optimizer", 10))
                    )
                    + f" {row['step']['launches']:9d} {row['added_launches']:6d}"
                    f" {row['step']['reads']:6d}"
                    + (
                        f" {row['step']['kernels']:8d} {row['step']['gpu_ms']:7.2f}"
                        f" {row['added_gpu_ms']:6.2f}"
                        if gpu
                        else ""
                    ),
                    flush=True,
                )
    device = "cpu (GPU code path)" if args.device == "cpu" else args.device
    meta = run_meta(argv, device=device, amp=args.amp, crop=args.crop, batch=args.batch)
    write_results(args.out, {"meta": meta, "results": results})
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
