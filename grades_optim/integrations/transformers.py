"""GradES for the Hugging Face ``Trainer`` (transformers ≥ 5; PEFT and accelerate work unchanged).

Three ways to hand a :class:`~grades_optim.GradESOptimizer` to ``Trainer``, plus one callback:

- ``Trainer(..., optimizers=(opt, sched))`` with ``opt, sched =``
  :func:`create_grades_optimizer_and_scheduler` ``(model, args, num_training_steps, tau=...)``,
  which builds the inner optimizer and the LR schedule exactly as ``Trainer`` would from
  ``TrainingArguments`` (``optim``, ``learning_rate``, ``weight_decay`` split, betas, warmup…).
  ``optimizers=(opt, None)`` also works: Trainer then builds its scheduler on the wrapper.
- ``Trainer(..., optimizer_cls_and_kwargs=(GradESOptimizerFactory, {...}))``: Trainer calls
  ``GradESOptimizerFactory()(model, **kwargs)`` (its *optimizer factory* protocol,
  ``transformers.trainer_optimizer.is_optimizer_factory``), so the wrapper gets the real model and
  its parameter names; ``TrainingArguments`` still drive the scheduler.
- :class:`GradESCallback` (add it in every case): sets ``total_steps`` from
  ``state.max_steps`` at train begin (so ``alpha`` works without counting steps by hand), stops
  training when every tracked matrix is frozen (saving/logging as at a normal end), and adds
  ``grades_*`` figures to each log. :func:`add_grades_callback` registers it *first*, so that
  every reporter (TensorBoard, W&B, the console printer…) sees the figures.

Resume: the freeze set, the GradES step counter and the rule's per-matrix state ride in the
optimizer's ``param_groups``, i.e. inside the ``optimizer.pt`` that ``Trainer`` saves and
reloads; ``trainer.train(resume_from_checkpoint=...)`` restores them with no extra code, as long as
the model and optimizer are built the same way as for the saved run.

Why the wrapper sees the right gradients: accelerate's ``AcceleratedOptimizer`` calls the
wrapper's ``step()`` once per *optimizer* step (after gradient accumulation), after Trainer's
clipping (which also unscales fp16 gradients), so magnitudes are measured on the final gradients.

This module imports transformers; the core package never imports it.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.optimization import get_scheduler
from transformers.trainer_pt_utils import get_parameter_names

from ..optimizer import GradESOptimizer
from ._common import find_grades_optimizer, grades_figures

__all__ = [
    "GradESCallback",
    "GradESOptimizerFactory",
    "add_grades_callback",
    "create_grades_optimizer",
    "create_grades_optimizer_and_scheduler",
    "find_grades_optimizer",
    "grades_figures",
]

logger = logging.getLogger("grades_optim")

# Trainer.get_decay_parameter_names (transformers 5.24, trainer.py l.1408): no decay for biases
# and norms. Repeated here because that method is an instance method of Trainer and the optimizer
# is built before the Trainer exists.
_NO_DECAY_PATTERNS = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]


def _decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainer's two parameter groups (decay / no decay) over the trainable parameters."""
    decay = set(get_parameter_names(model, [nn.LayerNorm], _NO_DECAY_PATTERNS))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in named if n in decay], "weight_decay": weight_decay},
        {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def _require_total_steps(optimizer: GradESOptimizer, args, kwargs) -> None:
    """Step pre-hook of a wrapper whose ``alpha`` waits for ``total_steps`` (see :func:`_wrap`).

    A module-level function, not a closure, so the wrapper stays picklable/deep-copyable.
    """
    if optimizer.total_steps is None:
        raise RuntimeError(
            f"GradES alpha={optimizer.alpha} needs total_steps before the first step: add "
            "GradESCallback to the Trainer (it sets total_steps from state.max_steps) or pass "
            "total_steps= / grace_steps=")


def _wrap(inner: torch.optim.Optimizer, model: nn.Module, grades_kwargs: dict) -> GradESOptimizer:
    """``GradESOptimizer(inner, model=model, **grades_kwargs)``, allowing ``alpha`` without steps.

    The core refuses ``alpha > 0`` without ``total_steps`` (the grace period would be unknown).
    Inside Trainer the step count is known only at train begin, where :class:`GradESCallback`
    calls ``set_total_steps``. So the wrapper is built with ``alpha=0`` and ``alpha`` is set
    afterwards (``set_total_steps`` derives the grace period from the ``alpha`` attribute); a step
    pre-hook refuses to train until ``total_steps`` is known, so a missing callback cannot silently
    turn the grace period into zero.
    """
    if "model" in grades_kwargs:
        raise TypeError("Invalid argument model: the model is given positionally (Trainer passes it)")
    kwargs = dict(grades_kwargs)
    alpha = kwargs.get("alpha", 0.0)
    deferred = (isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and alpha > 0
                and kwargs.get("total_steps") is None and not kwargs.get("grace_steps"))
    if deferred:
        if not alpha < 1.0:  # checked here: the core never sees this alpha at construction
            raise ValueError(f"Invalid alpha: {alpha!r}; expected a fraction of total_steps in [0, 1)")
        kwargs["alpha"] = 0.0
    opt = GradESOptimizer(inner, model=model, **kwargs)
    if deferred:
        opt.alpha = float(alpha)
        opt.register_step_pre_hook(_require_total_steps)
    return opt


def create_grades_optimizer(model: nn.Module, args: TrainingArguments, **grades_kwargs) -> GradESOptimizer:
    """The optimizer ``Trainer`` would build from ``args`` (``optim``, lr, weight decay split,
    betas/eps), wrapped in ``GradESOptimizer(..., model=model, **grades_kwargs)``.

    Build it over the model you pass to ``Trainer`` (for PEFT, the ``PeftModel``), *after* freezing
    whatever should not train, since only trainable parameters go into the optimizer.
    ``alpha`` without ``total_steps`` is allowed here: :class:`GradESCallback` supplies the step
    count at train begin.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"Invalid model: expected a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(args, TrainingArguments):
        raise TypeError(f"Invalid args: expected transformers.TrainingArguments, got {type(args).__name__}")
    optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    special = {"params", "model", "optimizer_dict"} & set(optimizer_kwargs)
    if special or not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, torch.optim.Optimizer)):
        raise ValueError(f"Invalid args.optim: {args.optim!r} builds its own parameter layout "
                         "(GaLore, LOMO, layer-wise or factory optimizers); GradES needs a plain "
                         "torch.optim.Optimizer over the model's parameters")
    inner = optimizer_cls(_decay_groups(model, args.weight_decay), **optimizer_kwargs)
    return _wrap(inner, model, grades_kwargs)


def create_grades_optimizer_and_scheduler(model: nn.Module, args: TrainingArguments,
                                          num_training_steps: Optional[int] = None, **grades_kwargs):
    """``(optimizer, lr_scheduler)`` for ``Trainer(optimizers=...)``, both as Trainer builds them.

    Args:
        model: the model given to ``Trainer``.
        args: the ``TrainingArguments`` given to ``Trainer``.
        num_training_steps: optimizer steps of the run; defaults to ``args.max_steps`` when that
            is set (> 0). Sets the scheduler's horizon and GradES's ``total_steps`` (unless given).
        **grades_kwargs: ``GradESOptimizer`` arguments (``tau``, ``alpha``, ``tau_mode``, …).
    """
    if num_training_steps is None:
        if args.max_steps is None or args.max_steps <= 0:
            raise ValueError("Invalid num_training_steps: None, and args.max_steps is not set; pass the "
                             "number of optimizer steps (len(dataloader) // grad_accum * epochs)")
        num_training_steps = int(args.max_steps)
    if isinstance(num_training_steps, bool) or not isinstance(num_training_steps, int) or num_training_steps < 1:
        raise ValueError(f"Invalid num_training_steps: {num_training_steps!r}; expected an int >= 1")
    grades_kwargs.setdefault("total_steps", num_training_steps)
    opt = create_grades_optimizer(model, args, **grades_kwargs)
    # Scheduler attached to the wrapper (not the inner): Trainer and torch check the identity.
    sched = get_scheduler(args.lr_scheduler_type, opt, num_warmup_steps=args.get_warmup_steps(num_training_steps),
                          num_training_steps=num_training_steps,
                          scheduler_specific_kwargs=args.lr_scheduler_kwargs)
    return opt, sched


class GradESOptimizerFactory:
    """Optimizer factory for ``Trainer(optimizer_cls_and_kwargs=(GradESOptimizerFactory, kwargs))``.

    Trainer instantiates it with no arguments and calls the instance with ``(model, **kwargs)``.
    ``kwargs`` are the ``GradESOptimizer`` arguments (``tau``, ``alpha``, …) plus:

    - ``optimizer_cls``: the inner optimizer class (default ``torch.optim.AdamW``);
    - ``optimizer_kwargs``: its keyword arguments, e.g. ``{"lr": 2e-4}`` (the factory does not see
      ``TrainingArguments``, so the learning rate must be given here; the *schedule* still comes
      from ``TrainingArguments``);
    - ``weight_decay``: applied with Trainer's split (no decay for biases and norms). Default 0.

    Example::

        Trainer(model=model, args=args, train_dataset=ds,
                optimizer_cls_and_kwargs=(GradESOptimizerFactory,
                                          {"tau": 0.5, "tau_mode": "relative", "alpha": 0.1,
                                           "optimizer_kwargs": {"lr": 2e-4}}),
                callbacks=[GradESCallback()])
    """

    def __call__(self, model: nn.Module, *, optimizer_cls: type = torch.optim.AdamW,
                 optimizer_kwargs: Optional[dict] = None, weight_decay: float = 0.0,
                 **grades_kwargs) -> GradESOptimizer:
        if not isinstance(model, nn.Module):
            raise TypeError(f"Invalid model: expected a torch.nn.Module, got {type(model).__name__}")
        if not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, torch.optim.Optimizer)):
            raise TypeError(f"Invalid optimizer_cls: expected a torch.optim.Optimizer subclass, got {optimizer_cls!r}")
        if optimizer_kwargs is not None and not isinstance(optimizer_kwargs, dict):
            raise TypeError(f"Invalid optimizer_kwargs: expected a dict, got {type(optimizer_kwargs).__name__}")
        if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or weight_decay < 0:
            raise ValueError(f"Invalid weight_decay: {weight_decay!r}; expected a number >= 0")
        inner = optimizer_cls(_decay_groups(model, float(weight_decay)), **(optimizer_kwargs or {}))
        return _wrap(inner, model, grades_kwargs)


class GradESCallback(TrainerCallback):
    """Connects a ``GradESOptimizer`` to the ``Trainer`` loop.

    - **train begin**: ``opt.set_total_steps(state.max_steps)`` (the grace period ``alpha`` is a
      fraction of it); if a resumed run is already fully frozen, training stops at once.
    - **step end**: when ``opt.should_stop``, sets ``control.should_training_stop`` and, as
      Trainer does at its last step, asks for a final log, save (``save_strategy="steps"``) and
      evaluation (``eval_strategy="steps"``).
    - **log**: adds ``grades_frozen``, ``grades_tracked``, ``grades_frozen_ratio``,
      ``grades_step`` and ``grades_mag_<kind>`` (mean metric of the latest check per component
      kind, e.g. ``grades_mag_attention``/``grades_mag_mlp``) to the log dict in place and to
      ``state.log_history``. Callbacks that run *after* this one see them; register it with
      :func:`add_grades_callback` to put it first so every reporter does.

    Args:
        optimizer: the ``GradESOptimizer``; by default it is found in the Trainer's optimizer
            (accelerate's ``AcceleratedOptimizer`` is unwrapped).
        set_total_steps: call ``opt.set_total_steps(state.max_steps)`` at train begin. Default True.
        stop_training: stop when ``opt.should_stop``. Default True.
        log_figures: add the figures to the logs. Default True.
        prefix: key prefix of the figures. Default ``"grades_"``.
    """

    def __init__(self, optimizer: Optional[GradESOptimizer] = None, *, set_total_steps: bool = True,
                 stop_training: bool = True, log_figures: bool = True, prefix: str = "grades_"):
        if optimizer is not None and not isinstance(optimizer, GradESOptimizer):
            raise TypeError(f"Invalid optimizer: expected a GradESOptimizer or None, got {type(optimizer).__name__}")
        if not isinstance(prefix, str):
            raise TypeError(f"Invalid prefix: expected a str, got {type(prefix).__name__}")
        self.optimizer = optimizer
        self.set_total_steps = bool(set_total_steps)
        self.stop_training = bool(stop_training)
        self.log_figures = bool(log_figures)
        self.prefix = prefix
        self.stopped_at_step: Optional[int] = None  # global step at which GradES ended training

    def _grades(self, kwargs: dict) -> GradESOptimizer:
        if self.optimizer is not None:
            return self.optimizer
        found = find_grades_optimizer(kwargs.get("optimizer"))
        if found is None:
            raise TypeError(
                f"GradESCallback: the Trainer's optimizer is {type(kwargs.get('optimizer')).__name__}, not a "
                "GradESOptimizer. Pass optimizers=create_grades_optimizer_and_scheduler(...) or "
                "optimizer_cls_and_kwargs=(GradESOptimizerFactory, {...}) to the Trainer")
        return found

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        opt = self._grades(kwargs)
        self.stopped_at_step = None
        if self.set_total_steps and state.max_steps and state.max_steps > 0:
            if opt.total_steps not in (None, state.max_steps):
                logger.info("GradES total_steps %s -> %d (Trainer's max_steps)", opt.total_steps, state.max_steps)
            opt.set_total_steps(int(state.max_steps))
        if self.stop_training and opt.should_stop:
            # Resumed from a checkpoint written after GradES ended the run. Trainer has no hook to
            # stop *before* the next step: it checks should_training_stop only after a step. If
            # nothing is trainable any more (LoRA-only training, all adapters frozen), that step's
            # backward would fail with an obscure autograd error, so say what happened instead.
            model = kwargs.get("model")
            if model is not None and not any(p.requires_grad for p in model.parameters()):
                raise RuntimeError(
                    f"GradES already ended this run at step {state.global_step}: all "
                    f"{len(opt.components)} tracked matrices are frozen and nothing else is trainable, "
                    "so there is nothing to resume. Load the model from the checkpoint instead")
            logger.warning("GradES: resumed run is already fully frozen; Trainer stops after one step "
                           "(it cannot stop before its first step), which updates only untracked parameters")
            control.should_training_stop = True
            control.should_epoch_stop = True
        return control

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if not self.stop_training:
            return control
        opt = self._grades(kwargs)
        if opt.should_stop:
            if self.stopped_at_step is None:
                self.stopped_at_step = state.global_step
            logger.info("GradES: all %d tracked matrices frozen, stopping at step %d",
                        len(opt.components), state.global_step)
            control.should_training_stop = True
            # Mirror DefaultFlowCallback's end-of-training behaviour (a GradES stop *is* the end).
            control.should_log = True
            if args.save_strategy == "steps":
                control.should_save = True
            if args.eval_strategy == "steps" and args.eval_delay <= state.global_step:
                control.should_evaluate = True
        return control

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: Optional[dict] = None, **kwargs):
        if not self.log_figures or logs is None:
            return control
        # Evaluation logs (eval_*) are left alone: the figures describe training.
        if any(k.startswith(("eval_", "test_")) for k in logs):
            return control
        figures = grades_figures([self._grades(kwargs)], self.prefix)
        logs.update(figures)
        # Trainer.log appended a copy of ``logs`` to log_history just before on_log: update it so
        # trainer_state.json and trainer.state.log_history carry the figures too.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(figures)
        return control


def add_grades_callback(trainer: Trainer, callback: Optional[GradESCallback] = None,
                        **callback_kwargs) -> GradESCallback:
    """Register ``callback`` (or a new ``GradESCallback(**callback_kwargs)``) as the Trainer's
    *first* callback and return it.

    Trainer calls ``on_log`` in list order and puts reporters (TensorBoard, W&B, printer…) before
    user callbacks, so a GradES callback added normally would add its figures after they have
    already written the log. An existing ``GradESCallback`` is moved rather than duplicated.
    """
    if not isinstance(trainer, Trainer):
        raise TypeError(f"Invalid trainer: expected a transformers.Trainer, got {type(trainer).__name__}")
    if callback is not None and callback_kwargs:
        raise TypeError("add_grades_callback: give either callback= or keyword arguments for a new one, not both")
    if callback is not None and not isinstance(callback, GradESCallback):
        raise TypeError(f"Invalid callback: expected a GradESCallback, got {type(callback).__name__}")
    callbacks = trainer.callback_handler.callbacks
    existing = [cb for cb in callbacks if isinstance(cb, GradESCallback)]
    if callback is None:
        callback = existing[0] if existing and not callback_kwargs else GradESCallback(**callback_kwargs)
    for cb in existing:
        callbacks.remove(cb)
    callbacks.insert(0, callback)
    return callback

