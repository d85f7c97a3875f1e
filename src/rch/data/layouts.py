"""Where each standard dataset keeps its images and masks, and what its labels mean."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from . import tables
from .datasets import IMAGE_SUFFIXES, DatasetInfo, SegmentationDataset, default_palette

__all__ = ["ade20k", "camvid", "cityscapes", "folder", "pascal_context", "voc"]


def _dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"{what}: directory not found: {path}")
    return path


def _images(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def _pair_by_stem(
    images: Sequence[Path], mask_dir: Path, what: str, suffix: str = "", ext: str = ".png"
) -> list[tuple[Path, Path]]:
    pairs: list[tuple[Path, Path]] = []
    missing: list[tuple[Path, Path]] = []
    for image in images:
        mask = mask_dir / f"{image.stem}{suffix}{ext}"
        (pairs if mask.is_file() else missing).append((image, mask))
    if missing:
        shown = ", ".join(str(m) for _, m in missing[:3])
        raise FileNotFoundError(f"{what}: {len(missing)} images have no mask, e.g. {shown}")
    return pairs


def _ids(list_file: Path, what: str) -> list[str]:
    if not list_file.is_file():
        raise FileNotFoundError(f"{what}: split list not found: {list_file}")
    return [line.split()[0] for line in list_file.read_text().splitlines() if line.strip()]


def _first_dir(root: Path, *candidates: str) -> Path:
    for candidate in candidates:
        if (root / candidate).is_dir():
            return root / candidate
    return root


def cityscapes(root: Path, split: str, ignore_index: int = 255) -> SegmentationDataset:
    """``leftImg8bit/{split}/{city}/*_leftImg8bit.png`` + ``gtFine/.../*_gtFine_labelIds.png``.

    The 34 ``labelIds`` are mapped to the 19 train ids; every other id is ignored.
    """
    what = f"cityscapes {split}"
    images = sorted(_dir(root / "leftImg8bit" / split, what).glob("*/*_leftImg8bit.png"))
    gt = _dir(root / "gtFine" / split, what)
    pairs: list[tuple[Path, Path]] = []
    missing: list[tuple[Path, Path]] = []
    for image in images:
        stem = image.name[: -len("_leftImg8bit.png")]
        mask = gt / image.parent.name / f"{stem}_gtFine_labelIds.png"
        (pairs if mask.is_file() else missing).append((image, mask))
    if missing:
        raise FileNotFoundError(f"{what}: {len(missing)} images have no mask, e.g. {missing[0][1]}")
    info = DatasetInfo(
        "cityscapes",
        tables.CITYSCAPES_CLASSES,
        tables.CITYSCAPES_PALETTE,
        ignore_index,
        tables.cityscapes_lut(ignore_index),
    )
    return SegmentationDataset(pairs, info, split)


def ade20k(root: Path, split: str, ignore_index: int = 255) -> SegmentationDataset:
    """``ADEChallengeData2016/{images,annotations}/{training,validation}``; 0 ("other") ignored."""
    base = _first_dir(root, "ADEChallengeData2016")
    sub = {"train": "training", "val": "validation"}.get(split, split)
    what = f"ade20k {split}"
    images = _images(_dir(base / "images" / sub, what))
    pairs = _pair_by_stem(images, _dir(base / "annotations" / sub, what), what)
    classes = tables.ADE20K_CLASSES
    info = DatasetInfo(
        "ade20k",
        classes,
        default_palette(len(classes)),
        ignore_index,
        tables.shift_lut(ignore_index),
    )
    return SegmentationDataset(pairs, info, split)


def pascal_context(root: Path, split: str, ignore_index: int = 255) -> SegmentationDataset:
    """``VOCdevkit/VOC2010``: ``JPEGImages``, ``SegmentationClassContext`` (0..59, 0 ignored),
    ``ImageSets/SegmentationContext/{split}.txt``; the 59-class setting."""
    base = _first_dir(root, "VOCdevkit/VOC2010", "VOC2010")
    what = f"pascal_context {split}"
    ids = _ids(base / "ImageSets" / "SegmentationContext" / f"{split}.txt", what)
    pairs = [
        (base / "JPEGImages" / f"{i}.jpg", base / "SegmentationClassContext" / f"{i}.png")
        for i in ids
    ]
    _check_exist(pairs, what)
    classes = tables.PASCAL_CONTEXT_CLASSES
    info = DatasetInfo(
        "pascal_context",
        classes,
        default_palette(len(classes) + 1)[1:],
        ignore_index,
        tables.shift_lut(ignore_index),
    )
    return SegmentationDataset(pairs, info, split)


def voc(root: Path, split: str, ignore_index: int = 255) -> SegmentationDataset:
    """``VOCdevkit/VOC2012``: ``JPEGImages``, ``SegmentationClass`` (palette PNGs, 255 = border),
    ``ImageSets/Segmentation/{split}.txt``."""
    base = _first_dir(root, "VOCdevkit/VOC2012", "VOC2012")
    what = f"voc {split}"
    ids = _ids(base / "ImageSets" / "Segmentation" / f"{split}.txt", what)
    pairs = [
        (base / "JPEGImages" / f"{i}.jpg", base / "SegmentationClass" / f"{i}.png") for i in ids
    ]
    _check_exist(pairs, what)
    classes = tables.VOC_CLASSES
    info = DatasetInfo(
        "voc",
        classes,
        default_palette(len(classes)),
        ignore_index,
        tables.identity_lut(ignore_index),
    )
    return SegmentationDataset(pairs, info, split)


def camvid(root: Path, split: str, ignore_index: int = 255) -> SegmentationDataset:
    """SegNet's 11-class CamVid: ``images/{split}`` + ``labels/{split}`` (same names), or the
    original ``{split}/`` + ``{split}annot/`` folders. Value 11 (unlabelled) is ignored."""
    what = f"camvid {split}"
    if (root / "images").is_dir():
        image_dir, mask_dir = root / "images" / split, root / "labels" / split
    else:
        image_dir, mask_dir = root / split, root / f"{split}annot"
    images = _images(_dir(image_dir, what))
    pairs = _pair_by_stem(images, _dir(mask_dir, what), what)
    info = DatasetInfo(
        "camvid",
        tables.CAMVID_CLASSES,
        tables.CAMVID_PALETTE,
        ignore_index,
        tables.identity_lut(ignore_index, {11: -1}),
    )
    return SegmentationDataset(pairs, info, split)


def folder(
    root: Path,
    split: str,
    ignore_index: int = 255,
    classes: Sequence[str] | None = None,
    image_dir: str = "images",
    mask_dir: str = "masks",
    mask_suffix: str = "",
) -> SegmentationDataset:
    """A plain folder of images and index masks.

    Images are ``{image_dir}[/{split}]/NAME.*``, masks ``{mask_dir}[/{split}]/NAME{suffix}.png``;
    classes come from ``classes=`` or ``classes.txt`` in ``root`` (one name per line).
    """
    what = f"folder {root} {split}"
    images_root, masks_root = _dir(root / image_dir, what), _dir(root / mask_dir, what)
    if split and (images_root / split).is_dir():
        images_root, masks_root = images_root / split, masks_root / split
    if classes is None:
        list_file = root / "classes.txt"
        if not list_file.is_file():
            raise FileNotFoundError(f"{what}: give classes= or write {list_file}, one per line")
        classes = [line.strip() for line in list_file.read_text().splitlines() if line.strip()]
    pairs = _pair_by_stem(_images(images_root), masks_root, what, mask_suffix)
    names = tuple(classes)
    info = DatasetInfo("folder", names, default_palette(len(names)), ignore_index)
    return SegmentationDataset(pairs, info, split)


def _check_exist(pairs: Sequence[tuple[Path, Path]], what: str) -> None:
    missing = [p for pair in pairs for p in pair if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{what}: {len(missing)} listed files are missing, e.g. {missing[0]}"
        )
