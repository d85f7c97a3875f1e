"""Run configuration: typed dataclasses, loaded from YAML, overridden with ``key=value``.

Unknown keys are errors that list the valid ones, so a typo never silently trains the wrong
thing.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "RCH_OHEM",
    "Config",
    "DataConfig",
    "EvalConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "RCHConfig",
    "TrainConfig",
    "apply_overrides",
    "config_differences",
    "config_from_dict",
    "config_to_dict",
    "flatten_dict",
    "load_config",
]


@dataclass
class ModelConfig:
    name: str = "tiny"
    pretrained: str | None = None  # None | "hub" | local weights file
    options: dict[str, Any] = field(default_factory=dict)
    sync_bn: bool | None = None  # None: on when distributed on CUDA


@dataclass
class DataConfig:
    name: str = "synthetic"
    root: str = ""
    train_split: str = "train"
    val_split: str = "val"
    options: dict[str, Any] = field(default_factory=dict)
    crop_size: list[int] = field(default_factory=lambda: [96, 128])
    scales: list[float] = field(default_factory=lambda: [0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0])
    base_size: list[int] | None = None
    flip: bool = True
    jitter: float = 0.0
    ignore_index: int = 255
    workers: int = 0
    cache: bool = False  # keep decoded samples in memory (SegmentationDataset.cache_decoded)


RCH_OHEM = ("loss", "hide", "off")
"""Values of ``rch.ohem``."""


@dataclass
class RCHConfig:
    enabled: bool = True
    formulation: str = "paper"
    tau: float = 0.5
    momentum: float = 0.9
    alpha: float | None = None
    loss_weight: float = 0.1
    embed_dim: int | None = None  # None: the network preset's
    fn_term: bool = True
    fp_term: bool = True
    prototype_source: str = "tp"
    prototypes: str = "ema"
    prototype_init: str = "randn"
    warmup_iters: int = 0
    # how the main loss's OHEM reaches RCH: "loss" (the reference code: the metric loss
    # averages over OHEM's pixels, the statistics use every labelled pixel), "hide" (the
    # pixels OHEM drops are hidden from RCH, statistics too) or "off" (RCH ignores OHEM)
    ohem: str = "loss"
    # check values each step (labels in range, no NaN/Inf): "deferred" reads them where the
    # trainer reads its losses anyway (no extra host synchronisation on a GPU; an error names
    # the input), true at once (the error also shows the values; one synchronisation a step),
    # false not at all
    validate: bool | str = "deferred"
    layer: str | None = None  # override the preset's feature layer
    select: int | str | None = None


@dataclass
class LossConfig:
    ohem: bool = True
    ohem_thresh: float = 0.7
    ohem_min_kept: int = 100_000
    aux_weight: float = 0.4


@dataclass
class OptimConfig:
    name: str = "sgd"  # sgd | adamw
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    poly_power: float = 0.9
    min_lr: float = 0.0
    warmup_iters: int = 0  # linear LR warm-up


@dataclass
class TrainConfig:
    iters: int = 1000
    batch_size: int = 8  # per process
    accum_steps: int = 1
    amp: str = "none"  # none | bf16 | fp16
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    log_every: int = 10
    eval_every: int = 0  # 0: only at the end
    ckpt_every: int = 100
    out_dir: str = "runs"
    threads: int = 0  # torch.set_num_threads; 0 = leave
    retain_memory: bool = True  # CPU: freed memory stays in the process (rch.train.allocator)


@dataclass
class EvalConfig:
    mode: str = "whole"  # whole | slide
    crop: list[int] = field(default_factory=lambda: [512, 1024])
    stride: list[int] = field(default_factory=lambda: [341, 682])
    scales: list[float] = field(default_factory=lambda: [1.0])
    flip: bool = False
    limit: int | None = None


@dataclass
class Config:
    name: str = "run"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rch: RCHConfig = field(default_factory=RCHConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check ``value`` against a field's type hint; ints are accepted where floats are."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(hint):
            try:
                return _coerce(value, option, where)
            except (TypeError, ValueError) as exc:
                errors.append(str(exc))
        raise TypeError(f"{where}: {value!r} does not fit {hint}")
    if hint is type(None):
        if value is None:
            return None
        raise TypeError(f"{where}: expected null, got {value!r}")
    if hint is Any:
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(hint)
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise TypeError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint in (str, bool) and isinstance(value, hint):
        return value
    raise TypeError(f"{where}: expected {getattr(hint, '__name__', hint)}, got {value!r}")


def _build(cls: type[Any], data: dict[str, Any], where: str) -> Any:
    if not isinstance(data, dict):
        raise TypeError(f"{where or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise KeyError(f"unknown config key(s) {unknown} in {where or 'config'}; valid: {names}")
    kwargs = {}
    for name, value in data.items():
        hint, key = hints[name], f"{where}.{name}" if where else name
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, key)  # type: ignore[arg-type]
        else:
            kwargs[name] = _coerce(value, hint, key)
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any]) -> Config:
    """Build a :class:`Config` from nested mappings (missing keys take their defaults).

    Example:
        >>> cfg = config_from_dict({"rch": {"tau": 0.25}, "train": {"iters": 5}})
        >>> cfg.rch.tau, cfg.train.iters, cfg.optim.lr
        (0.25, 5, 0.01)
    """
    rch = data.get("rch") if isinstance(data, dict) else None
    if isinstance(rch, dict) and "ohem_pixels" in rch:  # written before rch.ohem existed
        rch = dict(rch)
        legacy = rch.pop("ohem_pixels")
        if "ohem" in rch:
            raise KeyError("rch.ohem_pixels (legacy) and rch.ohem are both set; keep rch.ohem")
        rch["ohem"] = "hide" if legacy in (True, "true", "True") else "off"
        data = {**data, "rch": rch}
    config: Config = _build(Config, data, "")
    return config


def config_to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def config_differences(a: Config, b: Config) -> list[str]:
    """Dotted keys whose values differ between two configs.

    Example:
        >>> config_differences(Config(), apply_overrides(Config(), ["rch.tau=1"]))
        ['rch.tau']
    """
    flat_a, flat_b = flatten_dict(config_to_dict(a)), flatten_dict(config_to_dict(b))
    return sorted(k for k in flat_a.keys() | flat_b.keys() if flat_a.get(k) != flat_b.get(k))


def flatten_dict(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out.update(flatten_dict(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply ``section.key=value`` strings (values parsed as YAML: ``0.25``, ``[1, 2]``, ``null``).

    Example:
        >>> cfg = apply_overrides(Config(), ["rch.enabled=false", "data.crop_size=[64, 64]"])
        >>> cfg.rch.enabled, cfg.data.crop_size
        (False, [64, 64])
    """
    data = config_to_dict(cfg)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override must look like 'section.key=value', got {item!r}")
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                raise KeyError(f"unknown config section {part!r} in override {item!r}")
            node = node[part]
        if parts[-1] not in node and not (len(parts) > 2 and parts[-2] == "options"):
            raise KeyError(f"unknown config key {key!r}; valid here: {sorted(node)}")
        node[parts[-1]] = yaml.safe_load(raw)
    return config_from_dict(data)


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a YAML config file and apply overrides.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not valid YAML.
        KeyError / TypeError: unknown keys or wrongly typed values (named in the message).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{path} is not valid YAML: {exc}") from exc
    cfg = config_from_dict(data)
    return apply_overrides(cfg, overrides or [])
