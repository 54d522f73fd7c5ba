"""Cached launch tables of the fused step kernels (``fused_adamw``, ``fused_sgd``).

One plan = one int64 device tensor sliced into: per tensor list (params, grads, states) the data
addresses; per tensor its numel, first block, block count, active flag and init flag; per block
its tensor and chunk. Plans are cached on (device, chunk, every address, numel, dtype, flags), so
a steady-state step (same gradient buffers, which the caching allocator hands back step after
step) rebuilds nothing, and a rebuild uploads through pinned memory without a host sync.

Active flags may instead be a device tensor (e.g. written by the decide kernel): the kernels then
read it where the plan's own flags would be, and it is not part of the cache key.
"""
from __future__ import annotations

import itertools
from collections import OrderedDict
from typing import NamedTuple, Optional, Sequence

import torch

from .tensor_sums import _FINISH_BLOCK, _tensor_sums_finish_kernel, block_layout, to_device

__all__ = ["StepPlan", "get_plan", "launch", "check_contiguous", "stats", "clear"]

_CACHE_SIZE = 16


class StepGroup(NamedTuple):
    dtype: torch.dtype
    block_base: int
    n_blocks: int
    aligned: bool


class StepPlan(NamedTuple):
    addrs: tuple[torch.Tensor, ...]  # one [n] view per tensor list
    numel: torch.Tensor
    block_tensor: torch.Tensor
    block_chunk: torch.Tensor
    block_start: torch.Tensor
    block_count: torch.Tensor
    active: torch.Tensor
    init: torch.Tensor
    groups: tuple[StepGroup, ...]
    n_blocks: int


_plans: "OrderedDict[tuple, StepPlan]" = OrderedDict()
stats = {"builds": 0, "hits": 0}  # read by tests: a non-check step must be a hit


def clear() -> None:
    _plans.clear()
    stats.update(builds=0, hits=0)


def _build(lists: Sequence[Sequence[torch.Tensor]], active: Sequence[int], init: Sequence[int], chunk: int,
           device: torch.device) -> StepPlan:
    params = lists[0]
    numels = [p.numel() for p in params]
    block_tensor, block_chunk, block_start, counts, layout = block_layout(numels, [p.dtype for p in params], chunk)
    groups = tuple(StepGroup(dt, base, nb, all(xs[i].data_ptr() % 16 == 0 for xs in lists for i in idx))
                   for dt, base, nb, idx in layout)
    parts = [torch.tensor([x.data_ptr() for x in xs], dtype=torch.int64) for xs in lists]
    parts += [torch.tensor(numels, dtype=torch.int64), block_tensor, block_chunk, block_start, counts,
              torch.tensor(list(active), dtype=torch.int64), torch.tensor(list(init), dtype=torch.int64)]
    views = torch.split(to_device(torch.cat(parts), device), [p.numel() for p in parts])
    k = len(lists)
    return StepPlan(tuple(views[:k]), *views[k:k + 5], views[k + 5], views[k + 6], groups=groups,
                    n_blocks=int(block_tensor.numel()))


def get_plan(lists: Sequence[Sequence[torch.Tensor]], active: Optional[Sequence[int]], init: Sequence[int],
             chunk: int, device: torch.device) -> StepPlan:
    """The (cached) plan for these tensors; ``active=None`` stores all-ones (device flags given apart)."""
    n = len(lists[0])
    active = (1,) * n if active is None else tuple(int(a) for a in active)
    init = tuple(int(x) for x in init)
    # numel and dtype are in the key: a freed address reused by another tensor must not match.
    # flat tuples built by map over C methods: this key is rebuilt every step, so it must be cheap
    key = (device, chunk, len(lists), tuple(map(torch.Tensor.data_ptr, itertools.chain.from_iterable(lists))),
           tuple(map(torch.Tensor.numel, lists[0])), tuple(p.dtype for p in lists[0]), active, init)
    plan = _plans.get(key)
    if plan is None:
        stats["builds"] += 1
        plan = _build(lists, active, init, chunk, device)
        _plans[key] = plan
        if len(_plans) > _CACHE_SIZE:
            _plans.popitem(last=False)
    else:
        stats["hits"] += 1
        _plans.move_to_end(key)
    return plan


def check_contiguous(names, lists) -> None:
    for name, xs in zip(names, lists):
        for i, x in enumerate(xs):
            if not x.is_contiguous():
                raise ValueError(f"{name}[{i}] is not contiguous; the fused step updates tensors in place")


def launch(plan, flags, metric: bool, n: int, device: torch.device, launch_group) -> Optional[torch.Tensor]:
    """Run one step launch per dtype group over ``plan``, then (with ``metric``) the per-tensor reduction."""
    if flags.device != device or flags.numel() != n:
        raise ValueError(f"active must be {n} flags on {device}; got {flags.numel()} on {flags.device}")
    out = torch.zeros(n, dtype=torch.float32, device=device) if metric else None
    if plan.n_blocks == 0:
        return out
    partials = torch.empty(plan.n_blocks, dtype=torch.float32, device=device)
    for g in plan.groups:
        if g.n_blocks:
            launch_group(g, partials)
    if metric:
        _tensor_sums_finish_kernel[(n,)](partials, plan.block_start, plan.block_count, out, RBLOCK=_FINISH_BLOCK)
    return out
