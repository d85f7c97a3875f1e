"""The command line and the demo it runs."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from rch.cli import main
from rch.demo import TinySegNet, make_toy_batch


def test_demo_trains_both_runs_and_prints_tables(capsys):
    assert main(["demo", "--steps", "4"]) == 0
    out = capsys.readouterr().out
    assert "training baseline for 4 steps" in out and "training RCH for 4 steps" in out
    assert "RCH:rch" in out and "mIoU" in out


def test_demo_rejects_bad_steps():
    with pytest.raises(SystemExit, match="--steps must be >= 1"):
        main(["demo", "--steps", "0"])


def test_unknown_command_exits_with_usage():
    with pytest.raises(SystemExit):
        main(["trian"])


def test_toy_data_is_deterministic_and_labelled():
    a = make_toy_batch(torch.Generator().manual_seed(3), 2, size=32)
    b = make_toy_batch(torch.Generator().manual_seed(3), 2, size=32)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert set(torch.unique(a[1]).tolist()) <= set(range(7)) and len(torch.unique(a[1])) > 1
    assert TinySegNet()(a[0]).shape == (2, 7, 32, 32)


def test_import_rch_does_not_load_optional_stacks():
    code = (
        "import sys, rch\n"
        "bad = [m for m in ('matplotlib', 'timm', 'segmentation_models_pytorch', 'torchvision')"
        " if m in sys.modules]\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
