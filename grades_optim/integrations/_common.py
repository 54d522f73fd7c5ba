"""Helpers shared by the trainer integrations; depends on torch and the core only.

Kept apart from ``transformers.py`` and ``lightning.py`` so that each integration imports only its
own framework: a Lightning user need not have transformers installed, and vice versa.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Optional

from ..optimizer import GradESOptimizer

__all__ = ["find_grades_optimizer", "grades_figures"]

# AcceleratedOptimizer -> GradESOptimizer is one level; Lightning's LightningOptimizer and user
# wrappers add at most a couple more. The bound only guards against a cycle of ``.optimizer``.
_MAX_UNWRAP = 8


def find_grades_optimizer(optimizer: Any) -> Optional[GradESOptimizer]:
    """The ``GradESOptimizer`` inside ``optimizer``, following ``.optimizer`` / ``._optimizer`` links.

    Trainers hand callbacks their own wrapper rather than the object the user built:
    accelerate's ``AcceleratedOptimizer`` and Lightning's ``LightningOptimizer`` keep it in
    ``.optimizer`` / ``._optimizer``. Returns ``None`` when no GradES wrapper is found (the
    GradES wrapper's own ``.optimizer`` is the inner optimizer, so the search stops there).
    """
    obj = optimizer
    for _ in range(_MAX_UNWRAP):
        if obj is None:
            return None
        if isinstance(obj, GradESOptimizer):
            return obj
        nxt = getattr(obj, "optimizer", None)
        if nxt is None or nxt is obj:
            nxt = getattr(obj, "_optimizer", None)
        if nxt is obj:
            return None
        obj = nxt
    return None


def latest_check(opt: GradESOptimizer) -> tuple[Optional[int], dict[str, float]]:
    """(step, {kind: mean raw metric}) of the most recent check (``opt.last_check``).

    Frozen components are not measured any more, so the mean is over the components still live
    at that check; readings that were not usable (NaN: no gradient, non-finite) are left out.
    """
    records = opt.last_check
    if not records:
        return None, {}
    sums: dict[str, list] = {}
    for rec in records:
        if math.isfinite(rec.metric):
            acc = sums.setdefault(rec.kind, [0.0, 0])
            acc[0] += rec.metric
            acc[1] += 1
    return records[-1].step, {kind: s / n for kind, (s, n) in sums.items()}


def grades_figures(optimizers: Iterable[GradESOptimizer], prefix: str) -> dict[str, float]:
    """Scalar GradES figures for a logger: frozen count and ratio, and per-kind magnitudes.

    Keys (with ``prefix`` in front): ``frozen``, ``tracked``, ``frozen_ratio``, ``step`` (the GradES
    step counter) and ``mag_<kind>`` (mean metric per component kind at the latest check; absent
    before the first check). With several GradES optimizers the
    counts are summed and the magnitudes averaged over the kinds' components of every optimizer.
    """
    optimizers = list(optimizers)
    frozen = sum(sum(c.frozen for c in o.components) for o in optimizers)
    tracked = sum(len(o.components) for o in optimizers)
    out = {
        f"{prefix}frozen": float(frozen),
        f"{prefix}tracked": float(tracked),
        f"{prefix}frozen_ratio": frozen / tracked if tracked else 0.0,
        f"{prefix}step": float(max((o.step_count for o in optimizers), default=0)),
    }
    per_kind: dict[str, list] = {}
    for o in optimizers:
        _, mags = latest_check(o)
        for kind, value in mags.items():
            per_kind.setdefault(kind, []).append(value)
    for kind, values in sorted(per_kind.items()):
        out[f"{prefix}mag_{kind}"] = sum(values) / len(values)
    return out
