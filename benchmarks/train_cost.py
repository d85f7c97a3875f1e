"""What RCH costs in training, and that it costs nothing at inference.

For each network (default: DeepLabV3-ResNet50, HRNet-W18 + OCR, SegFormer-B0) at a CPU-sized
crop, one process times a full training step of the baseline and of the same network with
RCH attached (forward, OHEM cross-entropy + auxiliary loss (+ RCH loss), backward, SGD
step), interleaved, and reports the median of each and their ratio, with the quartiles of
the per-repetition ratios (each repetition runs both, back to back). Peak memory: each
variant trains in its own child process, and the process's peak resident set (Linux VmHWM)
over the measured steps is reported, model and optimiser state included; on CUDA, the peak
allocated by tensors. On the CPU the child also reports the file-backed part of its resident
set at the end (RssFile: the pages of torch's and the other shared libraries that the process
touched), and the memory ratio is given once more without it: that part is code, not tensors,
and how much of it is resident varies with the machine's page cache. On CUDA the child also
counts the host synchronisations of one more step (``syncs``). Inference: the exported
RCH model is checked against the baseline architecture (parameter count, FLOPs from torch's
FlopCounterMode, bitwise outputs).

Run: ``python benchmarks/train_cost.py [--quick] [--device cuda --amp fp16 --crop 512 1024]``
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import CONV_PRODUCTS_HELP, run_meta, use_conv_products, write_results
from gpu_summary import same_inference
from loss_cost import _kib
from rch import export
from rch.models import split_outputs
from rch.train import Config, build_network, config_from_dict
from rch.train.trainer import Network, step_losses

NETWORKS = ("deeplabv3_resnet50", "hrnet_w18_ocr", "segformer_b0")
VALIDATE_CHOICES: dict[str, bool | str] = {"true": True, "false": False, "deferred": "deferred"}
"""``--validate``'s words and the ``rch.validate`` values they stand for."""
CLASSES = 19


def make_config(
    name: str, enabled: bool, crop: list[int], amp: str, validate: bool | str = True
) -> Config:
    return config_from_dict(
        {
            "model": {"name": name},
            "data": {"crop_size": crop},
            "rch": {"enabled": enabled, "validate": validate},
            "train": {"amp": amp},
        }
    )


def build(
    name: str, enabled: bool, crop: list[int], amp: str, device: str, validate: bool | str = True
) -> tuple[Config, Network, torch.optim.Optimizer]:
    torch.manual_seed(0)
    cfg = make_config(name, enabled, crop, amp, validate)
    net = build_network(cfg, CLASSES)
    net.module.to(device).train()
    opt = torch.optim.SGD(net.module.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
    return cfg, net, opt


def batch(args: argparse.Namespace, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 3, *args.crop, generator=g)
    y = torch.randint(0, CLASSES, (args.batch, *args.crop), generator=g)
    # blocky labels, like real scenes, so that TP / FN / FP sets are realistic
    y = (
        y[:, ::16, ::16]
        .repeat_interleave(16, 1)
        .repeat_interleave(16, 2)[:, : args.crop[0], : args.crop[1]]
    )
    return x.to(device), y.to(device)


def timed(fn: Callable[[], None], device: str) -> float:
    """Seconds that ``fn()`` takes, the device's queue drained before and after."""
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def train_step(
    cfg: Config,
    net: Network,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    amp_dtype: torch.dtype | None,
    phase: Callable[[str], contextlib.AbstractContextManager[Any]] = lambda _: (
        contextlib.nullcontext()
    ),
) -> None:
    """One training step as the trainer runs it; ``phase(name)`` wraps each of its three
    phases, ``"forward"`` (and the losses), ``"backward"`` and ``"optimizer"`` (for
    ``step_ops.py``, which counts what each runs)."""
    opt.zero_grad(set_to_none=True)
    with phase("forward"):
        parts, _ = step_losses(cfg, net, net.module, x, y, amp_dtype)
    with phase("backward"):
        parts["loss"].backward()
    if net.attachment is not None:  # rch.validate=deferred: read before the step, as the
        net.attachment.rch_check()  # trainer does
    with phase("optimizer"):
        opt.step()


def amp_dtype(amp: str) -> torch.dtype | None:
    return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def time_network(name: str, args: argparse.Namespace) -> dict[str, Any]:
    device = args.device
    variants = {
        v: build(name, v == "rch", args.crop, args.amp, device, args.validate)
        for v in ("baseline", "rch")
    }
    x, y = batch(args, device)
    times: dict[str, list[float]] = {v: [] for v in variants}
    for rep in range(args.warmup + args.reps):
        order = list(variants) if rep % 2 == 0 else list(reversed(variants))
        for v in order:
            cfg, net, opt = variants[v]
            t = timed(partial(train_step, cfg, net, opt, x, y, amp_dtype(args.amp)), device)
            if rep >= args.warmup:
                times[v].append(t)
    med = {v: statistics.median(ts) for v, ts in times.items()}
    # each repetition runs both variants back to back: its ratio is a paired measurement, and
    # the spread of those ratios says how far a run's time ratio can be trusted
    pairs = [r / b for b, r in zip(times["baseline"], times["rch"], strict=True)]
    quartiles = statistics.quantiles(pairs, n=4) if len(pairs) > 1 else [pairs[0]] * 3
    return {
        "time_s": med,
        "times_s": times,
        "time_ratio": med["rch"] / med["baseline"],
        "paired_ratio_quartiles": quartiles,
    }


def memory_child(name: str, variant: str, args: argparse.Namespace) -> dict[str, float]:
    """In a child process: peak memory (MiB) over warm-up + measured steps of one variant.

    ``peak``: VmHWM on the CPU, the peak allocated by tensors on CUDA. ``file``: on the CPU, the
    file-backed resident set (RssFile) after the steps; absent on CUDA. ``syncs``: on CUDA, the
    host synchronisations of one more step, as ``torch.cuda.set_sync_debug_mode`` reports them;
    absent on the CPU.
    """
    device = args.device
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")
    cfg, net, opt = build(name, variant == "rch", args.crop, args.amp, device, args.validate)
    x, y = batch(args, device)
    amp = amp_dtype(args.amp)
    for _ in range(2):
        timed(partial(train_step, cfg, net, opt, x, y, amp), device)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
        return {"peak": peak, "syncs": count_syncs(partial(train_step, cfg, net, opt, x, y, amp))}
    return {"peak": _kib("VmHWM") / 1024, "file": _kib("RssFile") / 1024}


def count_syncs(fn: Callable[[], None]) -> int:
    """How many synchronising CUDA calls ``fn()`` makes (``torch.cuda.set_sync_debug_mode``'s
    warnings). Each one waits for the GPU's queue to drain, then the GPU idles while the host
    launches what follows."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def memory(name: str, variant: str, cli: list[str]) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "m.json"
        cmd = [sys.executable, __file__, *cli, "--memory-child", name, variant, str(out)]
        subprocess.run(cmd, check=True, env=dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536"))
        return dict(json.loads(out.read_text()))


def inference_check(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Exported RCH model vs the baseline architecture: parameters, FLOPs, outputs."""
    _, base_net, _ = build(name, False, args.crop, "none", "cpu")
    _, rch_net, _ = build(name, True, args.crop, "none", "cpu")
    rch_net.module.eval()
    x = torch.randn(1, 3, *args.crop)
    with torch.no_grad():
        attached = split_outputs(rch_net.module(x))[0]
    deployed = export(copy.deepcopy(rch_net.module)).eval()
    base = base_net.module.eval()

    def flops(model: torch.nn.Module) -> int:
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model(x)
        return int(counter.get_total_flops())

    def params(model: torch.nn.Module) -> int:
        return sum(p.numel() for p in model.parameters())

    with torch.no_grad():
        same = torch.equal(split_outputs(deployed(x))[0], attached)
    return {
        "params_baseline": params(base),
        "params_exported": params(deployed),
        "params_training_rch": params(rch_net.module),
        "flops_baseline": flops(base),
        "flops_exported": flops(deployed),
        "state_dict_keys_equal": list(deployed.state_dict()) == list(base.state_dict()),
        "outputs_bitwise_equal_to_attached": same,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--networks", nargs="+", default=list(NETWORKS))
    parser.add_argument("--crop", type=int, nargs=2, default=[256, 256])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"])
    parser.add_argument("--quick", action="store_true", help="tiny crop, 2 reps (a smoke run)")
    parser.add_argument(
        "--validate",
        default="deferred",
        choices=list(VALIDATE_CHOICES),
        help="rch.validate: the value checks read where the trainer reads its losses "
        "(deferred, the default), at once in the loss (true: a host sync a step on a GPU), "
        "or not at all (false)",
    )
    parser.add_argument(
        "--no-validate",
        dest="validate",
        action="store_const",
        const="false",
        help="the same as --validate false",
    )
    parser.add_argument("--conv-products", action="store_true", help=CONV_PRODUCTS_HELP)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/train_cost.json"))
    parser.add_argument("--memory-child", nargs=3, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.validate = VALIDATE_CHOICES[args.validate]
    if args.quick:
        args.crop, args.reps, args.warmup, args.batch = [64, 64], 2, 1, 2
    if args.conv_products:
        use_conv_products(args.device)
    if args.memory_child:
        name, variant, out = args.memory_child
        Path(out).write_text(json.dumps(memory_child(name, variant, args)))
        return 0
    cli = [
        "--crop",
        *map(str, args.crop),
        "--batch",
        str(args.batch),
        "--device",
        args.device,
        "--amp",
        args.amp,
        "--validate",
        str(args.validate).lower(),
        *(["--conv-products"] if args.conv_products else []),
    ]
    results = {}
    print(
        f"{'network':<20} {'base s/it':>10} {'RCH s/it':>10} {'time':>7} {'pairs IQR':>13} "
        f"{'base MiB':>9} "
        f"{'RCH MiB':>9} {'memory':>7} {'no files':>8} {'syncs':>6}  inference (params, FLOPs, "
        "outputs)"
    )
    for name in args.networks:
        res = time_network(name, args)
        q1, _, q3 = res["paired_ratio_quartiles"]
        child = {v: memory(name, v, cli) for v in ("baseline", "rch")}
        mem = {v: m["peak"] for v, m in child.items()}
        res["peak_mib"] = mem
        res["memory_ratio"] = mem["rch"] / mem["baseline"]
        without, syncs = "-", "-"
        if all("syncs" in m for m in child.values()):
            res["syncs_per_step"] = counts = {v: int(m["syncs"]) for v, m in child.items()}
            syncs = f"{counts['baseline']}/{counts['rch']}"
        if all("file" in m for m in child.values()):
            res["file_backed_mib"] = files = {v: m["file"] for v, m in child.items()}
            res["memory_ratio_without_files"] = ratio = (mem["rch"] - files["rch"]) / (
                mem["baseline"] - files["baseline"]
            )
            without = f"{ratio:.3f}"
        res["inference"] = inf = inference_check(name, args)
        results[name] = res
        same = same_inference(inf)
        print(
            f"{name:<20} {res['time_s']['baseline']:10.3f} {res['time_s']['rch']:10.3f} "
            f"{res['time_ratio']:7.3f} {f'{q1:.3f}-{q3:.3f}':>13} "
            f"{mem['baseline']:9.0f} {mem['rch']:9.0f} "
            f"{res['memory_ratio']:7.3f} {without:>8} {syncs:>6}  "
            f"{'identical' if same else 'DIFFERENT'}",
            flush=True,
        )
    meta = run_meta(
        argv,
        device=args.device,
        amp=args.amp,
        validate=args.validate,
        conv_products=args.conv_products,
        crop=args.crop,
        batch=args.batch,
        reps=args.reps,
    )
    write_results(args.out, {"meta": meta, "results": results})
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
