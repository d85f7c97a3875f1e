"""Where a training step's peak CUDA memory goes, baseline against RCH.

``train_cost.py`` gives each variant's peak (``torch.cuda.max_memory_allocated``); this
script says what is live at that peak. For each network it builds the baseline and the RCH
model as ``train_cost.py`` does, runs two warm-up steps, then records the CUDA caching
allocator's history (``torch.cuda.memory._record_memory_history``) over one more step.
Replaying the recorded events gives the step's peak, the event that reached it and every
block live at that moment, grouped by where it was allocated: the innermost Python frame
outside torch (RCH's own lines by file and line), "autograd backward" for blocks that the
autograd engine's thread allocated (no Python frame), and "held before the step" for
parameters and optimiser state. The table lists the groups whose bytes differ most between
the two variants. CUDA only.

Run: ``python benchmarks/gpu_memory.py [--networks deeplabv3_resnet50 hrnet_w18_ocr]
[--crop 512 1024] [--amp fp16]``
"""

from __future__ import annotations

import argparse
import gc
import sys
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import run_meta, write_results
from train_cost import NETWORKS, amp_dtype, batch, build, step

BEFORE = "held before the step"
BACKWARD = "autograd backward"
MIB = 2**20


def frame_label(frames: Sequence[Mapping[str, Any]]) -> str:
    """Where a block was allocated: its innermost Python frame outside torch itself.

    RCH's own frames are named by file and line; others by file and function. A block
    with no such frame was allocated by the autograd engine's thread.

    >>> frame_label([{"filename": "/x/torch/nn/functional.py", "line": 5, "name": "conv"},
    ...              {"filename": "/x/src/rch/loss.py", "line": 40, "name": "rch_loss"}])
    'rch/loss.py:40 rch_loss'
    >>> frame_label([{"filename": "/s/torchvision/models/resnet.py", "line": 9, "name": "forward"}])
    'torchvision/models/resnet.py forward'
    >>> frame_label([])
    'autograd backward'
    """
    for frame in frames:
        name = str(frame.get("filename", ""))
        if not name.endswith(".py") or "/torch/" in name or name.startswith("<"):
            continue
        parts = Path(name).parts
        if "rch" in parts:
            rel = "/".join(parts[len(parts) - parts[::-1].index("rch") - 1 :])
            return f"{rel}:{frame.get('line')} {frame.get('name')}"
        return f"{'/'.join(parts[-3:])} {frame.get('name')}"
    return BACKWARD


def replay_peak(
    trace: Sequence[Mapping[str, Any]], start_bytes: int = 0
) -> tuple[int, int, list[Mapping[str, Any]]]:
    """Replay allocator events: the peak allocated bytes, the index of the event that reached
    it (-1 if none rose above ``start_bytes``) and the ``alloc`` events still live then.

    A block counts from its ``alloc`` until its ``free_completed`` (when the allocator may
    reuse it), as ``torch.cuda.memory_allocated`` counts it. Frees of blocks allocated
    before the recording began lower the total, which ``start_bytes`` includes.

    >>> t = [{"action": "alloc", "addr": 1, "size": 10}, {"action": "alloc", "addr": 2, "size": 5},
    ...      {"action": "free_completed", "addr": 1, "size": 10},
    ...      {"action": "alloc", "addr": 3, "size": 4}]
    >>> peak, at, live = replay_peak(t, start_bytes=100)
    >>> peak, at, sorted(e["addr"] for e in live)
    (115, 1, [1, 2])
    """
    current = peak = start_bytes
    at = -1
    for i, event in enumerate(trace):
        if event["action"] == "alloc":
            current += int(event["size"])
            if current > peak:
                peak, at = current, i
        elif event["action"] == "free_completed":
            current -= int(event["size"])
    live: dict[int, Mapping[str, Any]] = {}
    for event in trace[: at + 1]:
        if event["action"] == "alloc":
            live[int(event["addr"])] = event
        elif event["action"] == "free_completed":
            live.pop(int(event["addr"]), None)
    return peak, at, list(live.values())


def breakdown(live: Iterable[Mapping[str, Any]], start_bytes: int) -> dict[str, int]:
    """Bytes live at the peak by where they were allocated (see :func:`frame_label`)."""
    groups: Counter[str] = Counter({BEFORE: start_bytes})
    for event in live:
        groups[frame_label(event.get("frames", []))] += int(event["size"])
    return dict(groups)


def largest(live: Iterable[Mapping[str, Any]], label: str, n: int = 6) -> list[int]:
    """The sizes (bytes) of the ``n`` largest live blocks of one group, largest first."""
    sizes = [int(e["size"]) for e in live if frame_label(e.get("frames", [])) == label]
    return sorted(sizes, reverse=True)[:n]


def record_step(name: str, rch: bool, args: argparse.Namespace) -> dict[str, Any]:
    """Peak of one recorded training step and what is live at it."""
    cfg, net, opt = build(name, rch, args.crop, args.amp, "cuda", not args.validate_off)
    x, y = batch(args, "cuda")
    for _ in range(2):
        step(cfg, net, opt, x, y, amp_dtype(args.amp), "cuda")
    opt.zero_grad(set_to_none=True)
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    torch.cuda.memory._record_memory_history(max_entries=args.max_entries, stacks="python")
    try:
        step(cfg, net, opt, x, y, amp_dtype(args.amp), "cuda")
        snap = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    trace = snap["device_traces"][torch.cuda.current_device()]
    peak, at, live = replay_peak(trace, start)
    groups = breakdown(live, start)
    by_size = {label: largest(live, label) for label in groups if label != BEFORE}
    result = {
        "peak_mib": peak / MIB,
        "max_memory_allocated_mib": torch.cuda.max_memory_allocated() / MIB,
        "start_mib": start / MIB,
        "events": len(trace),
        "peak_event": at,
        "peak_label": frame_label(trace[at].get("frames", [])) if at >= 0 else BEFORE,
        "groups_mib": {k: v / MIB for k, v in groups.items()},
        "largest_blocks_mib": {k: [s / MIB for s in v] for k, v in by_size.items()},
        "truncated": len(trace) >= args.max_entries,
    }
    del cfg, net, opt, x, y, snap, trace, live
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
        f"{base['events']}), RCH '{rch['peak_label']}' (event {rch['peak_event']} of "
        f"{rch['events']})",
        f"{'live at the peak, allocated by':60s} {'base MiB':>9s} {'RCH MiB':>9s} {'diff':>8s}",
    ]
    for label, a, b in compare(base, rch, rows):
        lines.append(f"{label[:60]:60s} {a:9.1f} {b:9.1f} {b - a:+8.1f}")
    for variant, res in (("baseline", base), ("RCH", rch)):
        blocks = res["largest_blocks_mib"].get(BACKWARD, [])
        lines.append(
            f"{variant}: largest '{BACKWARD}' blocks live at the peak (MiB): "
            + ", ".join(f"{s:.1f}" for s in blocks)
        )
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
    parser.add_argument(
        "--out", type=Path, default=Path("benchmarks/results/gpu_memory.json"), help="JSON path"
    )
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("this benchmark needs a CUDA device (torch.cuda.is_available() is False)")
    results: dict[str, Any] = {}
    for name in args.networks:
        base = record_step(name, False, args)
        rch = record_step(name, True, args)
        results[name] = {"baseline": base, "rch": rch, "diff": compare(base, rch, args.rows)}
        print(format_network(name, base, rch, args.rows), flush=True)
    meta = run_meta(argv, device="cuda", crop=args.crop, batch=args.batch, amp=args.amp)
    write_results(args.out, {"meta": meta, "networks": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
