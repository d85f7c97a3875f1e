"""The training loop: the paper's recipe with RCH attached, on one process or many.

Launch several processes with ``torchrun --nproc_per_node N -m rch train CONFIG``: the
process group is set up from the environment (NCCL on CUDA, gloo on CPU), the model is
wrapped in DDP (BatchNorm synchronised on CUDA), each process reads its share of every
global batch, and RCH's prototype statistics are all-reduced so every process holds the same
prototypes.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import statistics
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml
from torch import Tensor, nn

from .._validation import check_option
from ..data import Augment, build_dataset, make_train_loader
from ..data.datasets import SegmentationDataset
from ..diagnostics import STAT_NAMES, CalibrationStats, format_stats, summarize
from ..errors import RCHError
from ..eval import EvalResult, InferenceConfig, evaluate, format_scores
from ..functional import check_validate
from ..hooks import RCHAttachment, attach
from ..models import BuiltModel, build_model, split_outputs
from .allocator import retain_freed_memory
from .checkpoint import load_checkpoint, save_checkpoint
from .config import RCH_OHEM, Config, config_differences, config_from_dict, config_to_dict
from .logger import MetricsLogger, json_safe, read_metrics
from .losses import ohem_keep, seg_cross_entropy

__all__ = [
    "Network",
    "TrainResult",
    "build_network",
    "build_optimizer",
    "inference_config",
    "poly_lr",
    "step_losses",
    "train",
]


@dataclass
class Network:
    """The trainable module (an :class:`RCHAttachment` when RCH is on) and its parts."""

    module: nn.Module
    base: nn.Module
    built: BuiltModel

    @property
    def attachment(self) -> RCHAttachment | None:
        return self.module if isinstance(self.module, RCHAttachment) else None


@dataclass
class TrainResult:
    """What a finished (or stopped) run produced."""

    run_dir: Path
    iterations: int
    eval: EvalResult | None
    seconds_per_iter: float
    peak_memory_mib: float
    network: Network


def build_network(cfg: Config, num_classes: int) -> Network:
    """The network of ``cfg.model`` with RCH attached as ``cfg.rch`` says (or not)."""
    check_option("rch.ohem", cfg.rch.ohem, RCH_OHEM)
    check_validate("rch.validate", cfg.rch.validate)
    built = build_model(cfg.model.name, num_classes, cfg.model.pretrained, **cfg.model.options)
    if not cfg.rch.enabled:
        return Network(built.model, built.model, built)
    r = cfg.rch
    layer = r.layer or built.layer
    select = r.select if r.layer is not None else built.select
    in_channels = built.feature_channels if r.layer is None and built.feature_channels else None
    example = torch.zeros(1, 3, *cfg.data.crop_size) if in_channels is None else None
    module = attach(
        built.model,
        layer,
        num_classes,
        in_channels=in_channels,
        select=select,
        example_input=example,
        embed_dim=r.embed_dim or built.embed_dim,
        formulation=r.formulation,
        tau=r.tau,
        momentum=r.momentum,
        alpha=r.alpha,
        loss_weight=r.loss_weight,
        ignore_index=cfg.data.ignore_index,
        fn_term=r.fn_term,
        fp_term=r.fp_term,
        prototype_source=r.prototype_source,
        prototypes=r.prototypes,
        prototype_init=r.prototype_init,
        warmup_iters=r.warmup_iters,
        validate=r.validate,
    )
    return Network(module, built.model, built)


def build_optimizer(cfg: Config, module: nn.Module) -> torch.optim.Optimizer:
    """SGD (the paper's) or AdamW; no weight decay on norms and biases for AdamW."""
    o = cfg.optim
    params = [p for p in module.parameters() if p.requires_grad]
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    if o.name == "adamw":
        decay = [p for p in params if p.ndim > 1]
        no_decay = [p for p in params if p.ndim <= 1]
        groups: list[dict[str, Any]] = [
            {"params": decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(
            groups, lr=o.lr, betas=(o.betas[0], o.betas[1]), weight_decay=o.weight_decay
        )
    raise ValueError(f"optim.name must be 'sgd' or 'adamw', got {o.name!r}")


def poly_lr(
    base: float, it: int, total: int, power: float = 0.9, min_lr: float = 0.0, warmup: int = 0
) -> float:
    """Poly schedule ``(base - min) * (1 - it / total) ** power + min`` with linear warm-up.

    Example:
        >>> poly_lr(0.01, 0, 100), poly_lr(0.01, 100, 100), round(poly_lr(0.01, 50, 100, 1.0), 6)
        (0.01, 0.0, 0.005)
    """
    lr = float((base - min_lr) * (1 - min(it, total) / total) ** power + min_lr)
    if warmup > 0 and it < warmup:
        lr *= (it + 1) / warmup
    return lr


def inference_config(cfg: Config) -> InferenceConfig:
    e = cfg.eval
    return InferenceConfig(
        mode=e.mode,  # type: ignore[arg-type]
        crop=(e.crop[0], e.crop[1]),
        stride=(e.stride[0], e.stride[1]),
        scales=tuple(e.scales),
        flip=e.flip,
        base_size=(cfg.data.base_size[0], cfg.data.base_size[1]) if cfg.data.base_size else None,
    )


def _augment(cfg: Config) -> Augment:
    d = cfg.data
    return Augment(
        crop_size=(d.crop_size[0], d.crop_size[1]),
        scales=tuple(d.scales),
        base_size=(d.base_size[0], d.base_size[1]) if d.base_size else None,
        flip=d.flip,
        jitter=d.jitter,
        ignore_index=d.ignore_index,
    )


@dataclass
class _Dist:
    rank: int
    world: int
    device: torch.device


def _setup(cfg: Config) -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    wanted = cfg.train.device
    cuda = torch.cuda.is_available() and wanted != "cpu"
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if wanted.startswith("cuda") and not torch.cuda.is_available():
        raise RCHError(f"train.device={wanted!r} but CUDA is not available")
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device(wanted if ":" in wanted else f"cuda:{local}")
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return _Dist(rank, world, device)


def _amp(cfg: Config, device: torch.device) -> torch.dtype | None:
    amp = cfg.train.amp
    if amp == "none":
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        if device.type != "cuda":
            raise ValueError("train.amp='fp16' needs CUDA; use 'bf16' on the CPU")
        return torch.float16
    raise ValueError(f"train.amp must be 'none', 'bf16' or 'fp16', got {amp!r}")


def _reset_peak(device: torch.device) -> None:
    """Start a fresh peak-memory measurement (CUDA allocator; on Linux the process's peak
    resident set, VmHWM, which several runs in one process would otherwise share)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _peak_mib(device: torch.device) -> float:
    """Peak memory since :func:`_reset_peak`: CUDA allocated bytes, or the peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def step_losses(
    cfg: Config, net: Network, module: nn.Module, x: Tensor, y: Tensor, amp: torch.dtype | None
) -> tuple[dict[str, Tensor], CalibrationStats | None]:
    """One batch's losses under the recipe: OHEM cross-entropy, the auxiliary loss and (when
    ``net`` has RCH attached) the RCH loss, which sees OHEM as ``rch.ohem`` says; ``"loss"``
    is their sum.

    Returns:
        ``(parts, stats)``: the loss parts by name, and the head's per-class statistics when
        its ``record_stats`` was set.
    """
    ignore = cfg.data.ignore_index
    ctx = torch.autocast(x.device.type, dtype=amp) if amp else contextlib.nullcontext()
    with ctx:
        logits, aux = split_outputs(module(x))
    keep = None
    if cfg.loss.ohem:
        resized = logits
        if logits.shape[-2:] != y.shape[-2:]:
            resized = torch.nn.functional.interpolate(
                logits.float(), size=y.shape[-2:], mode="bilinear", align_corners=False
            )
        keep = ohem_keep(resized, y, cfg.loss.ohem_thresh, cfg.loss.ohem_min_kept, ignore)
    parts = {"seg": seg_cross_entropy(logits, y, ignore, keep)}
    if aux is not None and cfg.loss.aux_weight > 0:
        parts["aux"] = cfg.loss.aux_weight * seg_cross_entropy(aux, y, ignore)
    attachment = net.attachment
    stats = None
    if attachment is not None:
        target, loss_mask = y, None
        if keep is not None and cfg.rch.ohem == "loss":
            loss_mask = keep
        elif keep is not None and cfg.rch.ohem == "hide":
            target = torch.where(keep, y, torch.full_like(y, ignore))
        with ctx:
            out = attachment.rch_loss(logits, target, loss_mask)
        parts["rch"] = out.loss
        parts["rch_fn"] = out.loss_fn.detach()
        parts["rch_fp"] = out.loss_fp.detach()
        stats = out.stats
    parts["loss"] = sum(v for k, v in parts.items() if k in ("seg", "aux", "rch"))  # type: ignore[assignment]
    return parts, stats


def _batches(loader: Any) -> Iterator[tuple[Tensor, Tensor]]:
    yield from loader


def _run_dir(cfg: Config) -> Path:
    return Path(cfg.train.out_dir) / cfg.name


def train(
    cfg: Config,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
) -> TrainResult:
    """Train ``cfg`` (evaluating on the val split at ``eval_every`` and at the end).

    Args:
        cfg: the run's configuration; the run directory is ``train.out_dir / name``.
        resume: continue from the run directory's last checkpoint (exactly: the same
            samples, augmentations and random state as an uninterrupted run).
        overwrite: delete an existing run directory first (otherwise it is an error).
        progress: show a progress bar (rank 0).
        stop_after: stop (after checkpointing) once this many iterations are done, as an
            interruption would; the run can then be resumed.

    Raises:
        RCHError: the run directory exists and neither ``resume`` nor ``overwrite`` is set,
            or ``resume`` finds no checkpoint.
    """
    threads = torch.get_num_threads()
    try:
        return _train(cfg, resume, overwrite, progress, stop_after)
    finally:  # train.threads applies to this run only
        torch.set_num_threads(threads)


def _train(
    cfg: Config, resume: bool, overwrite: bool, progress: bool, stop_after: int | None
) -> TrainResult:
    from tqdm.auto import tqdm

    env = _setup(cfg)
    main = env.rank == 0
    run_dir = _run_dir(cfg)
    ckpt_path = run_dir / "checkpoints" / "last.pt"
    if run_dir.exists() and not resume and main:
        if not overwrite:
            raise RCHError(
                f"run directory {run_dir} exists; pass resume (--resume) to continue it or "
                "overwrite (--overwrite) to start again"
            )
        shutil.rmtree(run_dir)
    if env.world > 1:
        dist.barrier()
    state = None
    if resume:
        if not ckpt_path.is_file():
            raise RCHError(f"--resume: no checkpoint at {ckpt_path}")
        state = load_checkpoint(ckpt_path)
        saved = config_from_dict(state["config"])
        if config_to_dict(saved) != config_to_dict(cfg) and main:
            changed = config_differences(saved, cfg)
            warnings.warn(
                f"--resume continues the run as it was configured; ignoring changed "
                f"setting(s) {changed}",
                stacklevel=2,
            )
        cfg = saved  # the checkpoint's config wins: resuming continues that run
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    if cfg.train.retain_memory and env.device.type == "cpu":
        retain_freed_memory()  # process-wide: later steps reuse the freed activations
    torch.manual_seed(cfg.seed)
    d = cfg.data
    train_set = build_dataset(d.name, d.root, d.train_split, d.ignore_index, **d.options)
    val_set = build_dataset(d.name, d.root, d.val_split, d.ignore_index, **d.options)
    if d.cache:
        train_set, val_set = train_set.cache_decoded(), val_set.cache_decoded()
    k = train_set.info.num_classes
    net = build_network(cfg, k)
    module: nn.Module = net.module.to(env.device)
    if net.attachment is not None and env.world > 1:
        net.attachment.head.process_group = dist.group.WORLD
    optimizer = build_optimizer(cfg, module)
    amp = _amp(cfg, env.device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)
    start = 0
    if state is not None:
        module.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        start = int(state["iter"])
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and env.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"], env.device)
    wrapped = module
    if env.world > 1:
        sync = cfg.model.sync_bn if cfg.model.sync_bn is not None else env.device.type == "cuda"
        if sync and env.device.type != "cuda":
            raise ValueError(
                "model.sync_bn=true needs CUDA (torch's SyncBatchNorm); on the CPU the "
                "BatchNorm running statistics are averaged over processes before every "
                "evaluation and checkpoint instead"
            )
        if sync:
            wrapped = nn.SyncBatchNorm.convert_sync_batchnorm(wrapped)
        wrapped = nn.parallel.DistributedDataParallel(
            wrapped, device_ids=[env.device.index] if env.device.type == "cuda" else None
        )
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    logger = MetricsLogger(run_dir, start if resume else None) if main else None
    t = cfg.train
    accum = max(1, t.accum_steps)
    loader = make_train_loader(
        train_set,
        _augment(cfg),
        t.batch_size,
        cfg.seed,
        t.iters * accum,
        start * accum,
        env.rank,
        env.world,
        d.workers,
        env.device.type == "cuda",
    )
    batches = _batches(loader)
    end = t.iters if stop_after is None else min(t.iters, stop_after)
    bar = tqdm(
        total=t.iters, initial=start, desc=cfg.name, unit="it", disable=not (progress and main)
    )
    _reset_peak(env.device)
    step_times: list[float] = []
    stat_records: list[dict[str, list[float]]] = []
    result_eval: EvalResult | None = None
    it = start
    module.train()
    while it < end:
        tic = time.perf_counter()
        lr = poly_lr(
            cfg.optim.lr,
            it,
            t.iters,
            cfg.optim.poly_power,
            cfg.optim.min_lr,
            cfg.optim.warmup_iters,
        )
        for group in optimizer.param_groups:
            group["lr"] = lr
        logs: dict[str, float] = {}
        for micro in range(accum):
            x, y = next(batches)
            x, y = x.to(env.device, non_blocking=True), y.to(env.device, non_blocking=True)
            last = micro == accum - 1
            sync_ctx = (
                wrapped.no_sync()
                if isinstance(wrapped, nn.parallel.DistributedDataParallel) and not last
                else contextlib.nullcontext()
            )
            with sync_ctx:
                if net.attachment is not None:
                    net.attachment.head.record_stats = last and (it + 1) % t.log_every == 0
                parts, stats = step_losses(cfg, net, wrapped, x, y, amp)
                scaler.scale(parts["loss"] / accum).backward()
            for key, value in parts.items():
                logs[key] = logs.get(key, 0.0) + float(value.detach()) / accum
        if net.attachment is not None:  # rch.validate=deferred: read here, after the losses
            try:
                net.attachment.rch_check()
            except ValueError as err:  # before the optimiser step: the weights stay as they were
                raise ValueError(f"iteration {it}: {err}") from err
        if not all(map(_finite, logs.values())):
            raise RCHError(f"non-finite loss at iteration {it}: {logs}")
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        it += 1
        step_times.append(time.perf_counter() - tic)
        bar.update(1)
        bar.set_postfix(loss=f"{logs['loss']:.3f}", lr=f"{lr:.2e}", refresh=False)
        if logger is not None and (it % t.log_every == 0 or it == end):
            logger.log(it, "train", {**logs, "lr": lr, "s_per_iter": step_times[-1]})
            if stats is not None:
                record = stats.as_lists()
                logger.log_classes(it, "rch", record, train_set.info.classes)
                stat_records.append(record)
        if env.world > 1 and (
            (t.eval_every and it % t.eval_every == 0) or it % t.ckpt_every == 0 or it == end
        ):
            _average_norm_buffers(module, env.world)
        if t.eval_every and it % t.eval_every == 0 and it < t.iters:
            result_eval = _evaluate(cfg, net, val_set, env.device, amp, it, logger, progress)
            module.train()
        if it % t.ckpt_every == 0 or it == end:
            _save(ckpt_path, cfg, module, optimizer, scaler, it, env, main, train_set.info.classes)
    bar.close()
    if it >= t.iters:
        result_eval = _evaluate(cfg, net, val_set, env.device, amp, it, logger, progress)
        if main:
            (run_dir / "eval.json").write_text(
                json.dumps(json_safe(result_eval.to_dict()), indent=1)
            )
            print(format_scores(result_eval.scores, result_eval.classes), flush=True)
    if main and net.attachment is not None:
        _write_stat_summary(run_dir, train_set.info.classes, stat_records, resume)
    s_per_iter = statistics.median(step_times) if step_times else float("nan")
    peak = _peak_mib(env.device)
    if main:
        cost = {"s_per_iter": s_per_iter, "peak_memory_mib": peak, "iterations": it}
        (run_dir / "cost.json").write_text(json.dumps(cost, indent=1))
    if logger is not None:
        logger.close()
    return TrainResult(run_dir, it, result_eval, s_per_iter, peak, net)


def _write_stat_summary(
    run_dir: Path, classes: tuple[str, ...], records: list[dict[str, list[float]]], resumed: bool
) -> None:
    """Per-class means of the calibration statistics over the run, to ``rch_stats.json``
    (read back from ``metrics.jsonl`` so a resumed run covers its earlier part too)."""
    if resumed:
        records = [
            {k: v for k, v in r.items() if k in STAT_NAMES} for r in read_metrics(run_dir, "rch")
        ]
    if not records:
        return
    summary = {"classes": list(classes), "batches": len(records), **summarize(records)}
    (run_dir / "rch_stats.json").write_text(json.dumps(json_safe(summary), indent=1))
    print(f"RCH calibration statistics, per class, mean over {len(records)} logged batches:")
    print(format_stats(summary), flush=True)


def _average_norm_buffers(module: nn.Module, world: int) -> None:
    """Average BatchNorm running statistics over processes (they drift apart without
    SyncBatchNorm), so every rank evaluates and checkpoints the same network."""
    with torch.no_grad():
        for sub in module.modules():
            if isinstance(sub, nn.modules.batchnorm._BatchNorm) and sub.running_mean is not None:
                for buf in (sub.running_mean, sub.running_var):
                    if buf is not None:
                        dist.all_reduce(buf)
                        buf /= world


def _finite(v: float) -> bool:
    return v == v and abs(v) != float("inf")


def _evaluate(
    cfg: Config,
    net: Network,
    val_set: SegmentationDataset,
    device: torch.device,
    amp: torch.dtype | None,
    it: int,
    logger: MetricsLogger | None,
    progress: bool,
) -> EvalResult:
    result = evaluate(
        net.base, val_set, inference_config(cfg), device, amp, progress, cfg.eval.limit
    )
    if logger is not None:
        values: dict[str, Any] = {"mIoU": result.scores.miou, "mAcc": result.scores.macc}
        values["aAcc"] = result.scores.aacc
        values.update(
            {f"IoU/{c}": v for c, v in zip(result.classes, result.scores.iou, strict=True)}
        )
        logger.log(it, "val", values)
    return result


def _save(
    path: Path,
    cfg: Config,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    it: int,
    env: _Dist,
    main: bool,
    classes: tuple[str, ...],
) -> None:
    if not main:
        return
    rng: dict[str, Tensor] = {"torch": torch.get_rng_state()}
    if env.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(env.device)
    save_checkpoint(
        path,
        {
            "iter": it,
            "config": config_to_dict(cfg),
            "model": module.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            "rng": rng,
            "classes": list(classes),
        },
    )
