"""Where do a trained run's prototypes sit, and what pulls and pushes them there?

For each run directory (or checkpoint) with an RCH head, embeds every image of a split as
evaluation sees it (resized to fit the training ``base_size``, no augmentation) and sums,
per class, :func:`rch.diagnostics.prototype_forces` against the run's final prototypes: the
pull of the class's own pixels on its prototype (``1 - s_k`` each, ``s`` the softmax of the
cosine logits over tau), the push of every other labelled pixel (``s_k`` each), and the
cosine of the prototype to the mean direction of its own pixels and of all pixels. A
prototype cross-entropy whose push outweighs its pull can move a prototype away from
everything, its own pixels too: that is what this measures. ``step own`` is where a
gradient-descent step on the summed cross-entropy would move the prototype, along its own
pixels' mean direction (times the prototype's norm, so runs compare): positive is towards
them. Learned prototypes take such steps; EMA prototypes do not, but the column says where
the loss would move them.

Run: ``python benchmarks/prototype_forces.py runs/bench-camvid-3k/camvid-learned-s0
runs/bench-camvid-3k/camvid-tp-s0 [--split train] [--limit N] [--out forces.json]``
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import run_meta, write_results
from rch.data import build_dataset
from rch.data.loader import make_eval_loader
from rch.data.transforms import fit_size
from rch.diagnostics import PrototypeForces, prototype_forces
from rch.errors import RCHError
from rch.train.runs import load_network


def run_forces(path: Path, split: str, limit: int | None, progress: bool) -> dict[str, Any]:
    """The summed forces of one run over ``split``, per class, as JSON-ready lists."""
    from tqdm.auto import tqdm

    cfg, net, classes = load_network(path)
    attachment = net.attachment
    if attachment is None:
        raise RCHError(f"{path} was trained without RCH (rch.enabled=false): no prototypes")
    d = cfg.data
    dataset = build_dataset(d.name, d.root, split, d.ignore_index, **d.options)
    head = attachment.head
    total: PrototypeForces | None = None
    loader = make_eval_loader(dataset)
    count = len(loader) if limit is None else min(limit, len(loader))
    bar = tqdm(loader, total=count, desc=path.name, unit="img", disable=not progress)
    with torch.no_grad():
        for i, (image, labels, _) in enumerate(bar):
            if i == count:
                break
            fh, fw = fit_size(image.shape[-2], image.shape[-1], d.base_size)
            size = (max(1, round(fh)), max(1, round(fw)))
            if size != tuple(image.shape[-2:]):
                image = F.interpolate(image, size=size, mode="bilinear", align_corners=False)
            attachment(image)
            feature = attachment.feature
            assert feature is not None  # the forward pass just captured it
            embeddings = head.embed(feature)  # the next forward pass replaces the feature
            part = prototype_forces(
                embeddings, labels, head.prototypes, tau=head.tau, ignore_index=d.ignore_index
            )
            total = part if total is None else total + part
    if total is None:
        raise RCHError(f"split {split!r} of {path} has no image")
    own, everything = total.alignment(head.prototypes)
    # a descent step's two parts, along the class's own mean direction; times the prototype's
    # norm (the gradient of a cosine scales with 1 / norm), so runs can be compared
    norm = torch.linalg.vector_norm(head.prototypes.detach().to(total.pull_grad.dtype), dim=1)
    towards = F.normalize(total.own_sum, dim=1)
    pull_step = -(total.pull_grad * towards).sum(1) * norm
    push_step = -(total.push_grad * towards).sum(1) * norm
    return {
        "config": {
            "prototypes": cfg.rch.prototypes,
            "source": cfg.rch.prototype_source,
            "tau": head.tau,
            "formulation": cfg.rch.formulation,
        },
        "images": count,
        "classes": classes,
        "pixels": total.count.tolist(),
        "pull": total.pull.tolist(),
        "push": total.push.tolist(),
        "cos_own_mean": own.tolist(),
        "cos_all_mean": everything.tolist(),
        "pull_step_own": pull_step.tolist(),
        "push_step_own": push_step.tolist(),
    }


def format_forces(name: str, r: dict[str, Any]) -> str:
    c = r["config"]
    lines = [
        f"{name}: prototypes {c['prototypes']} ({c['source']}), tau {c['tau']}, "
        f"{r['images']} images",
        f"{'class':<12}{'pixels':>9}{'pull':>9}{'push':>9}{'push/pull':>10}"
        f"{'cos own':>9}{'cos all':>9}{'step own':>10}",
    ]
    for k, cls in enumerate(r["classes"]):
        pull, push = r["pull"][k], r["push"][k]
        ratio = push / pull if pull > 0 else float("nan")
        lines.append(
            f"{cls:<12}{r['pixels'][k]:9d}{pull:9.0f}{push:9.0f}{ratio:10.1f}"
            f"{r['cos_own_mean'][k]:9.2f}{r['cos_all_mean'][k]:9.2f}"
            f"{r['pull_step_own'][k] + r['push_step_own'][k]:+10.0f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="run directories or checkpoints")
    p.add_argument("--split", default="train", help="the split to embed (default: train)")
    p.add_argument("--limit", type=int, default=None, help="only the first N images")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", type=Path, default=None, help="write the numbers as JSON here")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        p.error("--limit must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {}
    for path in args.runs:
        try:
            results[path.name] = run_forces(path, args.split, args.limit, not args.no_progress)
        except (RCHError, FileNotFoundError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(format_forces(path.name, results[path.name]))
    if args.out is not None:
        write_results(args.out, {"meta": run_meta(argv, split=args.split), "runs": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
