"""Two tiny finished runs (baseline and RCH) shared by the figure and report tests."""

from __future__ import annotations

import pytest

from rch.train import train

from ..train.helpers import tiny_config


@pytest.fixture(scope="package")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("viz")
    common = {"train": {"iters": 4, "log_every": 2, "eval_every": 2}}
    base = train(
        tiny_config(tmp, name="baseline", rch={"enabled": False}, **common), progress=False
    )
    rch = train(tiny_config(tmp, name="rch", **common), progress=False)
    return base.run_dir, rch.run_dir
