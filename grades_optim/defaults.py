"""The one source of GradES defaults: the optimizer, the CLI and both integrations read them here.

Two presets, chosen by whether ``tau`` is given:

* ``GRADES`` (no ``tau``): the recommended settings, chosen by the study in
  ``benchmarks/results/decisions.md`` (README "Choosing τ"). ``update_snr`` reads Adam's moments;
  with an inner optimizer that has none, ``NO_MOMENTS`` replaces the metric and its τ.
* ``PAPER`` (``tau`` given): the paper's rule, τ in the units of the chosen metric — every other
  argument not given takes its paper value (no grace period, patience 1, no smoothing).
"""
from __future__ import annotations

__all__ = ["GRADES", "NO_MOMENTS", "PAPER", "resolve"]

GRADES = dict(
    metric="update_snr",  # mean |m̂/(√v̂+ε)|: independent of the LR schedule and the weight scale
    tau=0.3,
    tau_mode="absolute",
    alpha=0.3,
    patience=3,
    ema=0.9,
    peak_gate=0.0,
    check_interval=1,
    reduction="mean",
)
# inners without Adam moments (SGD, Adafactor, ...): the released code's metric, scale-free τ
NO_MOMENTS = dict(metric="weight_delta_l1", tau=0.3, tau_mode="relative")
PAPER = dict(metric="grad_l1", tau_mode="absolute", alpha=0.0, patience=1, ema=0.0, peak_gate=0.0, check_interval=1,
             reduction="mean")


def resolve(given: dict, has_moments: bool) -> dict:
    """Fill the arguments left ``None`` in ``given`` from the preset that applies."""
    if given.get("tau") is None:
        preset = dict(GRADES)
        if not has_moments and given.get("metric") in (None, GRADES["metric"]):
            if given.get("metric") is None:
                preset.update(NO_MOMENTS)
        from .magnitudes import METRICS  # an unknown metric is construct.validate's error, not this one

        if given.get("metric") in METRICS and given["metric"] != preset["metric"]:
            raise ValueError(f"Invalid tau: None with metric={given['metric']!r}; the default tau belongs to "
                             f"metric={preset['metric']!r}. Give tau in the units of {given['metric']!r} "
                             "(README: Choosing τ)")
    else:
        preset = dict(PAPER)
    out = dict(given)
    for key, value in preset.items():
        if out.get(key) is None:
            out[key] = value
    return out
