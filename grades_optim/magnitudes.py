"""Per-component magnitudes: the torch reference path and the dispatcher seam for kernels.

Units. For component ``c`` with measured tensors ``x_1..x_k`` (its weight and bias gradients, its
LoRA adapter gradients, or their step-to-step deltas) and ``n_c = Σ numel(x_i)``:

* ``ord=1``: ``Σ_i Σ |x_i|`` (``reduction="sum"``) or that divided by ``n_c`` (``"mean"``);
* ``ord=2``: ``sqrt(Σ_i Σ x_i²)`` (``"sum"``, the Frobenius norm) or ``sqrt(Σ x² / n_c)``
  (``"mean"``, the root-mean-square element).

Everything stays on the tensors' device until one host transfer per call (one sync per check,
none between checks). Accumulation is fp32 whatever the gradient dtype (bf16 sums of millions of
elements lose most of their digits).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

__all__ = ["METRICS", "REDUCTIONS", "IMPLS", "tensor_sums", "component_magnitudes"]

METRICS = ("grad_l1", "grad_l2", "grad_delta_l1", "weight_delta_l1")
METRIC_ORD = {"grad_l1": 1, "grad_l2": 2, "grad_delta_l1": 1, "weight_delta_l1": 1}
REDUCTIONS = ("sum", "mean")
IMPLS = ("auto", "torch", "triton")


def _local(t: torch.Tensor) -> torch.Tensor:
    # FSDP2 DTensor shards: sum locally; the cross-rank all-reduce belongs to the distributed layer.
    return t.to_local() if hasattr(t, "to_local") else t


def _single_tensor_sums(tensors: Sequence[torch.Tensor], ord: int) -> torch.Tensor:
    """Readable reference: per tensor, Σ|x| (ord 1) or Σx² (ord 2), fp32, one value per tensor."""
    out = []
    for t in tensors:
        t = _local(t).float()
        out.append(t.abs().sum() if ord == 1 else (t * t).sum())
    return torch.stack(out) if out else torch.zeros(0)


def _foreach_sums(tensors: Sequence[torch.Tensor], ord: int) -> torch.Tensor:
    """Batched torch path: one ``_foreach_norm`` with fp32 output for all tensors of a device."""
    norms = torch._foreach_norm([_local(t) for t in tensors], ord, dtype=torch.float32)
    sums = torch.stack(norms)
    return sums if ord == 1 else sums * sums


def tensor_sums(tensors: Sequence[torch.Tensor], ord: int, *, impl: str = "torch") -> torch.Tensor:
    """Σ|x| or Σx² of every tensor (fp32, on the tensors' device). All tensors share a device."""
    if ord not in (1, 2):
        raise ValueError(f"Invalid ord: {ord}; expected 1 or 2")
    if not tensors:
        return torch.zeros(0)
    if impl == "triton":
        from grades_optim.kernels import dispatch  # lazy: triton is optional

        return dispatch.tensor_sums(tensors, ord)
    return _foreach_sums(tensors, ord)


def component_magnitudes(tensors: Sequence[torch.Tensor], owners: Sequence[int], n_components: int,
                         ord: int, reduction: str, *, impl: str = "torch") -> list[Optional[float]]:
    """Magnitude per component; ``owners[i]`` is the component of ``tensors[i]``.

    Components that own no tensor (no gradient this step) come back as ``None``, never 0.0: the
    released GradES code read "not measured" as 0.0 and froze on it.
    """
    if len(tensors) != len(owners):
        raise ValueError(f"got {len(owners)} owners for {len(tensors)} tensors")
    numel = [0] * n_components
    seen = [False] * n_components
    by_device: dict[torch.device, list[int]] = {}
    for i, (t, c) in enumerate(zip(tensors, owners)):
        numel[c] += t.numel()
        seen[c] = True
        by_device.setdefault(_local(t).device, []).append(i)
    totals = None
    for device, idx in by_device.items():
        sums = tensor_sums([tensors[i] for i in idx], ord, impl=impl)
        index = torch.tensor([owners[i] for i in idx], device=sums.device)
        per_comp = torch.zeros(n_components, dtype=torch.float32, device=sums.device)
        per_comp.index_add_(0, index, sums)
        totals = per_comp if totals is None else totals + per_comp.to(totals.device)
    values = totals.tolist() if totals is not None else [0.0] * n_components  # the one host sync
    out: list[Optional[float]] = []
    for c in range(n_components):
        if not seen[c]:
            out.append(None)
            continue
        v = values[c]
        if numel[c] == 0:  # nothing to measure (empty tensors): no reading, not a zero reading
            out.append(None)
            continue
        if reduction == "mean":
            v = v / numel[c]
        out.append(math.sqrt(v) if ord == 2 and v >= 0 else v)
    return out
