"""Does today's code still train what an earlier commit trained? A bitwise reproducibility check.

Results built up over several sessions pair runs trained by different versions of the
code: a paired difference is only fair if a version change does not move the result. This
script exports an earlier commit (``git archive``), trains the same short CamVid run
(``benchmarks/camvid.py``, same variant, seed and settings, one thread each) with that
commit and with the working tree side by side, and compares the two runs: the final
weights tensor by tensor, the logged training losses, and the evaluation's confusion
matrix. Identical weights after ``--iters`` iterations mean that the two versions compute
the same training step, bit for bit, on this machine.

Training amplifies any difference, a rounding one too, so when the runs differ the script
also says whether the math changed: each version computes the RCH loss, its gradient and
the prototype update on the same random inputs in float64 and float32 (``loss_probe``).
Equal float64 results with float32 results that differ in the last bits mean the same
math summed in another order; a float64 difference means the loss itself changed.

Run: ``python benchmarks/drift_check.py REV [--variant baseline] [--seed 0] [--iters 40]
[--out runs/drift] [--results PATH] [-- extra camvid.py options]``
(``--probe FILE`` is internal: compute the loss probe with the ``rch`` on the path.)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import run_meta, write_results
from rch.train.checkpoint import load_checkpoint
from rch.train.logger import read_metrics

ROOT = Path(__file__).resolve().parents[1]
TIMING_KEYS = ("s_per_iter",)
"""Metrics fields that measure the machine, not the computation."""
PROBE_FIELDS = ("loss", "loss_fn", "loss_fp", "prototypes", "grad")
SAME_MATH_RTOL = 1e-12
"""Largest float64 relative difference still read as the same math in another order."""


def loss_probe(formulation: Any = "paper") -> dict[str, torch.Tensor]:
    """The RCH loss of fixed random inputs, its embeddings' gradient and the prototypes after
    the step, in float64 and float32, keyed ``"<dtype>/<field>"``.

    Uses only the arguments every version of :func:`rch.functional.rch_loss` takes, so an
    earlier commit can compute it too.
    """
    from rch.functional import rch_loss

    out = {}
    for dtype in (torch.float64, torch.float32):
        g = torch.Generator().manual_seed(0)
        b, d, k, h, w = 2, 16, 11, 12, 16
        emb = torch.randn(b, d, h, w, generator=g, dtype=dtype).requires_grad_()
        logits = 2 * torch.randn(b, k, h, w, generator=g, dtype=dtype)
        labels = torch.randint(0, k, (b, 4 * h, 4 * w), generator=g)
        labels[:, :6] = 255  # some unlabelled rows
        prototypes = torch.randn(k, d, generator=g, dtype=dtype)
        res = rch_loss(emb, logits, labels, prototypes, formulation=formulation)
        res.loss.backward()
        assert emb.grad is not None
        name = str(dtype).removeprefix("torch.")
        for field in PROBE_FIELDS:
            value = emb.grad if field == "grad" else getattr(res, field)
            out[f"{name}/{field}"] = value.detach().clone()
    return out


def compare_probes(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Largest relative difference per dtype over the probe's fields (relative to each
    field's largest magnitude), and whether float64 agrees to ``SAME_MATH_RTOL``."""
    worst: dict[str, float] = {"float64": 0.0, "float32": 0.0}
    for key in a:
        dtype = key.split("/")[0]
        x, y = a[key].double(), b[key].double()
        if x.shape != y.shape:
            worst[dtype] = float("inf")
            continue
        scale = max(x.abs().max().item(), 1e-300)
        worst[dtype] = max(worst[dtype], (x - y).abs().max().item() / scale)
    return {
        "probe_float64_rel_diff": worst["float64"],
        "probe_float32_rel_diff": worst["float32"],
        "same_math": worst["float64"] <= SAME_MATH_RTOL,
    }


def export(rev: str, dest: Path, repo: Path = ROOT) -> str:
    """Write ``src/`` and ``benchmarks/`` of commit ``rev`` under ``dest``; its full hash.

    Raises:
        ValueError: ``rev`` names no commit of ``repo``.
    """
    found = subprocess.run(
        ["git", "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"],
        cwd=repo,
        capture_output=True,
        text=True,
    )
    if found.returncode != 0:
        raise ValueError(f"{rev!r} is not a commit of {repo}")
    commit = found.stdout.strip()
    archive = subprocess.run(
        ["git", "archive", "--format=tar", commit, "src", "benchmarks"],
        cwd=repo,
        capture_output=True,
        check=True,
    )
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile() as f:
        f.write(archive.stdout)
        f.seek(0)
        with tarfile.open(fileobj=f) as tar:
            tar.extractall(dest, filter="data")
    return commit


def run_dir(out: Path) -> Path:
    """The one finished run (the folder holding ``eval.json``) under ``out``.

    Raises:
        ValueError: none or several finished runs.
    """
    found = sorted(p.parent for p in out.glob("*/eval.json"))
    if len(found) != 1:
        raise ValueError(f"expected one finished run under {out}, found {len(found)}")
    return found[0]


def compare_runs(a: Path, b: Path) -> dict[str, Any]:
    """How two finished runs differ: weights, logged metrics (timings aside), confusion.

    ``identical`` is true when every model tensor, every metrics record and the confusion
    matrix are equal; ``max_abs_weight_diff`` says by how much the weights differ otherwise,
    and ``first_differing`` names the first differing tensor (state_dict order).
    """
    wa = load_checkpoint(a / "checkpoints" / "last.pt")["model"]
    wb = load_checkpoint(b / "checkpoints" / "last.pt")["model"]
    same_keys = list(wa) == list(wb)
    shared = [k for k in wa if k in wb and wa[k].shape == wb[k].shape]
    differing = [k for k in shared if not torch.equal(wa[k], wb[k])]
    max_diff = max(
        ((wa[k].double() - wb[k].double()).abs().max().item() for k in differing), default=0.0
    )

    def metrics(run: Path) -> list[dict[str, Any]]:
        return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in read_metrics(run)]

    ma, mb = metrics(a), metrics(b)
    first_metric = next((i for i, (x, y) in enumerate(zip(ma, mb, strict=False)) if x != y), None)
    ea = json.loads((a / "eval.json").read_text())
    eb = json.loads((b / "eval.json").read_text())
    weights_equal = same_keys and len(shared) == len(wa) and not differing
    metrics_equal = ma == mb
    confusion_equal = ea["confusion"] == eb["confusion"]
    return {
        "identical": weights_equal and metrics_equal and confusion_equal,
        "weights_equal": weights_equal,
        "tensors": len(wa),
        "tensors_differing": len(differing) + (len(wa) - len(shared)),
        "first_differing": differing[0] if differing else None,
        "max_abs_weight_diff": max_diff,
        "metrics_equal": metrics_equal,
        "metrics_records": [len(ma), len(mb)],
        "first_differing_record": first_metric,
        "confusion_equal": confusion_equal,
        "mIoU": [ea["mIoU"], eb["mIoU"]],
    }


def main(argv: list[str] | None = None) -> int:
    args_in = list(sys.argv[1:] if argv is None else argv)
    if args_in[:1] == ["--probe"]:  # run by the side under test, with its own rch
        torch.save(loss_probe(args_in[2] if len(args_in) > 2 else "paper"), args_in[1])
        return 0
    extra: list[str] = []
    if "--" in args_in:  # everything after -- goes to camvid.py unchanged
        extra = args_in[args_in.index("--") + 1 :]
        args_in = args_in[: args_in.index("--")]
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("rev", help="the earlier commit (hash, tag or branch)")
    p.add_argument("--variant", default="baseline", choices=["baseline", "paper", "official"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--iters", type=int, default=40)
    p.add_argument("--out", type=Path, default=Path("runs/drift"))
    p.add_argument("--results", type=Path, default=Path("runs/drift/drift_check.json"))
    args = p.parse_args(args_in)
    try:
        commit = export(args.rev, args.out / "code")
    except ValueError as e:
        p.error(str(e))
    sides = {"earlier": args.out / "code", "current": ROOT}
    procs = {}
    for side, code in sides.items():
        cmd = [
            sys.executable,
            str(code / "benchmarks" / "camvid.py"),
            *("--variants", args.variant, "--seeds", str(args.seed), "--iters", str(args.iters)),
            *("--jobs", "1", "--threads", "1", "--no-progress"),
            *("--out", str(args.out / side), "--results", str(args.out / f"{side}.json")),
            *extra,
        ]
        env = {**os.environ, "PYTHONPATH": str(code / "src")}  # the side's own package
        log = (args.out / f"{side}.log").open("w")
        procs[side] = (subprocess.Popen(cmd, env=env, stdout=log, stderr=log), log)
    failed = []
    for side, (proc, log) in procs.items():  # both train at once, one thread each
        proc.wait()  # both, even when one fails: no training is left running behind
        log.close()
        if proc.returncode != 0:
            failed.append(f"the {side} run failed (exit {proc.returncode}); see {log.name}")
    if failed:
        print("\n".join(failed))
        return 1
    result = compare_runs(run_dir(args.out / "earlier"), run_dir(args.out / "current"))
    if args.variant != "baseline":  # the RCH loss: is a difference only the summation order?
        probes = {}
        for side, code in sides.items():
            path = args.out / f"{side}-probe.pt"
            env = {**os.environ, "PYTHONPATH": str(code / "src")}
            probe_cmd = [
                sys.executable,
                str(Path(__file__).resolve()),
                "--probe",
                str(path),
                args.variant,
            ]
            subprocess.run(probe_cmd, env=env, check=True)
            probes[side] = torch.load(path, weights_only=True)
        result.update(compare_probes(probes["earlier"], probes["current"]))
    print(f"{'':24}{'earlier ' + commit[:10]:>22}{'current':>14}")
    print(f"{'mIoU':24}{100 * result['mIoU'][0]:>22.4f}{100 * result['mIoU'][1]:>14.4f}")
    for key in ("weights_equal", "metrics_equal", "confusion_equal"):
        print(f"{key:24}{result[key]!s:>36}")
    if not result["weights_equal"]:
        print(f"{'tensors differing':24}{result['tensors_differing']:>36}")
        print(f"{'max |weight diff|':24}{result['max_abs_weight_diff']:>36.3g}")
    if "same_math" in result:
        for key in ("probe_float64_rel_diff", "probe_float32_rel_diff"):
            print(f"{'loss ' + key.removeprefix('probe_'):24}{result[key]:>36.3g}")
    print("identical: the two versions train this run bit for bit" if result["identical"] else
          "DIFFERENT: the versions do not train the same run")  # fmt: skip
    if not result["identical"] and result.get("same_math"):
        print("the RCH loss agrees in float64: the same math, summed in another order")
    meta = run_meta(argv, rev=args.rev, commit=commit, variant=args.variant, seed=args.seed,
                    iters=args.iters, camvid_options=extra)  # fmt: skip
    write_results(args.results, {"meta": meta, "result": result})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
