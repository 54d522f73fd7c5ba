"""Validation and resolution of GradESOptimizer's constructor arguments.

Everything here runs before the wrapper touches the inner optimizer, so a bad argument raises
(a ``ValueError``/``TypeError`` naming the argument and the fix) with nothing modified.
"""
from __future__ import annotations

import math
import numbers
import warnings
from typing import Any

import torch
from torch import nn

from . import distributed as dist_utils
from . import magnitudes as mag
from .components import Component, ComponentSpec, components_from_mapping, discover_components
from .rule import TAU_MODES, ComponentState

FREEZE_MODES = ("auto", "skip", "requires_grad")


def is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def validate_inner(optimizer) -> None:
    if getattr(optimizer, "_is_grades_wrapper", False):
        raise TypeError("Invalid optimizer: it is already a GradESOptimizer; wrap the inner optimizer once")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"Invalid optimizer: expected a torch.optim.Optimizer instance, got "
                        f"{type(optimizer).__name__}; build it first, e.g. torch.optim.AdamW(model.parameters())")
    if hasattr(optimizer, "gradient_state"):
        raise TypeError("Invalid optimizer: it is accelerate's AcceleratedOptimizer. Wrap the plain optimizer "
                        "with GradESOptimizer first, then pass the wrapper to accelerator.prepare")
    if isinstance(optimizer, torch.optim.LBFGS):
        raise TypeError("Invalid optimizer: LBFGS re-evaluates the closure several times per step; GradES "
                        "measures one gradient per step and does not support it")


_NUMBERS = ("tau", "alpha", "total_steps", "grace_steps", "check_interval", "patience", "ema", "peak_gate",
            "max_frozen_ratio")


def plain_numbers(values: dict) -> dict:
    """NumPy scalars and 0-d tensors among the numeric arguments, as the Python numbers they hold.

    ``np.float32(0.3)`` is not a ``float`` and ``np.int64(3)`` not an ``int``; users pass them from
    configs and sweeps. Integers stay integers (a float for an int argument is still refused, by
    ``validate``, with its type named). Anything else is left for ``validate`` to refuse.
    """
    out = dict(values)
    for key in _NUMBERS:
        x = out.get(key)
        if x is None or isinstance(x, bool) or type(x) in (int, float):
            continue
        if isinstance(x, torch.Tensor):
            if x.dim() != 0 or x.dtype == torch.bool or x.is_complex():
                continue
            x = x.item()
        elif isinstance(x, numbers.Integral):  # numpy's bool_ is neither Integral nor Real
            x = int(x)
        elif isinstance(x, numbers.Real):
            x = float(x)
        else:
            continue
        out[key] = x
    return out


def _shown(x) -> str:
    """The value as the error shows it: its repr, with the type named unless it is a plain number."""
    return repr(x) if type(x) in (int, float) else f"{x!r} ({type(x).__name__})"


def validate(*, tau, alpha, total_steps, grace_steps, check_interval, metric, reduction, patience,
              ema, tau_mode, max_frozen_ratio, freeze_mode, impl, record_history=True, peak_gate=0.0) -> None:
    def real(x):
        return isinstance(x, (int, float)) and not isinstance(x, bool)

    validate_tau(tau, tau_mode)
    if not real(alpha) or not 0.0 <= alpha < 1.0:
        raise ValueError(f"Invalid alpha: {_shown(alpha)}; expected a fraction of total_steps in [0, 1)")
    if total_steps is not None and (not is_int(total_steps) or total_steps < 1):
        raise ValueError(f"Invalid total_steps: {_shown(total_steps)}; expected an int >= 1 or None")
    if alpha > 0 and total_steps is None:
        raise ValueError(f"Invalid alpha: {alpha} needs total_steps (the grace period is alpha × "
                         "total_steps); pass total_steps= or use grace_steps= instead")
    if not is_int(grace_steps) or grace_steps < 0:
        raise ValueError(f"Invalid grace_steps: {_shown(grace_steps)}; expected an int >= 0")
    if alpha > 0 and grace_steps > 0:
        raise ValueError(f"Invalid grace_steps: {grace_steps} together with alpha={alpha}; give one of them")
    if not is_int(check_interval) or check_interval < 1:
        raise ValueError(f"Invalid check_interval: {_shown(check_interval)}; expected an int >= 1")
    if not is_int(patience) or patience < 1:
        raise ValueError(f"Invalid patience: {_shown(patience)}; expected an int >= 1 (1 = the paper's rule)")
    if not real(ema) or not 0.0 <= ema < 1.0:
        raise ValueError(f"Invalid ema: {_shown(ema)}; expected a smoothing factor in [0, 1) (0 disables)")
    if not real(peak_gate) or not 0.0 <= peak_gate <= 1.0:
        raise ValueError(f"Invalid peak_gate: {_shown(peak_gate)}; expected a fraction in [0, 1] of the gradient's "
                         "running peak (0 disables)")
    if not isinstance(record_history, bool) and not (is_int(record_history) and record_history >= 1):
        raise ValueError(f"Invalid record_history: {record_history!r}; expected True, False or an int >= 1")
    if not real(max_frozen_ratio) or not 0.0 < max_frozen_ratio <= 1.0:
        raise ValueError(f"Invalid max_frozen_ratio: {_shown(max_frozen_ratio)}; expected a fraction in (0, 1]")
    for name, value, allowed in (("metric", metric, mag.METRICS), ("reduction", reduction, mag.REDUCTIONS),
                                 ("tau_mode", tau_mode, TAU_MODES), ("freeze_mode", freeze_mode, FREEZE_MODES),
                                 ("impl", impl, mag.IMPLS)):
        if value not in allowed:
            raise ValueError(f"Invalid {name}: {value!r}; expected one of {', '.join(map(repr, allowed))}")


def validate_tau(tau, tau_mode) -> None:
    if not isinstance(tau, (int, float)) or isinstance(tau, bool) or not math.isfinite(tau) or tau <= 0:
        raise ValueError(f"Invalid tau: {_shown(tau)}; expected a finite number > 0")
    if tau_mode == "relative" and tau > 1:
        # the threshold is tau × the grace-period mean: above 1, a reading that merely stays at its
        # grace level counts as converged, and most matrices freeze at the first check after grace.
        # Allowed (tests use it to freeze everything on purpose), never silent.
        warnings.warn(f"tau={tau!r} with tau_mode='relative' is more than the grace-period reading itself: "
                      "matrices freeze once their reading is merely not growing, usually at the first check "
                      "after the grace period. A relative tau is a fraction in (0, 1]; tau in the metric's "
                      "units needs tau_mode='absolute'", UserWarning, stacklevel=3)


def resolve_impl(impl: str) -> str:
    """``"auto"`` stays: the dispatcher picks Triton per call for CUDA tensors when it can run."""
    if impl == "triton":
        from grades_optim import kernels

        reason = kernels.available()
        if reason is not None:
            raise ValueError(f"Invalid impl: 'triton' is unavailable: {reason}; use impl='torch' or 'auto'")
    return impl


def resolve_freeze_mode(freeze_mode: str, model, optimizer, group) -> tuple[str, str]:
    """Pick how to freeze; the reason is exposed as ``opt.freeze_mode_reason``."""
    if freeze_mode != "auto":
        return freeze_mode, "chosen by the user"
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        if model.find_unused_parameters and not getattr(model, "static_graph", False):
            return "requires_grad", "DDP with find_unused_parameters=True tolerates requires_grad changes"
        return "skip", ("DDP without find_unused_parameters=True (or with static_graph) breaks when "
                        "requires_grad changes; frozen matrices are skipped but still get gradients")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if any(dist_utils.is_sharded(p) for p in params):
        return "requires_grad", "FSDP2 (DTensor) parameters re-sync requires_grad at every all-gather"
    if group is not None:
        # The DDP wrapper may be built after the optimizer (HF Trainer, Lightning) where we
        # cannot see it; toggling requires_grad under its default reducer silently diverges.
        return "skip", ("torch.distributed is running and no DDP(find_unused_parameters=True) model was "
                        "given: frozen matrices are skipped but keep requires_grad (pass the DDP model "
                        "or freeze_mode='requires_grad' if the reducer tolerates it)")
    return "requires_grad", "single process: requires_grad=False also skips the weight-gradient GEMM"


def specs_for(model, components, matcher, optimizer) -> list[ComponentSpec]:
    if components is not None:
        if matcher is not None:
            raise ValueError("Invalid matcher: give either components= or matcher=, not both")
        return components_from_mapping(components, model=model)
    if model is None:
        raise ValueError("GradESOptimizer needs model= (to discover projection matrices) or components= "
                         "(an explicit {name: parameters} mapping)")
    if not isinstance(model, nn.Module):
        raise TypeError(f"Invalid model: expected a torch.nn.Module, got {type(model).__name__}")
    # A parameter a previous GradES run froze (requires_grad=False, flagged frozen in the groups the
    # inner optimizer carries) is still a component: re-wrapping must find the same layout.
    frozen_before = {id(p) for g in optimizer.param_groups
                     for p, st in zip(g["params"], g.get("grades_state") or [])
                     if st is not None and ComponentState(*st).frozen_at is not None}
    return discover_components(model, matcher, trainable=lambda p: p.requires_grad or id(p) in frozen_before)


def resolve_components(specs: list[ComponentSpec], optimizer) -> list[Component]:
    """Pin each component to (group, index) positions in the inner optimizer."""
    where = {id(p): (g, i) for g, group in enumerate(optimizer.param_groups)
             for i, p in enumerate(group["params"])}
    owner: dict[int, str] = {}
    out, missing = [], []
    for spec in specs:
        names, positions, numel = [], [], 0
        for pname, p in spec.params:
            if id(p) in owner:
                raise ValueError(f"Invalid components: parameter {pname} is in both {owner[id(p)]} and {spec.name}")
            owner[id(p)] = spec.name
            if id(p) not in where:
                if p.requires_grad:
                    missing.append(pname)
                continue  # e.g. an inactive LoRA adapter the optimizer was not built over
            names.append(pname)
            positions.append(where[id(p)])
            numel += p.numel()
        if positions:
            out.append(Component(spec.name, spec.kind, numel, tuple(names), tuple(positions)))
    if missing:
        raise ValueError(f"Invalid components: the optimizer does not hold {len(missing)} trainable "
                         f"parameter(s) of the components, e.g. {', '.join(missing[:3])}. Build the "
                         "inner optimizer over model.parameters() (or the same parameters)")
    if not out:
        raise ValueError("Invalid components: none of the components' parameters is held by the optimizer")
    return out
