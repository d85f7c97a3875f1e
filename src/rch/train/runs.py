"""Working with finished runs: rebuild a checkpoint's network, export it, evaluate it."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from ..data import build_dataset
from ..errors import RCHError
from ..eval import EvalResult, InferenceConfig, evaluate
from ..hooks import export
from .checkpoint import atomic_save, load_checkpoint
from .config import Config, config_from_dict
from .trainer import Network, build_network, inference_config

__all__ = ["evaluate_checkpoint", "export_checkpoint", "load_network", "resolve_checkpoint"]


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or a run directory (its ``checkpoints/last.pt``)."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoints" / "last.pt"
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    return path


def load_network(path: str | Path) -> tuple[Config, Network, list[str]]:
    """Rebuild the network of a training checkpoint (or run directory) with its weights.

    Returns:
        ``(config, network, class names)``.
    """
    state = load_checkpoint(resolve_checkpoint(path))
    cfg = config_from_dict(state["config"])
    # the checkpoint holds every weight: never fetch or read the encoder's initial weights
    built_cfg = replace(cfg, model=replace(cfg.model, pretrained=None))
    d = cfg.data
    classes = state.get("classes")
    if classes is None:
        dataset = build_dataset(d.name, d.root, d.val_split, d.ignore_index, **d.options)
        classes = list(dataset.info.classes)
    net = build_network(built_cfg, len(classes))
    try:
        net.module.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise RCHError(f"checkpoint {path} does not match its config's network: {exc}") from exc
    net.module.eval()
    return cfg, net, list(classes)


def export_checkpoint(path: str | Path, out: str | Path) -> nn.Module:
    """Write the deployable network of a checkpoint: RCH removed.

    ``out`` is a plain ``state_dict`` file (``torch.load`` it and pass it to the baseline
    architecture's ``load_state_dict``), written atomically; ``out`` with suffix ``.json``
    says which architecture: ``{"model": {"name", "options"}, "num_classes", "classes"}``,
    so ``rch.models.build_model(name, num_classes, **options).model`` rebuilds it.

    Returns:
        The exported network (the baseline architecture with the trained weights).
    """
    cfg, net, classes = load_network(path)
    model = export(net.module)
    target = atomic_save(model.state_dict(), out)
    meta = {
        "model": {"name": cfg.model.name, "options": cfg.model.options},
        "num_classes": len(classes),
        "classes": classes,
        "source": str(resolve_checkpoint(path)),
    }
    target.with_suffix(".json").write_text(json.dumps(meta, indent=1))
    return model


def evaluate_checkpoint(
    path: str | Path,
    split: str | None = None,
    infer: InferenceConfig | None = None,
    device: str = "cpu",
    limit: int | None = None,
    progress: bool = True,
) -> tuple[Config, EvalResult]:
    """Evaluate a training checkpoint on its dataset's val split (or ``split``)."""
    cfg, net, _ = load_network(path)
    d = cfg.data
    dataset = build_dataset(d.name, d.root, split or d.val_split, d.ignore_index, **d.options)
    model = net.base.to(torch.device(device))
    result = evaluate(model, dataset, infer or inference_config(cfg), device, None, progress, limit)
    return cfg, result
