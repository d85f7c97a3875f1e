"""Dataset readers on fixture trees written in each real layout, and their errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rch.data import DATASETS, build_dataset, parse_data_spec, read_image

from . import trees

SHARED_CAMVID = Path(__file__).resolve().parents[3] / "shared" / "data" / "camvid"


def labels_of(ds) -> list[int]:
    return ds[0][1].flatten()[:4].tolist()


def test_cityscapes_maps_label_ids_to_train_ids(tmp_path):
    trees.cityscapes(tmp_path, [7, 26, 0, 33])  # road, car, unlabeled, bicycle
    ds = build_dataset("cityscapes", tmp_path, "train")
    assert len(ds) == 1 and ds.info.num_classes == 19
    assert labels_of(ds) == [0, 13, 255, 18]
    assert len(build_dataset("cityscapes", tmp_path, "val")) == 1


def test_ade20k_shifts_classes_and_ignores_other(tmp_path):
    trees.ade20k(tmp_path, [1, 150, 0, 13])
    for root in (tmp_path, tmp_path / "ADEChallengeData2016"):
        ds = build_dataset("ade20k", root, "val")
        assert len(ds) == 2 and ds.info.num_classes == 150
        assert labels_of(ds) == [0, 149, 255, 12]


def test_pascal_context_59_classes(tmp_path):
    base = tmp_path / "VOCdevkit" / "VOC2010"
    trees.voc_like(base, "SegmentationContext", "SegmentationClassContext", [0, 1, 59, 5], "L")
    ds = build_dataset("pascal_context", tmp_path, "train")
    assert len(ds) == 2 and ds.info.num_classes == 59
    assert labels_of(ds) == [255, 0, 58, 4]


def test_voc_reads_palette_masks_and_keeps_border_ignored(tmp_path):
    base = tmp_path / "VOCdevkit" / "VOC2012"
    trees.voc_like(base, "Segmentation", "SegmentationClass", [0, 15, 255, 20], "P")
    ds = build_dataset("voc", tmp_path, "val")
    assert len(ds) == 1 and ds.info.num_classes == 21
    assert labels_of(ds) == [0, 15, 255, 20]


@pytest.mark.parametrize("segnet", [False, True])
def test_camvid_both_layouts_ignore_class_11(tmp_path, segnet):
    trees.camvid(tmp_path, [0, 10, 11, 3], segnet=segnet)
    ds = build_dataset("camvid", tmp_path, "train")
    assert len(ds) == 2 and ds.info.num_classes == 11
    assert labels_of(ds) == [0, 10, 255, 3]


def test_folder_with_class_list(tmp_path):
    trees.folder(tmp_path, [0, 2, 255, 1], ["bg", "cat", "dog"])
    ds = build_dataset("folder", tmp_path, "train")
    assert ds.info.classes == ("bg", "cat", "dog")
    assert labels_of(ds) == [0, 2, 255, 1]
    image, mask = ds[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 4, 6) and mask.dtype == torch.int64


def test_real_camvid_copy_reads_with_11_classes():
    assert SHARED_CAMVID.is_dir(), f"the shared CamVid copy is missing at {SHARED_CAMVID}"
    ds = build_dataset("camvid", SHARED_CAMVID, "val")
    assert len(ds) == 101
    image, mask = ds[0]
    assert image.shape == (3, 360, 480) and mask.shape == (360, 480)
    assert set(mask.unique().tolist()) <= set(range(11)) | {255}


def test_label_values_out_of_range_name_file_and_values(tmp_path):
    trees.folder(tmp_path, [0, 7, 9, 1], ["bg", "cat", "dog"])
    ds = build_dataset("folder", tmp_path, "train")
    with pytest.raises(ValueError, match=r"a\.png: label values \[7, 9\] are neither a class"):
        ds[0]


def test_size_mismatch_names_both_files(tmp_path):
    trees.folder(tmp_path, [0, 1], ["bg", "fg"])
    Image.fromarray(np.zeros((5, 6), np.uint8)).save(tmp_path / "masks" / "train" / "a.png")
    with pytest.raises(ValueError, match=r"is \(4, 6\) \(H, W\) but its mask .* is \(5, 6\)"):
        build_dataset("folder", tmp_path, "train")[0]


def test_corrupt_image_and_colour_mask_are_reported(tmp_path):
    trees.folder(tmp_path, [0, 1], ["bg", "fg"])
    (tmp_path / "images" / "train" / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(ValueError, match=r"cannot decode image file .*a\.png"):
        read_image(tmp_path / "images" / "train" / "a.png")
    trees.folder(tmp_path, [0, 1], ["bg", "fg"])
    Image.fromarray(np.zeros((4, 6, 3), np.uint8)).save(tmp_path / "masks" / "val" / "a.png")
    with pytest.raises(ValueError, match="single-channel index mask"):
        build_dataset("folder", tmp_path, "val")[0]


def test_missing_files_and_names(tmp_path):
    with pytest.raises(FileNotFoundError, match="cityscapes train: directory not found"):
        build_dataset("cityscapes", tmp_path, "train")
    trees.camvid(tmp_path, [0, 1])
    (tmp_path / "labels" / "train" / "0001TP_000001.png").unlink()
    with pytest.raises(FileNotFoundError, match="1 images have no mask"):
        build_dataset("camvid", tmp_path, "train")
    with pytest.raises(KeyError, match=r"unknown dataset 'kitti'.*camvid"):
        build_dataset("kitti", tmp_path, "train")
    with pytest.raises(KeyError, match="unknown dataset"):
        parse_data_spec("kitti:/x")
    assert set(DATASETS) >= {"cityscapes", "ade20k", "pascal_context", "voc", "camvid", "folder"}


def test_cached_samples_equal_the_files_and_are_read_once(tmp_path):
    trees.camvid(tmp_path, [0, 10, 11, 3])
    plain = build_dataset("camvid", tmp_path, "train")
    cached = build_dataset("camvid", tmp_path, "train").cache_decoded()
    assert cached.cache_decoded() is cached  # idempotent: the cache is kept
    first = [cached[i] for i in range(len(cached))]
    for path in (tmp_path / "images" / "train").iterdir():
        path.unlink()  # a second read would fail: the samples must come from memory
    with pytest.raises(FileNotFoundError):
        plain[0]
    for i, (image, mask) in enumerate(first):
        again = cached[i]
        assert torch.equal(again[0], image) and torch.equal(again[1], mask)
        assert mask.dtype == torch.int64 and mask.flatten()[:4].tolist() == [0, 10, 255, 3]


def test_cache_keeps_masks_whose_values_do_not_fit_a_byte(tmp_path):
    trees.folder(tmp_path, [0, 2, 255, 1], ["bg", "cat", "dog"])
    ds = build_dataset("folder", tmp_path, "train", ignore_index=-1).cache_decoded()
    wide = torch.tensor([[-1, 300]])
    ds._read = lambda index: (torch.zeros(3, 1, 2, dtype=torch.uint8), wide)  # type: ignore[method-assign]
    assert ds[0][1].tolist() == [[-1, 300]]
