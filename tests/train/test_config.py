"""Configs: YAML, overrides, and errors that name the bad key or value."""

from __future__ import annotations

from pathlib import Path

import pytest

from rch.train.config import Config, apply_overrides, config_from_dict, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").rglob("*.yaml"))


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: x\nrch: {tau: 0.25}\ndata: {crop_size: [32, 48]}\n")
    cfg = load_config(path, ["rch.tau=1", "model.options.width=8", "optim.name=adamw"])
    assert cfg.name == "x" and cfg.rch.tau == 1.0 and isinstance(cfg.rch.tau, float)
    assert cfg.data.crop_size == [32, 48] and cfg.model.options == {"width": 8}
    assert cfg.optim.name == "adamw" and cfg.train.iters == Config().train.iters


def test_errors_name_the_key_or_value(tmp_path):
    with pytest.raises(KeyError, match=r"unknown config key\(s\) \['taus'\] in rch"):
        config_from_dict({"rch": {"taus": 1}})
    with pytest.raises(TypeError, match=r"train\.iters: expected int"):
        config_from_dict({"train": {"iters": "many"}})
    with pytest.raises(KeyError, match=r"unknown config key 'rch\.tua'"):
        apply_overrides(Config(), ["rch.tua=1"])
    with pytest.raises(ValueError, match=r"section\.key=value"):
        apply_overrides(Config(), ["rch.tau"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("rch: [unclosed\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "none.yaml")


def test_the_shipped_configs_cover_every_paper_network_and_dataset():
    assert CONFIGS, "configs/ is empty"
    seen = set()
    for path in CONFIGS:
        cfg = load_config(path)
        seen.add((cfg.model.name, cfg.data.name))
    for model in ("deeplabv3_resnet101", "hrnet_w48_fcn", "hrnet_w48_ocr", "segformer_b0"):
        for data in ("cityscapes", "ade20k", "pascal_context"):
            assert (model, data) in seen, (model, data)
    assert any(data == "camvid" for _, data in seen)


def test_configs_written_with_the_legacy_ohem_pixels_key_still_load():
    """``rch.ohem_pixels`` (before ``rch.ohem``): true hid OHEM's dropped pixels from RCH."""
    assert Config().rch.ohem == "loss"
    assert config_from_dict({"rch": {"ohem_pixels": True}}).rch.ohem == "hide"
    assert config_from_dict({"rch": {"ohem_pixels": False}}).rch.ohem == "off"
    with pytest.raises(KeyError, match=r"rch\.ohem_pixels \(legacy\) and rch\.ohem are both set"):
        config_from_dict({"rch": {"ohem_pixels": True, "ohem": "loss"}})
