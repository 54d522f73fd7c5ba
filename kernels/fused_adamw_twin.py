"""Torch twin of ``fused_adamw.fused_adamw_step``, and the argument checks both share; no triton import.

Same signature, same state layout (``exp_avg``/``exp_avg_sq`` fp32, ``step`` CPU scalar tensors),
same formulas in fp32 and round-to-nearest-even stores: the reference the kernel is tested against
and the path ``dispatch`` takes without Triton.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch

from .checks import check_tensor_list

__all__ = ["torch_fused_adamw_step"]



def check_flags(active, n: int) -> None:
    """``active``: ``n`` host truth values, or a 1-D integer/bool tensor of ``n`` device flags."""
    if torch.is_tensor(active):
        if active.dim() != 1 or active.dtype.is_floating_point or active.is_complex():
            raise ValueError(f"active must be a 1-D integer or bool tensor of flags; got {active.dtype} "
                             f"{tuple(active.shape)}")
    if len(active) != n:
        raise ValueError(f"active has {len(active)} flags but params has {n}")


def check_ord(ord, moments: bool = False) -> None:
    """1: Σ|grad|, 2: Σgrad², 3: Σ|p_new − p_old|; with Adam ``moments`` also 4: Σ|m̂/(√v̂+ε)|."""
    allowed = (1, 2, 3, 4) if moments else (1, 2, 3)
    if ord not in allowed:
        raise ValueError(f"Invalid ord: {ord!r}; expected 1 (Σ|grad|), 2 (Σgrad²), 3 (Σ|p_new − p_old|)"
                         + (" or 4 (Σ|m̂/(√v̂+ε)|, update_snr)" if moments else ""))


def host_flags(active) -> list[bool]:
    """The twins read device flags on the host (the reference may sync; the kernels never do)."""
    return [bool(a) for a in (active.tolist() if torch.is_tensor(active) else active)]


def _validate(params, grads, exp_avgs, exp_avg_sqs, steps, active, ord=1, device_steps=False,
              states_in_param_dtype=False):
    lists = [check_tensor_list(name, x) for name, x in (("params", params), ("grads", grads), ("exp_avgs", exp_avgs),
                                                  ("exp_avg_sqs", exp_avg_sqs), ("steps", steps))]
    n = len(lists[0])
    for name, x in zip(("grads", "exp_avgs", "exp_avg_sqs", "steps"), lists[1:]):
        if len(x) != n:
            raise ValueError(f"{name} has {len(x)} tensors but params has {n}")
    check_flags(active, n)
    check_ord(ord, moments=True)
    for i in range(n):
        p = lists[0][i]
        if lists[1][i].dtype != p.dtype or lists[1][i].shape != p.shape:
            raise ValueError(f"grads[{i}] is {lists[1][i].dtype} {tuple(lists[1][i].shape)}; "
                             f"params[{i}] is {p.dtype} {tuple(p.shape)}")
        want = p.dtype if states_in_param_dtype else torch.float32
        for name, s in (("exp_avgs", lists[2][i]), ("exp_avg_sqs", lists[3][i])):
            if s.dtype != want or s.shape != p.shape:
                raise ValueError(f"{name}[{i}] is {s.dtype} {tuple(s.shape)}; expected {want} {tuple(p.shape)} "
                                 f"(states_in_param_dtype={states_in_param_dtype})")
        st = lists[4][i]
        if device_steps:
            if st.device != p.device or st.numel() != 1 or not st.dtype.is_floating_point:
                raise ValueError(f"steps[{i}] must be a 1-element float tensor on params[{i}]'s device {p.device} "
                                 f"(device_steps=True: torch's fused/capturable layout); got {st.dtype} "
                                 f"{tuple(st.shape)} on {st.device}")
        elif st.device.type != "cpu" or st.numel() != 1:
            raise ValueError(f"steps[{i}] must be a 1-element CPU tensor (torch's non-capturable layout; "
                             f"device_steps=True takes them on the device); got {tuple(st.shape)} on {st.device}")
    return lists


def _coefficients(steps, active, lr, beta1, beta2):
    """Advance the active steps; torch's per-tensor step_size, sqrt(bias_correction2) and 1/bias_correction1.

    In bulk: one in-place ``_foreach_add_`` (torch's ``step_t += 1``), one read of each CPU counter
    (no device sync), and the bias corrections once per distinct step value (usually one per group).
    """
    live = [s for s, a in zip(steps, active) if a]
    if live:
        torch._foreach_add_(live, 1)
    return host_coefficients([s.item() for s in steps], lr, beta1, beta2)


def host_coefficients(ks, lr, beta1, beta2):
    """Per step value ``k``: (step_size, sqrt(bias_correction2), 1/bias_correction1) lists, once per distinct k."""
    memo = {}
    for k in ks:
        if k not in memo:
            memo[k] = _host_coefficient(k, lr, beta1, beta2)
    return [memo[k][0] for k in ks], [memo[k][1] for k in ks], [memo[k][2] for k in ks]


def _host_coefficient(k, lr, beta1, beta2):
    # Python doubles, exactly as torch's _single_tensor_adam computes them (k=0 only when frozen).
    bc1 = 1 - beta1 ** k
    return (lr / bc1, math.sqrt(1 - beta2 ** k), 1 / bc1) if k > 0 else (0.0, 1.0, 0.0)


def device_coefficients(steps, active, lr, beta1, beta2, inv: bool = False):
    """``_coefficients`` with the step counters on the device (torch's fused/capturable layout): no host read.

    The counters advance in place (``step += 1`` in their own dtype, as torch does); the bias
    corrections are formed on the device in float64 from the counters' values, the same doubles
    ``_coefficients`` forms on the host: float64 tensors ``step_size``, ``bc2_sqrt`` and (``inv``,
    for ``ord=4``) ``1/bc1``, else ``None``. This runs every step, so it is a handful of device ops:
    a counter still at 0 belongs to an inactive tensor, whose coefficients nothing reads (they come
    out inf/0 there), except ``1/bc1``, which scales a reading and is set to 0 for them.
    """
    live = [s for s, a in zip(steps, active) if a]
    if live:
        torch._foreach_add_(live, 1)
    return coefficients_of(torch.stack([s.reshape(()) for s in steps]).double(), lr, beta1, beta2, inv)


def coefficients_of(k: torch.Tensor, lr, beta1, beta2, inv: bool = False):
    """``device_coefficients`` of float64 step values ``k`` (where they are): a few ops, no host read."""
    bc1 = 1 - torch.pow(beta1, k)
    inv_bc1 = torch.where(k > 0, bc1.reciprocal(), 0.0) if inv else None
    return lr / bc1, torch.sqrt(1 - torch.pow(beta2, k)), inv_bc1


def torch_fused_adamw_step(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                           exp_avgs: Sequence[torch.Tensor], exp_avg_sqs: Sequence[torch.Tensor],
                           steps: Sequence[torch.Tensor], active: Union[Sequence[bool], torch.Tensor], *, lr: float,
                           beta1: float, beta2: float, eps: float, weight_decay: float, decoupled: bool = True,
                           maximize: bool = False, ord: int = 1, metric: bool = True,
                           chunk_size: Optional[int] = None, device_steps: bool = False,
                           states_in_param_dtype: bool = False) -> Optional[torch.Tensor]:
    """Torch twin of ``fused_adamw_step`` (same signature; ``chunk_size`` is ignored): fp32 math, RNE stores."""
    lists = _validate(params, grads, exp_avgs, exp_avg_sqs, steps, active, ord, device_steps, states_in_param_dtype)
    flags = host_flags(active)
    # Device flags: the host advances every step counter, like the kernel's launcher (see its doc).
    advance = [True] * len(flags) if torch.is_tensor(active) else flags
    if device_steps:  # the twin may read the device (it is the reference); the same doubles either way
        step_size, bc2_sqrt, inv_bc1 = (t.tolist() for t in device_coefficients(lists[4], advance, lr, beta1, beta2,
                                                                                 inv=True))
    else:
        step_size, bc2_sqrt, inv_bc1 = _coefficients(lists[4], advance, lr, beta1, beta2)
    out = []
    for i, (p, g, m, v) in enumerate(zip(*lists[:4])):
        if not flags[i]:
            out.append(torch.zeros((), device=p.device))
            continue
        before = p.float().clone() if ord == 3 else None  # .float() of an fp32 tensor is the tensor itself
        p32, g32 = p.float(), g.float()
        g32 = -g32 if maximize else g32
        if decoupled:
            p32.mul_(1 - lr * weight_decay)
        else:
            g32 = g32 + weight_decay * p32
        m32, v32 = m.float(), v.float()  # fp32 states: the tensors themselves, updated in place
        m32.lerp_(g32, 1 - beta1)
        v32.mul_(beta2).addcmul_(g32, g32, value=1 - beta2)
        denom = v32.sqrt() / bc2_sqrt[i] + eps
        p32.addcdiv_(m32, denom, value=-step_size[i])  # the fp32 moments, not the stored
        for stored, x in ((p, p32), (m, m32), (v, v32)):
            if stored is not x:
                stored.copy_(x)  # .copy_ from fp32 rounds to nearest even, like the kernel's store
        # ord 4 (update_snr): Σ|m̂/(√v̂+ε)| = (1/bc1)·Σ|m/denom|, from the same fp32 values
        out.append((m32.abs() / denom).sum() * inv_bc1[i] if ord == 4 else metric_sum(g, ord, before, p))
    return stack_metric(out, metric)


def metric_sum(g: torch.Tensor, ord: int, before: Optional[torch.Tensor], after: torch.Tensor) -> torch.Tensor:
    """The kernel's per-tensor metric: of the raw gradient, or (``ord=3``) of the stored weight change."""
    if ord == 3:
        return (after.float() - before).abs().sum()
    g32 = g.float()
    return g32.abs().sum() if ord == 1 else (g32 * g32).sum()


def stack_metric(out: list, metric: bool) -> Optional[torch.Tensor]:
    if not metric:
        return None
    return torch.stack(out).float() if out else torch.zeros(0, dtype=torch.float32)
