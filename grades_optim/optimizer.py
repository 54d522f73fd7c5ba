"""GradESOptimizer: per-matrix gradient-based early stopping around any torch optimizer.

NOTE (why this class does not call ``Optimizer.__init__``): the wrapper must *be* an Optimizer
(LR schedulers, GradScaler, accelerate and Lightning check ``isinstance``) but must not own
``param_groups``/``state``: they are live views of the inner optimizer's, so a scheduler writing
``lr`` or a direct ``inner.load_state_dict`` is seen by both. The base-class attributes its methods
rely on (the six hook dicts, the patched ``step``) are set up by hand (accelerate's
``AcceleratedOptimizer`` and timm's ``Lookahead`` do the same).

Where state lives (DESIGN §4): GradES bookkeeping is written into extra keys of the inner
``param_groups`` as plain ints/floats/lists (``grades_step``, ``grades_cid``, ``grades_numel``,
``grades_state``), so ``state_dict()`` survives ``torch.load(weights_only=True)``, HF checkpoints
and DCP without custom code. Frozen parameters stay in their groups; their big state tensors are
dropped and a minimal entry (``step``) is kept.

Host cost (issue 11): per step the wrapper does O(groups + live parameters) Python work. What the
step needs from the components, the groups and the freeze set (per-group live parameter lists,
owner indices, element counts) is cached in a :class:`_Layout`, rebuilt only when the groups or
the freeze set change. The ``grades_*`` keys are written in full at ``state_dict()`` (and at
construction, ``load_state_dict`` and group changes); between those, a freeze updates only the
frozen component's entries, so the freeze set in the inner groups is always current while the
live components' rule readings there may lag until the next ``state_dict()``.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from collections import OrderedDict
from typing import Callable, NamedTuple, Optional

import torch
from torch import nn

from . import construct
from . import defaults
from . import distributed as dist_utils
from . import fused_step
from . import magnitudes as mag
from .components import Component
from .rule import ComponentState, RuleConfig, decide, stop_reached

__all__ = ["GradESOptimizer", "CheckRecord"]

logger = logging.getLogger("grades_optim")

# guards: warn when nothing froze by this fraction of total_steps, or when more than this fraction of
# the components froze together at the first checks after the grace period
GUARD_NOTHING_AT = 0.75
GUARD_BURST = 0.5
# record_history's default bound, in records: ~200 k x ~160 B = ~32 MiB at most (trimmed at twice
# this), a few thousand checks of a 36-matrix model; each component's freeze step and latest
# reading stay complete in ``timeline()`` whatever the bound
DEFAULT_HISTORY = 200_000

_KEYS = ("grades_step", "grades_cid", "grades_numel", "grades_state")
_RULE_FIELDS = ("metric", "reduction", "tau_mode", "ema", "peak_gate")  # GradESOptimizer._rule_settings
_PREV_GRAD = "grades_prev_grad"
_PREV_WEIGHT = "grades_prev_weight"


class CheckRecord(NamedTuple):
    """One component at one check: its raw metric, the value compared (EMA-smoothed if enabled),
    the threshold it was compared with and whether it is frozen after the check."""

    step: int
    component: str
    kind: str
    metric: float
    value: float
    threshold: float
    frozen: bool


def _read_only(name: str):
    def refuse(self, value):
        # assigning used to create a plain attribute the rule never read: a silent no-op
        raise AttributeError(f"GradESOptimizer.{name} is fixed at construction (the rule's state and readings "
                             f"depend on it); build a new GradESOptimizer with {name}={value!r}. Only tau can "
                             "change during a run")
    return refuse


class GradESOptimizer(torch.optim.Optimizer):
    r"""Wraps an already-built optimizer and freezes each projection matrix once it has converged.

    At every ``check_interval``-th step the wrapper really takes, it measures each live component's
    gradient magnitude ``m_c`` (see ``metric``/``reduction``) and, once the grace period is over,
    freezes a component after ``patience`` consecutive checks with ``m_c < τ``. A frozen matrix
    gets no update, no weight decay and no moment update, its optimizer state is released and,
    where safe, ``requires_grad=False`` spares its weight-gradient GEMM (gradients still flow
    through it). ``should_stop`` turns True when the frozen fraction reaches ``max_frozen_ratio``.

    Args:
        optimizer: the inner ``torch.optim.Optimizer`` (any class), built over the model's params.
        model: the model; its projection matrices are discovered automatically.
        components: explicit ``{name: Parameter | Module | [Parameter] | (kind, ...)}`` instead.
        matcher: regex or ``callable(name) -> kind | bool | None`` replacing the default table.
        tau: threshold τ > 0 (absolute units of the metric, or a fraction with ``tau_mode="relative"``).
        alpha: grace period as a fraction of ``total_steps`` in [0, 1) (the paper's α).
        total_steps: planned optimizer steps; needed with ``alpha > 0``.
        grace_steps: grace period in steps (alternative to ``alpha``). Default 0.
        check_interval: measure every this many steps. Default 1.
        metric: ``"grad_l1"`` (paper v1, default), ``"grad_l2"``, ``"grad_delta_l1"`` (paper v3,
            ‖g_t − g_{t−1}‖₁, keeps one previous gradient per tracked matrix) or
            ``"weight_delta_l1"`` (what the released code measures, ‖W_t − W_{t−k}‖₁ since the previous
            check) or ``"update_snr"`` (Adam-family inners: mean |m̂/(√v̂+ε)|, the update per unit of
            learning rate; independent of the LR schedule and of the parameter scale, see README
            "Choosing τ").
        reduction: ``"mean"`` (default: per element, so one τ fits matrices of every size) or
            ``"sum"`` (the paper's and released code's unnormalised sum).
        patience: consecutive checks below threshold before freezing. Default 1 (the paper).
        ema: smoothing factor β in [0, 1) for an EMA of the metric; 0 disables (the paper).
        peak_gate: a fraction g in [0, 1]: a reading counts as converged only while the
            component's gradient L1 (smoothed with the same EMA) is below ``g ×`` its running peak,
            so a matrix whose gradient has not fallen yet is never frozen (0 disables, the paper).
            Costs one gradient L1 reduction per check beside the metric's.
        tau_mode: ``"absolute"`` (the paper) or ``"relative"``: scale-free, freeze when the
            metric falls below ``tau ×`` its own mean over the grace period.
        max_frozen_ratio: ``should_stop`` once this fraction of components is frozen. Default 1.0.
        freeze_mode: ``"requires_grad"`` (skip + ``requires_grad=False``), ``"skip"`` (never
            touches ``requires_grad``; safe under DDP and compiled graphs) or ``"auto"``.
        impl: ``"auto"``, ``"torch"`` or ``"triton"`` for the reductions and, with AdamW/Adam/SGD and
            a gradient metric, the fused step (``opt.fast_path``/``fast_path_reason`` say which ran).
        record_history: keep one :class:`CheckRecord` per component per check in ``history``: about
            the latest N records (an int; default ``DEFAULT_HISTORY`` = 200,000, ~160 bytes each),
            every record (``True``: grows without bound) or none (``False``). ``last_check`` always
            holds the latest check's records and ``timeline()`` each component's freeze step and
            latest reading, whatever the bound.
        process_group: the ranks that must agree on freeze decisions (default: the default group
            when ``torch.distributed`` is initialized); one small all-reduce per check.

    Example::

        opt = GradESOptimizer(torch.optim.AdamW(model.parameters(), lr=2e-5), model=model,
                              tau=1e-6, alpha=0.3, total_steps=1000)
        for batch in loader:
            model(**batch).loss.backward()
            opt.step(); opt.zero_grad()
            if opt.should_stop:
                break
    """

    # The wrapper needs unscaled gradients to measure: GradScaler must unscale before step() and
    # skip step() on overflow. Never copy the inner's flag (a fused inner would get scaled grads).
    _step_supports_amp_scaling = False
    _is_grades_wrapper = True  # construct.validate_inner refuses to wrap a wrapper

    def __init__(self, optimizer: torch.optim.Optimizer, *, model: Optional[nn.Module] = None,
                 components=None, matcher=None, tau: Optional[float] = None, alpha: Optional[float] = None,
                 total_steps: Optional[int] = None, grace_steps: Optional[int] = None,
                 check_interval: Optional[int] = None, metric: Optional[str] = None,
                 reduction: Optional[str] = None, patience: Optional[int] = None,
                 ema: Optional[float] = None, tau_mode: Optional[str] = None,
                 peak_gate: Optional[float] = None, max_frozen_ratio: float = 1.0,
                 freeze_mode: str = "auto", impl: str = "auto", record_history=DEFAULT_HISTORY,
                 process_group=None):
        construct.validate_inner(optimizer)
        has_moments = all("betas" in g and "eps" in g for g in optimizer.param_groups)
        n = construct.plain_numbers(dict(tau=tau, alpha=alpha, total_steps=total_steps, grace_steps=grace_steps,
                                         check_interval=check_interval, patience=patience, ema=ema,
                                         peak_gate=peak_gate, max_frozen_ratio=max_frozen_ratio))
        tau, alpha, total_steps, grace_steps = n["tau"], n["alpha"], n["total_steps"], n["grace_steps"]
        check_interval, patience, ema, max_frozen_ratio = (n["check_interval"], n["patience"], n["ema"],
                                                           n["max_frozen_ratio"])
        peak_gate = n["peak_gate"]
        d = defaults.resolve(dict(tau=tau, check_interval=check_interval, metric=metric, reduction=reduction,
                                  patience=patience, ema=ema, tau_mode=tau_mode, peak_gate=peak_gate,
                                  alpha=alpha if alpha is not None or grace_steps is None else 0.0),
                             has_moments)
        tau, check_interval, metric, reduction = d["tau"], d["check_interval"], d["metric"], d["reduction"]
        patience, ema, tau_mode, peak_gate = d["patience"], d["ema"], d["tau_mode"], d["peak_gate"]
        grace_steps = 0 if grace_steps is None else grace_steps
        # a default alpha > 0 without total_steps waits for set_total_steps() (trainers call it)
        self._pending_alpha = d["alpha"] if alpha is None and total_steps is None and d["alpha"] > 0 else None
        alpha = 0.0 if self._pending_alpha is not None else d["alpha"]
        construct.validate(tau=tau, alpha=alpha, total_steps=total_steps, grace_steps=grace_steps,
                           check_interval=check_interval, metric=metric, reduction=reduction,
                           patience=patience, ema=ema, tau_mode=tau_mode, peak_gate=peak_gate,
                           max_frozen_ratio=max_frozen_ratio,
                           freeze_mode=freeze_mode, impl=impl, record_history=record_history)
        if metric in mag.MOMENT_METRICS and not has_moments:
            raise ValueError(f"Invalid metric: {metric!r} reads Adam's moments (exp_avg, exp_avg_sq, betas, eps); "
                             f"{type(optimizer).__name__} has none. Use an Adam-family inner optimizer or "
                             "metric='weight_delta_l1'")
        self._inner = optimizer
        for name in ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks",
                     "_optimizer_state_dict_pre_hooks", "_optimizer_state_dict_post_hooks",
                     "_optimizer_load_state_dict_pre_hooks", "_optimizer_load_state_dict_post_hooks"):
            setattr(self, name, OrderedDict())
        self._patch_step_function()
        self.alpha, self.total_steps = float(alpha), total_steps
        self._check_interval, self._metric, self._reduction = check_interval, metric, reduction
        self.max_frozen_ratio, self.record_history = float(max_frozen_ratio), record_history
        self._grace_steps_arg = grace_steps
        self._cfg = RuleConfig(tau=float(tau), grace_steps=self._resolve_grace(), patience=patience,
                               ema=float(ema), tau_mode=tau_mode, peak_gate=float(peak_gate))
        self.impl = construct.resolve_impl(impl)
        self.process_group = process_group
        self.components: list[Component] = construct.resolve_components(
            construct.specs_for(model, components, matcher, optimizer), optimizer)
        self.freeze_mode, self.freeze_mode_reason = construct.resolve_freeze_mode(
            freeze_mode, model, optimizer, dist_utils.resolve_group(process_group))
        self._tracked_lengths = {g: len(self.param_groups[g]["params"]) for comp in self.components
                                 for g, _ in comp.positions}
        self._states = [ComponentState() for _ in self.components]
        self._last = [None] * len(self.components)  # each component's latest CheckRecord
        self._freeze_version = 0  # bumped whenever the freeze set changes: the _Layout cache key
        self._layout_cache: Optional[_Layout] = None
        self._owner_plan: Optional[tuple] = None  # (key, magnitudes.OwnerPlan) of the last measured set
        self._copy_bufs: dict = {}  # slot -> (key, buffers): the metrics' weight / gradient copies, reused
        self._step = 0
        self.history: list[CheckRecord] = []
        self.last_check: list[CheckRecord] = []  # the live components' records of the latest check
        self.released_state_bytes = 0
        self.nonfinite_readings = 0  # component readings that were NaN/Inf (never count as converged)
        self._warned_unmeasured = False  # said once: live components without any reading after grace
        self.guard_burst = 0  # components that froze together right after the grace period (if > half)
        self.guard_nothing_frozen = False  # nothing frozen by GUARD_NOTHING_AT of total_steps
        if all(k in g for g in self.param_groups for k in _KEYS) and self._layout_error(self.param_groups) is None:
            # the inner already carries GradES state (a GradES checkpoint loaded into it): taken
            # over, never silently, and only from a run with the same rule settings
            error = self._saved_state_error(self.param_groups)
            if error is not None:
                raise ValueError(error.replace("state_dict", "the inner optimizer's param_groups", 1))
            self._adopt_groups()
            logger.warning("GradES: the inner optimizer's param_groups carry GradES state (a GradES checkpoint "
                           "loaded into it): continuing that run at step %d with %d of %d components frozen. "
                           "To start afresh, build the inner optimizer anew or load the checkpoint into "
                           "this wrapper instead", self._step, sum(c.frozen for c in self.components),
                           len(self.components))
        self._write_groups()
        # fast_path / fast_path_reason: which step runs (grades_optim.fused_step decides, per step)
        self._fused = fused_step.attach(self)

    # -- delegation --------------------------------------------------------------------------
    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self._inner

    @property
    def param_groups(self):
        return self._inner.param_groups

    @param_groups.setter
    def param_groups(self, value):
        self._inner.param_groups = value

    @property
    def state(self):
        return self._inner.state

    @state.setter
    def state(self, value):
        self._inner.state = value

    @property
    def defaults(self):
        return self._inner.defaults

    @defaults.setter
    def defaults(self, value):
        self._inner.defaults = value

    # -- the rule's settings: one source (the rule config), validated when set --------------------
    @property
    def tau(self) -> float:
        return self._cfg.tau

    @tau.setter
    def tau(self, value) -> None:
        """A new threshold from the next check on (e.g. a schedule for τ); validated like the constructor's."""
        value = construct.plain_numbers({"tau": value})["tau"]
        construct.validate_tau(value, self._cfg.tau_mode)
        self._cfg = dataclasses.replace(self._cfg, tau=float(value))

    patience = property(lambda self: self._cfg.patience, _read_only("patience"))
    ema = property(lambda self: self._cfg.ema, _read_only("ema"))
    tau_mode = property(lambda self: self._cfg.tau_mode, _read_only("tau_mode"))
    peak_gate = property(lambda self: self._cfg.peak_gate, _read_only("peak_gate"))
    metric = property(lambda self: self._metric, _read_only("metric"))
    reduction = property(lambda self: self._reduction, _read_only("reduction"))
    check_interval = property(lambda self: self._check_interval, _read_only("check_interval"))

    def __getstate__(self):
        return self.__dict__.copy()

    def __setstate__(self, state):
        self.__dict__.update(state)

    def __repr__(self) -> str:
        s = self.summary()
        return (f"GradESOptimizer({type(self._inner).__name__}, tau={self.tau:g}, metric={self.metric!r}, "
                f"tracked={s['tracked']}, frozen={s['frozen']}, step={s['step']})")

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._inner.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict) -> None:
        """Add a group to the inner optimizer; its parameters are not tracked components."""
        self._inner.add_param_group(param_group)
        if "grades_cid" in self.param_groups[0]:  # construction finished: extend the bookkeeping
            self._write_groups()

    # -- public state ----------------------------------------------------------------------
    @property
    def step_count(self) -> int:
        """Optimizer steps the wrapper really took (GradScaler-skipped and DCP dry steps excluded)."""
        return self._step

    @property
    def grace_steps(self) -> int:
        return self._cfg.grace_steps

    @property
    def should_stop(self) -> bool:
        layout = self._layout()
        return stop_reached(len(self.components) - len(layout.live_cids), len(self.components),
                            self.max_frozen_ratio)

    def timeline(self) -> list[dict]:
        """Per component: name, kind, the step it froze at (``None`` while it trains) and its latest
        :class:`CheckRecord` (``None`` before its first check). Complete whatever ``record_history``."""
        return [dict(name=c.name, kind=c.kind, frozen_at_step=c.frozen_at_step, last=last)
                for c, last in zip(self.components, self._last)]

    def set_total_steps(self, total_steps: int) -> None:
        """Set the planned number of steps (e.g. from a trainer) and re-derive the grace period."""
        if not construct.is_int(total_steps) or total_steps < 1:
            raise ValueError(f"Invalid total_steps: {total_steps!r}; expected an int >= 1")
        self.total_steps = total_steps
        if self._pending_alpha is not None:
            self.alpha, self._pending_alpha = float(self._pending_alpha), None
        self._cfg = dataclasses.replace(self._cfg, grace_steps=self._resolve_grace())

    def summary(self) -> dict:
        frozen = [c for c in self.components if c.frozen]
        tracked = len(self.components)
        return {
            "tracked": tracked,
            "frozen": len(frozen),
            "frozen_ratio": len(frozen) / tracked if tracked else 0.0,
            "frozen_numel": sum(c.numel for c in frozen),
            "tracked_numel": sum(c.numel for c in self.components),
            "step": self._step,
            "released_state_bytes": self.released_state_bytes,
            "nonfinite_readings": self.nonfinite_readings,
            "never_measured": len(self._never_measured()),
            "freeze_mode": self.freeze_mode,
            "should_stop": self.should_stop,
            "guard_nothing_frozen": self.guard_nothing_frozen,
            "guard_burst_after_grace": self.guard_burst,
            "grace_pending_total_steps": self._pending_alpha is not None,
        }

    # -- the step --------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if "grades_cid" not in self.param_groups[0]:
            self._write_groups()  # groups were replaced behind our back (inner.load_state_dict)
        self._apply_freezes()
        if self._is_dry_step():
            # torch.distributed.checkpoint's state initialisation: zero grads, lr=0. Let the inner
            # optimizer build its state, but it is not a training step and measures nothing.
            self._masked_inner_step()
            return loss
        self._step += 1
        try:
            values = self._stepped()
        except BaseException:
            self._step -= 1  # a step that raised (a caught OOM, an interrupt) is not counted
            raise
        if values is not None:
            self._check(values, self._gate_readings(values) if self._cfg.peak_gate else None)
        for group in self.param_groups:
            group["grades_step"] = self._step
        return loss

    def _stepped(self) -> Optional[list]:
        """The step itself, fused or through the inner optimizer; the metric's readings at checks."""
        if self._step == 1 and self._pending_alpha is not None:
            logger.warning("GradES: the default grace period (alpha=%g of total_steps) waits for total_steps; none "
                           "was given, so there is no grace period. Pass total_steps= (or call "
                           "set_total_steps)", self._pending_alpha)
        check = self._step % self.check_interval == 0
        fused = self._fused(check) if self._fused is not None else None
        if fused is not None:  # tracked matrices stepped by the fused kernel, metric from the same pass
            live, sums = fused
            return self._measure([p.grad for _, p in live], live, sums=sums) if check else None
        return self._reference_step(check)

    def _reference_step(self, check: bool) -> Optional[list]:
        """Measure with the torch/Triton reductions, step through the inner optimizer; readings at checks."""
        window = self._weight_window()
        need = check or window.opens or self.metric == "grad_delta_l1"
        live = self._live_tracked_with_grad() if need else []
        values = None
        if check and self.metric in ("grad_l1", "grad_l2"):
            values = self._measure([p.grad for _, p in live], live)
        elif check and self.metric == "grad_delta_l1":
            values = self._measure_grad_delta(live)
        window.open(live)
        before = None
        if check and self.metric == "weight_delta_l1":
            live, before = self._weight_delta_inputs(live, window)
        self._masked_inner_step()
        if before is not None:
            values = self._measure([p.detach() for _, p in live], live, before)
        elif check and self.metric in mag.MOMENT_METRICS:
            values = self._measure_update_snr(live)
        window.close(check)
        if self.metric == "grad_delta_l1":
            self._keep_prev_grads(live)
        return values

    def _weight_window(self) -> "_WeightWindow":
        return _WeightWindow(self, self.metric == "weight_delta_l1" and self.check_interval > 1)

    def _weight_delta_inputs(self, live, window: "_WeightWindow"):
        """The (component, param) pairs that get a weight-delta reading now, and their 'before' weights."""
        still = {id(p) for g in self._zero_lr_groups() for p in self.param_groups[g]["params"]}
        live = [(c, p) for c, p in live if id(p) not in still]
        if not window.active:
            return live, self._reused_copies("weight", live, [p.detach() for _, p in live])
        # a matrix that had no gradient when the window opened has no reading
        live = [(c, p) for c, p in live if _PREV_WEIGHT in self.state.get(p, {})]
        return live, [self.state[p][_PREV_WEIGHT] for _, p in live]

    def _reused_copies(self, slot: str, live, tensors) -> list:
        """Copies of ``tensors`` (one per ``live`` pair), written into the buffers this slot made last time.

        ``magnitudes.CopyBuffers``: a few ops instead of a clone per tensor; the buffers are kept while
        the layout and the set of params are unchanged, so the peak memory is that of the clones.
        DTensor (FSDP2) shards are cloned, keeping their placement.
        """
        if tensors and hasattr(tensors[0], "to_local"):  # DTensor shards: clones keep their placement
            return [t.detach().clone() for t in tensors]
        key = (self._layout(), tuple(id(p) for _, p in live))
        cached = self._copy_bufs.pop(slot, None)  # dropped first: a rebuild never holds two sets
        if cached is not None and cached[0][0] is key[0] and cached[0][1] == key[1]:
            try:
                copies = cached[1].refill(tensors)
                self._copy_bufs[slot] = cached
                return copies
            except RuntimeError:  # a storage swapped for another shape: new buffers
                pass
        del cached
        bufs = mag.CopyBuffers(tensors)
        self._copy_bufs[slot] = (key, bufs)
        return bufs.copies

    def _zero_lr_groups(self) -> set:
        """Indices of the groups stepping at lr=0 now (the first step of a linear warm-up).

        Such a step moves nothing: a weight delta of exactly 0.0 there is no reading, not
        convergence. Called at checks only: reading a GPU lr syncs, as the check does anyway.
        """
        return {g for g, group in enumerate(self.param_groups)
                if group.get("lr") is not None and float(group["lr"]) == 0.0}

    def _live_tracked_with_grad(self):
        """(component index, param) of every tracked, unfrozen parameter that has a gradient."""
        out = [(c, p) for c, p in self._layout().live if p.grad is not None]
        for c, p in out:
            if p.grad.is_sparse:
                raise ValueError(
                    f"Sparse gradient for {self.components[c].name}: GradES measures dense projection-matrix "
                    "gradients; exclude this parameter from the components (matcher=/components=)")
        return out

    def _measure(self, tensors, live, others=None, sums=None, ord=None) -> list[Optional[float]]:
        group = dist_utils.resolve_group(self.process_group)
        owners = [c for c, _ in live]
        # the owner plan depends only on which params are measured (their sizes, devices, shards):
        # kept while the layout and that set are unchanged, so a check costs no per-tensor Python
        key = (self._layout(), id(group), tuple(map(id, (p for _, p in live))))
        cached = self._owner_plan
        if cached is None or cached[0][0] is not key[0] or cached[0][1:] != key[1:]:
            cached = self._owner_plan = (key, mag.OwnerPlan(tensors, owners, len(self.components), group))
        ord = mag.METRIC_ORD[self.metric] if ord is None else ord
        return mag.component_magnitudes(tensors, owners, len(self.components), ord,
                                        self.reduction, impl=self.impl, group=group, others=others, sums=sums,
                                        plan=cached[1])

    def _measure_grad_delta(self, live):
        have = [(c, p) for c, p in live if _PREV_GRAD in self.state.get(p, {})]
        # the first check has no previous gradient: nothing measured (every rank still joins)
        return self._measure([p.grad for _, p in have], have, [self.state[p][_PREV_GRAD] for _, p in have])

    def _measure_update_snr(self, live):
        need, state = mag.MOMENT_METRICS[self.metric], self.state
        get = state.get  # one lookup per param (tensor hashing is Python-level)
        have = [(c, p) for c, p in live if (st := get(p)) is not None and all(k in st for k in need)]
        where = self._layout().group_of
        hyper = [(tuple(g["betas"]), float(g["eps"])) for g in self.param_groups]  # per group, not per param
        params = [p for _, p in have]
        per_param = [hyper[where[id(p)]] for p in params]
        sums = mag.update_snr_sums(params, [state[p] for p in params], [h[0] for h in per_param],
                                   [h[1] for h in per_param])
        return self._measure(params, have, sums=sums)

    def _gate_readings(self, values) -> list[Optional[float]]:
        # peak_gate's reading is the gradient L1 (the same reduction), taken after the step: the
        # gradients are still there on both paths, and every rank measures at every check
        if self.metric == "grad_l1":
            return values
        live = self._live_tracked_with_grad()
        return self._measure([p.grad for _, p in live], live, ord=mag.METRIC_ORD["grad_l1"])

    def _keep_prev_grads(self, live) -> None:
        # Only the gradient of the step right before a check is needed.
        # Frozen components' copies went at their freeze (_freeze pops them), so live ones suffice.
        keep = (self._step + 1) % self.check_interval == 0
        have = [(c, p) for c, p in live if p.grad is not None] if keep else []
        copies = self._reused_copies("grad", have, [p.grad for _, p in have]) if have else []
        state = self.state
        for (_, p), copy in zip(have, copies):
            state[p][_PREV_GRAD] = copy
        live_params = self._layout().live
        if len(have) < len(live_params):  # the others' copies go (all of them between checks)
            kept = {id(p) for _, p in have}
            for _, p in live_params:
                st = state.get(p)
                if st and _PREV_GRAD in st and id(p) not in kept:
                    del st[_PREV_GRAD]

    def _check(self, values: list[Optional[float]], gates: Optional[list] = None) -> None:
        live = self._layout().live_cids  # the rule runs over live components only: frozen is final
        bad = [self.components[c].name for c in live
               if values[c] is not None and not math.isfinite(values[c])]
        if bad:  # reported, never read as converged (the rule skips the reading)
            self.nonfinite_readings += len(bad)
            logger.warning("GradES step %d: non-finite gradient magnitude for %d component(s) (%s); "
                           "they are not frozen on this reading", self._step, len(bad), ", ".join(bad[:5]))
        newly, records = [], []
        step, cfg, states, last, nan = self._step, self._cfg, self._states, self._last, float("nan")
        comps, new = self.components, tuple.__new__  # records from plain tuples: per component per check
        for c in live:
            comp, metric = comps[c], values[c]
            state, value, threshold = decide(states[c], metric, step, cfg, None if gates is None else gates[c])
            states[c] = state
            frozen = state[0] is not None  # frozen_at
            if frozen:
                newly.append(c)
            last[c] = record = new(CheckRecord, (step, comp.name, comp.kind, nan if metric is None else metric,
                                                 nan if value is None else value,
                                                 nan if threshold is None else threshold, frozen))
            records.append(record)
        self.last_check = records
        if not self._warned_unmeasured and self._step > self.grace_steps:
            self._warn_unmeasured()
        if self.record_history:
            self.history.extend(records)
            limit = self.record_history if construct.is_int(self.record_history) else None
            if limit is not None and len(self.history) > 2 * limit:  # trim in batches: amortised O(1)
                del self.history[:-limit]
        frozen_before = len(self.components) - len(live)
        self._guards(len(newly), frozen_before)
        if newly:
            for c in newly:
                self.components[c].frozen_at_step = step
                self._freeze(self.components[c])
            self._freeze_version += 1
            self._write_frozen(newly)
            logger.info("GradES step %d: froze %s (%d/%d frozen)", self._step,
                        ", ".join(self.components[c].name for c in newly), frozen_before + len(newly),
                        len(self.components))

    def _guards(self, newly: int, frozen_before: int) -> None:
        """Say when the freeze decisions look uninformative (README "Choosing τ")."""
        n = len(self.components)
        early = self.grace_steps + self._cfg.patience * self.check_interval
        if newly and frozen_before == 0 and self._step <= early and newly > GUARD_BURST * n:
            self.guard_burst = newly
            logger.warning("GradES step %d: %d of %d components froze at the first checks after the grace period "
                           "(%d steps): the threshold is too loose for this run (tau=%g, metric=%s); lower tau or "
                           "see README 'Choosing tau'", self._step, newly, n, self.grace_steps, self.tau,
                           self.metric)
        if (not self.guard_nothing_frozen and self.total_steps and frozen_before + newly == 0
                and self._step >= GUARD_NOTHING_AT * self.total_steps):
            self.guard_nothing_frozen = True
            logger.warning("GradES step %d of %d: nothing has frozen yet; with tau=%g (metric=%s, tau_mode=%s) the "
                           "run will likely train to the end. Raise tau, or see README 'Choosing tau'",
                           self._step, self.total_steps, self.tau, self.metric, self._cfg.tau_mode)

    def _never_measured(self) -> list:
        """Live components that have not had one usable reading yet (no gradient, or NaN/Inf)."""
        return [c for c, st in zip(self.components, self._states) if not c.frozen and st.smoothed is None]

    def _warn_unmeasured(self) -> None:
        # A matrix that never gets a gradient can never freeze, so should_stop would stay False
        # for the whole run without a word; say so once, when the grace period is over.
        self._warned_unmeasured = True
        missing = self._never_measured()
        if missing:
            logger.warning("GradES step %d: %d of %d tracked components have had no usable gradient reading "
                           "yet (%s); they cannot freeze, so should_stop stays False until they do. If they "
                           "never receive gradients, leave them out with matcher= or components=",
                           self._step, len(missing), len(self.components), _short(c.name for c in missing))

    # -- freezing --------------------------------------------------------------------------
    def _freeze(self, comp: Component) -> None:
        params = [self.param_groups[g]["params"][i] for g, i in comp.positions]
        for p in params:
            st = self.state.get(p)
            if st:  # the metric's own copies go too, whatever their size
                st.pop(_PREV_GRAD, None)
                st.pop(_PREV_WEIGHT, None)
            self.released_state_bytes += _release_state(self.state, p)
        self._apply_freezes(params)

    def _apply_freezes(self, params=None) -> None:
        # Re-asserted every step: PEFT set_adapter, Lightning's toggling and user code can flip
        # requires_grad back on, and a stale compiled graph may still produce a gradient.
        # Two attribute reads per frozen parameter while nothing flipped.
        toggle = self.freeze_mode == "requires_grad"
        for p in self._layout().frozen if params is None else params:
            if p.grad is not None:
                p.grad = None
            if toggle and p.requires_grad:
                p.requires_grad_(False)

    def _masked_inner_step(self, hide_tracked: bool = False) -> None:
        """Run the inner step with frozen (or, for the fused path, all tracked) parameters taken out of its groups.

        Setting ``grad=None`` is enough for torch optimizers, but optimizers that treat a missing
        gradient as zero would still decay or move a frozen matrix; hiding the parameter is the
        one way that keeps it bit-identical under every inner optimizer.
        """
        layout = self._layout()
        shown = layout.untracked if hide_tracked else layout.unfrozen
        saved = []
        for group, params in zip(self.param_groups, shown):
            if params is not None:  # None: the group shows every parameter as it is
                saved.append((group, group["params"]))
                group["params"] = params
        try:
            self._inner.step()
        finally:
            for group, params in saved:
                group["params"] = params

    def _is_dry_step(self) -> bool:
        groups = self.param_groups
        for g in groups:
            lr = g.get("lr")
            # DCP's dry step uses lr=0.0 or a CPU tensor; reading a GPU lr would be a host sync.
            if lr is None or (torch.is_tensor(lr) and lr.device.type != "cpu") or float(lr) != 0.0:
                return False
        grads = [dist_utils.local(p.grad) for g in groups for p in g["params"] if p.grad is not None]
        zero = bool(grads) and all(float(n) == 0.0 for n in torch._foreach_norm(grads, 1))
        # ranks must agree, or one would skip the check's collective (an empty shard reads zero)
        device = grads[0].device if grads else torch.device("cpu")
        return dist_utils.all_true(zero, device, dist_utils.resolve_group(self.process_group))

    # -- checkpoints -----------------------------------------------------------------------
    def state_dict(self) -> dict:
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        self._write_groups()
        sd = self._inner.state_dict()
        for hook in self._optimizer_state_dict_post_hooks.values():
            out = hook(self, sd)
            sd = sd if out is None else out
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a wrapper state dict (restores the freeze set) or a plain inner one (nothing frozen)."""
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            out = hook(self, state_dict)
            state_dict = state_dict if out is None else out
        has_grades = self.check_state_dict(state_dict)  # refused before anything is loaded
        self._inner.load_state_dict(state_dict)
        if has_grades:
            self._adopt_groups()
        else:
            self._step, self._states = 0, [ComponentState() for _ in self.components]
            self._last = [None] * len(self.components)
            for comp in self.components:
                if comp.frozen and self.freeze_mode == "requires_grad":  # undo what we froze
                    for g, i in comp.positions:
                        self.param_groups[g]["params"][i].requires_grad_(True)
                comp.frozen_at_step = None
            self._freeze_version += 1
        self._write_groups()
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def check_state_dict(self, state_dict: dict) -> bool:
        """Raise ``ValueError`` if ``state_dict`` cannot be loaded, modifying nothing; else return
        whether it carries GradES state (``load_state_dict`` and ``load_checkpoint`` call it first)."""
        saved_groups = _check_state_dict(state_dict, self.param_groups, type(self._inner).__name__)
        has_grades = all(k in g for g in saved_groups for k in _KEYS)
        error = (self._layout_error(saved_groups) or self._saved_state_error(saved_groups)) if has_grades else None
        if error is not None:
            raise ValueError(error)
        return has_grades

    def restore_records(self, history, last=None) -> None:
        """Restore ``history`` and each component's latest record from a checkpoint's plain tuples
        (``grades_optim.checkpoint``); ``last`` of another length (an old checkpoint) is ignored."""
        self.history[:] = [CheckRecord(*r) for r in history]
        if last is not None and len(last) == len(self.components):
            self._last = [None if r is None else CheckRecord(*r) for r in last]

    def _layout(self) -> "_Layout":
        """The cached :class:`_Layout`; rebuilt when the groups or the freeze set changed."""
        cached = self._layout_cache
        if cached is None or not cached.valid(self.param_groups, self._freeze_version):
            cached = self._layout_cache = _Layout(self)
        return cached

    def _layout_error(self, saved_groups) -> Optional[str]:
        layout = self._layout()
        for g, (saved, cid, numel) in enumerate(zip(saved_groups, layout.cid, layout.numel)):
            for key, mine in (("grades_cid", cid), ("grades_numel", numel)):
                if list(saved[key]) != mine:
                    return (f"state_dict is from a different parameter layout: param_groups[{g}]['{key}'] is "
                            f"{_short(saved[key])}, this optimizer has {_short(mine)}. Build the model, the "
                            "inner optimizer and the GradES components exactly as for the saved run")
        return None

    def _rule_settings(self) -> list:
        """What a checkpoint's rule state depends on (``tau`` and ``patience`` may change between runs)."""
        return [self.metric, self.reduction, self._cfg.tau_mode, self._cfg.ema, self._cfg.peak_gate]

    def _saved_state_error(self, saved_groups) -> Optional[str]:
        """Why saved GradES state cannot be taken over, or None: other rule settings, or a format
        this version cannot read. Checked before anything is loaded."""
        saved = saved_groups[0].get("grades_rule")  # absent from checkpoints written before it was kept
        if saved is not None:
            mine = self._rule_settings()
            diff = [f"{name}={a!r} there, {b!r} here" for name, a, b in zip(_RULE_FIELDS, list(saved), mine)
                    if a != b]
            if diff or len(saved) != len(mine):
                return (f"state_dict was saved with other GradES rule settings ({'; '.join(diff) or saved}): its "
                        "smoothed readings and references mean something else under these. Build the "
                        "GradESOptimizer with the saved settings, or drop the grades_* keys from its "
                        "param_groups to load the optimizer state with nothing frozen")
        n_fields = len(ComponentState._fields)
        for g, group in enumerate(saved_groups):
            for i, st in enumerate(group["grades_state"]):
                if st is None:
                    continue
                if (not isinstance(st, (list, tuple)) or not 1 <= len(st) <= n_fields
                        or not (st[0] is None or construct.is_int(st[0]))):
                    shown = _short(st) if isinstance(st, (list, tuple)) else repr(st)
                    return (f"state_dict param_groups[{g}]['grades_state'][{i}] is {shown}: not a component "
                            f"state this grades_optim can read (at most {n_fields} numbers, the first a step "
                            "or None; saved by another version?)")
        return None

    def _write_groups(self) -> None:
        """Write every ``grades_*`` key into the inner groups (state_dict, construction, loads)."""
        layout = self._layout()
        counters = [self.released_state_bytes, self.nonfinite_readings]
        for group, ids, numel in zip(self.param_groups, layout.cid, layout.numel):
            group["grades_step"] = self._step
            group["grades_cid"] = list(ids)
            group["grades_numel"] = list(numel)
            group["grades_state"] = [list(self._states[c]) if c >= 0 else None for c in ids]
            group["grades_counters"] = list(counters)
            group["grades_rule"] = self._rule_settings()

    def _write_frozen(self, cids) -> None:
        """After a freeze: only the frozen components' entries (and the counters) change."""
        groups = self.param_groups
        if any("grades_state" not in g for g in groups):
            self._write_groups()
            return
        for c in cids:
            for g, i in self.components[c].positions:
                groups[g]["grades_state"][i] = list(self._states[c])
        for group in groups:
            group["grades_counters"] = [self.released_state_bytes, self.nonfinite_readings]

    def _adopt_groups(self) -> None:
        """Take the step counter and rule states from the groups, then re-apply the freeze set."""
        self._step = int(self.param_groups[0]["grades_step"])
        # absent from checkpoints written before these counters were kept: they restart at 0
        self.released_state_bytes, self.nonfinite_readings = self.param_groups[0].get("grades_counters", [0, 0])
        for c, comp in enumerate(self.components):
            g, i = comp.positions[0]
            self._states[c] = ComponentState(*self.param_groups[g]["grades_state"][i])
            comp.frozen_at_step = self._states[c].frozen_at
            if comp.frozen:
                for g, i in comp.positions:
                    _release_state(self.state, self.param_groups[g]["params"][i])
        self._last = [None] * len(self.components)
        self._freeze_version += 1
        self._apply_freezes()

    def _resolve_grace(self) -> int:
        if self.alpha > 0:
            if self.total_steps is None:
                raise ValueError(f"Invalid alpha: {self.alpha} needs total_steps (the grace period is "
                                 "alpha × total_steps); pass total_steps= or use grace_steps= instead")
            return int(self.alpha * self.total_steps)
        return self._grace_steps_arg


# -- helpers -------------------------------------------------------------------------------
class _Layout:
    """What a step needs from the components, the groups and the freeze set, computed once.

    Valid while the inner optimizer has the same group dicts holding the same ``params`` lists
    of the same lengths, and the freeze set is unchanged (``GradESOptimizer._freeze_version``):
    ``add_param_group``, ``load_state_dict`` (new group dicts) and accelerate's parameter swap
    (new ``params`` lists) all rebuild it. Checking that costs O(groups) per step.

    Attributes: per group ``cid`` (each param's component index, -1 untracked) and ``numel``;
    ``live_cids`` (unfrozen components) and ``live`` (their ``(component, param)`` pairs);
    ``frozen`` (frozen components' params); per group ``unfrozen`` / ``untracked`` (the params
    lists the masked inner step shows, or ``None`` when the group shows all); ``group_of``
    (``id(param)`` -> group index).
    """

    __slots__ = ("refs", "version", "cid", "numel", "live_cids", "live", "frozen", "unfrozen", "untracked",
                 "group_of")

    def __init__(self, opt: "GradESOptimizer"):
        groups = opt.param_groups
        for g, n in opt._tracked_lengths.items():  # components address params by position
            have = len(groups[g]["params"]) if g < len(groups) else None
            if have != n:
                raise ValueError(
                    f"The inner optimizer's param_groups[{g}] now holds {have} params (it held {n} when GradES was "
                    "built): the tracked components address their parameters by position, so they would "
                    "point at other tensors. Remove or add parameters by building the inner optimizer and "
                    "the GradESOptimizer anew (add_param_group is fine: new groups are untracked)"
                    if have is not None else
                    f"The inner optimizer lost param_groups[{g}], which holds tracked components; build the "
                    "inner optimizer and the GradESOptimizer anew")
        self.refs = [(g, g["params"], len(g["params"])) for g in groups]
        self.version = opt._freeze_version
        self.cid = [[-1] * len(g["params"]) for g in groups]
        for c, comp in enumerate(opt.components):
            for g, i in comp.positions:
                self.cid[g][i] = c
        self.numel = [[int(p.numel()) for p in g["params"]] for g in groups]
        comps = opt.components
        self.live_cids = [c for c, comp in enumerate(comps) if not comp.frozen]
        self.live = [(c, groups[g]["params"][i]) for c in self.live_cids for g, i in comps[c].positions]
        self.frozen = [groups[g]["params"][i] for comp in comps if comp.frozen for g, i in comp.positions]
        self.unfrozen, self.untracked = [], []
        for group, ids in zip(groups, self.cid):
            params = group["params"]
            shown = [p for p, c in zip(params, ids) if c < 0 or not comps[c].frozen]
            bare = [p for p, c in zip(params, ids) if c < 0]
            self.unfrozen.append(None if len(shown) == len(params) else shown)
            self.untracked.append(None if len(bare) == len(params) else bare)
        self.group_of = {id(p): g for g, group in enumerate(groups) for p in group["params"]}

    def valid(self, groups, version: int) -> bool:
        refs = self.refs
        if version != self.version or len(groups) != len(refs):
            return False
        for group, (g, params, n) in zip(groups, refs):
            if group is not g or group["params"] is not params or len(params) != n:
                return False
        return True


class _WeightWindow:
    """weight_delta_l1 with check_interval k > 1: W_t - W_{t-k}, as the released code measures it.

    The weights are copied at the first step after each check (before that step's update) and
    the copies dropped at the next check. Copies are made before the inner step but stored in the
    state after it: a new state entry before Adam's lazy init would stop that init.
    """

    def __init__(self, opt: "GradESOptimizer", active: bool):
        self.opt, self.active = opt, active
        self.opens = active and (opt._step - 1) % opt.check_interval == 0
        self._copies: list = []

    def open(self, live) -> None:
        if self.opens:
            copies = self.opt._reused_copies("window", live, [p.detach() for _, p in live])
            self._copies = [(p, copy) for (_, p), copy in zip(live, copies)]

    def close(self, check: bool) -> None:
        opt = self.opt
        if check and self.active:  # frozen components' copies went at their freeze
            for _, p in opt._layout().live:
                st = opt.state.get(p)
                if st:
                    st.pop(_PREV_WEIGHT, None)
        for p, copy in self._copies:
            opt.state[p][_PREV_WEIGHT] = copy


def _release_state(state, p: torch.Tensor) -> int:
    """Drop a frozen parameter's big state tensors, keep scalars such as ``step``; bytes freed."""
    st = state.get(p)
    if not st:
        return 0
    freed = 0
    for key in [k for k, v in st.items() if torch.is_tensor(v) and v.numel() > 1]:
        freed += st[key].numel() * st[key].element_size()
        del st[key]
    if not st:
        del state[p]
    return freed


def _short(seq) -> str:
    seq = list(seq)
    return str(seq) if len(seq) <= 8 else f"{seq[:8]}... ({len(seq)} entries)"


# hyperparameters that identify an optimizer family: a checkpoint's groups have them iff ours do
_CLASS_KEYS = ("betas", "momentum", "lr_decay", "rho", "beta2_decay")


def check_optimizer_state_dict(optimizer: torch.optim.Optimizer, state_dict) -> None:
    """Raise ``ValueError`` if ``optimizer.load_state_dict(state_dict)`` would load another layout
    or optimizer class; modifies nothing (a wrapper also checks its GradES state)."""
    if getattr(optimizer, "_is_grades_wrapper", False):
        optimizer.check_state_dict(state_dict)
    else:
        _check_state_dict(state_dict, optimizer.param_groups, type(optimizer).__name__)


def _check_state_dict(state_dict, groups, type_name: str = "optimizer") -> list:
    if not isinstance(state_dict, dict) or "param_groups" not in state_dict or "state" not in state_dict:
        raise ValueError("Invalid state_dict: expected an optimizer state dict with 'state' and "
                         f"'param_groups', got {type(state_dict).__name__}")
    saved = state_dict["param_groups"]
    if len(saved) != len(groups):
        raise ValueError(f"state_dict has {len(saved)} param groups, this optimizer has {len(groups)}")
    for key in _CLASS_KEYS:
        if saved and (key in groups[0]) != (key in saved[0]):
            lack = "lack" if key in groups[0] else "have"
            raise ValueError(f"state_dict comes from a different optimizer class (its param_groups {lack} "
                             f"{key!r}, this {type_name}'s do{' not' if lack == 'have' else ''}); load it into "
                             "the optimizer class that saved it")
    for g, (s, group) in enumerate(zip(saved, groups)):
        if len(s["params"]) != len(group["params"]):
            raise ValueError(f"state_dict param_groups[{g}] has {len(s['params'])} params, this "
                             f"optimizer's has {len(group['params'])}: a different parameter layout")
    return saved
