"""Training with the paper's recipe: configs, the loop, checkpoints, metrics, run tools."""

from __future__ import annotations

from .checkpoint import load_checkpoint, save_checkpoint
from .config import Config, apply_overrides, config_from_dict, config_to_dict, load_config
from .losses import ohem_keep, seg_cross_entropy
from .runs import evaluate_checkpoint, export_checkpoint, load_network, resolve_checkpoint
from .trainer import Network, TrainResult, build_network, build_optimizer, poly_lr, train

__all__ = [
    "Config",
    "Network",
    "TrainResult",
    "apply_overrides",
    "build_network",
    "build_optimizer",
    "config_from_dict",
    "config_to_dict",
    "evaluate_checkpoint",
    "export_checkpoint",
    "load_checkpoint",
    "load_config",
    "load_network",
    "ohem_keep",
    "poly_lr",
    "resolve_checkpoint",
    "save_checkpoint",
    "seg_cross_entropy",
    "train",
]
