"""Datasets by name: the standard layouts, a plain folder, and a generated default.

Example:
    >>> from rch.data import DATASETS
    >>> sorted(DATASETS)
    ['ade20k', 'camvid', 'cityscapes', 'folder', 'pascal_context', 'synthetic', 'voc']
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from . import layouts
from .datasets import DatasetInfo, SegmentationDataset, read_image, read_mask
from .loader import SampleStream, TrainSet, make_eval_loader, make_train_loader
from .synthetic import SYNTHETIC_PALETTE, ensure_synthetic
from .transforms import Augment, augment, normalize

__all__ = [
    "DATASETS",
    "Augment",
    "DatasetInfo",
    "SampleStream",
    "SegmentationDataset",
    "TrainSet",
    "augment",
    "build_dataset",
    "make_eval_loader",
    "make_train_loader",
    "normalize",
    "parse_data_spec",
    "read_image",
    "read_mask",
]


def _synthetic(
    root: Path | None, split: str, ignore_index: int = 255, **options: Any
) -> SegmentationDataset:
    built = ensure_synthetic(root, **options)
    dataset = layouts.folder(built, split, ignore_index, image_dir="images", mask_dir="labels")
    dataset.info = replace(dataset.info, name="synthetic", palette=SYNTHETIC_PALETTE)
    return dataset


DATASETS: dict[str, Callable[..., SegmentationDataset]] = {
    "cityscapes": layouts.cityscapes,
    "ade20k": layouts.ade20k,
    "pascal_context": layouts.pascal_context,
    "voc": layouts.voc,
    "camvid": layouts.camvid,
    "folder": layouts.folder,
    "synthetic": _synthetic,
}


def build_dataset(
    name: str, root: str | Path, split: str, ignore_index: int = 255, **options: Any
) -> SegmentationDataset:
    """Build a dataset by registry name.

    Args:
        name: one of :data:`DATASETS`.
        root: the dataset's root directory (for ``synthetic``: the cache directory, ``""`` for
            the default one).
        split: ``"train"``, ``"val"``, ...
        ignore_index: label of pixels that belong to no class.
        **options: layout options (``folder``: ``classes``, ``image_dir``, ``mask_dir``,
            ``mask_suffix``; ``synthetic``: ``seed``, ``train``, ``val``, ``height``, ``width``).

    Raises:
        KeyError: unknown name (the message lists the known ones).
        FileNotFoundError: the layout is not found under ``root``.
    """
    if name not in DATASETS:
        raise KeyError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    path = Path(root) if str(root) else None  # "" (not ".") means the default location
    if path is None and name != "synthetic":
        raise ValueError(f"dataset {name!r} needs its root directory")
    return DATASETS[name](path, split, ignore_index, **dict(options))


def parse_data_spec(spec: str) -> tuple[str, str]:
    """Split ``"name:root"`` (``"camvid:../data/camvid"``); a bare name has root ``""``.

    Example:
        >>> parse_data_spec("camvid:/data/camvid")
        ('camvid', '/data/camvid')
    """
    name, _, root = spec.partition(":")
    if name not in DATASETS:
        raise KeyError(f"unknown dataset {name!r} in {spec!r}; choose one of {sorted(DATASETS)}")
    return name, root
