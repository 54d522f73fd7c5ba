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

import datetime
import gc
from typing import Optional

import torch
import torch.distributed as dist

__all__ = ["resolve_group", "world_size", "is_sharded", "local", "all_reduce_sum", "leave_process_group"]


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


def _release_ddp_wrappers() -> int:
    """Drop the C++ reducer (and its logger) of every live ``DistributedDataParallel``.

    These are the attributes DDP's own ``__getstate__`` leaves out; the wrapper cannot train after
    this, which is fine at teardown. Returns how many wrappers were released."""
    from torch.nn.parallel import DistributedDataParallel

    released = 0
    for obj in gc.get_objects():
        if isinstance(obj, DistributedDataParallel) and "reducer" in obj.__dict__:
            obj.__dict__.pop("logger", None)  # the logger holds the reducer too
            del obj.__dict__["reducer"]
            released += 1
    return released


def leave_process_group(timeout_s: float = 300.0, wait_for_ranks: bool = True) -> int:
    """End a torch.distributed run so that teardown cannot hang: call it last, on every rank.

    Waits for every rank (a barrier with a time limit; ``wait_for_ranks=False`` skips it, for an
    error path where other ranks may never arrive), releases the process group from the DDP
    wrappers still alive, then destroys the group. Does nothing when no group is initialised.
    Returns how many DDP wrappers it released (they cannot train afterwards).

    Why: a DDP wrapper's reducer holds the process group. When the wrapper outlives
    ``destroy_process_group()`` (HF Trainer and Lightning keep theirs), the group is destroyed
    later from the reducer's destructor, which holds the GIL while the gloo group joins its worker
    threads; a worker still dropping a finished collective's tensors waits for that GIL, and both
    wait forever (py-spy stacks in issue 16: ``~ProcessGroupGloo`` -> ``thread::join`` against
    ``~AsyncAllgatherWork`` -> ``gil_scoped_acquire``). Released here while the group is alive, the
    reducer is no longer the group's last owner; the group then dies through its Python handle,
    whose destructor lets go of the GIL while it joins.
    """
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0 (seconds to wait for the other ranks), got {timeout_s!r}")
    if not (dist.is_available() and dist.is_initialized()):
        return 0
    try:
        if wait_for_ranks and dist.get_backend() == "gloo":
            # a rank that never arrives raises here instead of blocking for the group's timeout
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=timeout_s))
        elif wait_for_ranks:
            dist.barrier()
    finally:
        gc.collect()  # frees wrappers kept only by reference cycles (Trainer <-> callbacks)
        released = _release_ddp_wrappers()
        dist.destroy_process_group()
    return released
