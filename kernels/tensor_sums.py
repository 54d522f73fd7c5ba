"""Per-tensor Σ|x|, Σx² and Σ|a − b| (or Σ(a − b)²) of many tensors: one launch per dtype group.

What is computed. For tensors ``x_0..x_{T-1}`` (fp32, bf16 or fp16, any sizes, one device) the
result is an fp32 vector ``s`` with ``s[t] = Σ|x_t|`` (``ord=1``) or ``Σ x_t²`` (``ord=2``): the
semantics of ``_single_tensor_sums`` in ``grades_optim/magnitudes.py`` and ``dispatch.torch_tensor_sums``. The
delta variant takes pairs ``(a_t, b_t)`` of equal numel and sums ``|a_t − b_t|`` (or its square);
the difference is taken in fp32 after upcasting, so it is *more* exact than ``(a − b)`` computed
in bf16 by ``torch._foreach_sub`` (which rounds every difference to 8 significant bits first).

How. Every tensor is cut into chunks of ``chunk_size`` elements; a host-built block table maps
program ``i`` to (tensor, chunk). Stage 1 (``_tensor_sums_kernel``): each program reduces its
chunk in fp32, full ``BLOCK``-element tiles without a mask and only the tail masked, and writes
one fp32 partial. Stage 2 (``_tensor_sums_finish_kernel``): one program per tensor adds that
tensor's partials in a fixed order. No float atomics, so the result is bitwise reproducible run
to run for a given ``chunk_size`` (an fp32 ``atomic_add`` could flip a freeze decision at tau).

Dtypes. Stage 1 is compiled per (a dtype, b dtype) pair — the element type of a pointer read from
the table must be known at compile time — so a call with k distinct dtype combinations issues k
stage-1 launches (in practice 1: a model's gradients share a dtype) over disjoint ranges of one
block table and one partials buffer, then a single stage-2 launch. Runtime dtype branches inside
one launch were rejected: three load paths per tile for a case that does not occur in training.

Bytes moved per element: 2 (bf16/fp16) or 4 (fp32) read for ``tensor_sums``, twice that for the
delta variant; nothing written per element. Per chunk: 16 B of table read, 4 B partial written
and read back. Tables are cached on (device, chunk, data_ptrs, numels, dtypes) and, on CUDA,
uploaded through pinned memory with a non-blocking copy, so a steady-state call does no host sync.

Inputs that are not contiguous are copied to contiguous memory by the launcher (one extra read
and write of those tensors, and no table caching for that call) rather than rejected: a
transposed gradient view is legal input for the torch path, so it must be for this one too.

CPU tensors run only under ``TRITON_INTERPRET=1`` (set before this module is imported: triton
reads it when ``@triton.jit`` decorates). CUDA tensors cannot run under the interpreter: it copies
argument storages to the host, but the device addresses stored in the table are not rewritten.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import NamedTuple, Optional, Sequence

import torch
import triton
import triton.language as tl

from .checks import SUPPORTED_DTYPES, check_tensor_list

__all__ = ["tensor_sums", "tensor_delta_sums", "INTERPRETED", "DEFAULT_CHUNK_SIZE", "SUPPORTED_DTYPES"]

# Untuned defaults (GPU figures owed): 32K elements per program keeps ≥ 40 waves of programs on
# 132 SMs for the 0.6B set (440M elements) so the last partial wave costs little, while the
# 16 B table read and 4 B partial per chunk stay < 0.1 % of the 64 KB of bf16 data each reads.
DEFAULT_CHUNK_SIZE = 32768
# Launch configuration per kernel: (elements per tile, a power of two, at most the chunk; warps).
# 4096 x 8 warps: 8 KB of bf16 in flight per program. One entry per kernel so each can be tuned on
# its own (register pressure differs: the AdamW pass holds four streams); tests lower the tile size
# so that CPU chunks have several tiles per program and the tile loop is exercised.
LAUNCH = {"tensor_sums": (4096, 8), "fused_adamw": (4096, 8), "fused_sgd": (4096, 8)}


def launch_config(kernel: str, chunk: int) -> tuple:
    """``(BLOCK, num_warps)`` for ``kernel`` on ``chunk``-element chunks."""
    block, warps = LAUNCH[kernel]
    return min(block, chunk), warps


_FINISH_BLOCK = 128  # partials added per iteration in stage 2 (fixes the summation order)
_CACHE_SIZE = 16

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _chunk_ptr(addr_ptr, t, start, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """Tensor ``t``'s address from the table, as a ``DTYPE`` pointer to element ``start``."""
    ptr = tl.load(addr_ptr + t).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        # An int64→pointer cast carries no alignment; without this hint loads stay scalar
        # (perf.md §4). The launcher sets ALIGNED only when every base address is 16-byte aligned.
        ptr = tl.multiple_of(ptr, 16)
    return ptr + start


@triton.jit
def _tensor_sums_kernel(a_addr_ptr, b_addr_ptr, numel_ptr, block_tensor_ptr, block_chunk_ptr, partials_ptr,
                        block_base, A_DTYPE: tl.constexpr, B_DTYPE: tl.constexpr, HAS_B: tl.constexpr,
                        ORD: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    # int64 from the start: chunk starts of tensors over 2^31 elements must not wrap.
    blk = block_base + tl.program_id(0).to(tl.int64)
    t = tl.load(block_tensor_ptr + blk)
    # start = chunk index × CHUNK (not a stored offset) so the compiler knows it divides CHUNK.
    start = tl.load(block_chunk_ptr + blk) * CHUNK
    n = tl.minimum(tl.load(numel_ptr + t) - start, CHUNK)
    a_ptr = _chunk_ptr(a_addr_ptr, t, start, A_DTYPE, ALIGNED)
    if HAS_B:
        b_ptr = _chunk_ptr(b_addr_ptr, t, start, B_DTYPE, ALIGNED)
    offs = tl.max_contiguous(tl.multiple_of(tl.arange(0, BLOCK), BLOCK), BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    n_full = n // BLOCK
    for i in range(0, n_full):
        o = i * BLOCK + offs
        x = tl.load(a_ptr + o).to(tl.float32)  # fp32 before any arithmetic: bf16 sums lose digits
        if HAS_B:
            x -= tl.load(b_ptr + o).to(tl.float32)
        if ORD == 1:
            acc += tl.abs(x)
        else:
            acc += x * x
    tail = n_full * BLOCK
    if tail < n:
        o = tail + offs
        mask = o < n
        x = tl.load(a_ptr + o, mask=mask, other=0.0).to(tl.float32)
        if HAS_B:
            x -= tl.load(b_ptr + o, mask=mask, other=0.0).to(tl.float32)
        if ORD == 1:
            acc += tl.abs(x)
        else:
            acc += x * x
    tl.store(partials_ptr + blk, tl.sum(acc, axis=0))


@triton.jit
def _tensor_sums_finish_kernel(partials_ptr, block_start_ptr, block_count_ptr, out_ptr, RBLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    start = tl.load(block_start_ptr + t)
    count = tl.load(block_count_ptr + t)
    offs = tl.arange(0, RBLOCK)
    acc = tl.zeros([RBLOCK], dtype=tl.float32)
    # Fixed stride and tree order: the same inputs give the same bits on every run.
    for i in range(0, count, RBLOCK):
        o = i + offs
        acc += tl.load(partials_ptr + start + o, mask=o < count, other=0.0)
    tl.store(out_ptr + t, tl.sum(acc, axis=0))


INTERPRETED = not isinstance(_tensor_sums_kernel, triton.runtime.JITFunction)


class _Group(NamedTuple):
    a_dtype: torch.dtype
    b_dtype: Optional[torch.dtype]
    block_base: int
    n_blocks: int
    aligned: bool


class _Plan(NamedTuple):
    # One int64 tensor on the device, sliced into the tables below (one upload per plan).
    a_addr: torch.Tensor
    b_addr: torch.Tensor
    numel: torch.Tensor
    block_tensor: torch.Tensor
    block_chunk: torch.Tensor
    block_start: torch.Tensor
    block_count: torch.Tensor
    groups: tuple[_Group, ...]
    n_blocks: int


_plans: "OrderedDict[tuple, _Plan]" = OrderedDict()


def block_layout(numels: Sequence[int], keys: Sequence, chunk: int):
    """Cut tensors into ``chunk``-element blocks, grouped by ``keys[i]`` (e.g. dtypes); host tensors.

    Blocks are laid out tensor by tensor in group order, so each group is one contiguous range of
    programs and each tensor one contiguous range of partials. Returns ``(block_tensor,
    block_chunk, block_start, counts, groups)`` with ``groups = [(key, block_base, n_blocks, idx)]``.
    Shared by every block-table kernel (this module and the fused steps).
    """
    n = len(numels)
    counts = (torch.tensor(list(numels), dtype=torch.int64) + chunk - 1) // chunk
    order: dict = {}
    for i in range(n):
        order.setdefault(keys[i], []).append(i)
    groups, perm, base = [], [], 0
    for key, idx in order.items():
        nb = int(counts[idx].sum())
        groups.append((key, base, nb, idx))
        perm.extend(idx)
        base += nb
    perm_t = torch.tensor(perm, dtype=torch.int64)
    per_perm = counts[perm_t]
    block_tensor = torch.repeat_interleave(perm_t, per_perm)
    starts_perm = torch.cumsum(per_perm, 0) - per_perm
    block_chunk = torch.arange(base, dtype=torch.int64) - torch.repeat_interleave(starts_perm, per_perm)
    block_start = torch.empty(n, dtype=torch.int64)
    block_start[perm_t] = starts_perm
    return block_tensor, block_chunk, block_start, counts, groups


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Upload a host table without a host sync on CUDA (``torch.tensor(..., device="cuda")`` syncs)."""
    if device.type != "cuda":
        return host.to(device)
    pinned = torch.empty(host.shape, dtype=host.dtype, pin_memory=True)
    pinned.copy_(host)
    return pinned.to(device, non_blocking=True)


def _build_plan(a: Sequence[torch.Tensor], b: Optional[Sequence[torch.Tensor]], chunk: int,
                device: torch.device) -> _Plan:
    keys = [(t.dtype, b[i].dtype if b is not None else None) for i, t in enumerate(a)]
    block_tensor, block_chunk, block_start, counts, layout = block_layout([t.numel() for t in a], keys, chunk)
    groups = []
    for (a_dt, b_dt), base, nb, idx in layout:
        aligned = all(a[i].data_ptr() % 16 == 0 for i in idx) and (
            b is None or all(b[i].data_ptr() % 16 == 0 for i in idx))
        groups.append(_Group(a_dt, b_dt, base, nb, aligned))
    numels = torch.tensor([t.numel() for t in a], dtype=torch.int64)
    a_addr = torch.tensor([t.data_ptr() for t in a], dtype=torch.int64)
    b_addr = torch.tensor([t.data_ptr() for t in b], dtype=torch.int64) if b is not None else a_addr
    parts = (a_addr, b_addr, numels, block_tensor, block_chunk, block_start, counts)
    table = to_device(torch.cat(parts), device)
    views = torch.split(table, [p.numel() for p in parts])
    return _Plan(*views, groups=tuple(groups), n_blocks=int(block_tensor.numel()))


def _get_plan(a, b, chunk: int, device: torch.device, cacheable: bool) -> _Plan:
    if not cacheable:
        return _build_plan(a, b, chunk, device)
    # numel and dtype are in the key: a freed address reused by another tensor must not match.
    key = (device, chunk, tuple((t.data_ptr(), t.numel(), t.dtype) for t in a),
           None if b is None else tuple((t.data_ptr(), t.dtype) for t in b))
    plan = _plans.get(key)
    if plan is None:
        plan = _build_plan(a, b, chunk, device)
        _plans[key] = plan
        if len(_plans) > _CACHE_SIZE:
            _plans.popitem(last=False)
    else:
        _plans.move_to_end(key)
    return plan


def _check_device(name: str, tensors: Sequence[torch.Tensor]) -> torch.device:
    device = tensors[0].device
    for i, t in enumerate(tensors):
        if t.device != device:
            raise ValueError(f"{name}[{i}] is on {t.device} but {name}[0] is on {device}; "
                             "all tensors of one call must share a device")
    if device.type == "cuda" and INTERPRETED:
        raise ValueError(f"{name} are CUDA tensors but TRITON_INTERPRET=1: the interpreter runs on the host "
                         "and cannot follow device addresses stored in the block table")
    if device.type != "cuda" and not INTERPRETED:
        raise ValueError(f"{name} are on {device}; the Triton kernels need CUDA tensors, or CPU tensors "
                         "with TRITON_INTERPRET=1 set before grades_optim.kernels.tensor_sums is imported")
    return device


def _check_chunk(chunk_size: int) -> int:
    if not isinstance(chunk_size, int) or chunk_size < 16 or chunk_size & (chunk_size - 1):
        raise ValueError(f"Invalid chunk_size: {chunk_size!r}; expected a power of two >= 16")
    return chunk_size


def _launch(a: list[torch.Tensor], b: Optional[list[torch.Tensor]], ord: int, chunk: int,
            device: torch.device) -> torch.Tensor:
    n = len(a)
    cacheable = all(t.is_contiguous() for t in a) and (b is None or all(t.is_contiguous() for t in b))
    if not cacheable:
        # Copies live only for this call; keeping them referenced here keeps their addresses valid.
        a = [t.contiguous() for t in a]
        b = None if b is None else [t.contiguous() for t in b]
    plan = _get_plan(a, b, chunk, device, cacheable)
    out = torch.empty(n, dtype=torch.float32, device=device)
    if plan.n_blocks == 0:  # only empty tensors: every sum is 0, nothing to launch
        return out.zero_()
    partials = torch.empty(plan.n_blocks, dtype=torch.float32, device=device)
    block, warps = launch_config("tensor_sums", chunk)
    for g in plan.groups:
        if g.n_blocks == 0:
            continue
        a_dt = _TL_DTYPES[g.a_dtype]
        _tensor_sums_kernel[(g.n_blocks,)](
            plan.a_addr, plan.b_addr, plan.numel, plan.block_tensor, plan.block_chunk, partials,
            g.block_base, A_DTYPE=a_dt, B_DTYPE=a_dt if g.b_dtype is None else _TL_DTYPES[g.b_dtype],
            HAS_B=b is not None, ORD=ord, CHUNK=chunk, BLOCK=block, ALIGNED=g.aligned, num_warps=warps)
    _tensor_sums_finish_kernel[(n,)](partials, plan.block_start, plan.block_count, out, RBLOCK=_FINISH_BLOCK)
    return out


def tensor_sums(tensors: Sequence[torch.Tensor], ord: int, *, chunk_size: int = DEFAULT_CHUNK_SIZE) -> torch.Tensor:
    """Σ|x| (``ord=1``) or Σx² (``ord=2``) of every tensor: fp32, shape ``[len(tensors)]``, on their device.

    Same contract as ``grades_optim.magnitudes._single_tensor_sums``; an empty list gives an empty
    CPU tensor and an empty tensor sums to 0. Non-contiguous inputs are copied (see module doc).
    """
    if ord not in (1, 2):
        raise ValueError(f"Invalid ord: {ord!r}; expected 1 or 2")
    tensors = check_tensor_list("tensors", tensors)
    chunk = _check_chunk(chunk_size)
    if not tensors:
        return torch.zeros(0, dtype=torch.float32)
    return _launch(tensors, None, ord, chunk, _check_device("tensors", tensors))


def tensor_delta_sums(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor], ord: int = 1, *,
                      chunk_size: int = DEFAULT_CHUNK_SIZE) -> torch.Tensor:
    """Σ|a_t − b_t| (``ord=1``) or Σ(a_t − b_t)² (``ord=2``) per pair, difference taken in fp32.

    ``a`` and ``b`` pair up by position and must match in numel (dtypes may differ, e.g. bf16
    gradients against an fp32 copy); shapes are not compared, elements pair in row-major order.
    """
    if ord not in (1, 2):
        raise ValueError(f"Invalid ord: {ord!r}; expected 1 or 2")
    a = check_tensor_list("a", a)
    b = check_tensor_list("b", b)
    chunk = _check_chunk(chunk_size)
    if len(a) != len(b):
        raise ValueError(f"a has {len(a)} tensors but b has {len(b)}; they pair up by position")
    for i, (x, y) in enumerate(zip(a, b)):
        if x.numel() != y.numel():
            raise ValueError(f"b[{i}] has {y.numel()} elements but a[{i}] has {x.numel()}")
    if not a:
        return torch.zeros(0, dtype=torch.float32)
    device = _check_device("a", a)
    if _check_device("b", b) != device:
        raise ValueError(f"b is on {b[0].device} but a is on {device}")
    return _launch(a, b, ord, chunk, device)
