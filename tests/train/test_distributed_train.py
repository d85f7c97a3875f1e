"""Two-process gloo DDP training: both ranks end with identical weights and prototypes, and
the sharded evaluation equals a one-process evaluation of the same checkpoint."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rch.train import evaluate_checkpoint, load_checkpoint, train

from .helpers import tiny_config

WORLD = 2
pytestmark = pytest.mark.distributed


def _worker(rank: int, init_file: str, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        cfg = tiny_config(Path(tmp), train={"iters": 3, "batch_size": 2})
        result = train(cfg, progress=False)
        assert result.eval is not None
        torch.save(
            {
                "state": result.network.module.state_dict(),
                "confusion": result.eval.confusion,
                "process_group": result.network.attachment.head.process_group is not None,
            },
            Path(tmp) / f"rank{rank}.pt",
        )
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_two_rank_ddp_training_keeps_ranks_identical(tmp_path):
    tiny_config(tmp_path)  # the data cache is built by both ranks alike (atomically)
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")
    assert r0["process_group"] and r1["process_group"]
    assert r0["state"].keys() == r1["state"].keys()
    for key in r0["state"]:
        assert torch.equal(r0["state"][key], r1["state"][key]), key
    assert int(r0["state"]["head.step"]) == 3
    assert not torch.equal(
        r0["state"]["head.prototypes"], torch.zeros_like(r0["state"]["head.prototypes"])
    )
    assert torch.equal(r0["confusion"], r1["confusion"])
    run = tmp_path / "runs" / "t"
    saved = load_checkpoint(run / "checkpoints" / "last.pt")
    assert torch.equal(saved["model"]["head.prototypes"], r0["state"]["head.prototypes"])
    _, single = evaluate_checkpoint(run, progress=False)
    assert torch.equal(single.confusion, r0["confusion"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_torchrun_launches_rch_train(tmp_path):
    config = tmp_path / "c.yaml"
    cfg = tiny_config(tmp_path)
    config.write_text(
        "name: tr\nmodel: {name: tiny, options: {width: 8}}\n"
        f"data: {{name: synthetic, root: '{cfg.data.root}', crop_size: [32, 48],"
        " options: {train: 12, val: 3, height: 32, width: 48}}\n"
        "rch: {embed_dim: 8}\nloss: {ohem_min_kept: 500}\n"
        f"train: {{iters: 2, batch_size: 2, out_dir: '{tmp_path / 'runs'}'}}\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        "-m",
        "rch",
        "train",
        str(config),
        "--no-progress",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    state = load_checkpoint(tmp_path / "runs" / "tr" / "checkpoints" / "last.pt")
    assert state["iter"] == 2 and int(state["model"]["head.step"]) == 2
