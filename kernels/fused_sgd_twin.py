"""Torch twin of ``fused_sgd.fused_sgd_step``, and the argument checks both share; no triton import.

Same signature, same state layout (``momentum_buffer``: one tensor per param shaped and typed like
it, created on the first step as torch does, from the first effective gradient), the formulas of
torch's ``_single_tensor_sgd`` in fp32 and round-to-nearest-even stores.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from .checks import check_tensor_list
from .fused_adamw_twin import check_flags, check_ord, host_flags, metric_sum, stack_metric

__all__ = ["torch_fused_sgd_step"]


def _validate(params, grads, momentum_buffers, active, ord, momentum, dampening, nesterov):
    lists = [check_tensor_list(name, x) for name, x in (("params", params), ("grads", grads))]
    n = len(lists[0])
    if len(lists[1]) != n:
        raise ValueError(f"grads has {len(lists[1])} tensors but params has {n}")
    if len(momentum_buffers) != n:
        raise ValueError(f"momentum_buffers has {len(momentum_buffers)} entries but params has {n}")
    check_flags(active, n)
    check_ord(ord)
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError(f"Invalid nesterov: it needs momentum > 0 and dampening = 0 (got momentum={momentum}, "
                         f"dampening={dampening}), as in torch.optim.SGD")
    for i, (p, g) in enumerate(zip(*lists)):
        if g.dtype != p.dtype or g.shape != p.shape:
            raise ValueError(f"grads[{i}] is {g.dtype} {tuple(g.shape)}; params[{i}] is {p.dtype} {tuple(p.shape)}")
        buf = momentum_buffers[i]
        if buf is not None and (not torch.is_tensor(buf) or buf.dtype != p.dtype or buf.shape != p.shape):
            raise ValueError(f"momentum_buffers[{i}] must be None or a {p.dtype} {tuple(p.shape)} tensor")
    return lists


def torch_fused_sgd_step(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                         momentum_buffers: list, active: Union[Sequence[bool], torch.Tensor], *, lr: float,
                         momentum: float = 0.0, dampening: float = 0.0, weight_decay: float = 0.0,
                         nesterov: bool = False, maximize: bool = False, ord: int = 1, metric: bool = True,
                         chunk_size: Optional[int] = None) -> Optional[torch.Tensor]:
    """Torch twin of ``fused_sgd_step`` (``chunk_size`` is ignored); ``momentum_buffers`` is filled in place."""
    params, grads = _validate(params, grads, momentum_buffers, active, ord, momentum, dampening, nesterov)
    flags = host_flags(active)
    out = []
    for i, (p, g) in enumerate(zip(params, grads)):
        if not flags[i]:
            out.append(torch.zeros((), device=p.device))
            continue
        before = p.float().clone() if ord == 3 else None  # the stored weights, for Σ|ΔW|
        p32, d = p.float(), g.float()
        d = -d if maximize else d
        if weight_decay != 0:
            d = d + weight_decay * p32
        if momentum != 0:
            buf = momentum_buffers[i]
            if buf is None:
                b32 = d.clone()
                momentum_buffers[i] = buf = torch.empty_like(p)
            else:
                b32 = buf.float() * momentum + (1 - dampening) * d
            buf.copy_(b32)
            b32 = buf.float()  # what torch goes on with: the buffer as stored (rounded for bf16/fp16)
            d = d + momentum * b32 if nesterov else b32
        p32.add_(d, alpha=-lr)
        p.copy_(p32)
        out.append(metric_sum(g, ord, before, p))
    return stack_metric(out, metric)
