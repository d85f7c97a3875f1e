"""Sample streams: resumable, rank-sharded exactly like one big batch, epoch permutations."""

from __future__ import annotations

import pytest
import torch

from rch.data import Augment, build_dataset, make_train_loader
from rch.data.loader import SampleStream

from . import trees


def test_resumed_stream_is_the_tail_of_the_uninterrupted_one():
    full = list(SampleStream(7, 3, seed=1, total_iters=10))
    tail = list(SampleStream(7, 3, seed=1, total_iters=10, start_iter=4))
    assert tail == full[4 * 3 :]


def test_two_ranks_see_what_one_process_with_twice_the_batch_sees():
    one = list(SampleStream(11, 4, seed=2, total_iters=6))
    r0 = list(SampleStream(11, 2, seed=2, total_iters=6, rank=0, world_size=2))
    r1 = list(SampleStream(11, 2, seed=2, total_iters=6, rank=1, world_size=2))
    for it in range(6):
        assert one[4 * it : 4 * it + 4] == r0[2 * it : 2 * it + 2] + r1[2 * it : 2 * it + 2]


def test_each_epoch_is_a_permutation_and_epochs_differ():
    keys = [k for k, _ in SampleStream(5, 5, seed=0, total_iters=2)]
    assert sorted(keys[:5]) == sorted(keys[5:]) == list(range(5))
    assert keys[:5] != keys[5:]


def test_stream_rejects_bad_arguments():
    with pytest.raises(ValueError, match="rank"):
        SampleStream(5, 2, 0, 3, rank=2, world_size=2)


def test_loader_batches_are_normalised_crops(tmp_path):
    trees.camvid(tmp_path, [0, 10, 11, 3])
    ds = build_dataset("camvid", tmp_path, "train")
    loader = make_train_loader(ds, Augment((8, 8)), batch_size=2, seed=0, total_iters=3)
    batches = list(loader)
    assert len(batches) == 3
    x, y = batches[0]
    assert x.shape == (2, 3, 8, 8) and x.dtype == torch.float32 and y.shape == (2, 8, 8)
    again = list(make_train_loader(ds, Augment((8, 8)), 2, 0, 3, start_iter=2))
    assert torch.equal(again[0][0], batches[2][0]) and torch.equal(again[0][1], batches[2][1])
