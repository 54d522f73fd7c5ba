"""GradES for PyTorch Lightning (``lightning.pytorch`` ≥ 2.4).

``GradESOptimizer`` is a ``torch.optim.Optimizer``, so ``configure_optimizers`` returns it like any
other optimizer (schedulers are attached to the wrapper). Lightning's closure-based
``optimizer.step(closure)`` runs the closure inside the wrapper's ``step``; the precision plugin
unscales (fp16) and clips *inside* that closure, so GradES measures final gradients. Lightning
checkpoints store ``optimizer.state_dict()``, which carries the freeze set, the GradES step counter
and the rule's state, and ``Trainer.fit(ckpt_path=...)`` restores them with no extra code.

:class:`GradESCallback` adds what the loop needs: ``total_steps`` from
``trainer.estimated_stepping_batches``, ``trainer.should_stop`` when every tracked matrix is frozen,
and ``grades/*`` figures logged through ``pl_module.log`` (so every configured logger gets them).
:func:`grades_optimizer` is a shortcut for ``configure_optimizers`` that fills ``model`` and
``total_steps``.

Example::

    class LitModel(L.LightningModule):
        def configure_optimizers(self):
            opt = grades_optimizer(self, torch.optim.AdamW(self.parameters(), lr=1e-3))  # GradES preset
            return opt

    L.Trainer(max_steps=1000, callbacks=[GradESCallback()]).fit(LitModel(), loader)
"""
from __future__ import annotations

import logging
import math
from typing import Optional

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from ..optimizer import GradESOptimizer
from ._common import find_grades_optimizer, grades_figures

__all__ = ["GradESCallback", "grades_optimizer", "find_grades_optimizer", "grades_figures"]

logger = logging.getLogger("grades_optim")


def _stepping_batches(trainer: Optional[Trainer]) -> Optional[int]:
    """Lightning's estimate of the optimizer steps of the fit, or None when unknown/infinite."""
    if trainer is None:
        return None
    steps = trainer.estimated_stepping_batches
    if steps is None or isinstance(steps, bool) or not math.isfinite(steps) or steps < 1:
        return None
    return int(steps)


def grades_optimizer(pl_module: LightningModule, optimizer: torch.optim.Optimizer, **grades_kwargs) -> GradESOptimizer:
    """``GradESOptimizer(optimizer, model=pl_module, **grades_kwargs)`` for ``configure_optimizers``.

    ``total_steps`` defaults to ``trainer.estimated_stepping_batches`` (optimizer steps of the whole
    fit, accumulation included), so ``alpha`` works without counting steps by hand.
    """
    if not isinstance(pl_module, LightningModule):
        raise TypeError(f"Invalid pl_module: expected a LightningModule, got {type(pl_module).__name__}")
    if "model" in grades_kwargs:
        raise TypeError("Invalid argument model: grades_optimizer uses pl_module as the model")
    if grades_kwargs.get("total_steps") is None:
        # ``pl_module.trainer`` raises when the module is not attached; ``_trainer`` does not.
        steps = _stepping_batches(getattr(pl_module, "_trainer", None))
        if steps is not None:
            grades_kwargs["total_steps"] = steps
    return GradESOptimizer(optimizer, model=pl_module, **grades_kwargs)


class GradESCallback(Callback):
    """Connects the ``GradESOptimizer`` (s) returned by ``configure_optimizers`` to the fit loop.

    - **train start** (after a checkpoint is restored): ``opt.set_total_steps`` from
      ``trainer.estimated_stepping_batches`` when known; if a resumed run is already fully frozen,
      ``trainer.should_stop`` is set at once.
    - **train batch end**: logs ``grades/frozen``, ``grades/tracked``, ``grades/frozen_ratio``,
      ``grades/step`` and ``grades/mag_<kind>`` (mean metric of the latest check per component
      kind) with ``pl_module.log(on_step=True)``; sets ``trainer.should_stop`` once every GradES
      optimizer ``should_stop``.

    Args:
        set_total_steps: call ``opt.set_total_steps`` at train start. Default True.
        stop_training: set ``trainer.should_stop`` when GradES says stop. Default True.
        log_figures: log the figures. Default True.
        prefix: metric name prefix. Default ``"grades/"``.
        prog_bar: also show the figures in the progress bar. Default False.
    """

    def __init__(self, *, set_total_steps: bool = True, stop_training: bool = True, log_figures: bool = True,
                 prefix: str = "grades/", prog_bar: bool = False):
        if not isinstance(prefix, str):
            raise TypeError(f"Invalid prefix: expected a str, got {type(prefix).__name__}")
        self.set_total_steps = bool(set_total_steps)
        self.stop_training = bool(stop_training)
        self.log_figures = bool(log_figures)
        self.prefix = prefix
        self.prog_bar = bool(prog_bar)
        self.stopped_at_step: Optional[int] = None  # trainer.global_step at which GradES ended the fit

    @staticmethod
    def grades_optimizers(trainer: Trainer) -> list[GradESOptimizer]:
        """The GradES wrappers among ``trainer.optimizers`` (LightningOptimizer unwrapped)."""
        found = [find_grades_optimizer(o) for o in trainer.optimizers]
        return [o for o in found if o is not None]

    def _require(self, trainer: Trainer) -> list[GradESOptimizer]:
        opts = self.grades_optimizers(trainer)
        if not opts:
            names = ", ".join(type(o).__name__ for o in trainer.optimizers) or "none"
            raise TypeError(f"GradESCallback: no GradESOptimizer among the trainer's optimizers ({names}); "
                            "return GradESOptimizer(...) or grades_optimizer(self, ...) from configure_optimizers")
        return opts

    def _stop_if_done(self, trainer: Trainer, opts: list[GradESOptimizer]) -> None:
        if self.stop_training and not trainer.should_stop and all(o.should_stop for o in opts):
            self.stopped_at_step = trainer.global_step
            logger.info("GradES: all tracked matrices frozen, stopping at step %d", trainer.global_step)
            trainer.should_stop = True

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        opts = self._require(trainer)
        steps = _stepping_batches(trainer) if self.set_total_steps else None
        if steps is not None:
            for opt in opts:
                opt.set_total_steps(steps)
        # Resumed from a checkpoint taken after everything froze: stop before a step that would
        # have no trainable matrix.
        self._stop_if_done(trainer, opts)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        opts = self._require(trainer)
        if self.log_figures:
            for name, value in grades_figures(opts, self.prefix).items():
                # batch_size given so Lightning does not try to infer it from the batch.
                pl_module.log(name, value, on_step=True, on_epoch=False, prog_bar=self.prog_bar,
                              logger=True, batch_size=1)
        self._stop_if_done(trainer, opts)
