"""The few collectives the trainer needs beyond the engines': gather small objects, OR flags across ranks.

Both work without a process group (one process: the local value is the answer), so the trainer calls them the
same way under the plain-torch engine, in unit tests and inside Ray Train workers. Every rank must call them the
same number of times in the same order, like any collective.
"""

from __future__ import annotations

from typing import Any

import torch


def _group_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def group_rank() -> int:
    """This process's rank in the default process group (0 without one)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


def gather_objects(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (picklable objects; small ones: lists, dicts)."""
    size = _group_size()
    if size == 1:
        return [obj]
    out: list[Any] = [None] * size
    torch.distributed.all_gather_object(out, obj)
    return out


def any_rank(flags: list[bool]) -> list[bool]:
    """Element-wise OR of ``flags`` over all ranks (one small all-reduce; cheap enough to run every iteration)."""
    if _group_size() == 1:
        return [bool(f) for f in flags]
    t = torch.tensor([1 if f else 0 for f in flags], dtype=torch.int32)
    if torch.distributed.get_backend() == "nccl":
        t = t.cuda()
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]
