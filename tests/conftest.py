"""Shared fixtures and case builders. Device and dtype come from the environment.

RCH_TEST_DEVICE (default "cpu") selects where tensors are made, e.g. "cuda" on a GPU host.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch
from hypothesis import settings
from torch import Tensor

DEVICE = torch.device(os.environ.get("RCH_TEST_DEVICE", "cpu"))

# CI replays the same examples every run; local runs keep exploring new ones
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.load_profile("ci" if os.environ.get("CI") else "default")


@dataclass
class Case:
    embeddings: Tensor
    seg_logits: Tensor
    labels: Tensor
    prototypes: Tensor


def make_case(
    seed: int = 0,
    *,
    batch: int = 2,
    dim: int = 5,
    classes: int = 4,
    size: tuple[int, int] = (4, 5),
    label_size: tuple[int, int] | None = None,
    logit_size: tuple[int, int] | None = None,
    accuracy: float = 0.6,
    ignore_frac: float = 0.15,
    ignore_index: int = 255,
    dtype: torch.dtype = torch.float64,
    absent: tuple[int, ...] = (),
) -> Case:
    """A random batch whose predictions are right on about ``accuracy`` of the pixels."""
    g = torch.Generator().manual_seed(seed)
    label_size = label_size or size
    logit_size = logit_size or size
    present = [c for c in range(classes) if c not in absent]
    pick = torch.randint(0, len(present), (batch, *label_size), generator=g)
    labels = torch.tensor(present)[pick]
    labels[torch.rand(labels.shape, generator=g) < ignore_frac] = ignore_index
    small = torch.nn.functional.interpolate(
        labels[:, None].double(), size=logit_size, mode="nearest"
    )[:, 0].long()
    guess = torch.randint(0, classes, small.shape, generator=g)
    keep = (torch.rand(small.shape, generator=g) < accuracy) & (small != ignore_index)
    guess = torch.where(keep, small, guess)
    logits = torch.randn(batch, classes, *logit_size, generator=g, dtype=dtype)
    logits = logits + 3.0 * torch.nn.functional.one_hot(guess, classes).permute(0, 3, 1, 2)
    emb = torch.randn(batch, dim, *size, generator=g, dtype=dtype)
    protos = torch.randn(classes, dim, generator=g, dtype=dtype)
    return Case(
        emb.to(DEVICE).requires_grad_(True),
        logits.to(DEVICE),
        labels.to(DEVICE),
        protos.to(DEVICE),
    )


@pytest.fixture
def case() -> Case:
    return make_case()


@contextlib.contextmanager
def cuda_syncs_raise() -> Iterator[None]:
    """On CUDA, any host synchronisation inside the block raises
    (``torch.cuda.set_sync_debug_mode("error")``): the real check that the tests' host-read
    spies stand in for on the CPU."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def use_gpu_path(monkeypatch: pytest.MonkeyPatch, *, tiny_blocks: bool = False) -> None:
    """Switch the loss to its GPU code path on whatever device the tests run: no host
    synchronisation (``rch.stats.COMPACT_ON``, ``BINCOUNT_ON``, ``SORTED_SUMS_ON``), the
    prediction from native reductions (``BLOCKED_PREDICTION_ON``) and no BLAS in the backward
    pass (``rch._fused.BLAS_IN_BACKWARD_ON``). ``tiny_blocks``: also
    blocks of 64 rows and bags of one row, so that every blockwise loop runs many times."""
    import importlib

    from rch import _fused

    for module, name in _fused.CPU_ONLY_SWITCHES:
        monkeypatch.setattr(importlib.import_module(module), name, ())
    if tiny_blocks:
        for name in ("CHUNK_BYTES", "DEVICE_CHUNK_BYTES", "BAG_INDEX_BYTES"):
            monkeypatch.setattr(_fused, name, 1)
