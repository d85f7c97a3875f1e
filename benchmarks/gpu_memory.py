"""Where a training step's peak CUDA memory goes, baseline against RCH.

``train_cost.py`` gives each variant's peak (``torch.cuda.max_memory_allocated``); this
script says what is live at that peak. For each network it builds the baseline and the RCH
model as ``train_cost.py`` does, runs one warm-up step, then records the CUDA caching
allocator's history (``torch.cuda.memory._record_memory_history``) over two more steps.
Replaying the recorded events gives the last step's peak, the event that reached it and
every block live at that moment, grouped by where it was allocated: the innermost Python
frame outside torch (RCH's own lines by file and line), "autograd backward" for blocks that
the autograd engine's thread allocated (no Python frame), "earlier step: ..." for blocks
that the step before left live, and "held before the step" for what was allocated before
the recording (parameters, optimiser state). The table lists the groups whose bytes differ
most between the two variants. CUDA only.

Run: ``python benchmarks/gpu_memory.py [--networks deeplabv3_resnet50 hrnet_w18_ocr]
[--crop 512 1024] [--amp fp16]``
"""

from __future__ import annotations

import argparse
import gc
import sys
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import CONV_PRODUCTS_HELP, run_meta, use_conv_products, write_results
from train_cost import NETWORKS, amp_dtype, batch, build, timed, train_step

BEFORE = "held before the step"
BACKWARD = "autograd backward"
EARLIER = "earlier step: "
MIB = 2**20
TORCH_DIR = str(Path(torch.__file__).resolve().parent) + "/"


def frame_label(frames: Sequence[Mapping[str, Any]], skip: str = TORCH_DIR) -> str:
    """Where a block was allocated: its innermost Python frame outside torch itself (files
    under ``skip``, torch's own folder by default).

    RCH's own frames are named by file and line; others by file and function. A block
    with no such frame was allocated by the autograd engine's thread.

    >>> frame_label([{"filename": "/x/torch/nn/functional.py", "line": 5, "name": "conv"},
    ...              {"filename": "/x/src/rch/loss.py", "line": 40, "name": "rch_loss"}],
    ...             skip="/x/torch/")
    'rch/loss.py:40 rch_loss'
    >>> frame_label([{"filename": "/s/torchvision/models/resnet.py", "line": 9, "name": "forward"}])
    'torchvision/models/resnet.py forward'
    >>> frame_label([])
    'autograd backward'
    """
    for frame in frames:
        name = str(frame.get("filename", ""))
        if not name.endswith(".py") or name.startswith((skip, "<")):
            continue
        parts = Path(name).parts
        if "rch" in parts:
            rel = "/".join(parts[len(parts) - parts[::-1].index("rch") - 1 :])
            return f"{rel}:{frame.get('line')} {frame.get('name')}"
        return f"{'/'.join(parts[-3:])} {frame.get('name')}"
    return BACKWARD


@dataclass
class Peak:
    """What :func:`replay_peak` finds: the peak, the event that reached it, the blocks
    live then (``alloc`` events, with the index of each), and how many bytes of the blocks
    allocated before the recording began were still live then."""

    bytes: int
    event: int
    live: list[tuple[int, Mapping[str, Any]]]
    before: int


def replay_peak(
    trace: Sequence[Mapping[str, Any]], start_bytes: int = 0, from_event: int = 0
) -> Peak:
    """Replay allocator events and find the peak of allocated bytes at or after event
    ``from_event`` (the step being measured; earlier events are the step before it).

    A block counts from its ``alloc`` until its ``free_completed`` (when the allocator may
    reuse it), as ``torch.cuda.memory_allocated`` counts it. ``start_bytes`` is what was
    allocated when the recording began; frees of those blocks lower it. With no rise at or
    after ``from_event``, the peak is the total there and its event is ``from_event - 1``.

    >>> t = [{"action": "alloc", "addr": 1, "size": 10}, {"action": "alloc", "addr": 2, "size": 5},
    ...      {"action": "free_completed", "addr": 9, "size": 30},
    ...      {"action": "alloc", "addr": 3, "size": 40},
    ...      {"action": "free_completed", "addr": 3, "size": 40}]
    >>> p = replay_peak(t, start_bytes=100)
    >>> p.bytes, p.event, [i for i, _ in p.live], p.before
    (125, 3, [0, 1, 3], 70)
    """
    current = start_bytes
    at = from_event - 1
    peak: int | None = None
    for i, event in enumerate(trace):
        if i == from_event:
            peak = current
        if event["action"] == "alloc":
            current += int(event["size"])
            if peak is not None and current > peak:
                peak, at = current, i
        elif event["action"] == "free_completed":
            current -= int(event["size"])
    live: dict[int, tuple[int, Mapping[str, Any]]] = {}
    before = start_bytes
    for i, event in enumerate(trace[: at + 1]):
        if event["action"] == "alloc":
            live[int(event["addr"])] = (i, event)
        elif event["action"] == "free_completed" and live.pop(int(event["addr"]), None) is None:
            before -= int(event["size"])  # a block allocated before the recording
    return Peak(current if peak is None else peak, at, sorted(live.values(), key=_first), before)


def _first(item: tuple[int, Mapping[str, Any]]) -> int:
    return item[0]


def block_label(index: int, event: Mapping[str, Any], from_event: int) -> str:
    """:func:`frame_label`, marked when the block comes from the step before the measured one."""
    label = frame_label(event.get("frames", []))
    return label if index >= from_event else EARLIER + label


def blocks_by_label(peak: Peak, from_event: int = 0) -> dict[str, list[int]]:
    """The sizes (bytes) of the blocks live at the peak, largest first, by where they were
    allocated (see :func:`block_label`); each block is labelled once."""
    groups: defaultdict[str, list[int]] = defaultdict(list)
    for index, event in peak.live:
        groups[block_label(index, event, from_event)].append(int(event["size"]))
    return {label: sorted(sizes, reverse=True) for label, sizes in groups.items()}


def breakdown(peak: Peak, from_event: int = 0) -> dict[str, int]:
    """Bytes live at the peak by where they were allocated (see :func:`block_label`)."""
    return totals(blocks_by_label(peak, from_event), peak.before)


def totals(by_label: Mapping[str, list[int]], before: int) -> dict[str, int]:
    """:func:`breakdown` from :func:`blocks_by_label`'s groups and the bytes held before."""
    return {BEFORE: before, **{label: sum(sizes) for label, sizes in by_label.items()}}


def largest(peak: Peak, label: str, from_event: int = 0, n: int = 6) -> list[int]:
    """The sizes (bytes) of the ``n`` largest live blocks of one group, largest first."""
    return blocks_by_label(peak, from_event).get(label, [])[:n]


def record_step(name: str, rch: bool, args: argparse.Namespace) -> dict[str, Any]:
    """Peak of one recorded training step and what is live at it. The step before it is
    recorded too, so that blocks it leaves live are named."""
    cfg, net, opt = build(name, rch, args.crop, args.amp, "cuda", not args.validate_off)
    x, y = batch(args, "cuda")
    step = partial(timed, partial(train_step, cfg, net, opt, x, y, amp_dtype(args.amp)), "cuda")
    step()
    gc.collect()
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    torch.cuda.memory._record_memory_history(max_entries=args.max_entries, stacks="python")
    try:
        step()
        from_event = len(
            torch.cuda.memory._snapshot()["device_traces"][torch.cuda.current_device()]
        )
        torch.cuda.reset_peak_memory_stats()
        step()
        snap = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    trace = snap["device_traces"][torch.cuda.current_device()]
    peak = replay_peak(trace, start, from_event)
    by_label = blocks_by_label(peak, from_event)  # labelled once, for both uses below
    groups = totals(by_label, peak.before)
    at = trace[peak.event] if peak.event >= 0 else {}
    result = {
        "peak_mib": peak.bytes / MIB,
        "max_memory_allocated_mib": torch.cuda.max_memory_allocated() / MIB,
        "start_mib": start / MIB,
        "events": len(trace) - from_event,
        "peak_event": peak.event - from_event,
        "peak_label": frame_label(at.get("frames", [])) if at else BEFORE,
        "peak_block_mib": int(at.get("size", 0)) / MIB,
        "groups_mib": {k: v / MIB for k, v in groups.items()},
        "largest_blocks_mib": {k: [b / MIB for b in v[:6]] for k, v in by_label.items()},
        "truncated": len(trace) >= args.max_entries,
    }
    del cfg, net, opt, x, y, snap, trace, peak
    gc.collect()
    torch.cuda.empty_cache()
    return result


def compare(base: dict[str, Any], rch: dict[str, Any], rows: int) -> list[tuple[str, float, float]]:
    """The groups whose bytes at the peak differ most: (label, baseline MiB, RCH MiB)."""
    a, b = base["groups_mib"], rch["groups_mib"]
    labels = sorted(set(a) | set(b), key=lambda k: -abs(b.get(k, 0.0) - a.get(k, 0.0)))
    return [(k, a.get(k, 0.0), b.get(k, 0.0)) for k in labels[:rows]]


def format_network(name: str, base: dict[str, Any], rch: dict[str, Any], rows: int) -> str:
    lines = [
        f"## {name}: peak {base['peak_mib']:.1f} MiB baseline, {rch['peak_mib']:.1f} MiB RCH "
        f"({rch['peak_mib'] / base['peak_mib'] - 1:+.1%}); max_memory_allocated "
        f"{base['max_memory_allocated_mib']:.1f} / {rch['max_memory_allocated_mib']:.1f}",
        f"peak reached by: baseline '{base['peak_label']}' (event {base['peak_event']} of "
        f"{base['events']}, {base['peak_block_mib']:.1f} MiB), RCH '{rch['peak_label']}' "
        f"(event {rch['peak_event']} of {rch['events']}, {rch['peak_block_mib']:.1f} MiB)",
        f"{'live at the peak, allocated by':60s} {'base MiB':>9s} {'RCH MiB':>9s} {'diff':>8s}",
    ]
    for label, a, b in compare(base, rch, rows):
        lines.append(f"{label[:60]:60s} {a:9.1f} {b:9.1f} {b - a:+8.1f}")
    for label, _, _ in compare(base, rch, 4):
        for variant, res in (("baseline", base), ("RCH", rch)):
            blocks = res["largest_blocks_mib"].get(label, [])
            if blocks:
                sizes = ", ".join(f"{s:.1f}" for s in blocks)
                lines.append(f"  {variant} '{label[:50]}': largest blocks (MiB) {sizes}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--networks", nargs="+", default=list(NETWORKS[:2]), choices=NETWORKS)
    parser.add_argument("--crop", type=int, nargs=2, default=[512, 1024])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--amp", default="fp16", choices=["none", "bf16", "fp16"])
    parser.add_argument("--rows", type=int, default=12, help="groups listed per network")
    parser.add_argument("--max-entries", type=int, default=200_000)
    parser.add_argument(
        "--validate-off", action="store_true", help="rch.validate=false (fewer host syncs)"
    )
    parser.add_argument("--conv-products", action="store_true", help=CONV_PRODUCTS_HELP)
    parser.add_argument(
        "--out", type=Path, default=Path("benchmarks/results/gpu_memory.json"), help="JSON path"
    )
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("this benchmark needs a CUDA device (torch.cuda.is_available() is False)")
    if args.conv_products:
        use_conv_products("cuda")
    results: dict[str, Any] = {}
    for name in args.networks:
        base = record_step(name, False, args)
        rch = record_step(name, True, args)
        results[name] = {"baseline": base, "rch": rch, "diff": compare(base, rch, args.rows)}
        print(format_network(name, base, rch, args.rows), flush=True)
    meta = run_meta(
        argv,
        device="cuda",
        crop=args.crop,
        batch=args.batch,
        amp=args.amp,
        conv_products=args.conv_products,
    )
    write_results(args.out, {"meta": meta, "networks": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
