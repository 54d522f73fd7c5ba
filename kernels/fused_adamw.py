"""Masked AdamW/Adam step over many tensors in one launch per param dtype, with the gradient L1 metric.

What is computed. For every tensor ``t`` whose active flag is set, torch's AdamW (``decoupled=True``)
or Adam with L2 weight decay (``decoupled=False``) update, in fp32, with torch's formulas:

    g = ±grad                                  (minus when maximize)
    p *= 1 − lr·wd        (AdamW)   |   g += wd·p        (Adam)
    m += (1 − β1)(g − m)                       (torch's lerp form)
    v  = β2·v + (1 − β2)·g²
    p −= (lr / (1 − β1^s)) · m / (sqrt(v) / sqrt(1 − β2^s) + eps)

and, from the values already in registers, ``Σ|grad_t|`` (``ord=1``, the GradES ``grad_l1``
metric), ``Σ grad_t²`` (``ord=2``, for ``grad_l2``) or ``Σ|p_new − p_old|`` of the stored param
(``ord=3``, for ``weight_delta_l1``: no copy of the weights is kept) or ``Σ|m̂/(√v̂+ε)|`` of the new
moments (``ord=4``, for ``update_snr``: the update's own denominator, scaled by 1/bc1 per tensor) as one
fp32 partial per chunk, reduced per tensor in a fixed order by ``tensor_sums``'s finish kernel.
Inactive (frozen) tensors: each of their programs writes a zero partial and returns; params,
grads and moments are not touched. State is torch's: ``exp_avg``, ``exp_avg_sq`` (fp32 tensors)
and ``step`` (a float32 scalar tensor per param, incremented here only for active tensors: on the
CPU as torch keeps it by default, or with ``device_steps=True`` on the params' device as torch's
``fused=True`` / ``capturable=True`` keep it), so state dicts move freely between this step, the
torch twin and ``torch.optim.AdamW`` of the same layout.

Params and grads: fp32, bf16 or fp16 (same dtype per pair); states fp32, or in the param dtype
(``states_in_param_dtype``). bf16 params are stored
with an explicit round-to-nearest-even: the interpreter truncates ``.to(tl.bfloat16)``, the GPU
rounds, and this way both agree with torch bit for bit. ``sqrt_rn`` / ``div_rn`` give IEEE results
(Triton's default ``sqrt``/``/`` are approximate on the GPU).

Bytes moved per active element: read p, g, m, v and write p, m, v: 28 B for fp32 params, 22 B for
bf16/fp16 params; per frozen element 0 (16 B of table read and 4 B written per frozen chunk).

Flags and tables: ``active`` is a host sequence (baked into the cached launch table, see
``step_plan``) or a device int tensor (read by the kernel as is, e.g. written by ``decide``).
CPU step counters give bias corrections computed on the host and uploaded per call through pinned
memory (no host sync); device counters (``device_steps=True``) give them from a few device ops in
float64 (the same values, no host read). With device flags the host cannot know which tensors the
device froze, so it advances every tensor's ``step`` and the caller sets a frozen tensor's counter
back when it reads the flags. No amsgrad or differentiable: callers fall back to the torch path.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import triton
import triton.language as tl

from . import step_plan
from .fused_adamw_twin import (_coefficients, _host_coefficient, _validate, check_ord, coefficients_of,
                                device_coefficients, host_coefficients, torch_fused_adamw_step)
from .tensor_sums import (DEFAULT_CHUNK_SIZE, _check_chunk, _check_device, _chunk_ptr, launch_config,
                          _TL_DTYPES, to_device)

__all__ = ["fused_adamw_step", "torch_fused_adamw_step", "PreparedAdamW"]


@triton.jit
def _adamw_math(p, g, m, v, decay, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, step_size,
                bc2_sqrt, DECOUPLED: tl.constexpr, MAXIMIZE: tl.constexpr):
    if MAXIMIZE:
        g = -g
    if DECOUPLED:
        p = p * decay
    else:
        g = g + weight_decay * p
    m = m + one_minus_beta1 * (g - m)
    v = v * beta2 + one_minus_beta2 * g * g
    denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
    p = p - step_size * tl.div_rn(m, denom)
    return p, m, v


@triton.jit
def _metric_term(g, p_old, p_new, ORD: tl.constexpr):
    # ORD 1/2: the raw gradient, before maximize or weight decay (what the reference path
    # measures). ORD 3: the weight change |W_t − W_{t−1}| of the value as stored (weight_delta_l1).
    if ORD == 1:
        r = tl.abs(g)
    elif ORD == 2:
        r = g * g
    else:
        r = tl.abs(p_new.to(tl.float32) - p_old)
    return r


@triton.jit
def _adam_metric_term(g, p_old, p_new, m, v, bc2_sqrt, eps, ORD: tl.constexpr):
    # ORD 4 (update_snr): |m / (√v/√bc2 + ε)| of the new moments; the launcher scales each tensor's
    # sum by 1/bc1, giving Σ|m̂/(√v̂+ε)|. The denominator is the update's (the compiler shares it).
    if ORD == 4:
        r = tl.abs(tl.div_rn(m, tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps))
    else:
        r = _metric_term(g, p_old, p_new, ORD)
    return r


@triton.jit
def _to_param_dtype(x, P_DTYPE: tl.constexpr):
    if P_DTYPE == tl.bfloat16:
        # Round to nearest even by hand: the interpreter truncates .to(tl.bfloat16) (perf.md §5.1).
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        bits = tl.where(x != x, 0x7FC0, bits)  # keep NaN a NaN (the carry could wrap it to ±0)
        y = bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        y = x.to(P_DTYPE)
    return y


@triton.jit
def _fused_adamw_kernel(p_addr_ptr, g_addr_ptr, m_addr_ptr, v_addr_ptr, numel_ptr, block_tensor_ptr, block_chunk_ptr,
                        active_ptr, step_size_ptr, bc2_sqrt_ptr, partials_ptr, block_base, decay, one_minus_beta1,
                        beta2, one_minus_beta2, eps, weight_decay, P_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr,
                        DECOUPLED: tl.constexpr, MAXIMIZE: tl.constexpr, ORD: tl.constexpr, CHUNK: tl.constexpr,
                        BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    blk = block_base + tl.program_id(0).to(tl.int64)
    t = tl.load(block_tensor_ptr + blk)
    if tl.load(active_ptr + t) == 0:
        tl.store(partials_ptr + blk, 0.0)  # frozen: one scalar read, one write, nothing else
        return
    start = tl.load(block_chunk_ptr + blk) * CHUNK
    n = tl.minimum(tl.load(numel_ptr + t) - start, CHUNK)
    p_ptr = _chunk_ptr(p_addr_ptr, t, start, P_DTYPE, ALIGNED)
    g_ptr = _chunk_ptr(g_addr_ptr, t, start, P_DTYPE, ALIGNED)
    # moments: fp32, or the param dtype (torch's layout for bf16/fp16 params), math in fp32 either way
    m_ptr = _chunk_ptr(m_addr_ptr, t, start, S_DTYPE, ALIGNED)
    v_ptr = _chunk_ptr(v_addr_ptr, t, start, S_DTYPE, ALIGNED)
    step_size = tl.load(step_size_ptr + t)
    bc2_sqrt = tl.load(bc2_sqrt_ptr + t)
    offs = tl.max_contiguous(tl.multiple_of(tl.arange(0, BLOCK), BLOCK), BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    n_full = n // BLOCK
    for i in range(0, n_full):
        o = i * BLOCK + offs
        g = tl.load(g_ptr + o).to(tl.float32)
        p_old = tl.load(p_ptr + o).to(tl.float32)
        p, m, v = _adamw_math(p_old, g, tl.load(m_ptr + o).to(tl.float32), tl.load(v_ptr + o).to(tl.float32), decay,
                              one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, step_size, bc2_sqrt,
                              DECOUPLED, MAXIMIZE)
        p_new = _to_param_dtype(p, P_DTYPE)
        acc += _adam_metric_term(g, p_old, p_new, m, v, bc2_sqrt, eps, ORD)
        tl.store(p_ptr + o, p_new)
        tl.store(m_ptr + o, _to_param_dtype(m, S_DTYPE))
        tl.store(v_ptr + o, _to_param_dtype(v, S_DTYPE))
    tail = n_full * BLOCK
    if tail < n:
        o = tail + offs
        mask = o < n
        g = tl.load(g_ptr + o, mask=mask, other=0.0).to(tl.float32)
        p_old = tl.load(p_ptr + o, mask=mask, other=0.0).to(tl.float32)
        p, m, v = _adamw_math(p_old, g,
                              tl.load(m_ptr + o, mask=mask, other=0.0).to(tl.float32),
                              tl.load(v_ptr + o, mask=mask, other=0.0).to(tl.float32),
                              decay, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, step_size, bc2_sqrt,
                              DECOUPLED, MAXIMIZE)
        p_new = _to_param_dtype(p, P_DTYPE)
        acc += tl.where(mask, _adam_metric_term(g, p_old, p_new, m, v, bc2_sqrt, eps, ORD), 0.0)
        tl.store(p_ptr + o, p_new, mask=mask)
        tl.store(m_ptr + o, _to_param_dtype(m, S_DTYPE), mask=mask)
        tl.store(v_ptr + o, _to_param_dtype(v, S_DTYPE), mask=mask)
    tl.store(partials_ptr + blk, tl.sum(acc, axis=0))


def fused_adamw_step(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], exp_avgs: Sequence[torch.Tensor],
                     exp_avg_sqs: Sequence[torch.Tensor], steps: Sequence[torch.Tensor],
                     active: Union[Sequence[bool], torch.Tensor], *, lr: float, beta1: float, beta2: float, eps: float,
                     weight_decay: float, decoupled: bool = True, maximize: bool = False, ord: int = 1,
                     metric: bool = True, chunk_size: int = DEFAULT_CHUNK_SIZE,
                     checked: bool = False, device_steps: bool = False,
                     states_in_param_dtype: bool = False) -> Optional[torch.Tensor]:
    """One AdamW (or Adam, ``decoupled=False``) step of the active tensors, in place; returns Σ|grad| per tensor.

    The result is fp32, ``[len(params)]``, on the params' device, 0 for inactive tensors (Σgrad²
    with ``ord=2``; ``None`` with ``metric=False``, which skips the per-tensor reduction launch).
    Params, grads and states must be contiguous (they are updated in place through raw addresses).
    ``checked=True``: the caller already ran this call's checks on these very tensors (the
    wrapper does, once per parameter set; gradients keep their parameter's dtype, device and
    shape) and they are skipped; the per-parameter checks cost more host time than the launch.
    ``device_steps=True``: the ``step`` counters are 1-element tensors on the params' device (torch's
    ``fused=True`` / ``capturable=True`` layout); they advance and the bias corrections are formed
    on the device, with no host read (the same values as from CPU counters).
    ``states_in_param_dtype=True``: ``exp_avg``/``exp_avg_sq`` are in each param's dtype, as torch
    keeps them for bf16/fp16 params; loaded to fp32, updated in fp32, stored rounded to nearest even.
    """
    if checked:
        lists = [list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), list(steps)]
    else:
        lists = _validate(params, grads, exp_avgs, exp_avg_sqs, steps, active, ord, device_steps,
                          states_in_param_dtype)
    chunk = _check_chunk(chunk_size)
    n = len(lists[0])
    if n == 0:
        return torch.zeros(0, dtype=torch.float32) if metric else None
    if checked:
        device = lists[0][0].device
    else:
        device = _check_device("params", lists[0] + lists[1] + lists[2] + lists[3])
        step_plan.check_contiguous(("params", "grads", "exp_avgs", "exp_avg_sqs"), lists[:4])
    device_flags = torch.is_tensor(active)
    host_active = [True] * n if device_flags else [bool(a) for a in active]
    want_inv = ord == 4 and metric
    if device_steps:
        ss, b2, inv_bc1 = (None if t is None else t.float()
                           for t in device_coefficients(lists[4], host_active, lr, beta1, beta2, inv=want_inv))
    else:
        step_size, bc2_sqrt, inv = _coefficients(lists[4], host_active, lr, beta1, beta2)
        coef = step_size + bc2_sqrt + (inv if want_inv else [])
        ss, b2, inv_bc1 = to_device(torch.tensor(coef, dtype=torch.float32), device).split([n, n, len(coef) - 2 * n])
    plan = step_plan.get_plan(lists[:4], None if device_flags else host_active, [0] * n, chunk, device)
    flags = active if device_flags else plan.active
    return _launch(plan, flags, ss, b2, inv_bc1, n, device, chunk, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                   weight_decay=weight_decay, decoupled=decoupled, maximize=maximize, ord=ord, metric=metric,
                   states_in_param_dtype=states_in_param_dtype)


def _launch(plan, flags, ss, b2, inv_bc1, n, device, chunk, *, lr, beta1, beta2, eps, weight_decay, decoupled,
            maximize, ord, metric, states_in_param_dtype):
    block, warps = launch_config("fused_adamw", chunk)
    out = step_plan.launch(plan, flags, metric, n, device, lambda g, partials: _fused_adamw_kernel[(g.n_blocks,)](
        *plan.addrs, plan.numel, plan.block_tensor, plan.block_chunk, flags, ss, b2, partials, g.block_base,
        1 - lr * weight_decay, 1 - beta1, beta2, 1 - beta2, eps, weight_decay, P_DTYPE=_TL_DTYPES[g.dtype],
        S_DTYPE=_TL_DTYPES[g.dtype] if states_in_param_dtype else tl.float32, DECOUPLED=decoupled,
        MAXIMIZE=maximize, ORD=ord, CHUNK=chunk, BLOCK=block,
        ALIGNED=g.aligned, num_warps=warps))
    return out * inv_bc1 if ord == 4 and metric else out  # Σ|m/denom| → Σ|m̂/(√v̂+ε)|


class PreparedAdamW:
    """One checked tensor set of :func:`fused_adamw_step`, stepped again and again at O(1) host cost.

    For a caller that steps the same tensors step after step (the wrapper's fused path between two
    freezes): the argument checks and the launch table are done once, here, not per call. Every
    tensor is active. ``counters`` is one 1-D float tensor with the ``n`` step counters (torch's
    per-parameter ``step`` states may be 0-d views of it): a call advances them all in one op and
    forms the bias corrections once — CPU counters: one host read of the table and, per distinct
    value, torch's own Python doubles; device counters (``device_steps``): ``coefficients_of`` on
    the device, no host read. The results, states and counters equal :func:`fused_adamw_step`'s
    bit for bit. The tensors must keep their addresses: the caller prepares again when they change.
    """

    def __init__(self, params, grads, exp_avgs, exp_avg_sqs, counters: torch.Tensor, *, device_steps: bool = False,
                 states_in_param_dtype: bool = False, chunk_size: int = DEFAULT_CHUNK_SIZE):
        n = len(params)
        if not torch.is_tensor(counters) or counters.dim() != 1 or counters.numel() != n \
                or not counters.dtype.is_floating_point:
            raise ValueError(f"counters must be a 1-D float tensor of {n} step counters; got "
                             f"{getattr(counters, 'dtype', type(counters))} {tuple(getattr(counters, 'shape', ()))}")
        lists = _validate(params, grads, exp_avgs, exp_avg_sqs, [counters[i] for i in range(n)], [True] * n, 1,
                          device_steps, states_in_param_dtype)
        # the launch table holds raw addresses: these references keep the memory behind them alive
        self.tensors = lists[:4]
        self.n, self.counters, self.device_steps = n, counters, device_steps
        self.states_in_param_dtype = states_in_param_dtype
        self.chunk = _check_chunk(chunk_size)
        self.device = _check_device("params", lists[0] + lists[1] + lists[2] + lists[3]) if n else None
        step_plan.check_contiguous(("params", "grads", "exp_avgs", "exp_avg_sqs"), lists[:4])
        self.plan = step_plan.get_plan(lists[:4], None, [0] * n, self.chunk, self.device) if n else None

    def step(self, *, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, decoupled: bool = True,
             maximize: bool = False, ord: int = 1, metric: bool = True) -> Optional[torch.Tensor]:
        """One step of every tensor; Σ per tensor as :func:`fused_adamw_step` returns it."""
        check_ord(ord, moments=True)
        n = self.n
        if n == 0:
            return torch.zeros(0, dtype=torch.float32) if metric else None
        want_inv = ord == 4 and metric
        self.counters.add_(1)
        if self.device_steps:
            ss, b2, inv_bc1 = (None if t is None else t.float()
                               for t in coefficients_of(self.counters.double(), lr, beta1, beta2, inv=want_inv))
        else:
            ss, b2, inv_bc1 = self._host_coefficients(lr, beta1, beta2, want_inv)
        return _launch(self.plan, self.plan.active, ss, b2, inv_bc1, n, self.device, self.chunk, lr=lr, beta1=beta1,
                       beta2=beta2, eps=eps, weight_decay=weight_decay, decoupled=decoupled, maximize=maximize,
                       ord=ord, metric=metric, states_in_param_dtype=self.states_in_param_dtype)

    def _host_coefficients(self, lr, beta1, beta2, want_inv):
        ks = self.counters.tolist()  # CPU counters: no device sync
        lo, hi = min(ks), max(ks)
        n, device = self.n, self.device
        if lo == hi:  # the usual case: one value, one set of coefficients, filled where the kernel reads them
            coef = _host_coefficient(lo, lr, beta1, beta2)[:3 if want_inv else 2]
            return (*(torch.full((n,), c, dtype=torch.float32, device=device) for c in coef),
                    *(() if want_inv else (None,)))
        step_size, bc2_sqrt, inv = host_coefficients(ks, lr, beta1, beta2)
        coef = step_size + bc2_sqrt + (inv if want_inv else [])
        return to_device(torch.tensor(coef, dtype=torch.float32), device).split([n, n, len(coef) - 2 * n])
