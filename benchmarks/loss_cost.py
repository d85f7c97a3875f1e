"""Time and peak memory of one forward+backward of the RCH loss, against its references.

For every configuration (B, K, D, feature map) one process measures, interleaved and on
the same inputs:

* ``ce``       plain cross-entropy on a (B, K, h, w) logit map (a segmentation loss);
* ``bound``    the RCH loss's lower bound: the bare prototype cross-entropy through the
               same kernels as ``paper`` (flattening, normalisation, cosines, CE and their
               hand-written backward) with no statistics, no EMA and no margins;
* ``autograd`` the same bare prototype cross-entropy written with plain torch ops and
               differentiated by autograd (what a straightforward implementation costs);
* ``paper``    ``rch_loss(formulation="paper")``;
* ``official`` ``rch_loss(formulation="official")``;
* ``pairwise`` the paper formulation with FN/FP terms from an explicit per-image N x N
               cosine matrix (the naive O(N^2) way), where that fits.

Time: median of ``--reps`` interleaved repetitions after warm-up (the slow O(N^2) reference
gets ``--pairwise-reps``). Peak memory: the process's resident-set high-water mark above
what it held before the step (Linux ``VmHWM``, reset through ``/proc/self/clear_refs``),
measured in a child process started with ``MALLOC_MMAP_THRESHOLD_=65536`` so that glibc
hands every large buffer back to the system when it is freed and the resident set tracks
live tensors; times come from the parent, which runs with the ordinary allocator. On a GPU,
CUDA's peak allocator statistics. Prints a table and writes JSON.

Run: ``python benchmarks/loss_cost.py [--quick] [--out benchmarks/results/loss_cost.json]``
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import run_meta
from rch._fused import PaperPlan, fused_paper_loss
from rch.functional import rch_loss
from rch.loss import margin_logits, unit
from rch.prototypes import ema_update
from rch.stats import flatten_pixels, pixel_sets, resize_labels, segment_sum

TAU = 0.5


def make_inputs(
    b: int, k: int, d: int, h: int, w: int, accuracy: float, device: str, seed: int = 0
) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, k, (b, h, w), generator=g)
    labels[torch.rand(b, h, w, generator=g) < 0.05] = 255
    guess = torch.randint(0, k, (b, h, w), generator=g)
    right = torch.rand(b, h, w, generator=g) < accuracy
    guess = torch.where(right & (labels != 255), labels, guess)
    logits = torch.randn(b, k, h, w, generator=g)
    logits.scatter_add_(1, guess[:, None], torch.full((b, 1, h, w), 4.0))
    emb = torch.randn(b, d, h, w, generator=g)
    protos = torch.randn(k, d, generator=g)
    return [t.to(device) for t in (emb, logits, labels, protos)]


def bare_prototype_ce(emb: Tensor, logits: Tensor, labels: Tensor, protos: Tensor) -> Tensor:
    """Lower bound: normalise, cosine to prototypes, CE; the paper path's own kernels."""
    b, _, h, w = emb.shape
    k = protos.shape[0]
    y = resize_labels(labels, (h, w))
    sets = pixel_sets(y, y, k, 255)  # no prediction needed: nothing depends on it
    target = sets.label.clamp_max(k - 1)
    plan = PaperPlan(
        sets=sets,
        anchors=sets.valid,
        weight=torch.zeros_like(target, dtype=emb.dtype),
        target=target,
        num_images=b,
        tau=TAU,
        momentum=0.9,
        members=None,
        fn_term=False,
        fp_term=False,
        group=None,
    )
    loss, _, _, _ = fused_paper_loss(emb, protos, plan)
    return loss


def autograd_prototype_ce(emb: Tensor, logits: Tensor, labels: Tensor, protos: Tensor) -> Tensor:
    """The bare prototype CE in plain torch ops, differentiated by autograd."""
    units = unit(flatten_pixels(emb))
    cos = units @ unit(protos).T
    return F.cross_entropy(cos / TAU, labels.reshape(-1), ignore_index=255)


def pairwise_paper(emb: Tensor, logits: Tensor, labels: Tensor, protos: Tensor) -> Tensor:
    """Paper formulation with phi/psi as means of pairwise cosines (per-image N x N)."""
    b, _, h, w = emb.shape
    k = protos.shape[0]
    y = resize_labels(labels, (h, w))
    sets = pixel_sets(y, logits.argmax(1), k, 255)
    rows = flatten_pixels(emb)
    units = unit(rows)
    index = torch.where(sets.correct, sets.label, k)
    sums, counts = segment_sum(rows, index, k)
    mu = ema_update(protos, sums, counts, 0.9)
    target = sets.label.clamp_max(k - 1)
    p_true = flatten_pixels(logits.softmax(1)).gather(1, target[:, None])[:, 0]
    n = h * w
    phi: list[Tensor] = []
    psi: list[Tensor] = []
    for i in range(b):
        part = slice(i * n, (i + 1) * n)
        cos = units[part] @ units[part].T  # (n, n)
        lab, prd, wrong = sets.label[part], sets.pred[part], sets.wrong[part]
        for cls_of, store, sign in ((lab, phi, -1.0), (prd, psi, 1.0)):
            member = F.one_hot(torch.where(wrong, cls_of, k), k + 1)[:, :k].to(cos.dtype)
            total = cos @ member  # (n, K): sum of cosines to each class's FN/FP pixels
            cnt = member.sum(0)
            mean = total.gather(1, target[part, None])[:, 0] / cnt[target[part]].clamp_min(1)
            present = (cnt[target[part]] > 0) & sets.valid[part]
            store.append(torch.where(present, 1.0 + sign * mean, torch.zeros_like(mean)))
    cosines = units @ unit(mu).T
    valid_target = torch.where(sets.valid, sets.label, -100)
    losses = []
    for term in (torch.cat(phi), torch.cat(psi)):
        z = margin_logits(cosines, target, (1 - p_true) * term, TAU)
        losses.append(F.cross_entropy(z, valid_target, ignore_index=-100))
    return losses[0] + losses[1]


def _paper(emb: Tensor, logits: Tensor, labels: Tensor, protos: Tensor) -> Tensor:
    return rch_loss(emb, logits, labels, protos, tau=TAU).loss


def _official(emb: Tensor, logits: Tensor, labels: Tensor, protos: Tensor) -> Tensor:
    return rch_loss(emb, logits, labels, protos, tau=TAU, formulation="official").loss


def _plain_ce(emb: Tensor, logits: Tensor, labels: Tensor, protos: Tensor) -> Tensor:
    return F.cross_entropy(logits, labels, ignore_index=255)


METHODS: dict[str, Callable[..., Tensor]] = {
    "ce": _plain_ce,
    "bound": bare_prototype_ce,
    "autograd": autograd_prototype_ce,
    "paper": _paper,
    "official": _official,
    "pairwise": pairwise_paper,
}


def _kib(field: str) -> int:
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+)", status).group(1))  # type: ignore[union-attr]


def run_once(name: str, inputs: list[Tensor], device: str) -> tuple[float, float]:
    """One forward+backward: (seconds, peak extra MiB)."""
    emb0, logits0, labels, protos = inputs
    emb = emb0.detach().requires_grad_(True)
    logits = logits0.detach().requires_grad_(name == "ce")
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")
        base = _kib("VmRSS") * 1024
    start = time.perf_counter()
    METHODS[name](emb, logits, labels, protos).backward()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else _kib("VmHWM") * 1024
    del emb, logits
    return seconds, (peak - base) / 2**20


def measure(
    cfg: dict[str, Any],
    methods: list[str],
    reps: int,
    warmup: int,
    device: str,
    accuracy: float,
    pairwise_reps: int,
) -> dict[str, Any]:
    inputs = make_inputs(cfg["B"], cfg["K"], cfg["D"], cfg["h"], cfg["w"], accuracy, device)
    times: dict[str, list[float]] = {m: [] for m in methods}
    mems: dict[str, list[float]] = {m: [] for m in methods}
    for rep in range(warmup + reps):
        for m in methods:
            if m == "pairwise" and rep >= warmup + pairwise_reps:
                continue
            t, mem = run_once(m, inputs, device)
            if rep >= warmup:
                times[m].append(t)
                mems[m].append(mem)
    return {
        m: {
            "time_s": statistics.median(times[m]),
            "peak_mib": statistics.median(mems[m]),
            "times_s": times[m],
        }
        for m in methods
    }


def _key(cfg: dict[str, Any]) -> str:
    return f"{cfg['B']}-{cfg['K']}-{cfg['D']}-{cfg['h']}x{cfg['w']}"


def _configs(args: argparse.Namespace) -> list[dict[str, Any]]:
    return [
        {"B": b, "K": k, "D": d, "h": int(m.split("x")[0]), "w": int(m.split("x")[1])}
        for m, b, k, d in itertools.product(args.maps, args.batch, args.classes, args.dim)
    ]


def _memory_phase(args: argparse.Namespace) -> int:
    """Child process: peak memory of every method once after one warm-up, as JSON."""
    out = {}
    for cfg in _configs(args):
        methods = ["ce", "bound", "autograd", "paper", "official"]
        if pairwise_fits(cfg, args.pairwise_max_pixels):
            methods.append("pairwise")
        res = measure(cfg, methods, 1, 1, "cpu", args.accuracy, 1)
        out[_key(cfg)] = {m: r["peak_mib"] for m, r in res.items()}
    args.memory_phase.write_text(json.dumps(out))
    return 0


def _cpu_memory(cli: list[str]) -> dict[str, Any]:
    """Run the memory phase in a child whose allocator returns freed buffers at once."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "memory.json"
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
        subprocess.run(
            [sys.executable, __file__, *cli, "--memory-phase", str(out)], env=env, check=True
        )
        result: dict[str, Any] = json.loads(out.read_text())
    return result


def pairwise_fits(cfg: dict[str, Any], limit_pixels: int) -> bool:
    return bool(cfg["h"] * cfg["w"] <= limit_pixels)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--classes", type=int, nargs="+", default=[19, 150])
    parser.add_argument("--dim", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--maps", nargs="+", default=["64x128", "128x256"])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--pairwise-reps", type=int, default=2)
    parser.add_argument(
        "--accuracy",
        type=float,
        default=0.8,
        help="share of labelled pixels the simulated network gets right",
    )
    parser.add_argument(
        "--pairwise-max-pixels",
        type=int,
        default=64 * 128,
        help="run the O(N^2) reference only up to this many pixels per image",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="one small configuration")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/loss_cost.json"))
    parser.add_argument("--memory-phase", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cli = sys.argv[1:] if argv is None else list(argv)
    if args.quick:
        args.batch, args.classes, args.dim, args.maps, args.reps = [2], [19], [64], ["32x64"], 3
    if args.memory_phase is not None:
        return _memory_phase(args)
    configs = _configs(args)
    memory = _cpu_memory(cli) if args.device == "cpu" else None
    rows = []
    header = (
        f"{'B':>2} {'K':>4} {'D':>4} {'map':>8} | {'ce ms':>6} {'bound':>7} {'autogr':>7} "
        f"{'paper':>7} {'offic':>7} {'pair':>8} | {'paper/bound':>11} {'paired':>6} {'mem':>5} | "
        f"{'bound MiB':>9} {'autogr MiB':>10} {'paper MiB':>9} {'pair MiB':>8}"
    )
    print(
        f"device={args.device} threads={torch.get_num_threads()} accuracy={args.accuracy} "
        f"reps={args.reps} (medians)"
    )
    print(header)
    print("-" * len(header))
    for cfg in configs:
        methods = ["ce", "bound", "autograd", "paper", "official"]
        if pairwise_fits(cfg, args.pairwise_max_pixels):
            methods.append("pairwise")
        res = measure(
            cfg, methods, args.reps, args.warmup, args.device, args.accuracy, args.pairwise_reps
        )
        if memory is not None:
            for m in methods:
                res[m]["peak_mib"] = memory[_key(cfg)][m]
        ratio_t = res["paper"]["time_s"] / res["bound"]["time_s"]
        ratio_m = res["paper"]["peak_mib"] / max(res["bound"]["peak_mib"], 1e-9)
        # the two run back to back in every repetition: the median of the per-repetition
        # ratios cancels the machine's slow drifts that the ratio of medians still carries
        paired = statistics.median(
            p / b for p, b in zip(res["paper"]["times_s"], res["bound"]["times_s"], strict=True)
        )
        rows.append(
            {
                **cfg,
                "results": res,
                "paper_over_bound_time": ratio_t,
                "paper_over_bound_time_paired": paired,
                "paper_over_bound_mem": ratio_m,
            }
        )
        ms = {m: 1e3 * r["time_s"] for m, r in res.items()}
        mib = {m: r["peak_mib"] for m, r in res.items()}
        nan = float("nan")
        print(
            f"{cfg['B']:>2} {cfg['K']:>4} {cfg['D']:>4} {cfg['h']:>3}x{cfg['w']:<4} | "
            f"{ms['ce']:6.1f} {ms['bound']:7.1f} {ms['autograd']:7.1f} {ms['paper']:7.1f} "
            f"{ms['official']:7.1f} {ms.get('pairwise', nan):8.1f} | {ratio_t:11.2f} {paired:6.2f} "
            f"{ratio_m:5.2f} | {mib['bound']:9.1f} {mib['autograd']:10.1f} {mib['paper']:9.1f} "
            f"{mib.get('pairwise', nan):8.1f}",
            flush=True,
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = run_meta(
        argv,
        processor=platform.processor(),
        device=args.device,
        accuracy=args.accuracy,
        reps=args.reps,
    )
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
