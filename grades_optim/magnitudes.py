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

from . import distributed as dist_utils
from .kernels import dispatch
from .kernels.dispatch import IMPLS  # defined once, where the dispatch happens (imports no triton)

__all__ = ["CopyBuffers", "sum_by_owner", "METRICS", "REDUCTIONS", "IMPLS", "tensor_sums", "component_magnitudes", "update_snr_sums"]

METRICS = ("grad_l1", "grad_l2", "grad_delta_l1", "weight_delta_l1", "update_snr")
METRIC_ORD = {"grad_l1": 1, "grad_l2": 2, "grad_delta_l1": 1, "weight_delta_l1": 1, "update_snr": 1}
# metrics read from the inner optimizer's Adam moments (its state must have these keys)
MOMENT_METRICS = {"update_snr": ("exp_avg", "exp_avg_sq", "step")}
REDUCTIONS = ("sum", "mean")


def _single_tensor_sums(tensors: Sequence[torch.Tensor], ord: int) -> torch.Tensor:
    """Readable reference: per tensor, Σ|x| (ord 1) or Σx² (ord 2), fp32, one value per tensor."""
    out = []
    for t in tensors:
        t = dist_utils.local(t).float()
        out.append(t.abs().sum() if ord == 1 else (t * t).sum())
    return torch.stack(out) if out else torch.zeros(0)


def tensor_sums(tensors: Sequence[torch.Tensor], ord: int, *, impl: str = "torch",
                others: Optional[Sequence[torch.Tensor]] = None) -> torch.Tensor:
    """Σ|x| or Σx² of every tensor, or of ``x − y`` pairwise with ``others`` (fp32, on device).

    The dispatcher (``grades_optim.kernels.dispatch``) runs one ``_foreach_norm`` for
    ``impl="torch"`` and the one-launch Triton kernels for ``"triton"`` (``"auto"``: Triton for CUDA
    tensors when it is available); triton is only imported on that path.
    """
    from grades_optim.kernels import dispatch

    if ord not in (1, 2):
        raise ValueError(f"Invalid ord: {ord}; expected 1 or 2")
    if others is not None:
        return dispatch.tensor_delta_sums(tensors, others, ord, impl=impl)
    return dispatch.tensor_sums(tensors, ord, impl=impl)


def update_snr_sums(params: Sequence[torch.Tensor], states: Sequence[dict], betas: Sequence[tuple],
                    eps: Sequence[float]) -> torch.Tensor:
    """Per tensor ``Σ |m̂ / (√v̂ + ε)|``: Adam's update per unit of learning rate (fp32, on device).

    ``m̂ = m/(1-β1^t)`` and ``v̂ = v/(1-β2^t)`` are the bias-corrected moments after the step. Per
    element this is a gradient signal-to-noise ratio in [0, ~1]: near 1 while the gradient keeps
    its sign from batch to batch, near ``sqrt(2/π·(1-β1)/(1+β1))`` ≈ 0.18 (β1 = 0.9) once it is
    mostly minibatch noise. Neither the learning rate nor the parameter scale enters it.
    """
    if not params:
        return torch.zeros(0)
    # With c1 = 1/(1-β1^t) and c2 = 1/sqrt(1-β2^t): |m·c1| / (sqrt(v)·c2 + ε) =
    # (c1/c2) · |m| / (sqrt(v) + ε/c2), so the bias corrections become one scalar per tensor
    # applied to its sum, and the rest is four tensor ops over many tensors at once.
    ts = _host_floats([st["step"] for st in states])  # checks sync anyway
    if len(set(ts)) == 1 and len(set(betas)) == 1 and len(set(eps)) == 1:  # the usual case: one set of scalars
        ts, betas, eps = ts[:1], betas[:1], eps[:1]
    c1 = [1.0 / (1.0 - b1 ** t) for (b1, _), t in zip(betas, ts)]
    c2 = [1.0 / math.sqrt(1.0 - b2 ** t) for (_, b2), t in zip(betas, ts)]
    shift = [float(e) / k for e, k in zip(eps, c2)]
    scale = torch.tensor([a / b for a, b in zip(c1, c2)], dtype=torch.float32)
    # one scalar when every tensor shares it (one eps, one step count): the per-tensor forms are
    # several times slower on CPU
    uniform = shift[0] if len(set(shift)) == 1 else None
    if len(shift) == 1:
        shift = shift * len(states)
    m = [dist_utils.local(st["exp_avg"]) for st in states]
    v = [dist_utils.local(st["exp_avg_sq"]) for st in states]

    def of_group(idx):
        sh = uniform if uniform is not None else torch.tensor([shift[i] for i in idx]).unsqueeze(1)
        return (dispatch.stacked(m, idx).float().abs() / (dispatch.stacked(v, idx).float().sqrt() + sh)).sum(1)

    def of_rest(idx):
        # foreach ops: four launches for all of them, not five per tensor (the per-tensor form cost
        # ~50 µs a component on the host, and as many GPU launches)
        root = torch._foreach_sqrt([v[i].float() for i in idx])
        torch._foreach_add_(root, uniform if uniform is not None else [shift[i] for i in idx])
        part = torch._foreach_norm(torch._foreach_div([m[i].float() for i in idx], root), 1, dtype=torch.float32)
        return torch.stack([x.to(m[0].device) for x in part])

    # small CPU tensors are stacked (dispatch.stack_groups says why); grouped by the first moments
    # alone, as Adam's two moments have the parameter's shape (another dtype is promoted, and
    # both are read in fp32 anyway)
    groups, rest = dispatch.stack_groups(m)
    sums = dispatch.scatter_groups(len(params), groups, rest, of_group, of_rest, device=m[0].device)
    return sums * scale.to(sums.device)


def _host_floats(values) -> list[float]:
    """``float(x)`` of each value (Python numbers or 0-d tensors) with one transfer, not one per tensor."""
    if values and all(isinstance(x, torch.Tensor) for x in values):
        try:
            return torch.stack(values).double().tolist()  # Adam's 0-d step tensors
        except RuntimeError:  # on several devices, or not all 0-d: one at a time
            pass
    return [float(x) for x in values]


class CopyBuffers:
    """Copies of one fixed set of tensors, refilled in place: the metrics' previous gradients or weights.

    A clone per tensor costs more host time than its copy; so does a foreach copy on CPU (~2–5 µs a
    tensor). Small CPU tensors of one shape are therefore copied as one stacked buffer
    (``torch.stack(..., out=)``: one op per shape) and ``copies`` holds views of its rows; the
    others take one foreach copy. ``refill`` raises ``RuntimeError`` when a tensor no longer fits
    its buffer (the caller then builds new buffers).
    """

    __slots__ = ("copies", "_groups", "_rest")

    def __init__(self, tensors: Sequence[torch.Tensor]):
        groups, self._rest = dispatch.stack_groups(tensors)
        copies: list = [None] * len(tensors)
        self._groups = []
        for idx in groups:
            buf = torch.stack([tensors[i].detach() for i in idx])
            self._groups.append((idx, buf))
            for row, i in enumerate(idx):
                copies[i] = buf[row]
        for i in self._rest:
            copies[i] = tensors[i].detach().clone()
        self.copies = copies

    def refill(self, tensors: Sequence[torch.Tensor]) -> list:
        for idx, buf in self._groups:
            if buf.shape[1:] != tensors[idx[0]].shape:  # stack(out=) would resize, not raise
                raise RuntimeError("a tensor changed shape")
            torch.stack([tensors[i] for i in idx], out=buf)  # another shape inside the group raises
        if self._rest:
            copies = self.copies
            torch._foreach_copy_([copies[i] for i in self._rest], [tensors[i] for i in self._rest])
        return self.copies


def sum_by_owner(part: torch.Tensor, owners: Sequence[int], n_components: int) -> torch.Tensor:
    """``out[c] = Σ part[j]`` over ``owners[j] == c``, in fp32 and in tensor order, on every device.

    Not ``index_add_``: on CUDA it adds with float atomics, so a component of three or more tensors
    could read differently from run to run. Here column ``k`` holds each component's ``k``-th
    tensor (a zero slot past its last one) and the columns are added one after the other: the same
    order, and the same bits, as the CPU ``index_add_`` and the decide kernel's loop.
    """
    return _sum_columns(part, _owner_columns(owners, n_components, part.device), n_components)


def _owner_columns(owners: Sequence[int], n_components: int, device) -> Optional[torch.Tensor]:
    """``sum_by_owner``'s ``[depth, n_components]`` index table (``None`` when nothing is owned)."""
    slots: list[list[int]] = [[] for _ in range(n_components)]
    for j, c in enumerate(owners):
        slots[c].append(j)
    depth = max(map(len, slots), default=0)
    if depth == 0:
        return None
    pad = len(owners)  # the index of the zero slot appended to part
    if depth == 1:  # one tensor per component, the usual case: one column, no Python loop per depth
        return torch.tensor([[s[0] if s else pad for s in slots]], device=device)
    return torch.tensor([[s[k] if k < len(s) else pad for s in slots] for k in range(depth)], device=device)


def _sum_columns(part: torch.Tensor, cols: Optional[torch.Tensor], n_components: int) -> torch.Tensor:
    if cols is None:
        return torch.zeros(n_components, dtype=torch.float32, device=part.device)
    padded = torch.cat([part.float(), part.new_zeros(1, dtype=torch.float32)])
    out = padded[cols[0]]
    for k in range(1, cols.shape[0]):
        out = out + padded[cols[k]]
    return out


class OwnerPlan:
    """What :func:`component_magnitudes` derives from the tensors' owners, sizes and devices alone.

    Built once per tensor set and reused while it is unchanged (the wrapper keys it on its layout
    and the parameters measured): per device the tensor indices, the rank weights and
    ``sum_by_owner``'s index table; per component the element count and whether it was measured.
    """

    __slots__ = ("n", "parts", "counts", "all_on_one")

    def __init__(self, tensors: Sequence[torch.Tensor], owners: Sequence[int], n_components: int, group=None):
        if len(tensors) != len(owners):
            raise ValueError(f"got {len(owners)} owners for {len(tensors)} tensors")
        share = 1.0 / dist_utils.world_size(group)
        numel = [0.0] * n_components
        seen = [0.0] * n_components
        local = [dist_utils.local(t) for t in tensors]
        # shards add up; replicas average (alone, every weight is 1)
        weights = [1.0 if dist_utils.is_sharded(t) else share for t in tensors] if group is not None else None
        by_device: dict[torch.device, list[int]] = {}  # CPU-offloaded or model-parallel tensors split
        for i, (t, c) in enumerate(zip(local, owners)):
            numel[c] += t.numel() * (1.0 if weights is None else weights[i])
            seen[c] = 1.0
            by_device.setdefault(t.device, []).append(i)
        self.n = n_components
        self.all_on_one = len(by_device) == 1
        self.parts = []
        for device, idx in by_device.items():
            w = None if group is None else torch.tensor([weights[i] for i in idx], device=device)
            self.parts.append((idx, torch.tensor(idx, device=device), w,
                               _owner_columns([owners[i] for i in idx], n_components, device)))
        device = next(iter(by_device)) if by_device else _group_device(group)
        self.counts = torch.tensor(numel + seen, dtype=torch.float64).to(device)


def component_magnitudes(tensors: Sequence[torch.Tensor], owners: Sequence[int], n_components: int,
                         ord: int, reduction: str, *, impl: str = "torch", group=None,
                         others: Optional[Sequence[torch.Tensor]] = None,
                         sums: Optional[torch.Tensor] = None, plan: Optional[OwnerPlan] = None) -> list[Optional[float]]:
    """Magnitude per component; ``owners[i]`` is the component of ``tensors[i]``.

    Components that own no tensor (no gradient this step) come back as ``None``, never 0.0: the
    released GradES code read "not measured" as 0.0 and froze on it. With ``others`` the magnitude
    is that of ``tensors[i] − others[i]`` (gradient or weight deltas). With a process ``group``,
    the per-component sums are agreed over ranks first (see :mod:`grades_optim.distributed`).
    ``sums`` (fp32, one per tensor, on their device) are per-tensor sums already taken, e.g. by the
    fused step's pass; the tensors then only supply element counts and devices. ``plan``: an
    :class:`OwnerPlan` of these very tensors, owners and group, built earlier (else built here).
    """
    if plan is None:
        plan = OwnerPlan(tensors, owners, n_components, group)
    elif len(tensors) != len(owners) or plan.n != n_components:
        raise ValueError(f"the plan is for {plan.n} components; got {n_components} ({len(tensors)} tensors)")
    totals = None
    for idx, idx_t, w, cols in plan.parts:
        if sums is None:
            part = tensor_sums([tensors[i] for i in idx], ord, impl=impl,
                               others=None if others is None else [others[i] for i in idx])
        else:
            part = sums if plan.all_on_one else sums[idx_t.to(sums.device)]
        if w is not None:
            part = part * w.to(part.device)
        per_comp = _sum_columns(part, cols, n_components)
        totals = per_comp if totals is None else totals + per_comp.to(totals.device)
    if totals is None:  # this rank measured nothing; it still joins the collective
        totals = torch.zeros(n_components, dtype=torch.float32, device=plan.counts.device)
    vec = torch.cat([totals.double(), plan.counts.to(totals.device)])
    vec = dist_utils.all_reduce_sum(vec, group)
    # per component, as doubles: v / numel (mean), sqrt for ord 2 (a negative v, impossible for
    # Σx², is left as it is); IEEE division and sqrt are exact-rounded, so these are the bits the
    # Python float arithmetic gives, in a few tensor ops instead of a loop
    v, n, measured = vec[:n_components], vec[n_components:2 * n_components], vec[2 * n_components:]
    if reduction == "mean":
        v = v / torch.where(n > 0, n, 1.0)
    if ord == 2:
        v = torch.where(v >= 0, v.sqrt(), v)
    # no gradient, or only empty tensors: no reading, not a zero
    values, ok = torch.stack([v, ((measured != 0) & (n > 0)).double()]).tolist()  # the one host sync of a check
    return [x if k else None for x, k in zip(values, ok)]


def _group_device(group) -> torch.device:
    # NCCL collectives need CUDA tensors, gloo CPU ones.
    if group is not None and torch.distributed.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
