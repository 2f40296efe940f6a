"""Collecting per-image results from every rank, each image once."""

from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    """The number of processes in the default group (1 when not distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_gather(obj) -> list:
    """Every rank's obj, in rank order ([obj] in a single process)."""
    if world_size() == 1:
        return [obj]
    everyone: list = [None] * world_size()
    dist.all_gather_object(everyone, obj)
    return everyone


def gather_by_index(parts: list[tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...] | None:
    """Concatenate (index, *values) batches from all ranks, sorted by index, one row per index.

    A distributed sampler may hand the same image to two ranks to even them out; the repeat is dropped here.
    """
    parts = [p for rank_parts in all_gather(parts) for p in rank_parts]
    if not parts:
        return None
    index, *values = (torch.cat(column) for column in zip(*parts, strict=True))
    order = torch.argsort(index)
    keep = torch.ones_like(order, dtype=torch.bool)
    keep[1:] = index[order][1:] != index[order][:-1]
    order = order[keep]
    return (index[order], *(v[order] for v in values))
