"""A real two-process gloo run: prototypes and gradients equal the one-process full batch."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rch import RCHHead
from rch.distributed import world_size
from rch.functional import rch_loss

from .conftest import make_case

WORLD = 2
PER_RANK = 2


def _full_case():
    return make_case(
        seed=21, batch=WORLD * PER_RANK, dim=6, classes=5, size=(6, 6), label_size=(12, 12)
    )


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        c = _full_case()
        part = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        emb = c.embeddings.detach()[part].clone().requires_grad_(True)
        out = rch_loss(emb, c.seg_logits[part], c.labels[part], c.prototypes)
        probe = torch.arange(out.prototypes.numel(), dtype=out.prototypes.dtype)
        (proto_grad,) = torch.autograd.grad(
            (out.prototypes.flatten() * probe).sum(), emb, retain_graph=True
        )
        out.loss.backward()
        official = rch_loss(
            emb.detach().clone().requires_grad_(True),
            c.seg_logits[part],
            c.labels[part],
            c.prototypes,
            formulation="official",
        )
        official.loss.backward()
        # the head: identical buffers on both ranks after two steps
        torch.manual_seed(0)
        head = RCHHead(6, 5, embed_dim=4).double()
        for _ in range(2):
            head(c.embeddings.detach()[part], c.seg_logits[part], c.labels[part]).loss.backward()
        torch.save(
            {
                "world": world_size(),
                "prototypes": out.prototypes.detach(),
                "proto_grad": proto_grad,
                "loss": out.loss.detach(),
                "grad": emb.grad,
                "head_prototypes": head.prototypes.clone(),
                "head_step": int(head.step),
                "official_prototypes": official.prototypes.detach(),
                "official_loss": official.loss.detach(),
            },
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
        dist.barrier()  # both ranks done before gloo is torn down
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_two_gloo_processes_match_one_full_batch(tmp_path: Path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    assert [r["world"] for r in ranks] == [WORLD, WORLD]

    c = _full_case()
    full = rch_loss(c.embeddings, c.seg_logits, c.labels, c.prototypes)
    probe = torch.arange(full.prototypes.numel(), dtype=full.prototypes.dtype)
    (full_proto_grad,) = torch.autograd.grad(
        (full.prototypes.flatten() * probe).sum(), c.embeddings
    )
    for rank, res in enumerate(ranks):
        part = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        torch.testing.assert_close(
            res["prototypes"], full.prototypes.detach(), rtol=1e-12, atol=1e-12
        )
        # every rank's loss feeds the shared prototypes; DDP's 1/P averaging of the summed
        # gradient gives exactly the full-batch gradient of the prototypes
        torch.testing.assert_close(
            res["proto_grad"] / WORLD, full_proto_grad[part], rtol=1e-10, atol=1e-12
        )
        # each rank's loss is its own slice's loss against the shared prototypes
        local = rch_loss(
            c.embeddings.detach()[part],
            c.seg_logits[part],
            c.labels[part],
            full.prototypes.detach(),
            update_prototypes=False,
        )
        torch.testing.assert_close(res["loss"], local.loss, rtol=1e-12, atol=1e-12)
        assert torch.isfinite(res["grad"]).all() and res["grad"].abs().sum() > 0
    torch.testing.assert_close(
        ranks[0]["head_prototypes"], ranks[1]["head_prototypes"], rtol=0, atol=0
    )
    assert ranks[0]["head_step"] == ranks[1]["head_step"] == 2
    assert not torch.equal(ranks[0]["grad"], ranks[1]["grad"])


def test_without_process_group_world_size_is_one():
    assert not dist.is_initialized()
    assert world_size() == 1
