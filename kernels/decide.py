"""The GradES freeze rule on the device: per-tensor sums → per-component metric → threshold → flags.

One launch, one program per ``BLOCK_C`` components, no host sync: each program adds its
components' per-tensor sums in tensor order (fp32, no atomics, the order of the host path's
``sum_by_owner``), forms the metric in float64 (``/ numel`` for ``mean``, ``sqrt`` for ``ord=2``),
applies ``grades_optim.rule.decide`` (grace period, EMA, absolute or relative threshold,
patience; frozen is final) to the ``DecideState`` tensors in place and writes the active flags,
per component and optionally per tensor (the layout the fused step kernels read).

Scalars travel as float64/int64 tensors, not as kernel arguments: Triton would pass a Python float
as fp32 (tau and the EMA factor would lose digits against the rule's doubles) and would
specialise on the step number's value.

Status (see ``grades_optim/fused_step.py``): ``GradESOptimizer`` keeps the host-side rule as the
authority — every check already brings the readings to the host once for ``history`` and the
distributed agreement — so this kernel is tested against the rule but not yet on the step path.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .decide_twin import DecideState, check_args, torch_decide
from .tensor_sums import _check_device, to_device

__all__ = ["decide", "torch_decide", "DecideState"]

_BLOCK_C = 128


@triton.jit
def _decide_kernel(sums_ptr, start_ptr, count_ptr, numel_ptr, frozen_at_ptr, below_ptr, smoothed_ptr, ref_sum_ptr,
                   ref_count_ptr, ref_first_ptr, active_ptr, tensor_active_ptr, metric_ptr, fscal_ptr, iscal_ptr,
                   n_comp, max_count, ORD: tl.constexpr, MEAN: tl.constexpr, EMA: tl.constexpr,
                   RELATIVE: tl.constexpr, PER_TENSOR: tl.constexpr, BLOCK_C: tl.constexpr):
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < n_comp
    start = tl.load(start_ptr + c, mask=cm, other=0)
    count = tl.load(count_ptr + c, mask=cm, other=0)
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for j in range(0, max_count):
        acc += tl.load(sums_ptr + start + j, mask=cm & (j < count), other=0.0)
    n = tl.load(numel_ptr + c, mask=cm, other=0.0)
    v = acc.to(tl.float64)
    if MEAN:
        v = v / n
    if ORD == 2:
        v = tl.where(v >= 0, tl.sqrt(tl.maximum(v, 0.0)), v)
    nan = float("nan")
    metric = tl.where((count > 0) & (n > 0), v, nan)
    tau = tl.load(fscal_ptr)
    ema = tl.load(fscal_ptr + 1)
    step = tl.load(iscal_ptr)
    in_grace = step < tl.load(iscal_ptr + 1)  # the released code may freeze at step int(α·T) itself
    post = ~in_grace
    patience = tl.load(iscal_ptr + 2)

    fa = tl.load(frozen_at_ptr + c, mask=cm, other=0)
    below = tl.load(below_ptr + c, mask=cm, other=0)
    sm = tl.load(smoothed_ptr + c, mask=cm, other=0.0)
    rsum = tl.load(ref_sum_ptr + c, mask=cm, other=0.0)
    rcount = tl.load(ref_count_ptr + c, mask=cm, other=0)
    rfirst = tl.load(ref_first_ptr + c, mask=cm, other=0.0)
    live = fa < 0
    ok = live & (metric == metric) & (tl.abs(metric) < float("inf"))
    value = metric
    if EMA:
        value = tl.where(sm != sm, metric, ema * sm + tl.load(fscal_ptr + 2) * metric)
    if RELATIVE:
        thr = tl.where(rcount > 0, tau * (rsum / tl.maximum(rcount, 1).to(tl.float64)), tau * rfirst)
    else:
        thr = tau + tl.zeros([BLOCK_C], dtype=tl.float64)
    has_thr = thr == thr
    counted = ok & post & has_thr
    new_below = tl.where(value < thr, below + 1, 0)
    freeze = counted & (new_below >= patience)
    sm = tl.where(ok, value, sm)
    rsum = tl.where(ok & in_grace, rsum + value, rsum)
    rcount = tl.where(ok & in_grace, rcount + 1, rcount)
    rfirst = tl.where(ok & post & (thr != thr), value, rfirst)
    below = tl.where(live, tl.where(counted, new_below, 0), below)
    fa = tl.where(freeze, step, fa)
    act = (fa < 0).to(tl.int32)
    tl.store(smoothed_ptr + c, sm, mask=cm)
    tl.store(ref_sum_ptr + c, rsum, mask=cm)
    tl.store(ref_count_ptr + c, rcount, mask=cm)
    tl.store(ref_first_ptr + c, rfirst, mask=cm)
    tl.store(below_ptr + c, below, mask=cm)
    tl.store(frozen_at_ptr + c, fa, mask=cm)
    tl.store(active_ptr + c, act, mask=cm)
    tl.store(metric_ptr + c, metric, mask=cm)
    if PER_TENSOR:
        for j in range(0, max_count):
            tl.store(tensor_active_ptr + start + j, act, mask=cm & (j < count))


def decide(sums: torch.Tensor, comp_start: torch.Tensor, comp_count: torch.Tensor, numel: torch.Tensor,
           state: DecideState, *, step: int, tau: float, grace_steps: int = 0, patience: int = 1, ema: float = 0.0,
           tau_mode: str = "absolute", ord: int = 1, reduction: str = "mean",
           tensor_active: Optional[torch.Tensor] = None, max_count: Optional[int] = None) -> torch.Tensor:
    """Same contract as ``torch_decide``. ``max_count`` (the most tensors a component owns) should be
    given by the caller, who knows it from the component table; computing it here reads the device."""
    check_args(sums, comp_start, comp_count, numel, state, ord, reduction, tau_mode)
    n_comp = comp_start.numel()
    device = _check_device("state", list(state) + [comp_start, comp_count, numel])
    metric = torch.empty(n_comp, dtype=torch.float64, device=device)
    if n_comp == 0:
        return metric
    if max_count is None:
        max_count = int(comp_count.max())  # a host sync; callers on the hot path pass it
    fscal = to_device(torch.tensor([tau, ema, 1.0 - ema], dtype=torch.float64), device)
    iscal = to_device(torch.tensor([step, grace_steps, patience], dtype=torch.int64), device)
    per_tensor = tensor_active is not None
    sums_arg = sums if sums.numel() else torch.zeros(1, dtype=torch.float32, device=device)
    _decide_kernel[(triton.cdiv(n_comp, _BLOCK_C),)](
        sums_arg, comp_start, comp_count, numel, *state, tensor_active if per_tensor else state.active, metric,
        fscal, iscal, n_comp, max_count, ORD=ord, MEAN=reduction == "mean", EMA=ema > 0,
        RELATIVE=tau_mode == "relative", PER_TENSOR=per_tensor, BLOCK_C=_BLOCK_C)
    return metric
