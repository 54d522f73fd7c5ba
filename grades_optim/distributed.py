"""Rank agreement for GradES under torch.distributed (DDP, FSDP2).

Every check ends with ONE all-reduce of a small float64 vector ``[sums | numels | seen]`` (three
entries per component), issued by every rank for the same components in the same order:

* FSDP2 (``fully_shard``): a gradient is a DTensor sharded on dim 0; each rank sums its local
  shard (possibly empty), so the SUM of the partials is the whole matrix's sum;
* DDP / replicated: every rank holds the full (already all-reduced) gradient, so each contributes
  ``1/world`` of its sum and the SUM is the mean over ranks.

Every rank then feeds identical numbers to the pure rule, so freeze decisions, freeze steps and
the rule's counters agree even when one rank's local statistics differ (heterogeneous devices,
nondeterministic kernels, a rank that saw no gradient). float64 keeps element counts of
multi-billion-element sets exact. Only 1-D meshes are handled (plain FSDP2, not HSDP/TP).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

__all__ = ["resolve_group", "world_size", "is_sharded", "local", "all_reduce_sum"]


def resolve_group(process_group=None):
    """The group to agree over, or ``None`` when not running distributed (or alone)."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = process_group if process_group is not None else dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def world_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def is_sharded(t: torch.Tensor) -> bool:
    placements = getattr(t, "placements", None)
    return placements is not None and any(p.is_shard() for p in placements)


def local(t: torch.Tensor) -> torch.Tensor:
    """The rank-local part of a DTensor (a plain tensor is returned as is)."""
    return t.to_local() if hasattr(t, "to_local") else t


def all_reduce_sum(vec: torch.Tensor, group: Optional[object]) -> torch.Tensor:
    if group is not None:
        dist.all_reduce(vec, op=dist.ReduceOp.SUM, group=group)
    return vec


def all_true(flag: bool, device, group) -> bool:
    """Whether ``flag`` holds on every rank (one tiny all-reduce; only called on rare paths)."""
    if group is None:
        return flag
    t = torch.tensor([0.0 if flag else 1.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return float(t) == 0.0
