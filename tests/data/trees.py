"""Write tiny dataset trees in each real layout (PNG/JPEG files made by the tests)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_pair(image: Path, mask: Path, values: np.ndarray, mode: str = "L") -> None:
    image.parent.mkdir(parents=True, exist_ok=True)
    mask.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.stack([values * 7 % 256, values * 3 % 256, np.full_like(values, 100)], -1)
    img = Image.fromarray(rgb.astype(np.uint8))
    img.save(image, quality=95) if image.suffix == ".jpg" else img.save(image)
    m = Image.fromarray(values.astype(np.uint8))
    if mode == "P":
        m = m.convert("P")
    m.save(mask)


def raw_mask(values: list[int], h: int = 4, w: int = 6) -> np.ndarray:
    """A mask whose first pixels hold ``values`` and the rest the first value."""
    flat = np.full(h * w, values[0], dtype=np.int64)
    flat[: len(values)] = values
    return flat.reshape(h, w)


def cityscapes(root: Path, values: list[int]) -> None:
    for split, city in (("train", "aachen"), ("val", "lindau")):
        stem = f"{city}_000000_000019"
        write_pair(
            root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png",
            root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png",
            raw_mask(values),
        )


def ade20k(root: Path, values: list[int]) -> None:
    base = root / "ADEChallengeData2016"
    for split in ("training", "validation"):
        for i in range(2):
            name = f"ADE_{split[:3]}_{i:08d}"
            write_pair(
                base / "images" / split / f"{name}.jpg",
                base / "annotations" / split / f"{name}.png",
                raw_mask(values),
            )


def voc_like(base: Path, list_dir: str, mask_dir: str, values: list[int], mode: str) -> None:
    for split, ids in (("train", ["2008_000001", "2008_000002"]), ("val", ["2008_000003"])):
        lists = base / "ImageSets" / list_dir
        lists.mkdir(parents=True, exist_ok=True)
        (lists / f"{split}.txt").write_text("\n".join(ids) + "\n")
        for i in ids:
            write_pair(
                base / "JPEGImages" / f"{i}.jpg",
                base / mask_dir / f"{i}.png",
                raw_mask(values),
                mode,
            )


def camvid(root: Path, values: list[int], segnet: bool = False) -> None:
    for split in ("train", "val"):
        for i in range(2):
            name = f"0001TP_{i:06d}.png"
            if segnet:
                image, mask = root / split / name, root / f"{split}annot" / name
            else:
                image, mask = root / "images" / split / name, root / "labels" / split / name
            write_pair(image, mask, raw_mask(values))


def folder(root: Path, values: list[int], classes: list[str]) -> None:
    for split in ("train", "val"):
        write_pair(
            root / "images" / split / "a.png", root / "masks" / split / "a.png", raw_mask(values)
        )
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
