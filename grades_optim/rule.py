"""The GradES freeze rule as pure, side-effect-free code (DESIGN §3).

Per component ``c`` and check at GradES step ``t`` (optimizer steps the wrapper really took):

* ``m_c`` is the measured metric (``None``/NaN/Inf mean "no usable reading");
* with ``ema = β > 0`` the compared value is ``s_t = β·s_{t-1} + (1-β)·m_t`` (first reading seeds
  ``s``), else ``s_t = m_t`` (the paper);
* the threshold is ``τ`` (``tau_mode="absolute"``, the paper) or ``τ·r_c`` (``"relative"``), where
  ``r_c`` is the mean of ``s`` over the component's grace-period checks (or its first reading when
  there was none): "freeze once the magnitude fell to a fraction τ of where it started";
* nothing freezes while ``t < grace_steps``: as in the released code (``current_step >=
  min_steps_before_freeze``), a freeze is possible at step ``grace_steps = int(α·T)`` itself;
* after ``patience`` consecutive checks with ``s_t < threshold`` the component freezes at ``t``;
  a reading that is not finite breaks the streak and never counts as converged;
* frozen is final (GradES never unfreezes);
* with ``peak_gate = g > 0`` a reading also counts as converged only while the component's gate
  reading (its gradient L1, smoothed with the same EMA) is below ``g ×`` its running peak: a
  gradient that has not fallen from its peak is still being learned from, whatever the metric says
  (a gradient-noise metric reads "converged" on a plateau before learning starts). Off (0) in the
  paper's rule.

The released GradES code froze on a first reading of 0.0 and on exceptions; here a missing reading
is ``None`` and can only delay a freeze.
"""
from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple, Optional, Sequence

__all__ = ["RuleConfig", "ComponentState", "decide", "decide_all", "should_stop", "stop_reached", "TAU_MODES"]

TAU_MODES = ("absolute", "relative")


@dataclasses.dataclass(frozen=True)
class RuleConfig:
    tau: float
    grace_steps: int = 0
    patience: int = 1
    ema: float = 0.0
    tau_mode: str = "absolute"
    peak_gate: float = 0.0  # 0: off


class ComponentState(NamedTuple):
    """Everything the rule remembers about one component, as plain numbers (checkpoint-safe).

    A NamedTuple, not a dataclass: the wrapper builds one per live component per check, and
    checkpoints store ``list(state)``; ``ComponentState(*saved)`` reads them back.
    """

    frozen_at: Optional[int] = None
    below: int = 0  # consecutive checks under the threshold
    smoothed: Optional[float] = None  # EMA state; None until a finite reading arrived
    ref_sum: float = 0.0  # relative mode: sum and count of grace-period readings
    ref_count: int = 0
    ref_first: Optional[float] = None  # first post-grace reading, used when grace had none
    gate: Optional[float] = None  # peak_gate: the smoothed gate reading, and its running peak
    gate_peak: float = 0.0


def _finite(x: Optional[float]) -> bool:
    return x is not None and math.isfinite(x)


def threshold_for(state: ComponentState, cfg: RuleConfig) -> Optional[float]:
    """The threshold this component is compared with now, or None if not known yet."""
    if cfg.tau_mode == "absolute":
        return cfg.tau
    if state.ref_count > 0:
        return cfg.tau * (state.ref_sum / state.ref_count)
    if state.ref_first is not None:
        return cfg.tau * state.ref_first
    return None


_new = tuple.__new__  # a NamedTuple built from a plain tuple, without its Python-level __new__
_isfinite = math.isfinite


def _gate(state: ComponentState, reading: Optional[float], cfg: RuleConfig):
    """The gate's new (smoothed, peak), and whether it is open (the gradient fell from its peak)."""
    gate, peak = state[6], state[7]
    if reading is not None and _isfinite(reading):
        ema = cfg.ema
        gate = reading if ema <= 0 or gate is None else ema * gate + (1.0 - ema) * reading
        peak = max(peak, gate)
        return gate, peak, gate < cfg.peak_gate * peak
    return gate, peak, False  # no reading: not known to have fallen


def decide(state: ComponentState, metric: Optional[float], step: int, cfg: RuleConfig,
           gate_reading: Optional[float] = None):
    """One check of one component. Returns ``(new_state, compared_value, threshold)``.

    ``gate_reading`` is the component's gradient L1 at this check, read only when ``cfg.peak_gate``.
    """
    # This runs once per live component per check (thousands a step for MoE models), so states
    # are built positionally from plain tuples (frozen_at, below, smoothed, ref_sum, ref_count,
    # ref_first, gate, gate_peak) and the threshold is formed inline; threshold_for is the readable
    # form of it.
    frozen_at, below, smoothed, ref_sum, ref_count, ref_first, gate, peak = state
    if frozen_at is not None:
        return state, None, threshold_for(state, cfg)
    is_open = True
    if cfg.peak_gate > 0:
        gate, peak, is_open = _gate(state, gate_reading, cfg)
    if metric is None or not _isfinite(metric):
        return (_new(ComponentState, (None, 0, smoothed, ref_sum, ref_count, ref_first, gate, peak)), None,
                threshold_for(state, cfg))
    ema = cfg.ema
    value = metric if ema <= 0 or smoothed is None else ema * smoothed + (1.0 - ema) * metric
    if step < cfg.grace_steps:
        state = _new(ComponentState, (None, 0, value, ref_sum + value, ref_count + 1, ref_first, gate, peak))
        return state, value, threshold_for(state, cfg)
    if cfg.tau_mode == "absolute":
        threshold = cfg.tau
    elif ref_count > 0:
        threshold = cfg.tau * (ref_sum / ref_count)
    elif ref_first is not None:
        threshold = cfg.tau * ref_first
    else:
        # relative mode with no grace reading: this first reading becomes the reference; a value
        # is never "below a fraction of itself" for tau <= 1, so it cannot freeze here.
        state = _new(ComponentState, (None, 0, value, ref_sum, ref_count, value, gate, peak))
        return state, value, threshold_for(state, cfg)
    below = below + 1 if value < threshold and is_open else 0
    frozen_at = step if below >= cfg.patience else None
    return _new(ComponentState, (frozen_at, below, value, ref_sum, ref_count, ref_first, gate, peak)), value, threshold


def decide_all(states: Sequence[ComponentState], metrics: Sequence[Optional[float]], step: int,
               cfg: RuleConfig, gate_readings: Optional[Sequence[Optional[float]]] = None):
    """Apply :func:`decide` to every component; each decision depends only on its own inputs."""
    if len(states) != len(metrics):
        raise ValueError(f"got {len(metrics)} metrics for {len(states)} components")
    if gate_readings is None:
        gate_readings = [None] * len(states)
    elif len(gate_readings) != len(states):
        raise ValueError(f"got {len(gate_readings)} gate readings for {len(states)} components")
    return [decide(s, m, step, cfg, g) for s, m, g in zip(states, metrics, gate_readings)]


def should_stop(states: Sequence[ComponentState], max_frozen_ratio: float) -> bool:
    """GradES early stop: the frozen fraction of tracked components reached ``max_frozen_ratio``."""
    return stop_reached(sum(s.frozen_at is not None for s in states), len(states), max_frozen_ratio)


def stop_reached(frozen: int, tracked: int, max_frozen_ratio: float) -> bool:
    """:func:`should_stop` from counts (the wrapper keeps a running frozen count)."""
    return tracked > 0 and frozen / tracked >= max_frozen_ratio
