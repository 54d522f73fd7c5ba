"""Masked SGD (momentum, dampening, nesterov, weight decay, maximize) over many tensors, with the gradient metric.

What is computed. For every tensor ``t`` whose active flag is set, torch's ``_single_tensor_sgd``
update in fp32:

    d = ±grad                                  (minus when maximize)
    d += wd·p                                  (when weight_decay != 0)
    buf = d                 on the first step  (torch clones the effective gradient)
    buf = μ·buf + (1 − dampening)·d            afterwards            (when momentum μ != 0)
    d = d + μ·buf (nesterov)  |  d = buf
    p -= lr·d

and, from the values already in registers, ``Σ|grad_t|`` (``ord=1``), ``Σ grad_t²`` (``ord=2``)
or the stored weight change ``Σ|p_new − p_old|`` (``ord=3``) as one fp32 partial per chunk, reduced per tensor in a fixed order (no atomics).
Inactive (frozen) tensors: their programs write a zero partial and return; nothing else is read or
written.

State is torch's: ``momentum_buffer``, shaped and typed like the param. ``momentum_buffers`` is a
list with ``None`` where torch has no buffer yet; the launcher allocates those (for active tensors)
and the kernel initialises them from ``d``, as torch's first step does, so the caller stores them
as ``state["momentum_buffer"]``. With ``momentum=0`` there is no buffer, as in torch.

Params, grads and buffers: fp32, bf16 or fp16, one dtype per param/grad/buffer triple, contiguous;
bf16 stores round to nearest even (``fused_adamw._to_param_dtype``). Bytes moved per active element
with momentum: read p, g, buf and write p, buf: 20 B for fp32 (12 B without momentum).

Flags: a host sequence (baked into the cached launch table) or a device integer tensor (read as
is). With device flags the launcher cannot know which tensors are frozen, so it allocates missing
buffers for all of them; a buffer of a tensor the device kept frozen stays uninitialised and is
the caller's to drop.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import triton
import triton.language as tl

from . import step_plan
from .fused_adamw import _metric_term, _to_param_dtype
from .fused_adamw_twin import host_flags
from .fused_sgd_twin import _validate, torch_fused_sgd_step
from .tensor_sums import (DEFAULT_CHUNK_SIZE, _check_chunk, _check_device, _chunk_ptr, launch_config,
                          _TL_DTYPES)

__all__ = ["fused_sgd_step", "torch_fused_sgd_step"]


@triton.jit
def _sgd_math(p, g, buf, init, lr, momentum, one_minus_dampening, weight_decay, P_DTYPE: tl.constexpr,
              MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr):
    if MAXIMIZE:
        g = -g
    g = g + weight_decay * p  # weight_decay 0 adds exact zeros: p·0 = 0, g + 0 = g
    if MOMENTUM:
        buf = tl.where(init != 0, g, buf * momentum + one_minus_dampening * g)
        buf = _to_param_dtype(buf, P_DTYPE)  # torch goes on with the buffer as stored
        b32 = buf.to(tl.float32)
        if NESTEROV:
            g = g + momentum * b32
        else:
            g = b32
    p = p - lr * g
    return p, buf


@triton.jit
def _fused_sgd_kernel(p_addr_ptr, g_addr_ptr, b_addr_ptr, numel_ptr, block_tensor_ptr, block_chunk_ptr, active_ptr,
                      init_ptr, partials_ptr, block_base, lr, momentum, one_minus_dampening, weight_decay,
                      P_DTYPE: tl.constexpr, MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr,
                      ORD: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    blk = block_base + tl.program_id(0).to(tl.int64)
    t = tl.load(block_tensor_ptr + blk)
    if tl.load(active_ptr + t) == 0:
        tl.store(partials_ptr + blk, 0.0)  # frozen: one scalar read, one write, nothing else
        return
    start = tl.load(block_chunk_ptr + blk) * CHUNK
    n = tl.minimum(tl.load(numel_ptr + t) - start, CHUNK)
    init = tl.load(init_ptr + t)
    p_ptr = _chunk_ptr(p_addr_ptr, t, start, P_DTYPE, ALIGNED)
    g_ptr = _chunk_ptr(g_addr_ptr, t, start, P_DTYPE, ALIGNED)
    b_ptr = _chunk_ptr(b_addr_ptr, t, start, P_DTYPE, ALIGNED)
    offs = tl.max_contiguous(tl.multiple_of(tl.arange(0, BLOCK), BLOCK), BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    n_full = n // BLOCK
    for i in range(0, n_full):
        o = i * BLOCK + offs
        g = tl.load(g_ptr + o).to(tl.float32)
        if MOMENTUM:
            buf = tl.load(b_ptr + o).to(tl.float32)  # garbage on the first step; tl.where drops it
        else:
            buf = g
        p_old = tl.load(p_ptr + o).to(tl.float32)
        p, buf = _sgd_math(p_old, g, buf, init, lr, momentum, one_minus_dampening,
                           weight_decay, P_DTYPE, MOMENTUM, NESTEROV, MAXIMIZE)
        p_new = _to_param_dtype(p, P_DTYPE)
        acc += _metric_term(g, p_old, p_new, ORD)
        tl.store(p_ptr + o, p_new)
        if MOMENTUM:
            tl.store(b_ptr + o, buf)
    tail = n_full * BLOCK
    if tail < n:
        o = tail + offs
        mask = o < n
        g = tl.load(g_ptr + o, mask=mask, other=0.0).to(tl.float32)
        if MOMENTUM:
            buf = tl.load(b_ptr + o, mask=mask, other=0.0).to(tl.float32)
        else:
            buf = g
        p_old = tl.load(p_ptr + o, mask=mask, other=0.0).to(tl.float32)
        p, buf = _sgd_math(p_old, g, buf, init, lr, momentum,
                           one_minus_dampening, weight_decay, P_DTYPE, MOMENTUM, NESTEROV, MAXIMIZE)
        p_new = _to_param_dtype(p, P_DTYPE)
        acc += tl.where(mask, _metric_term(g, p_old, p_new, ORD), 0.0)
        tl.store(p_ptr + o, p_new, mask=mask)
        if MOMENTUM:
            tl.store(b_ptr + o, buf, mask=mask)
    tl.store(partials_ptr + blk, tl.sum(acc, axis=0))


def fused_sgd_step(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], momentum_buffers: list,
                   active: Union[Sequence[bool], torch.Tensor], *, lr: float, momentum: float = 0.0,
                   dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False, maximize: bool = False,
                   ord: int = 1, metric: bool = True, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Optional[torch.Tensor]:
    """One SGD step of the active tensors, in place; returns Σ|grad| (``ord=1``) or Σgrad² per tensor.

    The result is fp32, ``[len(params)]``, on the params' device, 0 for inactive tensors (``None``
    with ``metric=False``). ``momentum_buffers`` (a list, ``None`` = not created yet) is filled in
    place with the buffers this step created.
    """
    params, grads = _validate(params, grads, momentum_buffers, active, ord, momentum, dampening, nesterov)
    chunk = _check_chunk(chunk_size)
    n = len(params)
    if n == 0:
        return torch.zeros(0, dtype=torch.float32) if metric else None
    device_flags = torch.is_tensor(active)
    flags = [True] * n if device_flags else host_flags(active)
    init = [0] * n
    if momentum != 0:
        for i, p in enumerate(params):
            if momentum_buffers[i] is None and flags[i]:
                momentum_buffers[i] = torch.empty_like(p, memory_format=torch.contiguous_format)
                init[i] = 1
    bufs = list(momentum_buffers) if momentum != 0 else params  # no buffer: a table column never read
    device = _check_device("params", params + grads + [b for b in bufs if b is not None])
    step_plan.check_contiguous(("params", "grads", "momentum_buffers"),
                               (params, grads, [b for b in bufs if b is not None]))
    # A frozen tensor without a buffer still needs an address in the table; its program never reads it.
    bufs = [p if b is None else b for p, b in zip(params, bufs)]
    plan = step_plan.get_plan([params, grads, bufs], None if device_flags else flags, init, chunk, device)
    table_flags = active if device_flags else plan.active
    block, warps = launch_config("fused_sgd", chunk)
    return step_plan.launch(plan, table_flags, metric, n, device, lambda g, partials: _fused_sgd_kernel[(g.n_blocks,)](
        *plan.addrs, plan.numel, plan.block_tensor, plan.block_chunk, table_flags, plan.init, partials, g.block_base,
        lr, momentum, 1 - dampening, weight_decay, P_DTYPE=_TL_DTYPES[g.dtype], MOMENTUM=momentum != 0,
        NESTEROV=nesterov, MAXIMIZE=maximize, ORD=ord, CHUNK=chunk, BLOCK=block, ALIGNED=g.aligned,
        num_warps=warps))
