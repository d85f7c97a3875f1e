"""The command line: every subcommand, its outputs, and its one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from rch.cli import main
from rch.models import build_model
from rch.train import load_checkpoint

from .train.helpers import tiny_config


def _write_config(tmp_path, iters: int = 2):
    cfg = tiny_config(tmp_path)
    path = tmp_path / "c.yaml"
    path.write_text(
        "name: cli\nmodel: {name: tiny, options: {width: 8}}\n"
        f"data: {{name: synthetic, root: '{cfg.data.root}', crop_size: [32, 48],"
        " options: {train: 12, val: 3, height: 32, width: 48}}\n"
        "rch: {embed_dim: 8}\nloss: {ohem_min_kept: 500}\n"
        f"train: {{iters: {iters}, batch_size: 2, out_dir: '{tmp_path / 'runs'}'}}\n"
    )
    return path


def test_train_eval_export_round_trip(tmp_path, capsys):
    config = _write_config(tmp_path)
    assert main(["train", str(config), "--set", "rch.tau=0.25", "--no-progress"]) == 0
    run = tmp_path / "runs" / "cli"
    assert load_checkpoint(run / "checkpoints" / "last.pt")["config"]["rch"]["tau"] == 0.25
    assert (
        main(
            [
                "eval",
                str(run),
                "--mode",
                "slide",
                "--crop",
                "16,16",
                "--stride",
                "8,8",
                "--scales",
                "0.75",
                "1",
                "--flip",
                "--no-progress",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "mean" in out and "aAcc" in out
    written = json.loads((run / "eval-val.json").read_text())
    assert written["inference"]["mode"] == "slide" and written["inference"]["flip"] is True
    assert len(written["IoU"]) == 10 and len(written["confusion"]) == 10
    assert main(["export", str(run), str(tmp_path / "m.pt")]) == 0
    exported = torch.load(tmp_path / "m.pt", weights_only=True)
    assert list(exported) == list(build_model("tiny", 10, width=8).model.state_dict())


def test_errors_are_one_line_with_exit_status_2(tmp_path, capsys):
    config = _write_config(tmp_path)
    assert main(["train", str(config), "--set", "rch.tua=1"]) == 2
    assert "unknown config key 'rch.tua'" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "nowhere")]) == 2
    assert "no checkpoint at" in capsys.readouterr().err
    assert main(["train", str(config), "--set", "data.name=kitti"]) == 2
    assert "unknown dataset 'kitti'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["trian"])


def test_ablate_runs_rows_once_and_reuses_them(tmp_path, capsys):
    config = _write_config(tmp_path)
    args = [
        "ablate",
        str(config),
        "--rows",
        "baseline",
        "tp",
        "full",
        "--seeds",
        "0",
        "1",
        "--no-progress",
        "--mark",
        "car",
        "pole",
        "unicorn",
    ]
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "--mark: no class named unicorn" in table
    rows = table.splitlines()
    first = rows.index(next(r for r in rows if r.startswith("class (IoU delta)")))
    assert [r.split()[:2] for r in rows[first + 1 : first + 3]] == [["car", "*"], ["pole", "*"]]
    for row in ("baseline", "tp", "full"):
        assert any(line.startswith(row) for line in table.splitlines())
    summary = json.loads((tmp_path / "runs" / "cli-ablation.json").read_text())
    figure = tmp_path / "runs" / "cli-ablation.png"  # paired differences to the baseline
    assert f"figure: {figure}" in table and figure.read_bytes()[:4] == b"\x89PNG"
    assert set(summary["mIoU"]) == {"baseline", "tp", "full"}
    assert all(len(v) == 2 for v in summary["mIoU"].values())
    # the paired analysis: per seed, per class, recall / precision, all runs pooled
    full = summary["summary"]["full"]
    assert full["paired_seeds"] == [0, 1] and len(full["class_delta"]) == 10  # the classes
    assert full["paired_diff"][1] == pytest.approx(
        100 * (summary["mIoU"]["full"][1] - summary["mIoU"]["baseline"][1])
    )
    assert set(full["recall_delta"]) == set(full["class_delta"])
    assert summary["pooled"]["runs"] == 4 and summary["pooled"]["baseline_runs"] == 2
    assert "class (IoU delta)" in table and "recall / precision delta" in table
    assert "all RCH runs pooled: 4 runs of 2 variant(s)" in table
    # the variant + seed fit: with every variant on every seed, the paired means
    additive = summary["additive"]
    assert additive["runs"] == 6 and additive["df"] == (3 - 1) * (2 - 1)
    assert additive["effects"]["full"]["effect"] == pytest.approx(full["diff_mean"], abs=1e-9)
    assert "two-way additive fit (variant + seed, least squares over all 6 runs)" in table
    # the F tests: tp and full among themselves, and with the baseline (2 residual df)
    assert set(summary["f_tests"]) == {"RCH rows", "every variant"}
    assert summary["f_tests"]["every variant"]["df2"] == (3 - 1) * (2 - 1)
    assert "variant effects (every variant), F test" in table
    # the resolving power needs a spread of paired differences (these tiny runs may all tie)
    assert (summary["power"] is None) == (full["pooled_sd"] == 0)
    assert ("resolving power" in table) == (summary["power"] is not None)
    cfg = load_checkpoint(tmp_path / "runs" / "cli-tp-s1" / "checkpoints" / "last.pt")["config"]
    assert cfg["seed"] == 1 and cfg["rch"]["fn_term"] is False and cfg["rch"]["fp_term"] is False
    stamp = (tmp_path / "runs" / "cli-full-s0" / "eval.json").stat().st_mtime_ns
    assert main(args) == 0  # finished runs are reused
    assert (tmp_path / "runs" / "cli-full-s0" / "eval.json").stat().st_mtime_ns == stamp


def test_demo_trains_both_and_prints_the_side_by_side_table(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RCH_CACHE", str(tmp_path / "cache"))
    assert main(["demo", "--iters", "3", "--out", str(tmp_path / "demo"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "baseline" in out and "d RCH" in out and "mIoU" in out and "ms/iter" in out
    assert f"{tmp_path / 'demo' / 'report' / 'index.html'}" in out
    assert (tmp_path / "demo" / "report" / "index.html").stat().st_size > 10_000
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert summary["iters"] == 3 and set(summary) >= {"baseline", "rch"}
    with pytest.raises(SystemExit, match="--iters must be >= 1"):
        main(["demo", "--iters", "0"])


def test_import_rch_does_not_load_optional_stacks():
    code = (
        "import sys, rch\n"
        "bad = [m for m in ('matplotlib', 'timm', 'segmentation_models_pytorch', 'torchvision',"
        " 'transformers', 'yaml', 'PIL') if m in sys.modules]\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
