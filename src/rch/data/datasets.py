"""Dataset readers for the standard segmentation layouts, all built on one file-pair reader.

Every dataset is a list of ``(image, mask)`` file pairs plus a :class:`DatasetInfo` (class
names, palette, how raw mask values map to train ids). ``__getitem__`` returns the raw
``uint8`` image ``(3, H, W)`` and the ``int64`` label map ``(H, W)`` with ``ignore_index`` for
pixels that belong to no class; augmentation is applied by :mod:`rch.data.transforms`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from . import tables

__all__ = ["DatasetInfo", "SegmentationDataset", "read_image", "read_mask"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class DatasetInfo:
    """What a dataset's labels mean.

    Attributes:
        name: registry name (``"cityscapes"``, ``"camvid"``, ...).
        classes: class names; train id ``k`` is ``classes[k]``.
        palette: ``(K, 3)`` uint8 colours for drawing predictions.
        ignore_index: label of pixels that belong to no class.
        lut: optional 256-entry table mapping raw mask values to train ids (values that map
            to ``ignore_index`` are ignored by design, e.g. Cityscapes' void ids); without it
            raw values are train ids and anything outside ``[0, K)`` that is not
            ``ignore_index`` is an error.
    """

    name: str
    classes: tuple[str, ...]
    palette: np.ndarray = field(repr=False)
    ignore_index: int = 255
    lut: np.ndarray | None = field(default=None, repr=False)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _open(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise FileNotFoundError(f"missing file: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("P", "L", "I", "I;16"):
                return np.asarray(img)
            return np.asarray(img.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ValueError(f"cannot decode image file {path}: {exc}") from exc


def read_image(path: str | Path) -> Tensor:
    """Read an image file as a ``(3, H, W)`` uint8 tensor (grayscale is repeated).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not a decodable image.
    """
    array = _open(Path(path))
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.dtype != np.uint8:
        raise ValueError(f"{path}: expected an 8-bit image, got dtype {array.dtype}")
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def read_mask(path: str | Path, info: DatasetInfo) -> Tensor:
    """Read an index mask and map it to train ids ``(H, W)`` int64.

    Raises:
        ValueError: the mask is not single-channel, or holds values that are neither a class
            nor ``ignore_index`` (the message lists the file and the values).
    """
    array = _open(Path(path))
    if array.ndim != 2:
        raise ValueError(
            f"{path}: expected a single-channel index mask (mode L or P), got {array.shape[2]} "
            "channels; convert colour-coded masks to class indices first"
        )
    if info.lut is not None:
        if array.max(initial=0) > 255:
            raise ValueError(f"{path}: mask values up to {array.max()} exceed the 0..255 table")
        array = info.lut[array]
    labels = torch.from_numpy(array.astype(np.int64))
    bad = (labels >= info.num_classes) & (labels != info.ignore_index) | (labels < 0)
    if bool(bad.any()):
        values = sorted({int(v) for v in labels[bad].unique()[:10]})
        raise ValueError(
            f"{path}: label values {values} are neither a class in [0, {info.num_classes}) "
            f"nor ignore_index {info.ignore_index} (dataset {info.name!r})"
        )
    return labels


class SegmentationDataset(Dataset[tuple[Tensor, Tensor]]):
    """Image/mask file pairs with a :class:`DatasetInfo`.

    Args:
        pairs: ``(image_path, mask_path)`` per sample.
        info: class names, palette, label mapping.
        split: the split's name, for messages.

    Raises:
        FileNotFoundError: ``pairs`` is empty.

    Example:
        >>> import numpy as np, tempfile
        >>> from pathlib import Path
        >>> from PIL import Image
        >>> d = Path(tempfile.mkdtemp())
        >>> Image.fromarray(np.zeros((4, 6, 3), np.uint8)).save(d / "a.png")
        >>> Image.fromarray(np.ones((4, 6), np.uint8)).save(d / "a_mask.png")
        >>> info = DatasetInfo("toy", ("bg", "fg"), np.zeros((2, 3), np.uint8))
        >>> ds = SegmentationDataset([(d / "a.png", d / "a_mask.png")], info)
        >>> image, mask = ds[0]
        >>> tuple(image.shape), tuple(mask.shape), int(mask.max())
        ((3, 4, 6), (4, 6), 1)
    """

    def __init__(
        self, pairs: Sequence[tuple[Path, Path]], info: DatasetInfo, split: str = ""
    ) -> None:
        if not pairs:
            raise FileNotFoundError(f"dataset {info.name!r} split {split!r}: no samples found")
        self.pairs = [(Path(i), Path(m)) for i, m in pairs]
        self.info = info
        self.split = split
        self._decoded: dict[int, tuple[Tensor, Tensor]] | None = None

    def __len__(self) -> int:
        return len(self.pairs)

    def cache_decoded(self) -> SegmentationDataset:
        """Keep every sample in memory once it has been decoded (returns ``self``).

        Decoding a CamVid PNG pair takes about 16 ms, a tenth of a small network's CPU
        training step at batch 8; the cache reads each file once. Masks are kept as uint8
        when their values fit, images as uint8: about 2.7 MB per 960x720 sample, 1 GB for
        CamVid's train split. Each loader worker process holds its own copy. The tensors
        returned are the cached ones: do not modify them in place (the training
        transforms never do).
        """
        if self._decoded is None:
            self._decoded = {}
        return self

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        if self._decoded is None:
            return self._read(index)
        if index not in self._decoded:
            image, mask = self._read(index)
            small = mask.numel() == 0 or (int(mask.min()) >= 0 and int(mask.max()) <= 255)
            self._decoded[index] = (image, mask.to(torch.uint8) if small else mask)
        image, mask = self._decoded[index]
        return image, mask.to(torch.int64)

    def _read(self, index: int) -> tuple[Tensor, Tensor]:
        image_path, mask_path = self.pairs[index]
        image = read_image(image_path)
        mask = read_mask(mask_path, self.info)
        if tuple(image.shape[1:]) != tuple(mask.shape):
            raise ValueError(
                f"image {image_path} is {tuple(image.shape[1:])} (H, W) but its mask "
                f"{mask_path} is {tuple(mask.shape)}"
            )
        return image, mask

    def name_of(self, index: int) -> str:
        return self.pairs[index][0].stem


def default_palette(num_classes: int) -> np.ndarray:
    """The PASCAL VOC bit-interleaved colour map, ``(K, 3)`` uint8."""
    return tables.voc_colormap(num_classes)
