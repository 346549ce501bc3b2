"""Collectives for the train stage: the callables ``gradmimic`` takes, built on ``torch.distributed``.

- :meth:`Comm.gather_1d`: every rank's 1-D tensor concatenated in rank order, ranks of any length (the score gather
  ``GradMimic.step`` wants; one collective when the lengths are known, as the step plan knows every rank's share);
- :meth:`Comm.gather_rows`: every rank's ``(b, ...)`` rows concatenated along dim 0 *with gradient*: the backward sums
  every rank's gradient of the concatenation and hands each rank its own rows (open_clip's ``gather_with_grad``,
  for unequal per-rank batches).  It runs on a process group of its own, so its collective inside the backward
  never interleaves with DDP's gradient buckets on the default group;
- :meth:`Comm.all_sum`, :meth:`Comm.barrier`.

A single process (no process group) gets identities, so the training loop is the same with one rank or many.
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.distributed as dist


def _gather_padded(t: torch.Tensor, sizes: List[int], group) -> torch.Tensor:
    """Concatenation over ranks along dim 0 of tensors whose dim 0 is ``sizes[rank]`` (all_gather needs equal shapes)."""
    width = max(sizes)
    padded = t.new_zeros((width, *t.shape[1:]))
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: List[int], rank: int, group) -> torch.Tensor:
        ctx.sizes, ctx.rank, ctx.group = sizes, rank, group
        return _gather_padded(x.detach(), sizes, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)  # every rank's loss reaches every rank's rows
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None, None, None


class Comm:
    """This process's place among the training ranks, and the collectives the step needs."""

    def __init__(self, world: int = 1, rank: int = 0, rows_group=None) -> None:
        self.world, self.rank, self.rows_group = world, rank, rows_group

    @classmethod
    def current(cls) -> "Comm":
        """From the initialised default process group (Ray Train sets it up), or a single process."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return cls()
        return cls(dist.get_world_size(), dist.get_rank(), dist.new_group())

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def sizes(self, n: int, device: torch.device) -> List[int]:
        """Every rank's local count, in rank order (``[n]`` for a single process)."""
        if not self.distributed:
            return [n]
        count = torch.tensor([n], dtype=torch.int64, device=device)
        parts = [torch.empty_like(count) for _ in range(self.world)]
        dist.all_gather(parts, count)
        return [int(p) for p in parts]

    def gather_1d(self, t: torch.Tensor, sizes: Optional[List[int]] = None) -> torch.Tensor:
        """With ``sizes`` (every rank's length, known to all) one collective; without, two (lengths first)."""
        if not self.distributed:
            return t
        if sizes is None:
            sizes = self.sizes(t.numel(), t.device)
        elif t.numel() != sizes[self.rank]:
            raise ValueError(f"rank {self.rank} gathers {t.numel()} values but its share is {sizes[self.rank]}")
        return _gather_padded(t.reshape(-1), sizes, None)

    def gather_rows(self, t: torch.Tensor, sizes: List[int]) -> torch.Tensor:
        if not self.distributed:
            return t
        if t.requires_grad:
            return _GatherRows.apply(t, sizes, self.rank, self.rows_group)
        return _gather_padded(t, sizes, self.rows_group)

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            t = t.clone()
            dist.all_reduce(t)
        return t

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def offset(self, sizes: List[int]) -> int:
        return sum(sizes[: self.rank])


def maybe_ddp(module: torch.nn.Module, comm: Comm, device: torch.device) -> torch.nn.Module:
    """``module`` wrapped in DDP when there is more than one rank (and something to train)."""
    if not comm.distributed or not any(p.requires_grad for p in module.parameters()):
        return module
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=ids)
