"""Deterministic, resumable, rank-sharded sample streams and the data loaders built on them.

Training is iteration-based. The sample at global position ``t`` of the stream (batch ``i``
holds positions ``i * B * P ... (i + 1) * B * P - 1`` for batch ``B`` on ``P`` processes) is
``perm_e[t mod n]`` with ``e = t // n`` and a per-epoch permutation drawn from the seed; its
augmentation is seeded by ``(seed, t)``. So a run resumed at iteration ``i`` sees exactly the
samples and augmentations of an uninterrupted run, and ``P`` processes with batch ``B`` see the
same samples as one process with batch ``P * B``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from .datasets import SegmentationDataset
from .transforms import IMAGENET_MEAN, IMAGENET_STD, Augment, augment, normalize, sample_seed

__all__ = ["EvalSet", "SampleStream", "TrainSet", "make_eval_loader", "make_train_loader"]


class TrainSet(Dataset[tuple[Tensor, Tensor]]):
    """A dataset indexed by ``(index, seed)``: the sample, augmented with that seed, normalised."""

    def __init__(
        self,
        dataset: SegmentationDataset,
        cfg: Augment,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        self.dataset, self.cfg, self.mean, self.std = dataset, cfg, tuple(mean), tuple(std)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> tuple[Tensor, Tensor]:
        index, seed = key
        image, mask = self.dataset[index]
        x, y = augment(image, mask, self.cfg, torch.Generator().manual_seed(seed))
        return normalize(x, self.mean, self.std), y


class SampleStream(Sampler[tuple[int, int]]):
    """Yields ``(index, augmentation seed)`` for this rank's share of iterations
    ``start .. total - 1``.

    Example:
        >>> s = SampleStream(5, batch_size=2, seed=0, total_iters=3)
        >>> keys = list(s)
        >>> len(keys), sorted(k for k, _ in keys[:5]) == [0, 1, 2, 3, 4]
        (6, True)
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        seed: int,
        total_iters: int,
        start_iter: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if num_samples < 1 or batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"SampleStream: need num_samples, batch_size, world_size >= 1 and 0 <= rank < "
                f"world_size; got {num_samples}, {batch_size}, {world_size}, rank {rank}"
            )
        self.n, self.batch, self.seed = num_samples, batch_size, seed
        self.start, self.total, self.rank, self.world = start_iter, total_iters, rank, world_size

    def __len__(self) -> int:
        return max(0, self.total - self.start) * self.batch

    def _perm(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(sample_seed(self.seed, epoch, -1))
        return torch.randperm(self.n, generator=g).tolist()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, perm = -1, []
        for it in range(self.start, self.total):
            for j in range(self.batch):
                pos = (it * self.world + self.rank) * self.batch + j
                e, k = divmod(pos, self.n)
                if e != epoch:
                    epoch, perm = e, self._perm(e)
                yield perm[k], sample_seed(self.seed, 0, pos)


def make_train_loader(
    dataset: SegmentationDataset,
    cfg: Augment,
    batch_size: int,
    seed: int,
    total_iters: int,
    start_iter: int = 0,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader[tuple[Tensor, Tensor]]:
    """A loader that yields exactly ``total_iters - start_iter`` batches of this rank."""
    stream = SampleStream(len(dataset), batch_size, seed, total_iters, start_iter, rank, world_size)
    return DataLoader(
        TrainSet(dataset, cfg),
        batch_size=batch_size,
        sampler=stream,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=False,
        # the loader draws its workers' base seed from this generator, not from the global
        # RNG, so creating it on resume does not shift the model's random stream (dropout)
        generator=torch.Generator().manual_seed(seed),
    )


class EvalSet(Dataset[tuple[Tensor, Tensor, int]]):
    """Whole images, normalised, with their index (for naming outputs)."""

    def __init__(self, dataset: SegmentationDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, int]:
        image, mask = self.dataset[index]
        return normalize(image), mask, index


def make_eval_loader(
    dataset: SegmentationDataset, rank: int = 0, world_size: int = 1, num_workers: int = 0
) -> DataLoader[tuple[Tensor, Tensor, int]]:
    """Batch-1 loader over this rank's share (every ``world_size``-th image) of the split."""
    indices = list(range(rank, len(dataset), world_size))
    return DataLoader(
        torch.utils.data.Subset(EvalSet(dataset), indices), batch_size=1, num_workers=num_workers
    )
