"""The cost benchmark runs end to end on its smallest setting and writes its JSON."""

from __future__ import annotations

import json
import math
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_loss_cost_quick_writes_json(tmp_path: Path):
    out = tmp_path / "cost.json"
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "loss_cost.py"),
            "--quick",
            "--reps",
            "1",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    assert "paper/bound" in run.stdout
    data = json.loads(out.read_text())
    row = data["rows"][0]
    assert set(row["results"]) == {"ce", "bound", "autograd", "paper", "official", "pairwise"}
    assert all(r["time_s"] > 0 and r["peak_mib"] >= 0 for r in row["results"].values())
    paper, bound = row["results"]["paper"]["times_s"], row["results"]["bound"]["times_s"]
    ratios = [p / b for p, b in zip(paper, bound, strict=True)]
    assert row["paper_over_bound_time_paired"] == statistics.median(ratios)
    assert data["meta"]["command"].startswith("python")


def test_loss_memory_quick_measures_both_paths(tmp_path: Path):
    """The GPU path's bytes are measured on the CPU; smaller row blocks lower its peak."""
    out = tmp_path / "memory.json"
    script = str(ROOT / "benchmarks" / "loss_memory.py")
    cmd = [sys.executable, script, "--quick", "--formulations", "paper", "official"]
    run = subprocess.run([*cmd, "--out", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    rows = {(r["formulation"], r["path"]): r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {
        (f, p) for f in ("paper", "official") for p in ("cpu", "gpu, 1 B blocks", "gpu, one block")
    }
    assert all(r["peak_mib"] > 0 for r in rows.values())
    blocked, whole = rows["paper", "gpu, 1 B blocks"], rows["paper", "gpu, one block"]
    assert blocked["peak_mib"] < whole["peak_mib"]


def test_train_cost_quick_checks_inference_equality(tmp_path: Path):
    out = tmp_path / "train.json"
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "train_cost.py"),
        "--quick",
        "--networks",
        "segformer_b0",
        "--out",
        str(out),
    ]
    run = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
    assert "segformer_b0" in run.stdout and "identical" in run.stdout
    res = json.loads(out.read_text())["results"]["segformer_b0"]
    inf = res["inference"]
    assert inf["params_exported"] == inf["params_baseline"] < inf["params_training_rch"]
    assert inf["flops_exported"] == inf["flops_baseline"] > 0
    assert inf["outputs_bitwise_equal_to_attached"] and inf["state_dict_keys_equal"]
    assert res["time_ratio"] > 0 and res["memory_ratio"] > 0
    q1, q2, q3 = res["paired_ratio_quartiles"]  # of the per-repetition ratios
    assert 0 < q1 <= q2 <= q3
    assert "syncs_per_step" not in res  # counted on CUDA only
    # The file-backed pages (shared libraries) are part of the peak, not all of it, and the
    # ratio without them is computed from the same four numbers.
    peak, files = res["peak_mib"], res["file_backed_mib"]
    assert all(0 < files[v] < peak[v] for v in ("baseline", "rch"))
    without = (peak["rch"] - files["rch"]) / (peak["baseline"] - files["baseline"])
    assert res["memory_ratio_without_files"] == without


def test_step_ops_counts_what_rch_adds_to_a_step_on_the_gpu_path(tmp_path: Path):
    """RCH adds launches to every phase but the optimiser's step (four more parameters in
    one foreach update), and reads the host once with its value checks, never without."""
    out = tmp_path / "ops.json"
    script = str(ROOT / "benchmarks" / "step_ops.py")
    cmd = [sys.executable, script, "--quick", "--networks", "deeplabv3_resnet50", "--out", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    rows = json.loads(out.read_text())["results"]["deeplabv3_resnet50"]
    assert set(rows) == {"baseline", "rch", "rch, no checks", "rch, deferred checks"}
    base, rch, unchecked = rows["baseline"], rows["rch"], rows["rch, no checks"]
    deferred = rows["rch, deferred checks"]
    for phase in ("forward", "backward"):
        assert rch[phase]["launches"] > base[phase]["launches"]
    assert rch["optimizer"] == base["optimizer"]
    assert [r["step"]["reads"] for r in (base, rch, unchecked, deferred)] == [0, 1, 0, 0]
    assert 0 < unchecked["added_launches"] < rch["added_launches"]
    assert unchecked["added_launches"] < deferred["added_launches"]
    for row in rows.values():
        for phase, counts in row["by_operator"].items():
            assert sum(counts.values()) == row[phase]["ops"] >= row[phase]["launches"]
    assert "deeplabv3_resnet50" in run.stdout


def test_step_ops_times_the_gpu_as_the_union_of_its_activities():
    """On CUDA the GPU time of a phase is how long at least one device activity ran: host
    events do not count, overlapping activities count once."""
    import doctest
    from types import SimpleNamespace

    ops = _bench_module("step_ops")
    assert doctest.testmod(ops).failed == 0

    def event(device: Any, start: float, end: float) -> SimpleNamespace:
        return SimpleNamespace(device_type=device, time_range=SimpleNamespace(start=start, end=end))

    cuda, cpu = ops.DeviceType.CUDA, ops.DeviceType.CPU
    events = [event(cpu, 0, 9000), event(cuda, 2000, 2500), event(cuda, 100, 400)]
    events += [event(cuda, 300, 1000), event(cuda, 2500, 2600)]
    assert ops.gpu_activity(events) == (4, 1.5)  # 100-1000 and 2000-2600 us
    assert ops.gpu_activity([event(cpu, 0, 5)]) == (0, 0)
    assert ops.busy_us([(0, 10), (2, 3)]) == 10


@pytest.mark.parametrize(("budget", "ran"), [(60, True), (20, False)])
def test_gpu_checks_always_archive_their_logs(tmp_path: Path, budget: int, ran: bool):
    """A lent GPU machine kills a command at its time limit, and then nothing of it comes
    back: ``gpu_checks.sh`` keeps within ``BUDGET``, skipping the steps it has no time for,
    so that its last step, the logs' archive, always runs. (``PYTHON=false``: every step
    fails at once, as each step's failure is remembered in the exit status.)"""
    import tarfile

    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": "false", "BUDGET": str(budget)}
    script = str(ROOT / "benchmarks" / "gpu_checks.sh")
    run = subprocess.run(
        ["bash", script, str(out)], capture_output=True, text=True, cwd=ROOT, env=env
    )
    assert run.returncode == 1, run.stdout + run.stderr
    assert sorted(p.name for p in out.iterdir()) == ["logs.tar.gz"]
    with tarfile.open(out / "logs.tar.gz") as archive:
        logs = {m.name: archive.extractfile(m).read().decode() for m in archive.getmembers()}
    assert {"cuda_tests.log", "train_cost.log", "train_cost_immediate.log"} <= set(logs)
    assert "summary.md" in logs  # empty here: its script ran as `false` too
    step_logs = [name for name in logs if name.endswith(".log")]
    skipped = [name for name in step_logs if "skipped" in logs[name]]
    assert skipped == ([] if ran else step_logs), logs
    # one line per step for the summary: its name, exit status (or "skipped") and seconds
    steps = [line.split("\t") for line in logs["steps.tsv"].splitlines()]
    assert sorted(f"{name}.log" for name, _, _ in steps) == sorted(step_logs)
    assert {rc for _, rc, _ in steps} == ({"1"} if ran else {"skipped"})


def test_gpu_summary_puts_each_run_against_the_target(tmp_path: Path, capsys):
    """The page that ends ``gpu_checks.sh``'s output: every run's ratios, starred above 3 %,
    and a line for each file a failed or skipped step did not write."""
    import doctest

    summary = _bench_module("gpu_summary")
    assert doctest.testmod(summary).failed == 0
    same = {
        "params_exported": 5, "params_baseline": 5, "flops_exported": 7, "flops_baseline": 7,
        "outputs_bitwise_equal_to_attached": True, "state_dict_keys_equal": True,
    }  # fmt: skip
    cost = {
        "time_ratio": 1.0412,
        "paired_ratio_quartiles": [1.01, 1.04, 1.06],
        "memory_ratio": 1.021,
        "syncs_per_step": {"baseline": 0, "rch": 0},
        "inference": same,
    }
    differs = {**cost, "time_ratio": 1.02, "inference": {**same, "flops_exported": 8}}
    files = {
        "train_cost_cuda_fp16.json": {"results": {"net_a": cost, "net_b": differs}},
        "gpu_memory.json": {
            "networks": {
                "net_a": {
                    "baseline": {"max_memory_allocated_mib": 2000.0, "peak_label": "x.py:1 f"},
                    "rch": {"max_memory_allocated_mib": 2070.0, "peak_label": "rch/y.py:2 g"},
                }
            }
        },
        "step_ops_cuda.json": {
            "results": {
                "net_a": {
                    "rch": {
                        "step": {"launches": 900, "reads": 0, "kernels": 950, "gpu_ms": 44.5},
                        "added_launches": 300,
                        "added_gpu_ms": 1.25,
                    }
                }
            }
        },
    }
    for name, data in files.items():
        (tmp_path / name).write_text(json.dumps(data))
    assert summary.main([str(tmp_path)]) == 0
    page = capsys.readouterr().out
    row = "| net_a | 1.041* | 1.010-1.060 | 1.021 | 0/0 | identical |"
    assert "| checks deferred (the trainer's default) " + row in page
    assert "| net_b | 1.020 |" in page and "DIFFERENT" in page
    assert "| no value checks | (no `train_cost_cuda_fp16_novalidate.json`: see its log)" in page
    assert "| default | net_a | 2000 | 2070 | 1.035* | rch/y.py:2 g |" in page
    assert "(no `gpu_memory_conv.json`: see its log)" in page
    assert "| net_a | rch | 900 (+300) | 950 | 0 | 44.50 (+1.25) |" in page


def test_camvid_protocol_pairs_seeds_and_resumes(tmp_path: Path):
    from .data import trees

    root = tmp_path / "camvid"
    trees.camvid(root, [0, 10, 11, 3, 2, 9])
    results = tmp_path / "camvid.json"
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "camvid.py"),
        "--root",
        str(root),
        "--variants",
        "baseline",
        "paper",
        "--seeds",
        "0",
        "1",
        "--iters",
        "2",
        "--batch",
        "2",
        "--base-size",
        "4",
        "6",
        "--crop",
        "16",
        "16",
        "--width",
        "8",
        "--embed-dim",
        "8",
        "--out",
        str(tmp_path / "runs"),
        "--results",
        str(results),
        "--no-progress",
    ]
    first = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
    assert "paired diff" in first.stdout and "Pole *" in first.stdout
    for png in ("camvid_paired.png", "camvid_classes.png"):  # the figures beside the results
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG" and png in first.stdout
    data = json.loads(results.read_text())
    paper = data["summary"]["paper"]
    assert len(paper["paired_diff"]) == 2 and paper["seeds"] == [0, 1]
    assert set(paper["class_delta"]) >= {"Pole", "Bicyclist"}
    assert set(paper["recall_delta"]) == set(paper["precision_delta"]) == set(paper["class_delta"])
    assert data["pooled"]["runs"] == 2 and set(data["pooled"]["seed_diff"]) == {"0", "1"}
    assert "all RCH runs pooled: 2 runs of 1 variant(s)" in first.stdout
    fit = data["additive"]  # variant + seed, least squares: balanced, so the paired mean
    assert fit["df"] == 1 and fit["effects"]["paper"]["effect"] == pytest.approx(
        statistics.fmean(paper["paired_diff"]), abs=1e-9
    )
    assert "two-way additive fit (variant + seed, least squares over all 4 runs)" in first.stdout
    tests = data["f_tests"]  # one Table 1 row (paper) alone is no comparison: no F test of it
    assert list(tests) == ["every variant and the baseline"]
    assert tests["every variant and the baseline"]["variants"] == ["baseline", "paper"]
    assert (
        tests["every variant and the baseline"]["df1"],
        tests["every variant and the baseline"]["df2"],
    ) == (1, 1)
    assert "variant effects (every variant and the baseline), F test" in first.stdout
    if paper["pooled_sd"] > 0:  # the resolving power on the pooled SD, at 3, 5 and 10 seeds
        assert data["power"]["df"] == 1 and data["power"]["rows"][0]["seeds"] == [3, 5, 10]
        assert "resolving power" in first.stdout
    else:  # both seeds moved mIoU by the same amount: no spread to plan with
        assert data["power"] is None and "resolving power" not in first.stdout
    stamp = (tmp_path / "runs" / "camvid-paper-s1" / "eval.json").stat().st_mtime_ns
    subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
    assert (tmp_path / "runs" / "camvid-paper-s1" / "eval.json").stat().st_mtime_ns == stamp

    # another session: its runs directory is gone, its results file is merged, seed 2 is new
    merged = tmp_path / "merged.json"
    more = [*cmd[: cmd.index("--seeds")], "--seeds", "0", "1", "2", *cmd[cmd.index("--iters") :]]
    more[more.index("--out") + 1] = str(tmp_path / "runs2")
    more[more.index("--results") + 1] = str(merged)
    more += ["--merge", str(results)]
    subprocess.run(more, capture_output=True, text=True, check=True, cwd=ROOT)
    assert sorted(p.name for p in (tmp_path / "runs2").iterdir()) == [
        "camvid-baseline-s2",
        "camvid-paper-s2",
    ]
    again = json.loads(merged.read_text())
    assert again["summary"]["paper"]["paired_seeds"] == [0, 1, 2]
    assert again["runs"]["paper"]["1"] == data["runs"]["paper"]["1"]
    # --collect trains nothing: seed 3 has no run, the others come from the file and the disk
    collect = [*more[: more.index("--seeds")], "--seeds", "0", "1", "2", "3"]
    collect += [*more[more.index("--iters") :], "--collect"]
    collect[collect.index("--merge") + 1] = str(results)
    collect[collect.index("--results") + 1] = str(tmp_path / "collected.json")
    subprocess.run(collect, capture_output=True, text=True, check=True, cwd=ROOT)
    assert not list((tmp_path / "runs2").glob("*-s3"))
    # a narrower request still carries every merged run into its results file
    narrow = [
        *collect[: collect.index("--variants") + 1],
        "paper",
        *collect[collect.index("--seeds") :],
    ]
    narrow[narrow.index("--results") + 1] = str(tmp_path / "narrow.json")
    subprocess.run(narrow, capture_output=True, text=True, check=True, cwd=ROOT)
    narrowed = json.loads((tmp_path / "narrow.json").read_text())
    assert set(narrowed["runs"]["baseline"]) == {"0", "1"}
    # ... and what each merged variant changed, though this request did not name it
    assert narrowed["meta"]["variants"]["baseline"] == ["rch.enabled=false"]
    # two merged files that define an unrequested variant differently are refused
    clash = tmp_path / "clash.json"
    data_clash = json.loads(results.read_text())
    data_clash["meta"]["variants"]["baseline"] = ["rch.enabled=false", "rch.tau=0.25"]
    clash.write_text(json.dumps(data_clash))
    both = list(narrow)
    both.insert(both.index("--merge") + 2, str(clash))  # --merge results clash
    both[both.index("--results") + 1] = str(tmp_path / "both.json")
    refused = subprocess.run(both, capture_output=True, text=True, cwd=ROOT)
    assert refused.returncode != 0 and "variant baseline" in refused.stderr
    collected = json.loads((tmp_path / "collected.json").read_text())
    assert collected["summary"]["paper"]["seeds"] == [0, 1, 2]
    other = [*more[: more.index("--iters") + 1], "3", *more[more.index("--iters") + 2 :]]
    bad = subprocess.run(other, capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode != 0 and "another protocol (iters differ)" in bad.stderr


def test_loss_scaling_quick_fits_slopes(tmp_path: Path):
    out = tmp_path / "scaling.json"
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "loss_scaling.py"),
        "--quick",
        "--dims",
        "16",
        "--out",
        str(out),
    ]
    run = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
    assert "log-log slope" in run.stdout
    data = json.loads(out.read_text())
    assert [r["N"] for r in data["rows"]] == [2 * 32 * 64, 2 * 64 * 128]
    assert set(data["fits"]["16"]) == {"time_slope_paper", "time_slope_bound", "memory_slope_paper"}


def _camvid_module():
    return _bench_module("camvid")


def _bench_module(name: str):
    import importlib.util

    path = ROOT / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_bench", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


def test_camvid_merge_reads_the_older_list_format_and_checks_the_protocol(tmp_path: Path):
    camvid = _camvid_module()
    protocol = {k: 1 for k in camvid.PROTOCOL_KEYS}
    old = {
        "meta": {
            "config": {**protocol, "seeds": [3, 5]},
            "variants": {"baseline": ["rch.enabled=false"]},
        },
        "runs": {"baseline": [{"mIoU": 0.3}, {"mIoU": 0.5}]},
    }
    path = tmp_path / "old.json"
    path.write_text(json.dumps(old))
    runs, described = camvid.load_runs(path, protocol, {"baseline": ["rch.enabled=false"]})
    assert runs == {"baseline": {3: {"mIoU": 0.3}, 5: {"mIoU": 0.5}}}
    assert described == {"baseline": ["rch.enabled=false"]}
    summary = camvid.summarize({"baseline": runs["baseline"], "x": {5: {"mIoU": 0.6, "IoU": {}}}})
    assert summary["x"]["paired_seeds"] == [5]
    assert abs(summary["x"]["paired_diff"][0] - 10.0) < 1e-9  # paired with seed 5, not 3
    with pytest.raises(ValueError, match="variant baseline"):
        camvid.load_runs(path, protocol, {"baseline": ["rch.enabled=true"]})
    with pytest.raises(ValueError, match="lr differ"):
        camvid.load_runs(path, {**protocol, "lr": 2}, {})


def test_camvid_figures_are_skipped_without_matplotlib(tmp_path: Path, monkeypatch, capsys):
    """``rch.viz`` imports without matplotlib; the first plot is what needs it."""
    from rch.viz import figures

    def missing() -> None:
        raise ImportError("no matplotlib")

    camvid = _camvid_module()
    base = {s: {"mIoU": 0.5, "IoU": {"Pole": 0.1, "Sky": 0.9}} for s in (0, 1)}
    other = {s: {"mIoU": 0.51, "IoU": {"Pole": 0.2, "Sky": 0.9}} for s in (0, 1)}
    summary = camvid.summarize({"baseline": base, "paper": other})
    monkeypatch.setattr(figures, "_plt", missing)
    assert camvid.draw_figures(summary, tmp_path / "camvid.json") == []
    assert "figures skipped" in capsys.readouterr().out and not list(tmp_path.iterdir())
    monkeypatch.undo()
    written = camvid.draw_figures(summary, tmp_path / "camvid.json")
    assert [p.name for p in written] == ["camvid_paired.png", "camvid_classes.png"]
    drawn: dict[str, Any] = {}
    monkeypatch.setattr(
        figures, "plot_paired_differences", lambda d, p, **kw: drawn.update(d=d, **kw)
    )
    pooled = camvid.pooled_effect({"baseline": base, "paper": other})
    camvid.draw_figures(summary, tmp_path / "camvid.json", pooled)
    assert drawn["d"][camvid.POOLED_ROW] == pytest.approx([1.0, 1.0])  # one point per seed
    # the pooled row's interval is a t interval over its seeds; "paper" has a pooled SD of 0
    # over 1 degree of freedom
    assert drawn["df"] == {"paper": 1, camvid.POOLED_ROW: 1}
    assert drawn["fitted"] is None  # no variant + seed fit given
    additive = {"effects": {"paper": {"effect": 1.0, "ci": (0.2, 1.8)}}}
    camvid.draw_figures(summary, tmp_path / "camvid.json", pooled, additive)
    assert drawn["fitted"] == {"paper": (1.0, 0.2, 1.8)}
    assert camvid.rare_first(["Sky", "Bicyclist", "Pole"]) == ["Pole", "Bicyclist", "Sky"]


@pytest.mark.parametrize(
    ("rows", "expected"),
    [(["gt"], ["gt"]), (["tp+fn", "learned"], ["tp+fn", "learned"]), ([], None)],
)
def test_camvid_ablation_trains_the_named_table1_rows(tmp_path: Path, rows, expected):
    """``--ablation ROW ...`` picks Table 1 rows (a session trains what fits); bare
    ``--ablation`` means all of them. ``--collect`` trains nothing and records the plan."""
    camvid = _camvid_module()
    results = tmp_path / "plan.json"
    argv = ["--root", str(tmp_path), "--out", str(tmp_path / "runs"), "--results", str(results)]
    camvid.main([*argv, "--variants", "--ablation", *rows, "--collect", "--no-progress"])
    planned = list(json.loads(results.read_text())["meta"]["variants"])
    assert planned == (expected or ["learned", "gt", "tp", "tp+fn", "tp+fp"])
    with pytest.raises(SystemExit):  # not a row of the table
        camvid.main([*argv, "--ablation", "full", "--collect"])


@pytest.mark.parametrize(
    ("points", "expected"),
    [
        (["loss_weight=0.2"], ["loss_weight=0.2"]),
        (["momentum=0.99", "tau=0.25"], ["tau=0.25", "momentum=0.99"]),
        ([], None),
    ],
)
def test_camvid_grid_trains_the_named_points(tmp_path: Path, points, expected):
    """``--grid POINT ...`` picks points of the tau / rho / lambda grid, each one value changed
    from the paper's defaults; bare ``--grid`` means all nine."""
    camvid = _camvid_module()
    results = tmp_path / "plan.json"
    argv = ["--root", str(tmp_path), "--out", str(tmp_path / "runs"), "--results", str(results)]
    camvid.main([*argv, "--variants", "--grid", *points, "--collect", "--no-progress"])
    planned = json.loads(results.read_text())["meta"]["variants"]
    everything = [
        *(f"tau={t}" for t in (0.125, 0.25, 1.0)),
        *(f"momentum={m}" for m in (0.5, 0.7, 0.99)),
        *(f"loss_weight={w}" for w in (0.2, 0.3, 0.4)),
    ]
    assert list(planned) == (expected or everything)
    key = {"tau": "rch.tau", "momentum": "rch.momentum", "loss_weight": "rch.loss_weight"}
    for name, overrides in planned.items():  # each point overrides exactly its own value
        what, value = name.split("=")
        assert overrides == [f"{key[what]}={value}"]
    with pytest.raises(SystemExit):  # the default is the paper variant, not a grid point
        camvid.main([*argv, "--grid", "tau=0.5", "--collect"])


def test_prototype_forces_reads_trained_runs(tmp_path: Path):
    from rch.train import train

    from .train.helpers import tiny_config

    small = {"base_size": [16, 24], "crop_size": [16, 24]}
    rch_run = train(
        tiny_config(tmp_path, name="learned", rch={"prototypes": "learned"}, data=small),
        progress=False,
    ).run_dir
    base_run = train(
        tiny_config(tmp_path, name="base", rch={"enabled": False}, data=small), progress=False
    ).run_dir
    out = tmp_path / "forces.json"
    script = str(ROOT / "benchmarks" / "prototype_forces.py")
    cmd = [sys.executable, script, str(rch_run), "--limit", "2", "--out", str(out)]
    done = subprocess.run([*cmd, "--no-progress"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "push/pull" in done.stdout and "prototypes learned" in done.stdout
    r = json.loads(out.read_text())["runs"]["learned"]
    assert r["images"] == 2 and len(r["pull"]) == len(r["classes"]) == len(r["pixels"])
    # images are resized to fit base_size as in evaluation: 16x24 at stride 8 is 2x3 pixels
    assert 0 < sum(r["pixels"]) <= 2 * 2 * 3
    # every pixel's softmax sums to one, so the pull and push weights balance in total
    assert math.isclose(sum(r["pull"]), sum(r["push"]), rel_tol=1e-5)  # float32 sums
    assert all(0 <= p <= n for p, n in zip(r["pull"], r["pixels"], strict=True))
    assert "step own" in done.stdout and len(r["pull_step_own"]) == len(r["classes"])
    present = [k for k, n in enumerate(r["pixels"]) if n > 0]
    assert all(math.isfinite(r["pull_step_own"][k] + r["push_step_own"][k]) for k in present)
    refused = subprocess.run([*cmd[:2], str(base_run)], capture_output=True, text=True, cwd=ROOT)
    assert refused.returncode == 2 and "without RCH" in refused.stderr


def _alloc(addr: int, size: int, *files: str) -> dict[str, Any]:
    frames = [{"filename": f, "line": 7, "name": "fn"} for f in files]
    return {"action": "alloc", "addr": addr, "size": size, "frames": frames}


def _free(addr: int, size: int, action: str = "free_completed") -> dict[str, Any]:
    return {"action": action, "addr": addr, "size": size, "frames": []}


def test_gpu_memory_replays_the_peak_and_groups_what_is_live():
    gm = _bench_module("gpu_memory")
    rch_line = "/r/src/rch/_fused.py"
    trace = [
        _alloc(7, 6, "/r/src/rch/hooks.py"),  # the step before: still live at the peak
        _alloc(8, 3, "/r/src/rch/hooks.py"),  # the step before: freed before the peak
        _free(8, 3),
        _free(90, 30),  # a block from before the recording: lowers what was held before
        _alloc(1, 40, gm.TORCH_DIR + "nn/functional.py", "/s/torchvision/models/resnet.py"),
        _alloc(2, 25, rch_line),
        _free(2, 25, "free_requested"),  # requested only: still counted, still live
        _alloc(3, 10),  # no Python frame: the autograd engine's thread
        _free(1, 40),
        _alloc(4, 20, rch_line),  # after the peak
    ]
    peak = gm.replay_peak(trace, start_bytes=100, from_event=3)
    assert (peak.bytes, peak.event, peak.before) == (100 + 6 - 30 + 40 + 25 + 10, 7, 70)
    assert [e["addr"] for _, e in peak.live] == [7, 1, 2, 3]
    groups = gm.breakdown(peak, from_event=3)
    assert groups == {
        gm.BEFORE: 70,
        gm.EARLIER + "rch/hooks.py:7 fn": 6,
        "torchvision/models/resnet.py fn": 40,
        "rch/_fused.py:7 fn": 25,
        gm.BACKWARD: 10,
    }
    assert sum(groups.values()) == peak.bytes
    assert gm.largest(peak, gm.BACKWARD, from_event=3) == [10]
    # the measured step's peak is its own: at least what it starts with, whatever came before
    steps = [*trace[:2], _free(8, 3), _free(7, 6), _alloc(5, 4)]
    assert gm.replay_peak([_alloc(9, 50), _free(9, 50), *steps], 100, from_event=5).bytes == 106
    second = gm.replay_peak([*steps, _alloc(6, 5)], 100, from_event=3)
    assert (second.bytes, second.event, second.before) == (100 + 4 + 5, 5, 100)
    assert [e["addr"] for _, e in second.live] == [5, 6]
    # a step that never rises above where it starts: the peak is its start
    flat = gm.replay_peak([_alloc(1, 5), _free(1, 5), _free(90, 10)], start_bytes=50, from_event=2)
    assert (flat.bytes, flat.event, flat.live) == (50, 1, [])
    assert gm.replay_peak([], 7) == gm.Peak(7, -1, [], 7)


def test_gpu_memory_doctests_pass():
    import doctest

    assert doctest.testmod(_bench_module("gpu_memory")).failed == 0


def test_gpu_memory_compares_by_the_largest_difference():
    gm = _bench_module("gpu_memory")
    mib = 2**20

    def result(groups: dict[str, float]) -> dict[str, Any]:
        peak = sum(groups.values())
        return {
            "peak_mib": peak,
            "max_memory_allocated_mib": peak,
            "events": 9,
            "peak_event": 3,
            "peak_label": gm.BACKWARD,
            "peak_block_mib": 64.0,
            "groups_mib": groups,
            "largest_blocks_mib": {gm.BACKWARD: [64.0, 2.0 / mib]},
        }

    base = result({gm.BEFORE: 500.0, "a.py f": 100.0, gm.BACKWARD: 10.0})
    rch = result({gm.BEFORE: 502.0, "a.py f": 100.0, gm.BACKWARD: 74.0, "rch/x.py:3 g": 8.0})
    rows = gm.compare(base, rch, 3)
    assert rows == [
        (gm.BACKWARD, 10.0, 74.0),
        ("rch/x.py:3 g", 0.0, 8.0),
        (gm.BEFORE, 500.0, 502.0),
    ]
    text = gm.format_network("net", base, rch, 3)
    assert "peak 610.0 MiB baseline, 684.0 MiB RCH (+12.1%)" in text
    assert "+64.0" in text and "a.py f" not in text  # equal groups fall off the short list
    assert "RCH 'autograd backward': largest blocks (MiB) 64.0, 0.0" in text


def test_gpu_memory_refuses_without_cuda(monkeypatch, capsys):
    gm = _bench_module("gpu_memory")
    monkeypatch.setattr(gm.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exc:
        gm.main(["--networks", "segformer_b0"])
    assert exc.value.code == 2 and "needs a CUDA device" in capsys.readouterr().err


def test_drift_check_compares_weights_metrics_and_confusion(tmp_path: Path):
    from rch.train import train
    from rch.train.config import apply_overrides

    from .train.helpers import tiny_config

    dc = _bench_module("drift_check")
    cfg = tiny_config(tmp_path, train={"iters": 2})
    runs = [train(apply_overrides(cfg, [f"name={n}"]), progress=False) for n in ("a", "b")]
    other = train(apply_overrides(cfg, ["name=c", "seed=1"]), progress=False)
    same = dc.compare_runs(runs[0].run_dir, runs[1].run_dir)
    assert same["identical"] and same["tensors_differing"] == 0
    assert same["max_abs_weight_diff"] == 0.0 and same["first_differing"] is None
    apart = dc.compare_runs(runs[0].run_dir, other.run_dir)
    assert not apart["identical"] and not apart["weights_equal"]
    assert apart["first_differing"] is not None and apart["max_abs_weight_diff"] > 0
    assert apart["first_differing_record"] == 0  # the first logged loss already differs
    with pytest.raises(ValueError, match="found 3"):  # which of them would be ambiguous
        dc.run_dir(other.run_dir.parent)


def test_drift_check_exports_a_commit_and_refuses_an_unknown_one(tmp_path: Path):
    dc = _bench_module("drift_check")
    commit = dc.export("HEAD", tmp_path / "code")
    assert len(commit) == 40 and all(c in "0123456789abcdef" for c in commit)
    assert (tmp_path / "code" / "src" / "rch" / "__init__.py").is_file()
    assert (tmp_path / "code" / "benchmarks" / "camvid.py").is_file()
    with pytest.raises(ValueError, match="not a commit"):
        dc.export("no-such-revision-here", tmp_path / "other")


def test_drift_check_trains_both_versions_and_writes_json(tmp_path: Path):
    from .data import trees

    root = tmp_path / "camvid"
    trees.camvid(root, [0, 10, 11, 3])
    results = tmp_path / "drift.json"
    tiny = ["--root", str(root), "--batch", "2", "--base-size", "4", "6", "--crop", "16", "16"]
    cmd = [sys.executable, str(ROOT / "benchmarks" / "drift_check.py"), "HEAD", "--iters", "2"]
    cmd += ["--variant", "paper"]
    cmd += ["--out", str(tmp_path / "drift"), "--results", str(results), "--", *tiny]
    cmd += ["--width", "8", "--embed-dim", "8"]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stdout + run.stderr
    data = json.loads(results.read_text())
    assert (
        data["meta"]["commit"]
        == subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT, check=True
        ).stdout.strip()
    )
    assert data["meta"]["camvid_options"][:2] == ["--root", str(root)]
    result = data["result"]
    assert result["metrics_records"][0] == result["metrics_records"][1] > 0
    assert len(result["mIoU"]) == 2 and all(0 <= m <= 1 for m in result["mIoU"])
    assert ("identical:" in run.stdout) == result["identical"]
    assert isinstance(result["same_math"], bool) and result["probe_float64_rel_diff"] >= 0
    for side in ("earlier", "current"):  # each side trained its own run and computed its probe
        assert (tmp_path / "drift" / side / "camvid-paper-s0" / "eval.json").is_file()
        assert (tmp_path / "drift" / f"{side}-probe.pt").is_file()


def test_drift_check_probe_tells_rounding_from_changed_math():
    dc = _bench_module("drift_check")
    probe = dc.loss_probe("paper")
    assert {k.split("/")[0] for k in probe} == {"float64", "float32"}
    assert {k.split("/")[1] for k in probe} == set(dc.PROBE_FIELDS)
    same = dc.compare_probes(probe, dc.loss_probe("paper"))  # deterministic on the CPU
    assert same == {"probe_float64_rel_diff": 0.0, "probe_float32_rel_diff": 0.0, "same_math": True}
    rounded = {k: v.clone() for k, v in probe.items()}
    rounded["float32/grad"] = rounded["float32/grad"] * (1 + 2**-22)  # last bits of float32
    r = dc.compare_probes(probe, rounded)
    assert r["same_math"] and 0 < r["probe_float32_rel_diff"] < 1e-6
    changed = {k: v.clone() for k, v in probe.items()}
    changed["float64/loss"] = changed["float64/loss"] * 1.001
    c = dc.compare_probes(probe, changed)
    assert not c["same_math"] and abs(c["probe_float64_rel_diff"] - 1e-3) < 1e-6
    official = dc.compare_probes(probe, dc.loss_probe("official"))  # another loss altogether
    assert not official["same_math"]


def _report_data() -> dict[str, Any]:
    """A small results file as ``camvid.py`` writes it (through JSON: seeds become strings
    in ``runs``): the baseline and full RCH on seeds 0-2, ``tp+fn`` on 0, 1 and 5,
    ``tp+fp`` on 0, 1 and 5, a grid point and ``paper-light`` on 0-2."""
    from rch.train.logger import json_safe

    camvid = _camvid_module()
    mious = {
        "baseline": {0: 50.0, 1: 52.0, 2: 51.0},
        "paper": {0: 50.5, 1: 51.0, 2: 52.5},
        "tp+fn": {0: 49.0, 1: 52.5, 5: 53.25},
        "tp+fp": {0: 51.0, 1: 52.0, 5: 52.0},
        "tau=0.25": {0: 50.25, 1: 52.75, 2: 50.0},
        "paper-light": {0: 49.5, 1: 53.0, 2: 51.5},
    }
    present = {
        name: {s: {"mIoU": m / 100, "IoU": {"Pole": m / 200}} for s, m in runs.items()}
        for name, runs in mious.items()
    }
    variants = {
        "baseline": ["rch.enabled=false"],
        "paper": ["rch.formulation=paper"],
        "tp+fn": ["rch.fp_term=false"],
        "tp+fp": ["rch.fn_term=false"],
        "tau=0.25": ["rch.tau=0.25"],
        "paper-light": ["rch.formulation=paper", "rch.loss_weight=0.05"],
    }
    data = {"meta": {"variants": variants}, **camvid.analyse(present), "runs": present}
    return json.loads(json.dumps(json_safe(data)))


def test_camvid_report_tables_hold_the_runs_paired_differences():
    report = _bench_module("camvid_report")
    data = _report_data()
    t1 = report.render(data, "table1")
    assert t1[0].split(" | ")[4:7] == ["seed 0", "seed 1", "seed 2"]
    rows = {r.split(" | ")[0].lstrip("| "): r.split(" | ") for r in t1[2:]}
    assert list(rows) == ["`tp+fn`", "`tp+fp`", "full (`paper`)"]  # rows without runs left out
    assert rows["`tp+fn`"][1:8] == [
        "EMA of TP pixels",
        "yes",
        "",
        "-1.00",
        "+0.50",
        "·",
        "-0.25 (2 seeds)",
    ]
    s = data["summary"]["paper"]
    lo, hi = s["diff_ci_pooled"]
    assert rows["full (`paper`)"][4:9] == [
        "+0.50",
        "-1.00",
        "+1.50",
        "**+0.33** (3 seeds)",
        f"{lo:+.2f} to {hi:+.2f}",
    ]
    fit = data["additive"]["effects"]["paper"]
    assert (
        rows["full (`paper`)"][9]
        == f"{fit['effect']:+.2f} ({fit['ci'][0]:+.2f} to {fit['ci'][1]:+.2f}) |"
    )
    grid = [r.split(" | ") for r in report.render(data, "grid")[2:]]
    assert [(r[0].lstrip("| "), r[1]) for r in grid] == [
        ("**tau 0.5, rho 0.9, lambda 0.1 (defaults)**", "`paper`"),
        ("tau 0.25", "`tau=0.25`"),
        ("lambda 0.05", "`paper-light`"),  # one grid key changed: a point, whatever its name
    ]
    variants = {
        r.split(" | ")[0].lstrip("| "): r.split(" | ") for r in report.render(data, "variants")[2:]
    }
    assert variants["`baseline`"][1:6] == [
        "`rch.enabled=false`",
        "3 (0-2)",
        "50.00, 52.00, 51.00",
        "51.00",
        "1.00",
    ]
    assert variants["`paper-light`"][1] == "`rch.loss_weight=0.05`"  # the shared default left out
    assert variants["`tp+fn`"][2:4] == ["3 (0, 1, 5)", "49.00, 52.50, 53.25"]
    assert variants["`tp+fn`"][4] == "51.58" and variants["`tp+fn`"][6] == "-1.00, +0.50, ·"
    pairs = [r.split(" | ") for r in report.render(data, "pairs tp+fn tp+fp 5-6")[2:]]
    assert pairs == [
        ["| 5", "53.25", "52.00", "+1.25 |"],
        ["| 6", "·", "·", "· |"],
        ["| mean (1 pair)", "53.25", "52.00", "**+1.25** |"],
    ]
    every = report.render(data, "pairs tp+fn tp+fp")  # every seed both ran
    assert every[-1] == "| mean (3 pairs) | 51.58 | 51.67 | **-0.08** |"
    classes = report.render(data, "classes")  # paper, official and Table 1 rows with runs
    assert classes[0] == (
        "| class (* rare) | baseline IoU (3 runs) | `paper` (3 seeds) | `tp+fn` (2 seeds)"
        " | `tp+fp` (2 seeds) |"
    )
    pole = classes[2].strip("| ").split(" | ")  # Pole's IoU is mIoU / 2: deltas are half
    assert pole[:3] == ["Pole *", "25.50", "+0.17"] and pole[4] == "+0.25"
    assert abs(float(pole[3]) - (-0.125)) < 0.0051  # -1 and +0.5, halved, rounded
    assert classes[-1] == "| mIoU | 51.00 | **+0.33** | **-0.25** | **+0.50** |"
    assert report.render(data, "classes tp+fp")[0].endswith("| `tp+fp` (2 seeds) |")
    with pytest.raises(report.ReportError, match="variant 'official' has no paired runs"):
        report.render(data, "classes official")


def test_camvid_report_test_block_applies_the_fixed_test_once_every_pair_has_run():
    from rch.eval.paired import prespecified_test

    report = _bench_module("camvid_report")
    data = _report_data()  # tp+fn minus tp+fp: -2, +0.5, +1.25 on seeds 0, 1, 5
    done = report.render(data, "test tp+fn tp+fp 0,1,5 sd=1.5 df=20 alternative=less")
    r = prespecified_test([-2.0, 0.5, 1.25], 1.5, 20, 3, "less")
    assert done[0].split(" | ")[2] == "t (SE 0.87: SD 1.5 fixed, 20 df)"
    row = done[2].strip("| ").split(" | ")
    assert row == [
        "3 of 3 (seeds 0, 1, 5)", "-0.08", f"{r['t']:+.2f}", f"{r['p']:.3f}",
        f"below {r['bound']:+.2f}", "**not confirmed**",
    ]  # fmt: skip
    hit = report.render(data, "test paper baseline 0-2 sd=0.1 df=20 alternative=greater")
    assert hit[2].endswith("| above +0.10 | **confirmed** |")  # +0.33 over 3 seeds, SE 0.06
    part = report.render(data, "test tp+fn baseline 0-4 sd=1 df=20 alternative=greater")
    assert part[2].strip("| ").split(" | ")[:4] == ["2 of 5 (seeds 0-4)", "-0.25 (so far)", "", ""]
    assert part[2].endswith("| waiting for 3 more pairs |")
    grid = report.render(data, "test tau=0.25 baseline 0-2 sd=1 df=20 alternative=less")
    assert grid[2].startswith("| 3 of 3 (seeds 0-2) | +0.00 | +0.00 | 0.500 |")  # "=" in a name


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("test tp+fn tp+fp 5-9 sd=1 df=20", "test takes A B SEEDS"),
        ("test tp+fn tp+fp 5-9 sd=1 df=20 alternative=two-sided", "test takes A B SEEDS"),
        ("test tp+fn 5-9 sd=1 df=20 alternative=less", "test takes A B SEEDS"),
        ("test tp+fn nope 5-9 sd=1 df=20 alternative=less", "no runs of variant 'nope'"),
        ("test tp+fn tp+fp 5-9 sd=-1 df=20 alternative=less", "test: sd must be positive"),
        ("test tp+fn tp+fp 5-9 sd=1 df=x alternative=less", "test: invalid literal"),
    ],
)
def test_camvid_report_test_block_names_bad_arguments(spec: str, message: str):
    report = _bench_module("camvid_report")
    with pytest.raises(report.ReportError, match=re.escape(message)):
        report.render(_report_data(), spec)


def test_camvid_report_ftests_pooled_and_power_blocks_quote_the_results_file():
    report = _bench_module("camvid_report")
    data = _report_data()
    ftests = [r.strip("| ").split(" | ") for r in report.render(data, "ftests")[2:]]
    assert [r[0] for r in ftests] == [
        "Table 1 rows",
        "Table 1 rows, the baseline and the reference formulation",
        "every variant and the baseline",
    ]
    assert ftests[0][1:3] == ["`tp+fn`, `tp+fp`, `paper`", "9"]
    t = data["f_tests"]["every variant and the baseline"]
    assert ftests[2][3:] == [f"{t['f']:.2f} on ({t['df1']}, {t['df2']})", f"{t['p']:.3f}"]
    pooled = report.render(data, "pooled")
    assert pooled[0].split(" | ")[1:4] == ["seed 0 (5 runs)", "seed 1 (5 runs)", "seed 2 (3 runs)"]
    e = data["pooled"]
    by_seed = pooled[2].split(" | ")
    assert by_seed[1:5] == [f"{e['seed_diff'][s]:+.2f}" for s in "012"] + [
        f"**{e['seed_diff_mean']:+.2f}**"
    ]
    assert f"all {e['runs']} RCH runs (5 variants) against the 3 baseline runs" in pooled[3]
    power = report.render(data, "power")
    assert power[0] == "| true effect | 3 seeds | 5 seeds | 10 seeds | seeds for 80 % |"
    assert [r.split(" | ")[0] for r in power[2:]] == ["| +1.00", "| +0.50"]
    del data["pooled"]
    with pytest.raises(report.ReportError, match="no pooled effect"):
        report.render(data, "pooled")


def test_camvid_report_doctests_pass():
    import doctest

    result = doctest.testmod(_bench_module("camvid_report"))
    assert result.failed == 0 and result.attempted >= 4


def test_camvid_report_rewrites_only_inside_its_markers():
    report = _bench_module("camvid_report")
    data = _report_data()
    text = (
        "intro, kept\n\n- a bullet:\n\n"
        "  <!-- camvid-report:pairs tp+fn tp+fp -->\n  stale\n  <!-- /camvid-report -->\n"
        "\noutro\n"
    )
    new, changed = report.update(text, data)
    assert changed == ["pairs tp+fn tp+fp"]
    head, rest = new.split("  <!-- camvid-report:pairs tp+fn tp+fp -->\n")
    body, tail = rest.split("  <!-- /camvid-report -->")
    assert head == "intro, kept\n\n- a bullet:\n\n" and tail == "\n\noutro\n"
    assert body.split("\n")[1:-2] == [
        "  " + line for line in report.render(data, "pairs tp+fn tp+fp")
    ]
    assert "stale" not in body
    assert report.update(new, data) == (new, [])  # a second pass changes nothing


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("<!-- camvid-report:table2 -->\n<!-- /camvid-report -->", "unknown block 'table2'"),
        ("a\n<!-- camvid-report:grid -->\nb", "text:2: block 'grid' has no end marker"),
        ("a\n<!-- /camvid-report -->", "text:2: an end marker without its start"),
        ("<!-- camvid-report:table1 x -->\n<!-- /camvid-report -->", "table1 takes no arguments"),
        ("<!-- camvid-report:pairs tp+fn nope -->\n<!-- /camvid-report -->", "variant 'nope'"),
        ("<!-- camvid-report:pairs tp+fn tp+fp 5..9 -->\n<!-- /camvid-report -->", "seeds '5..9'"),
        ("<!-- camvid-report:pairs tp+fn tp+fp 9-5 -->\n<!-- /camvid-report -->", "seeds '9-5'"),
        ("<!-- camvid-report:pairs tp+fn tp+fp 1,1 -->\n<!-- /camvid-report -->", "seeds '1,1'"),
        (
            "<!-- camvid-report:grid -->\n<!-- camvid-report:grid -->\n<!-- /camvid-report -->",
            "text:1: block 'grid' has no end marker",
        ),
        ("<!-- camvid-report: -->\n<!-- /camvid-report -->", "unknown block ''"),
    ],
)
def test_camvid_report_names_a_bad_marker(text: str, message: str):
    report = _bench_module("camvid_report")
    with pytest.raises(report.ReportError, match=re.escape(message)):
        report.update(text, _report_data())


def test_camvid_report_names_what_the_results_file_lacks():
    report = _bench_module("camvid_report")
    data = _report_data()
    del data["summary"]["baseline"]
    with pytest.raises(
        report.ReportError, match=re.escape("table1: the results file has no 'baseline'")
    ):
        report.render(data, "table1")


def test_camvid_report_check_writes_nothing_and_fails_on_a_stale_block(tmp_path: Path, capsys):
    report = _bench_module("camvid_report")
    results = tmp_path / "camvid.json"
    results.write_text(json.dumps(_report_data()))
    doc = tmp_path / "doc.md"
    doc.write_text("<!-- camvid-report:table1 -->\n<!-- /camvid-report -->\n")
    argv = ["--results", str(results), "--update", str(doc)]
    assert report.main([*argv, "--check"]) == 1
    assert doc.read_text() == "<!-- camvid-report:table1 -->\n<!-- /camvid-report -->\n"
    assert "out of date: table1" in capsys.readouterr().out
    assert report.main(argv) == 0 and "| full (`paper`) |" in doc.read_text()
    assert report.main([*argv, "--check"]) == 0
    assert not list(tmp_path.glob("*.tmp"))


def test_results_md_tables_are_in_step_with_camvid_json(capsys):
    """The committed tables quote the committed runs: rerun ``camvid_report.py --update``
    after merging runs into ``camvid.json``."""
    report = _bench_module("camvid_report")
    results = ROOT / "benchmarks" / "results" / "camvid.json"
    doc = ROOT / "benchmarks" / "RESULTS.md"
    code = report.main(["--results", str(results), "--update", str(doc), "--check"])
    assert code == 0, capsys.readouterr().out
    assert doc.read_text().count("<!-- camvid-report:") >= 3
