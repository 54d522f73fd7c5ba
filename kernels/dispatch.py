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
           "torch_tensor_sums", "torch_tensor_delta_sums"]

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


def torch_tensor_sums(tensors: Sequence[torch.Tensor], ord: int) -> torch.Tensor:
    """Torch twin of ``tensor_sums.tensor_sums``: one ``_foreach_norm`` with fp32 output."""
    if ord not in (1, 2):
        raise ValueError(f"Invalid ord: {ord!r}; expected 1 or 2")
    if not tensors:
        return torch.zeros(0, dtype=torch.float32)
    sums = torch.stack(torch._foreach_norm(list(tensors), ord, dtype=torch.float32))
    return sums if ord == 1 else sums * sums


def torch_tensor_delta_sums(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor], ord: int = 1) -> torch.Tensor:
    """Torch twin of ``tensor_sums.tensor_delta_sums``: the difference is taken in fp32, like the kernel."""
    if len(a) != len(b):
        raise ValueError(f"a has {len(a)} tensors but b has {len(b)}; they pair up by position")
    for i, (x, y) in enumerate(zip(a, b)):
        if x.numel() != y.numel():
            raise ValueError(f"b[{i}] has {y.numel()} elements but a[{i}] has {x.numel()}")
    diffs = [x.float().reshape(-1) - y.float().reshape(-1) for x, y in zip(a, b)]
    return torch_tensor_sums(diffs, ord)


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
