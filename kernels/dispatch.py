"""The seam the core calls: per-tensor sums by the Triton kernels or by their torch twins.

``impl="auto"`` takes the Triton path only for CUDA tensors of supported dtypes when
``available(device)`` says yes, so a ``TRITON_INTERPRET=1`` left set in a process never routes
CPU work through the (slow) interpreter by accident; ``impl="triton"`` forces it (CPU tensors then
need the interpreter) and raises ``ValueError`` when it cannot run; ``impl="torch"`` never
imports triton. Both paths return one fp32 value per tensor on the tensors' device.
"""
from __future__ import annotations

from typing import Sequence

import torch

from . import available
from .checks import SUPPORTED_DTYPES as _TRITON_DTYPES

__all__ = ["IMPLS", "resolve_impl", "tensor_sums", "tensor_delta_sums", "fused_adamw_step", "prepared_adamw", "fused_sgd_step",
           "decide",
           "torch_tensor_sums", "torch_tensor_delta_sums", "stack_groups", "stacked",
           "STACK_MAX_NUMEL"]

IMPLS = ("auto", "torch", "triton")


def _local(t: torch.Tensor) -> torch.Tensor:
    # FSDP2 DTensor shards: sum locally; the cross-rank all-reduce belongs to the distributed layer.
    return t.to_local() if hasattr(t, "to_local") else t


def resolve_impl(impl: str, tensors: Sequence[torch.Tensor]) -> str:
    """``"triton"`` or ``"torch"`` for this call; raises ``ValueError`` for an impossible ``"triton"``."""
    if impl not in IMPLS:
        raise ValueError(f"Invalid impl: {impl!r}; expected one of {', '.join(map(repr, IMPLS))}")
    if impl == "torch" or not tensors:
        return "torch"
    device = tensors[0].device
    if impl == "triton":
        reason = available(device)
        if reason is not None:
            raise ValueError(f"Invalid impl: 'triton' cannot run on {device} tensors: {reason}")
        return "triton"
    if device.type != "cuda":  # decided before available(): CPU work never even imports triton
        return "torch"
    dense = all(t.layout == torch.strided and t.dtype in _TRITON_DTYPES for t in tensors)
    return "triton" if dense and available(device) is None else "torch"


# On CPU a foreach op costs ~2–6 µs per tensor (torch runs one kernel call per tensor), far more
# than the arithmetic of a small tensor (LoRA adapters, biases, MoE experts, the host-cost bench's
# 2x2 matrices), while ``torch.stack`` costs ~0.3 µs per tensor. So small CPU tensors of one shape
# and dtype are reduced as one stacked tensor; above this size the copy would cost more than the
# per-tensor overhead it saves, and the foreach path stays.
STACK_MAX_NUMEL = 4096


def stack_groups(*lists: Sequence[torch.Tensor]) -> tuple[list[list[int]], list[int]]:
    """Positions of the small CPU tensors, grouped so that each group stacks, and the other positions.

    With several lists (pairs ``a[i]``, ``b[i]``), position ``i`` joins a group only with positions
    whose tensors have the same shape and dtype in every list.
    """
    first = lists[0]
    if len(first) < 2 or not first[0].is_cpu:  # one device per call (the owner plan splits them)
        return [], list(range(len(first)))
    limit = STACK_MAX_NUMEL
    # only cheap attributes here (``.device.type`` alone costs ~0.9 µs a tensor)
    keys = [[(t.shape, t.dtype) if t.numel() <= limit and t.is_cpu and not t.is_sparse else None for t in ts]
            for ts in lists]
    groups: dict[tuple, list[int]] = {}
    rest = []
    for i, key in enumerate(keys[0] if len(keys) == 1 else zip(*keys)):
        if key is None or (len(keys) > 1 and None in key):
            rest.append(i)
        else:
            groups.setdefault(key, []).append(i)
    # a group of one gains nothing from a copy
    return [g for g in groups.values() if len(g) > 1], rest + [g[0] for g in groups.values() if len(g) == 1]


def stacked(tensors: Sequence[torch.Tensor], idx: Sequence[int]) -> torch.Tensor:
    """``[len(idx), numel]`` copy of the same-shaped ``tensors[i]``, ``i`` in ``idx``."""
    return torch.stack([tensors[i] for i in idx]).reshape(len(idx), tensors[idx[0]].numel())


def scatter_groups(n: int, groups: Sequence[Sequence[int]], rest: Sequence[int], of_group, of_rest,
                   device=None) -> torch.Tensor:
    """The ``[n]`` fp32 per-position results of :func:`stack_groups`' split: ``of_group(idx)`` for each
    stacked group, ``of_rest(idx)`` for the others (all positions, in order, when nothing stacked)."""
    if not groups:
        return of_rest(range(n))
    if len(groups) == 1 and not rest:  # one shape: already in order
        return of_group(groups[0])
    out = torch.empty(n, dtype=torch.float32, device=device)
    for idx in groups:
        out[torch.tensor(idx)] = of_group(idx)
    if rest:
        out[torch.tensor(rest)] = of_rest(rest).to(out.device)
    return out


def _foreach_sums(tensors: Sequence[torch.Tensor], ord: int) -> torch.Tensor:
    # an fp32 result is refused for fp64 inputs (narrowing): then everything is summed in fp64
    wide = any(t.dtype == torch.float64 for t in tensors)
    sums = torch.stack(torch._foreach_norm(list(tensors), ord, dtype=torch.float64 if wide else torch.float32))
    return (sums if ord == 1 else sums * sums).float()


def _rows_sums(x: torch.Tensor, ord: int) -> torch.Tensor:
    # fp32 accumulation whatever the dtype, as the kernel and _foreach_norm(dtype=float32) do
    return x.abs().sum(1, dtype=torch.float32) if ord == 1 else x.float().square().sum(1)


def torch_tensor_sums(tensors: Sequence[torch.Tensor], ord: int) -> torch.Tensor:
    """Torch twin of ``tensor_sums.tensor_sums``: ``_foreach_norm`` with fp32 output (stacked for small CPU tensors)."""
    if ord not in (1, 2):
        raise ValueError(f"Invalid ord: {ord!r}; expected 1 or 2")
    if not tensors:
        return torch.zeros(0, dtype=torch.float32)
    groups, rest = stack_groups(tensors)
    return scatter_groups(len(tensors), groups, rest, lambda idx: _rows_sums(stacked(tensors, idx), ord),
                          lambda idx: _foreach_sums([tensors[i] for i in idx], ord))


def torch_tensor_delta_sums(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor], ord: int = 1) -> torch.Tensor:
    """Torch twin of ``tensor_sums.tensor_delta_sums``: the difference is taken in fp32, like the kernel."""
    if len(a) != len(b):
        raise ValueError(f"a has {len(a)} tensors but b has {len(b)}; they pair up by position")
    for i, (x, y) in enumerate(zip(a, b)):
        if x.numel() != y.numel():
            raise ValueError(f"b[{i}] has {y.numel()} elements but a[{i}] has {x.numel()}")
    groups, rest = stack_groups(a, b)
    return scatter_groups(
        len(a), groups, rest, lambda idx: _rows_sums(stacked(a, idx).float() - stacked(b, idx).float(), ord),
        lambda idx: torch_tensor_sums([a[i].float().reshape(-1) - b[i].float().reshape(-1) for i in idx], ord))


def tensor_sums(tensors: Sequence[torch.Tensor], ord: int, *, impl: str = "auto") -> torch.Tensor:
    """Σ|x| (``ord=1``) or Σx² (``ord=2``) of every tensor: fp32, ``[len(tensors)]``, on their device."""
    tensors = [_local(t) for t in tensors]
    if resolve_impl(impl, tensors) == "torch":
        return torch_tensor_sums(tensors, ord)
    from . import tensor_sums as kernel  # lazy: imports triton

    return kernel.tensor_sums(tensors, ord)


def tensor_delta_sums(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor], ord: int = 1, *,
                      impl: str = "auto") -> torch.Tensor:
    """Σ|a_t − b_t| (``ord=1``) or Σ(a_t − b_t)² (``ord=2``) per pair, fp32, e.g. ‖g − g_prev‖₁."""
    a = [_local(t) for t in a]
    b = [_local(t) for t in b]
    if resolve_impl(impl, a + b) == "torch":
        return torch_tensor_delta_sums(a, b, ord)
    from . import tensor_sums as kernel  # lazy: imports triton

    return kernel.tensor_delta_sums(a, b, ord)


def fused_adamw_step(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], exp_avgs: Sequence[torch.Tensor],
                     exp_avg_sqs: Sequence[torch.Tensor], steps: Sequence[torch.Tensor], active, *, lr: float,
                     beta1: float, beta2: float, eps: float, weight_decay: float, decoupled: bool = True,
                     maximize: bool = False, ord: int = 1, metric: bool = True, impl: str = "auto",
                     checked: bool = False, device_steps: bool = False, states_in_param_dtype: bool = False):
    """Masked AdamW/Adam step of the active tensors, in place; Σ|grad| (or Σgrad², ``ord=2``) per tensor.

    See ``fused_adamw.py`` for the math, the state layout and the flags (``checked`` included:
    the twin always checks, it is the reference).
    """
    hyper = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, decoupled=decoupled,
                 maximize=maximize, ord=ord, metric=metric, device_steps=device_steps,
                 states_in_param_dtype=states_in_param_dtype)
    if resolve_impl(impl, list(params)) == "torch":
        from .fused_adamw_twin import torch_fused_adamw_step

        return torch_fused_adamw_step(params, grads, exp_avgs, exp_avg_sqs, steps, active, **hyper)
    from . import fused_adamw  # lazy: imports triton

    return fused_adamw.fused_adamw_step(params, grads, exp_avgs, exp_avg_sqs, steps, active, checked=checked,
                                        **hyper)


def prepared_adamw(params, grads, exp_avgs, exp_avg_sqs, counters, **kw):
    """``fused_adamw.PreparedAdamW``: the Triton step of one fixed tensor set at O(1) host cost per call.

    Triton only: it exists for the wrapper's fused path, which has resolved the impl already (the
    torch twin's per-tensor cost is the torch ops themselves, which no preparation removes).
    """
    resolve_impl("triton", list(params))
    from . import fused_adamw  # lazy: imports triton

    return fused_adamw.PreparedAdamW(params, grads, exp_avgs, exp_avg_sqs, counters, **kw)


def fused_sgd_step(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], momentum_buffers: list, active, *,
                   lr: float, momentum: float = 0.0, dampening: float = 0.0, weight_decay: float = 0.0,
                   nesterov: bool = False, maximize: bool = False, ord: int = 1, metric: bool = True,
                   impl: str = "auto"):
    """Masked SGD (momentum) step of the active tensors, in place; the gradient metric per tensor.

    See ``fused_sgd.py``; ``momentum_buffers`` (``None`` = not created yet) is filled in place.
    """
    hyper = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                 maximize=maximize, ord=ord, metric=metric)
    if resolve_impl(impl, list(params)) == "torch":
        from .fused_sgd_twin import torch_fused_sgd_step

        return torch_fused_sgd_step(params, grads, momentum_buffers, active, **hyper)
    from . import fused_sgd  # lazy: imports triton

    return fused_sgd.fused_sgd_step(params, grads, momentum_buffers, active, **hyper)


def decide(sums: torch.Tensor, comp_start: torch.Tensor, comp_count: torch.Tensor, numel: torch.Tensor, state, *,
           impl: str = "auto", **rule):
    """The freeze rule on the device (``decide.py``); ``rule``: step, tau, grace_steps, patience, ema, tau_mode,
    ord, reduction, tensor_active (and ``max_count`` for the kernel)."""
    if resolve_impl(impl, [sums] if sums.numel() else list(state)) == "torch":
        from .decide_twin import torch_decide

        rule.pop("max_count", None)
        return torch_decide(sums, comp_start, comp_count, numel, state, **rule)
    from . import decide as kernel  # lazy: imports triton

    return kernel.decide(sums, comp_start, comp_count, numel, state, **rule)
