"""Process-group helpers: an autograd-aware sum that is a no-op without torch.distributed."""

from __future__ import annotations

from typing import cast

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["all_reduce_sum", "world_size"]


def world_size(group: dist.ProcessGroup | None = None) -> int:
    """Number of processes in ``group``; 1 when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return int(dist.get_world_size(group))


def all_reduce_sum(tensor: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """Sum ``tensor`` over the process group, keeping the autograd graph.

    The backward pass sums the incoming gradients over the processes, so each process's
    contribution receives the gradient of every process's loss. Returns ``tensor`` itself
    on a single process or without a process group.
    """
    if world_size(group) == 1:
        return tensor
    if tensor.requires_grad:
        # functional collectives carry autograd (backward = the same all-reduce of the grads)
        import torch.distributed._functional_collectives as funcol

        target = cast(dist.ProcessGroup, dist.group.WORLD if group is None else group)
        reduced = funcol.all_reduce(tensor, "sum", target)
        if isinstance(reduced, funcol.AsyncCollectiveTensor):
            reduced = reduced.wait()
        return cast(Tensor, reduced)
    out = tensor.clone()
    with torch.no_grad():
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out
