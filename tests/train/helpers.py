"""A tiny training config on the generated data, fast enough for unit tests."""

from __future__ import annotations

from pathlib import Path

from rch.train.config import Config, config_from_dict


def tiny_config(tmp_path: Path, **sections) -> Config:
    data = {
        "name": "synthetic",
        "root": str(tmp_path / "cache"),
        "options": {"train": 12, "val": 3, "height": 32, "width": 48},
        "crop_size": [32, 48],
    }
    base = {
        "name": "t",
        "seed": 0,
        "model": {"name": "tiny", "options": {"width": 8}},
        "data": data,
        "rch": {"embed_dim": 8},
        "loss": {"ohem_min_kept": 500},
        "optim": {"name": "sgd", "lr": 0.01},
        "train": {
            "iters": 4,
            "batch_size": 2,
            "log_every": 1,
            "ckpt_every": 2,
            "out_dir": str(tmp_path / "runs"),
        },
    }
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return config_from_dict(base)
