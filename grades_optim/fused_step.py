"""The fused fast path of ``GradESOptimizer.step``: tracked matrices stepped by one Triton pass each.

When it applies. ``impl`` resolves to Triton for the tracked parameters (``"triton"``, or
``"auto"`` with CUDA tensors), the inner optimizer is exactly ``torch.optim.AdamW`` / ``Adam``
(decoupled or L2 weight decay, per-group lr/betas/eps/weight_decay, ``maximize``; ``fused=True`` /
``capturable=True``, whose ``step`` counters torch keeps on the device, advance them there) or
``torch.optim.SGD`` (momentum, dampening, nesterov, weight decay, ``maximize``; ``fused=True`` is
replaced by the kernel), with plain or (Adam) FSDP2 DTensor parameters, whose local shards the
kernel steps in place, and the metric is ``grad_l1``, ``grad_l2``, ``weight_delta_l1`` or (Adam)
``update_snr``, the library default, read from the moments the pass has just written. Then each step:

1. the live tracked parameters with a gradient are updated by ``kernels.fused_adamw`` /
   ``kernels.fused_sgd``, one launch per param group and dtype, and the metric's per-tensor sums
   come out of the same pass (only read at checks);
2. the inner optimizer's own ``step`` runs for the untracked parameters, the tracked ones hidden
   from its groups (as ``_masked_inner_step`` hides frozen ones).

Optimizer state stays torch's — ``exp_avg``, ``exp_avg_sq``, ``step`` (a CPU scalar, or a device
scalar for fused/capturable groups) or
``momentum_buffer`` — created lazily exactly as torch's ``_init_group`` would, so state dicts move
freely between this path, the reference path and plain torch optimizers.

Anything else falls back to the reference path (``GradESOptimizer``'s own code), logged once per
reason and exposed as ``opt.fast_path`` (``None`` or a short description of the path taken) and
``opt.fast_path_reason``. Group options are re-checked every step (a scheduler may make ``lr`` a
tensor, ``load_state_dict`` may bring ``amsgrad``): O(groups). They are an allow-list (``_ALLOWED``):
a key the kernel neither implements nor knows to be inert turns the fused path off while it is set,
so an option torch adds later is never silently ignored. The per-parameter checks (dtype,
device, contiguity, state layout) and torch's lazy state init run only when the parameter set
changes: the wrapper's cached layout (the groups and the freeze set) or the gradients' addresses,
which the caching allocator hands back step after step. Autograd keeps a gradient's dtype, device
and shape equal to its parameter's, so an unchanged address set means unchanged answers.

The steady state (Adam). Once a parameter set has stepped twice unchanged with every live tracked
parameter holding a gradient, each group's set is prepared (``kernels.fused_adamw.PreparedAdamW``):
its ``step`` counters move into one tensor (the states keep 0-d views of it, same dtype, device
and values, so state dicts are torch's), its launch table is held, and a step then costs O(groups)
Python plus one address comparison per parameter and gradient: the counters advance in one op, the
bias corrections are formed once per group. A changed layout, state mapping (an inner
``load_state_dict``), address, or a missing gradient takes the full path, which prepares again.

Host syncs. Between checks a fused step does none: launch tables are cached on addresses (a
rebuild uploads through pinned memory), flags live in the cached table, Adam's bias corrections
come from torch's CPU ``step`` counters and go up through pinned memory (or, for fused/capturable
groups, are formed on the device from its ``step`` counters). The freeze rule stays
on the host (``grades_optim.rule``, the specification): a check brings the readings back once, as
on the reference path, and frozen matrices simply leave the launch list. ``kernels.decide`` (the
rule on the device, tested against ``rule``) is what a sync-free check would add; not wired: the
readings are needed on the host at every check anyway for ``history`` and the rank agreement.
"""
from __future__ import annotations

import itertools
import logging
from typing import NamedTuple, Optional

import torch


from .kernels import dispatch


def _scalar_dtype() -> torch.dtype:
    # Adam._init_group's `step` dtype (torch's private _get_scalar_dtype): float64 only when that
    # is the default dtype, so state dicts match a plain torch optimizer's exactly.
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32

__all__ = ["FusedStep", "attach", "static_reason"]

logger = logging.getLogger("grades_optim")

_KINDS = {torch.optim.AdamW: "adamw", torch.optim.Adam: "adam", torch.optim.SGD: "sgd"}
_PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# metric -> the kernels' ord (3: the stored weight change, computed in the update's own pass)
_FUSED_METRICS = {"grad_l1": 1, "grad_l2": 2, "weight_delta_l1": 3, "update_snr": 4}  # 4: Adam kernels only
# Group keys, an allow-list: the options each kernel implements, and keys that never change an update
# (how the inner step executes, which the kernel replaces; LR-scheduler and naming bookkeeping; the
# wrapper's own). Any other key with a truthy value sends the step to the reference path, so an
# option torch adds later is never silently ignored.
_IMPLEMENTED = {"adam": ("lr", "betas", "eps", "weight_decay", "maximize", "decoupled_weight_decay", "fused",
                         "capturable"),
                "sgd": ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize", "fused")}
_INERT = ("params", "foreach", "initial_lr", "base_lr", "max_lr", "min_lr", "start_lr", "end_lr", "base_momentum",
          "max_momentum", "start_momentum", "end_momentum", "name", "param_names",
          "grades_cid", "grades_numel", "grades_state", "grades_step", "grades_counters",
          "grades_rule")
_ALLOWED = {kind: frozenset(keys + _INERT) for kind, keys in _IMPLEMENTED.items()}
_WHY: dict = {}  # key -> why the kernel does not take it, where more can be said than "not implemented"
_NUMBERS = {"adam": ("lr", "eps", "weight_decay"), "sgd": ("lr", "momentum", "dampening", "weight_decay")}


def _kind(inner) -> Optional[str]:
    kind = _KINDS.get(type(inner))
    return "adam" if kind == "adamw" else kind


def static_reason(opt) -> Optional[str]:
    """Why the fused path can never run for this wrapper, or ``None`` if it may (checked per step)."""
    if opt.impl == "torch":
        return "impl='torch'"
    if type(opt.optimizer) not in _KINDS:
        return (f"inner optimizer {type(opt.optimizer).__name__} has no fused kernel (exactly torch.optim.AdamW, "
                "Adam or SGD)")
    if opt.metric not in _FUSED_METRICS or (_FUSED_METRICS[opt.metric] == 4 and _kind(opt.optimizer) != "adam"):
        return (f"metric={opt.metric!r} is measured by the reference path (fused: "
                f"{', '.join(_FUSED_METRICS)}; update_snr with Adam/AdamW)")
    return None


def _group_reason(kind: str, group: dict) -> Optional[str]:
    for key in sorted(group.keys() - _ALLOWED[kind]):  # a set difference: per step, O(extra keys)
        value = group[key]
        if value is not None and value is not False and not (isinstance(value, (int, float)) and value == 0):
            return (f"{key}={value!r} {_WHY.get(key, 'is not an option the fused kernel implements')} "
                    f"(param group keys it takes: {', '.join(_IMPLEMENTED[kind])})")
    names = _NUMBERS[kind] + (("betas",) if kind == "adam" else ())
    values = list(group.get("betas", ())) if kind == "adam" else []
    values += [group.get(k) for k in _NUMBERS[kind]]
    if any(not isinstance(v, (int, float)) or isinstance(v, bool) for v in values):
        return f"a tensor (or non-number) among {', '.join(names)} is not supported by the fused kernel"
    return None


def _adam_hyper(group: dict) -> dict:
    """The fused Adam step's hyperparameters from a param group (Adam and AdamW, both paths)."""
    beta1, beta2 = group["betas"]
    return dict(lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                decoupled=bool(group.get("decoupled_weight_decay", False)), maximize=bool(group["maximize"]))


def device_steps(group: dict) -> bool:
    """Adam groups whose ``step`` counters torch keeps on the param's device (fused / capturable)."""
    return bool(group.get("fused") or group.get("capturable"))


def _local(t):
    # FSDP2 DTensor: the rank's shard (under no_grad the DTensor's own local tensor, a stable object
    # sharing its storage, so the kernel's in-place update is the DTensor's)
    return t.to_local() if hasattr(t, "to_local") else t


def _param_reason(kind: str, p: torch.Tensor, state: dict, device: torch.device,
                  on_device: bool = False) -> Optional[str]:
    g = p.grad
    if hasattr(p, "to_local") or hasattr(g, "to_local"):
        if kind != "adam":
            return "DTensor (FSDP2) parameters with SGD (the fused path takes them with Adam/AdamW)"
        if not (hasattr(p, "to_local") and hasattr(g, "to_local")):
            return "a DTensor parameter with a plain gradient (or the reverse)"
        state = {k: _local(v) if k != "step" else v for k, v in state.items()}
        p, g = p.to_local(), g.to_local()
    if p.dtype not in _PARAM_DTYPES or g.dtype != p.dtype:
        return f"{p.dtype} parameters with {g.dtype} gradients (the fused path takes fp32, bf16 or fp16, one dtype)"
    if p.device != device or g.device != device:
        return "tracked parameters on more than one device"
    if not (p.is_contiguous() and g.is_contiguous()):
        return "non-contiguous parameters or gradients"
    for key in ("exp_avg", "exp_avg_sq", "momentum_buffer"):
        s = state.get(key)
        # moments in fp32 or (torch's own layout for bf16/fp16 params) in the param dtype; momentum
        # buffers in the param dtype, as torch keeps them
        dtypes = (p.dtype,) if key == "momentum_buffer" else (torch.float32, p.dtype)
        if s is not None and (s.dtype not in dtypes or not s.is_contiguous() or s.device != device):
            return (f"optimizer state {key!r} that is not a contiguous {' or '.join(map(str, dtypes))} tensor "
                    "on the param's device")
    step = state.get("step")
    if kind == "adam" and step is not None and (step.device != device if on_device else step.device.type != "cpu"):
        # a state loaded across layouts: torch moves it at its own next step, the kernel does not
        return (f"a `step` tensor on {step.device} in a group with "
                f"{'fused/capturable' if on_device else 'CPU'} step counters")
    return None


class _Hot(NamedTuple):
    layout: object  # the wrapper's _Layout it was prepared on (groups and freeze set)
    state: dict  # the inner optimizer's state dict object (load_state_dict replaces it)
    params: list  # every live tracked param, in launch order
    local: Optional[list]  # DTensor (FSDP2) params: their local shards (else None: the params themselves)
    ptrs: tuple  # their data addresses, then their gradients'
    ordered: list  # (component, param) in launch order
    runs: list  # (group index, PreparedAdamW)


def _bulk_counters(state, params) -> torch.Tensor:
    """One tensor with the params' Adam ``step`` counters; each state's ``step`` becomes a 0-d view of it.

    Same dtype, device and values, so the states read as torch's own; the counters then advance
    in one op per group instead of one per parameter.
    """
    steps = [state[p]["step"] for p in params]
    buf = torch.stack([s.reshape(()) for s in steps]) if steps else torch.zeros(0)
    for i, p in enumerate(params):
        state[p]["step"] = buf[i]
    return buf


def attach(opt) -> Optional["FusedStep"]:
    """Set ``opt.fast_path``/``fast_path_reason``; the step runner, or ``None`` when it can never run."""
    reason = static_reason(opt)
    opt.fast_path, opt.fast_path_reason = None, reason
    if reason is None:
        return FusedStep(opt)
    if opt.impl != "torch":  # an explicit impl='torch' asked for the reference path: nothing to say
        level = logging.WARNING if opt.impl == "triton" else logging.INFO
        logger.log(level, "GradES: reference step instead of the fused path: %s", reason)
    return None


class FusedStep:
    """Runs the fused step for one wrapper; ``None`` from ``__call__`` means: take the reference path."""

    def __init__(self, opt):
        self.opt = opt
        self.kind = _kind(opt.optimizer)
        self.ord = _FUSED_METRICS[opt.metric]
        self.description = f"triton fused {type(opt.optimizer).__name__} + {opt.metric} (tracked matrices)"
        self._logged: set[str] = set()
        # (layout, gradient addresses) of the last step that passed every per-parameter check
        # and whose states exist; and per group the tensor lists that step launched with
        self._ok: Optional[tuple] = None
        self._lists: dict[int, tuple] = {}
        self._hot: Optional[_Hot] = None  # the prepared steady state (Adam): see _hot_step
        # (layout, device) for which impl="auto" chose the reference path: not re-asked every step
        self._torch_for: Optional[tuple] = None

    def fallback(self, reason: str) -> None:
        self.opt.fast_path, self.opt.fast_path_reason = None, reason
        if reason not in self._logged:
            self._logged.add(reason)
            level = logging.WARNING if self.opt.impl == "triton" else logging.INFO
            logger.log(level, "GradES: reference step instead of the fused path: %s", reason)

    def _reason(self, live, hit: bool) -> Optional[str]:
        opt = self.opt
        params = [p for _, p in live]
        if not hit and dispatch.resolve_impl(opt.impl, params[:1]) != "triton":
            if not params:
                return None
            self._torch_for = (opt._layout(), params[0].device)
            return f"impl={opt.impl!r} resolves to torch for {params[0].device} tensors"
        for group in opt.param_groups:
            reason = _group_reason(self.kind, group)
            if reason:
                return reason
        if hit:
            return None
        if opt.metric == "weight_delta_l1" and opt.check_interval > 1 and any(hasattr(p, "to_local") for p in params):
            return "DTensor (FSDP2) parameters with weight_delta_l1 over check_interval > 1 (a weight copy per window)"
        device = params[0].device if params else None
        where = opt._layout().group_of
        layouts: dict[int, set] = {}  # Adam groups: where the moments of bf16/fp16 params live
        for p in params:
            g = where[id(p)]
            on_device = self.kind == "adam" and device_steps(opt.param_groups[g])
            st = opt.state.get(p, {})
            reason = _param_reason(self.kind, p, st, device, on_device)
            if reason:
                return reason
            if self.kind == "adam" and p.dtype != torch.float32:
                # an empty state gets torch's layout (moments in the param dtype) at its lazy init
                m = st.get("exp_avg")
                layouts.setdefault(g, set()).add(m is None or m.dtype == p.dtype)
        if any(len(s) > 1 for s in layouts.values()):
            return "bf16/fp16 params whose Adam moments are partly fp32, partly in the param dtype, in one group"
        return None

    def __call__(self, check: bool):
        """Step the live tracked params (and the rest through the inner optimizer); ``(live, sums)`` or ``None``."""
        out = self._hot_step(check)
        if out is not None:
            return out
        opt = self.opt
        layout = opt._layout()
        if self._torch_for is not None and self._torch_for[0] is layout and layout.live \
                and layout.live[0][1].device == self._torch_for[1]:
            return None  # impl="auto" with CPU tensors: decided for this layout and device already
        live = opt._live_tracked_with_grad()
        # an empty gradient has address 0: its parameter's identity stands in, so two sets differ
        key = (opt._layout(), tuple(_local(p.grad).data_ptr() or id(p) for _, p in live))
        hit = self._ok is not None and key[0] is self._ok[0] and key[1] == self._ok[1]
        if not hit:
            self._ok, self._lists = None, {}
        reason = self._reason(live, hit)
        if reason is not None:
            self._ok, self._lists = None, {}  # the inner optimizer steps them now: re-check afterwards
            self.fallback(reason)
            return None
        opt.fast_path, opt.fast_path_reason = self.description, "supported"
        # weight_delta_l1 every k > 1 steps: W_t - W_{t-k} from a copy (one delta pass at the check),
        # not the kernel's one-step change
        window = opt._weight_window()
        window.open(live)
        in_kernel = check and not window.active
        by_group: dict[int, list] = {}
        where = opt._layout().group_of
        for c, p in live:
            by_group.setdefault(where[id(p)], []).append((c, p))
        ordered, sums = [], []
        for g, items in by_group.items():
            params = [p for _, p in items]
            run = self._adam if self.kind == "adam" else self._sgd
            out = run(g, opt.param_groups[g], params, in_kernel)
            ordered += items
            sums.append(out)
        self._ok = key
        opt._masked_inner_step(hide_tracked=True)
        if check and window.active:
            ordered, before = opt._weight_delta_inputs(ordered, window)
            sums = dispatch.tensor_delta_sums([p.detach() for _, p in ordered], before, 1, impl="triton")
            window.close(check)
            return ordered, sums
        window.close(check)
        if hit and self.kind == "adam" and len(live) == len(opt._layout().live):  # stable twice: prepare
            self._prepare(key, ordered, by_group)
        return self._readings(ordered, sums if check else None)

    def _readings(self, ordered, sums):
        """``(ordered, sums)`` of a step's pass (``sums`` None off checks), less lr=0 groups' weight deltas."""
        if sums is None:
            return ordered, None
        sums = torch.cat(sums) if sums else None
        zero = self.opt._zero_lr_groups() if sums is not None and self.ord == 3 else None
        if zero:  # as on the reference path: a step at lr=0 gives no weight-delta reading
            where = self.opt._layout().group_of
            keep = [k for k, (_, p) in enumerate(ordered) if where[id(p)] not in zero]
            if len(keep) < len(ordered):
                ordered = [ordered[k] for k in keep]
                sums = sums[torch.tensor(keep, dtype=torch.long, device=sums.device)]
        return ordered, sums

    # -- the prepared steady state (Adam) --------------------------------------------------
    def _prepare(self, key, ordered, by_group) -> None:
        """After a full fused step in which every live tracked param had a gradient: prepare the next ones.

        Each group's ``step`` counters move into one tensor (the states keep 0-d views of it, so
        state dicts are unchanged) and its tensor set into a ``PreparedAdamW``. From then on a step
        whose layout, state and param/gradient addresses are those of this one costs O(groups) Python
        plus one address comparison per parameter (``_hot_step``); anything else takes the full path,
        which prepares again.
        """
        opt, runs = self.opt, []
        for g, items in by_group.items():
            params = [p for _, p in items]
            exp_avgs, exp_avg_sqs, _, _, in_param_dtype = self._lists[g]
            counters = _bulk_counters(opt.state, params)
            runs.append((g, dispatch.prepared_adamw([_local(p) for p in params], [_local(p.grad) for p in params],
                                                    exp_avgs, exp_avg_sqs, counters,
                                                    device_steps=device_steps(opt.param_groups[g]),
                                                    states_in_param_dtype=in_param_dtype)))
        params = [p for _, p in ordered]
        sharded = any(hasattr(p, "to_local") for p in params)
        local = [_local(p) for p in params] if sharded else params
        ptrs = tuple(map(torch.Tensor.data_ptr, itertools.chain(local, (_local(p.grad) for p in params))))
        # the full path's lists hold the step tensors the views replaced: it must rebuild them
        self._ok, self._lists = None, {}
        self._hot = _Hot(key[0], opt.state, params, local if sharded else None, ptrs, ordered, runs)

    def _hot_step(self, check: bool):
        """The prepared step, or ``None`` (take the full path) when anything it was prepared on changed."""
        hot, opt = self._hot, self.opt
        if hot is None:
            return None
        if hot.layout is not opt._layout() or hot.state is not opt.state:
            self._hot = None
            return None
        try:  # a missing (None) or sparse gradient raises here: the full path sorts it out
            if hot.local is None:
                ptrs = tuple(map(torch.Tensor.data_ptr, itertools.chain(hot.params, [p.grad for p in hot.params])))
            else:  # DTensor (FSDP2): the shards' addresses
                ptrs = tuple(map(torch.Tensor.data_ptr,
                                 itertools.chain(hot.local, [_local(p.grad) for p in hot.params])))
        except (TypeError, RuntimeError):
            return None
        if ptrs != hot.ptrs:
            return None
        groups = opt.param_groups
        for group in groups:
            if _group_reason(self.kind, group):
                return None
        opt.fast_path, opt.fast_path_reason = self.description, "supported"
        sums = []
        for g, run in hot.runs:
            sums.append(run.step(**_adam_hyper(groups[g]), ord=self.ord, metric=check))
        opt._masked_inner_step(hide_tracked=True)
        return self._readings(hot.ordered, sums if check else None)

    def _adam(self, g: int, group: dict, params: list, check: bool):
        lists = self._lists.get(g)
        checked = lists is not None  # these tensors passed the kernel's checks at an earlier step
        on_device = device_steps(group)
        if lists is None:  # a new parameter set: states may be missing
            state = self.opt.state
            for p in params:
                st = state[p]
                if len(st) == 0:  # torch's lazy init (Adam._init_group)
                    # fused: float32 on the param's device; capturable: the default scalar dtype there
                    st["step"] = (torch.zeros((), dtype=torch.float32 if group.get("fused") else _scalar_dtype(),
                                              device=p.device) if on_device
                                  else torch.tensor(0.0, dtype=_scalar_dtype()))
                    st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            sts = [state[p] for p in params]
            # one layout per group (checked in _reason): moments in the param dtype if any low-precision
            # param keeps them so (fp32 params have fp32 moments either way)
            in_param_dtype = any(p.dtype != torch.float32 and s["exp_avg"].dtype == p.dtype
                                 for p, s in zip(params, sts))
            lists = self._lists[g] = ([_local(s["exp_avg"]) for s in sts], [_local(s["exp_avg_sq"]) for s in sts],
                                      [s["step"] for s in sts], [True] * len(params), in_param_dtype)
        exp_avgs, exp_avg_sqs, steps, active, in_param_dtype = lists
        return dispatch.fused_adamw_step(
            [_local(p) for p in params], [_local(p.grad) for p in params], exp_avgs, exp_avg_sqs, steps, active,
            **_adam_hyper(group), ord=self.ord, metric=check, impl="triton", checked=checked,
            device_steps=on_device, states_in_param_dtype=in_param_dtype)

    def _sgd(self, g: int, group: dict, params: list, check: bool):
        state, momentum = self.opt.state, group["momentum"]
        # Like SGD._init_group: only momentum creates a state entry, and a buffer only on its first step.
        bufs = [state[p].get("momentum_buffer") for p in params] if momentum != 0 else [None] * len(params)
        out = dispatch.fused_sgd_step(
            params, [p.grad for p in params], bufs, [True] * len(params), lr=group["lr"], momentum=momentum,
            dampening=group["dampening"], weight_decay=group["weight_decay"], nesterov=bool(group["nesterov"]),
            maximize=bool(group["maximize"]), ord=self.ord, metric=check, impl="triton")
        if momentum != 0:
            for p, buf in zip(params, bufs):
                state[p]["momentum_buffer"] = buf
        return out
