"""Torch twin of ``decide.decide`` and the device-side rule state both share; no triton import.

The specification is the pure rule, ``grades_optim.rule.decide`` (DESIGN §3): this is the same
rule over tensors, one entry per component, so that freeze decisions can be taken on the device
without a host sync. ``DecideState`` round-trips exactly to and from ``rule.ComponentState``
(float64 throughout, ``-1`` / NaN standing for ``None``), which is how the tests hold the kernel
and this twin to the rule.

Metric per component ``c`` owning per-tensor sums ``sums[start_c : start_c + count_c]`` (Σ|g| or
Σg², fp32, added in that order in fp32 like ``magnitudes.sum_by_owner``):
``v = Σ`` then ``v / numel_c`` (``mean``) then ``sqrt(v)`` (``ord=2``), in float64. A component
with no tensor (``count_c = 0``) or no elements has no reading (``None`` in the rule).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch

__all__ = ["DecideState", "torch_decide"]

_TAU_MODES = ("absolute", "relative")


class DecideState(NamedTuple):
    """The rule's per-component memory as device tensors (updated in place by ``decide``)."""

    frozen_at: torch.Tensor  # int64, -1 = live
    below: torch.Tensor  # int64
    smoothed: torch.Tensor  # float64, NaN = no reading yet
    ref_sum: torch.Tensor  # float64
    ref_count: torch.Tensor  # int64
    ref_first: torch.Tensor  # float64, NaN = none
    active: torch.Tensor  # int32 per component: 1 live, 0 frozen (what the step kernels read)

    @classmethod
    def from_rule(cls, states: Sequence, device="cpu") -> "DecideState":
        def nan(x):
            return float("nan") if x is None else float(x)

        def col(get, dtype):
            return torch.tensor([get(s) for s in states], dtype=dtype, device=device)

        return cls(col(lambda s: -1 if s.frozen_at is None else s.frozen_at, torch.int64),
                   col(lambda s: s.below, torch.int64), col(lambda s: nan(s.smoothed), torch.float64),
                   col(lambda s: s.ref_sum, torch.float64), col(lambda s: s.ref_count, torch.int64),
                   col(lambda s: nan(s.ref_first), torch.float64),
                   col(lambda s: int(s.frozen_at is None), torch.int32))

    def to_rule(self) -> list:
        """Per component a plain tuple in ``grades_optim.rule.ComponentState``'s field order (frozen_at,
        below, smoothed, ref_sum, ref_count, ref_first, gate, gate_peak): ``ComponentState(*t)`` reads
        it, and it compares equal to one. Plain tuples: ``kernels/`` imports nothing from
        ``grades_optim``. The device rule has no ``peak_gate`` yet: its two fields stay unset."""

        def opt(x):
            return None if math.isnan(x) else x

        cols = [t.tolist() for t in self[:6]]
        return [(None if fa < 0 else fa, b, opt(s), rs, rc, opt(rf), None, 0.0)
                for fa, b, s, rs, rc, rf in zip(*cols)]


def check_args(sums, comp_start, comp_count, numel, state, ord, reduction, tau_mode) -> None:
    if ord not in (1, 2):
        raise ValueError(f"Invalid ord: {ord!r}; expected 1 or 2")
    if reduction not in ("sum", "mean"):
        raise ValueError(f"Invalid reduction: {reduction!r}; expected 'sum' or 'mean'")
    if tau_mode not in _TAU_MODES:
        raise ValueError(f"Invalid tau_mode: {tau_mode!r}; expected one of {', '.join(map(repr, _TAU_MODES))}")
    if sums.dtype != torch.float32 or sums.dim() != 1:
        raise ValueError(f"sums must be a 1-D float32 tensor, got {sums.dtype} {tuple(sums.shape)}")
    c = comp_start.numel()
    for name, t, dtype in (("comp_start", comp_start, torch.int64), ("comp_count", comp_count, torch.int64),
                           ("numel", numel, torch.float64)):
        if t.dtype != dtype or t.numel() != c:
            raise ValueError(f"{name} must be {c} {dtype} values, got {t.numel()} {t.dtype}")
    for name, t in zip(DecideState._fields, state):
        if t.numel() != c:
            raise ValueError(f"state.{name} has {t.numel()} entries for {c} components")


def torch_decide(sums: torch.Tensor, comp_start: torch.Tensor, comp_count: torch.Tensor, numel: torch.Tensor,
                 state: DecideState, *, step: int, tau: float, grace_steps: int = 0, patience: int = 1,
                 ema: float = 0.0, tau_mode: str = "absolute", ord: int = 1, reduction: str = "mean",
                 tensor_active: torch.Tensor | None = None) -> torch.Tensor:
    """One check on every component, in place on ``state``; returns the metric per component (float64, NaN = none).

    ``tensor_active`` (optional, int, one per entry of ``sums``) receives each tensor's
    component flag, the per-tensor layout the fused step kernels read.
    """
    check_args(sums, comp_start, comp_count, numel, state, ord, reduction, tau_mode)
    c_n = comp_start.numel()
    max_count = int(comp_count.max()) if c_n else 0
    acc = torch.zeros(c_n, dtype=torch.float32, device=sums.device)
    for j in range(max_count):  # fp32, tensor order: the order of the host path's sum_by_owner
        take = comp_count > j
        idx = torch.where(take, comp_start + j, torch.zeros_like(comp_start))
        acc = acc + torch.where(take, sums[idx] if sums.numel() else acc, torch.zeros_like(acc))
    v = acc.double()
    if reduction == "mean":
        v = v / numel
    if ord == 2:
        # math.sqrt, element by element: torch's vectorised CPU sqrt may miss the correctly rounded
        # double by an ulp, and the rule compares these doubles with tau.
        v = torch.tensor([math.sqrt(x) if x >= 0 else x for x in v.tolist()], dtype=torch.float64, device=v.device)
    measured = (comp_count > 0) & (numel > 0)
    metric = torch.where(measured, v, torch.full_like(v, float("nan")))

    fa, below, sm, rsum, rcount, rfirst, active = state
    live = fa < 0
    ok = live & torch.isfinite(metric)
    value = metric if ema <= 0 else torch.where(torch.isnan(sm), metric, ema * sm + (1.0 - ema) * metric)
    grace = step < grace_steps  # the released code may freeze at step int(α·T) itself
    if tau_mode == "absolute":
        thr = torch.full_like(value, tau)
    else:
        thr = torch.where(rcount > 0, tau * (rsum / rcount.clamp(min=1).double()), tau * rfirst)
    has_thr = ~torch.isnan(thr)
    new_below = torch.where(value < thr, below + 1, torch.zeros_like(below))
    freeze = ok & (not grace) & has_thr & (new_below >= patience)
    sm.copy_(torch.where(ok, value, sm))
    if grace:
        rsum.copy_(torch.where(ok, rsum + value, rsum))
        rcount.copy_(torch.where(ok, rcount + 1, rcount))
    else:
        rfirst.copy_(torch.where(ok & ~has_thr, value, rfirst))
    # not finite, in grace, or first reference reading: the streak breaks; otherwise it counts
    below.copy_(torch.where(live, torch.where(ok & (not grace) & has_thr, new_below, torch.zeros_like(below)), below))
    fa.copy_(torch.where(freeze, torch.full_like(fa, step), fa))
    active.copy_((fa < 0).to(active.dtype))
    if tensor_active is not None:
        _scatter_flags(active, comp_start, comp_count, tensor_active)
    return metric


def _scatter_flags(active, comp_start, comp_count, tensor_active) -> None:
    owner = torch.repeat_interleave(torch.arange(active.numel(), device=active.device), comp_count)
    pos = torch.cat([torch.arange(s, s + k) for s, k in zip(comp_start.tolist(), comp_count.tolist())]) \
        if owner.numel() else owner
    tensor_active[pos.to(tensor_active.device)] = active[owner].to(tensor_active.dtype)
